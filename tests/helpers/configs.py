"""Tiny model configurations, each defined once for the whole suite, and the paths of the test data."""

from __future__ import annotations

from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parents[1]
FIXTURES = TESTS / "fixtures"
#: Large reference files kept next to the checkout (``<parent of the repository>/shared/reference``).
SHARED_REFERENCE = TESTS.parents[1] / "shared" / "reference"


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


def _json_ready(config: dict) -> dict:
    return {key: list(value) if isinstance(value, tuple) else value for key, value in config.items()}


#: SSDDAutoencoder overrides (JSON-serialisable, for ``--model_config``) for an f2 encoder and the 4-level
#: tiny decoder of ``tiny_config`` (mid grid = H/8); used with ``from_preset("f8c4", decoder="M", ...)``.
TINY_MODEL_CONFIG = _json_ready(
    tiny_config(block_out_channels=(32, 32), norm_num_groups=32, num_inference_steps=4)
)

#: ``UViTDecoder`` alone: two levels (factor 2), one transformer layer, window 2.
TWO_LEVEL_DECODER_CONFIG = dict(block_out_channels=(32, 64), transformer_layers=1, attention_window=2)

#: ``UViTDecoder`` alone: four levels (factor 8), one ResNet per down level, one transformer layer, window 4.
FOUR_LEVEL_DECODER_CONFIG = dict(
    block_out_channels=(32, 32, 32, 64), layers_per_block=1, transformer_layers=1, attention_window=4
)


def perturb_(model: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Add noise to every parameter so that zero-initialised branches (and bias tables) matter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p.dtype) * scale)
    return model


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
