"""GroupNorm + modulation + SiLU in two Triton kernels, for eager GPU inference (opt-in).

In eager mode each ResNet block of the decoder makes several full-resolution passes for its norms:
the GroupNorm kernel (statistics, then normalisation), the (scale, shift) modulation and the SiLU.
On GPUs these passes, not the convolutions, dominate the decode. Here one kernel computes the
per-(image, group) statistics and a second one normalises, modulates and applies SiLU: the activation
is read twice and written once.

The modulation ``y = norm(x) * scale + shift`` takes ``scale``/``shift`` per (image, channel), shape
(B, C), or per pixel on a coarser grid, shape (B, C, h, w) with H % h == W % w == 0 (each value
covers an (H/h) x (W/w) patch: the nearest-upsampled AdaGroupNorm parameters, never materialised).

Statistics use Welford's update in float32 (no E[x^2] - E[x]^2 cancellation); activations may be
fp32, bf16 or fp16, NCHW (one channel plane per program column) or channels_last (tiles of up to 64
channels, so the convolutions around them need no layout transposes). The kernels also run on CPU tensors
under Triton's interpreter (``TRITON_INTERPRET=1``), which is how the test suite checks them without a GPU.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
    triton = None

BLOCK = 1024  # elements per program tile in both kernels


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _is_channels_last(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def supports(x: torch.Tensor) -> bool:
    """Whether ``group_norm_modulate_silu`` can run on ``x``: a 4-D NCHW- or channels_last-contiguous CUDA
    tensor (any device when interpreting)."""
    dense = x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)
    return triton is not None and (x.is_cuda or interpreting()) and x.ndim == 4 and dense


if triton is not None:

    @triton.jit
    def _welford_combine(mean_a, m2_a, count_a, mean_b, m2_b, count_b):
        count = count_a + count_b
        weight_b = tl.where(count > 0, count_b / tl.maximum(count, 1.0), 0.0)
        delta = mean_b - mean_a
        return mean_a + delta * weight_b, m2_a + m2_b + delta * delta * count_a * weight_b, count

    @triton.jit
    def _group_stats_kernel(
        x_ptr,
        mean_ptr,
        rstd_ptr,
        num_groups,
        channels_per_group,
        num_pixels,
        stride_b,
        stride_c,
        stride_p,
        eps,
        BLOCK_P: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        """One program per (image, group): Welford over its (pixels x channels) tiles, BLOCK_C >= C/G."""
        program = tl.program_id(0)
        image, group = program // num_groups, program % num_groups
        base = x_ptr + image.to(tl.int64) * stride_b + (group * channels_per_group).to(tl.int64) * stride_c
        rows = tl.arange(0, BLOCK_P)[:, None]
        cols = tl.arange(0, BLOCK_C)[None, :]
        mean = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
        m2 = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
        count = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
        for start in range(0, num_pixels, BLOCK_P):
            pixels = start + rows
            valid = (pixels < num_pixels) & (cols < channels_per_group)
            value = tl.load(base + pixels.to(tl.int64) * stride_p + cols * stride_c, mask=valid, other=0.0)
            value = value.to(tl.float32)
            mean, m2, count = _welford_combine(
                mean, m2, count, value, tl.zeros_like(value), valid.to(tl.float32)
            )
        # Combine the per-lane partial results (Chan et al.): exact, and only built-in reductions.
        total = tl.sum(tl.sum(count, axis=1), axis=0)
        group_mean = tl.sum(tl.sum(mean * count, axis=1), axis=0) / total
        deviation = mean - group_mean
        group_m2 = tl.sum(tl.sum(m2 + count * deviation * deviation, axis=1), axis=0)
        tl.store(mean_ptr + program, group_mean)
        tl.store(rstd_ptr + program, 1.0 / tl.sqrt(group_m2 / total + eps))

    @triton.jit
    def _normalize_modulate_silu_kernel(
        x_ptr,
        out_ptr,
        mean_ptr,
        rstd_ptr,
        scale_ptr,
        shift_ptr,
        channels,
        channels_per_group,
        width,
        num_pixels,
        stride_b,
        stride_c,
        stride_p,
        patch_h,
        patch_w,
        stride_pb,
        stride_pc,
        stride_py,
        stride_px,
        HAS_PARAMS: tl.constexpr,
        PER_PIXEL: tl.constexpr,
        SCALE_PLUS_ONE: tl.constexpr,
        APPLY_SILU: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        """Program (image, pixel block, channel block) over a (BLOCK_P pixels x BLOCK_C channels) tile."""
        image = tl.program_id(0)
        pixels = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)[:, None]
        chans = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
        valid = (pixels < num_pixels) & (chans < channels)
        offsets = (
            image.to(tl.int64) * stride_b + chans.to(tl.int64) * stride_c + pixels.to(tl.int64) * stride_p
        )
        group = image * (channels // channels_per_group) + chans // channels_per_group
        mean = tl.load(mean_ptr + group, mask=chans < channels, other=0.0)
        rstd = tl.load(rstd_ptr + group, mask=chans < channels, other=0.0)
        y = (tl.load(x_ptr + offsets, mask=valid, other=0.0).to(tl.float32) - mean) * rstd
        if HAS_PARAMS:
            param = image.to(tl.int64) * stride_pb + chans.to(tl.int64) * stride_pc
            if PER_PIXEL:
                py = (pixels // width) // patch_h
                px = (pixels % width) // patch_w
                param = param + py * stride_py + px * stride_px
                scale = tl.load(scale_ptr + param, mask=valid, other=0.0).to(tl.float32)
                shift = tl.load(shift_ptr + param, mask=valid, other=0.0).to(tl.float32)
            else:
                scale = tl.load(scale_ptr + param, mask=chans < channels, other=0.0).to(tl.float32)
                shift = tl.load(shift_ptr + param, mask=chans < channels, other=0.0).to(tl.float32)
            if SCALE_PLUS_ONE:
                scale = scale + 1.0
            y = y * scale + shift
        if APPLY_SILU:
            y = y * tl.sigmoid(y)
        tl.store(out_ptr + offsets, y.to(out_ptr.dtype.element_ty), mask=valid)


def group_norm_modulate_silu(
    x: torch.Tensor,
    num_groups: int,
    eps: float,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    scale_plus_one: bool = False,
    silu: bool = True,
) -> torch.Tensor:
    """``silu(group_norm(x) * s + shift)`` with ``s = 1 + scale`` if ``scale_plus_one`` else ``scale``.

    x: (B, C, H, W), NCHW- or channels_last-contiguous; scale/shift: both None (plain GroupNorm without
    affine), (B, C), or (B, C, h, w) dividing (H, W), any strides. No autograd: inference only. Returns a
    new tensor in ``x``'s memory format.
    """
    if not supports(x):
        raise ValueError(
            "group_norm_modulate_silu needs Triton and an NCHW- or channels_last-contiguous 4-D CUDA tensor "
            f"(or TRITON_INTERPRET=1); got {x.device} tensor of shape {tuple(x.shape)}."
        )
    batch, channels, height, width = x.shape
    if channels % num_groups:
        raise ValueError(f"{channels} channels do not split into {num_groups} groups.")
    if (scale is None) != (shift is None):
        raise ValueError("Pass both scale and shift, or neither.")
    per_pixel, param_h, param_w, strides = False, 1, 1, (0, 0, 0, 0)
    if scale is not None:
        if scale.shape != shift.shape or scale.stride() != shift.stride():
            raise ValueError(f"scale {tuple(scale.shape)} and shift {tuple(shift.shape)} must match.")
        if scale.ndim == 2 and tuple(scale.shape) == (batch, channels):
            strides = (scale.stride(0), scale.stride(1), 0, 0)
        elif scale.ndim == 4 and tuple(scale.shape[:2]) == (batch, channels):
            per_pixel, (param_h, param_w) = True, scale.shape[2:]
            if height % param_h or width % param_w:
                raise ValueError(f"Parameter grid {param_h}x{param_w} does not divide {height}x{width}.")
            strides = scale.stride()
        else:
            raise ValueError(f"scale must be ({batch}, {channels}) or ({batch}, {channels}, h, w).")
    mean = torch.empty(batch * num_groups, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    channels_per_group = channels // num_groups
    stride_b, stride_c, _, stride_p = x.stride()  # pixels (y, x) flatten with stride_p in both layouts
    nhwc = _is_channels_last(x)
    group_block = triton.next_power_of_2(channels_per_group)
    _group_stats_kernel[(batch * num_groups,)](
        x, mean, rstd, num_groups, channels_per_group, height * width, stride_b, stride_c, stride_p, eps,
        BLOCK_P=max(BLOCK // group_block, 1), BLOCK_C=group_block,
    )  # fmt: skip
    out = torch.empty_like(x)  # same memory format as x
    block_c = min(triton.next_power_of_2(channels), 64) if nhwc else 1
    block_p = BLOCK // block_c
    grid = (batch, triton.cdiv(height * width, block_p), triton.cdiv(channels, block_c))
    params = (scale, shift) if scale is not None else (mean, mean)  # unused pointers when no params
    _normalize_modulate_silu_kernel[grid](
        x, out, mean, rstd, *params,
        channels, channels_per_group, width, height * width, stride_b, stride_c, stride_p,
        height // param_h, width // param_w, *strides,
        HAS_PARAMS=scale is not None, PER_PIXEL=per_pixel, SCALE_PLUS_ONE=scale_plus_one, APPLY_SILU=silu,
        BLOCK_P=block_p, BLOCK_C=block_c,
    )  # fmt: skip
    return out
