"""Reading images: decoding to RGB (EXIF orientation, alpha, 16-bit), corrupt-file detection and finding
image files in folders.

Every loader of this package goes through :func:`decode_image`, which fully decodes a file so that a
truncated or corrupt image fails here (with one of :data:`DECODE_ERRORS`) and can be skipped, never in the
middle of a training step.
"""

from __future__ import annotations

import io
import logging
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps
from torchvision.transforms.v2 import functional as TF

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"})
"""File extensions (lower case) that :func:`find_images` collects."""

DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # includes PIL.UnidentifiedImageError and "image file is truncated"
    ValueError,
    SyntaxError,
    EOFError,
    struct.error,
    IndexError,
    KeyError,
    TypeError,
    MemoryError,
    Image.DecompressionBombError,
)
"""Exceptions that mark an image as corrupt or unreadable (it is skipped, never fatal)."""


_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_HIGH_DEPTH_MODES = frozenset({"I", "F"})


def _high_depth_to_uint8(image: Image.Image) -> Image.Image:
    """Rescale a 16/32-bit integer or float single-channel image to 8-bit ``L``.

    ``I;16*`` is divided by 257; ``I`` is treated as 16-bit when any value exceeds 255; ``F`` is treated
    as ``[0, 1]`` when its maximum is at most 1, else as ``[0, 255]``. Values are then clipped.
    """
    array = np.asarray(image).astype(np.float64)
    peak = float(array.max()) if array.size else 0.0
    if image.mode.startswith("I;16") or (image.mode == "I" and peak > 255):
        array = array / 257.0
    elif image.mode == "F" and peak <= 1.0:
        array = array * 255.0
    return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), mode="L")


def _composite_on_white(image: Image.Image) -> Image.Image:
    """Composite an image with transparency onto an opaque white background."""
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert a PIL image of any mode to ``RGB``; transparency is composited on white."""
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode in _HIGH_DEPTH_MODES or image.mode.startswith("I;16"):
        return _high_depth_to_uint8(image).convert("RGB")
    if image.mode in _ALPHA_MODES or (image.mode in ("P", "L", "RGB") and "transparency" in image.info):
        return _composite_on_white(image)
    return image.convert("RGB")


@contextmanager
def _strict_truncation() -> Iterator[None]:
    """Temporarily make PIL raise on truncated files (``ImageFile.LOAD_TRUNCATED_IMAGES = False``)."""
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def decode_image(source: str | Path | bytes | Image.Image) -> Image.Image:
    """Fully decode an image (path, encoded bytes or PIL image) to RGB, honouring EXIF orientation.

    Raises one of :data:`DECODE_ERRORS` when the data is corrupt, truncated or not an image.
    """
    if isinstance(source, Image.Image):
        return to_rgb(source)
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    if not data:
        raise ValueError("empty image file")
    with _strict_truncation(), Image.open(io.BytesIO(data)) as opened:
        opened.load()
        rgb = to_rgb(_exif_upright(opened))
        return rgb.copy() if rgb is opened else rgb


def _exif_upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag; a malformed EXIF block leaves the image as it is."""
    try:
        return ImageOps.exif_transpose(image)
    except DECODE_ERRORS:
        return image


def try_decode_image(source: str | Path | bytes | Image.Image) -> Image.Image | None:
    """Like :func:`decode_image` but returns ``None`` (and logs a warning) for a corrupt image."""
    try:
        return decode_image(source)
    except DECODE_ERRORS as error:
        name = source if isinstance(source, (str, Path)) else type(source).__name__
        logger.warning("Skipping unreadable image %s: %s: %s", name, type(error).__name__, error)
        return None


def to_signed_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 tensor (3, H, W) in ``[-1, 1]``."""
    return TF.pil_to_tensor(image).to(torch.float32).div_(127.5).sub_(1.0)


def find_images(root: str | Path) -> list[Path]:
    """All image files under ``root`` (recursive, case-insensitive extensions), in sorted order."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    paths = [p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
    return sorted(paths, key=lambda p: p.relative_to(root).as_posix())
