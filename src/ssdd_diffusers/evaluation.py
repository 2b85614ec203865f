"""Side-by-side reconstruction evaluation of SSDD models and any diffusers ``AutoencoderKL``.

Every model reconstructs the same images (resized + centre-cropped to one resolution); the metrics are
computed as upstream SSDD does (:mod:`ssdd_diffusers.metrics`): reconstructions are clamped to [-1, 1]
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

import importlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from .metrics import FIDMetric, LPIPSMetric, ReconstructionMetrics, to_uint8

logger = logging.getLogger(__name__)

SSDD_CLASS_NAME = "SSDDAutoencoder"
KL_CLASS_NAME = "AutoencoderKL"

#: ``kind:`` prefixes accepted in a model spec, mapped to a class name.
KIND_ALIASES: dict[str, str] = {
    "ssdd": SSDD_CLASS_NAME,
    "ssddautoencoder": SSDD_CLASS_NAME,
    "kl": KL_CLASS_NAME,
    "vae": KL_CLASS_NAME,
    "autoencoderkl": KL_CLASS_NAME,
}

METRIC_KEYS = ("psnr", "ssim", "lpips", "rfid")

_OPTION_RE = re.compile(r"^(steps|label|subfolder)=(.*)$")


# ====================================================================================================
# Model specs and loading
# ====================================================================================================
@dataclass
class ModelSpec:
    """Which model to evaluate and how.

    Attributes:
        path: local folder or Hub repo id.
        class_name: ``"SSDDAutoencoder"``, ``"AutoencoderKL"`` (or another diffusers autoencoder class);
            ``None`` = detect from the folder's ``config.json`` ``_class_name``.
        label: name in the tables and the grid; ``None`` = derived from the path and the steps.
        num_inference_steps: SSDD decode steps; ``None`` = the model's ``config.num_inference_steps``.
            Ignored (reported as ``None``) for non-SSDD models.
        subfolder: subfolder inside ``path`` (e.g. ``"vae"`` of a pipeline); ``None`` = ``path`` itself,
            or ``vae/`` when ``path`` is a pipeline folder without a top-level ``config.json``.
    """

    path: str
    class_name: str | None = None
    label: str | None = None
    num_inference_steps: int | None = None
    subfolder: str | None = None


def _resolve_kind(kind: str) -> str:
    """Class name for a ``kind:`` prefix (alias, or a diffusers class name given verbatim)."""
    alias = KIND_ALIASES.get(kind.lower())
    if alias is not None:
        return alias
    import diffusers

    if kind == SSDD_CLASS_NAME or isinstance(getattr(diffusers, kind, None), type):
        return kind
    raise ValueError(
        f"unknown model kind {kind!r}; use one of {sorted(KIND_ALIASES)} or a diffusers class name"
    )


def parse_model_spec(text: str, steps: int | None = None, label: str | None = None) -> ModelSpec:
    """Parse ``[kind:]path[@steps=N][@label=NAME][@subfolder=DIR]``.

    ``kind`` is ``ssdd``, ``kl`` / ``vae`` / ``autoencoderkl`` or a diffusers class name; without it the
    class is detected when the model is loaded. ``steps`` and ``label`` (e.g. from ``--steps`` and
    ``--labels``) are used when the spec does not set them itself.

    Examples: ``./ssdd-M@steps=8``, ``kl:stabilityai/sd-vae-ft-ema@label=SD-VAE``,
    ``ssdd:org/ssdd-f8c4-M-1step@steps=1``.
    """
    if not text:
        raise ValueError("empty model spec")
    parts = text.split("@")
    path_parts = [parts[0]]
    options: dict[str, str] = {}
    for part in parts[1:]:
        match = _OPTION_RE.match(part)
        if match is None:  # an '@' that belongs to the path itself
            if options:
                raise ValueError(f"cannot parse option {part!r} in model spec {text!r}")
            path_parts.append(part)
            continue
        options[match.group(1)] = match.group(2)
    path = "@".join(path_parts)

    class_name = None
    prefix, sep, rest = path.partition(":")
    if sep and rest and prefix and not os.path.exists(path):
        try:
            class_name = _resolve_kind(prefix)
            path = rest
        except ValueError:
            if len(prefix) > 1 and "/" not in prefix and "\\" not in prefix:
                raise
    if "steps" in options:
        value = options["steps"]
        steps = None if value in ("", "default") else int(value)
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps} in {text!r}")
    return ModelSpec(
        path=path,
        class_name=class_name,
        label=options.get("label", label) or None,
        num_inference_steps=steps,
        subfolder=options.get("subfolder") or None,
    )


def _read_config(path: str, subfolder: str | None) -> dict[str, Any]:
    """``config.json`` of a local folder or Hub repo (no class check)."""
    from diffusers import AutoencoderKL

    config = AutoencoderKL.load_config(path, subfolder=subfolder)
    return dict(config[0] if isinstance(config, tuple) else config)


def detect_model_class(path: str, subfolder: str | None = None) -> tuple[str, str | None]:
    """``(class name, subfolder)`` from ``config.json``'s ``_class_name``.

    When ``subfolder`` is ``None`` and the root has no ``config.json`` (a pipeline folder or repo), the
    ``vae`` subfolder is tried.
    """
    candidates = [subfolder] if subfolder is not None else [None, "vae"]
    errors = []
    for candidate in candidates:
        try:
            config = _read_config(path, candidate)
        except (OSError, ValueError) as error:  # EnvironmentError when config.json is absent
            errors.append(f"{candidate or '.'}: {error}")
            continue
        class_name = config.get("_class_name")
        if not class_name:
            raise ValueError(f"{path!r} has a config.json without _class_name; pass kind:path explicitly")
        return str(class_name), candidate
    raise OSError(f"could not read a model config from {path!r}: " + " | ".join(errors))


def _model_class(class_name: str) -> type:
    if class_name == SSDD_CLASS_NAME:
        from .models import SSDDAutoencoder

        return SSDDAutoencoder
    import diffusers

    cls = getattr(diffusers, class_name, None)
    if not isinstance(cls, type):
        raise ValueError(
            f"unsupported model class {class_name!r} (not SSDDAutoencoder nor a diffusers class)"
        )
    return cls


def _default_label(path: str, class_name: str, steps: int | None) -> str:
    name = Path(path.rstrip("/\\")).name or path
    if class_name == SSDD_CLASS_NAME:
        return f"{name} ({steps} step{'s' if steps != 1 else ''})"
    return name


class LoadedAutoencoder:
    """A model ready for evaluation: holds the network, its label and how to reconstruct with it.

    Build with :func:`load_autoencoder` (from a spec) or :meth:`from_model` (an in-memory model).
    """

    def __init__(
        self,
        model: nn.Module,
        label: str,
        num_inference_steps: int | None = None,
        source: str | None = None,
    ) -> None:
        self.model = model.eval()
        self.class_name = type(model).__name__
        self.is_ssdd = hasattr(model, "decoder") and hasattr(model.config, "time_grid_power")
        if self.is_ssdd and num_inference_steps is None:
            num_inference_steps = int(model.config.num_inference_steps)
        self.num_inference_steps = num_inference_steps if self.is_ssdd else None
        self.label = label
        self.source = source or "<in-memory>"

    @classmethod
    def from_model(
        cls, model: nn.Module, label: str | None = None, num_inference_steps: int | None = None
    ) -> LoadedAutoencoder:
        """Wrap an in-memory ``SSDDAutoencoder`` / ``AutoencoderKL``."""
        wrapped = cls(model, label or type(model).__name__, num_inference_steps)
        if label is None:
            wrapped.label = _default_label(
                type(model).__name__, wrapped.class_name, wrapped.num_inference_steps
            )
        return wrapped

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def spatial_compression_ratio(self) -> int:
        ratio = getattr(self.model, "spatial_compression_ratio", None)
        if isinstance(ratio, int):
            return ratio
        blocks = getattr(self.model.config, "block_out_channels", None)
        return 2 ** (len(blocks) - 1) if blocks else 1

    @torch.no_grad()
    def reconstruct(self, images: Tensor, noise: Tensor | None = None) -> Tensor:
        """Encode (posterior mode) and decode ``images`` (B, 3, H, W) in [-1, 1]; returns float32.

        ``noise`` (B, 3, H, W) is the SSDD starting noise; ignored by other models.
        """
        x = images.to(device=self.device, dtype=self.dtype)
        encoded = self.model.encode(x)
        latent_dist = getattr(encoded, "latent_dist", None)
        z = latent_dist.mode() if latent_dist is not None else encoded.latents
        if self.is_ssdd:
            out = self.model.decode(z, num_inference_steps=self.num_inference_steps, noise=noise).sample
        else:
            out = self.model.decode(z).sample
        return out.float()


def load_autoencoder(
    spec: ModelSpec | str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> LoadedAutoencoder:
    """Load the model of ``spec`` (class from ``kind:`` or detected from ``config.json``) in eval mode."""
    if isinstance(spec, str):
        spec = parse_model_spec(spec)
    class_name, subfolder = spec.class_name, spec.subfolder
    if class_name is None:
        class_name, subfolder = detect_model_class(spec.path, spec.subfolder)
    cls = _model_class(class_name)
    kwargs: dict[str, Any] = {"torch_dtype": dtype}
    if subfolder is not None:
        kwargs["subfolder"] = subfolder
    model = cls.from_pretrained(spec.path, **kwargs).to(device).eval()
    model.requires_grad_(False)
    wrapped = LoadedAutoencoder(
        model, label="", num_inference_steps=spec.num_inference_steps, source=spec.path
    )
    wrapped.label = spec.label or _default_label(spec.path, wrapped.class_name, wrapped.num_inference_steps)
    return wrapped


def shared_noise(shape: Sequence[int], seed: int, batch_index: int) -> Tensor:
    """SSDD starting noise of batch ``batch_index``: float32 on CPU, a function of ``(seed, batch_index)``."""
    generator = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(batch_index)) % (2**63))
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32)


# ====================================================================================================
# Data
# ====================================================================================================
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
    from .data import EvalTransform, SamplePhotoDataset, load_image_dataset

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
    from .data import collate_images

    if isinstance(dataset, Tensor):
        dataset = _TensorImages(dataset)
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate_images
    )
    for batch in loader:
        yield batch["pixel_values"], int(batch["num_skipped"])


# ====================================================================================================
# Peak memory
# ====================================================================================================
def _proc_status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_rss_high_water_mark() -> bool:
    """Reset the kernel's peak-RSS counter (``VmHWM``) of this process (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return False
    return _proc_status_kb("VmHWM") is not None


