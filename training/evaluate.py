#!/usr/bin/env python
"""Evaluate SSDD and AutoencoderKL models side by side (same as the ``ssdd-evaluate`` command).

    python training/evaluate.py ./ssdd-f8c4-M@steps=8 ./ssdd-f8c4-M-1step kl:stabilityai/sd-vae-ft-ema \\
        --dataset_name ILSVRC/imagenet-1k --split validation --max_samples 5000 --resolution 256

See ``python training/evaluate.py --help`` and :mod:`ssdd_diffusers.evaluation`.
"""

from __future__ import annotations

from ssdd_diffusers.cli import evaluate_main

if __name__ == "__main__":
    evaluate_main()
