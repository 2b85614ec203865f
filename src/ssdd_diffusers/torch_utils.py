"""Small torch helpers: dtype names for command lines, the default device, device synchronisation,
keeping frozen side networks in float32 and giving loaded weights memory of their own."""

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


CPU_ALIGNMENT = 64
"""Bytes: the alignment of PyTorch's CPU allocator (``c10::gAlignment``)."""


def own_cpu_memory_(module: nn.Module) -> nn.Module:
    """Copy every CPU parameter and buffer of ``module`` that does not start on a ``CPU_ALIGNMENT``
    boundary into an ordinary allocation of its own, in place; returns ``module``.

    ``safetensors.torch.load_file`` returns views into a memory-mapped file at the byte offsets of the
    file's layout (often only 4-byte aligned), and diffusers' default loading keeps those views as the
    parameters. Misaligned operands send some CPU GEMM/convolution kernels (MKL, oneDNN) down other code
    paths with another summation order, so a reloaded model could differ in the last bits from the
    model that was saved, depending on the processor. After this, loaded weights behave like weights that
    were never saved: the same kernels, bit-identical results on one machine. It also releases the file
    mapping. Tensors on other devices, and already-aligned ones, are left alone.
    """
    with torch.no_grad():
        for tensor in (*module.parameters(), *module.buffers()):
            if tensor.device.type == "cpu" and tensor.data_ptr() % CPU_ALIGNMENT:
                tensor.data = tensor.data.clone()
    return module
