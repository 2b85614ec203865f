"""The Triton GroupNorm + modulation + SiLU kernels, run on CPU through Triton's interpreter.

``TRITON_INTERPRET=1`` must be set before the kernels are defined, so the interpreted checks run in a
subprocess; the gating (when the decoder uses the kernels) is checked in-process.
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

# The subprocess gets the shared decoder config as a literal (`python -c` does not see the tests folder).
INTERPRETED_CHECKS = f"TWO_LEVEL_DECODER_CONFIG = {TWO_LEVEL_DECODER_CONFIG!r}\n" + textwrap.dedent(
    """
    import torch
    import torch.nn.functional as F

    from ssdd_diffusers.models import fused_norms
    from ssdd_diffusers.models.uvit_decoder import UViTDecoder

    assert fused_norms.interpreting() and fused_norms.supports(torch.zeros(1, 1, 1, 1))
    torch.manual_seed(0)
    up = lambda t, size: F.interpolate(t, size=size, mode="nearest")  # noqa: E731
    run = fused_norms.group_norm_modulate_silu

    # 40 x 44 pixels: group sizes (2 * 1760) and planes (1760) are not multiples of the 1024 block.
    x = torch.randn(2, 64, 40, 44) * 3 + 5
    reference = F.group_norm(x, 32, eps=1e-5)
    torch.testing.assert_close(run(x, 32, 1e-5, silu=False), reference, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(run(x, 32, 1e-5), F.silu(reference), atol=2e-5, rtol=1e-5)

    scale, shift = torch.randn(2, 64), torch.randn(2, 64)
    expected = F.silu(reference * scale[:, :, None, None] + shift[:, :, None, None])
    torch.testing.assert_close(run(x, 32, 1e-5, scale, shift), expected, atol=2e-5, rtol=1e-5)

    params = torch.randn(2, 128, 5, 11)  # AdaGN: chunked (non-contiguous) views at 1/8 x 1/4 resolution
    scale, shift = params.chunk(2, dim=1)
    expected = F.silu(reference * (1 + up(scale, (40, 44))) + up(shift, (40, 44)))
    got = run(x, 32, 1e-5, scale, shift, scale_plus_one=True)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)

    # channels_last (NHWC) input: the same values, and the output keeps the memory format; 96 channels
    # span two channel tiles of 64 with 3 channels per group (a group tile padded to 4).
    nhwc = (torch.randn(2, 96, 40, 44) * 3 + 5).contiguous(memory_format=torch.channels_last)
    reference = F.group_norm(nhwc.contiguous(), 32, eps=1e-5)
    plain = run(nhwc, 32, 1e-5, silu=False)
    assert plain.is_contiguous(memory_format=torch.channels_last) and not plain.is_contiguous()
    torch.testing.assert_close(plain, reference, atol=2e-5, rtol=1e-5)
    c_scale, c_shift = torch.randn(2, 96), torch.randn(2, 96)
    expected = F.silu(reference * c_scale[:, :, None, None] + c_shift[:, :, None, None])
    torch.testing.assert_close(run(nhwc, 32, 1e-5, c_scale, c_shift), expected, atol=2e-5, rtol=1e-5)
    nhwc_params = torch.randn(2, 192, 5, 11).contiguous(memory_format=torch.channels_last)
    p_scale, p_shift = nhwc_params.chunk(2, dim=1)
    expected = F.silu(reference * (1 + up(p_scale, (40, 44))) + up(p_shift, (40, 44)))
    got = run(nhwc, 32, 1e-5, p_scale, p_shift, scale_plus_one=True)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)

    # Welford statistics: a large mean does not wash out a small variance. E[x^2] - E[x]^2 in float32
    # would be off by ~0.06 against a variance of 1e-4; what remains is the float32 mean's rounding
    # (ulp(1000) / 0.01 ~ 0.006 in normalised units).
    offset = torch.randn(1, 32, 9, 7) * 0.01 + 1000.0
    torch.testing.assert_close(
        run(offset, 8, 1e-6, silu=False), F.group_norm(offset.double(), 8, eps=1e-6).float(),
        atol=2e-2, rtol=0,
    )

    # bf16 activations (float32 statistics); the interpreter truncates on store: allow one bf16 ulp.
    got = run(x.bfloat16(), 32, 1e-5, scale, shift, scale_plus_one=True)
    assert got.dtype == torch.bfloat16
    normalized = F.group_norm(x.bfloat16().float(), 32, eps=1e-5)
    expected = F.silu(normalized * (1 + up(scale, (40, 44))) + up(shift, (40, 44)))
    assert ((got.float() - expected).abs() <= expected.abs() * 2**-7 + 1e-6).all()

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

    # Norms with module hooks (tiled decoding pools GroupNorm statistics through them) run as modules.
    norms = [m for m in decoder.modules() if isinstance(m, torch.nn.GroupNorm)]
    seen = set()
    handles = [norm.register_forward_hook(lambda m, i, o: seen.add(id(m))) for norm in norms]
    calls.clear()
    with torch.no_grad():
        hooked = decoder(x_t, torch.tensor([0.7]), z)
    assert not calls and len(seen) == len(norms)
    torch.testing.assert_close(hooked, expected, atol=1e-5, rtol=1e-5)
    print("ok", 2 * resnets + 1)
    """
)


def test_kernels_match_pytorch_under_the_triton_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, "-c", INTERPRETED_CHECKS], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().startswith("ok ")


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
