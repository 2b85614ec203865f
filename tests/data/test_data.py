"""Tests for ssdd_diffusers.data: transforms, robust sources, collation and offline sample photos."""

from __future__ import annotations

import io
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from torch.utils.data import DataLoader

from ssdd_diffusers.data import (
    HELDOUT_PHOTOS,
    CollateWithSkipCount,
    EvalTransform,
    HFImageDataset,
    HFIterableImageDataset,
    ImageFolderDataset,
    SamplePhotoDataset,
    SkippedImages,
    TrainTransform,
    collate_images,
    decode_image,
    find_image_column,
    find_images,
    load_image_dataset,
    sample_photo_paths,
    sample_photos,
    to_rgb,
    wrap_hf_dataset,
)


def _noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A random RGB image (fully textured, so every crop differs)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), mode="RGB")


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture
def image_tree(tmp_path: Path) -> Path:
    """Nested folder with 5 valid images of various formats/modes, 3 corrupt files and 1 non-image."""
    root = tmp_path / "imgs"
    (root / "a" / "b").mkdir(parents=True)
    (root / "c").mkdir()
    _noise_image(40, 30, 1).save(root / "top.png")
    _noise_image(24, 36, 2).save(root / "a" / "photo.JPG", format="JPEG")
    _noise_image(20, 20, 3).convert("L").save(root / "a" / "b" / "grey.bmp")
    _noise_image(33, 21, 4).convert("P").save(root / "c" / "pal.gif")
    _noise_image(25, 25, 5).save(root / "c" / "deep.webp")
    (root / "a" / "b" / "trunc.jpg").write_bytes(_jpeg_bytes(_noise_image(64, 64, 6))[:400])
    (root / "c" / "text.png").write_text("this is not an image")
    (root / "c" / "empty.jpeg").write_bytes(b"")
    (root / "c" / "notes.txt").write_text("ignored")
    return root


# ------------------------------------------------------------------ colour conversion and decoding


def test_to_rgb_modes_give_three_channels() -> None:
    grey = Image.new("L", (4, 4), 100)
    palette = Image.new("RGB", (4, 4), (10, 20, 30)).convert("P")
    cmyk = Image.new("CMYK", (4, 4), (0, 0, 0, 0))
    high = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert high.mode.startswith("I;16")
    for image in (grey, palette, cmyk, high):
        assert to_rgb(image).mode == "RGB"
    assert np.asarray(to_rgb(grey))[0, 0].tolist() == [100, 100, 100]
    assert np.asarray(to_rgb(high))[0, 0].tolist() == [255, 255, 255]  # 16-bit scaled, not clipped
    assert np.asarray(to_rgb(cmyk))[0, 0].tolist() == [255, 255, 255]


def test_transparency_is_composited_on_white() -> None:
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    rgb = np.asarray(to_rgb(rgba))
    assert rgb[1, 1].tolist() == [255, 255, 255]
    assert rgb[0, 0].tolist() == [255, 0, 0]
    assert np.asarray(to_rgb(Image.new("LA", (2, 2), (0, 0))))[0, 0].tolist() == [255, 255, 255]
    palette = Image.new("P", (2, 2), 0)
    palette.putpalette([0, 0, 0, 0, 0, 255])
    palette.info["transparency"] = 0
    palette.putpixel((1, 1), 1)
    rgb = np.asarray(to_rgb(palette))
    assert rgb[0, 0].tolist() == [255, 255, 255] and rgb[1, 1].tolist() == [0, 0, 255]


def test_decode_rejects_truncated_jpeg_even_if_global_flag_set() -> None:
    truncated = _jpeg_bytes(_noise_image(64, 64))[:400]
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        with pytest.raises(OSError):
            decode_image(truncated)
        assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


# ------------------------------------------------------------------ transforms


def test_train_transform_output_shape_range_dtype() -> None:
    torch.manual_seed(0)
    out = TrainTransform(16, random_resize_scale=2.0, random_flip=True)(_noise_image(50, 30))
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32
    assert out.min() >= -1.0 and out.max() <= 1.0
    assert out.min() < -0.9 and out.max() > 0.9
    white = TrainTransform(8)(Image.new("RGB", (8, 8), (255, 255, 255)))
    assert torch.equal(white, torch.ones(3, 8, 8))


