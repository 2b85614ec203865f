"""``ssdd-diffusers convert``: an upstream SSDD checkpoint into a diffusers model folder."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..torch_utils import DTYPES
from .common import one_line
from .errors import InputError


def _parse_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise InputError(f"--set expects KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def convert_command(args: argparse.Namespace) -> None:
    """Upstream SSDD checkpoint -> diffusers folder (config inferred from the tensor shapes)."""
    import inspect
    import pickle

    from safetensors import SafetensorError

    from ..conversion import load_state_dict_file
    from ..models import SSDDAutoencoder
    from ..weights_files import safetensors_problem

    checkpoint, output = Path(args.checkpoint), Path(args.output_dir)
    if not checkpoint.is_file():
        raise InputError(f"no such checkpoint file: {args.checkpoint!r}")
    if (output / "config.json").exists() and not args.overwrite:
        raise InputError(f"{args.output_dir!r} already holds a model; pass --overwrite to replace it")
    overrides = dict(_parse_override(item) for item in args.set or [])
    for key in ("num_inference_steps", "time_grid_power", "scaling_factor", "shift_factor", "sample_size"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    allowed = set(inspect.signature(SSDDAutoencoder.__init__).parameters) - {"self"}
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise InputError(f"unknown config key(s) {unknown}; valid keys: {sorted(allowed)}")
    try:
        state = load_state_dict_file(checkpoint)
    except (pickle.UnpicklingError, RuntimeError, EOFError, SafetensorError) as error:
        problem = safetensors_problem(checkpoint) if checkpoint.suffix == ".safetensors" else None
        if problem is not None:
            raise InputError(
                f"checkpoint {args.checkpoint!r} is truncated or corrupt ({problem}); re-download it"
            ) from error
        raise InputError(
            f"cannot read checkpoint {args.checkpoint!r}: not a safetensors file nor a tensors-only torch "
            f"checkpoint ({type(error).__name__})"
        ) from error
    except ValueError as error:
        raise InputError(f"cannot convert {args.checkpoint!r}: {one_line(error)}") from error
    try:  # a ValueError says what the weights look like if they are not upstream SSDD weights
        model = SSDDAutoencoder.from_upstream_checkpoint(state, torch_dtype=DTYPES[args.dtype], **overrides)
    except (ValueError, RuntimeError, TypeError) as error:
        raise InputError(f"cannot convert {args.checkpoint!r}: {one_line(error)}") from error
    model.save_pretrained(output)
    params = sum(p.numel() for p in model.parameters())
    config = model.config
    print(
        f"converted {checkpoint} -> {output}: {params / 1e6:.2f}M parameters, encoder "
        f"f{model.spatial_compression_ratio}c{config.latent_channels}, decoder widths "
        f"{list(config.decoder_block_out_channels)}, {config.decoder_transformer_layers} transformer layers, "
        f"{config.num_inference_steps} default step(s), {args.dtype}"
    )
