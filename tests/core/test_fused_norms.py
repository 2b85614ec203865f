"""The Triton GroupNorm + modulation + SiLU kernels, run on CPU through Triton's interpreter.

``TRITON_INTERPRET=1`` must be set before the kernels are defined, so the interpreted checks run in
subprocesses (the kernels against PyTorch, then the whole decoder); the gating (when the decoder uses the
kernels) is checked in-process. Launch grids and the sm_90 compilation: ``test_fused_norms_grid.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers.configs import TWO_LEVEL_DECODER_CONFIG

from ssdd_diffusers.models import fused_norms
from ssdd_diffusers.models.uvit_decoder import UViTDecoder

pytestmark = pytest.mark.skipif(fused_norms.triton is None, reason="Triton is not installed")

# Kernel numerics against PyTorch (float32 tight, bf16 within one ulp), both layouts, both kinds of
# modulation, the two-stage statistics (several chunks, tiles and channel blocks) and given statistics.
KERNEL_CHECKS = textwrap.dedent(
    """
    import torch
    import torch.nn.functional as F

    from ssdd_diffusers.models import fused_norms

    assert fused_norms.interpreting() and fused_norms.supports(torch.zeros(1, 1, 1, 1))
    torch.manual_seed(0)
    up = lambda t, size: F.interpolate(t, size=size, mode="nearest")  # noqa: E731
    run = fused_norms.group_norm_modulate_silu

    def check_stats(x, groups, eps=1e-5, atol=1e-6):  # group_stats against float64; atol in stds
        mean, rstd = fused_norms.group_stats(x, groups, eps)
        assert mean.shape == rstd.shape == (x.shape[0], groups) and mean.dtype == torch.float32
        grouped = x.double().contiguous().view(x.shape[0], groups, -1)
        torch.testing.assert_close(mean.double(), grouped.mean(-1), atol=atol * grouped.std(-1).max(), rtol=0)
        expected = (grouped.var(-1, unbiased=False) + eps).rsqrt()
        torch.testing.assert_close(rstd.double(), expected, rtol=1e-5, atol=0)
        return mean, rstd

    # 20 x 22 pixels: 440 per image, not a multiple of the tiles or of the 256-pixel chunks.
    x = torch.randn(2, 64, 20, 22) * 3 + 5
    check_stats(x, 32)
    reference = F.group_norm(x, 32, eps=1e-5)
    torch.testing.assert_close(run(x, 32, 1e-5, silu=False), reference, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(run(x, 32, 1e-5), F.silu(reference), atol=2e-5, rtol=1e-5)

    scale, shift = torch.randn(2, 64), torch.randn(2, 64)
    expected = F.silu(reference * scale[:, :, None, None] + shift[:, :, None, None])
    torch.testing.assert_close(run(x, 32, 1e-5, scale, shift), expected, atol=2e-5, rtol=1e-5)

    params = torch.randn(2, 128, 5, 11)  # AdaGN: chunked (non-contiguous) views at 1/4 x 1/2 resolution
    scale, shift = params.chunk(2, dim=1)
    expected = F.silu(reference * (1 + up(scale, (20, 22))) + up(shift, (20, 22)))
    got = run(x, 32, 1e-5, scale, shift, scale_plus_one=True)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)

    # channels_last (NHWC) input: the same values, and the output keeps the memory format; 96 channels
    # in a statistics tile of 128 and normalisation tiles of 64, 3 channels per group.
    nhwc = (torch.randn(2, 96, 20, 22) * 3 + 5).contiguous(memory_format=torch.channels_last)
    check_stats(nhwc, 32)
    reference = F.group_norm(nhwc.contiguous(), 32, eps=1e-5)
    plain = run(nhwc, 32, 1e-5, silu=False)
    assert plain.is_contiguous(memory_format=torch.channels_last) and not plain.is_contiguous()
    torch.testing.assert_close(plain, reference, atol=2e-5, rtol=1e-5)
    c_scale, c_shift = torch.randn(2, 96), torch.randn(2, 96)
    expected = F.silu(reference * c_scale[:, :, None, None] + c_shift[:, :, None, None])
    torch.testing.assert_close(run(nhwc, 32, 1e-5, c_scale, c_shift), expected, atol=2e-5, rtol=1e-5)
    nhwc_params = torch.randn(2, 192, 5, 11).contiguous(memory_format=torch.channels_last)
    p_scale, p_shift = nhwc_params.chunk(2, dim=1)
    expected = F.silu(reference * (1 + up(p_scale, (20, 22))) + up(p_shift, (20, 22)))
    got = run(nhwc, 32, 1e-5, p_scale, p_shift, scale_plus_one=True)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)

    # Statistics layouts: 288 channels (statistics channel blocks 128 + 128 + 32, 9 per group); one group
    # of 64 channels x 20 chunks (1280 partials: stage-2 tiles of 512, 512, 256 with COMBINE_TILE 512);
    # one chunk of many tiles per image.
    wide = (torch.randn(2, 288, 12, 10) * 2 - 1).contiguous(memory_format=torch.channels_last)
    check_stats(wide, 32)
    torch.testing.assert_close(
        run(wide, 32, 1e-5, silu=False), F.group_norm(wide.contiguous(), 32, eps=1e-5), atol=2e-5, rtol=1e-5
    )
    assert fused_norms._stats_launch(1, 64, 1, 80, 64, True).num_chunks == 20
    fused_norms.COMBINE_TILE = 512
    check_stats(torch.randn(1, 64, 80, 64).contiguous(memory_format=torch.channels_last), 1)
    fused_norms.COMBINE_TILE = 4096
    fused_norms.STATS_PROGRAMS, fused_norms.STATS_MIN_CHUNK = 1, 1 << 20
    assert fused_norms._stats_launch(2, 96, 32, 20, 22, True).chunk == 512
    check_stats(x, 32)
    check_stats(nhwc, 32)
    fused_norms.STATS_PROGRAMS, fused_norms.STATS_MIN_CHUNK = 8192, 256

    # Large means do not wash out small variances (values 1000 + 0.01 noise): E[x^2] - E[x]^2 in float32
    # would be off by ~1000x; the statistics shift by each chunk's first pixel, and what remains is the
    # float32 mean's rounding (ulp(1000) / 0.01 ~ 0.006 in normalised units).
    check_stats(torch.randn(1, 64, 80, 64) * 0.01 - 1000.0, 16, eps=1e-6, atol=5e-3)
    for offset in (
        torch.randn(1, 32, 9, 7) * 0.01 + 1000.0,
        (torch.randn(2, 96, 20, 22) * 0.01 + 1000.0).contiguous(memory_format=torch.channels_last),
    ):
        groups = offset.shape[1] // 4
        check_stats(offset, groups, eps=1e-6, atol=5e-3)
        expected = F.group_norm(offset.double().contiguous(), groups, eps=1e-6).float()
        torch.testing.assert_close(run(offset, groups, 1e-6, silu=False), expected, atol=1e-2, rtol=0)

    # Given statistics (tiled decoding): a tile normalised with its image's statistics, (B, G) or flat;
    # the statistics kernels are skipped, and the output matches the computed-statistics path exactly.
    mean, rstd = fused_norms.group_stats(nhwc, 32, 1e-5)
    given = run(nhwc, 32, 1e-5, c_scale, c_shift, stats=(mean, rstd))
    assert torch.equal(given, run(nhwc, 32, 1e-5, c_scale, c_shift))
    tile = nhwc[:, :, 4:12, 2:18].contiguous(memory_format=torch.channels_last)
    grouped = tile.contiguous().view(2, 32, -1)
    expected = ((grouped - mean[:, :, None]) * rstd[:, :, None]).view(tile.shape)
    expected = F.silu(expected * c_scale[:, :, None, None] + c_shift[:, :, None, None])
    for given in ((mean, rstd), (mean.flatten(), rstd.flatten())):
        got = run(tile, 32, 1e-5, c_scale, c_shift, stats=given)
        assert got.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)
    for bad in ((mean.double(), rstd), (mean[:1], rstd[:1]), (mean, rstd[:, :16])):
        try:
            run(tile, 32, 1e-5, stats=bad)
        except ValueError as error:
            assert "stats" in str(error), error
        else:
            raise AssertionError(f"stats {[tuple(t.shape) for t in bad]} accepted")

    # bf16 activations (float32 statistics); the interpreter truncates on store: allow one bf16 ulp.
    for data in (x, nhwc):
        size, channels = tuple(data.shape[2:]), data.shape[1]
        scale, shift = torch.randn(2, 2 * channels, 5, 11).chunk(2, dim=1)
        got = run(data.bfloat16(), 32, 1e-5, scale, shift, scale_plus_one=True)
        assert got.dtype == torch.bfloat16 and got.stride() == data.stride()
        normalized = F.group_norm(data.bfloat16().float(), 32, eps=1e-5)
        expected = F.silu(normalized * (1 + up(scale, size)) + up(shift, size))
        assert ((got.float() - expected).abs() <= expected.abs() * 2**-7 + 1e-6).all()
        check_stats(data.bfloat16(), 32)

    # Empty batches: nothing to launch.
    assert run(torch.zeros(0, 32, 4, 4), 8, 1e-5).shape == (0, 32, 4, 4)
    print("ok")
    """
)

# The subprocess gets the shared decoder config as a literal (`python -c` does not see the tests folder).
DECODER_CHECKS = f"TWO_LEVEL_DECODER_CONFIG = {TWO_LEVEL_DECODER_CONFIG!r}\n" + textwrap.dedent(
    """
    import torch

    from ssdd_diffusers.models import fused_norms
    from ssdd_diffusers.models.uvit_decoder import UViTDecoder

    torch.manual_seed(0)
    run = fused_norms.group_norm_modulate_silu

    # The whole decoder: every ResNet norm and the output norm through the kernels, same result.
    decoder = UViTDecoder(**TWO_LEVEL_DECODER_CONFIG).eval()
    for p in decoder.parameters():
        p.data.normal_(0, 0.1)
    decoder.channels_last = False  # the kernels take NCHW (the automatic eager layout on GPUs)
    calls = []
    fused_norms.group_norm_modulate_silu = lambda *a, **k: calls.append(1) or run(*a, **k)
    x_t, z = torch.randn(1, 3, 16, 16), torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        expected = decoder(x_t, torch.tensor([0.7]), z)
        assert not calls
        decoder.fused_norm_kernels = True
        got = decoder(x_t, torch.tensor([0.7]), z)
    resnets = sum(1 for m in decoder.modules() if type(m).__name__ == "SSDDResnetBlock")
    assert len(calls) == 2 * resnets + 1, (len(calls), resnets)
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # ... and with the trunk in channels_last (the automatic layout when the kernels are on)
    decoder.channels_last = None
    assert decoder._use_channels_last(x_t.device)
    calls.clear()
    with torch.no_grad():
        got = decoder(x_t, torch.tensor([0.7]), z)
    assert len(calls) == 2 * resnets + 1
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    decoder.channels_last = False

    # Tiled decoding: statistics from a provider (pooled over the tiles) reach every kernel call as
    # ``stats``, and both paths normalise with them.
    from ssdd_diffusers.models.norm_statistics import provide_norm_statistics

    def provider(norm, x):  # statistics unlike x's own, as a tile's pooled ones are
        grouped = x.float().reshape(x.shape[0], norm.num_groups, -1)
        return grouped.mean(-1) + 0.1, (grouped.var(-1, unbiased=False) + norm.eps).rsqrt() * 0.9

    given = []
    fused_norms.group_norm_modulate_silu = lambda *a, **k: given.append(k.get("stats")) or run(*a, **k)
    with torch.no_grad(), provide_norm_statistics(provider):
        decoder.fused_norm_kernels = False
        provided = decoder(x_t, torch.tensor([0.7]), z)
        decoder.fused_norm_kernels = True
        got = decoder(x_t, torch.tensor([0.7]), z)
    assert len(given) == 2 * resnets + 1 and all(stats is not None for stats in given)
    assert not torch.allclose(provided, expected, atol=1e-3)  # the statistics mattered
    torch.testing.assert_close(got, provided, atol=1e-5, rtol=1e-5)
    print("ok", 2 * resnets + 1)
    """
)


def run_interpreted(script: str) -> str:
    """Run ``script`` in a fresh Python with ``TRITON_INTERPRET=1``; return its stdout."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.strip()


