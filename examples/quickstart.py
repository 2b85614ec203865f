#!/usr/bin/env python
"""SSDD quickstart: train, distil to one step, evaluate, save and reload, on CPU, offline.

    python examples/quickstart.py       # defaults: about 5 minutes on 2 idle CPU cores

What it does, with no arguments and no network:

1. **Train** a small SSDD (f4 KL encoder + U-ViT decoder, trained jointly) on random crops of the real
   photographs shipped inside scikit-image (astronaut, rocket, the motorcycle pair, the Hubble deep
   field), with the training script's own loop (:func:`ssdd_diffusers.training.trainer.main`).
2. **Distil** it into a one-step decoder with the same loop (``--distill``: a frozen N-step teacher, a
   student initialised from it).

The recipe is the clean one-step recipe of ``docs/training.md``: an EDM-preconditioned decoder
(``--prediction_type edm``), a quarter of the training samples at t = 1 (``--one_step_fraction``), an L1
term on the one-step estimate (``--recon_weight``), and a student that draws its own noise
(``--distill_noise independent``), so it is deterministic and clean rather than a copy of the teacher's
noise. ``--prediction_type velocity --one_step_fraction 0 --recon_weight 0 --distill_noise shared`` is the
upstream recipe.
3. **Evaluate** teacher (N steps) and student (1 step) with :func:`ssdd_diffusers.evaluation.evaluate_models`
   on fixed crops of the held-out photos (chelsea, coffee): PSNR, SSIM, and LPIPS (AlexNet) / rFID
   (Inception) when their pretrained weights can be loaded (offline they are reported as "n/a").
4. **Reload** both saved models with ``from_pretrained`` (the evaluation uses the reloaded models) and
   write ``reconstructions.png`` (rows: held-out originals, teacher, student), ``metrics.json`` and
   ``metrics.md``.

Every phase runs a fixed number of steps, so the result is the same on any machine (same thread count)
for a given ``--seed``; ``--max_minutes`` is only a guard, and a phase it cuts short is reported.

Losses: SSDD's recipe is FM + 0.5 LPIPS(VGG) + 0.25 REPA(DINOv2); LPIPS and REPA need pretrained backbones
that are downloaded, so the quickstart trains without them; add ``--lpips_weight 0.5 --repa_weight 0.25``
when online. Your own data: ``--train_data_dir folder/`` or ``--dataset_name hub/name`` (the last
``--num_heldout`` images are held out).
"""

from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning: on a busy (shared) machine spinning threads can make
# CPU training several times slower, on an idle one this costs next to nothing. Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ssdd_diffusers import SSDDAutoencoder
from ssdd_diffusers.data import EvalTransform, SamplePhotoDataset, TrainTransform, load_image_dataset
from ssdd_diffusers.evaluation import LoadedAutoencoder, MetricSettings, evaluate_models, psnr, reconstruct
from ssdd_diffusers.evaluation.metrics import to_uint8
from ssdd_diffusers.presets import CPU_PRESETS
from ssdd_diffusers.training.arguments import parse_args as parse_training_args
from ssdd_diffusers.training.trainer import main as run_training

