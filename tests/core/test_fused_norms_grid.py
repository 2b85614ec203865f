"""Launch geometry of the Triton norm kernels: grids within CUDA's limits for any image size and batch.

The launch functions are pure, so the limits are checked here without running kernels; one interpreted run
(a subprocess with ``TRITON_INTERPRET=1``) covers a shape whose old grid went past the 65535 limit.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap

import pytest

from ssdd_diffusers.models import fused_norms

DTYPE_POINTERS = {"x_ptr", "out_ptr", "scale_ptr", "shift_ptr"}  # the activation's dtype; others float32

CHANNELS = (32, 33, 48, 64, 96, 128, 160, 192, 288, 384, 512)
SIZES = (256, 512, 1024, 2048, 4096)
BATCHES = (1, 4, 16, 64)


def old_normalize_grid(batch: int, channels: int, height: int, width: int, channels_last: bool) -> tuple:
    """The grid the normalisation kernel had before (image, pixel block, channel block): failed at 1024 px."""
    block_c = min(fused_norms._next_power_of_2(channels), 64) if channels_last else 1
    block_p = 1024 // block_c
    return batch, fused_norms._cdiv(height * width, block_p), fused_norms._cdiv(channels, block_c)


def within_limits(grid: tuple[int, ...]) -> bool:
    return len(grid) <= 3 and all(0 < size <= limit for size, limit in zip(grid, fused_norms.MAX_GRID))


def test_old_grid_exceeded_the_limit_at_1024_px() -> None:
    """The measured failure ("invalid argument" at 1024 px) is the old grid's axis 1 past 65535."""
    assert not within_limits(old_normalize_grid(1, 64, 1024, 1024, True))
    assert within_limits(old_normalize_grid(1, 64, 768, 768, True))  # 768 px worked on the H200
    # The cheapest old failure (33 channels, 911 x 1151 = 65536 * 16 - 15 pixels) is the interpreted shape.
    assert not within_limits(old_normalize_grid(1, 33, 911, 1151, True))
    assert within_limits(old_normalize_grid(1, 33, 911, 1150, True))


@pytest.mark.parametrize("size", SIZES)
def test_grids_stay_within_cuda_limits(size: int) -> None:
    """Full-resolution decoder activations, 32..512 channels, batch 1..64, both layouts."""
    for channels, batch, channels_last in itertools.product(CHANNELS, BATCHES, (False, True)):
        groups = 32 if channels % 32 == 0 else 1
        shape = (batch, channels, size, size)
        norm = fused_norms._normalize_launch(*shape, channels_last)
        stats = fused_norms._stats_launch(batch, channels, groups, size, size, channels_last)
        assert within_limits(norm.grid) and within_limits(stats.partials_grid), (shape, norm, stats)
        assert within_limits(stats.combine_grid)
        # The normalisation programs tile the activation exactly once.
        assert norm.block_p * norm.block_c <= fused_norms.NORM_TILE
        pixel_blocks = fused_norms._cdiv(size * size, norm.block_p)
        assert norm.grid[0] == batch * pixel_blocks * fused_norms._cdiv(channels, norm.block_c)
        # Chunks are whole tiles and cover the image; partials <= 8 bytes per channel per 256 pixels.
        assert stats.chunk % stats.block_p == 0 and stats.block_p * stats.block_c <= fused_norms.STATS_TILE
        assert (stats.num_chunks - 1) * stats.chunk < size * size <= stats.num_chunks * stats.chunk
        assert stats.chunk >= fused_norms.STATS_MIN_CHUNK
        assert stats.partials_grid[0] == batch * stats.num_chunks
        assert stats.partials_grid[0] <= 2 * fused_norms.STATS_PROGRAMS or stats.chunk == size * size


@pytest.mark.parametrize(
    ("batch", "size", "chunk", "programs"), [(64, 256, 512, 8192), (1, 1024, 256, 4096), (4, 1024, 512, 8192)]
)
def test_statistics_have_thousands_of_programs_and_small_partials(
    batch: int, size: int, chunk: int, programs: int
) -> None:
    for channels in (64, 96, 128, 192, 288):
        stats = fused_norms._stats_launch(batch, channels, 32, size, size, True)
        assert (stats.chunk, stats.partials_grid[0]) == (chunk, programs)
        assert 8 / (2 * stats.chunk) <= 1 / 64  # partials / bf16 activation bytes
        assert stats.combine_grid == (batch * 32,)
        # Stage 2 (one program per image and group) merges its partials in at most 9 serial tiles.
        partials = channels // 32 * stats.num_chunks
        assert fused_norms._cdiv(partials, fused_norms.COMBINE_TILE) <= 9


def test_tiles_fit_the_channel_count() -> None:
    """channels_last tiles: powers of two with at least 3/4 real channels where possible."""
    blocks = {c: fused_norms._channel_block(c, 128) for c in (32, 33, 64, 96, 160, 192, 288, 320, 512)}
    assert blocks == {32: 32, 33: 64, 64: 64, 96: 128, 160: 64, 192: 128, 288: 128, 320: 128, 512: 128}
    assert [fused_norms._channel_block(c, 64) for c in (96, 160, 288)] == [64, 64, 64]
    nchw = fused_norms._stats_launch(2, 96, 32, 40, 44, False)
    assert (nchw.block_p, nchw.block_c, nchw.chunk, nchw.num_chunks) == (512, 8, 512, 4)
    tiny = fused_norms._stats_launch(1, 32, 32, 2, 2, True)  # 4 pixels: one chunk, one tile
    assert (tiny.block_p, tiny.chunk, tiny.num_chunks, tiny.combine_block) == (4, 4, 1, 1)


