"""Options of the training objectives: time sampling with a share of t = 1, the reconstruction term, the
student's noise in distillation, the AutoencoderKL baseline objective, and custom perceptual distances."""

from __future__ import annotations

import pytest
import torch
from helpers.configs import perturb_, tiny_autoencoder_kl, tiny_config

from ssdd_diffusers import SSDDAutoencoder
from ssdd_diffusers.training.losses import LPIPSLoss, perceptual_loss
from ssdd_diffusers.training.objective import (
    AutoencoderKLObjective,
    LossWeights,
    SSDDObjective,
    reconstruction_loss,
    sample_logit_normal,
)

FM_ONLY = dict(fm=1.0, lpips=0.0, repa=0.0, kl=0.0)


def images(batch: int = 2, size: int = 32) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(7)) * 2 - 1


def test_one_step_fraction_puts_that_share_of_times_at_exactly_one() -> None:
    plain = sample_logit_normal(20_000, torch.Generator().manual_seed(0))
    mixed = sample_logit_normal(20_000, torch.Generator().manual_seed(0), one_step_fraction=0.3)
    assert not (plain == 1).any() and ((plain > 0) & (plain < 1)).all()
    assert abs(float((mixed == 1).float().mean()) - 0.3) < 0.01
    kept = mixed != 1
    torch.testing.assert_close(mixed[kept], plain[kept])  # the other times are the logit-normal draws
    assert (plain > 0.9).float().mean() < 0.02  # why: the logit-normal alone hardly trains t near 1


def test_recon_term_is_added_with_its_weight() -> None:
    torch.manual_seed(0)
    vae = perturb_(SSDDAutoencoder(**tiny_config(prediction_type="edm")))
    objective = SSDDObjective(vae, LossWeights(**FM_ONLY, recon=2.0), recon_loss="l2", one_step_fraction=0.5)
    out = objective(images(), torch.Generator().manual_seed(1))
    assert set(out) == {"loss", "fm", "recon"}
    torch.testing.assert_close(out["loss"], out["fm"] + 2.0 * out["recon"])
    out["loss"].backward()
    assert vae.decoder.conv_out.weight.grad.abs().sum() > 0
    assert reconstruction_loss(torch.ones(2), torch.zeros(2), "l1") == 1
    assert reconstruction_loss(torch.full((2,), 2.0), torch.zeros(2), "l2") == 4


def test_independent_distillation_noise_is_not_the_teachers() -> None:
    """shared: the student starts from the teacher's noise; independent: from its own draw."""
    torch.manual_seed(0)
    x = images()
    z = torch.randn(2, 4, 8, 8)
    noise = torch.randn(2, 3, 32, 32)
    target = torch.zeros(2, 3, 32, 32)
    inputs = {}
    for mode in ("shared", "independent"):
        vae = perturb_(SSDDAutoencoder(**tiny_config()))
        objective = SSDDObjective(vae, LossWeights(**FM_ONLY, recon=1.0), distill_noise=mode)
        seen = []
        original = objective.predict_velocity
        objective.predict_velocity = lambda x_t, t, zz, seen=seen, original=original: (
            seen.append(x_t) or original(x_t, t, zz)
        )
        out = objective(x, torch.Generator().manual_seed(3), z=z, noise=noise, target=target)
        assert set(out) == {"loss", "fm", "recon"}
        inputs[mode] = seen[0]
    assert torch.equal(inputs["shared"], noise)
    assert not torch.allclose(inputs["independent"], noise) and inputs["independent"].std() > 0.5


def test_invalid_objective_options_are_rejected() -> None:
    vae = SSDDAutoencoder(**tiny_config())
    with pytest.raises(ValueError, match="one_step_fraction"):
        SSDDObjective(vae, LossWeights(**FM_ONLY), one_step_fraction=1.5)
    with pytest.raises(ValueError, match="recon_loss"):
        SSDDObjective(vae, LossWeights(**FM_ONLY), recon_loss="huber")
    with pytest.raises(ValueError, match="single-scale"):
        SSDDObjective(vae, LossWeights(**FM_ONLY, recon=1.0), multiscale_stages=2)


def test_autoencoder_kl_objective_trains_the_decoder_on_a_frozen_encoder() -> None:
    kl = tiny_autoencoder_kl(levels=2)
    encoder_before = {k: v.clone() for k, v in kl.encoder.state_dict().items()}
    objective = AutoencoderKLObjective(
        kl, LossWeights(fm=0.0, lpips=0.0, repa=0.0, kl=1e-6, recon=1.0)
    ).train()
    assert not kl.encoder.training and not any(p.requires_grad for p in kl.encoder.parameters())
    out = objective(images(), torch.Generator().manual_seed(0))
    assert set(out) == {"loss", "recon"}  # no KL term: the encoder is frozen
    out["loss"].backward()
    assert kl.decoder.conv_out.weight.grad.abs().sum() > 0
    assert all(torch.equal(v, kl.encoder.state_dict()[k]) for k, v in encoder_before.items())

    joint = AutoencoderKLObjective(tiny_autoencoder_kl(levels=2), train_encoder=True).train()
    out = joint(images(), torch.Generator().manual_seed(0))
    assert set(out) == {"loss", "recon", "kl"}
    out["loss"].backward()
    assert joint.vae.encoder.conv_in.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="recon_weight"):
        AutoencoderKLObjective(tiny_autoencoder_kl(levels=2), LossWeights(**FM_ONLY))


def test_custom_perceptual_distance_replaces_lpips() -> None:
    """--lpips_net package.module:factory: a frozen distance in eval mode whose batch mean is the "lpips" term
    (torch.nn.L1Loss as the distance: the term equals the L1 between x̂0 and the images)."""
    loss = perceptual_loss("torch.nn:L1Loss")
    assert isinstance(loss, LPIPSLoss) and not loss.is_lpips and not loss.train().training
    a, b = images(), images().flip(0).requires_grad_()
    value = loss(b, a)
    value.backward()
    torch.testing.assert_close(value, (a - b).abs().mean())
    assert value.dtype == torch.float32 and b.grad.abs().sum() > 0

    torch.manual_seed(0)
    vae = perturb_(SSDDAutoencoder(**tiny_config(prediction_type="edm")))
    objective = SSDDObjective(vae, LossWeights(**{**FM_ONLY, "lpips": 0.5}), lpips_net="torch.nn:L1Loss")
    out = objective(images(), torch.Generator().manual_seed(1))
    assert set(out) == {"loss", "fm", "lpips"} and out["lpips"] > 0
    torch.testing.assert_close(out["loss"], out["fm"] + 0.5 * out["lpips"])
    assert all(p.requires_grad for p in objective.trainable_parameters())
    assert not any(p is q for p in objective.trainable_parameters() for q in objective.lpips.parameters())


def test_invalid_perceptual_distances_are_rejected() -> None:
    with pytest.raises(ValueError, match="package.module:factory"):
        perceptual_loss("resnet")
    with pytest.raises(TypeError, match="did not give an nn.Module"):
        perceptual_loss("math:pi")
    with pytest.raises(AttributeError):
        perceptual_loss("torch.nn:NoSuchDistance")
