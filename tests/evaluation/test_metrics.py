"""Tests for ssdd_diffusers.evaluation.metrics (offline: Inception and AlexNet weights are stand-ins)."""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch_fidelity.feature_extractor_inceptionv3 as tf_inception
import torchvision
from skimage.metrics import structural_similarity
from torch import nn

from ssdd_diffusers.evaluation.lpips import LPIPSDistance
from ssdd_diffusers.evaluation.metrics import (
    FIDMetric,
    LPIPSMetric,
    ReconstructionMetrics,
    psnr,
    ssim,
    to_uint8,
)


# ----------------------------------------------------------------------------------------------------
# Helpers and fixtures
# ----------------------------------------------------------------------------------------------------
class TinyFeatures(nn.Module):
    """Stand-in FID feature extractor: fixed random 4x4/stride-4 conv + ReLU + global average pool."""

    num_features = 16

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, self.num_features, kernel_size=4, stride=4)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=gen))
            self.conv.bias.copy_(torch.randn(self.conv.bias.shape, generator=gen))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> (B, 16)."""
        x = images.float() / 127.5 - 1.0
        return torch.relu(self.conv(x)).mean(dim=(2, 3))


def _uint8_images(batch: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    # smooth-ish content (upsampled noise) so SSIM and features behave like on natural images
    low = torch.rand(batch, 3, size // 4, size // 4, generator=gen)
    img = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    return (img * 255).round().to(torch.uint8)


def _add_noise(images: torch.Tensor, sigma: float, seed: int = 1) -> torch.Tensor:
    """Gaussian noise of std ``sigma`` grey levels, clipped back to uint8."""
    gen = torch.Generator().manual_seed(seed)
    noisy = images.float() + sigma * torch.randn(images.shape, generator=gen)
    return noisy.clamp(0, 255).round().to(torch.uint8)


def _to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 -> float in [-1, 1] exactly on the quantisation grid."""
    return images.float() / 127.5 - 1.0


@pytest.fixture(scope="module")
def lpips_metric() -> LPIPSMetric:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LPIPSMetric(backbone="random")


# ----------------------------------------------------------------------------------------------------
# Quantisation, PSNR, SSIM
# ----------------------------------------------------------------------------------------------------
def test_to_uint8_clamps_scales_and_rounds() -> None:
    x = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 3.0]).view(1, 1, 1, 7).expand(1, 3, 1, 7)
    out = to_uint8(x)
    assert out.dtype == torch.uint8
    # (x+1)*127.5 = 0, 0, 63.75, 127.5, 191.25, 255, 255 -> round (half to even for 127.5)
    assert out[0, 0, 0].tolist() == [0, 0, 64, 128, 191, 255, 255]
    grid = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(1, 3, 16, 16)
    assert torch.equal(to_uint8(_to_float(grid)), grid)  # exact round trip
    assert torch.equal(to_uint8(_to_float(grid).bfloat16()), to_uint8(_to_float(grid).bfloat16().float()))


@pytest.mark.parametrize("offset", [1, 3, 10])
def test_psnr_of_constant_offset_is_exact(offset: int) -> None:
    ref = _uint8_images(3).clamp(max=255 - offset)
    rec = ref + offset
    expected = 10 * math.log10(1.0 / (offset / 255.0) ** 2)  # = 20 log10(255 / offset)
    values = psnr(ref, rec)
    assert values.shape == (3,) and values.dtype == torch.float64
    torch.testing.assert_close(values, torch.full((3,), expected, dtype=torch.float64), rtol=1e-12, atol=0)


def test_psnr_per_image_and_identical_is_inf() -> None:
    ref = _uint8_images(2).clamp(max=250)
    rec = ref.clone()
    rec[1] += 5
    values = psnr(ref, rec)
    assert math.isinf(values[0].item()) and values[0] > 0
    assert values[1].item() == pytest.approx(20 * math.log10(255 / 5), abs=1e-9)
    with pytest.raises(TypeError, match="uint8"):
        psnr(_to_float(ref), _to_float(rec))


def test_ssim_matches_skimage_and_identical_is_one() -> None:
    ref = _uint8_images(2)
    rec = _add_noise(ref, 10.0)
    values = ssim(ref, rec)
    for i in range(2):
        expected = structural_similarity(
            ref[i].numpy().astype(np.float64) / 255,
            rec[i].numpy().astype(np.float64) / 255,
            channel_axis=0,
            data_range=1.0,
        )
        assert values[i].item() == pytest.approx(expected, abs=1e-12)
    torch.testing.assert_close(ssim(ref, ref), torch.ones(2, dtype=torch.float64))


