"""Local (windowed) self-attention with a learned relative-position bias, linear in the token count.

Upstream SSDD attends over all H*W tokens with a dense additive mask that is -1e7 outside a
(2w-1) x (2w-1) neighbourhood. Here the grid is cut into query blocks; each block attends only to its
halo (the block grown by w-1 tokens on every side), so no tensor of size tokens x tokens is ever built
and time and memory grow linearly with the number of tokens. Masked keys get exactly zero weight in
both formulations, so the result equals the dense definition up to float rounding.

Along an axis that fits in one block plus its halo, the block spans the whole axis and no halo is
needed (small grids, including grids smaller than the window).

Keys of a border block's halo that fall outside the grid are padding, masked through the bias, so the
bias differs per block: (num_blocks, heads, Q, K). SDPA sees (B, num_blocks * heads, Q, head_dim)
inputs, blocks folded into its head axis, so this bias broadcasts over the batch as
(1, num_blocks * heads, Q, K): it is never repeated per image and its size does not depend on the batch
(4 MB per layer in bf16 for a 32 x 32 grid, block 8, window 8, 4 heads).

Caches (eager only; under ``torch.compile`` everything is rebuilt in the graph): a module-level cache
of layouts (pure geometry, at most ``_LAYOUT_CACHE_SIZE`` entries, insertions under a lock) and one
gathered bias per attention layer (one immutable entry, swapped by a single assignment), so concurrent
``decode()`` calls from several threads on one model are safe.
"""

from __future__ import annotations

import math
import threading
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


# Bias value for masked (query, key) pairs (out of the window, or padded keys): exp(mask - max)
# underflows to exactly 0, and a quarter of the dtype's range leaves room for the logits added to it, so
# no score becomes -inf and no row of the softmax can turn into NaN, in fp32, bf16 and fp16.
def _mask_value(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).min / 4


@dataclass(frozen=True)
class _AxisPlan:
    """How one grid axis is cut into query blocks and key windows."""

    length: int  # tokens along the axis
    block: int  # queries per block
    num_blocks: int
    halo: int  # keys added before (and after) each block
    key_len: int  # keys per block window

    @property
    def padded_query_len(self) -> int:
        return self.block * self.num_blocks

    @property
    def padded_key_len(self) -> int:
        return self.padded_query_len + 2 * self.halo


def _plan_axis(length: int, window: int, block: int) -> _AxisPlan:
    reach = window - 1
    if length <= block + 2 * reach:
        return _AxisPlan(length, length, 1, 0, length)
    num_blocks = math.ceil(length / block)
    return _AxisPlan(length, block, num_blocks, reach, block + 2 * reach)


@dataclass(frozen=True)
class WindowLayout:
    """Geometry of blocked local attention on one (H, W) grid; independent of any parameter value.

    ``bias_index`` (Q, K) indexes the flattened bias table extended by one masked row; ``key_valid``
    (num_blocks, K) is False for padded keys outside the grid, or None when no key is padded.
    """

    rows: _AxisPlan
    cols: _AxisPlan
    window: int
    bias_index: torch.Tensor
    key_valid: torch.Tensor | None

    @property
    def num_blocks(self) -> int:
        return self.rows.num_blocks * self.cols.num_blocks


