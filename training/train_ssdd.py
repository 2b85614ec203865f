#!/usr/bin/env python
"""Train an SSDD autoencoder (flow matching + LPIPS + REPA (+ KL)) with accelerate.

Covers every stage of the SSDD recipe:

* joint encoder + decoder training: ``--train_encoder`` (adds the KL term);
* decoder training on a frozen encoder taken from an SSDD model or any diffusers ``AutoencoderKL``:
  ``--pretrained_encoder PATH_OR_REPO``;
* fine-tuning from a saved model: ``--pretrained_model_name_or_path``;
* single-step distillation from a frozen N-step teacher: ``--distill --teacher_model_name_or_path``
  (or ``training/distill_ssdd.py``);
* multi-scale training and per-scale distillation: ``--multiscale_stages K``.

    accelerate launch training/train_ssdd.py --dataset_name ILSVRC/imagenet-1k --decoder M --output_dir out

``--help`` lists every flag. The loop is :func:`ssdd_diffusers.training.trainer.main`.
"""

from ssdd_diffusers.cli.common import call_guarded
from ssdd_diffusers.training.arguments import parse_args
from ssdd_diffusers.training.trainer import main

if __name__ == "__main__":
    main(call_guarded(parse_args))  # bad arguments: one error line, exit status 1
