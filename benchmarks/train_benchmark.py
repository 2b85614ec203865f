"""Training throughput of the training loop itself: seconds per optimisation step of
:func:`ssdd_diffusers.training.trainer.main` (``training/train_ssdd.py``).

Each (resolution, batch) case runs the loop on a fresh ``f8c4`` model with the chosen decoder, a frozen
encoder and random crops of the photos bundled with scikit-image, for ``--warmup + --repeats`` steps. The
loop records the compute time of every step (teacher/encoder forward, decoder forward and backward,
gradient clipping, optimiser and EMA update; data loading excluded); the median over the steps after the
warm-up is reported. The defaults time the flow-matching loss alone (LPIPS and REPA add fixed-cost side
networks that need downloaded weights).

Example::

    python benchmarks/train_benchmark.py --resolutions 128 256 --batch-sizes 1 \
        --json benchmarks/results/train_cpu.json --markdown benchmarks/results/train_cpu.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from ssdd_diffusers.training.arguments import parse_args as parse_training_args
from ssdd_diffusers.training.trainer import main as run_training


def loop_step_seconds(args: argparse.Namespace, resolution: int, batch: int) -> list[float]:
    """Per-step compute seconds of the training loop for one case."""
    with tempfile.TemporaryDirectory() as output_dir:
        argv = [
            "--sample_photos", "all",
            "--crops_per_image", "16",
            "--resolution", str(resolution),
            "--encoder", "f8c4",
            "--decoder", args.preset,
            "--train_batch_size", str(batch),
            "--max_train_steps", str(args.warmup + args.repeats),
            "--lpips_weight", "0",
            "--repa_weight", "0",
            "--optimizer", args.optimizer,
            "--lr_warmup_steps", "0",
            "--report_to", "none",
            "--validation_steps", "0",
            "--num_validation_images", "0",
            "--checkpointing_steps", "0",
            "--no_progress",
            "--output_dir", output_dir,
        ]  # fmt: skip
        if args.gradient_checkpointing:
            argv.append("--gradient_checkpointing")
        result = run_training(parse_training_args(argv))
    return [entry["step_seconds"] for entry in result["loss_history"]]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="S", help="Decoder size.")
    p.add_argument("--resolutions", type=int, nargs="+", default=[128, 256])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1])
    p.add_argument("--repeats", type=int, default=3, help="Timed steps per case (median reported).")
    p.add_argument("--warmup", type=int, default=1, help="Untimed first steps per case.")
    p.add_argument("--optimizer", default="radam_schedulefree", choices=["radam_schedulefree", "adamw"])
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    args = p.parse_args(argv)

    rows = []
    for resolution in args.resolutions:
        for batch in args.batch_sizes:
            seconds = loop_step_seconds(args, resolution, batch)[args.warmup :]
            median = statistics.median(seconds)
            rows.append(
                {
                    "preset": args.preset,
                    "resolution": resolution,
                    "batch": batch,
                    "step_s_median": round(median, 4),
                    "step_s_all": [round(t, 4) for t in seconds],
                    "images_per_s": round(batch / median, 3),
                }
            )
            print(f"{resolution}px batch {batch}: {median:.3f} s/step", file=sys.stderr)
    meta = {
        "command": " ".join([os.path.relpath(sys.argv[0])] + (sys.argv[1:] if argv is None else argv)),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "dtype": "fp32",
        "optimizer": args.optimizer,
        "loop": "ssdd_diffusers.training.trainer.main, step compute time (data loading excluded)",
        "loss": "flow-matching MSE (no LPIPS/REPA), frozen f8c4 encoder",
        "gradient_checkpointing": args.gradient_checkpointing,
        "loadavg": os.getloadavg(),
    }
    lines = [
        f"Training-loop step of decoder {args.preset} (frozen f8c4 encoder, {args.optimizer}, EMA), torch "
        f"{meta['torch']}, {meta['threads']} threads, fp32, median of {args.repeats} steps after "
        f"{args.warmup} warm-up.",
        "",
        "| res | batch | step s | images/s |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['resolution']} | {r['batch']} | {r['step_s_median']:.2f} | {r['images_per_s']:.2f} |"
        for r in rows
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    report = {"meta": meta, "results": rows}
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    if args.markdown:
        args.markdown.write_text(text)
    return report


if __name__ == "__main__":
    main()
