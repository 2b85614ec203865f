"""Shared fixtures: tiny SSDD configurations that run in milliseconds on CPU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

FIXTURES = Path(__file__).parent / "fixtures"
SHARED_REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"


def tiny_config(**overrides) -> dict:
    """f4 encoder (two downsamples) and a 4-level decoder small enough for CPU tests."""
    config = dict(
        block_out_channels=(32, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        decoder_block_out_channels=(32, 32, 64, 64),
        decoder_layers_per_block=1,
        decoder_transformer_layers=2,
        decoder_attention_heads=2,
        decoder_attention_window=4,
        num_inference_steps=2,
        sample_size=32,
    )
    config.update(overrides)
    return config


def perturb_(model: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Add noise to every parameter so that zero-initialised branches (and bias tables) matter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p.dtype) * scale)
    return model


@pytest.fixture
def tiny_vae():
    from ssdd_diffusers import SSDDAutoencoder

    torch.manual_seed(0)
    return perturb_(SSDDAutoencoder(**tiny_config())).eval()


def tiny_autoencoder_kl(levels: int = 3, seed: int = 0, **overrides):
    """A tiny random diffusers AutoencoderKL (LDM layout, 32 channels per level, f = 2 ** (levels - 1))."""
    from diffusers import AutoencoderKL

    config = dict(
        block_out_channels=(32,) * levels,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
    )
    config.update(overrides)
    torch.manual_seed(seed)
    return AutoencoderKL(**config).eval()
