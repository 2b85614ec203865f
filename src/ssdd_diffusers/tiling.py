"""Overlapping tiles with linear blending, for memory-bounded encoding and decoding of large images.

A tile grid is planned in latent units so that tiles in pixel space stay aligned with the latent grid.
Each tile's output is weighted by a ramp that rises across the overlap with its neighbours (and is flat
at the image border); the blended result is sum(w_i * out_i) / sum(w_i).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


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
    all tiles again``: the first pass accumulates per-(sample, group) sums at every ``nn.GroupNorm``
    of ``module``; the second normalises each tile with the pooled statistics instead of its own.
    """

    def __init__(self, module: torch.nn.Module):
        self.norms = [m for m in module.modules() if isinstance(m, torch.nn.GroupNorm)]
        self.sums: dict[int, torch.Tensor] = {}
        self.mode: str | None = None

    def _hook(self, norm: torch.nn.GroupNorm, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
        x = inputs[0]
        grouped = x.float().reshape(x.shape[0], norm.num_groups, -1)  # (B, G, C/G * H * W)
        if self.mode == "record":
            count = torch.full_like(grouped[..., 0], grouped.shape[-1])
            total = torch.stack([grouped.sum(-1), (grouped**2).sum(-1), count])  # (3, B, G)
            key = id(norm)
            self.sums[key] = self.sums[key] + total if key in self.sums else total
            return None
        s, sq, n = self.sums[id(norm)]
        mean = s / n
        var = (sq / n - mean**2).clamp_min(0)
        normed = (grouped - mean[..., None]) * torch.rsqrt(var[..., None] + norm.eps)
        normed = normed.reshape(x.shape).to(x.dtype)
        if norm.affine:
            shape = (1, -1) + (1,) * (x.ndim - 2)
            normed = normed * norm.weight.reshape(shape) + norm.bias.reshape(shape)
        return normed

    def _run(self, mode: str):
        from contextlib import contextmanager

        @contextmanager
        def scope():
            self.mode = mode
            handles = [norm.register_forward_hook(self._hook) for norm in self.norms]
            try:
                yield self
            finally:
                for handle in handles:
                    handle.remove()
                self.mode = None

        return scope()

    def recording(self):
        """Context in which every GroupNorm call adds its statistics to the pool."""
        self.sums.clear()
        return self._run("record")

    def applying(self):
        """Context in which every GroupNorm call normalises with the pooled statistics."""
        return self._run("apply")
