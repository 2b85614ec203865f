"""Encode -> decode with any diffusers autoencoder, the one place the package reconstructs images.

SSDD models decode from explicit starting noise (``noise``) or a generator; other autoencoders
(``AutoencoderKL``, ``AutoencoderTiny``, ...) decode deterministically and ignore both.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def is_ssdd(model: nn.Module) -> bool:
    """Whether ``model`` decodes by flow-matching sampling (an ``SSDDAutoencoder``)."""
    return hasattr(model, "decoder") and hasattr(getattr(model, "config", None), "time_grid_power")


def encode_latents(
    model: nn.Module, images: Tensor, sample: bool = False, generator: torch.Generator | None = None
) -> Tensor:
    """Latents (B, C, h, w) of ``images`` (B, 3, H, W) in [-1, 1], in the model's device and dtype:
    the posterior mode, or a posterior sample drawn with ``generator`` when ``sample``."""
    parameter = next(model.parameters())
    encoded = model.encode(images.to(device=parameter.device, dtype=parameter.dtype))
    posterior = getattr(encoded, "latent_dist", None)
    if posterior is None:  # autoencoders without a posterior (AutoencoderTiny, AutoencoderDC)
        return encoded.latents
    return posterior.sample(generator=generator) if sample else posterior.mode()


def decode_latents(
    model: nn.Module,
    z: Tensor,
    num_inference_steps: int | None = None,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Images (B, 3, H, W) from latents. SSDD: ``num_inference_steps`` Euler steps (``None``: the model's
    default) from ``noise`` or noise drawn with ``generator``; other models ignore those three."""
    parameter = next(model.parameters())
    z = z.to(device=parameter.device, dtype=parameter.dtype)
    if is_ssdd(model):
        return model.decode(
            z, num_inference_steps=num_inference_steps, noise=noise, generator=generator
        ).sample
    return model.decode(z).sample


@torch.no_grad()
def reconstruct(
    model: nn.Module,
    images: Tensor,
    num_inference_steps: int | None = None,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``decode(encode(images).mode())`` as float32 (B, 3, H, W); see :func:`decode_latents`."""
    z = encode_latents(model, images)
    return decode_latents(model, z, num_inference_steps, noise, generator).float()
