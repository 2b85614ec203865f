"""SSDDAutoencoder as a drop-in VAE of diffusers pipelines (DiT here: it decodes without a generator)."""

from __future__ import annotations

import numpy as np
import torch
from conftest import perturb_, tiny_config
from diffusers import DDIMScheduler, DiffusionPipeline, DiTPipeline, DiTTransformer2DModel

from ssdd_diffusers import SSDDAutoencoder


def _pipeline() -> DiTPipeline:
    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=1,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=10,
        norm_num_groups=32,
    ).eval()  # from_pretrained returns eval-mode modules; a fresh one is in train mode
    vae = perturb_(SSDDAutoencoder(**tiny_config(scaling_factor=0.5))).eval()
    return DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler())


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
