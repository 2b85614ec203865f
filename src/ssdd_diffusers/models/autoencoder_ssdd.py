"""``SSDDAutoencoder``: a KL encoder and SSDD's U-ViT decoder, with the ``AutoencoderKL`` API."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import (
    AutoencoderMixin,
    DecoderOutput,
    DiagonalGaussianDistribution,
    Encoder,
)
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils.accelerate_utils import apply_forward_hook
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from ..conversion import (
    convert_upstream_state_dict,
    infer_upstream_config,
    load_state_dict_file,
    unwrap_state_dict,
)
from ..multiscale import MultiScaleLayout, multiscale_euler_sample, resolve_stage_steps
from ..presets import decoder_preset, encoder_preset
from ..sampling import euler_sample_on_grid
from ..tiling import SharedGroupNormStats, Tile, blend_tiles, plan_tiles
from ..torch_utils import own_cpu_memory_
from ..weights_files import broken_weights_error
from .uvit_decoder import GEGLUFeedForward, SSDDResnetBlock, UViTDecoder

DEFAULT_NOISE_SEED = 0


def _check_image(x: torch.Tensor, channels: int, multiple: int, what: str) -> None:
    if x.ndim != 4:
        raise ValueError(
            f"{what} must be a 4-D (batch, channels, height, width) tensor; got shape {tuple(x.shape)}."
        )
    if x.shape[0] == 0:
        raise ValueError(f"{what} must hold at least one item; got an empty batch (shape {tuple(x.shape)}).")
    if x.shape[1] != channels:
        raise ValueError(f"{what} must have {channels} channels; got {x.shape[1]} (shape {tuple(x.shape)}).")
    height, width = x.shape[-2:]
    if height < multiple or width < multiple or height % multiple or width % multiple:
        expected = f"positive multiples of {multiple}" if multiple > 1 else "at least 1"
        raise ValueError(f"{what} height and width must be {expected}; got {height}x{width}.")


def _check_finite(x: torch.Tensor, what: str, expected: str) -> None:
    """``ValueError`` when ``x`` holds NaN or inf: one reduction and one host synchronisation, skipped
    while tracing (torch.compile / export / jit) or capturing a CUDA graph, so both stay possible."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or x.is_meta:
        return
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{what} contain NaN or infinite values; expected {expected}.")