def test_ssim_drops_monotonically_with_noise() -> None:
    ref = _uint8_images(2)
    means = [ssim(ref, _add_noise(ref, sigma)).mean().item() for sigma in (0.0, 2.0, 8.0, 25.0, 60.0)]
    assert means[0] == pytest.approx(1.0)
    assert all(a > b for a, b in zip(means, means[1:])), means


# ----------------------------------------------------------------------------------------------------
# FID
# ----------------------------------------------------------------------------------------------------
def test_fid_of_set_with_itself_is_zero_and_grows_with_distortion() -> None:
    real = _uint8_images(48, seed=0)
    fid = FIDMetric(feature_extractor=TinyFeatures())
    fid.update(real, real)
    assert fid.num_real == 48 and fid.num_fake == 48
    assert fid.fid.real_features_sum.dtype == torch.float64
    assert fid.fid.real_features_cov_sum.dtype == torch.float64
    assert abs(fid.compute()) < 1e-4
    values = []
    for sigma in (4.0, 16.0, 48.0):
        fid.reset()
        fid.update(real, _add_noise(real, sigma))
        values.append(fid.compute())
    assert values[0] > 1e-4
    assert all(a < b for a, b in zip(values, values[1:])), values


def test_fid_equals_frechet_formula_on_injected_features() -> None:
    extractor = TinyFeatures()
    real, fake = _uint8_images(20, seed=0), _add_noise(_uint8_images(20, seed=0), 30.0)
    fid = FIDMetric(feature_extractor=extractor)
    fid.update(real[:7], fake[:7])  # two batches accumulate
    fid.update(real[7:], fake[7:])
    with torch.no_grad():
        f1, f2 = extractor(real).double().numpy(), extractor(fake).double().numpy()
    from scipy import linalg

    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    expected = float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))
    assert fid.compute() == pytest.approx(expected, rel=1e-4)


def test_fid_needs_two_samples_and_uint8() -> None:
    fid = FIDMetric(feature_extractor=TinyFeatures())
    with pytest.raises(ValueError, match="at least 2"):
        fid.compute()
    fid.update(_uint8_images(1), _uint8_images(1, seed=3))
    with pytest.raises(ValueError, match="at least 2"):
        fid.compute()
    with pytest.raises(TypeError, match="uint8"):
        fid.update(_to_float(_uint8_images(2)), _uint8_images(2))


def test_fid_default_loads_inception_from_torch_hub_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default extractor is torch-fidelity's InceptionV3 loaded from the hub cache (random stand-in)."""
    with monkeypatch.context() as patch, torch.device("meta"):  # architecture only, to get the keys
        patch.setattr(tf_inception, "load_state_dict_from_url", lambda *args, **kwargs: None)
        patch.setattr(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        meta = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).state_dict()
    gen = torch.Generator().manual_seed(0)
    # small tensors random (positive, so BN variances are valid); big ones zero-stride to keep the file tiny
    state = {
        key: torch.rand(t.shape, generator=gen)
        if t.is_floating_point() and t.numel() <= 100_000
        else torch.zeros((), dtype=t.dtype).expand(t.shape)
        for key, t in meta.items()
    }
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(state, cache / os.path.basename(tf_inception.URL_INCEPTION_V3))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("attempted a download")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    fid = FIDMetric()
    inception = fid.fid.inception
    assert torch.equal(inception.Conv2d_1a_3x3.conv.weight, state["Conv2d_1a_3x3.conv.weight"])
    assert torch.equal(
        inception.Mixed_7c.branch1x1.bn.running_var, state["Mixed_7c.branch1x1.bn.running_var"]
    )
    assert not inception.use_antialias  # torch-fidelity's TF1-compatible resize, as upstream
    with torch.no_grad():
        assert inception(_uint8_images(1)).shape == (1, 2048)
    fid.train()
    assert not inception.training


# ----------------------------------------------------------------------------------------------------
# LPIPS metric
# ----------------------------------------------------------------------------------------------------
def test_lpips_metric_identical_is_zero_and_uses_uint8_images(lpips_metric: LPIPSMetric) -> None:
    ref = _uint8_images(2)
    assert torch.equal(lpips_metric(ref, ref), torch.zeros(2))
    rec = _add_noise(ref, 20.0)
    values = lpips_metric(ref, rec)
    assert values.shape == (2,) and (values > 0).all()
    expected = lpips_metric.lpips.distance(_to_float(ref), _to_float(rec))
    torch.testing.assert_close(values, expected)
    assert lpips_metric.lpips.net.pnet_type == "alex"
    with pytest.raises(TypeError, match="uint8"):
        lpips_metric(_to_float(ref), _to_float(rec))


