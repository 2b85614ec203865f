"""The decoder's output parameterisation: upstream velocity, or EDM-style preconditioning whose one-step
output does not pass the starting noise through."""

from __future__ import annotations

import pytest
import torch
from helpers.configs import TWO_LEVEL_DECODER_CONFIG, perturb_, tiny_config

from ssdd_diffusers import SSDDAutoencoder
from ssdd_diffusers.models.uvit_decoder import UViTDecoder, edm_coefficients
from ssdd_diffusers.torch_utils import CPU_ALIGNMENT, own_cpu_memory_


def test_edm_coefficients_give_the_velocity_of_the_clean_estimate() -> None:
    """v = (x0_hat - x_t) / t with x0_hat = c_skip x_t + c_out F, for every t in (0, 1]; c_skip = 0 at
    t = 1 and c_in makes x_t unit-variance for data of std sigma.

    The reference is computed in float64: in float32, (x0_hat - x_t) / t at t = 1e-3 loses about 1e-4 of
    relative precision to cancellation (the library's form has no division by t), which made a float32
    reference fail about one draw in eight."""
    sigma = 0.5
    generator = torch.Generator().manual_seed(0)
    t = torch.tensor([1e-3, 0.1, 0.5, 0.9, 1.0])
    c_in, a, b = edm_coefficients(t, sigma)
    t64 = t.double()
    keep = 1 - t64
    variance = keep**2 * sigma**2 + t64**2
    c_skip, c_out = keep * sigma**2 / variance, t64 * sigma / variance.sqrt()
    for _ in range(50):  # many draws: the bound holds for every one, not for a lucky seed
        x_t, network = torch.randn(2, 5, generator=generator, dtype=torch.float64)
        x0 = c_skip * x_t + c_out * network
        torch.testing.assert_close(
            (a * x_t.float() + b * network.float()).double(), (x0 - x_t) / t64, rtol=1e-5, atol=1e-6
        )
    torch.testing.assert_close(c_in.double(), variance.rsqrt())
    assert c_skip[-1] == 0 and c_out[-1] == sigma
    # x_t = (1 - t) x + t eps with x ~ N(0, sigma^2): c_in x_t has unit variance (standard error of the
    # sample std at n = 200k: 0.0016, so 0.01 is a six-sigma bound)
    x, eps = torch.randn(2, 200_000, generator=generator)
    x = x * sigma
    assert (
        abs(float((edm_coefficients(torch.tensor(0.3), sigma)[0] * (0.7 * x + 0.3 * eps)).std()) - 1) < 0.01
    )


def test_edm_one_step_output_is_the_preconditioned_network_output() -> None:
    """At t = 1 one Euler step gives x_t + v = sigma * F(x_t, 1, z): nothing of the noise is added back,
    so the noise reaches the output only through what the network makes of it."""
    torch.manual_seed(0)
    decoder = perturb_(UViTDecoder(**TWO_LEVEL_DECODER_CONFIG, prediction_type="edm", sigma_data=0.5)).eval()
    noise, z = torch.randn(2, 3, 16, 16), torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        one_step = noise + decoder(noise, torch.ones(2), z)
        network = decoder._network(noise, torch.ones(2), z)
    torch.testing.assert_close(one_step, 0.5 * network, atol=1e-6, rtol=1e-5)


def test_velocity_is_the_default_and_unchanged() -> None:
    torch.manual_seed(0)
    decoder = perturb_(
        UViTDecoder(block_out_channels=(32, 64), transformer_layers=1, attention_window=2)
    ).eval()
    assert decoder.prediction_type == "velocity"
    x_t, z = torch.randn(1, 3, 16, 16), torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(
            decoder(x_t, torch.tensor([0.3]), z), decoder._network(x_t, torch.tensor([0.3]), z)
        )
    with pytest.raises(ValueError, match="prediction_type"):
        UViTDecoder(prediction_type="epsilon")
    with pytest.raises(ValueError, match="sigma_data"):
        UViTDecoder(prediction_type="edm", sigma_data=0.0)


def test_prediction_type_is_saved_and_reloaded(tmp_path) -> None:
    torch.manual_seed(0)
    vae = perturb_(SSDDAutoencoder(**tiny_config(prediction_type="edm", sigma_data=0.6))).eval()
    assert vae.decoder.prediction_type == "edm" and vae.decoder.sigma_data == 0.6
    vae.save_pretrained(tmp_path)
    loaded = SSDDAutoencoder.from_pretrained(tmp_path).eval()
    assert loaded.config.prediction_type == "edm" and loaded.decoder.sigma_data == 0.6
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():  # bit-identical on one machine: loading hands back ordinary, aligned memory
        torch.testing.assert_close(loaded.decode(z).sample, vae.decode(z).sample, atol=0, rtol=0)


def test_reloaded_weights_live_in_ordinary_aligned_memory(tmp_path) -> None:
    """The cause of reloaded models decoding differently in the last bits on some CPUs (AMD EPYC with
    AVX-512): diffusers keeps safetensors' memory-mapped views, at 4-byte-aligned file offsets, as the
    parameters, and CPU kernels take other code paths for them. ``from_pretrained`` copies them."""
    vae = perturb_(SSDDAutoencoder(**tiny_config())).eval()
    vae.save_pretrained(tmp_path)
    for output_loading_info in (False, True):
        loaded = SSDDAutoencoder.from_pretrained(tmp_path, output_loading_info=output_loading_info)
        model = loaded[0] if output_loading_info else loaded
        tensors = [*model.parameters(), *model.buffers()]
        assert tensors and all(t.data_ptr() % CPU_ALIGNMENT == 0 for t in tensors)
        for name, value in vae.state_dict().items():
            assert torch.equal(model.state_dict()[name], value), name
    # Already-aligned and non-CPU tensors are left alone: no copy, the same storage.
    before = [p.data_ptr() for p in vae.parameters()]
    assert [p.data_ptr() for p in own_cpu_memory_(vae).parameters()] == before
