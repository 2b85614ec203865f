#!/usr/bin/env python
"""GAN-free single-step distillation of an SSDD decoder (SSDD stage d), with accelerate.

A frozen teacher (``--teacher_model_name_or_path``, eval mode; a checkpoint folder's EMA weights are used
when present) runs ``--teacher_steps`` Euler steps (default 12) from noise ε. The student, initialised
from the teacher's weights (or ``--pretrained_model_name_or_path``), takes one step from the same ε at
t = 1, ``x̂ = ε + v̂(ε, 1, z)``, and regresses the teacher sample:
``L2 + 0.5·LPIPS(teacher, student) + 0.25·REPA(ground truth)``, with z the frozen encoder's posterior mode.
The saved student has ``num_inference_steps = 1`` in its config.

The same loop and flags as ``train_ssdd.py`` (data, EMA, checkpoints, exact resume, Hub), with
``--distill`` on and a learning rate of 1e-4 by default:

    accelerate launch training/distill_ssdd.py --teacher_model_name_or_path ./ssdd-f8c4-M-256 \\
        --dataset_name ILSVRC/imagenet-1k --resolution 256 --output_dir ./ssdd-f8c4-M-256-1step
"""

from ssdd_diffusers.cli.common import call_guarded
from ssdd_diffusers.training.arguments import parse_args
from ssdd_diffusers.training.trainer import main

if __name__ == "__main__":
    main(call_guarded(lambda: parse_args(distill=True)))  # bad arguments: one error line, exit status 1
