"""Small torch helpers: dtype names for command lines, the default device, device synchronisation and
keeping frozen side networks in float32."""

from __future__ import annotations

import torch
from torch import nn

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
"""Precision names accepted on command lines (``--dtype bf16``) and their torch dtypes."""


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``"auto"``/``None`` -> CUDA if available, else CPU; anything else as given."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def synchronize(device: torch.device | str) -> None:
    """Wait for queued CUDA work on ``device`` (a no-op elsewhere), before reading a clock."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def keep_float32(module: nn.Module) -> None:
    """Undo a parent's ``.to(bfloat16)`` / ``.half()`` on a frozen network that must run in float32."""
    param = next(module.parameters(), None)
    if param is not None and param.dtype != torch.float32:
        module.float()
