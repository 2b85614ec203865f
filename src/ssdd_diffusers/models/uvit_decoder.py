"""SSDD's pixel-space U-ViT decoder: predicts the flow-matching velocity of a noisy image given a latent.

Convolutional down/up paths with ResNet blocks conditioned on the latent (spatial AdaGroupNorm) and on
the time (scale-shift), and a middle transformer at H/2^(L-1) x W/2^(L-1) tokens with local windowed
attention, conditioned on the latent through AdaLayerNorm. Parameter names match upstream SSDD
checkpoints (``decoder.*`` keys) so that they load without renaming.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.activations import GEGLU
from diffusers.models.embeddings import TimestepEmbedding, get_timestep_embedding
from diffusers.models.resnet import Upsample2D
from torch import nn

from . import fused_norms
from .local_attention import LocalSelfAttention, RelativePositionBias
from .norm_statistics import BoundedCache, normalize_with_statistics, provided_statistics

NORM_GROUPS = 32
TIME_CACHE_ENTRIES = 32  # cached time values per decoder (a 12-step decode uses 12)


def _resize_nearest(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Legacy nearest resize (out[i] = in[floor(i * in / out)]); a no-op when sizes already match."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="nearest")


def _inplace_ok() -> bool:
    """In-place activation/modulation is valid when autograd is off (inference): nothing saves inputs."""
    return not torch.is_grad_enabled()


def _modulate(x: torch.Tensor, params: torch.Tensor, inplace: bool) -> torch.Tensor:
    """x * (1 + scale) + shift, (scale, shift) = params.chunk(2, 1) nearest-resized to x's size.

    For an integer size ratio (every decoder level), nearest upsampling repeats each value, so the
    low-resolution (scale, shift) are broadcast over (fy, fx) sub-pixel axes of a view of x instead of
    being materialised at full resolution: the same products and sums, element for element.
    """
    (height, width), (h, w) = x.shape[-2:], params.shape[-2:]
    if height % h or width % w:
        scale, shift = _resize_nearest(params, (height, width)).chunk(2, dim=1)
        if inplace:
            return x.mul_(1 + scale).add_(shift)
        return x * (1 + scale) + shift
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        params = params.contiguous(memory_format=torch.channels_last)  # same layout: vectorised broadcast
    scale, shift = params.chunk(2, dim=1)
    scale = (1 + scale)[:, :, :, None, :, None]
    shift = shift[:, :, :, None, :, None]
    view = x.unflatten(3, (w, width // w)).unflatten(2, (h, height // h))  # (B, C, h, fy, w, fx)
    if inplace:
        view.mul_(scale).add_(shift)
        return x
    return (view * scale + shift).flatten(4, 5).flatten(2, 3)


@torch.library.custom_op("ssdd_diffusers::group_norm", mutates_args=())
def _eager_group_norm(
    x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """ATen's GroupNorm as an opaque op, so that torch.compile calls the eager kernel (see ``group_norm``)."""
    return F.group_norm(x, num_groups, weight, bias, eps)


@_eager_group_norm.register_fake
def _(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float):
    return torch.empty_like(x)  # same shape and memory format as ATen's output


def group_norm(x: torch.Tensor, norm: nn.GroupNorm) -> torch.Tensor:
    """``norm(x)``; under torch.compile on CPU in inference, ATen's kernel instead of Inductor's.

    Inductor decomposes GroupNorm into generic reductions that are about 1.8x slower on CPU than ATen's
    channels_last GroupNorm kernel (measured on the S decoder at 256 px); on GPUs its fused Triton
    kernels are the faster choice, and training needs the decomposition's autograd.
    """
    statistics = provided_statistics(norm, x)  # tiled decoding: statistics pooled over all tiles
    if statistics is not None:
        return normalize_with_statistics(x, norm, statistics)
    return _own_group_norm(x, norm)


def _own_group_norm(x: torch.Tensor, norm: nn.GroupNorm) -> torch.Tensor:
    """``group_norm`` with the statistics of ``x`` itself (no provider consulted)."""
    if torch.compiler.is_compiling() and x.device.type == "cpu" and not torch.is_grad_enabled():
        return _eager_group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
    return norm(x)