@pytest.mark.parametrize(
    ("kernel", "constexprs"),
    [
        ("_partial_stats_kernel", {"stride_c": 1, "BLOCK_P": 32, "BLOCK_C": 128}),  # channels_last
        ("_partial_stats_kernel", {"stride_p": 1, "BLOCK_P": 512, "BLOCK_C": 8}),  # NCHW
        ("_combine_stats_kernel", {"stride_c": 1, "BLOCK": 4096}),
        ("_normalize_modulate_silu_kernel", {"stride_c": 1, "PER_PIXEL": True, "BLOCK_P": 16, "BLOCK_C": 64}),
        (
            "_normalize_modulate_silu_kernel",
            {"stride_p": 1, "PER_PIXEL": False, "BLOCK_P": 256, "BLOCK_C": 4},
        ),
    ],
)
def test_kernels_compile_for_sm90_without_a_gpu(kernel: str, constexprs: dict, monkeypatch, tmp_path) -> None:
    """Triton's front end is laxer in the interpreter: compile to a cubin (ptxas ships with Triton)."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if fused_norms.interpreting():
        pytest.skip("the kernels are interpreted functions under TRITON_INTERPRET=1")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    fn = getattr(fused_norms, kernel)
    flags = {"HAS_PARAMS": True, "SCALE_PLUS_ONE": True, "APPLY_SILU": True}
    constexprs = {name: value for name, value in {**flags, **constexprs}.items() if name in fn.arg_names}
    signature = {
        name: "constexpr" if name in constexprs
        else ("*bf16" if name in DTYPE_POINTERS else "*fp32") if name.endswith("_ptr")
        else "fp32" if name == "eps"
        else "i64" if name in ("stride_b", "m2_offset")
        else "i32"
        for name in fn.arg_names
    }  # fmt: skip
    # As a launch specialises them: 16-byte aligned pointers and sizes that are multiples of 16.
    aligned = {"channels", "num_pixels", "chunk", "width", "stride_b", "stride_c", "stride_p", "m2_offset"}
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, (name, kind) in enumerate(signature.items())
        if kind[0] == "*" or (name in aligned and kind[0] == "i")
    }
    try:
        compiled = triton.compile(
            ASTSource(fn, signature, constexprs, attrs),
            target=GPUTarget("cuda", 90, 32),
            options={"num_warps": 8 if kernel == "_combine_stats_kernel" else 4},  # as launched
        )
    except RuntimeError as error:  # no CUDA backend or ptxas in this Triton build
        pytest.skip(f"cannot compile for sm_90 here: {error}")
    assert compiled.asm["cubin"]
    if kernel != "_combine_stats_kernel":  # 16-byte loads of the activation
        assert "ld.global.v4" in compiled.asm["ptx"]


# 33 channels, 911 x 1151 pixels: the old grid had 65536 pixel blocks on axis 1. The interpreter runs one
# Python call per program, so the check raises the tile sizes (same kernels, fewer and larger programs:
# 64 normalisation programs, 32 statistics chunks of 8 tiles). The reference is float64: PyTorch's float32
# CPU GroupNorm is off by ~1e-3 over 11.5M values per group.
PAST_OLD_LIMIT = textwrap.dedent(
    """
    import torch
    import torch.nn.functional as F

    from ssdd_diffusers.models import fused_norms

    assert fused_norms.interpreting()
    torch.manual_seed(0)
    fused_norms.NORM_TILE, fused_norms.STATS_TILE, fused_norms.STATS_MIN_CHUNK = 1 << 20, 1 << 18, 1 << 15
    x = (torch.randn(1, 33, 911, 1151) + 2).contiguous(memory_format=torch.channels_last)
    launch = fused_norms._stats_launch(1, 33, 3, 911, 1151, True)
    assert (launch.num_chunks, launch.chunk // launch.block_p) == (32, 8), launch
    mean, rstd = fused_norms.group_stats(x, 3, 1e-5)
    grouped = x.contiguous().double().view(1, 3, -1)  # (B, G, C/G * H * W)
    torch.testing.assert_close(mean.double(), grouped.mean(-1), atol=1e-6, rtol=0)
    expected = (grouped.var(-1, unbiased=False) + 1e-5).rsqrt()
    torch.testing.assert_close(rstd.double(), expected, rtol=1e-6, atol=0)
    del grouped
    scale, shift = torch.randn(1, 33, 1, 1151), torch.randn(1, 33, 1, 1151)  # per-column modulation
    got = fused_norms.group_norm_modulate_silu(x, 3, 1e-5, scale, shift, stats=(mean, rstd))
    assert got.is_contiguous(memory_format=torch.channels_last)
    expected = F.silu(F.group_norm(x.double(), 3, eps=1e-5).mul_(scale).add_(shift))
    torch.testing.assert_close(got, expected.float(), atol=1e-5, rtol=1e-5)
    print("ok")
    """
)


@pytest.mark.slow  # ~10 s of interpretation: the smallest shape past the old limit has 35M values
def test_shape_past_the_old_grid_limit_under_the_triton_interpreter() -> None:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, "-c", PAST_OLD_LIMIT], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "ok"
