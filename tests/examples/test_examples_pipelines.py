"""examples/dit_with_ssdd.py and examples/sd_with_ssdd.py on tiny local pipelines (no download)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DiffusionPipeline
from helpers.configs import perturb_, tiny_autoencoder_kl, tiny_config
from helpers.pipelines import tiny_dit_pipeline, tiny_sd_pipeline
from PIL import Image

from ssdd_diffusers import SSDDAutoencoder

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
DECODER_KEYS = {
    k: v for k, v in tiny_config().items() if k.startswith("decoder_") or k == "num_inference_steps"
}


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny f4 AutoencoderKL, DiT and SD pipelines saved with it, and an SSDD model on its encoder."""
    root = tmp_path_factory.mktemp("example_models")
    kl = tiny_autoencoder_kl(scaling_factor=0.5)
    tiny_dit_pipeline(kl).save_pretrained(root / "dit")
    tiny_sd_pipeline(kl, root / "tokenizer_src").save_pretrained(root / "sd")
    ssdd = perturb_(SSDDAutoencoder.from_autoencoder_kl(kl, decoder="XS", **DECODER_KEYS))
    ssdd.save_pretrained(root / "ssdd")
    return {"dit": root / "dit", "sd": root / "sd", "ssdd": root / "ssdd"}


def _dit_images(pipe) -> list:
    """The example's DiT run (classes 1 and 3, 2 steps, no guidance, seed 0)."""
    generator = torch.Generator().manual_seed(0)
    return pipe(class_labels=[1, 3], num_inference_steps=2, guidance_scale=1.0, generator=generator).images


def test_dit_example_decodes_with_ssdd_and_swaps_vaes(models: dict[str, Path], tmp_path: Path) -> None:
    output = tmp_path / "dit.png"
    common = ["--dit", str(models["dit"]), "--classes", "1", "3", "--steps", "2", "--guidance_scale", "1.0"]
    kl_row, ssdd_row = _load("dit_with_ssdd").main(
        ["--ssdd", str(models["ssdd"]), *common, "--compare", "--device", "cpu", "--dtype", "fp32",
         "--output", str(output)]
    )  # fmt: skip
    assert Image.open(output).size == (2 * 32, 2 * 32)
    # The KL row is exactly what the saved pipeline produces with its own VAE, same seed.
    reference = DiffusionPipeline.from_pretrained(models["dit"])
    expected = _dit_images(reference)
    for got, want in zip(kl_row, expected):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # The SSDD row decodes the same latents with the SSDD decoder (a different image, same size).
    reference.vae = SSDDAutoencoder.from_pretrained(models["ssdd"])
    with_ssdd = _dit_images(reference)
    for got, want in zip(ssdd_row, with_ssdd):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert np.abs(np.asarray(ssdd_row[0], dtype=float) - np.asarray(kl_row[0], dtype=float)).max() > 1


def test_sd_example_decodes_with_ssdd(models: dict[str, Path], tmp_path: Path) -> None:
    output = tmp_path / "sd.png"
    kl_row, ssdd_row = _load("sd_with_ssdd").main(
        ["--ssdd", str(models["ssdd"]), "--model", str(models["sd"]), "--prompt", "a photo of a cat",
         "a dog", "--height", "32", "--width", "32", "--steps", "2", "--guidance_scale", "1.0", "--compare",
         "--device", "cpu", "--dtype", "fp32", "--output", str(output)]
    )  # fmt: skip
    assert Image.open(output).size == (2 * 32, 2 * 32)
    assert len(kl_row) == len(ssdd_row) == 2
    assert all(image.size == (32, 32) for image in kl_row + ssdd_row)
    assert np.abs(np.asarray(ssdd_row[0], dtype=float) - np.asarray(kl_row[0], dtype=float)).max() > 1


def test_sd_example_rejects_mismatched_downsampling(models: dict[str, Path], tmp_path: Path) -> None:
    f8 = SSDDAutoencoder(**tiny_config(block_out_channels=(32, 32, 32, 32)))
    f8.save_pretrained(tmp_path / "f8")
    with pytest.raises(SystemExit, match="downsampling f8 vs f4"):
        _load("sd_with_ssdd").main(
            ["--ssdd", str(tmp_path / "f8"), "--model", str(models["sd"]), "--device", "cpu",
             "--dtype", "fp32", "--height", "32", "--width", "32", "--steps", "1",
             "--output", str(tmp_path / "x.png")]
        )  # fmt: skip


def test_check_replaces_pipeline_vae_names_each_mismatch(models: dict[str, Path], tmp_path: Path) -> None:
    from ssdd_diffusers.interop import check_replaces_pipeline_vae, latent_space_mismatches

    good = SSDDAutoencoder.from_pretrained(models["ssdd"])
    check_replaces_pipeline_vae(good, models["dit"])  # built with from_autoencoder_kl: no error
    other = SSDDAutoencoder(**tiny_config(latent_channels=8, scaling_factor=0.3, shift_factor=0.1))
    reference = AutoencoderKL.load_config(models["dit"], subfolder="vae")
    assert latent_space_mismatches(other, reference) == [
        "latent channels 8 vs 4",
        "scaling_factor 0.3 vs 0.5",
        "shift_factor 0.1 vs None",
    ]
    with pytest.raises(ValueError, match="does not share the latent space .* latent channels 8 vs 4"):
        check_replaces_pipeline_vae(other, models["dit"])
    with pytest.raises(SystemExit, match="error: .*scaling_factor 0.3 vs 0.5"):
        other.save_pretrained(tmp_path / "other")
        _load("dit_with_ssdd").main(["--ssdd", str(tmp_path / "other"), "--dit", str(models["dit"])])