def _affine_scale_shift(norm: nn.GroupNorm, scale: torch.Tensor, shift: torch.Tensor):
    """(B, C) factors of ``norm(x) * scale + shift`` with the norm's own affine folded in."""
    if not norm.affine:
        return scale, shift
    return norm.weight * scale, norm.bias * scale + shift


def _group_norm_scale_shift(
    x: torch.Tensor, norm: nn.GroupNorm, scale: torch.Tensor, shift: torch.Tensor
) -> torch.Tensor:
    """``norm(x) * scale + shift`` with per-(image, channel) ``scale``/``shift`` of shape (B, C) or (1, C).

    On an NCHW-contiguous ``x`` this is one GroupNorm kernel: the (B, C, H, W) tensor is viewed as
    (1, B*C, H, W) with B*G groups (the same groups, hence the same statistics) and the norm's affine
    folded with the modulation into a per-(image, channel) weight and bias. That saves two full-resolution
    broadcast passes, which dominate GPU decode time. Other layouts, and provided statistics (tiled
    decoding), take the unfused path.
    """
    batch, channels = x.shape[:2]
    statistics = provided_statistics(norm, x)  # consulted once: recording providers count every call
    if statistics is not None or not x.is_contiguous():
        if statistics is not None:
            out = normalize_with_statistics(x, norm, statistics)
        else:
            out = _own_group_norm(x, norm)
        if _inplace_ok():
            return out.mul_(scale[:, :, None, None]).add_(shift[:, :, None, None])
        return out * scale[:, :, None, None] + shift[:, :, None, None]
    weight, bias = (p.expand(batch, -1) for p in _affine_scale_shift(norm, scale, shift))
    out = F.group_norm(
        x.reshape(1, batch * channels, *x.shape[2:]),
        batch * norm.num_groups,
        weight.reshape(-1).to(x.dtype),
        bias.reshape(-1).to(x.dtype),
        norm.eps,
    )
    return out.view_as(x)


# Row/column taps of a 3x3 kernel applied after 2x nearest upsampling, seen from the low-resolution
# input: output row 2m + a reads input rows (m - 1, m) for a = 0 and (m, m + 1) for a = 1, with the
# kernel rows (0 | 1 + 2) and (0 + 1 | 2). As a stride-2 transposed 4x4 kernel (index k = 2(m - i) + a + 1
# for input row i), tap k sums these 3x3 rows.
_UPSAMPLE_TAPS = ((0.0, 0.0, 1.0), (0.0, 1.0, 1.0), (1.0, 1.0, 0.0), (1.0, 0.0, 0.0))  # (4, 3)


def upsample_conv(upsampler: Upsample2D, x: torch.Tensor) -> torch.Tensor:
    """``upsampler(x)`` (2x nearest upsampling, then a 3x3 convolution) as one transposed convolution.

    Every output pixel of nearest-upsample-then-conv sees a 2x2 neighbourhood of the input through
    sums of the 3x3 weights, so the pair equals ``conv_transpose2d`` with a 4x4 kernel, stride 2 and
    padding 1: 16 instead of 36 multiply-adds per output channel and input channel per 2x2 output
    pixels, and no upsampled tensor in memory. Values agree up to float rounding (the summed weights).
    x: (B, C, H, W) -> (B, C_out, 2H, 2W).
    """
    conv = upsampler.conv
    plain = upsampler.interpolate and upsampler.norm is None and not upsampler.use_conv_transpose
    if not plain or (conv.kernel_size, conv.stride, conv.padding) != ((3, 3), (1, 1), (1, 1)):
        return upsampler(x)  # not the configuration the decoder builds
    taps = conv.weight.new_tensor(_UPSAMPLE_TAPS)
    weight = torch.einsum("ky,lx,oiyx->iokl", taps, taps, conv.weight)  # (C_in, C_out, 4, 4)
    return F.conv_transpose2d(x, weight, conv.bias, stride=2, padding=1)


# ------------------------------------------------------------------------------------------------
# Conditioning norms
# ------------------------------------------------------------------------------------------------


