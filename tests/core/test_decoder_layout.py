"""The decoder's memory-format choice, its fused time-modulated GroupNorm and its transposed-convolution
upsampling keep its numbers."""

import pytest
import torch
from diffusers.models.resnet import Upsample2D
from helpers.configs import FOUR_LEVEL_DECODER_CONFIG, TWO_LEVEL_DECODER_CONFIG
from torch import nn

from ssdd_diffusers.models import fused_norms
from ssdd_diffusers.models.uvit_decoder import UViTDecoder, _group_norm_scale_shift, upsample_conv


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_group_norm_scale_shift_matches_unfused(affine: bool, channels_last: bool) -> None:
    torch.manual_seed(0)
    norm = nn.GroupNorm(8, 32, affine=affine)
    if affine:
        nn.init.normal_(norm.weight)
        nn.init.normal_(norm.bias)
    x = torch.randn(3, 32, 6, 10) * 3 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    scale, shift = torch.randn(3, 32), torch.randn(3, 32)
    expected = norm(x) * scale[:, :, None, None] + shift[:, :, None, None]
    torch.testing.assert_close(_group_norm_scale_shift(x, norm, scale, shift), expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # in-place inference path
        torch.testing.assert_close(
            _group_norm_scale_shift(x, norm, scale, shift), expected, atol=1e-5, rtol=1e-5
        )


def test_group_norm_scale_shift_gradients_match() -> None:
    torch.manual_seed(0)
    norm = nn.GroupNorm(4, 8)
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    scale = torch.randn(2, 8, requires_grad=True)
    shift = torch.randn(2, 8, requires_grad=True)
    fused = _group_norm_scale_shift(x, norm, scale, shift)
    grads = torch.autograd.grad(fused.square().sum(), (x, scale, shift, norm.weight))
    reference = norm(x) * scale[:, :, None, None] + shift[:, :, None, None]
    expected = torch.autograd.grad(reference.square().sum(), (x, scale, shift, norm.weight))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("size", [(5, 7), (8, 8)])
def test_upsample_conv_equals_nearest_upsample_then_conv(channels_last: bool, size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    upsampler = Upsample2D(6, use_conv=True, out_channels=10)
    x = torch.randn(2, 6, *size, requires_grad=True)
    if channels_last:
        x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    expected = upsampler(x)  # interpolate(scale_factor=2, mode="nearest") then the 3x3 conv
    got = upsample_conv(upsampler, x)
    assert got.shape == (2, 10, 2 * size[0], 2 * size[1])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    weights = (x, upsampler.conv.weight, upsampler.conv.bias)
    probe = torch.randn_like(expected)
    got_grads = torch.autograd.grad((got * probe).sum(), weights)
    for g, e in zip(got_grads, torch.autograd.grad((expected * probe).sum(), weights)):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-5)


def test_upsample_conv_falls_back_for_other_configurations() -> None:
    torch.manual_seed(0)
    upsampler = Upsample2D(4, use_conv=True, kernel_size=5, padding=2)
    x = torch.randn(1, 4, 3, 3)
    torch.testing.assert_close(upsample_conv(upsampler, x), upsampler(x), atol=0, rtol=0)


def test_decoder_layout_auto_and_forced_agree() -> None:
    torch.manual_seed(0)
    decoder = UViTDecoder(**TWO_LEVEL_DECODER_CONFIG).eval()
    for p in decoder.parameters():
        p.data.normal_(0, 0.1)
    assert decoder.channels_last is None  # auto: NHWC on CPU and with the Triton kernels, else NCHW
    assert decoder._use_channels_last(torch.device("cpu"))
    # on CUDA the kernels are on by default when Triton is installed (the fastest measured eager path)
    assert decoder._use_channels_last(torch.device("cuda")) == (fused_norms.triton is not None)
    decoder.fused_norm_kernels = False
    assert not decoder._use_channels_last(torch.device("cuda"))
    decoder.fused_norm_kernels = None
    x, z = torch.randn(2, 3, 32, 32), torch.randn(2, 4, 4, 4)
    with torch.no_grad():
        outputs = {}
        for layout in (None, True, False):
            decoder.channels_last = layout
            outputs[layout] = decoder(x, torch.tensor([0.3, 0.9]), z)
    assert outputs[None].abs().max() > 0.01
    torch.testing.assert_close(outputs[True], outputs[None], atol=0, rtol=0)
    torch.testing.assert_close(outputs[False], outputs[True], atol=2e-5, rtol=1e-4)
    decoder.channels_last = True
    assert decoder._use_channels_last(torch.device("cuda"))


@pytest.mark.parametrize("size", [32, 128])  # 128 px: a 16 x 16 token grid takes the padded-halo path
def test_decoder_traces_as_one_graph(size: int) -> None:
    """torch.compile sees the whole decoder forward as one graph (no graph breaks), in inference mode."""
    torch._dynamo.reset()
    decoder = UViTDecoder(**FOUR_LEVEL_DECODER_CONFIG).eval()
    x, z = torch.randn(1, 3, size, size), torch.randn(1, 4, size // 8, size // 8)
    with torch.no_grad():
        explanation = torch._dynamo.explain(decoder)(x, torch.tensor([0.5]), z)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_compiled_decoder_matches_eager_with_aten_group_norm() -> None:
    """Under torch.compile on CPU (inference) GroupNorm runs as the opaque ATen op; results match eager."""
    from ssdd_diffusers.models.uvit_decoder import _eager_group_norm

    torch._dynamo.reset()
    torch.manual_seed(0)
    decoder = UViTDecoder(**FOUR_LEVEL_DECODER_CONFIG).eval()
    for p in decoder.parameters():
        p.data.normal_(0, 0.1)
    x, z = torch.randn(1, 3, 128, 128), torch.randn(1, 4, 16, 16)
    norm = nn.GroupNorm(8, 32)
    xc = torch.randn(2, 32, 5, 7).contiguous(memory_format=torch.channels_last)
    out = _eager_group_norm(xc, 8, norm.weight, norm.bias, norm.eps)
    torch.testing.assert_close(out, norm(xc), atol=0, rtol=0)
    assert out.is_contiguous(memory_format=torch.channels_last)  # what the fake implementation promises
    with torch.no_grad():
        expected = decoder(x, torch.tensor([0.5]), z)
        compiled = torch.compile(decoder, backend="aot_eager", dynamic=False)
        got = compiled(x, torch.tensor([0.5]), z)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_norm_groups_reach_every_group_norm_and_survive_save_and_reload(tmp_path) -> None:
    """``decoder_norm_groups`` sets every decoder GroupNorm (plain and context-modulated), round-trips
    through the config, and changes the function (the default of 32 stays upstream's)."""
    from helpers.configs import tiny_config

    from ssdd_diffusers import SSDDAutoencoder

    def decoder_groups(model: SSDDAutoencoder) -> set[int]:
        return {m.num_groups for m in model.decoder.modules() if isinstance(m, nn.GroupNorm)}

    assert decoder_groups(SSDDAutoencoder(**tiny_config())) == {32}
    torch.manual_seed(0)
    model = SSDDAutoencoder(**tiny_config(decoder_norm_groups=8)).eval()
    assert decoder_groups(model) == {8}
    assert sum(isinstance(m, nn.GroupNorm) for m in model.decoder.modules()) >= 10

    model.save_pretrained(tmp_path)
    reloaded = SSDDAutoencoder.from_pretrained(tmp_path).eval()
    assert reloaded.config.decoder_norm_groups == 8 and decoder_groups(reloaded) == {8}
    z = torch.randn(1, 4, 8, 8)
    x_t, t = torch.randn(1, 3, 32, 32), torch.tensor([0.7])
    with torch.no_grad():
        for p in model.decoder.parameters():  # make the zero-initialised branches matter
            p.add_(0.05 * torch.randn_like(p))
        expected = model.decoder(x_t, t, z)
        reloaded.load_state_dict(model.state_dict())
        torch.testing.assert_close(reloaded.decoder(x_t, t, z), expected)
        upstream_groups = SSDDAutoencoder(**tiny_config()).eval()
        upstream_groups.load_state_dict(model.state_dict())
        assert (upstream_groups.decoder(x_t, t, z) - expected).abs().max() > 1e-3


@pytest.mark.parametrize("groups", [0, 3, 64])
def test_norm_groups_must_divide_every_width(groups: int) -> None:
    message = f"positive divisor of every decoder width; got norm_groups={groups} "
    with pytest.raises(ValueError, match=message):
        UViTDecoder(**{**FOUR_LEVEL_DECODER_CONFIG, "norm_groups": groups})
