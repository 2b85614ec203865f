"""Overlapping tiles with linear blending, for memory-bounded encoding and decoding of large images.

A tile grid is planned in latent units so that tiles in pixel space stay aligned with the latent grid.
Each tile's output is weighted by a ramp that rises across the overlap with its neighbours (and is flat
at the image border); the blended result is sum(w_i * out_i) / sum(w_i).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .models.norm_statistics import normalize_with_statistics, provide_norm_statistics


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of size ``tile`` covering [0, length), consecutive tiles sharing
    ``overlap`` units; the last tile is flush with the end."""
    if length <= tile:
        return [0]
    stride = max(1, tile - overlap)
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def _ramp(size: int, start: int, length: int, overlap: int) -> torch.Tensor:
    """1-D blend weight of a tile of ``size`` placed at ``start`` on an axis of ``length``."""
    weight = torch.ones(size)
    if overlap <= 0:
        return weight
    ramp = (torch.arange(overlap, dtype=torch.float32) + 0.5) / overlap
    n = min(overlap, size)
    if start > 0:
        weight[:n] = torch.minimum(weight[:n], ramp[:n])
    if start + size < length:
        weight[-n:] = torch.minimum(weight[-n:], ramp[:n].flip(0))
    return weight


@dataclass(frozen=True)
class Tile:
    """A tile in units of the *input* grid, with its scale to the output grid."""

    top: int
    left: int
    height: int
    width: int


def plan_tiles(height: int, width: int, tile: int, overlap: int) -> list[Tile]:
    """Tiles covering a (height, width) grid in row-major order."""
    return [
        Tile(top, left, min(tile, height), min(tile, width))
        for top in tile_starts(height, tile, overlap)
        for left in tile_starts(width, tile, overlap)
    ]


def blend_tiles(
    fn: Callable[[Tile], torch.Tensor],
    tiles: list[Tile],
    in_size: tuple[int, int],
    out_scale: float,
    overlap: int,
) -> torch.Tensor:
    """Run ``fn`` on every tile and blend the outputs into one (B, C, H * s, W * s) tensor.

    ``fn(tile)`` returns the output for the input region of ``tile``; ``out_scale`` s converts input
    units to output units (e.g. the VAE factor when decoding, 1/factor when encoding).
    """
    out = weights = None
    out_h, out_w = round(in_size[0] * out_scale), round(in_size[1] * out_scale)
    ov = round(overlap * out_scale)
    for tile in tiles:
        result = fn(tile)
        top, left = round(tile.top * out_scale), round(tile.left * out_scale)
        th, tw = result.shape[-2:]
        if out is None:
            out = result.new_zeros(result.shape[0], result.shape[1], out_h, out_w, dtype=torch.float32)
            weights = torch.zeros(out_h, out_w, device=result.device)
        w = (_ramp(th, top, out_h, ov)[:, None] * _ramp(tw, left, out_w, ov)[None, :]).to(result.device)
        out[..., top : top + th, left : left + tw] += result.float() * w
        weights[top : top + th, left : left + tw] += w
    return out / weights


class SharedGroupNormStats:
    """Pool GroupNorm statistics over all tiles of an image, so that tiles agree on their tone.

    Per-tile GroupNorm normalises every tile by its own mean and variance, which shifts colours from
    tile to tile. Used as ``with stats.recording(): run all tiles`` then ``with stats.applying(): run
    all tiles again``: the first pass pools per-(sample, group) count, mean and squared deviations
    (Chan's parallel update, no E[x^2] - E[x]^2 cancellation) at every ``nn.GroupNorm`` of ``module``;
    the second normalises each tile with the pooled statistics instead of its own.

    The instance is itself a statistics provider (``provider(norm, x) -> (mean, rstd) | None``). A module
    whose norms consult providers (``consults_norm_statistics = True``: SSDD's decoder, on every path,
    the fused ones included) gets it through :func:`provide_norm_statistics`, for the calling thread only;
    any other module (diffusers' ``Encoder``) gets forward hooks on its norms for the duration of a pass.
    """

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.norms = [m for m in module.modules() if isinstance(m, torch.nn.GroupNorm)]
        self.pooled: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # id -> (n, mean, M2)
        self.mode: str | None = None

    def __call__(self, norm: torch.nn.GroupNorm, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Recording: add ``x``'s statistics to the pool and let the norm use its own (None). Applying:
        the pooled ``(mean, rstd)``, (B, G) float32 each."""
        if self.mode == "record":
            self._record(norm, x)
        elif self.mode == "apply":
            count, mean, m2 = self.pooled[id(norm)]
            return mean, torch.rsqrt(m2 / count + norm.eps)
        return None

    def _record(self, norm: torch.nn.GroupNorm, x: torch.Tensor) -> None:
        grouped = x.detach().float().reshape(x.shape[0], norm.num_groups, -1)  # (B, G, C/G * H * W)
        count = torch.full_like(grouped[..., 0], grouped.shape[-1])
        mean = grouped.mean(-1)
        m2 = (grouped - mean[..., None]).square().sum(-1)
        key = id(norm)
        if key in self.pooled:  # Chan et al.: merge (count, mean, M2) of two disjoint sets
            count_a, mean_a, m2_a = self.pooled[key]
            total = count_a + count
            delta = mean - mean_a
            mean = mean_a + delta * (count / total)
            m2 = m2_a + m2 + delta.square() * (count_a * count / total)
            count = total
        self.pooled[key] = (count, mean, m2)

    def _hook(self, norm: torch.nn.GroupNorm, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
        statistics = self(norm, inputs[0])
        return None if statistics is None else normalize_with_statistics(inputs[0], norm, statistics)

    @contextmanager
    def _run(self, mode: str):
        self.mode = mode
        try:
            if getattr(self.module, "consults_norm_statistics", False):
                with provide_norm_statistics(self):
                    yield self
            else:
                handles = [norm.register_forward_hook(self._hook) for norm in self.norms]
                try:
                    yield self
                finally:
                    for handle in handles:
                        handle.remove()
        finally:
            self.mode = None

    def recording(self):
        """Context in which every GroupNorm call adds its statistics to the pool."""
        self.pooled.clear()
        return self._run("record")

    def applying(self):
        """Context in which every GroupNorm call normalises with the pooled statistics."""
        return self._run("apply")
