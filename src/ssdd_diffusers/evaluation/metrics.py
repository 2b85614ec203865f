"""Reconstruction metrics computed as upstream SSDD does (PSNR, SSIM, LPIPS-Alex, rFID).

Reconstructions (and originals) are clamped to [-1, 1] and quantised to uint8 before scoring, so a
reconstruction that differs by less than half a grey level scores as perfect.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..dependencies import require
from .lpips import LPIPSBackbone, LPIPSDistance


# ----------------------------------------------------------------------------------------------------
# Quantisation and per-image metrics
# ----------------------------------------------------------------------------------------------------
def to_uint8(images: Tensor) -> Tensor:
    """(B, 3, H, W) float in [-1, 1] -> uint8 in [0, 255] via clamp, ``(x + 1) · 127.5``, round."""
    x = images.detach().float().clamp(-1.0, 1.0)
    return ((x + 1.0) * 127.5).round().to(torch.uint8)


def uint8_to_unit(images: Tensor) -> Tensor:
    """uint8 (B, 3, H, W) -> float32 in [0, 1]."""
    return images.float() / 255.0


def _check_uint8_pair(reference: Tensor, reconstruction: Tensor) -> None:
    if reference.dtype != torch.uint8 or reconstruction.dtype != torch.uint8:
        raise TypeError(
            f"expected uint8 images (use to_uint8), got {reference.dtype} and {reconstruction.dtype}"
        )
    if reference.shape != reconstruction.shape or reference.dim() != 4 or reference.shape[1] != 3:
        raise ValueError(
            f"expected two (B, 3, H, W) tensors, "
            f"got {tuple(reference.shape)} and {tuple(reconstruction.shape)}"
        )


def psnr(reference: Tensor, reconstruction: Tensor) -> Tensor:
    """Per-image PSNR in dB on the [0, 1] scale (data range 1): ``10 · log10(1 / MSE)``.

    Args:
        reference: uint8 (B, 3, H, W).
        reconstruction: uint8 (B, 3, H, W).

    Returns:
        (B,) float64; ``inf`` where the images are identical.
    """
    _check_uint8_pair(reference, reconstruction)
    diff = reference.double() / 255.0 - reconstruction.double() / 255.0
    mse = diff.square().flatten(1).mean(dim=1)
    return 10.0 * torch.log10(1.0 / mse)


def ssim(reference: Tensor, reconstruction: Tensor) -> Tensor:
    """Per-image SSIM with scikit-image's defaults (7x7 uniform window, K1 0.01, K2 0.03).

    Equals ``skimage.metrics.structural_similarity(a, b, channel_axis=0, data_range=1.0)`` on float
    [0, 1] CHW arrays. H and W must be >= 7.

    Args:
        reference: uint8 (B, 3, H, W).
        reconstruction: uint8 (B, 3, H, W).

    Returns:
        (B,) float64.
    """
    require("skimage", extra="eval", feature="SSIM")
    from skimage.metrics import structural_similarity

    _check_uint8_pair(reference, reconstruction)
    ref = reference.cpu().numpy().astype(np.float64) / 255.0
    rec = reconstruction.cpu().numpy().astype(np.float64) / 255.0
    values = [structural_similarity(a, b, channel_axis=0, data_range=1.0) for a, b in zip(ref, rec)]
    return torch.tensor(values, dtype=torch.float64)


# ----------------------------------------------------------------------------------------------------
# LPIPS (AlexNet)
# ----------------------------------------------------------------------------------------------------
class LPIPSMetric(nn.Module):
    """LPIPS with the AlexNet trunk (the standard evaluation metric), on uint8-quantised images.

    Args:
        backbone: ``"pretrained"`` (ImageNet AlexNet via torchvision) or ``"random"`` (tests only;
            warns that the value is meaningless).
        distance: instead of LPIPS, any frozen module mapping two (B, 3, H, W) batches in [-1, 1] to (B,)
            perceptual distances (e.g. an offline stand-in); reported as "LPIPS*", not comparable with
            LPIPS.
    """

    def __init__(self, backbone: LPIPSBackbone = "pretrained", distance: nn.Module | None = None) -> None:
        super().__init__()
        self.lpips = LPIPSDistance(net="alex", backbone=backbone, network=distance)

    def train(self, mode: bool = True) -> LPIPSMetric:
        """Ignore ``mode``: always eval."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, reference: Tensor, reconstruction: Tensor) -> Tensor:
        """uint8 (B, 3, H, W) x2 -> (B,) float32 per-image LPIPS, inputs mapped back to [-1, 1]."""
        _check_uint8_pair(reference, reconstruction)
        ref = reference.float() / 127.5 - 1.0
        rec = reconstruction.float() / 127.5 - 1.0
        return self.lpips.distance(ref, rec)


