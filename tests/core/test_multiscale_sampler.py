"""Multi-scale coarse-to-fine decoding (arXiv 2603.19570 on SSDD): layout math, re-noising marginals,
the sampler (K = 1 bit-identical to the ordinary sampler) and ``SSDDAutoencoder`` integration. Training
targets and short training runs are in ``training/test_multiscale_training.py``."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers.configs import perturb_, tiny_config

from ssdd_diffusers import SSDDAutoencoder
from ssdd_diffusers.multiscale import (
    MultiScaleLayout,
    correlated_block_noise,
    default_stage_steps,
    derive_multiscale_noise,
    draw_multiscale_noise,
    multiscale_euler_sample,
    renoise,
    resolve_stage_steps,
    stage_resolutions,
    upsample_nearest2x,
)
from ssdd_diffusers.sampling import euler_sample, euler_sample_on_grid, flow_time_grid

pytestmark = pytest.mark.usefixtures("single_thread")


# ------------------------------------------------------------------------------------------------
# Layout math
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "num_stages, expected",
    [
        (1, [(256, 192)]),
        (2, [(128, 96), (256, 192)]),
        (3, [(64, 48), (128, 96), (256, 192)]),
        (4, [(32, 24), (64, 48), (128, 96), (256, 192)]),
    ],
)
def test_stage_resolutions(num_stages, expected):
    assert MultiScaleLayout(num_stages).stage_resolutions(256, 192) == expected


@pytest.mark.parametrize(
    "size, num_stages", [((256, 256), 7), ((200, 256), 2), ((256, 96), 4), ((24, 24), 2)]
)
def test_stage_resolutions_reject_non_multiples_of_8(size, num_stages):
    with pytest.raises(ValueError, match="multiples of"):
        stage_resolutions(*size, num_stages)
    assert stage_resolutions(256, 256, 5)[0] == (16, 16)  # 16 px is still a multiple of 8


@pytest.mark.parametrize("num_stages", [2, 3, 4])
def test_noise_boundaries(num_stages):
    layout = MultiScaleLayout(num_stages)
    k_total = num_stages
    ends = layout.end_levels
    starts = layout.start_levels
    assert ends == pytest.approx([1 - (k + 1) / k_total for k in range(k_total)], abs=1e-12)
    assert ends[-1] == 0.0 and starts[0] == 1.0
    for k in range(1, k_total):
        e = ends[k - 1]
        alpha, beta, s_k = layout.renoise_coefficients(k)
        assert s_k == pytest.approx(2 * e / (1 + e))  # γ = 1/3 closed form
        assert starts[k] == pytest.approx(s_k)
        assert alpha * (1 - e) == pytest.approx(1 - s_k)  # signal level after re-noising
        assert beta * math.sqrt(1 + layout.gamma) == pytest.approx(s_k)  # total noise std
        assert (alpha * e) ** 2 == pytest.approx(beta**2 * layout.gamma)  # isotropy condition
        assert ends[k] < e < starts[k] < starts[k - 1] + 1e-12  # noise is lifted, then lowered


def test_k4_numbers_from_the_paper():
    layout = MultiScaleLayout(4)
    assert [round(s, 3) for s in layout.start_levels] == [1.0, 0.857, 0.667, 0.4]
    coefficients = [tuple(round(c, 3) for c in layout.renoise_coefficients(k)[:2]) for k in (1, 2, 3)]
    assert coefficients == [(0.571, 0.742), (0.667, 0.577), (0.8, 0.346)]
    # time remapping: segments ∝ path length s_k - e_k; the paper's code discretises to 1000 steps
    assert layout.time_boundaries(num_train_timesteps=1000) == pytest.approx(
        [1.0, 0.825, 0.574, 0.281, 0.001]
    )
    continuous = layout.time_boundaries()
    assert continuous == pytest.approx([1.0, 0.8244, 0.5736, 0.2809, 0.0], abs=1e-4)
    lengths = [hi - lo for hi, lo in zip(continuous, continuous[1:])]
    paths = layout.path_lengths
    assert [ln / lengths[0] for ln in lengths] == pytest.approx([p / paths[0] for p in paths])
    # the global time of a stage runs from g_k (τ = 1) to g_{k+1} (τ = 0)
    tau = torch.tensor([1.0, 0.5, 0.0])
    assert layout.global_time(2, tau).tolist() == pytest.approx(
        [continuous[2], (continuous[2] + continuous[3]) / 2, continuous[3]]
    )


def test_k1_layout_is_ssdd():
    layout = MultiScaleLayout(1)
    assert layout.end_levels == (0.0,) and layout.start_levels == (1.0,)
    assert layout.time_boundaries() == (1.0, 0.0)
    tau = torch.rand(7)
    assert torch.equal(layout.global_time(0, tau), tau)


def test_default_stage_steps():
    assert default_stage_steps(12, 1) == (12,)
    assert default_stage_steps(12, 3) == (4, 4, 4)
    assert default_stage_steps(12, 4) == (3, 3, 3, 3)
    assert default_stage_steps(10, 3) == (4, 3, 3)
    assert default_stage_steps(4, 4) == (1, 1, 1, 1)
    with pytest.raises(ValueError, match="one step per stage"):
        default_stage_steps(2, 3)
    assert resolve_stage_steps(12, 3, (6, 4, 2)) == (6, 4, 2)
    assert resolve_stage_steps(9, 3, (6, 4, 2)) == (3, 3, 3)  # inconsistent config split: default


# ------------------------------------------------------------------------------------------------
# Noise and re-noising (statistical checks)
# ------------------------------------------------------------------------------------------------
def _block_pixels(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (N, 4): the four pixels of every 2x2 block as columns."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 2, 4, 3, 5).reshape(-1, 4)


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).mean() / (a.std() * b.std()))


@pytest.mark.parametrize("gamma", [1 / 3, 0.2])
def test_correlated_block_noise_statistics(gamma):
    n = correlated_block_noise((64, 3, 32, 32), torch.Generator().manual_seed(0), gamma=gamma)
    blocks = _block_pixels(n).double()
    cov = torch.cov(blocks.T)
    assert torch.diagonal(cov) == pytest.approx([1.0] * 4, abs=0.02)
    off = cov[~torch.eye(4, dtype=torch.bool)]
    assert off.tolist() == pytest.approx([-gamma] * 12, abs=0.02)
    assert abs(float(n.mean())) < 0.01
    # independent across neighbouring blocks
    assert abs(_corr(n[..., 1::2][..., :-1], n[..., 2::2])) < 0.02  # pixels (2j+1, 2j+2): adjacent blocks


def test_derived_noise_laws_and_independence():
    eps = torch.randn(256, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    noise = derive_multiscale_noise(eps, 3)
    assert noise.initial.shape == (256, 3, 8, 8)
    assert [r.shape[-1] for r in noise.renoise] == [16, 32]
    assert torch.allclose(noise.initial, F.avg_pool2d(eps, 4) * 4, atol=1e-6)
    assert float(noise.initial.var()) == pytest.approx(1.0, abs=0.03)
    for r in noise.renoise:
        cov = torch.cov(_block_pixels(r).double().T)
        assert torch.diagonal(cov) == pytest.approx([1.0] * 4, abs=0.03)
        assert cov[~torch.eye(4, dtype=torch.bool)].tolist() == pytest.approx([-1 / 3] * 12, abs=0.03)
    # independent of the coarser noise it is added to (block mean vs block residual)
    assert abs(_corr(upsample_nearest2x(noise.initial), noise.renoise[0])) < 0.01
    assert abs(_corr(upsample_nearest2x(upsample_nearest2x(noise.initial)), noise.renoise[1])) < 0.01
    assert abs(_corr(upsample_nearest2x(noise.renoise[0]), noise.renoise[1])) < 0.01
    # deterministic, per sample (slicing-safe), and K = 1 passes the noise through
    again = derive_multiscale_noise(eps[:3], 3)
    assert torch.equal(again.initial, noise.initial[:3])
    assert derive_multiscale_noise(eps, 1).initial is eps


@pytest.mark.parametrize("num_stages", [2, 3, 4])
def test_renoise_produces_the_stage_start_marginal(num_stages):
    """x = (1-e)·x_low + e·ε_low, then α·U(x) + β·n must be (1-s_k)·U(x_low) + s_k·ε'' with ε'' ~ N(0, I)
    isotropic: signal coefficient 1 - s_k, zero-mean noise of variance s_k², no 2x2 correlation."""
    layout = MultiScaleLayout(num_stages)
    gen = torch.Generator().manual_seed(2)
    x_low = torch.rand(1, 3, 8, 8, generator=gen).mul(2).sub(1).expand(2048, -1, -1, -1)
    for k in range(1, num_stages):
        e = layout.end_levels[k - 1]
        s_k = layout.start_levels[k]
        eps_low = torch.randn(x_low.shape, generator=gen)
        x = (1 - e) * x_low + e * eps_low
        n = correlated_block_noise((2048, 3, 16, 16), gen)
        y = renoise(x, n, layout, k)
        signal = upsample_nearest2x(x_low)
        # regression of y on the signal (pixelwise, across samples) gives the signal coefficient
        centred = signal[0] - signal[0].mean()
        slope = float(((y.mean(0) - y.mean()) * centred).sum() / (centred * centred).sum())
        assert slope == pytest.approx(1 - s_k, abs=0.01)
        noise = y - (1 - s_k) * signal
        assert abs(float(noise.mean())) < 0.01
        assert float(noise.var()) == pytest.approx(s_k**2, rel=0.02)
        cov = torch.cov(_block_pixels(noise).double().T) / s_k**2
        assert torch.diagonal(cov) == pytest.approx([1.0] * 4, abs=0.03)
        assert cov[~torch.eye(4, dtype=torch.bool)].abs().max() < 0.02  # 2x2 correlation cancelled
        # without the correction (plain upsampling) the old noise would be perfectly block-correlated
        plain = torch.cov(_block_pixels(upsample_nearest2x(eps_low)).double().T)
        assert plain[0, 1] == pytest.approx(1.0, abs=0.05)


# ------------------------------------------------------------------------------------------------
# Sampler
# ------------------------------------------------------------------------------------------------
def _toy_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A nonlinear, time-dependent, resolution-agnostic field."""
    return torch.tanh(x) * (0.5 + t.view(-1, 1, 1, 1)) - 0.3 * x.roll(1, -1)