def test_kernels_match_pytorch_under_the_triton_interpreter() -> None:
    assert run_interpreted(KERNEL_CHECKS) == "ok"


def test_decoder_with_kernels_matches_pytorch_under_the_triton_interpreter() -> None:
    assert run_interpreted(DECODER_CHECKS).startswith("ok ")


def test_decoder_keeps_pytorch_path_where_kernels_do_not_apply() -> None:
    """On a CPU without the interpreter, in training and on NHWC tensors nothing changes."""
    assert not fused_norms.interpreting()
    assert not fused_norms.supports(torch.zeros(1, 32, 4, 4))
    torch.manual_seed(0)
    decoder = UViTDecoder(**TWO_LEVEL_DECODER_CONFIG).eval()
    x_t, z = torch.randn(1, 3, 16, 16), torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        expected = decoder(x_t, 0.5, z)
        decoder.fused_norm_kernels = True
        assert decoder.fused_norm_kernels
        assert all(m.use_fused_norms for m in decoder.modules() if hasattr(m, "use_fused_norms"))
        torch.testing.assert_close(decoder(x_t, 0.5, z), expected, atol=0, rtol=0)
    decoder.fused_norm_kernels = False
    assert not any(m.use_fused_norms for m in decoder.modules() if hasattr(m, "use_fused_norms"))


def test_kernel_entry_point_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="CUDA tensor"):
        fused_norms.group_norm_modulate_silu(torch.zeros(1, 32, 4, 4), 8, 1e-5)
