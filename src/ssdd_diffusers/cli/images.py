"""Image and latent-file helpers of the ``ssdd-diffusers`` command line.

* :func:`collect_images`: image files and folders (searched recursively) -> ordered list of files.
* :func:`load_image` / :func:`prepare_image`: decode to RGB, then resize + centre-crop to a given
  resolution or centre-crop to a multiple of the model's size factor, saying what was done.
* :func:`save_png`: a (1, 3, H, W) tensor in [-1, 1] -> PNG, quantised like the metrics.
* :func:`save_latents` / :func:`load_latents`: per-image latents in one ``.safetensors`` file, with the
  image names and settings in the file's metadata.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from ..data import DECODE_ERRORS, IMAGE_EXTENSIONS, EvalTransform, decode_image, find_images, to_signed_tensor
from ..evaluation.metrics import to_uint8
from .errors import InputError

LATENTS_FORMAT = "ssdd-diffusers-latents"
LATENTS_VERSION = "1"


# ----------------------------------------------------------------------------------------------------
# Finding, reading and preparing images
# ----------------------------------------------------------------------------------------------------
def collect_images(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Files as given and images found recursively in folders, in order, without duplicates.

    Raises:
        InputError: an input does not exist, or a folder holds no image.
    """
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            images = find_images(path)
            if not images:
                extensions = ", ".join(sorted(IMAGE_EXTENSIONS))
                raise InputError(f"no images ({extensions}) found under folder {str(path)!r}")
            found.extend(images)
        elif path.is_file():
            found.append(path)
        else:
            raise InputError(f"no such image file or folder: {str(path)!r}")
    seen: set[Path] = set()
    unique = []
    for path in found:
        if path.resolve() not in seen:
            seen.add(path.resolve())
            unique.append(path)
    return unique


def load_image(path: str | os.PathLike) -> Image.Image:
    """Decode an image file to RGB (EXIF orientation applied); :class:`InputError` when it is unreadable."""
    try:
        return decode_image(Path(path))
    except UnidentifiedImageError as error:
        raise InputError(f"cannot read image {str(path)!r}: not a known image format, or corrupt") from error
    except DECODE_ERRORS as error:
        raise InputError(f"cannot read image {str(path)!r}: {type(error).__name__}: {error}") from error


def size_multiple(model: torch.nn.Module) -> int:
    """Height/width multiple a model needs: its encoder factor, and for SSDD also the decoder's factor."""
    ratio = getattr(model, "spatial_compression_ratio", None)
    if not isinstance(ratio, int):
        blocks = getattr(model.config, "block_out_channels", None)
        ratio = 2 ** (len(blocks) - 1) if blocks else 1
    decoder_factor = getattr(getattr(model, "decoder", None), "downsample_factor", 1)
    return math.lcm(ratio, int(decoder_factor))


