"""Flow-matching Euler sampling for SSDD.

Convention: x_t = (1 - t) * x_0 + t * noise, t in [0, 1] (1 = pure noise); the network predicts the
velocity v = x_0 - noise, so one Euler step from t to t' is x_t' = x_t + v * (t - t').
"""

from __future__ import annotations

from collections.abc import Callable

import torch

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def flow_time_grid(num_steps: int, power: float = 2.0) -> torch.Tensor:
    """The (num_steps + 1,) float32 grid t_i = (1 - i / N) ** power, from 1 down to 0."""
    if num_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1; got {num_steps}.")
    return torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float32) ** power


def euler_sample(velocity: VelocityFn, noise: torch.Tensor, time_grid: torch.Tensor) -> torch.Tensor:
    """Integrate dx/dt = -v from t = time_grid[0] to time_grid[-1], starting at ``noise``.

    velocity(x_t, t) takes a (B,) float32 time tensor and returns (B, C, H, W).
    """
    x = noise
    batch = noise.shape[0]
    for i in range(len(time_grid) - 1):
        t = time_grid[i].expand(batch).to(noise.device)
        step = (time_grid[i] - time_grid[i + 1]).item()  # a float32 value, formed before the multiply
        x = x + velocity(x, t) * step
    return x
