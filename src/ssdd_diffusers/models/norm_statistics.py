"""Explicit GroupNorm statistics for the decoder, and a small thread-safe bounded cache for inference.

Tiled decoding normalises every tile with statistics pooled over the whole image. Instead of module hooks
on the norms (which every code path would have to detect, and which would leak into other threads
decoding with the same model), the decoder asks a *statistics provider* for each GroupNorm:

    with provide_norm_statistics(provider):
        decoder(x_t, t, z)

``provider(norm, x)`` returns ``(mean, rstd)``, each float32 of shape (B, G), to normalise ``x`` with, or
None to let the norm compute its own. The provider is held in a ``ContextVar``: it applies to the calling
thread only, and compiled graphs never see it (``current_provider`` is None while compiling).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn

NormStatisticsProvider = Callable[[nn.GroupNorm, torch.Tensor], "tuple[torch.Tensor, torch.Tensor] | None"]

_PROVIDER: ContextVar[NormStatisticsProvider | None] = ContextVar("ssdd_norm_statistics", default=None)


@contextmanager
def provide_norm_statistics(provider: NormStatisticsProvider | None) -> Iterator[None]:
    """Within the block (this thread only), the decoder's GroupNorms take their statistics from
    ``provider``; None restores the norms' own statistics."""
    token = _PROVIDER.set(provider)
    try:
        yield
    finally:
        _PROVIDER.reset(token)


def current_provider() -> NormStatisticsProvider | None:
    """The provider set by :func:`provide_norm_statistics` in this thread (never inside a compiled graph)."""
    if torch.compiler.is_compiling():
        return None
    return _PROVIDER.get()


def provided_statistics(norm: nn.GroupNorm, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(mean, rstd)`` (B, G) float32 for ``norm`` applied to ``x`` from the current provider, or None."""
    provider = current_provider()
    return None if provider is None else provider(norm, x)


def normalize_with_statistics(
    x: torch.Tensor, norm: nn.GroupNorm, statistics: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """``norm(x)`` with the given per-(image, group) ``(mean, rstd)`` (B, G) float32; keeps x's dtype and
    memory format, and applies the norm's affine."""
    mean, rstd = (s.reshape(x.shape[0], norm.num_groups, 1) for s in statistics)
    grouped = x.float().reshape(x.shape[0], norm.num_groups, -1)  # (B, G, C/G * H * W)
    out = ((grouped - mean) * rstd).reshape(x.shape)
    if norm.affine:
        shape = (1, -1) + (1,) * (x.ndim - 2)
        out = out * norm.weight.float().reshape(shape) + norm.bias.float().reshape(shape)
    channels_last = (
        x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    )
    out = out.to(x.dtype)
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


class BoundedCache:
    """A least-recently-used map of at most ``max_entries`` items, safe to share between threads.

    For values derived from weights at inference time (constant time modulations, gathered attention
    biases): a long-running server that meets ever new sizes keeps at most ``max_entries`` of them.
    Reads are one dictionary lookup; writes and evictions hold a lock.
    """

    def __init__(self, max_entries: int):
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1; got {max_entries}.")
        self.max_entries = max_entries
        self._items: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Hashable) -> Any | None:
        value = self._items.get(key)
        if value is not None:
            with self._lock:
                if key in self._items:
                    self._items.move_to_end(key)
        return value

    def put(self, key: Hashable, value: Any) -> Any:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)
        return value

    def __deepcopy__(self, memo: dict) -> BoundedCache:
        return BoundedCache(self.max_entries)  # derived values are rebuilt; a lock cannot be copied

    def __getstate__(self) -> dict:
        return {"max_entries": self.max_entries}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["max_entries"])

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