def test_resize_range_respected() -> None:
    torch.manual_seed(0)
    fixed = TrainTransform(32)
    assert {fixed.sample_short_side() for _ in range(20)} == {32}
    scaled = TrainTransform(32, random_resize_scale=2.0)
    sides = [scaled.sample_short_side() for _ in range(400)]
    assert min(sides) >= 32 and max(sides) <= 64
    assert min(sides) <= 36 and max(sides) >= 60 and len(set(sides)) > 20  # spread over the range
    width, height = scaled.sample_resize(300, 100)  # aspect ratio kept, shorter side sampled
    assert 32 <= height <= 64 and width == round(300 * height / 100)
    with pytest.raises(ValueError):
        TrainTransform(32, random_resize_scale=0.5)


def test_scale_one_resizes_shorter_side_exactly() -> None:
    """With scale 1 the whole shorter side is kept: a 2:1 image gives a square crop of the resized image."""
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 40, 10))  # top half white, bottom black
    out = TrainTransform(10)(image)
    assert out[:, 0].mean() > 0.9 and out[:, -1].mean() < -0.9  # both halves present: no extra zoom


def test_small_images_are_upscaled() -> None:
    transform = TrainTransform(32, random_resize_scale=1.5)
    torch.manual_seed(1)
    assert min(transform.sample_resize(8, 12)) >= 32
    assert transform(_noise_image(8, 12)).shape == (3, 32, 32)


def test_flip_applied_about_half_the_time() -> None:
    torch.manual_seed(0)
    transform = TrainTransform(4, random_flip=True)
    flips = sum(transform.sample_flip() for _ in range(400))
    assert 150 < flips < 250
    assert not any(TrainTransform(4).sample_flip() for _ in range(50))
    image = Image.new("RGB", (4, 4), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 2, 4))  # left half white
    left_means = {round(transform(image)[:, :, 0].mean().item()) for _ in range(30)}
    assert left_means == {-1, 1}  # both orientations seen