def _cast(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast parameters without ModelMixin.to's spurious "keep in float32" warning."""
    return model if model.dtype == dtype else nn.Module.to(model, dtype)


@torch.compiler.disable  # generators cannot be created or used inside a compiled graph: one clean break
def _draw_noise(
    shape: tuple[int, ...], generator: torch.Generator | list[torch.Generator] | None, device: torch.device
) -> torch.Tensor:
    """float32 standard normal noise of ``shape``: from ``generator`` on the generator's device, or, with
    none, from a generator of ``device`` seeded with ``DEFAULT_NOISE_SEED`` (so the default noise is made
    where the decode runs; its values depend on the device type, not on anything else)."""
    if generator is None:
        generator = torch.Generator(device=device).manual_seed(DEFAULT_NOISE_SEED)
    source = (generator[0] if isinstance(generator, list) else generator).device
    return randn_tensor(shape, generator=generator, device=source, dtype=torch.float32)


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``; a CPU tensor bound for CUDA goes through pinned memory as a non-blocking
    copy (the caching host allocator keeps the pinned buffer alive until the copy is done)."""
    if tensor.device == device:
        return tensor
    if tensor.device.type == "cpu" and device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


class SSDDAutoencoder(ModelMixin, AutoencoderMixin, ConfigMixin):
    r"""Image autoencoder with a KL encoder and SSDD's single-step diffusion decoder.

    Drop-in for ``diffusers.AutoencoderKL``: ``encode(x).latent_dist`` is a ``DiagonalGaussianDistribution``
    and ``decode(z).sample`` is an image in [-1, 1] (not clamped). Decoding integrates a flow-matching
    ODE from Gaussian noise with ``num_inference_steps`` Euler steps (1 for a distilled model).

    Args:
        in_channels / out_channels: image channels.
        latent_channels: channels of the latent z.
        block_out_channels: encoder width per level; the encoder downsamples by ``2 ** (levels - 1)``.
        layers_per_block: encoder ResNet blocks per level.
        double_z: encoder predicts mean and log-variance (True in every SSDD release).
        norm_num_groups: GroupNorm groups of the encoder.
        decoder_block_out_channels: decoder width per level (multiples of decoder_norm_groups).
        decoder_layers_per_block: decoder ResNet blocks per down level.
        decoder_transformer_layers / decoder_attention_heads / decoder_attention_window: middle
            transformer depth, heads and local-attention window w (offsets within +-(w-1) tokens).
        num_inference_steps: default number of Euler steps of ``decode``.
        time_grid_power: p of the time grid t_i = (1 - i/N) ** p (upstream ``t_pow_shift``).
        scaling_factor / shift_factor / latents_mean / latents_std: latent normalisation used by
            diffusion pipelines (``z * scaling_factor`` is what a latent diffusion model sees).
        force_upcast: pipelines upcast the VAE to float32 when True; SSDD runs in bf16/fp16 as is.
        sample_size: nominal training resolution; also the default tile size for tiled decoding.
        multiscale_stages: K stages of coarse-to-fine decoding the decoder was trained for (1 = the
            ordinary full-resolution sampler); see :mod:`ssdd_diffusers.multiscale`.
        multiscale_steps: Euler steps per stage (length K) used when their sum equals the requested
            number of steps; otherwise ``multiscale.default_stage_steps`` splits the steps.
        prediction_type: ``"velocity"`` (upstream SSDD; converted checkpoints) or ``"edm"``: the decoder
            network is preconditioned so that its one-step output is a clean-image estimate that does not
            carry the starting noise (see ``UViTDecoder``).
        sigma_data: data standard deviation of the ``"edm"`` preconditioning.
        decoder_norm_groups: groups of the decoder's GroupNorms (upstream: 32); narrow decoders (32-channel
            levels) learn much better with fewer (see ``UViTDecoder``).
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["SSDDResnetBlock", "SSDDTransformerBlock", "ResnetBlock2D"]
    _skip_layerwise_casting_patterns = ["relative_position_bias", "norm"]

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        latent_channels: int = 4,
        block_out_channels: tuple[int, ...] = (128, 256, 512, 512),
        layers_per_block: int = 2,
        double_z: bool = True,
        norm_num_groups: int = 32,
        decoder_block_out_channels: tuple[int, ...] = (96, 192, 288, 288),
        decoder_layers_per_block: int = 2,
        decoder_transformer_layers: int = 12,
        decoder_attention_heads: int = 4,
        decoder_attention_window: int = 8,
        num_inference_steps: int = 12,
        time_grid_power: float = 2.0,
        scaling_factor: float = 1.0,
        shift_factor: float | None = None,
        latents_mean: tuple[float, ...] | None = None,
        latents_std: tuple[float, ...] | None = None,
        force_upcast: bool = False,
        sample_size: int = 256,
        multiscale_stages: int = 1,
        multiscale_steps: tuple[int, ...] | None = None,
        prediction_type: str = "velocity",
        sigma_data: float = 0.5,
        decoder_norm_groups: int = 32,
    ):
        super().__init__()
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1; got {num_inference_steps}.")
        MultiScaleLayout(multiscale_stages)  # validates K
        self.encoder = Encoder(
            in_channels=in_channels,
            out_channels=latent_channels,
            down_block_types=("DownEncoderBlock2D",) * len(block_out_channels),
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            norm_num_groups=norm_num_groups,
            act_fn="silu",
            double_z=double_z,
        )
        moments = 2 * latent_channels if double_z else latent_channels
        self.quant_conv = nn.Conv2d(moments, moments, 1)
        self.decoder = UViTDecoder(
            latent_channels=latent_channels,
            block_out_channels=tuple(decoder_block_out_channels),
            layers_per_block=decoder_layers_per_block,
            transformer_layers=decoder_transformer_layers,
            attention_heads=decoder_attention_heads,
            attention_window=decoder_attention_window,
            in_channels=out_channels,
            out_channels=out_channels,
            prediction_type=prediction_type,
            sigma_data=sigma_data,
            norm_groups=decoder_norm_groups,
        )
        self.use_slicing = False
        self.use_tiling = False
        self.tile_sample_min_size = sample_size
        self.tile_overlap_factor = 0.25
        self.tile_share_norm_stats = True
        self.reset_parameters()

    # --------------------------------------------------------------------------------------------
    # Construction
    # --------------------------------------------------------------------------------------------

    @property
    def spatial_compression_ratio(self) -> int:
        """Image pixels per latent pixel along each axis (8 for f8)."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    def reset_parameters(self) -> None:
        """Upstream initialisation: Kaiming-normal encoder, Xavier-uniform decoder, zero biases, and zero
        init of every residual branch's last layer (ResNet conv2, feed-forward output) and bias table."""
        for module in self.encoder.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight, nonlinearity="leaky_relu")
                nn.init.zeros_(module.bias)
        for module in self.decoder.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for module in self.decoder.modules():  # the last layer of every residual branch starts at zero
            if isinstance(module, SSDDResnetBlock):
                nn.init.zeros_(module.conv2.weight)
            elif isinstance(module, GEGLUFeedForward):
                nn.init.zeros_(module.proj_out.weight)

    @classmethod
    def from_preset(cls, encoder: str = "f8c4", decoder: str = "M", **config_overrides) -> SSDDAutoencoder:
        """Randomly initialised model of a named size, e.g. ``from_preset("f8c4", decoder="S")``."""
        config = {**encoder_preset(encoder), **decoder_preset(decoder), **config_overrides}
        return cls(**config)

    @classmethod
    def from_autoencoder_kl(cls, autoencoder_kl, decoder: str = "M", **config_overrides) -> SSDDAutoencoder:
        """SSDD model whose encoder (weights, latent space and scaling) is taken from a diffusers
        ``AutoencoderKL``; the decoder is a fresh, randomly initialised preset.

        Copies the encoder and ``quant_conv`` weights (an identity ``quant_conv`` when the source has
        ``use_quant_conv=False``) and ``scaling_factor``, ``shift_factor``, ``latents_mean`` and
        ``latents_std``, so ``encode`` returns exactly the source's posterior: a decoder trained on this
        frozen encoder decodes the latent space that existing DiTs and SD-style models were trained on.
        Works for the LDM layout (SD-VAE, SD2, SDXL-VAE, SD3/FLUX-style 16-channel VAEs); raises
        ``ValueError`` for encoders it cannot reproduce.

        Args:
            autoencoder_kl: a ``diffusers.AutoencoderKL`` (e.g. ``AutoencoderKL.from_pretrained(
                "stabilityai/sd-vae-ft-ema")``).
            decoder: decoder size preset ("XS" ... "G").
            config_overrides: any other ``SSDDAutoencoder`` config value (e.g. ``num_inference_steps``).
        """
        from diffusers import AutoencoderKL

        if not isinstance(autoencoder_kl, AutoencoderKL):
            raise TypeError(
                f"from_autoencoder_kl expects a diffusers.AutoencoderKL; got {type(autoencoder_kl).__name__}."
            )
        kl = autoencoder_kl.config
        problems = []
        if any(t != "DownEncoderBlock2D" for t in kl.down_block_types):
            problems.append(
                f"down_block_types must all be 'DownEncoderBlock2D' (got {list(kl.down_block_types)})"
            )
        if kl.act_fn != "silu":
            problems.append(f"act_fn must be 'silu' (got {kl.act_fn!r})")
        if not kl.get("mid_block_add_attention", True):
            problems.append(
                "mid_block_add_attention=False is not supported (the SSDD encoder has mid attention)"
            )
        if problems:
            raise ValueError(
                "This AutoencoderKL's encoder cannot be reproduced by SSDDAutoencoder (LDM layout only): "
                + "; ".join(problems)
                + "."
            )
        config = {
            "in_channels": kl.in_channels,
            "out_channels": kl.out_channels,
            "latent_channels": kl.latent_channels,
            "block_out_channels": tuple(kl.block_out_channels),
            "layers_per_block": kl.layers_per_block,
            "norm_num_groups": kl.norm_num_groups,
            "scaling_factor": kl.scaling_factor,
            "shift_factor": kl.shift_factor,
            "latents_mean": None if kl.latents_mean is None else tuple(kl.latents_mean),
            "latents_std": None if kl.latents_std is None else tuple(kl.latents_std),
            "sample_size": kl.sample_size if isinstance(kl.sample_size, int) else 256,
            **decoder_preset(decoder),
            **config_overrides,
        }
        model = cls(**config)
        try:
            model.encoder.load_state_dict(autoencoder_kl.encoder.state_dict())
        except RuntimeError as error:  # e.g. a custom encoder subclass with extra layers
            raise ValueError(f"AutoencoderKL encoder weights do not fit the SSDD encoder: {error}") from error
        if autoencoder_kl.quant_conv is not None:
            model.quant_conv.load_state_dict(autoencoder_kl.quant_conv.state_dict())
        else:  # AutoencoderKL(use_quant_conv=False): identity
            nn.init.zeros_(model.quant_conv.bias)
            with torch.no_grad():
                model.quant_conv.weight.copy_(torch.eye(model.quant_conv.in_channels)[:, :, None, None])
        return _cast(model, autoencoder_kl.dtype)

    @classmethod
    def from_upstream_checkpoint(
        cls,
        path_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor],
        torch_dtype: torch.dtype | None = None,
        **config_overrides,
    ) -> SSDDAutoencoder:
        """Load an upstream SSDD checkpoint (safetensors/torch file or state dict); the whole config is
        inferred from tensor shapes. Weights load as float32 unless ``torch_dtype`` is given."""
        if isinstance(path_or_state_dict, Mapping):
            state = unwrap_state_dict(path_or_state_dict)
        else:
            state = load_state_dict_file(path_or_state_dict)
        config = {**infer_upstream_config(state), **config_overrides}
        model = cls(**config)
        converted = convert_upstream_state_dict(state)
        expected = model.state_dict()
        missing = sorted(set(expected) - set(converted))
        unexpected = sorted(set(converted) - set(expected))
        mismatched = [
            f"{k}: checkpoint {tuple(converted[k].shape)} vs model {tuple(expected[k].shape)}"
            for k in sorted(set(expected) & set(converted))
            if converted[k].shape != expected[k].shape
        ]
        if missing or unexpected or mismatched:
            raise ValueError(
                "Upstream checkpoint does not fit the inferred SSDD configuration.\n"
                f"Missing keys ({len(missing)}): {missing}\n"
                f"Unexpected keys ({len(unexpected)}): {unexpected}\n"
                f"Shape mismatches ({len(mismatched)}): {mismatched}"
            )
        model.load_state_dict({k: v.to(torch.float32) for k, v in converted.items()})
        return _cast(model, torch_dtype or torch.float32).eval()

    @classmethod
    def load_config(cls, pretrained_model_name_or_path, *args, **kwargs):
        """As ``ConfigMixin.load_config``, but refuses a config saved by another model class (e.g. an
        ``AutoencoderKL`` folder), which would otherwise load with randomly initialised weights."""
        result = super().load_config(pretrained_model_name_or_path, *args, **kwargs)
        config = result[0] if isinstance(result, tuple) else result
        class_name = config.get("_class_name", cls.__name__)
        if class_name != cls.__name__:
            raise ValueError(
                f"{pretrained_model_name_or_path!r} holds a {class_name} config, not an {cls.__name__}. "
                f"Load it with diffusers.{class_name}, or build an SSDD model on its encoder with "
                f"{cls.__name__}.from_autoencoder_kl(...)."
            )
        return result

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike | None, **kwargs) -> Any:
        """As ``ModelMixin.from_pretrained`` (same arguments), with weights in ordinary CPU memory.

        diffusers keeps the memory-mapped views that safetensors returns, at the file's (often only 4-byte
        aligned) offsets; the CPU kernels then may round differently from the model that was saved. Each
        misaligned CPU tensor is copied once (see :func:`ssdd_diffusers.torch_utils.own_cpu_memory_`), so a
        reloaded model decodes bit-identically to the saved one on the same machine.
        """
        try:
            result = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        except (OSError, ValueError) as error:  # a truncated weights file: say so, in one line
            broken = broken_weights_error(error, pretrained_model_name_or_path, kwargs.get("subfolder"))
            if broken is None:
                raise
            raise broken from error
        own_cpu_memory_(result[0] if isinstance(result, tuple) else result)  # output_loading_info=True
        return result

    def push_to_hub(
        self,
        repo_id: str,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | None = None,
        create_pr: bool = False,
        safe_serialization: bool = True,
        variant: str | None = None,
        subfolder: str | None = None,
    ) -> Any:
        """Upload the model to the Hugging Face Hub, with the SSDD model card when the repo has none.

        As diffusers' ``PushToHubMixin.push_to_hub`` (same arguments, same return value: the
        ``CommitInfo`` of ``huggingface_hub.upload_folder``): the repo is created if needed, the model is
        saved with ``save_pretrained`` into a temporary folder and the folder is uploaded in one commit
        (under ``subfolder`` if given). The card differs: if the repo has no ``README.md`` yet, the SSDD
        card of :func:`ssdd_diffusers.model_card.write_model_card_for_folder` (configuration table,
        parameter counts, usage snippet for ``repo_id``) is uploaded instead of diffusers' generic one;
        an existing ``README.md`` is kept unchanged. With ``subfolder`` no card is written (as diffusers).

        Args:
            repo_id: ``"namespace/name"`` (or ``"name"`` in the token's namespace) of the model repo.
            commit_message: defaults to ``"Upload model"``.
            private: visibility of a newly created repo (``None``: the namespace default).
            token: Hub token; defaults to the stored one.
            create_pr: open a pull request with the files instead of committing to ``main``.
            safe_serialization / variant: passed to ``save_pretrained``.
            subfolder: folder of the repo to upload the model into.

        Raises:
            ConnectionError: the connection to the Hub was lost (the original error is chained); nothing
                local was written but a temporary folder, which is removed, so retrying is safe. Answers
                of the Hub (``huggingface_hub.errors.HfHubHTTPError``) are raised unchanged.
        """
        from huggingface_hub import create_repo, file_exists, upload_folder

        from ..model_card import (
            CARD_NAME,
            interrupted_upload_as_error,
            strip_local_paths_from_config,
            write_model_card_for_folder,
        )

        with interrupted_upload_as_error(repo_id, "the model"):
            repo_id = create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
            # Only a repo without a card gets the SSDD one: a card already on the Hub is not overwritten.
            write_card = not subfolder and not file_exists(repo_id, CARD_NAME, token=token)
        with tempfile.TemporaryDirectory() as tmpdir, interrupted_upload_as_error(repo_id, "the model"):
            self.save_pretrained(tmpdir, safe_serialization=safe_serialization, variant=variant)
            strip_local_paths_from_config(tmpdir)  # diffusers' `_name_or_path`: the folder name at most
            if write_card:
                write_model_card_for_folder(tmpdir, repo_id=repo_id)
            return upload_folder(
                repo_id=repo_id,
                folder_path=tmpdir,
                token=token,
                commit_message="Upload model" if commit_message is None else commit_message,
                create_pr=create_pr,
                path_in_repo=subfolder,
            )

    # --------------------------------------------------------------------------------------------
    # Tiling
    # --------------------------------------------------------------------------------------------

    def enable_tiling(
        self,
        tile_sample_min_size: int | None = None,
        tile_overlap_factor: float | None = None,
        share_norm_stats: bool | None = None,
    ):
        """Encode and decode in overlapping tiles of ``tile_sample_min_size`` pixels (default
        ``config.sample_size``) overlapping by ``tile_overlap_factor`` of a tile, blended linearly.

        With ``share_norm_stats`` (default True) every GroupNorm uses statistics pooled over all
        tiles (one extra pass over the tiles), which removes tile-to-tile tone shifts."""
        if share_norm_stats is not None:
            self.tile_share_norm_stats = share_norm_stats
        if tile_sample_min_size is not None:
            if tile_sample_min_size % self.spatial_compression_ratio or tile_sample_min_size < 32:
                raise ValueError(
                    f"tile_sample_min_size must be a multiple of {self.spatial_compression_ratio} and >= 32; "
                    f"got {tile_sample_min_size}."
                )
            self.tile_sample_min_size = tile_sample_min_size
        if tile_overlap_factor is not None:
            if not 0 <= tile_overlap_factor < 1:
                raise ValueError(f"tile_overlap_factor must be in [0, 1); got {tile_overlap_factor}.")
            self.tile_overlap_factor = tile_overlap_factor
        self.use_tiling = True

    def _latent_tiling(self) -> tuple[int, int]:
        """Tile size and overlap in latent units (overlap kept a multiple of the decoder's 8 px)."""
        f = self.spatial_compression_ratio
        tile = self.tile_sample_min_size // f
        align = max(1, self.decoder.downsample_factor // f)
        overlap = int(round(tile * self.tile_overlap_factor / align)) * align
        return tile, overlap

    def _needs_tiles(self, height: int, width: int) -> bool:
        tile, _ = self._latent_tiling()
        return self.use_tiling and (height > tile or width > tile)

    def _run_tiles(
        self, module: nn.Module, fn, latent_size: tuple[int, int], out_scale: float
    ) -> torch.Tensor:
        """Blend ``fn`` over the latent-space tile grid, optionally with pooled GroupNorm statistics."""
        tile, overlap = self._latent_tiling()
        tiles = plan_tiles(latent_size[0], latent_size[1], tile, overlap)
        if not self.tile_share_norm_stats:
            return blend_tiles(fn, tiles, latent_size, out_scale, overlap)
        stats = SharedGroupNormStats(module)
        with stats.recording():
            for t in tiles:
                fn(t)
        with stats.applying():
            return blend_tiles(fn, tiles, latent_size, out_scale, overlap)

    # --------------------------------------------------------------------------------------------
    # Encoding
    # --------------------------------------------------------------------------------------------

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) -> posterior parameters (B, 2Z, H/f, W/f)."""
        f = self.spatial_compression_ratio
        latent_size = (x.shape[-2] // f, x.shape[-1] // f)
        if self._needs_tiles(*latent_size):

            def encode_tile(t: Tile) -> torch.Tensor:
                region = x[..., t.top * f : (t.top + t.height) * f, t.left * f : (t.left + t.width) * f]
                return self.quant_conv(self.encoder(region))

            return self._run_tiles(self.encoder, encode_tile, latent_size, 1).to(x.dtype)
        return self.quant_conv(self.encoder(x))

    @apply_forward_hook
    def encode(self, x: torch.Tensor, return_dict: bool = True) -> AutoencoderKLOutput | tuple:
        """Encode images (B, 3, H, W) in [-1, 1] into a diagonal Gaussian over latents (B, Z, H/f, W/f)."""
        _check_image(x, self.config.in_channels, self.spatial_compression_ratio, "Input images")
        _check_finite(x, "Input images", "finite pixel values in [-1, 1]")
        if self.use_slicing and x.shape[0] > 1:
            moments = torch.cat([self._encode(s) for s in x.split(1)])
        else:
            moments = self._encode(x)
        if not self.config.double_z:
            moments = torch.cat([moments, torch.zeros_like(moments)], dim=1)
        posterior = DiagonalGaussianDistribution(moments, deterministic=not self.config.double_z)
        if not return_dict:
            return (posterior,)
        return AutoencoderKLOutput(latent_dist=posterior)

    # --------------------------------------------------------------------------------------------
    # Decoding
    # --------------------------------------------------------------------------------------------

    def _initial_noise(
        self, z: torch.Tensor, generator, noise: torch.Tensor | None, dtype: torch.dtype
    ) -> torch.Tensor:
        """Starting noise (B, C, h*f, w*f) on ``z``'s device, in ``dtype``.

        Explicit ``noise`` wins; else ``generator`` (one, or one per image) draws float32 noise on its own
        device; else a fixed-seed generator *of z's device* draws it there, in one call, with no host work
        or synchronisation. Noise made on the CPU for an accelerator travels as one non-blocking copy.
        """
        f = self.spatial_compression_ratio
        shape = (z.shape[0], self.config.out_channels, z.shape[-2] * f, z.shape[-1] * f)
        if noise is not None:
            if tuple(noise.shape) != shape:
                raise ValueError(
                    f"noise must have shape {shape} (batch, channels, latent size x {f}); "
                    f"got {tuple(noise.shape)}."
                )
        else:
            noise = _draw_noise(shape, generator, z.device)
        return _to_device(noise, z.device).to(dtype)

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor | float, z: torch.Tensor) -> torch.Tensor:
        """Decoder velocity at (x_t, t) for latents z, in overlapping tiles when tiling is enabled."""
        if not self._needs_tiles(z.shape[-2], z.shape[-1]):
            return self.decoder(x_t, t, z)
        f = self.spatial_compression_ratio

        def decode_tile(tl: Tile) -> torch.Tensor:
            z_tile = z[..., tl.top : tl.top + tl.height, tl.left : tl.left + tl.width]
            x_tile = x_t[..., tl.top * f : (tl.top + tl.height) * f, tl.left * f : (tl.left + tl.width) * f]
            return self.decoder(x_tile, t, z_tile)

        return self._run_tiles(self.decoder, decode_tile, tuple(z.shape[-2:]), f).to(x_t.dtype)

    def _decode(
        self, z: torch.Tensor, noise: torch.Tensor, num_inference_steps: int, multiscale_stages: int = 1
    ) -> torch.Tensor:
        if multiscale_stages > 1:
            return self._decode_multiscale(z, noise, num_inference_steps, multiscale_stages)
        power = self.config.time_grid_power
        return euler_sample_on_grid(lambda x, t: self.velocity(x, t, z), noise, num_inference_steps, power)

    def _decode_multiscale(
        self, z: torch.Tensor, noise: torch.Tensor, num_inference_steps: int, multiscale_stages: int
    ) -> torch.Tensor:
        """Coarse-to-fine decoding (``multiscale.multiscale_euler_sample``); the coarse-stage noise and
        re-noise are derived deterministically from the full-resolution ``noise``. Coarse stages call the
        decoder directly (tiling, when enabled, applies to the full-resolution stage only)."""
        steps = resolve_stage_steps(num_inference_steps, multiscale_stages, self.config.multiscale_steps)
        full_size = tuple(noise.shape[-2:])

        def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if tuple(x.shape[-2:]) == full_size:
                return self.velocity(x, t, z)
            return self.decoder(x, t, z)

        layout = MultiScaleLayout(multiscale_stages)
        return multiscale_euler_sample(velocity, noise, steps, layout, self.config.time_grid_power)

    @apply_forward_hook
    def decode(
        self,
        z: torch.Tensor,
        return_dict: bool = True,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int | None = None,
        noise: torch.Tensor | None = None,
        multiscale_stages: int | None = None,
    ) -> DecoderOutput | tuple:
        """Decode latents (B, Z, h, w) into images (B, 3, h*f, w*f) in [-1, 1] (not clamped).

        Args:
            z: latents (already divided by ``scaling_factor`` if they come from a diffusion model).
            return_dict: return a ``DecoderOutput`` (else a 1-tuple).
            generator: source of the starting noise; None uses a fixed seed, so decoding is deterministic.
            num_inference_steps: Euler steps; defaults to ``config.num_inference_steps``.
            noise: explicit starting noise (B, 3, h*f, w*f); overrides ``generator``.
            multiscale_stages: K > 1 decodes coarse-to-fine in K stages with ``num_inference_steps`` Euler
                steps in total (at least one per stage); 1 forces the full-resolution sampler; None uses
                ``config.multiscale_stages``. The multi-scale noise is derived from the full-resolution
                noise, so ``noise=`` stays an exact reproduction handle.
        """
        _check_image(z, self.config.latent_channels, 1, "Latents")
        _check_finite(z, "Latents", "finite values (NaN/inf usually come from a diverged diffusion model)")
        steps = self.config.num_inference_steps if num_inference_steps is None else int(num_inference_steps)
        if steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1; got {steps}.")
        stages = self.config.multiscale_stages if multiscale_stages is None else int(multiscale_stages)
        if stages > 1:
            f = self.spatial_compression_ratio
            MultiScaleLayout(stages).stage_resolutions(
                z.shape[-2] * f, z.shape[-1] * f, self.decoder.downsample_factor
            )
            resolve_stage_steps(steps, stages, self.config.multiscale_steps)  # needs >= 1 step per stage
        dtype = self.decoder.conv_in.weight.dtype
        z = z.to(dtype)
        noise = self._initial_noise(z, generator, noise, dtype)  # whole batch, before slicing/tiling
        if self.use_slicing and z.shape[0] > 1:
            sample = torch.cat(
                [self._decode(zs, ns, steps, stages) for zs, ns in zip(z.split(1), noise.split(1))]
            )
        else:
            sample = self._decode(z, noise, steps, stages)
        if not return_dict:
            return (sample,)
        return DecoderOutput(sample=sample)

    def forward(
        self,
        sample: torch.Tensor,
        sample_posterior: bool = False,
        return_dict: bool = True,
        generator: torch.Generator | None = None,
        num_inference_steps: int | None = None,
    ) -> DecoderOutput | tuple:
        """Encode then decode ``sample``; ``sample_posterior`` draws z instead of taking the mode."""
        posterior = self.encode(sample).latent_dist
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        return self.decode(
            z, return_dict=return_dict, generator=generator, num_inference_steps=num_inference_steps
        )
