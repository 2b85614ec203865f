"""A tiny randomly initialised DINOv2 (stand-in for dinov2-base in the REPA tests)."""

from __future__ import annotations

from pathlib import Path

DINO_PATCH = 4
DINO_DIM = 32


def make_tiny_dino(path: Path, image_size: int = 16) -> Path:
    """A randomly initialised tiny DINOv2 saved with ``save_pretrained`` (stand-in for dinov2-base);
    ``image_size`` sets the size of its position-embedding table."""
    import torch
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(
        hidden_size=DINO_DIM,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        patch_size=DINO_PATCH,
        image_size=image_size,
    )
    torch.manual_seed(0)
    Dinov2Model(config).save_pretrained(path)
    return path
