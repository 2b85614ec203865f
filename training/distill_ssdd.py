#!/usr/bin/env python
"""GAN-free single-step distillation of an SSDD decoder (SSDD stage d), with accelerate.

A frozen teacher (``--teacher_model_name_or_path``, eval mode; a checkpoint folder's EMA weights are used
when present) runs ``--teacher_steps`` Euler steps (default 12) from noise ε. The student, initialised
from the teacher's weights (or ``--pretrained_model_name_or_path``), takes one step from the same ε at
t = 1, ``x̂ = ε + v̂(ε, 1, z)``, and regresses the teacher sample:
``L2 + 0.5·LPIPS(teacher, student) + 0.25·REPA(ground truth)``, with z the frozen encoder's posterior mode.
The saved student has ``num_inference_steps = 1`` in its config.

Same infrastructure and flags as ``train_ssdd.py`` (data, EMA, checkpoints, exact resume, Hub); only the
defaults differ (``--distill`` on, learning rate 1e-4).

    accelerate launch training/distill_ssdd.py --teacher_model_name_or_path ./ssdd-f8c4-M-256 \\
        --dataset_name ILSVRC/imagenet-1k --resolution 256 --output_dir ./ssdd-f8c4-M-256-1step
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_ssdd  # noqa: E402


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line with the distillation defaults."""
    return train_ssdd.parse_args(input_args, distill=True)


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Distil; see :func:`train_ssdd.main`."""
    args.distill = True
    return train_ssdd.main(args)


if __name__ == "__main__":
    main(parse_args())
