"""Validation during training: a fixed batch of images reconstructed in one step and in N steps, logged
as PSNR and saved as a grid (input | 1-step | N-step) under ``<output_dir>/validation/``."""

from __future__ import annotations

import argparse
import copy
import logging
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import IterableDataset

from ..data import EvalTransform
from ..evaluation.metrics import psnr, to_uint8
from ..evaluation.reconstruction import reconstruct
from ..evaluation.report import image_grid
from .ema import ema_is_averaging

logger = logging.getLogger(__name__)

PSNR_CAP = 100.0
"""PSNR logged for identical images (instead of inf), so that loggers always receive a finite number."""


def validation_images(raw: Any, resolution: int, count: int) -> torch.Tensor | None:
    """The first ``count`` readable images of the source, centre-cropped (fixed validation batch)."""
    if count <= 0:
        return None
    dataset = copy.copy(raw)
    dataset.transform = EvalTransform(resolution)
    images: list[torch.Tensor] = []
    samples = (
        iter(dataset)
        if isinstance(dataset, IterableDataset)
        else map(dataset.__getitem__, range(len(dataset)))
    )
    for sample in samples:
        if sample is not None:
            images.append(sample["pixel_values"])
        if len(images) >= count:
            break
    return torch.stack(images) if images else None


def mean_psnr(reconstructions: torch.Tensor, images: torch.Tensor) -> float:
    """Mean uint8-quantised PSNR (dB), capped at :data:`PSNR_CAP`."""
    return float(psnr(to_uint8(images), to_uint8(reconstructions)).clamp(max=PSNR_CAP).mean())


def run_validation(
    vae: Any,
    images: torch.Tensor,
    args: argparse.Namespace,
    accelerator: Any,
    step: int,
    ema: Any = None,
    tag: str = "",
) -> dict[str, float]:
    """Main process: reconstruction grid (input | 1-step | N-step) PNG and PSNR, EMA weights if averaging."""
    params = list(vae.parameters())
    use_ema = ema_is_averaging(ema)
    if use_ema:
        ema.store(params)
        ema.copy_to(params)
    was_training = vae.training
    vae.eval()
    steps = args.validation_inference_steps
    images = images.to(accelerator.device)

    def decode(num_steps: int) -> torch.Tensor:
        generator = torch.Generator(device=images.device).manual_seed(args.seed)
        return reconstruct(vae, images, num_steps, generator=generator)

    with torch.no_grad(), accelerator.autocast():
        one, many = decode(getattr(vae.config, "multiscale_stages", 1)), decode(steps)
    metrics = {"val/psnr_1step": mean_psnr(one, images), f"val/psnr_{steps}step": mean_psnr(many, images)}
    grid = image_grid([torch.stack(row) for row in zip(images, one, many)])
    folder = Path(args.output_dir) / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    grid.save(folder / f"{tag or f'step_{step:07d}'}.png")
    _log_grid(accelerator, grid, step)
    accelerator.log(metrics, step=step)
    logger.info(f"Validation at step {step}: " + ", ".join(f"{k}={v:.3f}" for k, v in metrics.items()))
    if was_training:
        vae.train()
    if use_ema:
        ema.restore(params)
    return metrics


def _log_grid(accelerator: Any, grid: Any, step: int) -> None:
    """Send the grid to the trackers that take images (best effort)."""
    for tracker in accelerator.trackers:
        try:
            if tracker.name == "tensorboard":
                import numpy as np

                tracker.writer.add_image("validation", np.asarray(grid), step, dataformats="HWC")
            elif tracker.name == "wandb":
                import wandb

                tracker.log({"validation": wandb.Image(grid, caption="input | 1-step | N-step")}, step=step)
        except Exception as error:  # image logging is best effort
            logger.warning(f"Could not log the validation grid to {tracker.name}: {error}")
