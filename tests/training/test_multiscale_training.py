"""Multi-scale training (arXiv 2603.19570 on SSDD): per-stage flow-matching targets against the sampler's
states, the objective adapter (LPIPS, REPA) and short in-process multi-scale training and per-scale
distillation runs on the tiny configuration. The sampler itself is tested in
``core/test_multiscale_sampler.py``."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers.configs import perturb_, tiny_config
from helpers.dino import make_tiny_dino
from helpers.images import generated_image

from ssdd_diffusers import SSDDAutoencoder
from ssdd_diffusers.multiscale import (
    MultiScaleLayout,
    downsample_image,
    multiscale_euler_sample,
    renoise,
    upsample_nearest2x,
)
from ssdd_diffusers.training.multiscale import (
    multiscale_distillation_loss,
    multiscale_distillation_targets,
    multiscale_flow_matching_loss,
    multiscale_flow_matching_targets,
)
from ssdd_diffusers.training.objective import LossWeights, SSDDObjective

pytestmark = pytest.mark.usefixtures("single_thread")


# ------------------------------------------------------------------------------------------------
# Training targets and objectives
# ------------------------------------------------------------------------------------------------
def test_k1_targets_are_ssdd_flow_matching():
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    gen = torch.Generator().manual_seed(0)
    (group,) = multiscale_flow_matching_targets(images, 1, gen)
    gen = torch.Generator().manual_seed(0)
    _ = torch.randint(0, 1, (4,), generator=gen)
    tau = torch.sigmoid(torch.randn(4, generator=gen))
    eps = torch.randn(images.shape, generator=gen)
    t = tau.view(-1, 1, 1, 1)
    assert torch.equal(group.t, tau) and torch.equal(group.tau, tau)
    assert torch.allclose(group.x_t, (1 - t) * images + t * eps)
    assert torch.allclose(group.target, images - eps)


def test_stage_targets_match_the_sampler_states():
    layout = MultiScaleLayout(3)
    images = torch.rand(6, 3, 32, 32) * 2 - 1
    stages = torch.tensor([0, 1, 2, 2, 1, 0])
    tau = torch.tensor([1.0, 0.0, 0.3, 1.0, 0.7, 0.0])
    groups = multiscale_flow_matching_targets(images, layout, torch.Generator().manual_seed(0), stages, tau)
    assert [g.stage for g in groups] == [0, 1, 2]
    sizes = layout.stage_resolutions(32, 32)
    for g in groups:
        k = g.stage
        e, s = layout.end_levels[k], layout.start_levels[k]
        assert g.x_t.shape[-2:] == sizes[k]
        clean = downsample_image(images[g.index], sizes[k])
        assert torch.allclose(g.x_end, (1 - e) * clean + e * g.noise, atol=1e-6)
        if k == 0:
            assert torch.equal(g.x_start, g.noise)
        else:
            coarse = upsample_nearest2x(downsample_image(images[g.index], sizes[k - 1]))
            assert torch.allclose(g.x_start, (1 - s) * coarse + s * g.noise, atol=1e-6)
            # the sampler's re-noising of a noise-free stage-(k-1) end lands on the same signal
            prev_end = (1 - layout.end_levels[k - 1]) * downsample_image(images[g.index], sizes[k - 1])
            lifted = renoise(prev_end, torch.zeros_like(g.noise), layout, k)
            assert torch.allclose(lifted, (1 - s) * coarse, atol=1e-6)
        assert torch.allclose(g.target, g.x_end - g.x_start)
        assert torch.allclose(g.predicted_end(g.target), g.x_end, atol=1e-6)  # x_end = x_τ + τ·v
        assert torch.allclose(g.t, layout.global_time(k, g.tau))
        for i, tau_i in enumerate(g.tau.tolist()):
            if tau_i == 1.0:
                assert torch.allclose(g.x_t[i], g.x_start[i])
            if tau_i == 0.0:
                assert torch.allclose(g.x_t[i], g.x_end[i])


def _photos(count: int, size: int) -> torch.Tensor:
    images = [generated_image(seed, (size, size)) for seed in range(count)]
    arrays = [torch.from_numpy(np.asarray(im, dtype=np.float32)) for im in images]
    return torch.stack(arrays).permute(0, 3, 1, 2) / 127.5 - 1


def test_short_multiscale_training_lowers_the_loss():
    torch.manual_seed(0)
    vae = SSDDAutoencoder(**tiny_config())
    vae.encoder.requires_grad_(False)
    images = _photos(4, 32)
    with torch.no_grad():
        z = vae.encode(images).latent_dist.mode()
    layout = MultiScaleLayout(2)
    stages_eval = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])
    images_eval, z_eval = images.repeat(2, 1, 1, 1), z.repeat(2, 1, 1, 1)

    def eval_loss() -> float:
        with torch.no_grad():
            out = multiscale_flow_matching_loss(
                vae.decoder,
                images_eval,
                z_eval,
                layout,
                torch.Generator().manual_seed(123),
                stages=stages_eval,
            )
        return float(out["fm"])

    optimizer = torch.optim.Adam(vae.decoder.parameters(), lr=2e-3)
    start = eval_loss()
    gen = torch.Generator().manual_seed(0)
    for _ in range(30):
        out = multiscale_flow_matching_loss(vae.decoder, images, z, layout, gen)
        optimizer.zero_grad()
        out["fm"].backward()
        optimizer.step()
    end = eval_loss()
    print(f"multi-scale FM loss (fixed eval draw): {start:.4f} -> {end:.4f} ({end / start:.1%})")
    assert end < 0.7 * start


def test_objective_adapter_lpips_and_repa(tmp_path):
    torch.manual_seed(0)
    vae = SSDDAutoencoder(**tiny_config())
    with pytest.warns(UserWarning, match="RANDOMLY"):
        objective = SSDDObjective(
            vae, LossWeights(), lpips_backbone="random", repa_model=str(make_tiny_dino(tmp_path / "dino"))
        )
    images = _photos(4, 32)
    out = objective.weighted_losses(
        objective.multiscale_training_terms(images, torch.Generator().manual_seed(0), 2)
    )
    assert set(out) == {"loss", "fm", "lpips", "repa"}
    assert all(torch.isfinite(v) for v in out.values())
    out["loss"].backward()
    assert vae.decoder.conv_out.weight.grad is not None
    assert objective.repa.projector[0].weight.grad is not None

    # per-scale distillation through the same objective (teacher = a frozen copy)
    teacher = copy.deepcopy(vae).eval().requires_grad_(False)
    z = teacher.encode(images).latent_dist.mode()
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(1))
    targets = multiscale_distillation_targets(lambda x, t: teacher.decoder(x, t, z), noise, 2, (2, 2))
    out = objective.weighted_losses(objective.multiscale_distillation_terms(images, z, noise, targets, 2))
    assert set(out) == {"loss", "fm", "lpips", "repa"}
    assert all(torch.isfinite(v) for v in out.values())
    out["loss"].backward()


def test_short_per_scale_distillation_halves_the_mse():
    """Student = copy of a (random) 2-stage teacher; 25 Adam steps of the per-scale loss (one student step
    per stage, gradients through the chain) on a fixed batch of latents and noises; the MSE of the student's
    K-step sample to the teacher's 4+4-step sample from the same noise must at least halve."""
    torch.manual_seed(0)
    teacher = perturb_(SSDDAutoencoder(**tiny_config()), scale=0.05).eval().requires_grad_(False)
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    layout = MultiScaleLayout(2)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    targets = multiscale_distillation_targets(lambda x, t: teacher.decoder(x, t, z), noise, layout, (4, 4))
    assert [tuple(t.shape[-2:]) for t in targets] == [(16, 16), (32, 32)]

    def student_v(x, t):
        return student.decoder(x, t, z)

    def sample_mse() -> float:
        with torch.no_grad():
            sample = multiscale_euler_sample(student_v, noise, (1, 1), layout)
        return float(F.mse_loss(sample, targets[-1]))

    before = sample_mse()
    optimizer = torch.optim.Adam(student.decoder.parameters(), lr=3e-4)
    for _ in range(25):
        out = multiscale_distillation_loss(student_v, noise, targets, layout)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
    after = sample_mse()
    print(f"student 1+1-step MSE to the teacher's 4+4-step sample: {before:.5f} -> {after:.5f}")
    assert after <= 0.5 * before
    assert out["stage_mse"].shape == (2,)
