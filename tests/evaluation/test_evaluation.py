"""Evaluation library + ``ssdd-evaluate`` CLI, and latent statistics + ``ssdd-latent-stats``.

Everything runs offline: tiny SSDD and AutoencoderKL models saved to tmp folders, generated images, a
tiny injected FID feature extractor and LPIPS with a random backbone.
"""

from __future__ import annotations

import json
import math
import mmap
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.configs import perturb_, tiny_autoencoder_kl, tiny_config
from PIL import Image
from torch import nn

from ssdd_diffusers import SSDDAutoencoder
from ssdd_diffusers import evaluation as ev
from ssdd_diffusers.cli import evaluate_main, latent_stats_main
from ssdd_diffusers.evaluation import (
    KL_CLASS_NAME,
    SSDD_CLASS_NAME,
    LoadedAutoencoder,
    MetricSettings,
    PeakMemoryMeter,
    detect_model_class,
    evaluate_models,
    parse_model_spec,
    shared_noise,
)
from ssdd_diffusers.evaluation.latent_stats import RunningMoments, compute_latent_stats

RESOLUTION = 32
NUM_IMAGES = 5

pytestmark = pytest.mark.filterwarnings("ignore:LPIPS is built with a RANDOMLY INITIALISED")


class TinyFeatures(nn.Module):
    """Stand-in FID features: fixed random 8x8/stride-8 conv + ReLU + global average pool, 6-d."""

    num_features = 6

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, self.num_features, kernel_size=8, stride=8)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=generator) * 0.1)
            self.conv.bias.zero_()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> (B, 6)."""
        return torch.relu(self.conv(images.float() / 127.5 - 1.0)).mean(dim=(2, 3))


# ----------------------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------------------
def _image(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    width, height = size
    yy, xx = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
    channels = [
        0.5
        + 0.4 * np.sin(2 * np.pi * (rng.uniform(0.5, 2) * xx + rng.uniform(0.5, 2) * yy) + rng.uniform(0, 6))
        for _ in range(3)
    ]
    array = np.clip(np.stack(channels, -1) + rng.normal(0, 0.05, (height, width, 3)), 0, 1)
    return Image.fromarray((array * 255).astype(np.uint8), mode="RGB")


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Generated images of different sizes (resized + centre-cropped to 32 px), one of them corrupt."""
    root = tmp_path_factory.mktemp("images")
    for i in range(NUM_IMAGES):
        _image(i, (40 + 4 * i, 36)).save(root / f"img_{i}.png")
    (root / "broken.png").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def ssdd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = perturb_(SSDDAutoencoder(**tiny_config()), seed=1)
    path = tmp_path_factory.mktemp("ssdd") / "tiny-ssdd"
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def kl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = tiny_autoencoder_kl(levels=2, sample_size=RESOLUTION)
    path = tmp_path_factory.mktemp("kl") / "tiny-kl"
    model.save_pretrained(path)
    return path


def _load_images(image_dir: Path) -> torch.Tensor:
    dataset = ev.build_eval_dataset(RESOLUTION, data_dir=image_dir)
    return torch.stack([dataset[i]["pixel_values"] for i in range(len(dataset)) if dataset[i] is not None])


# ----------------------------------------------------------------------------------------------------
# Specs and loading
# ----------------------------------------------------------------------------------------------------
def test_parse_model_spec_variants() -> None:
    spec = parse_model_spec("ssdd:some/folder@steps=1@label=One step")
    assert (spec.path, spec.class_name, spec.num_inference_steps, spec.label) == (
        "some/folder",
        SSDD_CLASS_NAME,
        1,
        "One step",
    )
    spec = parse_model_spec("kl:stabilityai/sd-vae-ft-ema", steps=4, label="SD-VAE")
    assert (spec.path, spec.class_name, spec.num_inference_steps, spec.label) == (
        "stabilityai/sd-vae-ft-ema",
        KL_CLASS_NAME,
        4,
        "SD-VAE",
    )
    spec = parse_model_spec("org/pipe@subfolder=vae@steps=default", steps=3)
    assert (spec.path, spec.class_name, spec.subfolder, spec.num_inference_steps) == (
        "org/pipe",
        None,
        "vae",
        None,
    )
    assert parse_model_spec("AutoencoderKL:x").class_name == KL_CLASS_NAME
    assert parse_model_spec("user@host/dir").path == "user@host/dir"  # '@' that is not an option
    with pytest.raises(ValueError, match="unknown model kind"):
        parse_model_spec("vqgan:x")
    with pytest.raises(ValueError, match=">= 1"):
        parse_model_spec("x@steps=0")