def test_lpips_metric_pretrained_alexnet_loads_from_torch_hub_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    weights = torchvision.models.AlexNet_Weights.IMAGENET1K_V1
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in torchvision.models.alexnet().state_dict().items()}
    gen = torch.Generator().manual_seed(7)
    # zero-stride views keep the big classifier tensors out of the file
    state = {
        k: torch.randn(s, generator=gen) if k.startswith("features.") else torch.zeros(1).expand(s)
        for k, s in shapes.items()
    }
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(state, cache / os.path.basename(weights.url))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("download attempted"))
    metric = LPIPSMetric(backbone="pretrained")
    assert torch.equal(metric.lpips.net.net.slice1[0].weight, state["features.0.weight"])
    assert isinstance(metric.lpips, LPIPSDistance)


# ----------------------------------------------------------------------------------------------------
# Aggregation
# ----------------------------------------------------------------------------------------------------
def _metrics(**kwargs: object) -> ReconstructionMetrics:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ReconstructionMetrics(fid_feature_extractor=TinyFeatures(), lpips_backbone="random", **kwargs)


def test_sub_half_grey_level_perturbation_is_invisible() -> None:
    """Quantisation to uint8 happens before scoring: +0.4 grey level changes nothing, +0.6 one level."""
    ref = _uint8_images(4).clamp(min=1, max=254)
    originals = _to_float(ref)
    metrics = _metrics()
    metrics.update(originals, originals + 0.4 / 127.5)
    result = metrics.compute()
    assert math.isinf(result["psnr"])
    assert result["ssim"] == 1.0
    assert result["lpips"] == 0.0
    assert abs(result["rfid"]) < 1e-4
    assert result["num_images"] == 4

    metrics.reset()
    metrics.update(originals, originals + 0.6 / 127.5)  # rounds to exactly +1 grey level everywhere
    assert metrics.compute()["psnr"] == pytest.approx(20 * math.log10(255), abs=1e-9)


def test_reconstructions_are_clamped_before_scoring() -> None:
    ref = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    ref[:, :, :16] = 255
    originals = _to_float(ref)
    overshoot = originals * 1.5  # beyond [-1, 1] but clamps back to the originals
    metrics = _metrics(compute_fid=False)
    batch = metrics.update(originals, overshoot)
    assert torch.isinf(batch["psnr"]).all()
    assert torch.equal(batch["lpips"], torch.zeros(2))


def test_reconstruction_metrics_accumulate_over_batches() -> None:
    ref = _uint8_images(8)
    rec = _add_noise(ref, 12.0)
    originals, reconstructions = _to_float(ref), _to_float(rec)

    split = _metrics()
    split.update(originals[:3], reconstructions[:3])
    split.update(originals[3:], reconstructions[3:])
    whole = _metrics()
    whole.update(originals, reconstructions)
    a, b = split.compute(), whole.compute()
    assert set(a) == {"psnr", "ssim", "lpips", "rfid", "num_images"}
    assert a["num_images"] == b["num_images"] == 8
    for key in ("psnr", "ssim", "lpips", "rfid"):
        assert a[key] == pytest.approx(b[key], rel=1e-5), key
    assert a["psnr"] == pytest.approx(psnr(ref, rec).mean().item(), rel=1e-12)
    assert a["ssim"] == pytest.approx(ssim(ref, rec).mean().item(), rel=1e-12)
    assert 0 < a["ssim"] < 1 and a["lpips"] > 0 and a["rfid"] > 0


def test_reconstruction_metrics_switches() -> None:
    metrics = ReconstructionMetrics(compute_fid=False, compute_lpips=False)  # builds no network at all
    assert metrics.fid is None and metrics.lpips is None
    with pytest.raises(ValueError, match="update"):
        metrics.compute()
    ref = _uint8_images(1)
    metrics.update(_to_float(ref), _to_float(ref))
    assert set(metrics.compute()) == {"psnr", "ssim", "num_images"}
    with pytest.raises(ValueError, match="shape"):
        metrics.update(_to_float(ref), _to_float(_uint8_images(2)))