def test_k1_sampler_is_the_ordinary_sampler_bit_for_bit():
    noise = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for steps, power in [(1, 2.0), (7, 2.0), (12, 4.0)]:
        expected = euler_sample(_toy_velocity, noise, flow_time_grid(steps, power))
        got = multiscale_euler_sample(_toy_velocity, noise, (steps,), 1, power)
        assert torch.equal(got, expected)


def test_multiscale_sampler_matches_a_hand_written_loop():
    layout = MultiScaleLayout(3)
    eps = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ms_noise = derive_multiscale_noise(eps, 3)
    steps = (3, 2, 1)
    bounds = layout.time_boundaries()
    x = ms_noise.initial
    ends = []
    for k in range(3):
        if k:
            a, b, _ = layout.renoise_coefficients(k)
            x = a * x.repeat_interleave(2, -2).repeat_interleave(2, -1) + b * ms_noise.renoise[k - 1]
        taus = [(1 - i / steps[k]) ** 2 for i in range(steps[k] + 1)]
        for i in range(steps[k]):
            t = bounds[k + 1] + taus[i] * (bounds[k] - bounds[k + 1])
            x = x + _toy_velocity(x, torch.full((2,), t)) * (taus[i] - taus[i + 1])
        ends.append(x)
    got, got_ends = multiscale_euler_sample(_toy_velocity, eps, steps, layout, return_stages=True)
    assert got.shape == (2, 3, 32, 32)
    assert [e.shape[-1] for e in got_ends] == [8, 16, 32]
    assert torch.allclose(got, x, atol=1e-5)
    for a, b in zip(got_ends, ends):
        assert torch.allclose(a, b, atol=1e-5)
    # a MultiScaleNoise drawn from a generator is accepted too
    drawn = draw_multiscale_noise((2, 3, 32, 32), 3, torch.Generator().manual_seed(3))
    assert multiscale_euler_sample(_toy_velocity, drawn, steps, layout).shape == (2, 3, 32, 32)


