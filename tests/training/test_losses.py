"""Tests for ssdd_diffusers.training.losses and the shared LPIPS network (offline stand-ins throughout)."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import lpips
import pytest
import torch
import torch.nn.functional as F
import torchvision
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from helpers.dino import DINO_DIM, DINO_PATCH, make_tiny_dino
from torch import nn

from ssdd_diffusers.training.losses import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    LPIPSLoss,
    REPALoss,
    flow_matching_loss,
    kl_loss,
    repa_block_index,
)


# ----------------------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------------------
def _random_lpips(net: str = "vgg") -> LPIPSLoss:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LPIPSLoss(net=net, backbone="random")


@pytest.fixture(scope="module")
def lpips_vgg() -> LPIPSLoss:
    return _random_lpips("vgg")


@pytest.fixture(scope="module")
def dino_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny randomly initialised DINOv2 saved with save_pretrained (stand-in for dinov2-base)."""
    return str(make_tiny_dino(tmp_path_factory.mktemp("tiny_dinov2"), image_size=32))


@pytest.fixture()
def repa(dino_path: str) -> REPALoss:
    torch.manual_seed(1)
    return REPALoss(hidden_dim=24, model_name_or_path=dino_path)


def _images(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, height, width, generator=gen) * 2 - 1


def _reference_dino_tokens(model: REPALoss, images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Independent re-implementation of REPA's target: [0,1], bicubic to grid*patch, ImageNet norm."""
    x = (images + 1) / 2
    x = F.interpolate(x, size=(grid[0] * DINO_PATCH, grid[1] * DINO_PATCH), mode="bicubic", antialias=True)
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        return model.dino(pixel_values=x).last_hidden_state[:, 1:]


# ----------------------------------------------------------------------------------------------------
# Flow matching
# ----------------------------------------------------------------------------------------------------
def test_flow_matching_loss_equals_hand_computation() -> None:
    v_pred = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    v_target = torch.tensor([[0.0, 2.0], [5.0, 1.0]])
    # squared errors 1, 0, 4, 9 -> mean 3.5
    assert flow_matching_loss(v_pred, v_target).item() == pytest.approx(3.5)


def test_flow_matching_loss_is_float32_for_bf16_inputs() -> None:
    gen = torch.Generator().manual_seed(0)
    v_pred = torch.randn(2, 3, 8, 8, generator=gen).bfloat16().requires_grad_(True)
    v_target = torch.randn(2, 3, 8, 8, generator=gen).bfloat16()
    loss = flow_matching_loss(v_pred, v_target)
    assert loss.dtype == torch.float32
    expected = ((v_pred.detach().double() - v_target.double()) ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert v_pred.grad is not None and v_pred.grad.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="shape"):
        flow_matching_loss(v_pred, v_target[:1])


# ----------------------------------------------------------------------------------------------------
# LPIPS
# ----------------------------------------------------------------------------------------------------
def test_lpips_identical_is_zero_and_grows_with_noise(lpips_vgg: LPIPSLoss) -> None:
    x = _images(2, 16, 16)
    assert lpips_vgg(x, x).item() == 0.0
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    values = [lpips_vgg(x + sigma * noise, x).item() for sigma in (0.02, 0.1, 0.3, 0.8)]
    assert values[0] > 0
    assert all(a < b for a, b in zip(values, values[1:])), values
    per_image = lpips_vgg.distance(x + 0.3 * noise, x)
    assert per_image.shape == (2,)
    assert per_image.mean().item() == pytest.approx(values[2], rel=1e-6)


def test_lpips_gradients_flow_to_input_not_network(lpips_vgg: LPIPSLoss) -> None:
    x = _images(2, 16, 16).requires_grad_(True)
    target = _images(2, 16, 16, seed=5)
    lpips_vgg(x, target).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in lpips_vgg.parameters())


def test_lpips_identical_inputs_give_finite_gradients(lpips_vgg: LPIPSLoss) -> None:
    x = _images(2, 16, 16).requires_grad_(True)
    lpips_vgg(x, x.detach()).backward()
    assert torch.isfinite(x.grad).all()