def _axis_offsets(plan: _AxisPlan, window: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Offsets query-minus-key (block, key_len), their window validity, and key in-grid validity."""
    query = torch.arange(plan.block)[:, None]
    key = torch.arange(plan.key_len)[None, :]
    offset = query + plan.halo - key  # (block, key_len)
    in_window = offset.abs() <= window - 1
    key_pos = torch.arange(plan.num_blocks)[:, None] * plan.block - plan.halo + key  # (num_blocks, key_len)
    in_grid = (key_pos >= 0) & (key_pos < plan.length)
    return offset, in_window, in_grid


def _build_layout(height: int, width: int, window: int, block: int, device: torch.device) -> WindowLayout:
    rows, cols = _plan_axis(height, window, block), _plan_axis(width, window, block)
    dy, valid_y, grid_y = _axis_offsets(rows, window)
    dx, valid_x, grid_x = _axis_offsets(cols, window)
    side = 2 * window - 1
    index = (dy[:, None, :, None] + window - 1) * side + (dx[None, :, None, :] + window - 1)
    valid = valid_y[:, None, :, None] & valid_x[None, :, None, :]
    index = torch.where(valid, index, side * side)  # the extra masked row of the table
    index = index.reshape(rows.block * cols.block, rows.key_len * cols.key_len)
    # Keys are padded only along an axis with a halo (an axis without one is a single block spanning it),
    # so "no padded key" is a static fact of the plan: no data-dependent branch (compile-friendly).
    key_valid = None
    if rows.halo or cols.halo:
        key_valid = (grid_y[:, None, :, None] & grid_x[None, :, None, :]).reshape(
            rows.num_blocks * cols.num_blocks, rows.key_len * cols.key_len
        )
        key_valid = key_valid.to(device)
    return WindowLayout(rows, cols, window, index.to(device), key_valid)


_LAYOUT_CACHE: dict[tuple[int, int, int, int, torch.device], WindowLayout] = {}
_LAYOUT_CACHE_SIZE = 64  # entries; the oldest is dropped first
_LAYOUT_CACHE_LOCK = threading.Lock()  # held by insertions and evictions; lookups take no lock


def window_layout(height: int, width: int, window: int, block: int, device: torch.device) -> WindowLayout:
    """Cached layout for an (height, width) token grid. Pure geometry: safe to cache forever.

    Under ``torch.compile`` the layout is rebuilt from index arithmetic inside the graph (no Python cache
    lookups, no graph break). Eager calls use a small dict, safe from several threads: a hit is one
    ``dict.get``; a miss builds the layout unlocked, then inserts it (and evicts) under a lock, so that no
    thread iterates the dict while another one resizes it, and all threads share one layout per key.
    """
    key = (int(height), int(width), int(window), int(block), torch.device(device))
    if torch.compiler.is_compiling():
        return _build_layout(*key)
    layout = _LAYOUT_CACHE.get(key)
    if layout is not None:
        return layout
    built = _build_layout(*key)
    with _LAYOUT_CACHE_LOCK:
        layout = _LAYOUT_CACHE.get(key)
        if layout is None:
            while len(_LAYOUT_CACHE) >= _LAYOUT_CACHE_SIZE:
                del _LAYOUT_CACHE[next(iter(_LAYOUT_CACHE))]
            layout = _LAYOUT_CACHE[key] = built
    return layout


def blocked_attention_bias(table: torch.Tensor, layout: WindowLayout, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention bias for every query block, from the *current* table values.

    table: (2w-1, 2w-1, heads). Returns a contiguous (num_blocks, heads, Q, K) bias: the relative bias,
    with the mask value for offsets outside the window and for padded keys (a single block when no key is
    padded). Computed from the table on every call unless the caller caches it (see ``local_attention``),
    so it carries gradients to the table.
    """
    heads = table.shape[-1]
    mask = _mask_value(dtype)
    masked = torch.full((heads, 1), mask, dtype=dtype, device=table.device)
    flat = torch.cat([table.reshape(-1, heads).to(dtype).t(), masked], dim=1)  # (heads, (2w-1)^2 + 1)
    bias = flat[:, layout.bias_index][None]  # (1, heads, Q, K)
    if layout.key_valid is None:
        return bias
    return torch.where(layout.key_valid[:, None, None, :], bias, mask)  # (num_blocks, heads, Q, K)


@torch.library.custom_op("ssdd_diffusers::window_attention_bias", mutates_args=())
def _window_attention_bias_op(
    table: torch.Tensor, height: int, width: int, block: int, dtype: torch.dtype
) -> torch.Tensor:
    """``blocked_attention_bias`` as one opaque op, for compiled inference.

    Inside a compiled graph the layout's index tensors come from ``arange`` and friends, which Inductor's
    constant folding never treats as constants, so the gather from the table was recomputed on every
    call (about 5 ms per layer at 256 px on a 2-core CPU). As an op whose only tensor input is the table,
    it is folded into a constant when the weights are frozen (``torch._inductor.config.freezing``).
    """
    window = (table.shape[0] + 1) // 2
    layout = window_layout(height, width, window, block, table.device)
    return blocked_attention_bias(table, layout, dtype).contiguous()  # the fake's (contiguous) strides


@_window_attention_bias_op.register_fake
def _(table: torch.Tensor, height: int, width: int, block: int, dtype: torch.dtype) -> torch.Tensor:
    window = (table.shape[0] + 1) // 2
    rows, cols = _plan_axis(height, window, block), _plan_axis(width, window, block)
    blocks = rows.num_blocks * cols.num_blocks  # 1 when no key is padded (no halo: one block per axis)
    queries, keys = rows.block * cols.block, rows.key_len * cols.key_len
    return table.new_empty((blocks, table.shape[-1], queries, keys), dtype=dtype)


# Largest bias (in bytes) kept by the inference cache of one attention layer; bigger ones are rebuilt.
BIAS_CACHE_MAX_BYTES = 8 * 2**20


@dataclass(frozen=True, eq=False)
class _BiasEntry:
    """The one cached bias of an attention layer: immutable, replaced whole by a single assignment."""

    key: tuple
    table: weakref.ref
    bias: torch.Tensor


def _cached_bias(
    table: torch.Tensor, layout: WindowLayout, dtype: torch.dtype, cache: dict | None, grid: tuple[int, ...]
) -> torch.Tensor:
    """``blocked_attention_bias``, reused across calls while the table is unchanged.

    Only used when no gradient can flow to the table and outside ``torch.compile``; the key holds the
    table's storage pointer and in-place version counter, so any weight update or load invalidates it.
    Compiled inference on CPU calls the bias as one opaque op instead (see ``_window_attention_bias_op``);
    on GPUs the gather stays in the graph, so compiled graphs hold no opaque op.

    Thread safety: the cache holds one ``_BiasEntry`` under ``"entry"``, read with one ``dict.get`` and
    replaced with one assignment, so a thread never pairs the key of one entry with the bias of another;
    concurrent calls on different grids only cost rebuilds. At most one entry (<= ``BIAS_CACHE_MAX_BYTES``).
    """
    if torch.is_grad_enabled() and table.requires_grad:
        return blocked_attention_bias(table, layout, dtype)
    if torch.compiler.is_compiling():
        if table.device.type == "cpu":  # frozen weights fold the op into a constant (see the op)
            return _window_attention_bias_op(table, *grid, dtype)
        return blocked_attention_bias(table, layout, dtype)  # GPUs: no opaque op; Inductor fuses the gather
    if cache is None or table.is_inference():
        return blocked_attention_bias(table, layout, dtype)
    key = (table.data_ptr(), table._version, tuple(table.shape), table.dtype, table.device, grid, dtype)
    entry = cache.get("entry")
    if entry is not None and entry.key == key and entry.table() is table:
        return entry.bias
    with torch.no_grad():
        bias = blocked_attention_bias(table, layout, dtype)
    small = bias.numel() * bias.element_size() <= BIAS_CACHE_MAX_BYTES
    cache["entry"] = _BiasEntry(key, weakref.ref(table), bias) if small else None
    return bias


def local_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    table: torch.Tensor,
    block: int = 8,
    bias_cache: dict | None = None,
) -> torch.Tensor:
    """Multi-head local attention on a token grid.

    query/key/value: (B, H, W, heads, head_dim); table: (2w-1, 2w-1, heads) relative-position bias,
    indexed by (query - key) offsets. Returns (B, H, W, heads * head_dim). ``bias_cache``: a dict owned
    by the caller in which the gathered bias is kept between inference calls (see ``_cached_bias``).
    """
    batch, height, width, heads, head_dim = query.shape
    window = (table.shape[0] + 1) // 2
    layout = window_layout(height, width, window, block, query.device)
    rows, cols = layout.rows, layout.cols
    blocks = layout.num_blocks
    q_len, k_len = rows.block * cols.block, rows.key_len * cols.key_len

    # Pad queries to whole blocks and keys/values by the halo plus the same block padding.
    pad_qy, pad_qx = rows.padded_query_len - height, cols.padded_query_len - width
    if pad_qy or pad_qx:
        query = F.pad(query, (0, 0, 0, 0, 0, pad_qx, 0, pad_qy))
    kv_pad = (0, 0, 0, 0, cols.halo, cols.halo + pad_qx, rows.halo, rows.halo + pad_qy)
    if any(kv_pad):
        key, value = F.pad(key, kv_pad), F.pad(value, kv_pad)

    # (B, blocks * heads, Q, head_dim) queries; (B, blocks * heads, K, head_dim) key windows: blocks ride
    # on SDPA's head axis, so the per-block bias (1, blocks * heads, Q, K) broadcasts over the batch and
    # is never repeated per image. 4-D inputs let SDPA take its fused CPU/GPU kernels (5-D inputs fall
    # back to the unfused math path).
    q_blocks = query.reshape(batch, rows.num_blocks, rows.block, cols.num_blocks, cols.block, heads, head_dim)
    q_blocks = q_blocks.permute(0, 1, 3, 5, 2, 4, 6).reshape(batch, blocks * heads, q_len, head_dim)

    def windows(t: torch.Tensor) -> torch.Tensor:
        t = t.unfold(1, rows.key_len, rows.block).unfold(2, cols.key_len, cols.block)
        # (B, nby, nbx, heads, head_dim, ky, kx) -> (B, blocks * heads, ky*kx, head_dim)
        t = t.permute(0, 1, 2, 3, 5, 6, 4)
        return t.reshape(batch, blocks * heads, k_len, head_dim)

    bias = _cached_bias(table, layout, query.dtype, bias_cache, (height, width, block))
    bias = bias.reshape(1, blocks * heads, q_len, k_len)  # (num_blocks, heads, Q, K), contiguous: a view
    out = F.scaled_dot_product_attention(q_blocks, windows(key), windows(value), attn_mask=bias)
    out = out.reshape(batch, rows.num_blocks, cols.num_blocks, heads, rows.block, cols.block, head_dim)
    out = out.permute(0, 1, 4, 2, 5, 3, 6).reshape(
        batch, rows.padded_query_len, cols.padded_query_len, heads * head_dim
    )
    if pad_qy or pad_qx:
        out = out[:, :height, :width]
    return out


