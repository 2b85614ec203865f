"""Optimisation for SSDD training: weight-decay parameter groups, the optimiser (schedule-free RAdam or
AdamW with a warm-up schedule), the schedule-free train/eval switch and gradient clipping."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

OPTIMIZERS = ("radam_schedulefree", "adamw")

_DECAY_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d)


def split_weight_decay_parameters(
    modules: nn.Module | Iterable[nn.Module],
) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """Split trainable parameters into (decay, no_decay) lists of ``(name, parameter)``.

    Following the SSDD recipe (design §4), only the ``weight`` of convolution and linear layers is
    decayed; biases, normalisation parameters (1-D), relative-position bias tables and any other
    parameter (embeddings, ...) are not. Frozen parameters are left out; shared ones are listed once.
    """
    if isinstance(modules, nn.Module):
        modules = [modules]
    decay: list[tuple[str, nn.Parameter]] = []
    no_decay: list[tuple[str, nn.Parameter]] = []
    seen: set[int] = set()
    for index, root in enumerate(modules):
        for module_name, module in root.named_modules():
            for param_name, param in module.named_parameters(recurse=False):
                if not param.requires_grad or id(param) in seen:
                    continue
                seen.add(id(param))
                name = f"{index}.{module_name}.{param_name}" if module_name else f"{index}.{param_name}"
                if isinstance(module, _DECAY_MODULES) and param_name == "weight" and param.ndim > 1:
                    decay.append((name, param))
                else:
                    no_decay.append((name, param))
    return decay, no_decay


def weight_decay_param_groups(
    modules: nn.Module | Iterable[nn.Module], weight_decay: float
) -> list[dict[str, Any]]:
    """Parameter groups ``[{decay params, weight_decay}, {the rest, 0.0}]`` (empty groups dropped)."""
    decay, no_decay = split_weight_decay_parameters(modules)
    groups = [
        {"params": [p for _, p in decay], "weight_decay": weight_decay},
        {"params": [p for _, p in no_decay], "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]


def create_optimizer(
    name: str,
    param_groups: list[dict[str, Any]],
    learning_rate: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """``radam_schedulefree`` (``schedulefree.RAdamScheduleFree``, no LR schedule) or ``adamw``.

    Weight decay comes from the groups (see :func:`weight_decay_param_groups`). A schedule-free
    optimiser starts in eval mode; call ``optimizer.train()`` before the first step.
    """
    if name == "radam_schedulefree":
        import schedulefree

        return schedulefree.RAdamScheduleFree(param_groups, lr=learning_rate, betas=betas, eps=eps)
    if name == "adamw":
        return torch.optim.AdamW(param_groups, lr=learning_rate, betas=betas, eps=eps)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}")


def create_lr_scheduler(
    optimizer_name: str,
    optimizer: torch.optim.Optimizer,
    scheduler_name: str = "constant_with_warmup",
    warmup_steps: int = 0,
    total_steps: int | None = None,
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """``diffusers.optimization.get_scheduler`` for AdamW (linear warm-up by default); ``None`` for a
    schedule-free optimiser, which needs no schedule."""
    if is_schedule_free(optimizer) or optimizer_name == "radam_schedulefree":
        return None
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        scheduler_name, optimizer=optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps
    )


def _base_optimizer(optimizer: Any) -> Any:
    """Unwrap accelerate's ``AcceleratedOptimizer`` (and DeepSpeed's extra wrapper)."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def is_schedule_free(optimizer: Any) -> bool:
    """Whether ``optimizer`` (possibly wrapped by accelerate) is a schedule-free optimiser."""
    base = _base_optimizer(optimizer)
    return bool(base.param_groups) and "train_mode" in base.param_groups[0]


def set_optimizer_mode(optimizer: Any, train: bool) -> None:
    """Schedule-free ``optimizer.train()``/``.eval()`` (swaps the model weights between the gradient
    point y and the averaged point x); a no-op for other optimisers."""
    if not is_schedule_free(optimizer):
        return
    base = _base_optimizer(optimizer)
    if train:
        base.train()
    else:
        base.eval()


@contextlib.contextmanager
def schedule_free_eval(optimizer: Any) -> Iterator[None]:
    """Context in which the model holds the schedule-free evaluation weights (x).

    Use around validation and checkpoint saving, on every process (the switch is not bit-exactly
    reversible, so all replicas must perform the same switches to stay identical).
    """
    set_optimizer_mode(optimizer, train=False)
    try:
        yield
    finally:
        set_optimizer_mode(optimizer, train=True)


def clip_grad_norm(parameters: Iterable[Tensor], max_norm: float) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_``; a ``max_norm`` <= 0 only measures the norm."""
    params = [p for p in parameters if p.grad is not None]
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    if not params:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
