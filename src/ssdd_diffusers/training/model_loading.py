"""The models a training run starts from: a fresh preset, a saved SSDD model to fine-tune, a fresh decoder on
a pretrained (SSDD or diffusers ``AutoencoderKL``) encoder, or the frozen teacher of a distillation."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..evaluation.specs import load_pretrained, locate_model
from ..models import SSDDAutoencoder
from ..presets import decoder_preset

ENCODER_CONFIG_KEYS = (
    "in_channels",
    "latent_channels",
    "block_out_channels",
    "layers_per_block",
    "double_z",
    "norm_num_groups",
    "scaling_factor",
    "shift_factor",
    "latents_mean",
    "latents_std",
)
"""Config keys that a pretrained encoder fixes (``--model_config`` may not override them)."""


def config_overrides(value: str | None) -> dict[str, Any]:
    """``--model_config``: a JSON object, or the path of a ``.json`` file holding one."""
    if not value:
        return {}
    path = Path(value)
    text = path.read_text() if value.endswith(".json") and path.is_file() else value
    overrides = json.loads(text)
    if not isinstance(overrides, dict):
        raise ValueError("--model_config must be a JSON object")
    return overrides


def load_ssdd(path: str, subfolder: str | None = None) -> SSDDAutoencoder:
    """A saved SSDD model: a model folder, a training checkpoint (its EMA weights, ``vae_ema/``, first)
    or a Hub repo, located with :func:`~ssdd_diffusers.evaluation.specs.locate_model`."""
    return load_pretrained(path, subfolder, class_name="SSDDAutoencoder")


def build_model(args: argparse.Namespace) -> tuple[nn.Module, str]:
    """The model to train and a description of where it came from."""
    overrides = config_overrides(args.model_config)
    if args.prediction_type is not None:
        overrides["prediction_type"] = args.prediction_type
    if args.pretrained_model_name_or_path:
        vae = load_ssdd(args.pretrained_model_name_or_path, args.pretrained_model_subfolder)
        return vae, args.pretrained_model_name_or_path
    if args.distill:
        teacher_path = args.teacher_model_name_or_path
        return load_ssdd(teacher_path, args.teacher_subfolder), teacher_path
    if args.decoder_type == "kl" and args.pretrained_encoder:
        return kl_decoder_on_pretrained_encoder(args), args.pretrained_encoder
    if args.decoder_type == "kl":
        from diffusers import AutoencoderKL

        return AutoencoderKL(**overrides), ""
    if args.pretrained_encoder:
        return model_on_pretrained_encoder(args, overrides), args.pretrained_encoder
    return SSDDAutoencoder.from_preset(args.encoder, decoder=args.decoder, **overrides), ""


def model_on_pretrained_encoder(args: argparse.Namespace, overrides: dict[str, Any]) -> SSDDAutoencoder:
    """A fresh ``--decoder`` preset on the frozen encoder of ``--pretrained_encoder``."""
    from diffusers import AutoencoderKL

    source = args.pretrained_encoder
    fixed = sorted(k for k in overrides if k in ENCODER_CONFIG_KEYS)
    if fixed:
        raise ValueError(
            f"--model_config sets encoder keys {fixed}, but --pretrained_encoder fixes the encoder; "
            "pass only decoder and sampling keys."
        )
    config, subfolder = locate_model(source, args.pretrained_encoder_subfolder)
    class_name = config.get("_class_name")
    if class_name == "AutoencoderKL":
        kl = AutoencoderKL.from_pretrained(source, subfolder=subfolder)
        vae = SSDDAutoencoder.from_autoencoder_kl(kl, decoder=args.decoder, **overrides)
        return vae.to(torch.float32)
    if class_name == "SSDDAutoencoder":
        src = SSDDAutoencoder.from_pretrained(source, subfolder=subfolder)
        encoder_config = {k: src.config[k] for k in ENCODER_CONFIG_KEYS if k in src.config}
        vae = SSDDAutoencoder(**{**encoder_config, **decoder_preset(args.decoder), **overrides})
        vae.encoder.load_state_dict(src.encoder.state_dict())
        vae.quant_conv.load_state_dict(src.quant_conv.state_dict())
        return vae
    raise ValueError(f"--pretrained_encoder {source!r} holds a {class_name}; expected AutoencoderKL or SSDD.")


def kl_decoder_on_pretrained_encoder(args: argparse.Namespace) -> nn.Module:
    """``--decoder_type kl``: the ``--pretrained_encoder`` AutoencoderKL with a freshly initialised decoder
    and ``post_quant_conv`` (same configuration), its encoder and ``quant_conv`` weights kept."""
    from diffusers import AutoencoderKL

    config, subfolder = locate_model(args.pretrained_encoder, args.pretrained_encoder_subfolder)
    if config.get("_class_name") != "AutoencoderKL":
        raise ValueError(
            f"--decoder_type kl needs an AutoencoderKL as --pretrained_encoder; {args.pretrained_encoder!r} "
            f"holds a {config.get('_class_name')}."
        )
    source = AutoencoderKL.from_pretrained(args.pretrained_encoder, subfolder=subfolder)
    model = AutoencoderKL.from_config(source.config)
    model.encoder.load_state_dict(source.encoder.state_dict())
    if source.quant_conv is not None:
        model.quant_conv.load_state_dict(source.quant_conv.state_dict())
    return model.to(torch.float32)


def load_teacher(args: argparse.Namespace) -> SSDDAutoencoder:
    """Frozen teacher in eval mode (EMA weights of a checkpoint folder when present)."""
    teacher = load_ssdd(args.teacher_model_name_or_path, args.teacher_subfolder)
    teacher.requires_grad_(False)
    return teacher.eval()