class AdaGroupNorm2D(nn.Module):
    """GroupNorm without affine, modulated per pixel by (scale, shift) from a 1x1 conv of the context."""

    def __init__(self, channels: int, context_channels: int, eps: float = 1e-5, groups: int = NORM_GROUPS):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=eps, affine=False)
        self.ctx_proj = nn.Conv2d(context_channels, 2 * channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W); context: (B, C0, h, w) at latent resolution."""
        return _modulate(group_norm(x, self.norm), self.ctx_proj(context), _inplace_ok())


class AdaLayerNormTokens(nn.Module):
    """LayerNorm without affine, modulated per token by (shift, scale) = Linear(SiLU(context))."""

    def __init__(self, dim: int, context_channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.linear = nn.Linear(context_channels, 2 * dim)

    def modulation(self, context: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """context (B, C0, h, w) -> shift, scale of shape (B, H, W, dim) on the token grid."""
        g = self.linear(F.silu(context).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        g = _resize_nearest(g, grid).permute(0, 2, 3, 1)
        shift, scale = g.chunk(2, dim=-1)
        return shift, scale

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, dim) tokens."""
        shift, scale = self.modulation(context, x.shape[1:3])
        out = F.layer_norm(x, x.shape[-1:], eps=self.eps)
        if _inplace_ok():
            return out.mul_(1 + scale).add_(shift)
        return out * (1 + scale) + shift


# ------------------------------------------------------------------------------------------------
# Blocks
# ------------------------------------------------------------------------------------------------


def _fused_norms_apply(x: torch.Tensor, mode: bool | None) -> bool:
    """Whether the Triton norm kernels serve this call: eager inference on a tensor they support (see
    ``fused_norms``), with ``mode`` True (forced on) or None (automatic: on for CUDA tensors)."""
    if mode is False or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return False
    return fused_norms.supports(x) and (mode is True or x.is_cuda)


def _fused_group_norm_modulate_silu(
    x: torch.Tensor,
    norm: nn.GroupNorm,
    scale: torch.Tensor,
    shift: torch.Tensor,
    scale_plus_one: bool = False,
) -> torch.Tensor:
    """``silu(norm(x) * scale + shift)`` in the Triton kernels, with tiled decoding's provided statistics
    when there are any (the norm's own affine must already be folded into ``scale``/``shift``)."""
    return fused_norms.group_norm_modulate_silu(
        x, norm.num_groups, norm.eps, scale, shift, scale_plus_one=scale_plus_one,
        stats=provided_statistics(norm, x),
    )  # fmt: skip


