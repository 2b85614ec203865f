"""Image transforms: random resized crops for training, resize + centre crop for evaluation.

Both return float32 tensors (3, S, S) in ``[-1, 1]``. Randomness comes from torch's global RNG, so
seeding it (``accelerate.utils.set_seed``, or the per-sample seeds of the training loop) makes
augmentation reproducible.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from .images import to_rgb, to_signed_tensor

ImageTransform = Callable[[Image.Image], torch.Tensor]
"""A transform from a decoded RGB image to a (3, S, S) tensor in [-1, 1]."""


def _resized_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) after scaling so the shorter side equals ``short_side`` (aspect kept)."""
    if width <= height:
        return short_side, max(short_side, round(height * short_side / width))
    return max(short_side, round(width * short_side / height)), short_side


class TrainTransform:
    """Training augmentation: RGB, random resize, random ``S x S`` crop, optional flip, ``[-1, 1]``.

    The shorter side is resized (Lanczos) to an integer drawn uniformly in
    ``[resolution, random_resize_scale * resolution]`` (exactly ``resolution`` when the scale is 1), so
    images smaller than ``resolution`` are upscaled. Randomness comes from torch's global RNG.
    """

    def __init__(self, resolution: int, random_resize_scale: float = 1.0, random_flip: bool = False):
        if resolution < 1:
            raise ValueError(f"resolution must be positive, got {resolution}")
        if random_resize_scale < 1.0:
            raise ValueError(f"random_resize_scale must be >= 1, got {random_resize_scale}")
        self.resolution = resolution
        self.random_resize_scale = random_resize_scale
        self.random_flip = random_flip

    def sample_short_side(self) -> int:
        """Draw the target length of the shorter side, uniform in ``[S, scale * S]``."""
        high = int(np.floor(self.random_resize_scale * self.resolution))
        if high <= self.resolution:
            return self.resolution
        return int(torch.randint(self.resolution, high + 1, ()).item())

    def sample_resize(self, width: int, height: int) -> tuple[int, int]:
        """Draw the (width, height) the image is resized to before cropping."""
        return _resized_size(width, height, self.sample_short_side())

    def sample_crop(self, width: int, height: int) -> tuple[int, int]:
        """Draw the (top, left) corner of the ``S x S`` crop in a ``width x height`` image."""
        top = int(torch.randint(0, height - self.resolution + 1, ()).item())
        left = int(torch.randint(0, width - self.resolution + 1, ()).item())
        return top, left

    def sample_flip(self) -> bool:
        """Draw whether to flip horizontally (always ``False`` without ``random_flip``)."""
        return self.random_flip and bool(torch.rand(()).item() < 0.5)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = to_rgb(image)
        width, height = self.sample_resize(*image.size)
        if (width, height) != image.size:
            image = TF.resize(image, [height, width], interpolation=InterpolationMode.LANCZOS)
        top, left = self.sample_crop(width, height)
        image = TF.crop(image, top, left, self.resolution, self.resolution)
        if self.sample_flip():
            image = TF.horizontal_flip(image)
        return to_signed_tensor(image)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(resolution={self.resolution}, "
            f"random_resize_scale={self.random_resize_scale}, random_flip={self.random_flip})"
        )


class EvalTransform:
    """Deterministic evaluation transform: RGB, shorter side to ``S`` (bilinear, antialiased), centre crop."""

    def __init__(self, resolution: int):
        if resolution < 1:
            raise ValueError(f"resolution must be positive, got {resolution}")
        self.resolution = resolution

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = to_rgb(image)
        image = TF.resize(image, self.resolution, interpolation=InterpolationMode.BILINEAR, antialias=True)
        image = TF.center_crop(image, [self.resolution, self.resolution])
        return to_signed_tensor(image)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(resolution={self.resolution})"
