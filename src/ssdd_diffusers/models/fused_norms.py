"""GroupNorm + modulation + SiLU in Triton kernels, for eager GPU inference (opt-in).

In eager mode each ResNet block of the decoder makes several full-resolution passes for its norms:
the GroupNorm kernel (statistics, then normalisation), the (scale, shift) modulation and the SiLU.
On GPUs these passes, not the convolutions, dominate the decode. Here the activation is read twice and
written once:

1. statistics, a two-stage reduction. Stage 1 has one program per (image, chunk of pixels): it reads
   (pixels x channels) tiles, coalesced in both layouts, and writes per-channel partial (mean, M2) in
   float32, a tile's mean then its squared deviations (no E[x^2] - E[x]^2 cancellation), the tiles merged
   with Chan's formula. Stage 2 has one program per (image, group) and merges the partials of the group's
   channels over all chunks into mean and rstd. Chunks are sized for thousands of stage-1 programs and
   partials of about 1% of the activation's bytes (``_stats_launch``);
2. normalisation, modulation and SiLU, one program per (pixels x channels) tile (``_normalize_launch``).

Both launch on 1-D grids (CUDA allows 2^31 - 1 programs on grid axis 0, only 65535 on axes 1 and 2), so
any image size and batch fits; offsets are int64. ``group_stats`` runs the statistics alone, and
``group_norm_modulate_silu(..., stats=(mean, rstd))`` normalises with given statistics (tiled decoding).

The modulation ``y = norm(x) * scale + shift`` takes ``scale``/``shift`` per (image, channel), shape
(B, C), or per pixel on a coarser grid, shape (B, C, h, w) with H % h == W % w == 0 (each value
covers an (H/h) x (W/w) patch: the nearest-upsampled AdaGroupNorm parameters, never materialised).

Activations may be fp32, bf16 or fp16, NCHW or channels_last (so the convolutions around the kernels need
no layout transposes). The kernels also run on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1``), which is how the test suite checks them without a GPU.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
    triton = None

#: CUDA's grid limits, axes (x, y, z).
MAX_GRID = (2**31 - 1, 65535, 65535)
#: Elements per normalisation program and per statistics tile (module attributes, so tests can raise them).
NORM_TILE = 1024
STATS_TILE = 4096
#: Statistics chunks: at least this many pixels (partials <= 8 bytes per channel per chunk) ...
STATS_MIN_CHUNK = 256
#: ... and about this many stage-1 programs when the activation is large enough.
STATS_PROGRAMS = 8192
#: Partial statistics per stage-2 tile (8 warps): few tiles even for a handful of large images.
COMBINE_TILE = 4096


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


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _channel_block(channels: int, cap: int) -> int:
    """Channels per channels_last tile: all of them (padded to a power of two) up to ``cap``, else the
    widest power of two >= 16 whose blocks are at least 3/4 real channels, else the one with the fewest
    padded channels (cap 64: 96 -> 64, 288 -> 64; cap 128: 160 -> 64, 288 -> 128)."""
    if channels <= cap:
        return _next_power_of_2(channels)
    sizes = [cap >> i for i in range(cap.bit_length()) if cap >> i >= 16] or [cap]
    used = [channels / (_cdiv(channels, size) * size) for size in sizes]
    return next((size for size, u in zip(sizes, used) if u >= 0.75), sizes[used.index(max(used))])


class NormalizeLaunch(NamedTuple):
    grid: tuple[int]  # (image * channel blocks * pixel blocks,), pixel blocks fastest
    block_p: int
    block_c: int


class StatsLaunch(NamedTuple):
    partials_grid: tuple[int]  # stage 1: (image * chunks,)
    combine_grid: tuple[int]  # stage 2: (image * groups,)
    chunk: int  # pixels per stage-1 program, a multiple of block_p
    num_chunks: int  # per image
    block_p: int
    block_c: int
    combine_block: int


def _normalize_launch(
    batch: int, channels: int, height: int, width: int, channels_last: bool
) -> NormalizeLaunch:
    """Grid and (BLOCK_P pixels x BLOCK_C channels) tile of the normalisation kernel: channels_last tiles
    are up to 64 channels wide, NCHW ones runs of up to 256 pixels of a few channels."""
    if channels_last:
        block_c = _channel_block(channels, 64)
        block_p = max(NORM_TILE // block_c, 1)
    else:
        block_p = min(256, NORM_TILE, _next_power_of_2(height * width))
        block_c = min(max(NORM_TILE // block_p, 1), _next_power_of_2(channels))
    programs = batch * _cdiv(channels, block_c) * _cdiv(height * width, block_p)
    return NormalizeLaunch((programs,), block_p, block_c)


def _stats_launch(
    batch: int, channels: int, num_groups: int, height: int, width: int, channels_last: bool
) -> StatsLaunch:
    """Grids, chunk and tiles of the two statistics kernels.

    Stage 1 reads (block_p x block_c) tiles: channels_last ones up to 128 channels wide (a contiguous run
    per pixel), NCHW ones 512-pixel runs of a few channels. A chunk is the smallest power of two >=
    STATS_MIN_CHUNK pixels giving at most ~STATS_PROGRAMS programs, so the partials, 2 float32 per
    (image, channel, chunk), are at most 8 / (STATS_MIN_CHUNK * itemsize) of the activation's bytes.
    """
    pixels = height * width
    pixel_cap = _next_power_of_2(pixels)
    if channels_last:
        block_c = _channel_block(channels, 128)
        block_p = min(max(STATS_TILE // block_c, 1), pixel_cap)
    else:
        block_p = min(512, STATS_TILE, pixel_cap)
        block_c = min(max(STATS_TILE // block_p, 1), _next_power_of_2(channels))
    chunk = max(_next_power_of_2(_cdiv(batch * pixels, STATS_PROGRAMS)), STATS_MIN_CHUNK)
    chunk = max(min(chunk, pixel_cap), block_p)
    num_chunks = _cdiv(pixels, chunk)
    combine_block = min(COMBINE_TILE, _next_power_of_2(channels // num_groups * num_chunks))
    return StatsLaunch(
        (batch * num_chunks,), (batch * num_groups,), chunk, num_chunks, block_p, block_c, combine_block
    )


if triton is not None:

    @triton.jit
    def _partial_stats_kernel(
        x_ptr,
        partial_ptr,
        channels,
        num_pixels,
        chunk,
        num_chunks,
        stride_b,
        stride_c,
        stride_p,
        m2_offset,
        BLOCK_P: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        """Program (image, chunk): per-channel (mean, M2) of the chunk's pixels into partials, laid out as
        (2, B, C, chunks) float32.

        Values are shifted by the channel's first pixel in the image (means are stored shifted, so large
        means keep their precision), each (BLOCK_P x BLOCK_C) tile reduced to its mean and squared
        deviations, and the tiles merged with Chan's formula.
        """
        program = tl.program_id(0)
        image = program // num_chunks
        index = program % num_chunks
        first = index * chunk
        last = tl.minimum(first + chunk, num_pixels)
        base = x_ptr + image.to(tl.int64) * stride_b
        rows = tl.arange(0, BLOCK_P)[:, None]
        for c0 in range(0, channels, BLOCK_C):
            chans = c0 + tl.arange(0, BLOCK_C)
            in_range = chans < channels
            col = chans.to(tl.int64) * stride_c
            shift = tl.load(base + col, mask=in_range, other=0.0).to(tl.float32)
            mean = tl.zeros([BLOCK_C], dtype=tl.float32)
            m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
            for start in range(first, last, BLOCK_P):
                pixels = start + rows
                valid = (pixels < last) & in_range[None, :]
                value = tl.load(base + pixels.to(tl.int64) * stride_p + col[None, :], mask=valid, other=0.0)
                value = tl.where(valid, value.to(tl.float32) - shift[None, :], 0.0)
                count = tl.minimum(last - start, BLOCK_P).to(tl.float32)
                tile_mean = tl.sum(value, axis=0) / count
                deviation = tl.where(valid, value - tile_mean[None, :], 0.0)
                tile_m2 = tl.sum(deviation * deviation, axis=0)
                seen = (start - first).to(tl.float32)
                weight = count / (seen + count)
                delta = tile_mean - mean
                mean = mean + delta * weight
                m2 = m2 + tile_m2 + delta * delta * seen * weight
            out = (image.to(tl.int64) * channels + chans) * num_chunks + index
            tl.store(partial_ptr + out, mean, mask=in_range)
            tl.store(partial_ptr + m2_offset + out, m2, mask=in_range)

    @triton.jit
    def _combine_stats_kernel(
        x_ptr,
        partial_ptr,
        mean_ptr,
        rstd_ptr,
        num_groups,
        channels_per_group,
        num_pixels,
        chunk,
        num_chunks,
        m2_offset,
        stride_b,
        stride_c,
        eps,
        BLOCK: tl.constexpr,
    ):
        """Program (image, group): merge the group's (channel, chunk) partials, a contiguous run of
        C/G * chunks, into mean and rstd (Chan's formula). Partial means are relative to their channel's
        first pixel; adding that pixel's difference to the group's first one puts them on a common shift
        without adding the (possibly large) means themselves."""
        program = tl.program_id(0)
        length = channels_per_group * num_chunks
        base = partial_ptr + program.to(tl.int64) * length
        first_channel = (program % num_groups) * channels_per_group
        x_base = x_ptr + (program // num_groups).to(tl.int64) * stride_b
        shift = tl.load(x_base + first_channel.to(tl.int64) * stride_c).to(tl.float32)
        mean = tl.zeros([], dtype=tl.float32)
        m2 = tl.zeros([], dtype=tl.float32)
        seen = tl.zeros([], dtype=tl.float32)
        for start in range(0, length, BLOCK):
            index = start + tl.arange(0, BLOCK)
            valid = index < length
            channel = first_channel + index // num_chunks
            channel_shift = tl.load(x_base + channel.to(tl.int64) * stride_c, mask=valid, other=0.0)
            part_mean = tl.load(base + index, mask=valid, other=0.0) + (channel_shift.to(tl.float32) - shift)
            part_m2 = tl.load(base + m2_offset + index, mask=valid, other=0.0)
            first = (index % num_chunks) * chunk
            count = tl.where(valid, tl.minimum(num_pixels - first, chunk), 0).to(tl.float32)
            tile_count = tl.sum(count, axis=0)
            tile_mean = tl.sum(count * part_mean, axis=0) / tile_count
            deviation = part_mean - tile_mean
            tile_m2 = tl.sum(part_m2 + count * deviation * deviation, axis=0)
            total = seen + tile_count
            weight = tile_count / total
            delta = tile_mean - mean
            mean = mean + delta * weight
            m2 = m2 + tile_m2 + delta * delta * seen * weight
            seen = total
        tl.store(mean_ptr + program, mean + shift)
        tl.store(rstd_ptr + program, 1.0 / tl.sqrt(m2 / seen + eps))

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
        """Program (image, channel block, pixel block) of a 1-D grid over a (BLOCK_P x BLOCK_C) tile."""
        program = tl.program_id(0)
        pixel_blocks = tl.cdiv(num_pixels, BLOCK_P)
        channel_blocks = tl.cdiv(channels, BLOCK_C)
        image = program // (pixel_blocks * channel_blocks)
        pixels = (program % pixel_blocks) * BLOCK_P + tl.arange(0, BLOCK_P)[:, None]
        chans = (program // pixel_blocks % channel_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
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
                param = param + py.to(tl.int64) * stride_py + px.to(tl.int64) * stride_px
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


def _check_input(x: torch.Tensor, num_groups: int) -> None:
    if not supports(x):
        raise ValueError(
            "The fused norm kernels need Triton and an NCHW- or channels_last-contiguous 4-D CUDA tensor "
            f"(or TRITON_INTERPRET=1); got {x.device} tensor of shape {tuple(x.shape)}."
        )
    if x.shape[1] % num_groups:
        raise ValueError(f"{x.shape[1]} channels do not split into {num_groups} groups.")


def _check_grid(grid: tuple[int, ...]) -> None:
    if any(size > limit for size, limit in zip(grid, MAX_GRID)):
        raise ValueError(f"Launch grid {grid} exceeds CUDA's limits {MAX_GRID}.")


def _group_stats(x: torch.Tensor, num_groups: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat (B * G,) float32 mean and rstd of a checked, non-empty x."""
    batch, channels, height, width = x.shape
    launch = _stats_launch(batch, channels, num_groups, height, width, _is_channels_last(x))
    _check_grid(launch.partials_grid)
    _check_grid(launch.combine_grid)
    partials = torch.empty(2, batch, channels, launch.num_chunks, device=x.device, dtype=torch.float32)
    mean = torch.empty(batch * num_groups, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    stride_b, stride_c, _, stride_p = x.stride()  # pixels (y, x) flatten with stride_p in both layouts
    pixels, m2_offset = height * width, partials[1].numel()
    _partial_stats_kernel[launch.partials_grid](
        x, partials, channels, pixels, launch.chunk, launch.num_chunks, stride_b, stride_c, stride_p,
        m2_offset, BLOCK_P=launch.block_p, BLOCK_C=launch.block_c,
    )  # fmt: skip
    _combine_stats_kernel[launch.combine_grid](
        x, partials, mean, rstd, num_groups, channels // num_groups, pixels, launch.chunk, launch.num_chunks,
        m2_offset, stride_b, stride_c, eps, BLOCK=launch.combine_block, num_warps=8,
    )  # fmt: skip
    return mean, rstd


def group_stats(x: torch.Tensor, num_groups: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(image, group) GroupNorm statistics of x (B, C, H, W), NCHW- or channels_last-contiguous:
    ``(mean, rstd)``, float32 (B, G) each, rstd = 1 / sqrt(biased variance + eps)."""
    _check_input(x, num_groups)
    if x.numel() == 0:
        empty = torch.full((x.shape[0], num_groups), float("nan"), device=x.device, dtype=torch.float32)
        return empty, empty.clone()
    mean, rstd = _group_stats(x, num_groups, eps)
    return mean.view(-1, num_groups), rstd.view(-1, num_groups)


def _flat_stats(
    stats: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor, num_groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Given (mean, rstd), (B, G) or (B * G,) float32 each, as contiguous flat tensors on x's device."""
    mean, rstd = stats
    size = x.shape[0] * num_groups
    for name, value in (("mean", mean), ("rstd", rstd)):
        if value.dtype != torch.float32 or value.numel() != size or value.device != x.device:
            raise ValueError(
                f"stats {name} must be a float32 ({x.shape[0]}, {num_groups}) tensor on {x.device}; got "
                f"{value.dtype} {tuple(value.shape)} on {value.device}."
            )
    return mean.reshape(-1).contiguous(), rstd.reshape(-1).contiguous()


def group_norm_modulate_silu(
    x: torch.Tensor,
    num_groups: int,
    eps: float,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    scale_plus_one: bool = False,
    silu: bool = True,
    stats: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``silu(group_norm(x) * s + shift)`` with ``s = 1 + scale`` if ``scale_plus_one`` else ``scale``.

    x: (B, C, H, W), NCHW- or channels_last-contiguous; scale/shift: both None (plain GroupNorm without
    affine), (B, C), or (B, C, h, w) dividing (H, W), any strides; stats: None (computed here) or given
    ``(mean, rstd)``, float32 (B, G) or (B * G,) each (``eps`` is then unused). No autograd: inference
    only. Returns a new tensor in ``x``'s memory format.
    """
    _check_input(x, num_groups)
    batch, channels, height, width = x.shape
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
    given = None if stats is None else _flat_stats(stats, x, num_groups)
    out = torch.empty_like(x)  # same memory format as x
    if x.numel() == 0:
        return out
    mean, rstd = given or _group_stats(x, num_groups, eps)
    nhwc = _is_channels_last(x)
    launch = _normalize_launch(batch, channels, height, width, nhwc)
    _check_grid(launch.grid)
    stride_b, stride_c, _, stride_p = x.stride()
    params = (scale, shift) if scale is not None else (mean, mean)  # unused pointers when no params
    _normalize_modulate_silu_kernel[launch.grid](
        x, out, mean, rstd, *params,
        channels, channels // num_groups, width, height * width, stride_b, stride_c, stride_p,
        height // param_h, width // param_w, *strides,
        HAS_PARAMS=scale is not None, PER_PIXEL=per_pixel, SCALE_PLUS_ONE=scale_plus_one, APPLY_SILU=silu,
        BLOCK_P=launch.block_p, BLOCK_C=launch.block_c,
    )  # fmt: skip
    return out