class SSDDResnetBlock(nn.Module):
    """ResNet block: AdaGN(context) -> SiLU -> conv -> GN * (1 + scale_t) + shift_t -> SiLU -> conv.

    The time enters through ``time_modulation(temb)``, computed by the decoder (once per time value in
    inference, see ``UViTDecoder.time_modulations``) and passed to ``forward``.
    """

    fused_norms_mode: bool | None = None  # set through ``UViTDecoder.fused_norm_kernels``

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        context_channels: int,
        groups: int = NORM_GROUPS,
    ):
        super().__init__()
        self.norm1 = AdaGroupNorm2D(in_channels, context_channels, groups=groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, 2 * out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=1e-5)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def time_modulation(self, temb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """temb (B, 4 * C0) -> (1 + scale, shift) of the time-modulated norm, (B, C) each."""
        scale, shift = self.time_emb_proj(F.silu(temb)).chunk(2, dim=1)
        return 1 + scale, shift

    def forward(
        self, x: torch.Tensor, time_scale: torch.Tensor, time_shift: torch.Tensor, context: torch.Tensor
    ) -> torch.Tensor:
        """x: (B, C_in, H, W); time_scale / time_shift: (B or 1, C_out) from ``time_modulation``."""
        if _fused_norms_apply(x, self.fused_norms_mode):
            return self._forward_fused_norms(x, time_scale, time_shift, context)
        inplace = _inplace_ok()
        h = self.conv1(F.silu(self.norm1(x, context), inplace=inplace))
        h = _group_norm_scale_shift(h, self.norm2, time_scale, time_shift)
        h = self.conv2(F.silu(h, inplace=inplace))
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return h.add_(shortcut) if inplace else shortcut + h  # IEEE addition commutes exactly

    def _forward_fused_norms(
        self, x: torch.Tensor, time_scale: torch.Tensor, time_shift: torch.Tensor, context: torch.Tensor
    ) -> torch.Tensor:
        """The same block with each norm + modulation + SiLU as Triton kernels (inference only)."""
        ctx_scale, ctx_shift = self.norm1.ctx_proj(context).chunk(2, dim=1)  # (B, C, h, w) each
        h = self.conv1(
            _fused_group_norm_modulate_silu(x, self.norm1.norm, ctx_scale, ctx_shift, scale_plus_one=True)
        )
        scale, shift = (
            p.expand(x.shape[0], -1) for p in _affine_scale_shift(self.norm2, time_scale, time_shift)
        )
        h = self.conv2(_fused_group_norm_modulate_silu(h, self.norm2, scale, shift))
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return h.add_(shortcut)


class GEGLUFeedForward(nn.Module):
    """Linear(d -> 2 * 4d) split into (value, gate), value * GELU(gate), then Linear(4d -> d)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.proj_in_act = GEGLU(dim, mult * dim)
        self.proj_out = nn.Linear(mult * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_out(self.proj_in_act(x))


class SSDDTransformerBlock(nn.Module):
    """Pre-norm block: AdaLN(context) -> local attention (+ relative bias) -> LN -> GEGLU feed-forward."""

    def __init__(self, dim: int, num_heads: int, window: int, context_channels: int):
        super().__init__()
        self.norm1 = AdaLayerNormTokens(dim, context_channels)
        self.attn1 = LocalSelfAttention(dim, num_heads, window)
        self.relative_position_bias = RelativePositionBias(window, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.ff = GEGLUFeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, dim) tokens; context: (B, C0, h, w)."""
        x = x + self.attn1(self.norm1(x, context), self.relative_position_bias.relative_bias_table)
        return x + self.ff(self.norm2(x))


class SSDDMidTransformer(nn.Module):
    """GN -> Linear -> transformer blocks -> Linear, with a residual around the whole block."""

    def __init__(
        self,
        dim: int,
        num_layers: int,
        num_heads: int,
        window: int,
        context_channels: int,
        groups: int = NORM_GROUPS,
    ):
        super().__init__()
        self.norm = nn.GroupNorm(groups, dim, eps=1e-6)
        self.proj_in = nn.Linear(dim, dim)
        self.transformer_blocks = nn.ModuleList(
            [SSDDTransformerBlock(dim, num_heads, window, context_channels) for _ in range(num_layers)]
        )
        self.proj_out = nn.Linear(dim, dim)
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x: (B, dim, H, W) -> (B, dim, H, W)."""
        tokens = self.proj_in(group_norm(x, self.norm).permute(0, 2, 3, 1))  # (B, H, W, dim)
        for block in self.transformer_blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                tokens = self._gradient_checkpointing_func(block, tokens, context)
            else:
                tokens = block(tokens, context)
        return x + self.proj_out(tokens).permute(0, 3, 1, 2)


class Downsample(nn.Module):
    """3x3 convolution with stride 2 and symmetric zero padding 1."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class SSDDDownBlock(nn.Module):
    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        num_layers: int,
        temb_ch: int,
        ctx_ch: int,
        downsample: bool,
        groups: int,
    ):
        super().__init__()
        self.resnets = nn.ModuleList(
            [
                SSDDResnetBlock(in_ch if i == 0 else out_ch, out_ch, temb_ch, ctx_ch, groups)
                for i in range(num_layers)
            ]
        )
        self.downsamplers = nn.ModuleList([Downsample(out_ch)]) if downsample else None


class SSDDUpBlock(nn.Module):
    def __init__(
        self, in_widths: list[int], out_ch: int, temb_ch: int, ctx_ch: int, upsample: bool, groups: int
    ):
        super().__init__()
        self.resnets = nn.ModuleList([SSDDResnetBlock(w, out_ch, temb_ch, ctx_ch, groups) for w in in_widths])
        self.upsamplers = nn.ModuleList([Upsample2D(out_ch, use_conv=True)]) if upsample else None


