"""Exponential moving average of the trained weights (``diffusers.training_utils.EMAModel``)."""

from __future__ import annotations

from typing import Any

from torch import nn


def create_ema(model: nn.Module, decay: float = 0.999, start_step: int = 50_000) -> Any:
    """``diffusers.training_utils.EMAModel`` over ``model`` with SSDD's ``--ema_start_step`` semantics.

    For the first ``start_step`` optimisation steps the decay is 0 (the EMA is a copy of the weights);
    after that it is ``min(decay, (1 + n) / (10 + n))`` with ``n`` the number of steps since the start:
    the average covers roughly the last n / 9 steps until it reaches ``1 / (1 - decay)``.
    """
    from diffusers.training_utils import EMAModel

    return EMAModel(
        model.parameters(),
        decay=decay,
        min_decay=0.0,
        update_after_step=start_step,
        use_ema_warmup=False,
        model_cls=type(model),
        model_config=model.config,
    )


def ema_is_averaging(ema: Any) -> bool:
    """Whether the EMA has started averaging (before ``start_step`` it only copies the weights)."""
    return ema is not None and ema.optimization_step > ema.update_after_step + 1