def test_detect_model_class_from_config_and_pipeline_folder(
    ssdd_dir: Path, kl_dir: Path, tmp_path: Path
) -> None:
    assert detect_model_class(str(ssdd_dir)) == (SSDD_CLASS_NAME, None)
    assert detect_model_class(str(kl_dir)) == (KL_CLASS_NAME, None)
    pipeline = tmp_path / "pipeline"
    (pipeline / "vae").mkdir(parents=True)
    (pipeline / "model_index.json").write_text("{}")
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        (pipeline / "vae" / name).write_bytes((kl_dir / name).read_bytes())
    assert detect_model_class(str(pipeline)) == (KL_CLASS_NAME, "vae")
    loaded = ev.load_autoencoder(str(pipeline))
    assert loaded.class_name == KL_CLASS_NAME and loaded.num_inference_steps is None


# ----------------------------------------------------------------------------------------------------
# CLI end to end
# ----------------------------------------------------------------------------------------------------
def test_evaluate_cli_end_to_end(ssdd_dir: Path, kl_dir: Path, image_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    report = evaluate_main(
        [
            f"{ssdd_dir}@label=SSDD 2-step",
            str(ssdd_dir),
            f"kl:{kl_dir}",
            "--steps", "2", "1", "default",
            "--data_dir", str(image_dir),
            "--resolution", str(RESOLUTION),
            "--batch_size", "2",
            "--num_workers", "0",
            "--device", "cpu",
            "--lpips_backbone", "random",
            "--grid_images", "3",
            "--warmup_batches", "0",
            "--output_dir", str(out),
            "--no_progress",
        ],
        fid_feature_extractor=TinyFeatures(),
    )  # fmt: skip
    data = json.loads((out / "metrics.json").read_text())
    labels = [m["label"] for m in data["models"]]
    assert labels == ["SSDD 2-step", "tiny-ssdd (1 step)", "tiny-kl"]
    assert [m["num_inference_steps"] for m in data["models"]] == [2, 1, None]
    assert [m["class_name"] for m in data["models"]] == [SSDD_CLASS_NAME, SSDD_CLASS_NAME, KL_CLASS_NAME]
    assert data["num_skipped_images"] == 1
    for model in data["models"]:
        assert model["num_images"] == NUM_IMAGES
        for key in ("psnr", "ssim", "lpips", "rfid"):
            assert isinstance(model["metrics"][key], float) and math.isfinite(model["metrics"][key]), key
        assert model["images_per_second"] > 0
        assert model["memory_metric"] in ("cpu_peak_rss_delta", "not_measured")
    assert data["settings"]["fid_features"] == "custom:TinyFeatures"
    assert data["grid_rows"] == ["originals", *labels]

    markdown = (out / "metrics.md").read_text()
    assert markdown.count("\n| ") == 3 and "FD* ↓" in markdown and "RANDOM AlexNet" in markdown
    for label in labels:
        assert f"| {label} |" in markdown

    grid = Image.open(out / "reconstructions.png")
    pad = 2
    assert grid.size == (3 * (RESOLUTION + pad) + pad, (1 + 3) * (RESOLUTION + pad) + pad)
    # first row = originals, quantised exactly as the metrics see them
    first = np.asarray(grid)[pad : pad + RESOLUTION, pad : pad + RESOLUTION]
    originals = _load_images(image_dir)
    expected = ((originals[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(first, expected)
    assert report.result("tiny-kl").metrics == data["models"][2]["metrics"]


def test_same_model_twice_gives_identical_metrics_and_reference_reconstructions(
    ssdd_dir: Path, kl_dir: Path, image_dir: Path
) -> None:
    images = _load_images(image_dir)[:3]
    settings = MetricSettings(lpips_backbone="random", fid_feature_extractor=TinyFeatures())
    report = evaluate_models(
        [f"{ssdd_dir}@steps=2", f"{ssdd_dir}@steps=2", f"{kl_dir}"],
        images,
        batch_size=2,
        device="cpu",
        metrics=settings,
        grid_images=3,
        warmup_batches=0,
        progress=False,
        seed=7,
    )
    first, second, kl = report.results
    assert second.label == first.label + " #2"
    assert first.metrics == second.metrics
    assert torch.equal(report.grid_reconstructions[first.label], report.grid_reconstructions[second.label])

    # SSDD: posterior mode + shared noise of each batch; AutoencoderKL: decode(encode(x).mode())
    vae = SSDDAutoencoder.from_pretrained(ssdd_dir).eval()
    from diffusers import AutoencoderKL

    kl_model = AutoencoderKL.from_pretrained(kl_dir).eval()
    with torch.no_grad():
        ssdd_expected, kl_expected = [], []
        for index, batch in enumerate(images.split(2)):
            z = vae.encode(batch).latent_dist.mode()
            noise = shared_noise(batch.shape, 7, index)
            ssdd_expected.append(vae.decode(z, num_inference_steps=2, noise=noise).sample)
            kl_expected.append(kl_model.decode(kl_model.encode(batch).latent_dist.mode()).sample)
    to_u8 = ev.to_uint8
    assert torch.equal(report.grid_reconstructions[first.label], to_u8(torch.cat(ssdd_expected)))
    assert torch.equal(report.grid_reconstructions[kl.label], to_u8(torch.cat(kl_expected)))
    assert kl.num_inference_steps is None


def test_cli_feature_extractor_reference_and_no_fid(ssdd_dir: Path, image_dir: Path, tmp_path: Path) -> None:
    common = [str(ssdd_dir), "--data_dir", str(image_dir), "--resolution", str(RESOLUTION), "--device", "cpu"]
    common += ["--num_workers", "0", "--lpips_backbone", "none", "--no_progress", "--max_samples", "3"]
    common += ["--warmup_batches", "0"]
    report = evaluate_main(
        [
            *common,
            "--fid_feature_extractor",
            "test_evaluation:TinyFeatures",
            "--output_dir",
            str(tmp_path / "a"),
        ]
    )
    result = report.results[0]
    assert result.num_images == 2  # --max_samples takes the first 3 files; broken.png sorts first
    assert result.metrics["lpips"] is None and math.isfinite(result.metrics["rfid"])
    report = evaluate_main([*common, "--fid_feature_extractor", "none", "--output_dir", str(tmp_path / "b")])
    assert report.results[0].metrics["rfid"] is None
    assert "n/a" in (tmp_path / "b" / "metrics.md").read_text()


def test_unavailable_metric_weights_are_reported_not_fatal(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("no network")

    monkeypatch.setattr(ev.metrics, "LPIPSMetric", offline)
    torch.manual_seed(0)
    model = LoadedAutoencoder.from_model(perturb_(SSDDAutoencoder(**tiny_config())), label="m")
    images = torch.rand(2, 3, RESOLUTION, RESOLUTION) * 2 - 1
    settings = MetricSettings(compute_fid=False, skip_unavailable=True)
    report = evaluate_models(
        [model], images, device="cpu", metrics=settings, progress=False, warmup_batches=0
    )
    assert report.results[0].metrics["lpips"] is None and "lpips" in report.unavailable_metrics
    assert "lpips: n/a (weights unavailable (OSError))" in report.to_markdown()


def test_peak_memory_meter_cpu() -> None:
    meter = PeakMemoryMeter("cpu")
    meter.set_baseline()
    meter.start()
    # 64 MiB of fresh anonymous pages, touched: resident whatever memory malloc kept from earlier tests
    block = mmap.mmap(-1, 64 * 2**20)
    np.frombuffer(block, dtype=np.uint8)[:] = 1
    meter.stop()
    block.close()
    if meter.kind == "cpu_peak_rss_delta":
        assert meter.peak_mb is not None and meter.peak_mb >= 60
    else:
        assert meter.kind == "not_measured" and meter.peak_mb is None


# ----------------------------------------------------------------------------------------------------
# Latent statistics
# ----------------------------------------------------------------------------------------------------
def test_running_moments_match_torch_over_uneven_chunks() -> None:
    values = torch.randn(1000, 3, dtype=torch.float64) * torch.tensor([1.0, 5.0, 0.1]) + torch.tensor(
        [3.0, -2, 1e3]
    )
    moments = RunningMoments(3)
    for chunk in values.split([1, 10, 400, 589]):
        moments.update(chunk)
    torch.testing.assert_close(moments.mean, values.mean(0))
    torch.testing.assert_close(moments.variance().sqrt(), values.std(0, unbiased=False))


def test_latent_stats_cli_matches_direct_computation_and_reloads(
    ssdd_dir: Path, image_dir: Path, tmp_path: Path
) -> None:
    model_dir = tmp_path / "model"
    SSDDAutoencoder.from_pretrained(ssdd_dir).save_pretrained(model_dir)
    weights = (model_dir / "diffusion_pytorch_model.safetensors").read_bytes()
    common = [
        str(model_dir),
        "--data_dir",
        str(image_dir),
        "--resolution",
        str(RESOLUTION),
        "--batch_size",
        "2",
    ]
    common += ["--num_workers", "0", "--device", "cpu", "--no_progress"]

    before = json.loads((model_dir / "config.json").read_text())
    latent_stats_main([*common, "--no_write"])
    assert json.loads((model_dir / "config.json").read_text()) == before

    stats = latent_stats_main([*common, "--stats_json", str(tmp_path / "stats.json")])
    vae = SSDDAutoencoder.from_pretrained(model_dir).eval()
    with torch.no_grad():
        z = vae.encode(_load_images(image_dir)).latent_dist.mode().double()
    mean = z.mean(dim=(0, 2, 3))
    std = z.transpose(0, 1).reshape(z.shape[1], -1).std(dim=1, unbiased=False)
    torch.testing.assert_close(
        torch.tensor(vae.config.latents_mean, dtype=torch.float64), mean, rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(
        torch.tensor(vae.config.latents_std, dtype=torch.float64), std, rtol=1e-5, atol=1e-6
    )
    assert vae.config.shift_factor == pytest.approx(z.mean().item(), rel=1e-5, abs=1e-6)
    assert vae.config.scaling_factor == pytest.approx(1.0 / z.std(unbiased=False).item(), rel=1e-5)
    assert stats.num_images == NUM_IMAGES and stats.num_values == z.numel()
    assert (model_dir / "diffusion_pytorch_model.safetensors").read_bytes() == weights  # weights untouched
    assert json.loads((tmp_path / "stats.json").read_text())["scaling_factor"] == pytest.approx(
        stats.scaling_factor
    )

    # --output_dir: save_pretrained a copy with the new config
    out = tmp_path / "copy"
    latent_stats_main([*common, "--output_dir", str(out), "--max_samples", "2"])
    copy = SSDDAutoencoder.from_pretrained(out)
    assert copy.config.latents_mean != vae.config.latents_mean and len(copy.config.latents_std) == 4


def test_latent_stats_of_autoencoder_kl(kl_dir: Path, image_dir: Path) -> None:
    from diffusers import AutoencoderKL

    model = AutoencoderKL.from_pretrained(kl_dir).eval()
    images = _load_images(image_dir)
    stats = compute_latent_stats(model, images.split(2), progress=False)
    with torch.no_grad():
        z = model.encode(images).latent_dist.mode().double()
    assert stats.scalar_std == pytest.approx(z.std(unbiased=False).item(), rel=1e-5)
    assert stats.config_updates()["shift_factor"] == pytest.approx(z.mean().item(), rel=1e-5, abs=1e-6)


class MeanAbsoluteDistance(nn.Module):
    """A stand-in perceptual distance: (B, 3, H, W) x2 in [-1, 1] -> (B,) mean absolute difference."""

    def forward(self, reference: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
        return (reference - reconstruction).abs().flatten(1).mean(1)


def test_custom_perceptual_distance_and_memory_column(tmp_path: Path) -> None:
    """A custom distance is reported as LPIPS* with a note; in-memory models on CPU have no meaningful
    memory baseline, so the report leaves the memory column out; the JSON carries its Markdown table."""
    torch.manual_seed(0)
    model = LoadedAutoencoder.from_model(perturb_(SSDDAutoencoder(**tiny_config())), label="m")
    images = torch.rand(3, 3, RESOLUTION, RESOLUTION, generator=torch.Generator().manual_seed(0)) * 2 - 1
    settings = MetricSettings(compute_fid=False, lpips_distance=MeanAbsoluteDistance())
    report = evaluate_models(
        [model], images, device="cpu", metrics=settings, progress=False, warmup_batches=0
    )
    result = report.results[0]
    reconstruction = model.reconstruct(images, shared_noise(images.shape, 0, 0))
    quantised = ev.to_uint8(reconstruction).float() / 127.5 - 1
    expected = (ev.to_uint8(images).float() / 127.5 - 1 - quantised).abs().mean()
    assert result.metrics["lpips"] == pytest.approx(float(expected), rel=1e-5)
    assert result.memory_metric == "not_measured" and result.peak_memory_mb is None
    markdown = report.to_markdown()
    assert "LPIPS* ↓" in markdown and "custom:MeanAbsoluteDistance" in markdown
    assert "Peak memory" not in markdown
    assert report.to_dict()["markdown"] == markdown
    assert report.settings["lpips_backbone"] == "custom:MeanAbsoluteDistance"
