"""Image data for training and evaluation: decoding, transforms, folder and ``datasets`` sources, and
the real photos bundled with installed packages.

Needs ``torchvision`` (``pip install 'ssdd-diffusers[training]'`` or ``[eval]``); ``datasets`` is
imported only for Hugging Face sources.
"""

from ..dependencies import require

require("torchvision", extra="eval", feature="ssdd_diffusers.data")

from .datasets import (
    CollateWithSkipCount,
    HFImageDataset,
    HFIterableImageDataset,
    ImageFolderDataset,
    Sample,
    SkippedImages,
    collate_images,
    decode_hf_entry,
    find_image_column,
    load_image_dataset,
    wrap_hf_dataset,
)
from .images import (
    DECODE_ERRORS,
    IMAGE_EXTENSIONS,
    decode_image,
    find_images,
    to_rgb,
    to_signed_tensor,
    try_decode_image,
)
from .sample_photos import (
    HELDOUT_PHOTOS,
    SKIMAGE_PHOTOS,
    SKLEARN_PHOTOS,
    SamplePhotoDataset,
    sample_photo_paths,
    sample_photos,
)
from .transforms import EvalTransform, ImageTransform, TrainTransform

__all__ = [
    "DECODE_ERRORS",
    "HELDOUT_PHOTOS",
    "IMAGE_EXTENSIONS",
    "SKIMAGE_PHOTOS",
    "SKLEARN_PHOTOS",
    "CollateWithSkipCount",
    "EvalTransform",
    "HFImageDataset",
    "HFIterableImageDataset",
    "ImageFolderDataset",
    "ImageTransform",
    "Sample",
    "SamplePhotoDataset",
    "SkippedImages",
    "TrainTransform",
    "collate_images",
    "decode_hf_entry",
    "decode_image",
    "find_image_column",
    "find_images",
    "load_image_dataset",
    "sample_photo_paths",
    "sample_photos",
    "to_rgb",
    "to_signed_tensor",
    "try_decode_image",
    "wrap_hf_dataset",
]
