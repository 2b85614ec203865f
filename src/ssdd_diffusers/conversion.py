"""Reading upstream SSDD checkpoints: key renaming and config inference from tensor shapes.

Upstream encoder keys use the LDM layout (``encoder.down.{i}.block.{j}``, ``mid.attn_1.q`` as 1x1
convs, ``out_proj``); they are renamed to diffusers' ``Encoder`` layout plus ``quant_conv``. Decoder
keys are kept as they are (``SSDDAutoencoder.decoder`` uses the upstream names).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import torch

_ENCODER_RULES: list[tuple[re.Pattern, str]] = [
    (
        re.compile(r"^encoder\.down\.(\d+)\.block\.(\d+)\.nin_shortcut\."),
        r"encoder.down_blocks.\1.resnets.\2.conv_shortcut.",
    ),
    (re.compile(r"^encoder\.down\.(\d+)\.block\.(\d+)\."), r"encoder.down_blocks.\1.resnets.\2."),
    (
        re.compile(r"^encoder\.down\.(\d+)\.downsample\.conv\."),
        r"encoder.down_blocks.\1.downsamplers.0.conv.",
    ),
    (re.compile(r"^encoder\.mid\.block_1\.nin_shortcut\."), "encoder.mid_block.resnets.0.conv_shortcut."),
    (re.compile(r"^encoder\.mid\.block_1\."), "encoder.mid_block.resnets.0."),
    (re.compile(r"^encoder\.mid\.block_2\."), "encoder.mid_block.resnets.1."),
    (re.compile(r"^encoder\.mid\.attn_1\.norm\."), "encoder.mid_block.attentions.0.group_norm."),
    (re.compile(r"^encoder\.mid\.attn_1\.([qkv])\."), r"encoder.mid_block.attentions.0.to_\1."),
    (re.compile(r"^encoder\.mid\.attn_1\.proj_out\."), "encoder.mid_block.attentions.0.to_out.0."),
    (re.compile(r"^encoder\.norm_out\."), "encoder.conv_norm_out."),
    (re.compile(r"^encoder\.out_proj\."), "quant_conv."),
]

_WRAPPER_KEYS = ("state_dict", "model_ae_ema", "model_ema", "ema", "model", "module")
_PREFIXES = ("module.", "_orig_mod.", "model.", "ssdd.")


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` or torch (``.pt``/``.ckpt``/``.bin``) checkpoint into a flat state dict."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No checkpoint file at {path!r}.")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    return unwrap_state_dict(state)


def unwrap_state_dict(state: Mapping) -> dict[str, torch.Tensor]:
    """Find the SSDD tensors inside common checkpoint wrappers and strip training-time prefixes."""
    while not any(k.startswith(("encoder.", "decoder.")) for k in _strip_all(state)):
        inner = next((state[k] for k in _WRAPPER_KEYS if isinstance(state.get(k), Mapping)), None)
        if inner is None:
            raise ValueError(
                "Not an upstream SSDD checkpoint: could not find SSDD weights ('encoder.*' / 'decoder.*' "
                f"keys), top-level keys are {sorted(state)[:20]}. {_EXPECTED}"
            )
        state = inner
    return {k: v for k, v in _strip_all(state).items() if isinstance(v, torch.Tensor)}


def _strip_all(state: Mapping) -> dict:
    out = {}
    for key, value in state.items():
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def _count(state: Mapping[str, torch.Tensor], pattern: str) -> int:
    regex = re.compile(pattern)
    return len({m.group(1) for k in state if (m := regex.match(k))})


def _describe_layout(state: Mapping[str, torch.Tensor], missing: list[str]) -> str:
    """What a state dict that is not in the upstream SSDD layout looks like, and what to do with it."""
    keys = list(state)

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if has("encoder.down_blocks.") or has("quant_conv."):
        if has("decoder.mid_block.transformer_blocks.") or has("decoder.time_embedding."):
            return (
                "this looks like a diffusers-format SSDDAutoencoder state dict ('encoder.down_blocks.*', "
                "'quant_conv.*' keys), already in the diffusers layout; load a save_pretrained "
                "folder with SSDDAutoencoder.from_pretrained (or such a state dict with "
                "SSDDAutoencoder(**config).load_state_dict)"
            )
        if has("decoder.up_blocks.") or has("post_quant_conv."):
            return (
                "this looks like a diffusers AutoencoderKL state dict, which has no SSDD decoder; build an "
                "SSDD model on its encoder with SSDDAutoencoder.from_autoencoder_kl"
            )
    prefixes = sorted({".".join(k.split(".")[:2]) for k in keys})
    shown = prefixes[:12] + (["..."] if len(prefixes) > 12 else [])
    what = "none of the expected keys" if len(missing) == len(_UPSTREAM_REQUIRED) else f"missing {missing}"
    return f"{what}; its {len(keys)} keys start with {shown}"


_EXPECTED = (
    "Expected the upstream SSDD layout (facebookresearch/SSDD), with keys such as "
    "'encoder.down.0.block.0.conv1.weight', 'encoder.mid.attn_1.q.weight', 'encoder.out_proj.weight', "
    "'decoder.down_blocks.0.resnets.0.conv1.weight' and "
    "'decoder.mid_block.transformer_blocks.0.relative_position_bias.relative_bias_table'."
)
_UPSTREAM_REQUIRED = (
    "encoder.conv_in.weight",
    "encoder.down.0.block.0.conv1.weight",
    "encoder.conv_out.weight",
    "decoder.conv_in.weight",
    "decoder.down_blocks.0.resnets.0.conv1.weight",
    "decoder.mid_block.transformer_blocks.0.relative_position_bias.relative_bias_table",
)
"""Keys every upstream SSDD checkpoint has (encoder in the LDM layout, the decoder's own names)."""


def check_upstream_layout(state: Mapping[str, torch.Tensor]) -> None:
    """Raise a ``ValueError`` saying what was found if ``state`` is not an upstream SSDD state dict (for
    example a diffusers-format ``SSDDAutoencoder`` state dict, or unrelated weights)."""
    missing = [k for k in _UPSTREAM_REQUIRED if k not in state]
    if missing:
        raise ValueError(f"Not an upstream SSDD checkpoint: {_describe_layout(state, missing)}. {_EXPECTED}")


def infer_upstream_config(state: Mapping[str, torch.Tensor]) -> dict:
    """``SSDDAutoencoder`` config values implied by the shapes of an upstream state dict.

    Raises ``ValueError`` if ``state`` is not in the upstream layout (see :func:`check_upstream_layout`)
    or lacks tensors the configuration is read from."""
    check_upstream_layout(state)
    try:
        return _infer_upstream_config(state)
    except (KeyError, IndexError) as error:
        detail = f"missing {error.args[0]!r}" if isinstance(error, KeyError) else str(error)
        raise ValueError(
            f"Incomplete or malformed upstream SSDD checkpoint ({detail}); the configuration cannot be "
            f"inferred from its tensor shapes. {_EXPECTED}"
        ) from error


def _infer_upstream_config(state: Mapping[str, torch.Tensor]) -> dict:
    enc_levels = _count(state, r"^encoder\.down\.(\d+)\.")
    enc_widths = tuple(state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in range(enc_levels))
    enc_blocks = _count(state, r"^encoder\.down\.0\.block\.(\d+)\.")
    enc_out = state["encoder.conv_out.weight"].shape[0]

    dec_latent = state["decoder.conv_in.weight"].shape[1] - 3
    dec_levels = _count(state, r"^decoder\.down_blocks\.(\d+)\.")
    dec_widths = tuple(
        state[f"decoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in range(dec_levels)
    )
    layers = _count(state, r"^decoder\.mid_block\.transformer_blocks\.(\d+)\.")
    table = state["decoder.mid_block.transformer_blocks.0.relative_position_bias.relative_bias_table"]
    window, heads = _table_geometry(table)

    double_z = "encoder.out_proj.weight" in state and state["encoder.out_proj.weight"].shape[0] == enc_out
    latent_channels = enc_out // 2 if enc_out == 2 * dec_latent else enc_out
    if latent_channels != dec_latent:
        raise ValueError(
            f"Encoder produces {enc_out} channels but the decoder expects a {dec_latent}-channel latent."
        )
    return {
        "block_out_channels": enc_widths,
        "layers_per_block": enc_blocks,
        "latent_channels": latent_channels,
        "double_z": double_z and enc_out == 2 * latent_channels,
        "decoder_block_out_channels": dec_widths,
        "decoder_layers_per_block": _count(state, r"^decoder\.down_blocks\.0\.resnets\.(\d+)\."),
        "decoder_transformer_layers": layers,
        "decoder_attention_heads": heads,
        "decoder_attention_window": window,
    }


def _table_geometry(table: torch.Tensor) -> tuple[int, int]:
    """(window, heads) from a bias table, either (2w-1, 2w-1, heads) or flat ((2w-1)^2, heads)."""
    if table.ndim == 3:
        return (table.shape[0] + 1) // 2, table.shape[2]
    side = round(table.shape[0] ** 0.5)
    if table.ndim != 2 or side * side != table.shape[0]:
        raise ValueError(f"Unrecognised relative-position bias table of shape {tuple(table.shape)}.")
    return (side + 1) // 2, table.shape[1]


def convert_upstream_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename upstream keys to ``SSDDAutoencoder`` keys and reshape tensors whose layout differs."""
    converted = {}
    for key, value in state.items():
        new_key = key
        for pattern, replacement in _ENCODER_RULES:
            new_key, n = pattern.subn(replacement, key)
            if n:
                break
        if ".attentions.0.to_" in new_key and new_key.endswith(".weight") and value.ndim == 4:
            value = value[:, :, 0, 0]  # 1x1 conv -> linear
        if new_key.endswith("relative_bias_table") and value.ndim == 2:
            side = round(value.shape[0] ** 0.5)
            value = value.reshape(side, side, value.shape[1])  # compatibility layout -> (2w-1, 2w-1, h)
        converted[new_key] = value
    return converted
