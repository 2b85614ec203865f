"""The decoders the decode benchmark times: SSDD presets (``ssdd-{size}-{steps}[-tiled][-fused][-cl|-nchw]``)
and diffusers' AutoencoderKL (SD-VAE configuration), AutoencoderTiny (TAESD), AutoencoderDC (f32c32) and
ConsistencyDecoderVAE, all with random weights (speed does not depend on them)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

SLOW_CONTENDERS = {"consistency"}
DEFAULT_TILE_SIZE = 256
DEFAULT_TILE_OVERLAP = 0.25

# diffusers' AutoencoderKL in the Stable Diffusion VAE configuration (f8c4, 83.7M parameters).
SD_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}


@dataclass
class Contender:
    """A named model with decode/encode callables; ``network`` is the module torch.compile wraps."""

    name: str
    model: torch.nn.Module
    decode: Callable[[torch.Tensor], torch.Tensor]
    encode: Callable[[torch.Tensor], torch.Tensor] | None
    decoder_params: int
    total_params: int
    flops_fn: Callable[[torch.Tensor], Any] | None = None
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    latent_channels: int = 4
    factor: int = 8  # image pixels per latent pixel

    def latents(
        self,
        batch: int,
        resolution: int,
        device: torch.device,
        dtype: torch.dtype,
        channels_last: bool = False,
    ) -> torch.Tensor:
        """The (batch, C, resolution / f, resolution / f) latents this contender decodes (seeded, so every
        contender with the same latent shape decodes the same latents)."""
        size = resolution // self.factor
        generator = torch.Generator().manual_seed(resolution * 1000 + batch)
        z = torch.randn(batch, self.latent_channels, size, size, generator=generator).to(
            device=device, dtype=dtype
        )
        return z.contiguous(memory_format=torch.channels_last) if channels_last else z


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


SSDD_OPTIONS = ("tiled", "fused", "cl", "nchw")


def parse_ssdd(name: str) -> tuple[str, int, bool, bool] | None:
    """``ssdd-S-1[-tiled][-fused][-cl|-nchw]`` -> ("S", 1, tiled, fused); None for other names (``-cl``
    and ``-nchw``: see :func:`build_contender`)."""
    parts = name.split("-")
    options = parts[3:]
    if parts[0] != "ssdd" or len(parts) < 3 or not parts[2].isdigit():
        return None
    if len(set(options)) != len(options) or not set(options) <= set(SSDD_OPTIONS):
        return None
    if "nchw" in options and ("cl" in options or "fused" in options):
        return None  # -nchw is the plain PyTorch NCHW path
    return parts[1].upper(), int(parts[2]), "tiled" in options, "fused" in options


REFERENCE_NAMES = ("kl", "kl-tiled", "consistency", "tiny", "dc")
"""The contender names other than SSDD presets."""


def check_contender_name(name: str) -> None:
    """Raise ``ValueError`` for a name that is no contender (a usage error, reported before any timing)."""
    if name not in REFERENCE_NAMES and parse_ssdd(name) is None:
        raise ValueError(f"Unknown contender {name!r}.")


def build_contender(
    name: str,
    device: torch.device,
    dtype: torch.dtype,
    channels_last: bool,
    compile_mode: str | None,
    tile_size: int = DEFAULT_TILE_SIZE,
    tile_overlap: float = DEFAULT_TILE_OVERLAP,
) -> Contender:
    """Random-weight model for one contender name, in eval mode on ``device``/``dtype``; ``*-tiled``
    contenders decode in ``tile_size`` px tiles overlapping by ``tile_overlap``.

    SSDD paths: ``ssdd-S-1`` keeps the decoder's defaults (its automatic trunk layout and norm kernels);
    ``-nchw`` forces the NCHW trunk with the PyTorch norms, ``-cl`` the channels_last trunk with the PyTorch
    norms, ``-fused`` the Triton norm kernels (channels_last trunk unless ``-cl`` / ``-nchw`` say otherwise),
    so each explicit path stays the same whatever the defaults become."""
    torch.manual_seed(0)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    ssdd = parse_ssdd(name)
    if ssdd is not None:
        from ssdd_diffusers import SSDDAutoencoder

        size, steps, tiled, fused = ssdd
        vae = SSDDAutoencoder.from_preset("f8c4", decoder=size).to(device=device, dtype=dtype).eval()
        vae = vae.to(memory_format=memory_format)
        if tiled:
            vae.enable_tiling(tile_size, tile_overlap)  # shared GroupNorm statistics: two passes
        options = name.split("-")[3:]
        if fused or "cl" in options or "nchw" in options:
            vae.decoder.fused_norm_kernels = fused  # Triton norm kernels (eager CUDA) or the PyTorch norms
        if "cl" in options or "nchw" in options:
            vae.decoder.channels_last = "cl" in options  # the trunk layout whatever the automatic choice
        if compile_mode:
            vae.decoder = torch.compile(vae.decoder, mode=_mode(compile_mode), dynamic=False)
        decoder = vae.decoder

        def decode(z: torch.Tensor) -> torch.Tensor:
            return vae.decode(z, num_inference_steps=steps).sample

        def encode(x: torch.Tensor) -> torch.Tensor:
            return vae.encode(x).latent_dist.mode()

        def flops(z: torch.Tensor) -> None:
            x = torch.randn(z.shape[0], 3, z.shape[-2] * 8, z.shape[-1] * 8, device=z.device, dtype=z.dtype)
            decoder(x, torch.ones(z.shape[0], device=z.device), z)

        return Contender(
            name,
            vae,
            decode,
            encode,
            _params(vae.decoder),
            _params(vae),
            flops_fn=flops,
            notes=f"{steps} Euler step(s)" + (f", tiles {tile_size}px" if tiled else ""),
            extra={"steps": steps},
        )
    if name in ("kl", "kl-tiled"):
        from diffusers import AutoencoderKL

        vae = (
            AutoencoderKL(**SD_VAE_CONFIG)
            .to(device=device, dtype=dtype)
            .eval()
            .to(memory_format=memory_format)
        )
        if name == "kl-tiled":
            vae.enable_tiling()
            vae.tile_sample_min_size, vae.tile_latent_min_size = tile_size, tile_size // 8
            vae.tile_overlap_factor = tile_overlap
        if compile_mode:
            vae.decoder = torch.compile(vae.decoder, mode=_mode(compile_mode), dynamic=False)

        def flops_kl(z: torch.Tensor) -> None:
            vae.decode(z)

        return Contender(
            name,
            vae,
            lambda z: vae.decode(z).sample,
            lambda x: vae.encode(x).latent_dist.mode(),
            _params(vae.decoder) + _params(vae.post_quant_conv),
            _params(vae),
            flops_fn=flops_kl,
            notes="SD-VAE config",
        )
    if name == "consistency":
        from diffusers import ConsistencyDecoderVAE

        vae = ConsistencyDecoderVAE().to(device=device, dtype=dtype).eval()
        if compile_mode:
            vae.decoder_unet = torch.compile(vae.decoder_unet, dynamic=False)

        def decode_cd(z: torch.Tensor) -> torch.Tensor:
            generator = torch.Generator(device="cpu").manual_seed(0)
            return vae.decode(z, generator=generator).sample

        return Contender(
            name,
            vae,
            decode_cd,
            lambda x: vae.encode(x).latent_dist.mode(),
            _params(vae.decoder_unet),
            _params(vae),
            notes="default config, 2 steps",
        )
    if name in ("tiny", "dc"):  # diffusers' TAESD (f8c4) and DC-AE (f32c32) in their default configs
        from diffusers import AutoencoderDC, AutoencoderTiny

        cls = AutoencoderTiny if name == "tiny" else AutoencoderDC
        vae = cls().to(device=device, dtype=dtype).eval().to(memory_format=memory_format)
        if compile_mode:
            vae.decoder = torch.compile(vae.decoder, mode=_mode(compile_mode), dynamic=False)
        factor = getattr(vae, "spatial_compression_ratio", 8)  # AutoencoderTiny has none: f8

        def encode_reference(x: torch.Tensor) -> torch.Tensor:
            encoded = vae.encode(x)
            return encoded.latents if name == "tiny" else encoded.latent

        return Contender(
            name,
            vae,
            lambda z: vae.decode(z).sample,
            encode_reference,
            _params(vae.decoder),
            _params(vae),
            flops_fn=lambda z: vae.decode(z),
            notes=f"{cls.__name__} default config, f{factor}c{vae.config.latent_channels}",
            latent_channels=vae.config.latent_channels,
            factor=factor,
        )
    raise ValueError(f"Unknown contender {name!r}.")


def _mode(compile_mode: str) -> str | None:
    """torch.compile's ``mode`` for a ``--compile-mode`` value (``default`` is ``None``)."""
    return None if compile_mode == "default" else compile_mode
