"""Image data pipeline for SSDD training: transforms, robust image sources and offline sample photos.

Every source yields ``{"pixel_values": Tensor(3, S, S)}`` in ``[-1, 1]`` (float32), or ``None`` for an
image that cannot be decoded. :func:`collate_images` drops the ``None`` entries and reports how many it
dropped in ``batch["num_skipped"]``, so a training loop can sum corrupt images reliably whatever the
number of ``DataLoader`` workers.

Sources:

* a local folder of images (recursive): :class:`ImageFolderDataset`. A local ``--train_data_dir`` always
  goes through it rather than through ``datasets``' ``imagefolder`` builder, because one corrupt file
  makes ``imagefolder`` decoding raise in the middle of training;
* a Hugging Face ``datasets`` source (Hub name, dataset script, a ``save_to_disk`` folder, streaming or
  not): :func:`load_image_dataset` / :func:`wrap_hf_dataset`. Images are decoded here with PIL (the image
  column is cast to ``Image(decode=False)``), so corrupt entries are skipped and counted, not fatal;
* scikit-image's bundled colour photographs for an offline quickstart: :func:`sample_photos` and
  :class:`SamplePhotoDataset`.

All randomness comes from torch's global RNG, so ``accelerate.utils.set_seed`` (and the per-worker seeds
that ``DataLoader`` derives from it) make augmentation reproducible.
"""

from __future__ import annotations

import importlib.util
import io
import logging
import struct
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps
from torch.utils.data import Dataset, IterableDataset
from torchvision.transforms import InterpolationMode
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

ImageTransform = Callable[[Image.Image], torch.Tensor]
Sample = dict[str, torch.Tensor]

# --------------------------------------------------------------------------------------------------
# Decoding and colour conversion
# --------------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------------


def to_signed_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 tensor (3, H, W) in ``[-1, 1]``."""
    return TF.pil_to_tensor(image).to(torch.float32).div_(127.5).sub_(1.0)


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


# --------------------------------------------------------------------------------------------------
# Collation and skip counting
# --------------------------------------------------------------------------------------------------


def collate_images(batch: Sequence[Sample | None]) -> dict[str, Any]:
    """Stack ``pixel_values`` of the valid samples; ``None`` samples (corrupt images) are dropped.

    Returns ``{"pixel_values": Tensor(B, 3, S, S) | None, "num_skipped": int}``. ``pixel_values`` is
    ``None`` when every sample in the batch was corrupt; the training loop should then skip the batch
    (with several processes, note that skipping a step on one rank only desynchronises DDP: gather
    first, or treat the batch as a zero-weight step).
    """
    kept = [sample for sample in batch if sample is not None]
    pixel_values = torch.stack([sample["pixel_values"] for sample in kept]) if kept else None
    return {"pixel_values": pixel_values, "num_skipped": len(batch) - len(kept)}


class CollateWithSkipCount:
    """:func:`collate_images` that also accumulates ``.skipped`` in the calling process.

    ``.skipped`` is only complete with ``num_workers=0`` (each worker holds its own copy of this
    object); ``batch["num_skipped"]`` is reliable with any number of workers.
    """

    def __init__(self) -> None:
        self.skipped = 0

    def __call__(self, batch: Sequence[Sample | None]) -> dict[str, Any]:
        collated = collate_images(batch)
        self.skipped += collated["num_skipped"]
        return collated


class SkippedImages:
    """Main-process tally of corrupt images from collated batches (``update(batch)`` each step)."""

    def __init__(self) -> None:
        self.total = 0

    def update(self, batch: dict[str, Any]) -> int:
        """Add ``batch["num_skipped"]`` to the total and return it."""
        skipped = int(batch.get("num_skipped", 0))
        self.total += skipped
        return skipped

    def __int__(self) -> int:
        return self.total


# --------------------------------------------------------------------------------------------------
# Local folder of images
# --------------------------------------------------------------------------------------------------


def find_images(root: str | Path) -> list[Path]:
    """All image files under ``root`` (recursive, case-insensitive extensions), in sorted order."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    paths = [p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
    return sorted(paths, key=lambda p: p.relative_to(root).as_posix())


