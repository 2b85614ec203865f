"""Named SSDD configurations: encoder ``f{F}c{C}`` strings and decoder sizes XS ... G.

Widths follow upstream SSDD: a decoder level is ``ceil(channels * mult / 32) * 32`` wide.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class DecoderSize:
    """One upstream decoder size: base channels, per-level multipliers, mid-transformer depth, heads."""

    channels: int
    channel_mult: tuple[int, ...]
    transformer_layers: int
    attention_heads: int | None = None  # None: min(16, max(4, mid_width // 64))


DECODER_SIZES: dict[str, DecoderSize] = {
    "XS": DecoderSize(32, (1, 2, 3, 3), 8, 4),
    "S": DecoderSize(48, (1, 2, 3, 3), 8, 4),
    "B": DecoderSize(64, (1, 2, 3, 3), 10),
    "M": DecoderSize(96, (1, 2, 3, 3), 12),
    "L": DecoderSize(96, (1, 2, 4, 4), 16),
    "XL": DecoderSize(128, (1, 2, 4, 4), 16),
    "H": DecoderSize(192, (1, 2, 4, 4), 16),
    "XH": DecoderSize(256, (1, 2, 4, 4), 16),
    "G": DecoderSize(384, (1, 2, 4, 4), 16),
}

_ENCODER_PATTERN = re.compile(r"^f(\d+)c(\d+)$")


def decoder_level_widths(channels: int, channel_mult: tuple[int, ...]) -> tuple[int, ...]:
    """Per-level decoder widths, each rounded up to a multiple of 32 (the GroupNorm group count)."""
    return tuple(int(math.ceil(channels * m / 32) * 32) for m in channel_mult)


def default_attention_heads(mid_width: int) -> int:
    """Upstream head rule when a size does not fix the head count."""
    return min(16, max(4, mid_width // 64))


def decoder_preset(name: str) -> dict:
    """Decoder part of an ``SSDDAutoencoder`` config for a named size (``"XS"`` ... ``"G"``)."""
    key = name.upper()
    if key not in DECODER_SIZES:
        raise ValueError(f"Unknown decoder size {name!r}; expected one of {sorted(DECODER_SIZES)}.")
    size = DECODER_SIZES[key]
    widths = decoder_level_widths(size.channels, size.channel_mult)
    heads = size.attention_heads or default_attention_heads(widths[-1])
    return {
        "decoder_block_out_channels": widths,
        "decoder_layers_per_block": 2,
        "decoder_transformer_layers": size.transformer_layers,
        "decoder_attention_heads": heads,
        "decoder_attention_window": 8,
    }


def encoder_preset(name: str) -> dict:
    """Encoder part of an ``SSDDAutoencoder`` config for ``"f{F}c{C}"`` (F a power of two >= 2)."""
    match = _ENCODER_PATTERN.match(name.lower())
    if match is None:
        raise ValueError(f"Encoder preset must look like 'f8c4' (factor F, latent channels C); got {name!r}.")
    factor, latent_channels = int(match.group(1)), int(match.group(2))
    if factor < 2 or factor & (factor - 1):
        raise ValueError(f"Encoder factor must be a power of two >= 2; got f{factor}.")
    mult = [1, 2] + [4] * (int(math.log2(factor)) - 1)
    return {
        "block_out_channels": tuple(128 * m for m in mult),
        "layers_per_block": 2,
        "latent_channels": latent_channels,
    }


CPU_PRESETS: dict[str, dict] = {
    # f4c4 encoder + a 1.3M-parameter 4-level decoder: learns 64 px reconstructions in minutes on a CPU
    # (the quickstart and the fidelity benchmark). 8 GroupNorm groups: with 32 channels, 32 groups would
    # normalise every channel on its own (1.2 dB worse one-step PSNR on the fidelity validation split).
    "tiny": {
        "block_out_channels": (32, 64, 64),
        "layers_per_block": 1,
        "latent_channels": 4,
        "decoder_block_out_channels": (32, 32, 64, 64),
        "decoder_layers_per_block": 1,
        "decoder_transformer_layers": 2,
        "decoder_attention_heads": 2,
        "decoder_attention_window": 4,
        "decoder_norm_groups": 8,
        "sample_size": 64,
    },
    # An even smaller model at 32 px for smoke runs (``examples/quickstart.py --quick``).
    "micro": {
        "block_out_channels": (32, 32, 32),
        "layers_per_block": 1,
        "latent_channels": 4,
        "decoder_block_out_channels": (32, 32, 64, 64),
        "decoder_layers_per_block": 1,
        "decoder_transformer_layers": 1,
        "decoder_attention_heads": 2,
        "decoder_attention_window": 4,
        "decoder_norm_groups": 8,
        "sample_size": 32,
    },
}
"""Complete ``SSDDAutoencoder`` configs of CPU-sized models, for examples and benchmarks."""
