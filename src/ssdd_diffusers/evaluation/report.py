"""Evaluation results: one :class:`ModelResult` per model and the :class:`EvaluationReport` that writes
them as JSON, a Markdown table and a reconstruction grid (diffusers' ``make_image_grid``)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers.utils import make_image_grid
from PIL import Image, ImageOps
from torch import Tensor

from .memory import MEMORY_LABELS
from .metrics import to_uint8


@dataclass
class ModelResult:
    """Metrics and measurements of one model."""

    label: str
    source: str
    class_name: str
    num_inference_steps: int | None
    num_parameters: int
    num_images: int
    metrics: dict[str, float | None]
    images_per_second: float
    reconstruction_seconds: float
    peak_memory_mb: float | None
    memory_metric: str


def _json_number(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def _fmt(value: float | None, digits: int) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return f"{value:.{digits}f}"


def image_grid(rows: Sequence[Tensor], padding: int = 2) -> Image.Image:
    """One grid row per (K, 3, H, W) tensor (uint8, or float in [-1, 1]), white ``padding`` pixels around
    every image. Size: ``(K * (W + p) + p, len(rows) * (H + p) + p)``."""
    if not rows:
        raise ValueError("no rows to draw")
    images = []
    for row in rows:
        row = row if row.dtype == torch.uint8 else to_uint8(row)
        for image in row:
            tile = Image.fromarray(image.permute(1, 2, 0).cpu().numpy(), mode="RGB")
            images.append(ImageOps.expand(tile, border=(padding, padding, 0, 0), fill="white"))
    grid = make_image_grid(images, rows=len(rows), cols=rows[0].shape[0])
    return ImageOps.expand(grid, border=(0, 0, padding, padding), fill="white")


@dataclass
class EvaluationReport:
    """Results of :func:`evaluate_models`; :meth:`save` writes JSON, Markdown and the PNG grid."""

    results: list[ModelResult]
    grid_originals: Tensor
    grid_reconstructions: dict[str, Tensor]
    settings: dict[str, Any] = field(default_factory=dict)
    unavailable_metrics: dict[str, str] = field(default_factory=dict)
    num_skipped_images: int = 0

    def result(self, label: str) -> ModelResult:
        """The result of the model with ``label``."""
        for item in self.results:
            if item.label == label:
                return item
        raise KeyError(label)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary (non-finite floats become ``"inf"`` / ``None``)."""
        models = []
        for item in self.results:
            entry = asdict(item)
            entry["metrics"] = {k: _json_number(v) for k, v in item.metrics.items()}
            entry["memory_metric_description"] = MEMORY_LABELS.get(item.memory_metric, item.memory_metric)
            models.append(entry)
        return {
            "models": models,
            "settings": self.settings,
            "unavailable_metrics": self.unavailable_metrics,
            "num_skipped_images": self.num_skipped_images,
            "grid_rows": ["originals"] + [item.label for item in self.results],
            "markdown": self.to_markdown(),
        }

    def to_markdown(self) -> str:
        """A Markdown table, one row per model, with footnotes on the memory and FID measurements."""
        fid_custom = str(self.settings.get("fid_features", "inception")) not in ("inception", "off")
        lpips_custom = str(self.settings.get("lpips_backbone", "")).startswith("custom:")
        fid_header = "FD* ↓" if fid_custom else "rFID ↓"
        lpips_header = "LPIPS* ↓" if lpips_custom else "LPIPS ↓"
        memory = any(item.peak_memory_mb is not None for item in self.results)
        header = (
            f"| Model | Steps | Params (M) | PSNR ↑ | SSIM ↑ | {lpips_header} | {fid_header} | Images/s |"
            + (" Peak memory (MiB) |" if memory else "")
        )
        lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if memory else "")]
        for item in self.results:
            m = item.metrics
            steps = "-" if item.num_inference_steps is None else str(item.num_inference_steps)
            lines.append(
                f"| {item.label} | {steps} | {item.num_parameters / 1e6:.2f} | {_fmt(m.get('psnr'), 2)} | "
                f"{_fmt(m.get('ssim'), 4)} | {_fmt(m.get('lpips'), 4)} | {_fmt(m.get('rfid'), 2)} | "
                f"{item.images_per_second:.2f} |" + (f" {_fmt(item.peak_memory_mb, 0)} |" if memory else "")
            )
        notes = []
        if memory:
            kinds = sorted({item.memory_metric for item in self.results})
            notes.append("Peak memory: " + "; ".join(MEMORY_LABELS.get(k, k) for k in kinds) + ".")
        if lpips_custom:
            notes.append(
                f"*LPIPS: a stand-in perceptual distance ({self.settings.get('lpips_backbone')}); not "
                "comparable with LPIPS."
            )
        if fid_custom:
            notes.append(
                f"*FD: Fréchet distance on custom features ({self.settings.get('fid_features')}); "
                "not comparable with published rFID."
            )
        if self.settings.get("lpips_backbone") == "random":
            notes.append("LPIPS uses a RANDOM AlexNet backbone (test mode): values are meaningless.")
        for metric, reason in self.unavailable_metrics.items():
            notes.append(f"{metric}: n/a ({reason}).")
        n = self.results[0].num_images if self.results else 0
        notes.append(f"{n} images at {self.settings.get('resolution', '?')} px.")
        return "\n".join(lines) + "\n\n" + "\n".join(f"- {note}" for note in notes) + "\n"

    def grid(self, padding: int = 2) -> Image.Image:
        """Originals in the first row, then one row per model, in evaluation order."""
        rows = [self.grid_originals] + [self.grid_reconstructions[item.label] for item in self.results]
        return image_grid(rows, padding=padding)

    def save(
        self,
        output_dir: str | os.PathLike,
        json_name: str = "metrics.json",
        markdown_name: str = "metrics.md",
        grid_name: str = "reconstructions.png",
    ) -> dict[str, Path]:
        """Write the JSON, the Markdown table and the grid PNG; returns their paths."""
        root = Path(output_dir)
        root.mkdir(parents=True, exist_ok=True)
        paths = {"json": root / json_name, "markdown": root / markdown_name, "grid": root / grid_name}
        paths["json"].write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        paths["markdown"].write_text(self.to_markdown())
        if self.grid_originals.shape[0] > 0:
            self.grid().save(paths["grid"])
        else:
            paths.pop("grid")
        return paths