class ImageFolderDataset(Dataset):
    """Recursive folder of images; corrupt files give ``None`` and are listed in ``skipped_paths``.

    ``skipped_paths`` is per process (each ``DataLoader`` worker has its own copy); use
    ``batch["num_skipped"]`` from :func:`collate_images` for a reliable count.
    """

    def __init__(self, root: str | Path, transform: ImageTransform, max_samples: int | None = None):
        paths = find_images(root)
        if not paths:
            raise ValueError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found under {root}")
        self.root = Path(root)
        self.paths = paths[:max_samples] if max_samples is not None else paths
        self.transform = transform
        self.skipped_paths: list[str] = []

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Sample | None:
        path = self.paths[index]
        image = try_decode_image(path)
        if image is None:
            if str(path) not in self.skipped_paths:
                self.skipped_paths.append(str(path))
            return None
        return {"pixel_values": self.transform(image)}


# --------------------------------------------------------------------------------------------------
# Hugging Face `datasets` sources
# --------------------------------------------------------------------------------------------------


def find_image_column(features: Any, image_column: str | None = None) -> str:
    """Name of the image column: ``image_column`` if given, else the first ``datasets.Image`` column,
    else ``"image"`` or ``"img"``. Raises ``ValueError`` listing the available columns otherwise."""
    import datasets

    columns = list(features.keys())
    if image_column is not None:
        if image_column not in features:
            raise ValueError(f"image column {image_column!r} not found; available columns: {columns}")
        return image_column
    for name, feature in features.items():
        if isinstance(feature, datasets.Image):
            return name
    for name in ("image", "img"):
        if name in features:
            return name
    raise ValueError(
        f"could not find an image column (no datasets.Image feature, no 'image' or 'img' column); "
        f"available columns: {columns}. Pass image_column explicitly."
    )


def _guess_column_from_example(example: dict[str, Any]) -> str:
    """Image column of a streaming example whose features are unknown."""
    for name, value in example.items():
        if isinstance(value, Image.Image) or (isinstance(value, dict) and "bytes" in value):
            return name
    for name in ("image", "img"):
        if name in example:
            return name
    raise ValueError(f"could not find an image column; available columns: {list(example)}")