def test_train_transform_deterministic_under_manual_seed() -> None:
    transform = TrainTransform(16, random_resize_scale=2.0, random_flip=True)
    image = _noise_image(60, 40)
    torch.manual_seed(123)
    first = [transform(image) for _ in range(3)]
    torch.manual_seed(123)
    second = [transform(image) for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not torch.equal(first[0], first[1])


def _roughness(images: torch.Tensor) -> float:
    """Mean absolute difference between horizontally adjacent pixels."""
    return (images[..., 1:] - images[..., :-1]).abs().mean().item()


def test_random_scale_changes_crops() -> None:
    """Scale 1 shrinks 64-px noise 2x (Lanczos averages it, smoother crops); scale 2 shrinks it less."""
    image = _noise_image(64, 64)
    torch.manual_seed(0)
    sharp = torch.stack([TrainTransform(32)(image) for _ in range(10)])
    torch.manual_seed(0)
    zoomed = torch.stack([TrainTransform(32, random_resize_scale=2.0)(image) for _ in range(10)])
    assert _roughness(zoomed) > 1.25 * _roughness(sharp)


def test_eval_transform_center_crop_deterministic() -> None:
    image = Image.new("RGB", (60, 20), (0, 0, 0))
    image.paste((255, 255, 255), (10, 0, 50, 20))  # white middle, 40 px wide
    out = EvalTransform(10)(image)
    assert out.shape == (3, 10, 10) and out.dtype == torch.float32
    assert out.min() > 0.99  # the centre crop of the resized 30x10 image lies in the white band
    assert EvalTransform(10)(Image.new("RGB", (60, 20), (0, 0, 0))).max() < -0.99
    assert torch.equal(out, EvalTransform(10)(image))


# ------------------------------------------------------------------ folder source and collation


def test_find_images_recursive_sorted(image_tree: Path) -> None:
    found = [p.relative_to(image_tree).as_posix() for p in find_images(image_tree)]
    assert found == [
        "a/b/grey.bmp",
        "a/b/trunc.jpg",
        "a/photo.JPG",
        "c/deep.webp",
        "c/empty.jpeg",
        "c/pal.gif",
        "c/text.png",
        "top.png",
    ]


def test_image_folder_skips_corrupt_and_collate_counts(image_tree: Path) -> None:
    dataset = ImageFolderDataset(image_tree, TrainTransform(16, 1.5, True))
    assert len(dataset) == 8
    samples = [dataset[i] for i in range(len(dataset))]
    assert sum(s is None for s in samples) == 3
    assert sorted(Path(p).name for p in dataset.skipped_paths) == ["empty.jpeg", "text.png", "trunc.jpg"]
    for sample in samples:
        if sample is not None:
            assert sample["pixel_values"].shape == (3, 16, 16)

    collate = CollateWithSkipCount()
    loader = DataLoader(dataset, batch_size=3, collate_fn=collate)
    counter = SkippedImages()
    images = 0
    for batch in loader:
        counter.update(batch)
        if batch["pixel_values"] is not None:
            assert batch["pixel_values"].shape[1:] == (3, 16, 16)
            images += batch["pixel_values"].shape[0]
    assert counter.total == 3 == collate.skipped and images == 5


def test_collate_all_corrupt_batch() -> None:
    assert collate_images([None, None]) == {"pixel_values": None, "num_skipped": 2}
    batch = collate_images([{"pixel_values": torch.zeros(3, 2, 2)}, None])
    assert batch["pixel_values"].shape == (1, 3, 2, 2) and batch["num_skipped"] == 1


def test_skip_count_with_worker(image_tree: Path) -> None:
    dataset = ImageFolderDataset(image_tree, EvalTransform(8))
    loader = DataLoader(dataset, batch_size=4, num_workers=1, collate_fn=collate_images)
    assert sum(batch["num_skipped"] for batch in loader) == 3


def test_image_folder_max_samples_and_errors(image_tree: Path, tmp_path: Path) -> None:
    assert len(ImageFolderDataset(image_tree, EvalTransform(8), max_samples=2)) == 2
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="no images"):
        ImageFolderDataset(tmp_path / "empty_dir", EvalTransform(8))
    with pytest.raises(FileNotFoundError):
        ImageFolderDataset(tmp_path / "missing", EvalTransform(8))


def test_load_image_dataset_local_dir_uses_folder_source(image_tree: Path) -> None:
    dataset = load_image_dataset(train_data_dir=image_tree, max_samples=4, transform=EvalTransform(8))
    assert isinstance(dataset, ImageFolderDataset) and len(dataset) == 4
    with pytest.raises(ValueError, match="exactly one"):
        load_image_dataset(transform=EvalTransform(8))


# ------------------------------------------------------------------ `datasets` sources


def _hf_dataset(n_valid: int = 3) -> datasets.Dataset:
    """In-memory dataset: ``n_valid`` PNGs then one corrupt entry, plus a label column first."""
    entries = [{"bytes": _png_bytes(_noise_image(20 + i, 14, i)), "path": None} for i in range(n_valid)]
    entries.append({"bytes": b"not an image at all", "path": None})
    features = datasets.Features({"label": datasets.Value("int64"), "picture": datasets.Image()})
    return datasets.Dataset.from_dict(
        {"label": list(range(len(entries))), "picture": entries}, features=features
    )


def test_find_image_column_autodetect_and_errors() -> None:
    assert find_image_column(_hf_dataset().features) == "picture"
    plain = datasets.Features({"img": datasets.Value("binary"), "label": datasets.Value("int64")})
    assert find_image_column(plain) == "img"
    with pytest.raises(ValueError, match=r"available columns: \['label', 'picture'\]"):
        find_image_column(_hf_dataset().features, "image")
    with pytest.raises(ValueError, match=r"available columns: \['text', 'label'\]"):
        find_image_column(
            datasets.Features({"text": datasets.Value("string"), "label": datasets.Value("int64")})
        )