@dataclass
class PreparedImage:
    """A model-ready image: ``pixels`` (1, 3, H, W) in [-1, 1], and how it was obtained."""

    pixels: Tensor
    original_size: tuple[int, int]
    note: str | None = None

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of ``pixels``."""
        return int(self.pixels.shape[-1]), int(self.pixels.shape[-2])


def check_resolution(resolution: int | None, multiple: int) -> None:
    """:class:`InputError` unless ``resolution`` is ``None`` or a positive multiple of ``multiple``."""
    if resolution is not None and (resolution < multiple or resolution % multiple):
        raise InputError(
            f"--resolution {resolution} must be a positive multiple of {multiple} for this model"
        )


def prepare_image(image: Image.Image, multiple: int, resolution: int | None = None) -> PreparedImage:
    """Fit an RGB image to the model.

    With ``resolution``: shorter side resized to it (bilinear, antialiased), then centre-cropped to a
    square (as in evaluation); ``resolution`` must be a multiple of ``multiple``. Without: centre-cropped
    to the largest size whose sides are multiples of ``multiple`` (no resampling). ``note`` says what
    changed (``None`` when the image was used as it is).
    """
    width, height = image.size
    if resolution is not None:
        check_resolution(resolution, multiple)
        pixels = EvalTransform(resolution)(image)[None]
        note = None
        if (width, height) != (resolution, resolution):
            note = f"resized and centre-cropped {width}x{height} -> {resolution}x{resolution}"
        return PreparedImage(pixels, (width, height), note)
    new_width, new_height = width // multiple * multiple, height // multiple * multiple
    if new_width == 0 or new_height == 0:
        raise InputError(
            f"image of {width}x{height} is smaller than the model's size multiple {multiple}; "
            "pass --resolution"
        )
    note = None
    if (new_width, new_height) != (width, height):
        left, top = (width - new_width) // 2, (height - new_height) // 2
        image = image.crop((left, top, left + new_width, top + new_height))
        note = (
            f"centre-cropped {width}x{height} -> {new_width}x{new_height} (sides must be multiples of "
            f"{multiple}; pass --resolution to resize instead)"
        )
    return PreparedImage(to_signed_tensor(image)[None], (width, height), note)


def output_names(paths: Sequence[str | os.PathLike]) -> list[str]:
    """File stems made unique with ``-2``, ``-3``, ... (``a/x.png``, ``b/x.jpg`` -> ``x``, ``x-2``)."""
    names: list[str] = []
    used: set[str] = set()
    for path in paths:
        stem = Path(path).stem or "image"
        name, counter = stem, 1
        while name in used:
            counter += 1
            name = f"{stem}-{counter}"
        used.add(name)
        names.append(name)
    return names


def save_png(image: Tensor, path: str | os.PathLike) -> Path:
    """Save a (1, 3, H, W) or (3, H, W) tensor in [-1, 1] as an RGB PNG (clamped, rounded to uint8)."""
    if image.dim() == 4:
        image = image[0]
    array = to_uint8(image[None])[0].permute(1, 2, 0).cpu().numpy()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode="RGB").save(path)
    return path


# ----------------------------------------------------------------------------------------------------
# Latent files
# ----------------------------------------------------------------------------------------------------
@dataclass
class LatentFile:
    """Latents of several images: ``latents[i]`` is (1, C, h, w), ``names[i]`` its output name."""

    latents: list[Tensor]
    names: list[str]
    metadata: dict[str, Any] = field(default_factory=dict)


def _key(index: int) -> str:
    return f"latents.{index:05d}"


def save_latents(path: str | os.PathLike, latents: LatentFile) -> Path:
    """Write one float32 (C, h, w) tensor per image (``latents.00000``, ...) and the metadata.

    Metadata values are JSON-encoded strings; ``names`` and ``format`` are always present.
    """
    from safetensors.torch import save_file

    if len(latents.latents) != len(latents.names):
        raise ValueError("one name per latent tensor is needed")
    tensors = {_key(i): z.detach()[0].float().cpu().contiguous() for i, z in enumerate(latents.latents)}
    metadata = {key: json.dumps(value) for key, value in latents.metadata.items()}
    metadata.update(
        format=LATENTS_FORMAT,
        version=LATENTS_VERSION,
        count=str(len(tensors)),
        names=json.dumps(latents.names),
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


def load_latents(path: str | os.PathLike) -> LatentFile:
    """Read a file written by :func:`save_latents`, or any safetensors file of (C, h, w) / (B, C, h, w)
    tensors (then named after their keys, in key order).

    Raises:
        InputError: the file is missing, not a safetensors file, or holds no usable tensor.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise InputError(f"no such latents file: {str(path)!r}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error types for bad files
        raise InputError(f"cannot read latents file {str(path)!r}: {error}") from error
    if metadata.get("format") == LATENTS_FORMAT:
        return _own_format(path, tensors, metadata)
    latents, names = [], []
    for key in sorted(tensors):
        value = tensors[key]
        if value.dim() == 3:
            latents.append(value[None])
            names.append(key)
        elif value.dim() == 4:
            latents.extend(value[i : i + 1] for i in range(value.shape[0]))
            names.extend(f"{key}_{i}" for i in range(value.shape[0]))
    if not latents:
        raise InputError(f"{str(path)!r} holds no (C, h, w) or (B, C, h, w) latent tensor")
    safe_names = output_names([name.replace("/", "_").replace("\\", "_") for name in names])
    return LatentFile([z.float() for z in latents], safe_names, {})


def _own_format(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> LatentFile:
    try:
        names = json.loads(metadata["names"])
        count = int(metadata["count"])
        latents = [tensors[_key(i)].float()[None] for i in range(count)]
        extra = {
            k: json.loads(v) for k, v in metadata.items() if k not in ("format", "version", "count", "names")
        }
    except (KeyError, ValueError, TypeError) as error:
        raise InputError(f"latents file {str(path)!r} has inconsistent metadata: {error!r}") from error
    if len(names) != count or any(z.dim() != 4 for z in latents):
        raise InputError(f"latents file {str(path)!r} has inconsistent metadata")
    safe = output_names([Path(str(n)).name or f"image_{i}" for i, n in enumerate(names)])  # no "../"
    return LatentFile(latents, safe, extra)


__all__ = [
    "InputError",
    "LatentFile",
    "check_resolution",
    "PreparedImage",
    "collect_images",
    "load_image",
    "load_latents",
    "output_names",
    "prepare_image",
    "save_latents",
    "save_png",
    "size_multiple",
]
