"""Local attention's eager caches (layouts, per-layer bias) under concurrent calls from several threads."""

from __future__ import annotations

import importlib
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

local_attention_module = importlib.import_module("ssdd_diffusers.models.local_attention")
LocalSelfAttention = local_attention_module.LocalSelfAttention
local_attention = local_attention_module.local_attention

THREADS = 8
WINDOW, BLOCK, HEADS, HEAD_DIM = 4, 4, 2, 8
# Grids with padded keys (a halo along at least one axis: more than BLOCK + 2 * (WINDOW - 1) = 10 tokens)
# and without (every axis a single block).
SIZES = [(20, 12), (12, 9), (16, 16), (11, 23), (4, 4), (3, 7), (9, 10), (10, 1)]


@pytest.fixture
def fresh_caches(monkeypatch):
    """Empty layout cache bounded to 3 entries (so threads evict while others insert); one torch thread
    (fast, and results reproducible bit for bit); frequent thread switches to expose races."""
    monkeypatch.setattr(local_attention_module, "_LAYOUT_CACHE", {})
    monkeypatch.setattr(local_attention_module, "_LAYOUT_CACHE_SIZE", 3)
    torch_threads, switch = torch.get_num_threads(), sys.getswitchinterval()
    torch.set_num_threads(1)
    sys.setswitchinterval(1e-5)
    yield local_attention_module
    sys.setswitchinterval(switch)
    torch.set_num_threads(torch_threads)


def _inputs(height: int, width: int) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(height * 100 + width)
    shape = (2, height, width, HEADS, HEAD_DIM)
    return tuple(torch.randn(shape, generator=generator) for _ in range(3))


def _run_concurrently(fn, tasks: list[int]) -> list[torch.Tensor]:
    """fn(size_index) for every task, from THREADS threads (grad mode is per thread: set in fn)."""
    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        return list(pool.map(fn, tasks))


def _tasks(rounds: int) -> list[int]:
    return [(i * 5 + i // len(SIZES)) % len(SIZES) for i in range(rounds * len(SIZES))]


def test_local_attention_from_threads_equals_serial(fresh_caches):
    """Shared layout cache and one shared bias cache, mixed grid sizes, caches starting empty."""
    table = torch.randn(2 * WINDOW - 1, 2 * WINDOW - 1, HEADS, generator=torch.Generator().manual_seed(0))
    inputs = [_inputs(h, w) for h, w in SIZES]
    with torch.no_grad():
        expected = [local_attention(*qkv, table, block=BLOCK) for qkv in inputs]
    fresh_caches._LAYOUT_CACHE.clear()
    bias_cache: dict = {}

    def attend(index: int) -> torch.Tensor:
        with torch.no_grad():
            return local_attention(*inputs[index], table, block=BLOCK, bias_cache=bias_cache)

    tasks = _tasks(rounds=40)
    for index, got in zip(tasks, _run_concurrently(attend, tasks)):
        assert torch.equal(got, expected[index]), SIZES[index]
    assert len(fresh_caches._LAYOUT_CACHE) <= fresh_caches._LAYOUT_CACHE_SIZE
    assert set(bias_cache) <= {"entry"}


def test_shared_module_from_threads_equals_serial_and_caches_stay_bounded(fresh_caches):
    """One LocalSelfAttention shared by 8 threads (as ``decode()`` on one model), then many distinct sizes."""
    torch.manual_seed(0)
    attention = LocalSelfAttention(dim=HEADS * HEAD_DIM, num_heads=HEADS, window=WINDOW, block_size=BLOCK)
    table = torch.randn(2 * WINDOW - 1, 2 * WINDOW - 1, HEADS)
    tokens = [torch.randn(2, h, w, HEADS * HEAD_DIM) for h, w in SIZES]
    with torch.no_grad():
        expected = [attention(x, table) for x in tokens]
    fresh_caches._LAYOUT_CACHE.clear()
    attention._bias_cache.clear()

    def attend(index: int) -> torch.Tensor:
        with torch.no_grad():
            return attention(tokens[index], table)

    tasks = _tasks(rounds=40)
    for index, got in zip(tasks, _run_concurrently(attend, tasks)):
        assert torch.equal(got, expected[index]), SIZES[index]

    # A long-running server meeting ever new sizes: the caches keep their bounds.
    many = [(h, w) for h in range(5, 30, 3) for w in (6, 13, 21)]
    grids = [torch.randn(1, h, w, HEADS * HEAD_DIM) for h, w in many]

    def attend_grid(index: int) -> torch.Tensor:
        with torch.no_grad():
            return attention(grids[index], table)

    outputs = _run_concurrently(attend_grid, list(range(len(many))))
    assert all(out.shape == grid.shape and torch.isfinite(out).all() for out, grid in zip(outputs, grids))
    assert len(fresh_caches._LAYOUT_CACHE) <= fresh_caches._LAYOUT_CACHE_SIZE
    assert set(attention._bias_cache) <= {"entry"}
    entry = attention._bias_cache.get("entry")
    if entry is not None:
        assert entry.bias.numel() * entry.bias.element_size() <= fresh_caches.BIAS_CACHE_MAX_BYTES
