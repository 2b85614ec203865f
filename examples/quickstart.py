#!/usr/bin/env python
"""SSDD quickstart: train, distil to one step, evaluate, save and reload, on CPU, offline.

    python examples/quickstart.py       # defaults: about 5-6 minutes on 2 idle CPU cores, at most ~10

What it does, with no arguments and no network:

1. **Data**: real photographs shipped inside scikit-image (``ssdd_diffusers.data.SamplePhotoDataset``):
   random resized crops of astronaut, rocket, the motorcycle pair and the Hubble deep field for
   training; fixed random crops of the held-out photos (chelsea, coffee) for evaluation.
2. **Train** a small SSDD (f4 KL encoder + U-ViT decoder, trained jointly) with the flow-matching loss.
3. **Distil** it into a one-step decoder (SSDD §4: a frozen N-step teacher, a student initialised from
   it regressing the teacher's sample from the same noise in one step).
4. **Evaluate** teacher (N steps) and student (1 step) on the held-out crops: PSNR, SSIM, and LPIPS
   (AlexNet) / rFID (Inception) when their pretrained weights are available (they are downloaded by
   torchvision / torch-fidelity; offline they are reported as "n/a"), plus throughput.
5. **Save** both with ``save_pretrained``, **reload** them with ``from_pretrained`` (the evaluation uses
   the reloaded models), write ``reconstructions.png`` (rows: held-out originals, teacher, student),
   ``metrics.json`` and ``metrics.md``, and print the table.

The run is deterministic for a given ``--seed`` (on CPU, same machine and thread count) as long as the
step counts finish inside ``--max_minutes``; if the time budget cuts a phase short, this is reported.

Losses: SSDD's recipe is FM + 0.5 LPIPS(VGG) + 0.25 REPA(DINOv2). LPIPS and REPA need pretrained
backbones that must be downloaded (torchvision VGG16, ``facebook/dinov2-base``), so the quickstart uses
the flow-matching loss only by default; enable them with ``--lpips_weight 0.5 --repa_weight 0.25`` when
online. Your own data: ``--data_dir folder/`` or ``--dataset_name hub/name`` (the last
``--num_heldout`` images are held out).
"""

from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning: on a busy (shared) machine spinning threads can make
# CPU training several times slower, on an idle one this costs next to nothing. Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import copy
import json
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ssdd_diffusers import SSDDAutoencoder
from ssdd_diffusers.data import (
    EvalTransform,
    ImageFolderDataset,
    SamplePhotoDataset,
    TrainTransform,
    collate_images,
    load_image_dataset,
)
from ssdd_diffusers.evaluation import LoadedAutoencoder, MetricSettings, evaluate_models, resolve_device
from ssdd_diffusers.training_utils import (
    EpochShuffleSampler,
    LossWeights,
    SeededAugmentDataset,
    SSDDObjective,
    clip_grad_norm,
    create_optimizer,
    distillation_targets,
    set_optimizer_mode,
    step_generator,
    weight_decay_param_groups,
)

