"""Image datasets for training and evaluation: a local folder, or any Hugging Face ``datasets`` source.

Every dataset yields ``{"pixel_values": Tensor(3, S, S)}`` in ``[-1, 1]`` (float32), or ``None`` for an
image that cannot be decoded. :func:`collate_images` drops the ``None`` entries and reports how many it
dropped in ``batch["num_skipped"]``, so a training loop can count corrupt images reliably whatever the
number of ``DataLoader`` workers.

* A local folder (recursive): :class:`ImageFolderDataset`. A local ``--train_data_dir`` always goes through
  it rather than ``datasets``' ``imagefolder`` builder, because one corrupt file makes ``imagefolder``
  decoding raise in the middle of training.
* A ``datasets`` source (Hub name, dataset script, a ``save_to_disk`` folder, streaming or not):
  :func:`load_image_dataset` / :func:`wrap_hf_dataset`. The image column is cast to
  ``Image(decode=False)`` and decoded here with PIL, so corrupt entries are skipped and counted.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset

from .images import DECODE_ERRORS, IMAGE_EXTENSIONS, decode_image, find_images, try_decode_image
from .transforms import ImageTransform

logger = logging.getLogger(__name__)

Sample = dict[str, torch.Tensor]


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