# ------------------------------------------------------------------------------------------------
# SSDDAutoencoder integration
# ------------------------------------------------------------------------------------------------
def test_decode_k1_unchanged_and_config_selects_multiscale(tmp_path):
    torch.manual_seed(0)
    vae = perturb_(SSDDAutoencoder(**tiny_config())).eval()
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    eps = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        # decode passes its times as Python numbers (one per step, see euler_sample_on_grid) ...
        reference = euler_sample_on_grid(lambda x, t: vae.decoder(x, t, z), eps, 4, 2.0)
        assert torch.equal(vae.decode(z, noise=eps, num_inference_steps=4).sample, reference)
        # ... the same sampler as with the tensor grid, whose per-row time embedding rounds differently
        with_tensor_times = euler_sample(lambda x, t: vae.decoder(x, t, z), eps, flow_time_grid(4, 2.0))
        torch.testing.assert_close(reference, with_tensor_times, rtol=1e-5, atol=1e-5)
        assert torch.equal(
            vae.decode(z, noise=eps, num_inference_steps=4, multiscale_stages=1).sample, reference
        )

        ms = SSDDAutoencoder(
            **tiny_config(multiscale_stages=2, multiscale_steps=(3, 1), num_inference_steps=4)
        )
        ms.load_state_dict(vae.state_dict())
        ms.eval()
        # the K = 1 path of a multi-scale model is the ordinary sampler, bit for bit
        assert torch.equal(
            ms.decode(z, noise=eps, num_inference_steps=4, multiscale_stages=1).sample, reference
        )
        expected = multiscale_euler_sample(lambda x, t: ms.decoder(x, t, z), eps, (3, 1), 2)
        by_config = ms.decode(z, noise=eps).sample  # config: K = 2, split (3, 1)
        assert torch.equal(by_config, expected)
        assert torch.equal(
            vae.decode(z, noise=eps, num_inference_steps=4, multiscale_stages=2).sample,
            multiscale_euler_sample(lambda x, t: vae.decoder(x, t, z), eps, (2, 2), 2),
        )
        # deterministic without a generator; slicing sees the same (derived) noise
        assert torch.equal(ms.decode(z).sample, ms.decode(z).sample)
        ms.enable_slicing()
        assert torch.allclose(ms.decode(z, noise=eps).sample, by_config, atol=1e-5)
        ms.disable_slicing()
        with pytest.raises(ValueError, match="one step per stage"):
            ms.decode(z, num_inference_steps=1)
        with pytest.raises(ValueError, match="multiples of"):
            ms.decode(z, multiscale_stages=4, num_inference_steps=4)  # 32 px / 8 = 4 px stage
    with pytest.raises(ValueError):
        SSDDAutoencoder(**tiny_config(multiscale_stages=0))
    ms.save_pretrained(tmp_path)
    loaded = SSDDAutoencoder.from_pretrained(tmp_path).eval()
    assert loaded.config.multiscale_stages == 2 and tuple(loaded.config.multiscale_steps) == (3, 1)
    with torch.no_grad():
        assert torch.equal(loaded.decode(z, noise=eps).sample, by_config)