#: Model configurations of the quickstart (``--preset``); any ``f{F}c{C}-{size}`` preset also works.
QUICKSTART_PRESETS: dict[str, dict[str, Any]] = {
    # f4c4 encoder + 4-level decoder: learns recognisable 64 px reconstructions in minutes on a CPU.
    "tiny": dict(
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        decoder_block_out_channels=(32, 32, 64, 64),
        decoder_layers_per_block=1,
        decoder_transformer_layers=2,
        decoder_attention_heads=2,
        decoder_attention_window=4,
        sample_size=64,
    ),
    # For --quick (tests): a 1.3M-parameter model at 32 px.
    "micro": dict(
        block_out_channels=(32, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        decoder_block_out_channels=(32, 32, 64, 64),
        decoder_layers_per_block=1,
        decoder_transformer_layers=1,
        decoder_attention_heads=2,
        decoder_attention_window=4,
        sample_size=32,
    ),
}

#: ``--quick`` overrides (a < 30 s smoke run).
QUICK_DEFAULTS: dict[str, Any] = dict(
    preset="micro",
    resolution=32,
    train_steps=24,
    distill_steps=8,
    teacher_steps=4,
    batch_size=4,
    num_heldout=4,
    grid_images=4,
    extra_metrics="off",
)


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags (every default is the documented quickstart setting)."""
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
        default=9.0,
        help="Time budget: training may use up to 50%% of it, distillation up to 80%% "
        "(cumulative); a phase that reaches its deadline stops early (reported).",
    )
    g = parser.add_argument_group("data (default: photos bundled with scikit-image)")
    g.add_argument("--data_dir", type=str, default=None, help="Your own folder of images.")
    g.add_argument("--dataset_name", type=str, default=None, help="A Hub dataset or save_to_disk folder.")
    g.add_argument("--dataset_config_name", type=str, default=None)
    g.add_argument("--split", type=str, default="train")
    g.add_argument("--image_column", type=str, default=None)
    g.add_argument(
        "--num_heldout",
        type=int,
        default=16,
        help="Held-out evaluation images (sample photos: crops of the held-out photos; own data: "
        "the last images of the source, centre-cropped).",
    )
    g.add_argument("--resolution", type=int, default=64)
    g.add_argument(
        "--random_resize_scale",
        type=float,
        default=4.0,
        help="Training crops come from the image resized to a shorter side in [S, scale*S].",
    )
    g.add_argument(
        "--crops_per_image", type=int, default=64, help="Sample photos: crops per photo and epoch."
    )
    g = parser.add_argument_group("model and training")
    g.add_argument(
        "--preset",
        type=str,
        default="tiny",
        help=f"{', '.join(QUICKSTART_PRESETS)} or an SSDD preset like f8c4-S (slow on CPU).",
    )
    g.add_argument("--train_steps", type=int, default=500)
    g.add_argument("--distill_steps", type=int, default=50)
    g.add_argument("--teacher_steps", type=int, default=8, help="N of the N-step teacher.")
    g.add_argument("--batch_size", type=int, default=4)
    g.add_argument("--learning_rate", type=float, default=2e-3)
    g.add_argument("--distill_learning_rate", type=float, default=3e-4)
    g.add_argument(
        "--optimizer", type=str, default="radam_schedulefree", choices=["radam_schedulefree", "adamw"]
    )
    g.add_argument("--weight_decay", type=float, default=1e-2)
    g.add_argument("--max_grad_norm", type=float, default=1.0)
    g.add_argument(
        "--lpips_weight",
        type=float,
        default=0.0,
        help="SSDD uses 0.5 (needs torchvision's pretrained VGG16: online only).",
    )
    g.add_argument(
        "--repa_weight",
        type=float,
        default=0.0,
        help="SSDD uses 0.25 (needs facebook/dinov2-base: online only).",
    )
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
    g.add_argument("--device", type=str, default="auto")
    g.add_argument(
        "--num_threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice, one per core); 1 helps on a busy machine.",
    )
    g.add_argument("--no_progress", action="store_true")  # fmt: skip
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
    if args.data_dir is not None and args.dataset_name is not None:
        parser.error("pass at most one of --data_dir and --dataset_name")
    return args


# ====================================================================================================
# Model and data
# ====================================================================================================
def build_model(args: argparse.Namespace) -> SSDDAutoencoder:
    """A freshly initialised SSDD of ``--preset`` with ``num_inference_steps = --teacher_steps``."""
    torch.manual_seed(args.seed)
    overrides = {"num_inference_steps": args.teacher_steps, "sample_size": args.resolution}
    if args.preset in QUICKSTART_PRESETS:
        return SSDDAutoencoder(**{**QUICKSTART_PRESETS[args.preset], **overrides})
    encoder, _, decoder = args.preset.partition("-")
    if not decoder:
        raise ValueError(f"unknown preset {args.preset!r}: use {list(QUICKSTART_PRESETS)} or e.g. f8c4-S")
    return SSDDAutoencoder.from_preset(encoder, decoder=decoder, **overrides)


def build_data(args: argparse.Namespace) -> tuple[Dataset, torch.Tensor, str]:
    """(training dataset with random crops, held-out images (N, 3, S, S), description)."""
    train_transform = TrainTransform(args.resolution, args.random_resize_scale, random_flip=True)
    if args.data_dir is None and args.dataset_name is None:
        train = SamplePhotoDataset("train", train_transform, crops_per_image=args.crops_per_image)
        heldout_photos = SamplePhotoDataset(
            "heldout",
            train_transform,
            crops_per_image=max(1, math.ceil(args.num_heldout / 2)),
            seed=args.seed,
        )
        heldout = [heldout_photos[i]["pixel_values"] for i in range(len(heldout_photos))][: args.num_heldout]
        names = ", ".join(heldout_photos.names)
        description = (
            f"scikit-image photos: train {', '.join(train.names)} (random crops); held-out {names} "
            f"({len(heldout)} fixed random crops)"
        )
        return train, torch.stack(heldout), description

    def source(transform: Any) -> Any:
        if args.data_dir is not None:
            return ImageFolderDataset(args.data_dir, transform)
        return load_image_dataset(
            dataset_name=args.dataset_name,
            dataset_config_name=args.dataset_config_name,
            split=args.split,
            image_column=args.image_column,
            transform=transform,
        )

    train_source, eval_source = source(train_transform), source(EvalTransform(args.resolution))
    total = len(train_source)
    count = min(args.num_heldout, total // 2)
    if count < 1:
        raise ValueError(f"need at least 2 images, found {total}")
    heldout = [eval_source[i] for i in range(total - count, total)]
    heldout_images = torch.stack([s["pixel_values"] for s in heldout if s is not None])
    description = f"{args.data_dir or args.dataset_name}: {total - count} training, {count} held-out images"
    return Subset(train_source, range(total - count)), heldout_images, description


def infinite_batches(dataset: Dataset, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless shuffled batches; order and augmentation are a function of ``(seed, epoch, index)``."""
    augmented = SeededAugmentDataset(dataset, seed)
    sampler = EpochShuffleSampler(len(augmented), seed=seed)
    drop_last = len(augmented) >= batch_size
    loader = DataLoader(
        augmented, batch_size=batch_size, sampler=sampler, collate_fn=collate_images, drop_last=drop_last
    )
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        augmented.set_epoch(epoch)
        yielded = False
        for batch in loader:
            if batch["pixel_values"] is not None:
                yielded = True
                yield batch["pixel_values"]
        if not yielded:
            raise ValueError("the training data has no readable image")
        epoch += 1


# ====================================================================================================
# Training and distillation (library objective + optimiser, minimal loop)
# ====================================================================================================
def _optimise(
    objective: SSDDObjective,
    batches: Iterator[torch.Tensor],
    steps: int,
    learning_rate: float,
    args: argparse.Namespace,
    deadline: float,
    device: torch.device,
    seed: int,
    description: str,
    targets: Any = None,
) -> dict[str, Any]:
    """Run up to ``steps`` optimisation steps (stopping at ``deadline``); returns a log."""
    from tqdm.auto import tqdm

    groups = weight_decay_param_groups(objective.trainable_modules(), args.weight_decay)
    optimizer = create_optimizer(args.optimizer, groups, learning_rate)
    set_optimizer_mode(optimizer, train=True)
    objective.train()
    parameters = objective.trainable_parameters()
    start = time.perf_counter()
    history: list[float] = []
    done = 0
    bar = tqdm(range(steps), desc=description, disable=args.no_progress)
    for step in bar:
        if time.perf_counter() > deadline:
            break
        images = next(batches).to(device)
        generator = step_generator(seed, step, 0, 0, device)
        if targets is not None:
            z, noise, target = targets(images, generator)
            losses = objective(images, generator, z=z, noise=noise, target=target)
        else:
            losses = objective(images, generator)
        losses["loss"].backward()
        clip_grad_norm(parameters, args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        history.append(float(losses["loss"].detach()))
        done = step + 1
        if done % 10 == 0 or done == steps:
            bar.set_postfix(loss=f"{sum(history[-10:]) / len(history[-10:]):.4f}")
    bar.close()
    set_optimizer_mode(optimizer, train=False)  # schedule-free: keep the averaged (evaluation) weights
    objective.eval()
    return {
        "steps": done,
        "requested_steps": steps,
        "stopped_by_time_budget": done < steps,
        "seconds": round(time.perf_counter() - start, 1),
        "loss_first10": sum(history[:10]) / max(1, len(history[:10])),
        "loss_last10": sum(history[-10:]) / max(1, len(history[-10:])),
    }


def train(
    vae: SSDDAutoencoder, dataset: Dataset, args: argparse.Namespace, deadline: float, device: torch.device
) -> dict[str, Any]:
    """Joint encoder + decoder training (SSDD stage a) with the flow-matching loss (+ optional LPIPS/REPA)."""
    weights = LossWeights(fm=1.0, lpips=args.lpips_weight, repa=args.repa_weight, kl=1e-6)
    objective = SSDDObjective(vae, weights, train_encoder=True, repa_model=args.repa_model).to(device)
    batches = infinite_batches(dataset, args.batch_size, args.seed)
    return _optimise(objective, batches, args.train_steps, args.learning_rate, args, deadline, device,
                     args.seed, "train")  # fmt: skip


def distill(
    teacher: SSDDAutoencoder,
    dataset: Dataset,
    args: argparse.Namespace,
    deadline: float,
    device: torch.device,
) -> tuple[SSDDAutoencoder, dict[str, Any]]:
    """GAN-free single-step distillation: the student (a copy of the teacher) regresses the frozen
    teacher's ``--teacher_steps`` sample from the same noise in one step; the encoder stays frozen."""
    teacher.requires_grad_(False).eval()
    student = copy.deepcopy(teacher)
    student.requires_grad_(True)
    student.register_to_config(num_inference_steps=1)
    weights = LossWeights(fm=1.0, lpips=args.lpips_weight, repa=args.repa_weight, kl=0.0)
    objective = SSDDObjective(student, weights, train_encoder=False, repa_model=args.repa_model).to(device)
    batches = infinite_batches(dataset, args.batch_size, args.seed + 1)

    def targets(images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        return distillation_targets(teacher, images, generator, num_inference_steps=args.teacher_steps)

    log = _optimise(
        objective,
        batches,
        args.distill_steps,
        args.distill_learning_rate,
        args,
        deadline,
        device,
        args.seed + 1,
        "distill",
        targets=targets,
    )
    student.requires_grad_(False).eval()
    return student, log


@torch.no_grad()
def agreement_psnr(
    teacher: SSDDAutoencoder, student: SSDDAutoencoder, images: torch.Tensor, steps: int
) -> float:
    """Mean PSNR (dB, uint8-quantised) of the student's 1-step decode against the teacher's N-step decode
    from the same noise: how well the one-step decoder reproduces its teacher on held-out images."""
    from ssdd_diffusers.metrics import psnr, to_uint8

    z = teacher.encode(images).latent_dist.mode()
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(1234)).to(images.device)
    reference = teacher.decode(z, noise=noise, num_inference_steps=steps).sample
    one_step = student.decode(
        student.encode(images).latent_dist.mode(), noise=noise, num_inference_steps=1
    ).sample
    return float(psnr(to_uint8(reference), to_uint8(one_step)).clamp(max=100).mean())


# ====================================================================================================
# Main
# ====================================================================================================
def _fmt_metric(value: Any, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the quickstart; returns the content of ``metrics.json``."""
    start = time.perf_counter()
    args = parse_args(argv)
    budget = args.max_minutes * 60.0
    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)
    device = resolve_device(args.device)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    print(f"SSDD quickstart: preset {args.preset}, {args.resolution} px, device {device}, seed {args.seed}")

    train_data, heldout, data_description = build_data(args)
    heldout = heldout.to(device)
    print(f"data: {data_description}")

    vae = build_model(args).to(device)
    print(f"model: {sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M parameters, "
          f"f{vae.spatial_compression_ratio} encoder, teacher steps {args.teacher_steps}")  # fmt: skip
    train_log = train(vae, train_data, args, start + 0.50 * budget, device)
    vae.requires_grad_(False).eval()

    before = agreement_psnr(vae, vae, heldout, args.teacher_steps)  # teacher's own 1-step decode
    student, distill_log = distill(vae, train_data, args, start + 0.80 * budget, device)
    after = agreement_psnr(vae, student, heldout, args.teacher_steps)

    teacher_dir, student_dir = output_dir / "teacher", output_dir / "student"
    vae.save_pretrained(teacher_dir)
    student.save_pretrained(student_dir)
    teacher_loaded = SSDDAutoencoder.from_pretrained(teacher_dir).to(device).eval()
    student_loaded = SSDDAutoencoder.from_pretrained(student_dir).to(device).eval()
    if student_loaded.config.num_inference_steps != 1:
        raise RuntimeError("the reloaded student should decode in 1 step by default")

    extra = args.extra_metrics == "auto"
    report = evaluate_models(
        [
            LoadedAutoencoder.from_model(teacher_loaded, f"teacher ({args.teacher_steps} steps)"),
            LoadedAutoencoder.from_model(student_loaded, "student (1 step)"),
        ],
        heldout,
        batch_size=args.batch_size,
        device=device,
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
        "model_config": dict(vae.config),
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
    if not extra:
        print("LPIPS and rFID: not computed (--extra_metrics off)")
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