class PeakMemoryMeter:
    """Peak memory of a model's reconstruction calls, above a baseline taken before the model loads.

    * CUDA: ``torch.cuda.max_memory_allocated`` (reset before each call) minus the memory allocated
      before the model was loaded, i.e. weights + activations (``"cuda_peak_allocated"``).
    * CPU (Linux): the process's peak RSS (``VmHWM``, reset before each call through
      ``/proc/self/clear_refs``) minus the RSS before the model was loaded (``"cpu_peak_rss_delta"``).
      Approximate: allocator caching, threads and other memory of the process are included.
    * Elsewhere: not measured (``"not_measured"``, value ``None``).
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda":
            self.kind = "cuda_peak_allocated"
        elif self.device.type == "cpu" and _reset_rss_high_water_mark():
            self.kind = "cpu_peak_rss_delta"
        else:
            self.kind = "not_measured"
        self._baseline = 0
        self._peak: int | None = None

    def set_baseline(self) -> None:
        """Record the memory in use before the model is loaded."""
        if self.kind == "cuda_peak_allocated":
            torch.cuda.synchronize(self.device)
            self._baseline = torch.cuda.memory_allocated(self.device)
        elif self.kind == "cpu_peak_rss_delta":
            self._baseline = (_proc_status_kb("VmRSS") or 0) * 1024
        self._peak = None

    def start(self) -> None:
        """Reset the peak counter before a reconstruction call."""
        if self.kind == "cuda_peak_allocated":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.kind == "cpu_peak_rss_delta":
            _reset_rss_high_water_mark()

    def stop(self) -> None:
        """Fold the peak of the call that just ended into the running maximum."""
        if self.kind == "cuda_peak_allocated":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.kind == "cpu_peak_rss_delta":
            peak = (_proc_status_kb("VmHWM") or 0) * 1024
        else:
            return
        used = max(0, peak - self._baseline)
        self._peak = used if self._peak is None else max(self._peak, used)

    @property
    def peak_mb(self) -> float | None:
        """Peak in MiB (``None`` when not measured)."""
        return None if self._peak is None else self._peak / 2**20


MEMORY_LABELS = {
    "cuda_peak_allocated": "CUDA peak allocated (weights + activations)",
    "cpu_peak_rss_delta": "CPU peak RSS increase over the pre-load baseline (approximate)",
    "not_measured": "not measured",
}


# ====================================================================================================
# Metrics construction
# ====================================================================================================
@dataclass
class MetricSettings:
    """Which metrics to compute.

    Attributes:
        compute_lpips: LPIPS with the AlexNet trunk.
        lpips_backbone: ``"pretrained"`` (ImageNet AlexNet; downloaded by torchvision if absent) or
            ``"random"`` (offline tests only; meaningless values).
        compute_fid: rFID (needs >= 2 images).
        fid_feature_extractor: ``None`` = InceptionV3 (torch-fidelity weights, downloaded if absent);
            otherwise a module mapping uint8 (B, 3, H, W) to (B, D) features. The value is then a
            Fréchet distance on those features, reported as "FD (custom features)", not as rFID.
        skip_unavailable: when a metric's weights cannot be loaded (offline), report it as unavailable
            instead of raising.
    """

    compute_lpips: bool = True
    lpips_backbone: str = "pretrained"
    compute_fid: bool = True
    fid_feature_extractor: nn.Module | None = None
    skip_unavailable: bool = False

    @property
    def fid_features(self) -> str:
        """``"inception"`` or ``"custom:<class name>"``."""
        if self.fid_feature_extractor is None:
            return "inception"
        return f"custom:{type(self.fid_feature_extractor).__name__}"


def build_metrics(settings: MetricSettings, device: torch.device | str) -> tuple[ReconstructionMetrics, dict]:
    """``(ReconstructionMetrics on device, {metric: reason})`` with unavailable metrics switched off.

    Without ``settings.skip_unavailable`` a failure to load LPIPS or Inception weights raises.
    """
    unavailable: dict[str, str] = {}
    compute_lpips, compute_fid = settings.compute_lpips, settings.compute_fid
    if settings.skip_unavailable:
        if compute_lpips:
            try:
                LPIPSMetric(settings.lpips_backbone)  # type: ignore[arg-type]
            except Exception as error:  # noqa: BLE001 - any download / load failure
                unavailable["lpips"] = f"weights unavailable ({type(error).__name__})"
                compute_lpips = False
        if compute_fid:
            try:
                FIDMetric(settings.fid_feature_extractor)
            except Exception as error:  # noqa: BLE001
                unavailable["rfid"] = f"weights unavailable ({type(error).__name__})"
                compute_fid = False
    metrics = ReconstructionMetrics(
        compute_fid=compute_fid,
        compute_lpips=compute_lpips,
        fid_feature_extractor=settings.fid_feature_extractor,
        lpips_backbone=settings.lpips_backbone,  # type: ignore[arg-type]
    )
    return metrics.to(device), unavailable


# ====================================================================================================
# Results
# ====================================================================================================
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


def make_image_grid(rows: Sequence[Tensor], padding: int = 2) -> Image.Image:
    """One row per uint8 (K, 3, H, W) tensor, K images per row, white ``padding`` pixels around each.

    Size: ``(K * (W + p) + p, len(rows) * (H + p) + p)``.
    """
    if not rows:
        raise ValueError("no rows to draw")
    count, _, height, width = rows[0].shape
    grid = Image.new(
        "RGB",
        (count * (width + padding) + padding, len(rows) * (height + padding) + padding),
        (255, 255, 255),
    )
    for r, row in enumerate(rows):
        if row.dtype != torch.uint8:
            row = to_uint8(row)
        for c in range(row.shape[0]):
            array = row[c].permute(1, 2, 0).cpu().numpy()
            grid.paste(
                Image.fromarray(array, mode="RGB"),
                (padding + c * (width + padding), padding + r * (height + padding)),
            )
    return grid


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
        }

    def to_markdown(self) -> str:
        """A Markdown table, one row per model, with footnotes on the memory and FID measurements."""
        fid_custom = str(self.settings.get("fid_features", "inception")) not in ("inception", "off")
        fid_header = "FD* ↓" if fid_custom else "rFID ↓"
        header = (
            f"| Model | Steps | Params (M) | PSNR ↑ | SSIM ↑ | LPIPS ↓ | {fid_header} | Images/s | "
            "Peak memory (MiB) |"
        )
        lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for item in self.results:
            m = item.metrics
            steps = "-" if item.num_inference_steps is None else str(item.num_inference_steps)
            lines.append(
                f"| {item.label} | {steps} | {item.num_parameters / 1e6:.2f} | {_fmt(m.get('psnr'), 2)} | "
                f"{_fmt(m.get('ssim'), 4)} | {_fmt(m.get('lpips'), 4)} | {_fmt(m.get('rfid'), 2)} | "
                f"{item.images_per_second:.2f} | {_fmt(item.peak_memory_mb, 0)} |"
            )
        notes = []
        kinds = sorted({item.memory_metric for item in self.results})
        notes.append("Peak memory: " + "; ".join(MEMORY_LABELS.get(k, k) for k in kinds) + ".")
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
        return make_image_grid(rows, padding=padding)

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


# ====================================================================================================
# Evaluation loop
# ====================================================================================================
def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``"auto"``/``None`` -> CUDA if available, else CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


ModelLike = ModelSpec | LoadedAutoencoder | str


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
        meter = PeakMemoryMeter(device)
        meter.set_baseline()
        owns_model = not isinstance(entry, LoadedAutoencoder)
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
            f = model.spatial_compression_ratio
            if images.shape[-1] % f or images.shape[-2] % f:
                raise ValueError(
                    f"image size {tuple(images.shape[-2:])} is not divisible by {label}'s factor {f}"
                )
            noise = shared_noise(images.shape, seed, batch_index).to(device) if model.is_ssdd else None
            if batch_index == 0:
                for _ in range(max(0, warmup_batches)):
                    model.reconstruct(images, noise)
            meter.start()
            _synchronize(device)
            start = time.perf_counter()
            recon = model.reconstruct(images, noise)
            _synchronize(device)
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
        "lpips_backbone": metrics.lpips_backbone if metrics.compute_lpips else "off",
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


# ====================================================================================================
# Feature-extractor hook
# ====================================================================================================
def load_object(reference: str) -> Any:
    """Import ``package.module:attribute`` and return the attribute (called if it is a factory class or
    function that takes no argument and the result is wanted, see :func:`load_feature_extractor`)."""
    module_name, sep, attribute = reference.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"expected 'package.module:attribute', got {reference!r}")
    obj: Any = importlib.import_module(module_name)
    for part in attribute.split("."):
        obj = getattr(obj, part)
    return obj


def load_feature_extractor(reference: str) -> nn.Module:
    """A custom FID feature extractor from ``package.module:factory`` (a module instance, an ``nn.Module``
    subclass or a zero-argument callable returning one)."""
    obj = load_object(reference)
    if isinstance(obj, nn.Module):
        return obj
    if callable(obj):
        built = obj()
        if isinstance(built, nn.Module):
            return built
    raise TypeError(f"{reference!r} did not give an nn.Module feature extractor")


__all__ = [
    "EvaluationReport",
    "LoadedAutoencoder",
    "MetricSettings",
    "ModelResult",
    "ModelSpec",
    "PeakMemoryMeter",
    "build_eval_dataset",
    "build_metrics",
    "detect_model_class",
    "evaluate_models",
    "iterate_batches",
    "load_autoencoder",
    "load_feature_extractor",
    "make_image_grid",
    "parse_model_spec",
    "resolve_device",
    "shared_noise",
]