# ------------------------------------------------------------------------------------------------
# Decoder
# ------------------------------------------------------------------------------------------------

PREDICTION_TYPES = ("velocity", "edm")


def edm_coefficients(t: torch.Tensor, sigma_data: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """EDM-style preconditioning of the flow ``x_t = (1 - t) x + t ε`` for data of std ``sigma_data``.

    The network F sees ``c_in · x_t`` (unit variance) and the clean-image estimate is
    ``x̂0 = c_skip · x_t + c_out · F`` with ``c_skip = (1 - t) σ² / s²``, ``c_out = t σ / s`` and
    ``s² = (1 - t)² σ² + t²`` (Karras et al. 2022, for this flow). Returns ``(c_in, a, b)`` with the
    velocity ``v̂ = (x̂0 - x_t) / t = a · x_t + b · F``, written without the division by t:
    ``a = ((1 - t) σ² - t) / s²``, ``b = σ / s``. At t = 1, ``x̂0 = σ · F``: the one-step output does not
    pass the starting noise through. t: (B,) float32; the results are (B,) float32.
    """
    keep = 1.0 - t
    variance = keep * keep * sigma_data**2 + t * t
    c_in = variance.rsqrt()
    return c_in, (keep * sigma_data**2 - t) / variance, sigma_data * c_in


class UViTDecoder(nn.Module):
    """Velocity network v = decoder(x_t, t, z) of SSDD.

    Args:
        latent_channels: channels Z of the conditioning latent.
        block_out_channels: width of each level (multiples of norm_groups); the last is the transformer width.
        layers_per_block: ResNet blocks per down level (up levels have one more).
        transformer_layers: depth of the middle transformer.
        attention_heads: heads of the middle transformer.
        attention_window: w; tokens attend to offsets within +-(w-1) on each axis.
        in_channels / out_channels: image channels.
        time_scale: t in [0, 1] is multiplied by this (in float32) before the sinusoidal embedding.
        prediction_type: what the network's output means. ``"velocity"`` (upstream SSDD): the output is
            v̂ itself. ``"edm"``: the output F is preconditioned as in EDM (:func:`edm_coefficients`), so
            the clean-image estimate at t = 1 is ``sigma_data · F`` and carries no starting noise; the
            decoder still returns the velocity.
        sigma_data: data standard deviation of the ``"edm"`` preconditioning (images in [-1, 1]: 0.5).
        norm_groups: groups of every GroupNorm (upstream: 32). With 32 channels, 32 groups normalise each
            channel on its own, which removes its mean and scale from the activation: narrow decoders learn
            much faster with fewer groups (the CPU presets use 8).
    """

    consults_norm_statistics = True  # tiled decoding passes pooled statistics, not hooks (``tiling``)

    def __init__(
        self,
        latent_channels: int = 4,
        block_out_channels: tuple[int, ...] = (96, 192, 288, 288),
        layers_per_block: int = 2,
        transformer_layers: int = 12,
        attention_heads: int = 4,
        attention_window: int = 8,
        in_channels: int = 3,
        out_channels: int = 3,
        time_scale: float = 1000.0,
        prediction_type: str = "velocity",
        sigma_data: float = 0.5,
        norm_groups: int = NORM_GROUPS,
    ):
        super().__init__()
        if norm_groups < 1 or any(width % norm_groups for width in block_out_channels):
            raise ValueError(
                "norm_groups must be a positive divisor of every decoder width; "
                f"got norm_groups={norm_groups} for block_out_channels={tuple(block_out_channels)}."
            )
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}; got {prediction_type!r}.")
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be positive; got {sigma_data}.")
        self.prediction_type = prediction_type
        self.sigma_data = float(sigma_data)
        widths = list(block_out_channels)
        base = widths[0]
        temb_ch = 4 * base
        levels = len(widths)
        self.time_scale = time_scale
        self.downsample_factor = 2 ** (levels - 1)
        self.in_channels = in_channels

        self.conv_in = nn.Conv2d(in_channels + latent_channels, base, 3, padding=1)
        self.time_embedding = TimestepEmbedding(base, temb_ch)
        self.ada_ctx_proj = nn.Sequential(
            nn.Conv2d(latent_channels, base, 3, padding=1), nn.SiLU(), nn.Conv2d(base, base, 3, padding=1)
        )

        self.down_blocks = nn.ModuleList()
        skip_widths = [base]
        previous = base
        for i, width in enumerate(widths):
            downsample = i < levels - 1
            self.down_blocks.append(
                SSDDDownBlock(previous, width, layers_per_block, temb_ch, base, downsample, norm_groups)
            )
            skip_widths += [width] * (layers_per_block + (1 if downsample else 0))
            previous = width

        self.mid_block = SSDDMidTransformer(
            widths[-1], transformer_layers, attention_heads, attention_window, base, norm_groups
        )

        self.up_blocks = nn.ModuleList()
        for u, width in enumerate(reversed(widths)):
            in_widths = []
            for _ in range(layers_per_block + 1):
                in_widths.append(previous + skip_widths.pop())
                previous = width
            self.up_blocks.append(SSDDUpBlock(in_widths, width, temb_ch, base, u < levels - 1, norm_groups))

        self.conv_norm_out = nn.GroupNorm(norm_groups, base, eps=1e-5)
        self.conv_out = nn.Conv2d(base, out_channels, 3, padding=1)
        self.gradient_checkpointing = False
        # Memory format of the convolutional trunk. None (auto): channels_last (NHWC) on CPU, where
        # oneDNN convolutions and GroupNorm are faster in it and the token permutes of the middle
        # transformer become free, under torch.compile (Inductor fuses the norms itself; measured
        # faster on an H200) and with the Triton norm kernels (which take NHWC, so no convolution needs
        # a layout transpose); NCHW in eager PyTorch mode elsewhere, where the eager GroupNorm kernels
        # need NCHW and the time modulation fuses into them. True/False force a format. Values agree up
        # to float rounding.
        self.channels_last: bool | None = None
        self._fused_norm_kernels: bool | None = None
        # Inference cache of the per-block time modulations of a scalar time (e.g. t = 1 of a one-step
        # decode): bounded, shared safely between threads, rebuilt when a weight changes.
        self._time_cache = BoundedCache(max_entries=TIME_CACHE_ENTRIES)

    @property
    def fused_norm_kernels(self) -> bool | None:
        """Whether eager inference runs every norm + modulation + SiLU as Triton kernels.

        None (default, automatic): on for CUDA tensors when Triton is installed, the fastest measured eager
        GPU path (H200, bf16, 256 px batch 64: 225 ms against 272 ms for the PyTorch NCHW path); off on
        CPU. True forces them on (any tensor they support, e.g. CPU tensors under ``TRITON_INTERPRET=1``),
        False off. They apply without autograd and outside ``torch.compile`` (Inductor fuses the norms
        itself); everything else keeps the PyTorch path. With the kernels on, the automatic layout is
        channels_last. Values match the PyTorch path to float rounding.
        """
        return self._fused_norm_kernels

    @fused_norm_kernels.setter
    def fused_norm_kernels(self, enabled: bool | None) -> None:
        if enabled and fused_norms.triton is None:
            raise RuntimeError("fused_norm_kernels needs Triton (pip install triton).")
        self._fused_norm_kernels = None if enabled is None else bool(enabled)
        for resnet in self._resnets():
            resnet.fused_norms_mode = self._fused_norm_kernels

    def _fused_kernels_on(self, device: torch.device) -> bool:
        if self._fused_norm_kernels is None:
            return device.type == "cuda" and fused_norms.triton is not None
        return self._fused_norm_kernels

    def _use_channels_last(self, device: torch.device) -> bool:
        if self.channels_last is not None:
            return bool(self.channels_last)
        return device.type == "cpu" or torch.compiler.is_compiling() or self._fused_kernels_on(device)

    def _resnets(self):
        """The ResNet blocks in the order ``forward`` runs them (down blocks, then up blocks)."""
        for block in (*self.down_blocks, *self.up_blocks):
            yield from block.resnets

    def _resnet(self, resnet: SSDDResnetBlock, h, modulation, context) -> torch.Tensor:
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(resnet, h, *modulation, context)
        return resnet(h, *modulation, context)

    def time_embed(self, t: torch.Tensor | float, batch: int, dtype: torch.dtype) -> torch.Tensor:
        """t: a number, a one-element tensor or (B,) in [0, 1] -> (batch, 4 * C0) embedding."""
        device = self.conv_in.weight.device
        if isinstance(t, (int, float)):  # made on the device: no host-to-device copy
            t = torch.full((batch,), float(t), dtype=torch.float32, device=device)
        else:
            t = torch.as_tensor(t, dtype=torch.float32, device=device)
            t = t.reshape(-1).expand(batch) if t.numel() == 1 else t.reshape(batch)
        emb = get_timestep_embedding(
            t.float() * self.time_scale,
            self.conv_in.out_channels,
            flip_sin_to_cos=True,
            downscale_freq_shift=0,
        )
        return self.time_embedding(emb.to(dtype))

    def time_modulations(
        self, t: torch.Tensor | float, batch: int, dtype: torch.dtype
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(1 + scale, shift) of every ResNet block's time-modulated norm, in ``forward`` order.

        A tensor ``t`` gives (B, C) pairs, computed on every call (training). A Python number is one time
        for the whole batch (``decode`` passes its time grid this way): the pairs are computed for one row,
        (1, C) each, and broadcast; in inference (no autograd, not compiling) they are cached, keyed by the
        time, dtype, device and the weights' storage and version counters. A one-step decode at t = 1
        therefore computes its time embedding and modulations once per model, not once per call.
        """
        key = None
        if isinstance(t, (int, float)):
            batch = 1
            if not torch.is_grad_enabled() and not torch.compiler.is_compiling():
                key = (float(t), dtype, self.conv_in.weight.device, self._time_weights_version())
                cached = self._time_cache.get(key)
                if cached is not None:
                    return cached
        temb = self.time_embed(t, batch, dtype)
        modulations = [resnet.time_modulation(temb) for resnet in self._resnets()]
        if key is not None:
            self._time_cache.put(key, modulations)
        return modulations

    def _time_weights_version(self) -> tuple[tuple[int, int], ...]:
        """Storage pointers and in-place version counters of every weight the time modulations use."""
        params = [*self.time_embedding.parameters()]
        for resnet in self._resnets():
            params += [resnet.time_emb_proj.weight, resnet.time_emb_proj.bias]
        return tuple((p.data_ptr(), p._version) for p in params)

    def _check_inputs(self, x_t: torch.Tensor, z: torch.Tensor) -> None:
        if x_t.ndim != 4 or x_t.shape[1] != self.in_channels:
            raise ValueError(
                f"x_t must be (batch, {self.in_channels}, height, width); got shape {tuple(x_t.shape)}."
            )
        if x_t.shape[-2] % self.downsample_factor or x_t.shape[-1] % self.downsample_factor:
            raise ValueError(
                f"x_t height and width must be multiples of {self.downsample_factor}; "
                f"got {x_t.shape[-2]}x{x_t.shape[-1]}."
            )
        latent_channels = self.ada_ctx_proj[0].in_channels
        if z.ndim != 4 or z.shape[1] != latent_channels or z.shape[0] != x_t.shape[0]:
            raise ValueError(
                f"z must be ({x_t.shape[0]}, {latent_channels}, h, w) to match x_t; "
                f"got shape {tuple(z.shape)}."
            )

    def forward(self, x_t: torch.Tensor, t: torch.Tensor | float, z: torch.Tensor) -> torch.Tensor:
        """x_t: (B, 3, H, W) noisy image; t: a number or (B,) in [0, 1] (1 = noise); z: (B, Z, h, w).

        Returns the velocity prediction (B, 3, H, W), an estimate of x_0 - noise.
        """
        self._check_inputs(x_t, z)
        if self.prediction_type == "velocity":
            return self._network(x_t, t, z)
        if isinstance(t, (int, float)):
            times = torch.full((x_t.shape[0],), float(t), dtype=torch.float32, device=x_t.device)
        else:
            times = (
                torch.as_tensor(t, dtype=torch.float32, device=x_t.device).reshape(-1).expand(x_t.shape[0])
            )
        c_in, c_skip, c_out = (
            c.view(-1, 1, 1, 1).to(x_t.dtype) for c in edm_coefficients(times, self.sigma_data)
        )
        return x_t * c_skip + c_out * self._network(x_t * c_in, t, z)

    def _stem(self, x_t: torch.Tensor, z: torch.Tensor, channels_last: bool) -> torch.Tensor:
        """conv_in of the noisy image and the nearest-upsampled latents: (B, 3 + Z, H, W) -> (B, C0, H, W).

        On CUDA the input is built in one buffer of the trunk's layout with its channels padded to a
        multiple of 8 by a zero channel (and the weight by zeros): with 3 + 4 = 7 channels cuDNN has no
        tensor-core kernel and falls back to a generic one (2 ms per 256 px batch-64 bf16 decode on an
        H200). The result is the same sum, up to float rounding.
        """
        height, width = x_t.shape[-2:]
        channels = x_t.shape[1] + z.shape[1]
        pad = -channels % 8
        if not x_t.is_cuda or not pad:
            h = torch.cat([x_t, _resize_nearest(z, (height, width))], dim=1)
            if channels_last:
                h = h.contiguous(memory_format=torch.channels_last)
            return self.conv_in(h)
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        h = x_t.new_empty((x_t.shape[0], channels + pad, height, width), memory_format=memory_format)
        h[:, : x_t.shape[1]].copy_(x_t)
        h[:, channels:].zero_()
        latents = h[:, x_t.shape[1] : channels]
        (lh, lw), f_y, f_x = z.shape[-2:], height // z.shape[-2], width // z.shape[-1]
        if height % lh or width % lw:
            latents.copy_(_resize_nearest(z, (height, width)))
        else:  # nearest upsampling by whole factors: a broadcast copy, no upsampled tensor in memory
            latents.unflatten(3, (lw, f_x)).unflatten(2, (lh, f_y)).copy_(z[:, :, :, None, :, None])
        weight = F.pad(self.conv_in.weight, (0, 0, 0, 0, 0, pad))
        return F.conv2d(h, weight, self.conv_in.bias, padding=self.conv_in.padding)

    def _network(self, x_t: torch.Tensor, t: torch.Tensor | float, z: torch.Tensor) -> torch.Tensor:
        """The U-ViT trunk: (B, 3, H, W) input, time and latents -> (B, 3, H, W) output."""
        z = z.to(x_t.dtype)
        modulations = iter(self.time_modulations(t, x_t.shape[0], x_t.dtype))
        channels_last = self._use_channels_last(x_t.device)
        # The context (and so every AdaGN's scale/shift) in the trunk's format: no per-block layout copies.
        context = self.ada_ctx_proj(z.contiguous(memory_format=torch.channels_last) if channels_last else z)

        h = self._stem(x_t, z, channels_last)
        skips = [h]
        for block in self.down_blocks:
            for resnet in block.resnets:
                h = self._resnet(resnet, h, next(modulations), context)
                skips.append(h)
            if block.downsamplers is not None:
                h = block.downsamplers[0](h)
                skips.append(h)

        h = self.mid_block(h, context)

        for block in self.up_blocks:
            for resnet in block.resnets:
                h = self._resnet(resnet, torch.cat([h, skips.pop()], dim=1), next(modulations), context)
            if block.upsamplers is not None:
                h = upsample_conv(block.upsamplers[0], h)

        norm = self.conv_norm_out
        if _fused_norms_apply(h, self._fused_norm_kernels):
            scale, shift = (p[None].expand(h.shape[0], -1) for p in (norm.weight, norm.bias))
            h = _fused_group_norm_modulate_silu(h, norm, scale, shift)
        else:
            h = F.silu(group_norm(h, norm), inplace=_inplace_ok())
        return self.conv_out(h).contiguous()