# ----------------------------------------------------------------------------------------------------
# FID
# ----------------------------------------------------------------------------------------------------
class FIDMetric(nn.Module):
    """Fréchet distance between feature statistics of real and reconstructed images.

    Built on ``torchmetrics.image.fid.FrechetInceptionDistance``; feature sums and covariances are
    accumulated in float64.

    Args:
        feature_extractor: ``None`` for the real rFID: torch-fidelity's InceptionV3 (pool3, 2048-d),
            weights loaded (downloaded if absent) into the torch hub cache, TF1-compatible bilinear
            resize to 299 as in torch-fidelity. Otherwise any module mapping uint8 (B, 3, H, W) to
            (B, D) features; it is put in eval mode. A custom extractor gives a Fréchet distance that
            is not comparable with published FID.
    """

    def __init__(self, feature_extractor: nn.Module | None = None) -> None:
        super().__init__()
        require("torchmetrics", extra="eval", feature="rFID")
        from torchmetrics.image.fid import FrechetInceptionDistance

        if feature_extractor is None:
            # antialias=False: torch-fidelity's TF1-compatible resize (older torchmetrics always use it).
            accepts_antialias = "antialias" in inspect.signature(FrechetInceptionDistance).parameters
            extra = {"antialias": False} if accepts_antialias else {}
            self.fid = FrechetInceptionDistance(feature=2048, normalize=False, **extra)
        else:
            feature_extractor.requires_grad_(False)
            feature_extractor.eval()
            self.fid = FrechetInceptionDistance(feature=feature_extractor, normalize=False)
        self.eval()

    def train(self, mode: bool = True) -> FIDMetric:
        """Ignore ``mode``: the feature extractor stays in eval mode."""
        return super().train(False)

    @property
    def num_real(self) -> int:
        return int(self.fid.real_features_num_samples)

    @property
    def num_fake(self) -> int:
        return int(self.fid.fake_features_num_samples)

    @torch.no_grad()
    def update(self, real: Tensor, fake: Tensor) -> None:
        """Add uint8 (B, 3, H, W) real and reconstructed images (same B not required)."""
        for name, images in (("real", real), ("fake", fake)):
            if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
                raise TypeError(
                    f"{name} images must be uint8 (B, 3, H, W), got {images.dtype} {tuple(images.shape)}"
                )
        self.fid.update(real, real=True)
        self.fid.update(fake, real=False)

    def compute(self) -> float:
        """FID over everything added since the last :meth:`reset` (needs >= 2 images of each set)."""
        if self.num_real < 2 or self.num_fake < 2:
            raise ValueError(
                "FID needs at least 2 real and 2 reconstructed images, "
                f"got {self.num_real} and {self.num_fake}"
            )
        return float(self.fid.compute())

    def reset(self) -> None:
        self.fid.reset()


