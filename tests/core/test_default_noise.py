"""Where ``decode`` makes its starting noise, and what a compiled decode contains."""

from __future__ import annotations

import pytest
import torch
from helpers.configs import perturb_, tiny_config

from ssdd_diffusers import SSDDAutoencoder
from ssdd_diffusers.models import autoencoder_ssdd
from ssdd_diffusers.sampling import euler_schedule, flow_time_grid


class _DeviceGenerator:
    """Stands in for a generator of a device this machine does not have."""

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)

    def manual_seed(self, seed: int) -> _DeviceGenerator:
        self.seed = seed
        return self


def test_default_noise_is_drawn_on_the_latents_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """No generator: one generator of the latents' device, seeded with 0, draws all the noise there in
    one call; no CPU generator and no CPU tensor is involved."""
    made, drawn = [], []

    def generator(device: str | torch.device = "cpu") -> _DeviceGenerator:
        made.append(_DeviceGenerator(device))
        return made[-1]

    def randn_tensor(shape, generator, device, dtype):
        drawn.append((tuple(shape), generator, torch.device(device), dtype))
        return torch.zeros(shape, dtype=dtype, device="meta")

    monkeypatch.setattr(torch, "Generator", generator)
    monkeypatch.setattr(autoencoder_ssdd, "randn_tensor", randn_tensor)
    for device in ("cuda", "cuda:1", "xpu", "cpu"):
        made.clear()
        drawn.clear()
        noise = autoencoder_ssdd._draw_noise((2, 3, 16, 16), None, torch.device(device))
        assert [g.device for g in made] == [torch.device(device)] and made[0].seed == 0
        assert drawn == [((2, 3, 16, 16), made[0], torch.device(device), torch.float32)]
        assert noise.shape == (2, 3, 16, 16)
    # an explicit generator draws on its own device (a CPU generator: the same numbers everywhere)
    made.clear()
    drawn.clear()
    explicit = _DeviceGenerator("cpu")
    autoencoder_ssdd._draw_noise((1, 3, 8, 8), explicit, torch.device("cuda"))
    assert not made and drawn[0][1] is explicit and drawn[0][2] == torch.device("cpu")


@torch.no_grad()
def test_default_noise_on_the_cpu_is_unchanged() -> None:
    """On the CPU the default noise is what it always was: a CPU generator seeded with 0."""
    torch.manual_seed(0)
    vae = perturb_(SSDDAutoencoder(**tiny_config(num_inference_steps=1))).eval()
    z = torch.randn(2, 4, 8, 8)
    expected = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(vae._initial_noise(z, None, None, torch.float32), expected)
    assert torch.equal(vae.decode(z).sample, vae.decode(z, noise=expected).sample)
    # explicit noise on the same device is used as it is (no copy)
    assert vae._initial_noise(z, None, expected, torch.float32) is expected


def test_euler_schedule_is_the_float32_time_grid() -> None:
    for steps, power in ((1, 2.0), (4, 2.0), (12, 2.0), (7, 1.5)):
        grid = flow_time_grid(steps, power)
        times, step_sizes = euler_schedule(steps, power)
        assert list(times) == grid[:-1].tolist() and times[0] == 1.0
        assert list(step_sizes) == (grid[:-1] - grid[1:]).tolist()


@torch.no_grad()
def test_compiled_one_step_decode_is_one_graph_after_two_eager_steps() -> None:
    """``torch.compile(vae.decode)``: the noise and the time schedule are the only graph breaks (both
    ``torch.compiler.disable``d, no ``.item()`` or other host synchronisation), the decoder is one graph,
    and the compiled decode gives the eager result."""
    torch.manual_seed(0)
    vae = perturb_(SSDDAutoencoder(**tiny_config(num_inference_steps=1, prediction_type="edm"))).eval()
    z = torch.randn(2, 4, 8, 8)
    eager = vae.decode(z).sample
    torch._dynamo.reset()
    explained = torch._dynamo.explain(vae.decode)(z)
    reasons = [str(b.reason) for b in explained.break_reasons]
    assert explained.graph_break_count == 2, reasons
    assert all("torch.compiler.disable" in reason for reason in reasons), reasons
    assert max(len(g.graph.nodes) for g in explained.graphs) > 100  # the whole decoder in one graph
    compiled = torch.compile(vae.decode, backend="aot_eager")(z).sample
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