#: ``--quick`` overrides (a < 1 minute smoke run).
QUICK_DEFAULTS: dict[str, Any] = dict(
    preset="micro",
    resolution=32,
    max_train_steps=24,
    distill_steps=8,
    teacher_steps=4,
    train_batch_size=4,
    num_heldout=4,
    grid_images=4,
    extra_metrics="off",
)


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags; those shared with ``training/train_ssdd.py`` are spelled the same."""
    parser = argparse.ArgumentParser(
        description="Train a small SSDD, distil it to one step, evaluate, save and reload (CPU, offline).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--output_dir", type=str, default="outputs/quickstart")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick", action="store_true", help="Tiny smoke run (micro model, 32 px, few steps)."
    )
    parser.add_argument(
        "--max_minutes",
        type=float,
        default=10.0,
        help="Guard: training may use up to 50%% of it, distillation up to 80%% (cumulative); a phase "
        "that reaches its deadline stops early and says so.",
    )
    g = parser.add_argument_group("data (default: photos bundled with scikit-image)")
    g.add_argument("--train_data_dir", type=str, default=None, help="Your own folder of images.")
    g.add_argument("--dataset_name", type=str, default=None, help="A Hub dataset or save_to_disk folder.")
    g.add_argument("--dataset_config_name", type=str, default=None)
    g.add_argument("--dataset_split", type=str, default="train")
    g.add_argument("--image_column", type=str, default=None)
    g.add_argument(
        "--num_heldout",
        type=int,
        default=16,
        help="Held-out evaluation images (sample photos: crops of the held-out photos; own data: "
        "the last images of the source, centre-cropped).",
    )
    g.add_argument("--resolution", type=int, default=64)
    g.add_argument("--random_resize_scale", type=float, default=4.0)
    g.add_argument(
        "--crops_per_image", type=int, default=64, help="Sample photos: crops per photo and epoch."
    )
    g = parser.add_argument_group("model and training")
    g.add_argument("--preset", type=str, default="tiny", help=f"One of {', '.join(CPU_PRESETS)}.")
    g.add_argument("--max_train_steps", type=int, default=500)
    g.add_argument("--distill_steps", type=int, default=50)
    g.add_argument("--teacher_steps", type=int, default=8, help="N of the N-step teacher.")
    g.add_argument("--train_batch_size", type=int, default=4)
    g.add_argument("--learning_rate", type=float, default=2e-3)
    g.add_argument("--distill_learning_rate", type=float, default=3e-4)
    g.add_argument(
        "--optimizer", type=str, default="radam_schedulefree", choices=["radam_schedulefree", "adamw"]
    )
    g.add_argument("--weight_decay", type=float, default=1e-2)
    g.add_argument("--max_grad_norm", type=float, default=1.0)
    g.add_argument(
        "--prediction_type",
        type=str,
        default="edm",
        choices=["velocity", "edm"],
        help="edm: the one-step output carries no starting noise (velocity: upstream SSDD).",
    )
    g.add_argument(
        "--one_step_fraction", type=float, default=0.25, help="Share of training samples at t = 1."
    )
    g.add_argument(
        "--recon_weight", type=float, default=1.0, help="L1 of the one-step estimate (and student)."
    )
    g.add_argument(
        "--distill_noise",
        type=str,
        default="independent",
        choices=["shared", "independent"],
        help="independent: a deterministic student (the teacher's mean sample); shared: upstream.",
    )
    g.add_argument("--lpips_weight", type=float, default=0.0, help="SSDD uses 0.5 (downloads VGG16).")
    g.add_argument("--repa_weight", type=float, default=0.0, help="SSDD uses 0.25 (downloads DINOv2).")
    g.add_argument("--repa_model", type=str, default="facebook/dinov2-base")
    g = parser.add_argument_group("evaluation")
    g.add_argument(
        "--extra_metrics",
        type=str,
        default="auto",
        choices=["auto", "off"],
        help="auto: try LPIPS (AlexNet) and rFID (Inception); n/a when the weights are unavailable.",
    )
    g.add_argument("--grid_images", type=int, default=8)
    g.add_argument("--num_threads", type=int, default=None, help="torch CPU threads (default: one per core).")
    g.add_argument("--no_progress", action="store_true")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse flags; ``--quick`` replaces the defaults of the flags that were not given explicitly."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:
        given = {a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]) if a.startswith("--")}
        for key, value in QUICK_DEFAULTS.items():
            if f"--{key}" not in given:
                setattr(args, key, value)
    if args.train_data_dir is not None and args.dataset_name is not None:
        parser.error("pass at most one of --train_data_dir and --dataset_name")
    if args.preset not in CPU_PRESETS:
        parser.error(f"--preset must be one of {list(CPU_PRESETS)}")
    return args


# ====================================================================================================
# Data: training flags and held-out images
# ====================================================================================================
def data_arguments(args: argparse.Namespace) -> tuple[list[str], torch.Tensor, str]:
    """(data flags of the training script, held-out images (N, 3, S, S), description)."""
    if args.train_data_dir is None and args.dataset_name is None:
        crops = max(1, math.ceil(args.num_heldout / 2))
        transform = TrainTransform(args.resolution, args.random_resize_scale, random_flip=True)
        heldout_photos = SamplePhotoDataset("heldout", transform, crops_per_image=crops, seed=args.seed)
        heldout = [heldout_photos[i]["pixel_values"] for i in range(len(heldout_photos))][: args.num_heldout]
        train_names = ", ".join(SamplePhotoDataset("train", transform).names)
        description = (
            f"scikit-image photos: train {train_names} (random crops); held-out "
            f"{', '.join(heldout_photos.names)} ({len(heldout)} fixed random crops)"
        )
        flags = ["--sample_photos", "train", "--crops_per_image", str(args.crops_per_image)]
        return flags, torch.stack(heldout), description

    source = {
        "dataset_name": args.dataset_name,
        "dataset_config_name": args.dataset_config_name,
        "split": args.dataset_split,
        "train_data_dir": args.train_data_dir,
        "image_column": args.image_column,
    }
    eval_source = load_image_dataset(**source, transform=EvalTransform(args.resolution))
    total = len(eval_source)
    count = min(args.num_heldout, total // 2)
    if count < 1:
        raise ValueError(f"need at least 2 images, found {total}")
    samples = [eval_source[i] for i in range(total - count, total)]
    heldout = torch.stack([s["pixel_values"] for s in samples if s is not None])
    flags = ["--max_train_samples", str(total - count), "--dataset_split", args.dataset_split]
    for name in ("train_data_dir", "dataset_name", "dataset_config_name", "image_column"):
        if getattr(args, name) is not None:
            flags += [f"--{name}", str(getattr(args, name))]
    description = (
        f"{args.train_data_dir or args.dataset_name}: {total - count} training, {count} held-out images"
    )
    return flags, heldout, description


# ====================================================================================================
# Training and distillation: the training script's loop
# ====================================================================================================
def training_arguments(
    args: argparse.Namespace, data_flags: list[str], output_dir: Path, minutes: float, seed: int
) -> list[str]:
    """Flags shared by both phases (data, batch, optimiser, losses, no checkpoints or trackers)."""
    return [
        *data_flags,
        "--output_dir", str(output_dir),
        "--resolution", str(args.resolution),
        "--random_resize_scale", str(args.random_resize_scale),
        "--random_flip",
        "--train_batch_size", str(args.train_batch_size),
        "--optimizer", args.optimizer,
        "--weight_decay", str(args.weight_decay),
        "--max_grad_norm", str(args.max_grad_norm),
        "--lr_warmup_steps", "0",
        "--lpips_weight", str(args.lpips_weight),
        "--repa_weight", str(args.repa_weight),
        "--repa_model", args.repa_model,
        "--recon_weight", str(args.recon_weight),
        "--ema_decay", "0",
        "--seed", str(seed),
        "--report_to", "none",
        "--validation_steps", "0",
        "--num_validation_images", "0",
        "--checkpointing_steps", "0",
        "--max_train_minutes", str(max(minutes, 0.01)),
        *(["--no_progress"] if args.no_progress else []),
    ]  # fmt: skip


def phase_log(result: dict[str, Any], requested: int, seconds: float) -> dict[str, Any]:
    """What the quickstart reports of one phase of :func:`run_training`."""
    losses = [h["loss"] for h in result["loss_history"]]
    return {
        "steps": result["global_step"],
        "requested_steps": requested,
        "stopped_by_time_budget": result["stopped_by_time_budget"],
        "seconds": round(seconds, 1),
        "loss_first10": sum(losses[:10]) / max(1, len(losses[:10])),
        "loss_last10": sum(losses[-10:]) / max(1, len(losses[-10:])),
    }


def train_teacher(args: argparse.Namespace, data_flags: list[str], output_dir: Path, minutes: float) -> dict:
    """Joint encoder + decoder training (SSDD stage a) of the ``--preset`` model."""
    config = {
        **CPU_PRESETS[args.preset],
        "num_inference_steps": args.teacher_steps,
        "sample_size": args.resolution,
    }
    argv = training_arguments(args, data_flags, output_dir, minutes, args.seed) + [
        "--model_config", json.dumps(config),
        "--prediction_type", args.prediction_type,
        "--one_step_fraction", str(args.one_step_fraction),
        "--train_encoder",
        "--kl_weight", "1e-6",
        "--max_train_steps", str(args.max_train_steps),
        "--learning_rate", str(args.learning_rate),
    ]  # fmt: skip
    start = time.perf_counter()
    result = run_training(parse_training_args(argv))
    return phase_log(result, args.max_train_steps, time.perf_counter() - start)


def distill_student(
    args: argparse.Namespace, data_flags: list[str], teacher_dir: Path, output_dir: Path, minutes: float
) -> dict:
    """GAN-free single-step distillation of the saved teacher (SSDD stage d)."""
    argv = training_arguments(args, data_flags, output_dir, minutes, args.seed + 1) + [
        "--teacher_model_name_or_path", str(teacher_dir),
        "--teacher_steps", str(args.teacher_steps),
        "--distill_noise", args.distill_noise,
        "--max_train_steps", str(args.distill_steps),
        "--learning_rate", str(args.distill_learning_rate),
    ]  # fmt: skip
    start = time.perf_counter()
    result = run_training(parse_training_args(argv, distill=True))
    return phase_log(result, args.distill_steps, time.perf_counter() - start)


@torch.no_grad()
def agreement_psnr(
    teacher: SSDDAutoencoder, student: SSDDAutoencoder, images: torch.Tensor, steps: int
) -> float:
    """Mean PSNR (dB, uint8-quantised) of the student's 1-step decode against the teacher's N-step decode
    from the same noise: how well the one-step decoder reproduces its teacher on held-out images."""
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(1234))
    reference = reconstruct(teacher, images, steps, noise=noise)
    one_step = reconstruct(student, images, 1, noise=noise)
    return float(psnr(to_uint8(reference), to_uint8(one_step)).clamp(max=100).mean())


# ====================================================================================================
# Main
# ====================================================================================================
def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the quickstart; returns the content of ``metrics.json``."""
    start = time.perf_counter()
    args = parse_args(argv)
    budget = args.max_minutes * 60.0
    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)
    logging.getLogger("ssdd_diffusers").setLevel(logging.WARNING)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    teacher_dir, student_dir = output_dir / "teacher", output_dir / "student"
    print(f"SSDD quickstart: preset {args.preset}, {args.resolution} px, seed {args.seed}")

    data_flags, heldout, data_description = data_arguments(args)
    print(f"data: {data_description}")

    def minutes_left(fraction: float) -> float:
        return (fraction * budget - (time.perf_counter() - start)) / 60.0

    train_log = train_teacher(args, data_flags, teacher_dir, minutes_left(0.5))
    teacher = SSDDAutoencoder.from_pretrained(teacher_dir).eval()
    before = agreement_psnr(teacher, teacher, heldout, args.teacher_steps)  # the teacher's own 1-step decode
    distill_log = distill_student(args, data_flags, teacher_dir, student_dir, minutes_left(0.8))
    student = SSDDAutoencoder.from_pretrained(student_dir).eval()
    if student.config.num_inference_steps != 1:
        raise RuntimeError("the reloaded student should decode in 1 step by default")
    after = agreement_psnr(teacher, student, heldout, args.teacher_steps)

    extra = args.extra_metrics == "auto"
    report = evaluate_models(
        [
            LoadedAutoencoder.from_model(teacher, f"teacher ({args.teacher_steps} steps)"),
            LoadedAutoencoder.from_model(student, "student (1 step)"),
        ],
        heldout,
        batch_size=args.train_batch_size,
        seed=args.seed,
        metrics=MetricSettings(compute_lpips=extra, compute_fid=extra, skip_unavailable=True),
        grid_images=args.grid_images,
        warmup_batches=0,
        progress=not args.no_progress,
        settings={"data": data_description, "resolution": args.resolution},
    )
    report.save(output_dir)
    summary = report.to_dict()
    summary["unavailable_metrics"] = {
        k: "n/a (weights unavailable offline)" if "unavailable" in v else v
        for k, v in report.unavailable_metrics.items()
    }
    if not extra:
        summary["unavailable_metrics"].update(
            {"lpips": "not computed (--extra_metrics off)", "rfid": "not computed"}
        )
    summary["quickstart"] = {
        "seed": args.seed,
        "preset": args.preset,
        "resolution": args.resolution,
        "model_config": dict(teacher.config),
        "data": data_description,
        "num_heldout_images": int(heldout.shape[0]),
        "train": train_log,
        "distill": distill_log,
        "student_vs_teacher_psnr": {"before_distillation": before, "after_distillation": after},
        "teacher_dir": str(teacher_dir),
        "student_dir": str(student_dir),
        "wall_seconds": round(time.perf_counter() - start, 1),
    }
    (output_dir / "metrics.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")

    print()
    print(report.to_markdown())
    print(f"student 1-step vs teacher {args.teacher_steps}-step PSNR on held-out: "
          f"{before:.2f} dB before distillation -> {after:.2f} dB after")  # fmt: skip
    for phase, log in (("training", train_log), ("distillation", distill_log)):
        note = " (stopped by --max_minutes; not reproducible)" if log["stopped_by_time_budget"] else ""
        print(f"{phase}: {log['steps']}/{log['requested_steps']} steps in {log['seconds']} s, "
              f"loss {log['loss_first10']:.4f} -> {log['loss_last10']:.4f}{note}")  # fmt: skip
    print(f"outputs: {output_dir}/ (teacher/, student/, reconstructions.png, metrics.json, metrics.md)")
    print(f"wall time: {summary['quickstart']['wall_seconds']:.0f} s")
    return summary


if __name__ == "__main__":
    main()
