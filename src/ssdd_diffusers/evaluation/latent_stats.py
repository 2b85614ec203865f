"""Latent statistics for training latent diffusion models on SSDD (or any KL-VAE) latents.

:func:`compute_latent_stats` encodes a dataset (posterior **mode**, as upstream SSDD's ``z_stats`` job)
and accumulates, in float64 with a numerically stable streaming merge (Chan et al.), the mean and the
standard deviation of every latent channel and of all latent entries together. Standard deviations are
population values (``unbiased=False``).

:func:`write_latent_stats` stores them in the model config, following the diffusers conventions:

* ``shift_factor`` = scalar mean and ``scaling_factor`` = 1 / scalar std. SD3 / Flux-style pipelines
  feed the diffusion model ``(z - shift_factor) * scaling_factor`` and decode
  ``latents / scaling_factor + shift_factor``, so the model sees latents with zero mean and unit
  variance;
* ``latents_mean`` / ``latents_std`` = the per-channel lists (pipelines that normalise per channel,
  e.g. SDXL-style ``(z - mean) * scaling_factor / std``, use these; note that such pipelines combine
  them with ``scaling_factor``, so per-channel users may want ``scaling_factor = 1``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn


@dataclass
class LatentStats:
    """Per-channel and scalar statistics of encoded latents (float64 values as Python floats)."""

    mean: list[float]
    std: list[float]
    scalar_mean: float
    scalar_std: float
    num_images: int
    num_values: int

    @property
    def scaling_factor(self) -> float:
        """``1 / scalar_std``."""
        return 1.0 / self.scalar_std

    @property
    def shift_factor(self) -> float:
        """``scalar_mean``."""
        return self.scalar_mean

    def config_updates(self) -> dict[str, Any]:
        """The config entries :func:`write_latent_stats` writes."""
        return {
            "latents_mean": list(self.mean),
            "latents_std": list(self.std),
            "shift_factor": self.shift_factor,
            "scaling_factor": self.scaling_factor,
        }

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "scaling_factor": self.scaling_factor, "shift_factor": self.shift_factor}

    def summary(self) -> str:
        """Human-readable multi-line summary."""
        lines = [
            f"images: {self.num_images}, latent values: {self.num_values}",
            f"scalar mean (-> shift_factor): {self.scalar_mean:.6f}",
            f"scalar std: {self.scalar_std:.6f} (-> scaling_factor = {self.scaling_factor:.6f})",
            "per channel (latents_mean / latents_std):",
        ]
        lines += [f"  c{c}: mean {m:+.6f}  std {s:.6f}" for c, (m, s) in enumerate(zip(self.mean, self.std))]
        return "\n".join(lines)


class RunningMoments:
    """Streaming mean and M2 (sum of squared deviations) per channel, merged batch by batch in float64."""

    def __init__(self, channels: int) -> None:
        self.count = 0
        self.mean = torch.zeros(channels, dtype=torch.float64)
        self.m2 = torch.zeros(channels, dtype=torch.float64)

    def update(self, values: Tensor) -> None:
        """Add ``values`` of shape (N, C) (N samples of C channels)."""
        values = values.detach().to(device="cpu", dtype=torch.float64)
        n = values.shape[0]
        if n == 0:
            return
        batch_mean = values.mean(dim=0)
        batch_m2 = (values - batch_mean).square().sum(dim=0)
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + batch_m2 + delta.square() * (self.count * n / total)
        self.count = total

    def variance(self) -> Tensor:
        """Population variance per channel."""
        if self.count == 0:
            raise ValueError("no values were added")
        return self.m2 / self.count


@torch.no_grad()
def compute_latent_stats(
    model: nn.Module,
    batches: Iterable[Tensor | None],
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    total: int | None = None,
    progress: bool = True,
) -> LatentStats:
    """Encode every batch (B, 3, H, W) in [-1, 1] with ``model`` (posterior mode) and accumulate stats.

    Args:
        model: ``SSDDAutoencoder`` or ``AutoencoderKL`` (anything whose ``encode(x).latent_dist.mode()``
            gives (B, C, h, w) latents).
        batches: image batches; ``None`` entries (all-corrupt batches) are skipped.
        device / dtype: where to run the encoder (defaults: the model's).
        total: number of images, for the progress bar.
        progress: show a tqdm progress bar.
    """
    from tqdm.auto import tqdm

    parameter = next(model.parameters())
    device = torch.device(device) if device is not None else parameter.device
    dtype = dtype or parameter.dtype
    model.eval()
    per_channel: RunningMoments | None = None
    scalar: RunningMoments = RunningMoments(1)
    images_seen = 0
    bar = tqdm(total=total, desc="encoding", unit="img", disable=not progress)
    for images in batches:
        if images is None:
            continue
        z = model.encode(images.to(device=device, dtype=dtype)).latent_dist.mode()
        channels = z.shape[1]
        flat = z.transpose(0, 1).reshape(channels, -1).T  # (B*h*w, C)
        if per_channel is None:
            per_channel = RunningMoments(channels)
        per_channel.update(flat)
        scalar.update(flat.reshape(-1, 1))
        images_seen += images.shape[0]
        bar.update(images.shape[0])
    bar.close()
    if per_channel is None:
        raise ValueError("no images were encoded")
    return LatentStats(
        mean=[float(v) for v in per_channel.mean],
        std=[float(v) for v in per_channel.variance().sqrt()],
        scalar_mean=float(scalar.mean[0]),
        scalar_std=float(scalar.variance()[0].sqrt()),
        num_images=images_seen,
        num_values=int(scalar.count),
    )


def write_latent_stats(
    stats: LatentStats,
    model_path: str | os.PathLike | None = None,
    model: nn.Module | None = None,
    output_dir: str | os.PathLike | None = None,
    subfolder: str | None = None,
) -> Path:
    """Store ``stats`` in a model config.

    * With ``output_dir`` and ``model``: ``model.register_to_config(...)`` then ``model.save_pretrained``
      into ``output_dir`` (weights and updated config).
    * Otherwise ``model_path`` (a local folder; ``subfolder`` inside it) gets its ``config.json`` updated
      in place (written to a temporary file, then renamed); the weights are untouched.

    Returns the path of the written ``config.json``.
    """
    updates = stats.config_updates()
    if not all(math.isfinite(v) for v in (stats.scalar_mean, stats.scalar_std)) or stats.scalar_std <= 0:
        raise ValueError(f"degenerate latent statistics: mean {stats.scalar_mean}, std {stats.scalar_std}")
    if output_dir is not None:
        if model is None:
            raise ValueError("writing to output_dir needs the loaded model")
        model.register_to_config(**updates)
        model.save_pretrained(output_dir)
        return Path(output_dir) / "config.json"
    if model_path is None:
        raise ValueError("pass model_path (update config.json in place) or output_dir")
    folder = Path(model_path) / subfolder if subfolder else Path(model_path)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{config_path} not found: in-place update needs a local model folder (use output_dir otherwise)"
        )
    config = json.loads(config_path.read_text())
    config.update(updates)
    tmp = config_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, config_path)
    if model is not None:
        model.register_to_config(**updates)
    return config_path


__all__ = ["LatentStats", "RunningMoments", "compute_latent_stats", "write_latent_stats"]
