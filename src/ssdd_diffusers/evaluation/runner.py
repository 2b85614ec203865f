"""Side-by-side reconstruction evaluation of SSDD models and any diffusers ``AutoencoderKL``.

Every model reconstructs the same images (resized + centre-cropped to one resolution); the metrics are
computed as upstream SSDD does (:mod:`.metrics`): reconstructions are clamped to [-1, 1]
and quantised to uint8 first, then PSNR, SSIM (scikit-image convention), LPIPS (AlexNet) and rFID
(InceptionV3 pool features through torchmetrics / torch-fidelity; the feature extractor is injectable).
Throughput (images per second of encode + decode, data loading and metrics excluded) and peak memory
are measured per model.

Typical use::

    from ssdd_diffusers.evaluation import build_eval_dataset, evaluate_models, parse_model_spec

    dataset = build_eval_dataset(data_dir="val_images/", resolution=256, max_samples=1000)
    report = evaluate_models(
        [parse_model_spec("ssdd-f8c4-M@steps=8"), parse_model_spec("stabilityai/sd-vae-ft-ema")],
        dataset,
        device="cuda",
    )
    report.save("eval_results/")  # metrics.json, metrics.md, reconstructions.png
    print(report.to_markdown())

Reconstruction rules:

* ``SSDDAutoencoder``: ``z = encode(x).latent_dist.mode()``, ``decode(z, num_inference_steps=N,
  noise=eps)``; ``eps`` depends only on ``(seed, batch index)``, so every SSDD model starts from the same
  noise and two runs are identical.
* ``AutoencoderKL`` (and other diffusers autoencoders): ``decode(encode(x).latent_dist.mode())``.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..torch_utils import resolve_device, synchronize
from .memory import PeakMemoryMeter
from .metrics import METRIC_KEYS, MetricSettings, ReconstructionMetrics, build_metrics, to_uint8
from .report import EvaluationReport, ModelResult
from .specs import LoadedAutoencoder, ModelSpec, load_autoencoder

logger = logging.getLogger(__name__)


def shared_noise(shape: Sequence[int], seed: int, batch_index: int) -> Tensor:
    """SSDD starting noise of batch ``batch_index``: float32 on CPU, a function of ``(seed, batch_index)``."""
    generator = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(batch_index)) % (2**63))
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32)


def build_eval_dataset(
    resolution: int,
    data_dir: str | os.PathLike | None = None,
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    split: str = "train",
    image_column: str | None = None,
    sample_photos: str | None = None,
    max_samples: int | None = None,
    streaming: bool = False,
    cache_dir: str | None = None,
) -> Dataset:
    """Evaluation images, resized (shorter side) and centre-cropped to ``resolution``, in [-1, 1].

    Exactly one source: ``data_dir`` (a local folder, recursive; also what ``datasets``' ``imagefolder``
    reads), ``dataset_name`` (Hub name or ``save_to_disk`` folder; ``dataset_name="imagefolder"`` with
    ``data_dir`` reads the folder) or ``sample_photos`` (``"heldout"``, ``"train"`` or ``"all"``: the
    real photos bundled with scikit-image, offline). Corrupt images are skipped and counted.
    """
    from ..data import EvalTransform, SamplePhotoDataset, load_image_dataset

    transform = EvalTransform(resolution)
    if dataset_name == "imagefolder" and data_dir is not None:
        dataset_name = None
    sources = [s for s in (data_dir, dataset_name, sample_photos) if s is not None]
    if len(sources) != 1:
        raise ValueError("pass exactly one of data_dir, dataset_name or sample_photos")
    if sample_photos is not None:
        dataset: Any = SamplePhotoDataset(sample_photos, transform)  # type: ignore[arg-type]
        if max_samples is not None:
            dataset = torch.utils.data.Subset(dataset, range(min(max_samples, len(dataset))))
        return dataset
    return load_image_dataset(
        dataset_name=dataset_name,
        dataset_config_name=dataset_config_name,
        split=split,
        train_data_dir=data_dir,
        image_column=image_column,
        streaming=streaming,
        cache_dir=cache_dir,
        max_samples=max_samples,
        transform=transform,
    )


class _TensorImages(Dataset):
    """(N, 3, H, W) tensor as a dataset of ``{"pixel_values"}`` samples."""

    def __init__(self, images: Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"pixel_values": self.images[index]}


def _dataset_length(dataset: Any, max_samples: int | None) -> int | None:
    try:
        length = len(dataset)
    except TypeError:
        return max_samples
    return length if max_samples is None else min(length, max_samples)


def iterate_batches(
    dataset: Dataset | Tensor, batch_size: int, num_workers: int = 0
) -> Iterable[tuple[Tensor, int]]:
    """Yield ``(images, num_skipped)`` batches in dataset order (corrupt images dropped)."""
    from ..data import collate_images

    if isinstance(dataset, Tensor):
        dataset = _TensorImages(dataset)
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate_images
    )
    for batch in loader:
        yield batch["pixel_values"], int(batch["num_skipped"])


ModelLike = ModelSpec | LoadedAutoencoder | str


def _size_multiple(model: LoadedAutoencoder) -> int:
    """Image side multiple ``model`` needs: its encoder factor and, untiled, an SSDD decoder's factor."""
    factor = model.spatial_compression_ratio
    if model.is_ssdd and not getattr(model.model, "use_tiling", False):
        factor = math.lcm(factor, int(getattr(model.model.decoder, "downsample_factor", 1)))
    return factor