def _lpips_original_normalize(in_feat: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """lpips 0.1.4's normalize_tensor, for comparison."""
    return in_feat / (torch.sqrt(torch.sum(in_feat**2, dim=1, keepdim=True)) + eps)


def test_lpips_normalize_patch_is_installed_and_keeps_forward_values(lpips_vgg: LPIPSLoss) -> None:
    # building an LPIPS network (the fixture) installs the patch, whichever tests ran before in this process
    assert lpips.normalize_tensor.__name__ == "_normalize_tensor"  # resolved by lpips.LPIPS.forward
    feat = torch.randn(2, 8, 3, 3, generator=torch.Generator().manual_seed(0))
    expected = _lpips_original_normalize(feat, eps=1e-8)
    torch.testing.assert_close(lpips.normalize_tensor(feat), expected, rtol=1e-6, atol=0)


def test_lpips_normalize_patch_gives_finite_gradient_for_zero_features(lpips_vgg: LPIPSLoss) -> None:
    """An all-zero feature vector: lpips' sqrt backward is 0/0 = NaN; the patched version gives 0."""
    for fn, expect_nan in ((_lpips_original_normalize, True), (lpips.normalize_tensor, False)):
        feat = torch.zeros(1, 4, 2, 2, requires_grad=True)
        ((fn(feat) - fn(torch.zeros(1, 4, 2, 2))) ** 2).sum().backward()
        assert torch.isnan(feat.grad).any() == expect_nan
    assert torch.equal(feat.grad, torch.zeros_like(feat.grad))


def test_lpips_dead_features_give_finite_input_gradients() -> None:
    loss = _random_lpips("alex")
    loss.net.net.slice1[0].bias.data.fill_(-1e4)  # first ReLU outputs 0 everywhere, so do all later ones
    x = _images(1, 32, 32)
    for target in (x, _images(1, 32, 32, seed=9)):
        inp = x.clone().requires_grad_(True)
        value = loss(inp, target)
        value.backward()
        assert value.item() == 0.0  # every feature map is zero for both images
        assert torch.isfinite(inp.grad).all()


def test_lpips_patched_normalize_bounds_tiny_feature_gradients() -> None:
    feat = torch.full((1, 4, 1, 1), 1e-12, requires_grad=True)
    ((lpips.normalize_tensor(feat) - 0.5) ** 2).sum().backward()
    # gradient of x / (|x| + eps) near 0 is ~1/eps: 1e8 with the patch, 1e10 with lpips' eps
    assert feat.grad.abs().max().item() < 2e8


def test_lpips_stays_in_eval_mode_inside_training_parent(lpips_vgg: LPIPSLoss) -> None:
    parent = nn.Sequential(nn.Linear(2, 2), lpips_vgg)
    parent.train()
    assert parent[0].training
    assert not any(m.training for m in lpips_vgg.modules())


def test_lpips_computes_in_float32_under_autocast(lpips_vgg: LPIPSLoss) -> None:
    x, y = _images(2, 16, 16), _images(2, 16, 16, seed=3)
    reference = lpips_vgg(x, y)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        value = lpips_vgg(x.bfloat16(), y.bfloat16())
        value_fp32_inputs = lpips_vgg(x, y)
    assert value.dtype == torch.float32
    assert value_fp32_inputs.item() == pytest.approx(reference.item(), rel=1e-5)
    assert value.item() == pytest.approx(reference.item(), rel=0.05)  # only the bf16 input rounding


def test_lpips_restores_float32_after_parent_dtype_cast() -> None:
    loss = _random_lpips("alex")
    x, y = _images(1, 32, 32), _images(1, 32, 32, seed=3)
    reference = loss(x, y).item()
    nn.Sequential(loss).to(torch.bfloat16)
    value = loss(x.bfloat16(), y.bfloat16())
    assert value.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in loss.parameters())
    assert value.item() == pytest.approx(reference, rel=0.05)


def test_lpips_random_backbone_warns_loudly(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="ssdd_diffusers.evaluation.lpips"):
        with pytest.warns(UserWarning, match="MEANINGLESS"):
            LPIPSLoss(net="alex", backbone="random")
    assert any("MEANINGLESS" in record.getMessage() for record in caplog.records)
    with pytest.raises(ValueError, match="backbone"):
        LPIPSLoss(backbone="imagenet")  # type: ignore[arg-type]


def _place_fake_torchvision_weights(torch_home: Path, weights: torchvision.models.WeightsEnum) -> dict:
    """Write a random state dict where torchvision's hub cache expects ``weights`` (no download).

    Conv weights are random; the huge classifier tensors are zero-stride views so the file stays small.
    """
    builder = {"vgg16": torchvision.models.vgg16, "alexnet": torchvision.models.alexnet}
    arch = "vgg16" if "VGG16" in type(weights).__name__ else "alexnet"
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in builder[arch]().state_dict().items()}
    gen = torch.Generator().manual_seed(123)
    state = {
        key: torch.randn(shape, generator=gen) * 0.05
        if key.startswith("features.")
        else torch.zeros(1).expand(shape)
        for key, shape in shapes.items()
    }
    cache = torch_home / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(state, cache / os.path.basename(weights.url))
    return state


