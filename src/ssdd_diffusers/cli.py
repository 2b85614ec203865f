"""Console entry points: ``ssdd-evaluate`` and ``ssdd-latent-stats``.

``ssdd-evaluate`` compares SSDD models and diffusers ``AutoencoderKL`` models side by side::

    ssdd-evaluate ./ssdd-f8c4-M@steps=8 ./ssdd-f8c4-M-1step kl:stabilityai/sd-vae-ft-ema \\
        --dataset_name ILSVRC/imagenet-1k --split validation --max_samples 5000 --resolution 256 \\
        --output_dir eval_results

``ssdd-latent-stats`` writes latent mean/std into a model config::

    ssdd-latent-stats ./ssdd-f8c4-M --data_dir ./images --resolution 256 --max_samples 5000
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}  # fmt: skip


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("data (exactly one source)")
    g.add_argument(
        "--data_dir",
        type=str,
        default=None,
        help="Local folder of images (searched recursively; the imagefolder layout works).",
    )
    g.add_argument(
        "--dataset_name",
        type=str,
        default=None,
        help="datasets source: Hub name or save_to_disk folder ('imagefolder' with --data_dir).",
    )
    g.add_argument("--dataset_config_name", type=str, default=None)
    g.add_argument("--split", type=str, default="train", help="Dataset split (e.g. 'validation').")
    g.add_argument("--image_column", type=str, default=None)
    g.add_argument("--streaming", action="store_true", help="Stream a Hub dataset (use --max_samples).")
    g.add_argument("--cache_dir", type=str, default=None)
    g.add_argument(
        "--sample_photos",
        type=str,
        default=None,
        choices=["heldout", "train", "all"],
        help="The real photos bundled with scikit-image (offline smoke test).",
    )
    g.add_argument("--max_samples", type=int, default=None)
    g.add_argument("--resolution", type=int, default=256, help="Resize shorter side + centre crop.")
    g.add_argument("--batch_size", type=int, default=8)
    g.add_argument("--num_workers", type=int, default=2)
    g.add_argument("--device", type=str, default="auto", help="'auto', 'cpu', 'cuda', 'cuda:1', ...")
    g.add_argument("--dtype", type=str, default="float32", choices=sorted(DTYPES))
    g.add_argument("--no_progress", action="store_true", help="Hide the progress bars.")  # fmt: skip


def _dataset_from_args(args: argparse.Namespace, max_samples: int | None) -> Any:
    from .evaluation import build_eval_dataset

    if args.dataset_name is None and args.data_dir is None and args.sample_photos is None:
        raise SystemExit("error: pass one of --data_dir, --dataset_name or --sample_photos")
    return build_eval_dataset(
        resolution=args.resolution,
        data_dir=args.data_dir,
        dataset_name=args.dataset_name,
        dataset_config_name=args.dataset_config_name,
        split=args.split,
        image_column=args.image_column,
        sample_photos=args.sample_photos,
        max_samples=max_samples,
        streaming=args.streaming,
        cache_dir=args.cache_dir,
    )


def _describe_data(args: argparse.Namespace) -> str:
    if args.sample_photos is not None:
        return f"scikit-image sample photos ({args.sample_photos})"
    if args.data_dir is not None:
        return f"folder {args.data_dir}"
    config = f"/{args.dataset_config_name}" if args.dataset_config_name else ""
    return f"{args.dataset_name}{config} [{args.split}]"


# ====================================================================================================
# ssdd-evaluate
# ====================================================================================================
def build_evaluate_parser() -> argparse.ArgumentParser:
    """Parser of ``ssdd-evaluate``."""
    parser = argparse.ArgumentParser(
        prog="ssdd-evaluate",
        description="Evaluate SSDD models and diffusers AutoencoderKL models side by side: rFID, PSNR, "
        "SSIM, LPIPS (AlexNet), throughput and peak memory; writes JSON, a Markdown table and a PNG grid.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Model specs: [kind:]path_or_hub_id[@steps=N][@label=NAME][@subfolder=DIR], kind in "
        "{ssdd, kl}; without kind the class comes from config.json's _class_name. Example:\n"
        "  ssdd-evaluate ./ssdd-M@steps=8 ./ssdd-M-1step kl:stabilityai/sd-vae-ft-ema --data_dir val/",
    )
    parser.add_argument("models", nargs="+", help="Model specs (see below).")
    parser.add_argument(
        "--steps",
        nargs="+",
        default=None,
        help="Decode steps per model, in order ('default' keeps the model's own).",
    )
    parser.add_argument("--labels", nargs="+", default=None, help="Label per model, in order.")
    _add_data_arguments(parser)
    g = parser.add_argument_group("metrics")
    g.add_argument(
        "--fid_feature_extractor",
        type=str,
        default="inception",
        help="'inception' (rFID, torch-fidelity InceptionV3 weights), 'none' (skip rFID) or "
        "'package.module:factory' returning an nn.Module uint8 (B,3,H,W) -> (B,D) "
        "(reported as a Fréchet distance on custom features, not rFID).",
    )
    g.add_argument(
        "--lpips_backbone",
        type=str,
        default="pretrained",
        choices=["pretrained", "random", "none"],
        help="'none' skips LPIPS; 'random' is meaningless and for offline tests only.",
    )
    g.add_argument(
        "--skip_unavailable_metrics",
        action="store_true",
        help="Report LPIPS / rFID as n/a when their weights cannot be loaded (offline).",
    )
    g.add_argument("--seed", type=int, default=0, help="Seed of the SSDD starting noise (same for all).")
    g.add_argument("--warmup_batches", type=int, default=1, help="Untimed warm-up reconstructions.")
    g = parser.add_argument_group("output")
    g.add_argument("--output_dir", type=str, default="ssdd-eval")
    g.add_argument("--grid_images", type=int, default=8, help="Images per row of the PNG grid.")
    return parser


def _per_model(values: Sequence[str] | None, count: int, name: str) -> list[str | None]:
    if values is None:
        return [None] * count
    if len(values) == 1 and count > 1:
        return list(values) * count
    if len(values) != count:
        raise SystemExit(f"error: --{name} needs 1 or {count} values, got {len(values)}")
    return list(values)


def evaluate_main(
    argv: Sequence[str] | None = None, *, fid_feature_extractor: nn.Module | None = None
) -> Any:
    """``ssdd-evaluate``; returns the :class:`~ssdd_diffusers.evaluation.EvaluationReport`.

    ``fid_feature_extractor`` (library/test hook) replaces the Inception network with a given module.
    """
    from .evaluation import MetricSettings, evaluate_models, load_feature_extractor, parse_model_spec

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_evaluate_parser().parse_args(argv)
    steps = _per_model(args.steps, len(args.models), "steps")
    labels = _per_model(args.labels, len(args.models), "labels")
    if args.labels is not None and len(args.labels) == 1 and len(args.models) > 1:
        raise SystemExit("error: --labels needs one label per model")
    specs = [
        parse_model_spec(text, steps=None if s in (None, "default") else int(s), label=label)
        for text, s, label in zip(args.models, steps, labels)
    ]

    compute_fid = args.fid_feature_extractor != "none" or fid_feature_extractor is not None
    extractor = fid_feature_extractor
    if extractor is None and args.fid_feature_extractor not in ("inception", "none"):
        extractor = load_feature_extractor(args.fid_feature_extractor)
    metrics = MetricSettings(
        compute_lpips=args.lpips_backbone != "none",
        lpips_backbone="pretrained" if args.lpips_backbone == "none" else args.lpips_backbone,
        compute_fid=compute_fid,
        fid_feature_extractor=extractor,
        skip_unavailable=args.skip_unavailable_metrics,
    )
    dataset = _dataset_from_args(args, args.max_samples)
    report = evaluate_models(
        specs,
        dataset,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        device=args.device,
        dtype=DTYPES[args.dtype],
        seed=args.seed,
        metrics=metrics,
        grid_images=args.grid_images,
        warmup_batches=args.warmup_batches,
        progress=not args.no_progress,
        max_samples=args.max_samples,
        settings={"data": _describe_data(args), "resolution": args.resolution},
    )
    paths = report.save(args.output_dir)
    print(report.to_markdown())
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return report


# ====================================================================================================
# ssdd-latent-stats
# ====================================================================================================
def build_latent_stats_parser() -> argparse.ArgumentParser:
    """Parser of ``ssdd-latent-stats``."""
    parser = argparse.ArgumentParser(
        prog="ssdd-latent-stats",
        description="Encode a dataset (posterior mode) and write per-channel latents_mean / latents_std, "
        "shift_factor = scalar mean and scaling_factor = 1 / scalar std into the model config, for "
        "training latent diffusion models on its latents (pipelines use (z - shift) * scaling).",
    )
    parser.add_argument("model", help="Model spec: [kind:]path_or_hub_id[@subfolder=DIR].")
    _add_data_arguments(parser)
    parser.add_argument(
        "--output_dir",
        type=str,
        default=None,
        help="save_pretrained the model with the new config here. Default: update the "
        "local folder's config.json in place (weights untouched).",
    )
    parser.add_argument("--no_write", action="store_true", help="Only print the statistics.")
    parser.add_argument("--stats_json", type=str, default=None, help="Also write the statistics as JSON.")
    return parser


def latent_stats_main(argv: Sequence[str] | None = None) -> Any:
    """``ssdd-latent-stats``; returns the :class:`~ssdd_diffusers.latent_stats.LatentStats`."""
    import json
    import os

    from .evaluation import iterate_batches, load_autoencoder, parse_model_spec, resolve_device
    from .latent_stats import compute_latent_stats, write_latent_stats

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_latent_stats_parser().parse_args(argv)
    spec = parse_model_spec(args.model)
    if not args.no_write and args.output_dir is None and not os.path.isdir(spec.path):
        raise SystemExit(
            "error: a Hub model needs --output_dir (or --no_write); in-place needs a local folder"
        )
    device = resolve_device(args.device)
    loaded = load_autoencoder(spec, device=device, dtype=DTYPES[args.dtype])
    dataset = _dataset_from_args(args, args.max_samples)
    try:
        total = len(dataset)
    except TypeError:
        total = args.max_samples
    batches = (images for images, _ in iterate_batches(dataset, args.batch_size, args.num_workers))
    stats = compute_latent_stats(loaded.model, batches, total=total, progress=not args.no_progress)
    print(f"Latent statistics of {spec.path} on {_describe_data(args)} at {args.resolution} px:")
    print(stats.summary())
    if args.stats_json:
        with open(args.stats_json, "w") as handle:
            json.dump(stats.to_dict(), handle, indent=2)
    if not args.no_write:
        subfolder = spec.subfolder
        if subfolder is None and args.output_dir is None:
            subfolder = _loaded_subfolder(spec.path)
        path = write_latent_stats(
            stats, model_path=spec.path, model=loaded.model, output_dir=args.output_dir, subfolder=subfolder
        )
        print(f"wrote latents_mean, latents_std, shift_factor, scaling_factor to {path}")
    return stats


def _loaded_subfolder(path: str) -> str | None:
    from .evaluation import detect_model_class

    return detect_model_class(path)[1]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(0 if evaluate_main() is not None else 1)