def dense_relative_bias(table: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Reference dense bias (heads, N, N), N = height * width: the upstream definition, -1e7 outside
    the window. Quadratic in N: for tests and small grids only."""
    window = (table.shape[0] + 1) // 2
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    dy = ys[:, None] - ys[None, :]
    dx = xs[:, None] - xs[None, :]
    valid = (dy.abs() <= window - 1) & (dx.abs() <= window - 1)
    values = table[(dy + window - 1).clamp(0, 2 * window - 2), (dx + window - 1).clamp(0, 2 * window - 2)]
    values = values.permute(2, 0, 1)  # (heads, N, N)
    return torch.where(valid[None].to(table.device), values, torch.full_like(values, -1e7))


class RelativePositionBias(nn.Module):
    """Learned (2w-1, 2w-1, heads) table of attention biases indexed by (query - key) offsets."""

    def __init__(self, window: int, num_heads: int):
        super().__init__()
        self.window = window
        self.relative_bias_table = nn.Parameter(torch.zeros(2 * window - 1, 2 * window - 1, num_heads))


class LocalSelfAttention(nn.Module):
    """Multi-head self-attention restricted to offsets within +-(window-1), with relative bias.

    Parameter names follow upstream SSDD (``to_q``, ``to_k``, ``to_v`` without bias, ``out_proj``).
    """

    def __init__(self, dim: int, num_heads: int, window: int, block_size: int = 8):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Attention width {dim} is not divisible by {num_heads} heads.")
        self.num_heads = num_heads
        self.block_size = block_size
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.out_proj = nn.Linear(dim, dim)
        self._bias_cache: dict = {}  # inference-only cache of the gathered bias (never saved)

    def forward(self, hidden_states: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """hidden_states: (B, H, W, dim) token grid -> (B, H, W, dim)."""
        batch, height, width, dim = hidden_states.shape
        shape = (batch, height, width, self.num_heads, dim // self.num_heads)
        q = self.to_q(hidden_states).view(shape)
        k = self.to_k(hidden_states).view(shape)
        v = self.to_v(hidden_states).view(shape)
        return self.out_proj(local_attention(q, k, v, table, self.block_size, self._bias_cache))