# ----------------------------------------------------------------------------------------------------
# Aggregation
# ----------------------------------------------------------------------------------------------------
class ReconstructionMetrics(nn.Module):
    """Accumulate PSNR, SSIM, LPIPS-Alex and rFID over batches of (original, reconstruction) pairs.

    Args:
        compute_fid: accumulate rFID (needs >= 2 images in total).
        compute_lpips: compute LPIPS-Alex.
        fid_feature_extractor: injected FID features (see :class:`FIDMetric`); ``None`` = InceptionV3.
        lpips_backbone: ``"pretrained"`` or ``"random"`` (tests only).
        lpips_distance: a custom perceptual distance instead of LPIPS (see :class:`LPIPSMetric`).

    Move to a device with ``.to(device)``; inputs are moved to that device.
    """

    def __init__(
        self,
        compute_fid: bool = True,
        compute_lpips: bool = True,
        fid_feature_extractor: nn.Module | None = None,
        lpips_backbone: LPIPSBackbone = "pretrained",
        lpips_distance: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.fid = FIDMetric(fid_feature_extractor) if compute_fid else None
        self.lpips = LPIPSMetric(lpips_backbone, lpips_distance) if compute_lpips else None
        self.register_buffer("_device_anchor", torch.empty(0), persistent=False)
        self.reset()

    def train(self, mode: bool = True) -> ReconstructionMetrics:
        """Ignore ``mode``: always eval."""
        return super().train(False)

    def reset(self) -> None:
        """Forget all accumulated images."""
        self._sums: dict[str, float] = {"psnr": 0.0, "ssim": 0.0, "lpips": 0.0}
        self._count = 0
        if self.fid is not None:
            self.fid.reset()

    @torch.no_grad()
    def update(self, originals: Tensor, reconstructions: Tensor) -> dict[str, Tensor]:
        """Score a batch. Both (B, 3, H, W) float in [-1, 1]; both are clamped and quantised to uint8.

        Returns:
            Per-image values of this batch: {"psnr", "ssim"[, "lpips"]} each (B,).
        """
        if originals.shape != reconstructions.shape:
            raise ValueError(f"shape mismatch: {tuple(originals.shape)} vs {tuple(reconstructions.shape)}")
        device = self._device_anchor.device
        ref = to_uint8(originals.to(device))
        rec = to_uint8(reconstructions.to(device))
        batch = {"psnr": psnr(ref, rec), "ssim": ssim(ref, rec)}
        if self.lpips is not None:
            batch["lpips"] = self.lpips(ref, rec)
        if self.fid is not None:
            self.fid.update(ref, rec)
        for key, values in batch.items():
            self._sums[key] += float(values.double().sum())
        self._count += ref.shape[0]
        return batch

    def compute(self) -> dict[str, float | int]:
        """Means over all images: {"psnr", "ssim", "lpips", "rfid", "num_images"}.

        "lpips" and "rfid" are absent when switched off. PSNR is ``inf`` if any image is reproduced
        exactly (after quantisation).
        """
        if self._count == 0:
            raise ValueError("no images were added: call update() first")
        result: dict[str, float | int] = {
            "psnr": self._sums["psnr"] / self._count,
            "ssim": self._sums["ssim"] / self._count,
        }
        if self.lpips is not None:
            result["lpips"] = self._sums["lpips"] / self._count
        if self.fid is not None:
            result["rfid"] = self.fid.compute()
        result["num_images"] = self._count
        return result


# ----------------------------------------------------------------------------------------------------
# Which metrics to compute
# ----------------------------------------------------------------------------------------------------
METRIC_KEYS = ("psnr", "ssim", "lpips", "rfid")


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
        lpips_distance: a module mapping two (B, 3, H, W) batches in [-1, 1] to (B,) distances, used
            instead of LPIPS-Alex and reported as "LPIPS*" (a stand-in, not comparable with LPIPS).
    """

    compute_lpips: bool = True
    lpips_backbone: str = "pretrained"
    compute_fid: bool = True
    fid_feature_extractor: nn.Module | None = None
    skip_unavailable: bool = False
    lpips_distance: nn.Module | None = None

    @property
    def lpips_kind(self) -> str:
        """``lpips_backbone`` (``"pretrained"`` / ``"random"``) or ``"custom:<class name>"``."""
        if self.lpips_distance is None:
            return self.lpips_backbone
        return f"custom:{type(self.lpips_distance).__name__}"

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
                LPIPSMetric(settings.lpips_backbone, settings.lpips_distance)  # type: ignore[arg-type]
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
        lpips_distance=settings.lpips_distance,
    )
    return metrics.to(device), unavailable


# ----------------------------------------------------------------------------------------------------
# Custom FID features
# ----------------------------------------------------------------------------------------------------
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


def load_module(reference: str, role: str = "module") -> nn.Module:
    """An ``nn.Module`` from ``package.module:factory``: a module instance, an ``nn.Module`` subclass or a
    zero-argument callable returning one. ``role`` names it in the error."""
    obj = load_object(reference)
    if isinstance(obj, nn.Module):
        return obj
    if callable(obj):
        built = obj()
        if isinstance(built, nn.Module):
            return built
    raise TypeError(f"{reference!r} did not give an nn.Module {role}")


def load_feature_extractor(reference: str) -> nn.Module:
    """A custom FID feature extractor from ``package.module:factory`` (see :func:`load_module`)."""
    return load_module(reference, "feature extractor")


__all__ = [
    "METRIC_KEYS",
    "FIDMetric",
    "LPIPSMetric",
    "MetricSettings",
    "ReconstructionMetrics",
    "build_metrics",
    "load_feature_extractor",
    "load_module",
    "load_object",
    "psnr",
    "ssim",
    "to_uint8",
    "uint8_to_unit",
]