def evaluate_models(
    models: Sequence[ModelLike],
    dataset: Dataset | Tensor,
    *,
    batch_size: int = 8,
    num_workers: int = 0,
    device: str | torch.device | None = "auto",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    metrics: MetricSettings | None = None,
    grid_images: int = 8,
    warmup_batches: int = 1,
    progress: bool = True,
    max_samples: int | None = None,
    settings: dict[str, Any] | None = None,
) -> EvaluationReport:
    """Evaluate ``models`` one after the other on the same images.

    Args:
        models: specs (or spec strings) to load one at a time, or already loaded models
            (:meth:`LoadedAutoencoder.from_model`).
        dataset: a dataset of ``{"pixel_values"}`` samples in [-1, 1] (see :func:`build_eval_dataset`)
            or a (N, 3, H, W) tensor. Every model sees the same images in the same order.
        batch_size / num_workers: data loading.
        device / dtype: where and in which precision the models run (metrics always in float32).
        seed: SSDD starting noise of batch ``i`` is :func:`shared_noise` ``(shape, seed, i)`` for every
            SSDD model, so models are compared on the same noise and runs are repeatable.
        metrics: which metrics to compute (default: all, with the real pretrained networks).
        grid_images: how many of the first images go into the grid.
        warmup_batches: untimed reconstructions of the first batch before timing each model.
        progress: tqdm progress bar over the dataset for each model.
        max_samples: stop after this many images.
        settings: extra entries for the report's ``settings`` (e.g. the dataset description).
    """
    from tqdm.auto import tqdm

    device = resolve_device(device)
    metrics = metrics or MetricSettings()
    scorer, unavailable = build_metrics(metrics, device)
    total = _dataset_length(dataset, max_samples)
    results: list[ModelResult] = []
    grid_reconstructions: dict[str, Tensor] = {}
    grid_originals: Tensor | None = None
    skipped_total = 0
    used_labels: set[str] = set()

    for index, entry in enumerate(models):
        owns_model = not isinstance(entry, LoadedAutoencoder)
        # On CPU only a model loaded here has a meaningful baseline (the RSS before its weights exist).
        meter = PeakMemoryMeter(device, enabled=owns_model or device.type == "cuda")
        meter.set_baseline()
        if isinstance(entry, LoadedAutoencoder):
            model = entry
            model.model.to(device)
        else:
            model = load_autoencoder(entry, device=device, dtype=dtype)
        label = model.label
        if label in used_labels:
            label = f"{label} #{index + 1}"
        used_labels.add(label)

        scorer.reset()
        originals_kept: list[Tensor] = []
        recon_kept: list[Tensor] = []
        seconds = 0.0
        count = 0
        skipped = 0
        bar = tqdm(total=total, desc=label, unit="img", disable=not progress, leave=True)
        for batch_index, (images, num_skipped) in enumerate(
            iterate_batches(dataset, batch_size, num_workers)
        ):
            skipped += num_skipped
            if images is None:
                continue
            if max_samples is not None:
                images = images[: max_samples - count]
                if images.shape[0] == 0:
                    break
            f = _size_multiple(model)
            if min(images.shape[-2:]) < f or images.shape[-1] % f or images.shape[-2] % f:
                bar.close()  # the error then starts a line of its own
                raise ValueError(
                    f"image size {tuple(images.shape[-2:])} is not divisible by {label}'s factor {f}; "
                    f"evaluate at a resolution that is a positive multiple of {f}"
                )
            noise = shared_noise(images.shape, seed, batch_index).to(device) if model.is_ssdd else None
            if batch_index == 0:
                for _ in range(max(0, warmup_batches)):
                    model.reconstruct(images, noise)
            meter.start()
            synchronize(device)
            start = time.perf_counter()
            recon = model.reconstruct(images, noise)
            synchronize(device)
            seconds += time.perf_counter() - start
            meter.stop()
            scorer.update(images.to(device), recon)
            if sum(t.shape[0] for t in recon_kept) < grid_images:
                need = grid_images - sum(t.shape[0] for t in recon_kept)
                recon_kept.append(to_uint8(recon[:need]).cpu())
                originals_kept.append(to_uint8(images[:need]).cpu())
            count += images.shape[0]
            bar.update(images.shape[0])
            if max_samples is not None and count >= max_samples:
                break
        bar.close()
        if count == 0:
            raise ValueError("the dataset yielded no readable images")
        values = scorer.compute() if not (scorer.fid is not None and count < 2) else None
        if values is None:  # FID needs >= 2 images: compute the rest without it
            unavailable.setdefault("rfid", "needs at least 2 images")
            values = _compute_without_fid(scorer)
        result = ModelResult(
            label=label,
            source=model.source,
            class_name=model.class_name,
            num_inference_steps=model.num_inference_steps,
            num_parameters=model.num_parameters,
            num_images=int(values["num_images"]),
            metrics={key: (float(values[key]) if key in values else None) for key in METRIC_KEYS},
            images_per_second=count / seconds if seconds > 0 else float("inf"),
            reconstruction_seconds=seconds,
            peak_memory_mb=meter.peak_mb,
            memory_metric=meter.kind,
        )
        results.append(result)
        grid_reconstructions[label] = torch.cat(recon_kept)
        if grid_originals is None:
            grid_originals = torch.cat(originals_kept)
        skipped_total = max(skipped_total, skipped)
        logger.info("%s: %s", label, result.metrics)
        if owns_model:
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()

    report_settings = {
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "seed": seed,
        "batch_size": batch_size,
        "fid_features": metrics.fid_features if metrics.compute_fid else "off",
        "lpips_backbone": metrics.lpips_kind if metrics.compute_lpips else "off",
        "metric_quantisation": "clamp to [-1, 1], uint8 rounding before every metric",
        **(settings or {}),
    }
    if grid_originals is not None and "resolution" not in report_settings:
        report_settings["resolution"] = int(grid_originals.shape[-1])
    return EvaluationReport(
        results=results,
        grid_originals=grid_originals
        if grid_originals is not None
        else torch.empty(0, 3, 1, 1, dtype=torch.uint8),
        grid_reconstructions=grid_reconstructions,
        settings=report_settings,
        unavailable_metrics=unavailable,
        num_skipped_images=skipped_total,
    )


def _compute_without_fid(scorer: ReconstructionMetrics) -> dict[str, float | int]:
    fid, scorer.fid = scorer.fid, None
    try:
        return scorer.compute()
    finally:
        scorer.fid = fid