def decode_hf_entry(value: Any) -> Image.Image:
    """Decode one value of a ``datasets`` image column (undecoded dict, bytes, path or PIL image)."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return decode_image(value["bytes"])
        if value.get("path"):
            return decode_image(value["path"])
        raise ValueError("image entry has neither bytes nor path")
    if isinstance(value, (bytes, str, Path, Image.Image)):
        return decode_image(value)
    raise TypeError(f"unsupported image entry of type {type(value).__name__}")


def _prepare_hf_dataset(dataset: Any, image_column: str | None) -> tuple[Any, str | None]:
    """Keep only the image column and switch it to undecoded ``Image(decode=False)``."""
    import datasets

    features = dataset.features
    if features is None:  # streaming dataset with unknown schema: resolve on the first example
        return dataset, image_column
    column = find_image_column(features, image_column)
    dataset = dataset.select_columns([column])
    if isinstance(features[column], datasets.Image):
        dataset = dataset.cast_column(column, datasets.Image(decode=False))
    return dataset, column


def _sample_from_entry(value: Any, transform: ImageTransform, where: str) -> Sample | None:
    """Decode + transform one entry; ``None`` (logged) when it is corrupt."""
    try:
        image = decode_hf_entry(value)
    except DECODE_ERRORS as error:
        logger.warning("Skipping unreadable image %s: %s: %s", where, type(error).__name__, error)
        return None
    return {"pixel_values": transform(image)}


class HFImageDataset(Dataset):
    """Map-style torch wrapper of a ``datasets.Dataset``; corrupt rows give ``None``.

    ``skipped_indices`` lists the corrupt rows seen in this process.
    """

    def __init__(
        self,
        dataset: Any,
        transform: ImageTransform,
        image_column: str | None = None,
        max_samples: int | None = None,
    ):
        if max_samples is not None:
            dataset = dataset.select(range(min(max_samples, len(dataset))))
        self.dataset, self.image_column = _prepare_hf_dataset(dataset, image_column)
        self.transform = transform
        self.skipped_indices: list[int] = []

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Sample | None:
        value = self.dataset[int(index)][self.image_column]
        sample = _sample_from_entry(value, self.transform, f"row {index}")
        if sample is None and int(index) not in self.skipped_indices:
            self.skipped_indices.append(int(index))
        return sample


class HFIterableImageDataset(IterableDataset):
    """Torch wrapper of a streaming ``datasets.IterableDataset``; corrupt entries yield ``None``.

    Inside ``DataLoader`` workers, ``datasets`` splits the stream by *shards* between workers (workers
    beyond ``n_shards`` get nothing). Across processes, ``accelerate``'s default batch dispatching for
    iterable datasets reads on the main process; to read on every rank instead, pass a dataset already
    split with ``datasets.distributed.split_dataset_by_node``.
    """

    def __init__(
        self,
        dataset: Any,
        transform: ImageTransform,
        image_column: str | None = None,
        max_samples: int | None = None,
    ):
        if max_samples is not None:
            dataset = dataset.take(max_samples)
        self.dataset, self.image_column = _prepare_hf_dataset(dataset, image_column)
        self.transform = transform

    def set_epoch(self, epoch: int) -> None:
        """Forward the epoch to ``datasets`` (reshuffles a shuffled stream)."""
        self.dataset.set_epoch(epoch)

    def __iter__(self) -> Iterator[Sample | None]:
        column = self.image_column
        for position, example in enumerate(self.dataset):
            column = column or _guess_column_from_example(example)
            yield _sample_from_entry(example[column], self.transform, f"stream item {position}")


def wrap_hf_dataset(
    dataset: Any,
    transform: ImageTransform,
    image_column: str | None = None,
    max_samples: int | None = None,
) -> HFImageDataset | HFIterableImageDataset:
    """Wrap a ``datasets.Dataset`` (map-style) or ``datasets.IterableDataset`` (streaming) for torch."""
    import datasets

    if isinstance(dataset, datasets.IterableDataset):
        return HFIterableImageDataset(dataset, transform, image_column, max_samples)
    if isinstance(dataset, datasets.Dataset):
        return HFImageDataset(dataset, transform, image_column, max_samples)
    raise TypeError(f"expected a datasets.Dataset or IterableDataset, got {type(dataset).__name__}")


def _is_saved_dataset(path: Path) -> bool:
    """Whether ``path`` is a folder written by ``Dataset(Dict).save_to_disk``."""
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def _load_hf_dataset(
    dataset_name: str, dataset_config_name: str | None, split: str, streaming: bool, cache_dir: str | None
) -> Any:
    """``datasets.load_from_disk`` for a ``save_to_disk`` folder, else ``datasets.load_dataset``."""
    import datasets

    if _is_saved_dataset(Path(dataset_name)):
        loaded = datasets.load_from_disk(dataset_name)
        if isinstance(loaded, datasets.DatasetDict):
            loaded = loaded[split]
        return loaded.to_iterable_dataset() if streaming else loaded
    return datasets.load_dataset(
        dataset_name, dataset_config_name, split=split, streaming=streaming, cache_dir=cache_dir
    )


def load_image_dataset(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    split: str = "train",
    train_data_dir: str | Path | None = None,
    image_column: str | None = None,
    streaming: bool = False,
    cache_dir: str | None = None,
    max_samples: int | None = None,
    *,
    transform: ImageTransform,
) -> ImageFolderDataset | HFImageDataset | HFIterableImageDataset:
    """Build a torch dataset of ``{"pixel_values"}`` samples from exactly one source.

    ``train_data_dir`` (a local folder) -> :class:`ImageFolderDataset` (recursive, corrupt files skipped;
    ``split``/``streaming``/``image_column`` are ignored). ``dataset_name`` (Hub name, dataset script or
    ``save_to_disk`` folder) -> ``datasets`` (``load_from_disk`` or ``load_dataset``), wrapped by
    :func:`wrap_hf_dataset`; ``max_samples`` uses ``select`` / ``take``.
    """
    if (dataset_name is None) == (train_data_dir is None):
        raise ValueError("pass exactly one of dataset_name or train_data_dir")
    if train_data_dir is not None:
        return ImageFolderDataset(train_data_dir, transform, max_samples=max_samples)
    dataset = _load_hf_dataset(dataset_name, dataset_config_name, split, streaming, cache_dir)
    return wrap_hf_dataset(dataset, transform, image_column, max_samples)


# --------------------------------------------------------------------------------------------------
# Offline sample photos (scikit-image / scikit-learn wheels)
# --------------------------------------------------------------------------------------------------

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