def test_lpips_pretrained_backbone_loads_from_torch_hub_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    weights = torchvision.models.VGG16_Weights.IMAGENET1K_V1
    assert os.path.basename(weights.url) == "vgg16-397923af.pth"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    state = _place_fake_torchvision_weights(tmp_path, weights)

    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("attempted a download")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = LPIPSLoss(backbone="pretrained")
    assert not any("MEANINGLESS" in str(w.message) for w in caught)
    trunk = loss.net.net
    assert torch.equal(trunk.slice1[0].weight, state["features.0.weight"])
    assert torch.equal(trunk.slice5.get_submodule("28").weight, state["features.28.weight"])
    heads = torch.load(Path(lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth", map_location="cpu")
    assert torch.equal(loss.net.lin0.model[1].weight, heads["lin0.model.1.weight"])
    x = _images(1, 32, 32)
    assert loss(x, x).item() == 0.0


# ----------------------------------------------------------------------------------------------------
# REPA
# ----------------------------------------------------------------------------------------------------
def test_repa_block_index() -> None:
    assert [repa_block_index(n) for n in (1, 2, 6, 8, 10, 12, 16)] == [0, 1, 3, 4, 4, 4, 4]
    with pytest.raises(ValueError):
        repa_block_index(0)


def test_repa_structure_and_frozen_dino(repa: REPALoss) -> None:
    assert isinstance(repa.projector[0], nn.Linear) and isinstance(repa.projector[1], nn.SiLU)
    assert repa.projector[0].in_features == 24 and repa.projector[0].out_features == 24
    assert repa.projector[2].out_features == DINO_DIM
    assert repa.patch_size == DINO_PATCH
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in repa.dino.parameters())
    assert all(p.requires_grad for p in repa.projector.parameters())
    repa.train()
    assert repa.projector.training and not repa.dino.training


def test_repa_loss_is_zero_when_projection_matches_dino(repa: REPALoss) -> None:
    grid = (3, 4)
    images = _images(2, 24, 32)
    target = _reference_dino_tokens(repa, images, grid)
    assert target.shape == (2, 12, DINO_DIM)
    repa.projector = nn.Identity()
    assert repa(target, grid, images).item() == pytest.approx(0.0, abs=1e-5)
    assert repa(3.0 * target, grid, images).item() == pytest.approx(0.0, abs=1e-5)  # cosine: scale-free
    assert repa(-target, grid, images).item() == pytest.approx(2.0, abs=1e-5)


def test_repa_loss_in_range_and_gradients(repa: REPALoss) -> None:
    grid = (2, 2)
    hidden = torch.randn(2, 4, 24, generator=torch.Generator().manual_seed(0), requires_grad=True)
    loss = repa(hidden, grid, _images(2, 16, 16))
    assert loss.dtype == torch.float32
    assert 0.0 <= loss.item() <= 2.0
    assert 0.5 < loss.item() < 1.5  # random projection is nearly orthogonal to the DINO features
    loss.backward()
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in repa.projector.parameters())
    assert all(p.grad is None for p in repa.dino.parameters())


def test_repa_dino_input_matches_nonsquare_token_grid(repa: REPALoss) -> None:
    seen: list[torch.Size] = []
    handle = repa.dino.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["pixel_values"].shape), with_kwargs=True
    )
    grid = (3, 5)
    try:
        loss = repa(torch.randn(2, 15, 24), grid, _images(2, 24, 40))
    finally:
        handle.remove()
    assert seen == [torch.Size([2, 3, 3 * DINO_PATCH, 5 * DINO_PATCH])]
    assert torch.isfinite(loss)
    assert repa.dino_features(_images(2, 24, 40), grid).shape == (2, 15, DINO_DIM)


def test_repa_rejects_wrong_token_count(repa: REPALoss) -> None:
    with pytest.raises(ValueError, match="grid_size"):
        repa(torch.randn(1, 10, 24), (3, 4), _images(1, 24, 32))


# ----------------------------------------------------------------------------------------------------
# KL
# ----------------------------------------------------------------------------------------------------
def test_kl_loss_unit_mean_zero_logvar() -> None:
    mean = torch.ones(2, 4, 2, 2)
    logvar = torch.zeros(2, 4, 2, 2)
    posterior = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))
    # per element 0.5 * (1 + 1 - 1 - 0) = 0.5, 16 elements per image -> 8, batch mean 8
    assert kl_loss(posterior).item() == pytest.approx(8.0)


def test_kl_loss_matches_formula() -> None:
    gen = torch.Generator().manual_seed(0)
    mean = torch.randn(3, 4, 5, 6, generator=gen)
    logvar = torch.randn(3, 4, 5, 6, generator=gen)
    posterior = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))
    m, lv = mean.double(), logvar.double()
    per_image = 0.5 * (m**2 + lv.exp() - 1 - lv).sum(dim=(1, 2, 3))
    assert kl_loss(posterior).item() == pytest.approx(per_image.mean().item(), rel=1e-5)
    deterministic = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1), deterministic=True)
    assert kl_loss(deterministic).item() == 0.0
