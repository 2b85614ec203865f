"""Checks for using an SSDD model in place of another pipeline's VAE."""

from __future__ import annotations

import os
from typing import Any

FACTOR_KEYS = ("scaling_factor", "shift_factor")


def _factor(config: dict[str, Any]) -> int:
    return 2 ** (len(config["block_out_channels"]) - 1)


def latent_space_mismatches(vae: Any, reference_config: dict[str, Any]) -> list[str]:
    """Differences between ``vae``'s latent space and a reference VAE config (e.g. a pipeline's ``vae``).

    Compares latent channels, spatial downsampling factor, ``scaling_factor`` and ``shift_factor``; an empty
    list means a denoiser trained on the reference latents can be decoded by ``vae``.
    """
    ours = dict(vae.config)
    problems = []
    if ours["latent_channels"] != reference_config.get("latent_channels"):
        problems.append(
            f"latent channels {ours['latent_channels']} vs {reference_config.get('latent_channels')}"
        )
    if _factor(ours) != _factor(reference_config):
        problems.append(f"downsampling f{_factor(ours)} vs f{_factor(reference_config)}")
    for key in FACTOR_KEYS:
        if ours.get(key) != reference_config.get(key):
            problems.append(f"{key} {ours.get(key)} vs {reference_config.get(key)}")
    return problems


def check_replaces_pipeline_vae(
    vae: Any, pipeline_name_or_path: str | os.PathLike, subfolder: str = "vae", **load_kwargs: Any
) -> None:
    """Raise ``ValueError`` unless ``vae`` decodes the latent space of the pipeline's own VAE.

    Reads only the pipeline VAE's ``config.json`` (no weights). ``load_kwargs`` go to ``load_config``
    (``revision``, ``token``, ``cache_dir``, ...).
    """
    from diffusers import AutoencoderKL

    reference = AutoencoderKL.load_config(pipeline_name_or_path, subfolder=subfolder, **load_kwargs)
    problems = latent_space_mismatches(vae, reference)
    if problems:
        raise ValueError(
            f"{type(vae).__name__} does not share the latent space of {pipeline_name_or_path}/{subfolder}: "
            + "; ".join(problems)
            + ". Build it with SSDDAutoencoder.from_autoencoder_kl on that VAE (and train its decoder)."
        )
