"""Flow-matching Euler sampling for SSDD.

Convention: x_t = (1 - t) * x_0 + t * noise, t in [0, 1] (1 = pure noise); the network predicts the
velocity v = x_0 - noise, so one Euler step from t to t' is x_t' = x_t + v * (t - t').
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def flow_time_grid(
    num_steps: int, power: float = 2.0, device: torch.device | str | None = None
) -> torch.Tensor:
    """The (num_steps + 1,) float32 grid t_i = (1 - i / N) ** power, from 1 down to 0, made on ``device``
    (default CPU): a sampler that builds it where it decodes needs no host-to-device copy."""
    if num_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1; got {num_steps}.")
    return torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float32, device=device) ** power


@torch.compiler.disable  # host-side arithmetic on Python numbers: one graph break, never a device sync
@functools.lru_cache(maxsize=64)
def euler_schedule(num_steps: int, power: float = 2.0) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``flow_time_grid(num_steps, power)`` as Python numbers: the times t_0 .. t_{N-1} and the step sizes
    t_i - t_{i+1}, each the exact float32 value (the step formed in float32, as the tensor grid gives)."""
    grid = flow_time_grid(num_steps, power)
    return tuple(grid[:-1].tolist()), tuple((grid[:-1] - grid[1:]).tolist())


def euler_sample(velocity: VelocityFn, noise: torch.Tensor, time_grid: torch.Tensor) -> torch.Tensor:
    """Integrate dx/dt = -v from t = time_grid[0] to time_grid[-1], starting at ``noise``.

    velocity(x_t, t) takes a (B,) float32 time tensor on the noise's device and returns (B, C, H, W). The
    step sizes stay 0-dim float32 tensors there: the same products as with Python floats, and no
    ``.item()`` (no host synchronisation, no graph break under ``torch.compile``).
    """
    x = noise
    batch = noise.shape[0]
    time_grid = time_grid.to(noise.device)  # a no-op for a grid made on the noise's device
    for i in range(len(time_grid) - 1):
        t = time_grid[i].expand(batch)
        step = time_grid[i] - time_grid[i + 1]  # a float32 value, formed before the multiply
        x = x + velocity(x, t) * step
    return x


def euler_sample_on_grid(
    velocity: Callable[[torch.Tensor, float], torch.Tensor], noise: torch.Tensor, num_steps: int, power: float
) -> torch.Tensor:
    """``euler_sample(velocity, noise, flow_time_grid(num_steps, power))`` with the times passed as Python
    floats, one for the whole batch (see :func:`euler_schedule`): the same values and products, and a
    decoder can reuse what is constant at a given time (``SSDDAutoencoder.decode`` samples this way)."""
    times, steps = euler_schedule(num_steps, power)
    x = noise
    for t, step in zip(times, steps):
        x = x + velocity(x, t) * step
    return x
