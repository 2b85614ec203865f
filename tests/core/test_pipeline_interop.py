"""SSDDAutoencoder as a drop-in VAE of diffusers pipelines (DiT here: it decodes without a generator)."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import DiffusionPipeline, DiTPipeline
from helpers.configs import perturb_, tiny_config
from helpers.pipelines import tiny_dit_pipeline, tiny_sd_pipeline

from ssdd_diffusers import SSDDAutoencoder


def _pipeline() -> DiTPipeline:
    return tiny_dit_pipeline(perturb_(SSDDAutoencoder(**tiny_config(scaling_factor=0.5))).eval())


def _sd_pipeline(tmp_path):
    return tiny_sd_pipeline(perturb_(SSDDAutoencoder(**tiny_config(scaling_factor=0.5))).eval(), tmp_path)


def _run(pipe: DiTPipeline) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    return pipe(
        class_labels=[1, 3], guidance_scale=1.0, num_inference_steps=2, output_type="np", generator=generator
    ).images


def test_dit_pipeline_decodes_with_ssdd_and_is_reproducible():
    pipe = _pipeline()
    first, second = _run(pipe), _run(pipe)
    assert first.shape == (2, 32, 32, 3)
    np.testing.assert_array_equal(first, second)  # decode() without a generator is deterministic
    assert first.std() > 0.01


def test_pipeline_save_and_reload_keeps_ssdd_vae(tmp_path):
    pipe = _pipeline()
    expected = _run(pipe)
    pipe.save_pretrained(tmp_path)
    model_index = (tmp_path / "model_index.json").read_text()
    assert "SSDDAutoencoder" in model_index and "ssdd_diffusers" in model_index
    reloaded = DiffusionPipeline.from_pretrained(tmp_path)
    assert isinstance(reloaded.vae, SSDDAutoencoder)
    assert reloaded.vae.config.scaling_factor == 0.5
    np.testing.assert_allclose(_run(reloaded), expected, atol=1e-5)


def test_dit_pipeline_vae_can_be_swapped_in_place():
    """``pipe.vae = other`` (the examples' second pattern) decodes with the new model."""
    pipe = _pipeline()
    before = _run(pipe)
    pipe.vae = perturb_(SSDDAutoencoder(**tiny_config(scaling_factor=0.5)), seed=1).eval()
    after = _run(pipe)
    assert after.shape == before.shape and np.abs(after - before).max() > 1e-3


# Stable Diffusion-style pipeline (text encoder + UNet) with an SSDD VAE
def _run_sd(pipe) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    return pipe(
        ["a photo of a cat"],
        height=32,
        width=32,
        num_inference_steps=2,
        guidance_scale=1.0,
        output_type="np",
        generator=generator,
    ).images


def test_stable_diffusion_pipeline_uses_ssdd_vae(tmp_path):
    pipe = _sd_pipeline(tmp_path)
    assert pipe.vae_scale_factor == pipe.vae.spatial_compression_ratio == 4
    first, second = _run_sd(pipe), _run_sd(pipe)
    assert first.shape == (1, 32, 32, 3) and first.std() > 0.01
    np.testing.assert_array_equal(first, second)  # the pipeline's generator also seeds SSDD's noise

    # The pipeline's own latent -> image path is vae.decode(latents / scaling_factor, generator=...).
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        via_pipeline = pipe.vae.decode(
            latents / pipe.vae.config.scaling_factor,
            return_dict=False,
            generator=torch.Generator().manual_seed(2),
        )[0]
        direct = pipe.vae.decode(latents * 2.0, generator=torch.Generator().manual_seed(2)).sample
    torch.testing.assert_close(via_pipeline, direct, atol=0, rtol=0)
    assert via_pipeline.shape == (1, 3, 32, 32)


def test_stable_diffusion_pipeline_reloads_in_a_fresh_process(tmp_path):
    """A saved pipeline with an SSDD VAE loads through DiffusionPipeline after `import ssdd_diffusers`."""
    import subprocess
    import sys

    pipe = _sd_pipeline(tmp_path)
    expected = _run_sd(pipe)
    pipe.save_pretrained(tmp_path / "pipe")
    np.save(tmp_path / "expected.npy", expected)
    script = f"""
import numpy as np, torch
import ssdd_diffusers
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained({str(tmp_path / "pipe")!r})
assert type(pipe).__name__ == "StableDiffusionPipeline", type(pipe)
assert isinstance(pipe.vae, ssdd_diffusers.SSDDAutoencoder), type(pipe.vae)
images = pipe(["a photo of a cat"], height=32, width=32, num_inference_steps=2, guidance_scale=1.0,
              output_type="np", generator=torch.Generator().manual_seed(0)).images
np.testing.assert_allclose(images, np.load({str(tmp_path / "expected.npy")!r}), atol=1e-5)
print("reloaded", type(pipe.vae).__name__)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "reloaded SSDDAutoencoder" in proc.stdout