def test_hf_map_dataset_skips_and_counts_corrupt() -> None:
    dataset = wrap_hf_dataset(_hf_dataset(), EvalTransform(8))
    assert isinstance(dataset, HFImageDataset) and dataset.image_column == "picture" and len(dataset) == 4
    batches = list(DataLoader(dataset, batch_size=4, collate_fn=collate_images))
    assert len(batches) == 1 and batches[0]["num_skipped"] == 1
    assert batches[0]["pixel_values"].shape == (3, 3, 8, 8)
    assert dataset.skipped_indices == [3]
    assert len(wrap_hf_dataset(_hf_dataset(), EvalTransform(8), max_samples=2)) == 2


def test_hf_streaming_dataset_skips_and_takes() -> None:
    stream = _hf_dataset().to_iterable_dataset()
    dataset = wrap_hf_dataset(stream, EvalTransform(8))
    assert isinstance(dataset, HFIterableImageDataset)
    samples = list(dataset)
    assert len(samples) == 4 and samples[3] is None
    assert samples[0]["pixel_values"].shape == (3, 8, 8)
    assert len(list(wrap_hf_dataset(stream, EvalTransform(8), max_samples=2))) == 2


def test_load_image_dataset_from_saved_dataset(tmp_path: Path) -> None:
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": _hf_dataset(2)}).save_to_disk(str(saved))
    dataset = load_image_dataset(dataset_name=str(saved), split="train", transform=TrainTransform(8, 2.0))
    assert len(dataset) == 3
    batch = collate_images([dataset[i] for i in range(len(dataset))])
    assert batch["num_skipped"] == 1 and batch["pixel_values"].shape == (2, 3, 8, 8)
    streamed = load_image_dataset(dataset_name=str(saved), streaming=True, transform=EvalTransform(8))
    assert sum(s is None for s in streamed) == 1
    with pytest.raises(ValueError, match="available columns"):
        load_image_dataset(dataset_name=str(saved), image_column="nope", transform=EvalTransform(8))


# ------------------------------------------------------------------ offline sample photos


def test_sample_photos_offline_split_disjoint_deterministic() -> None:
    train, heldout, everything = (sample_photo_paths(s) for s in ("train", "heldout", "all"))
    assert tuple(heldout) == HELDOUT_PHOTOS == ("chelsea", "coffee")
    assert not set(train) & set(heldout) and set(train) | set(heldout) == set(everything)
    assert {"astronaut", "rocket", "motorcycle_left", "motorcycle_right", "hubble_deep_field"} <= set(train)
    assert list(sample_photo_paths("train")) == list(train)
    photos = sample_photos("heldout")
    assert [p.mode for p in photos] == ["RGB", "RGB"] and photos[0].size == (451, 300)
    with pytest.raises(ValueError):
        sample_photo_paths("test")  # type: ignore[arg-type]


def test_sample_photo_dataset_heldout_crops_reproducible() -> None:
    transform = TrainTransform(32, random_resize_scale=2.0)
    first = SamplePhotoDataset("heldout", transform, crops_per_image=3)
    assert len(first) == 6
    torch.manual_seed(0)
    state = torch.get_rng_state()
    crops = [first[i]["pixel_values"] for i in range(len(first))]
    assert torch.equal(state, torch.get_rng_state())  # global RNG untouched
    torch.manual_seed(99)
    again = [SamplePhotoDataset("heldout", transform, crops_per_image=3)[i]["pixel_values"] for i in range(6)]
    assert all(torch.equal(a, b) for a, b in zip(crops, again))
    assert not torch.equal(crops[0], crops[2])  # different crops of the same photo


def test_sample_photo_dataset_train_random_crops() -> None:
    dataset = SamplePhotoDataset("train", TrainTransform(32, 2.0, True), crops_per_image=2)
    assert len(dataset) == 2 * len(sample_photo_paths("train"))
    torch.manual_seed(0)
    a = dataset[0]["pixel_values"]
    b = dataset[0]["pixel_values"]
    assert a.shape == (3, 32, 32) and not torch.equal(a, b)
