"""Real photographs that ship inside installed packages, for offline training and evaluation.

The quickstart and the tests use the colour photos of the scikit-image wheel (and scikit-learn's two
sample photos when it is installed); nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Literal

import torch
from PIL import Image
from torch.utils.data import Dataset

from .datasets import Sample
from .images import decode_image
from .transforms import ImageTransform

SKIMAGE_PHOTOS: dict[str, str] = {
    "astronaut": "astronaut.png",
    "chelsea": "chelsea.png",
    "coffee": "coffee.png",
    "rocket": "rocket.jpg",
    "motorcycle_left": "motorcycle_left.png",
    "motorcycle_right": "motorcycle_right.png",
    "hubble_deep_field": "hubble_deep_field.jpg",
}
"""Real colour photographs inside the scikit-image wheel (``skimage/data``; no pooch download)."""

SKLEARN_PHOTOS: dict[str, str] = {"china": "china.jpg", "flower": "flower.jpg"}
"""Optional extra training photos inside the scikit-learn wheel (``sklearn/datasets/images``)."""

HELDOUT_PHOTOS: tuple[str, ...] = ("chelsea", "coffee")
"""Photos reserved for evaluation; every other photo is a training photo. The motorcycle stereo pair
stays together in train, so no held-out photo has a near-duplicate in the training set."""

PhotoSplit = Literal["train", "heldout", "all"]


def _package_dir(package: str) -> Path | None:
    """Folder of an installed package, located without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _available_photos() -> dict[str, Path]:
    """Name -> path of every bundled photo present on disk, in a fixed order."""
    found: dict[str, Path] = {}
    for package, subdir, photos in (
        ("skimage", "data", SKIMAGE_PHOTOS),
        ("sklearn", "datasets/images", SKLEARN_PHOTOS),
    ):
        folder = _package_dir(package)
        if folder is None:
            continue
        for name, filename in photos.items():
            if (folder / subdir / filename).is_file():
                found[name] = folder / subdir / filename
    return found


def sample_photo_paths(split: PhotoSplit = "all") -> dict[str, Path]:
    """Name -> path of the bundled photos in ``split`` (held-out: :data:`HELDOUT_PHOTOS`)."""
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")
    photos = _available_photos()
    if split != "all":
        photos = {name: p for name, p in photos.items() if (name in HELDOUT_PHOTOS) == (split == "heldout")}
    if not photos:
        raise FileNotFoundError(f"no bundled sample photos for split {split!r}; is scikit-image installed?")
    return photos


def sample_photos(split: PhotoSplit = "all") -> list[Image.Image]:
    """The bundled real photos in ``split`` as RGB PIL images, in a fixed order (offline)."""
    return [decode_image(path) for path in sample_photo_paths(split).values()]


class SamplePhotoDataset(Dataset):
    """``crops_per_image`` transformed crops of each bundled photo of ``split``.

    Item ``i`` is photo ``i % n_photos``. Training items draw from torch's global RNG. When
    ``deterministic`` (default: ``split == "heldout"``), item ``i`` is drawn with torch's RNG seeded with
    ``seed + i`` (global RNG state restored afterwards), so the same transform gives the same fixed set of
    held-out crops on every run and every process.
    """

    def __init__(
        self,
        split: PhotoSplit,
        transform: ImageTransform,
        crops_per_image: int = 1,
        deterministic: bool | None = None,
        seed: int = 0,
    ):
        if crops_per_image < 1:
            raise ValueError(f"crops_per_image must be >= 1, got {crops_per_image}")
        self.names = list(sample_photo_paths(split))
        self.photos = sample_photos(split)
        self.transform = transform
        self.crops_per_image = crops_per_image
        self.deterministic = split == "heldout" if deterministic is None else deterministic
        self.seed = seed

    def __len__(self) -> int:
        return len(self.photos) * self.crops_per_image

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < len(self):
            raise IndexError(index)
        photo = self.photos[index % len(self.photos)]
        if not self.deterministic:
            return {"pixel_values": self.transform(photo)}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed + index)
            return {"pixel_values": self.transform(photo)}
