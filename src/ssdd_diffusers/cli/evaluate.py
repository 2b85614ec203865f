"""``ssdd-evaluate`` (``ssdd-diffusers evaluate``): SSDD and AutoencoderKL models side by side."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from typing import Any

from torch import nn

from ..torch_utils import DTYPES
from .common import add_data_arguments, dataset_from_args, describe_data, run_guarded


def build_evaluate_parser(prog: str = "ssdd-evaluate") -> argparse.ArgumentParser:
    """Parser of ``ssdd-evaluate`` (``ssdd-diffusers evaluate``)."""
    parser = argparse.ArgumentParser(
        prog=prog,
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
    add_data_arguments(parser)
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
    g.add_argument("--output_dir", type=str, default="ssdd-eval", help="Where the results are written.")
    g.add_argument("--grid_images", type=int, default=8, help="Images per row of the PNG grid.")
    return parser


def lpips_settings(choice: str) -> dict[str, Any]:
    """``MetricSettings`` LPIPS fields for a ``--lpips_backbone`` value (pretrained, random or none)."""
    return {"compute_lpips": choice != "none", "lpips_backbone": "pretrained" if choice == "none" else choice}


def _per_model(values: Sequence[str] | None, count: int, name: str) -> list[str | None]:
    if values is None:
        return [None] * count
    if len(values) == 1 and count > 1:
        return list(values) * count
    if len(values) != count:
        raise SystemExit(f"error: --{name} needs 1 or {count} values, got {len(values)}")
    return list(values)


def _steps(value: str | None) -> int | None:
    """A ``--steps`` value: ``None`` for the model's own (``default``), else an integer >= 1."""
    if value in (None, "default"):
        return None
    try:
        steps = int(value)
    except ValueError:
        steps = 0
    if steps < 1:
        raise SystemExit(f"error: --steps takes integers >= 1 or 'default', got {value!r}")
    return steps


def evaluate_main(
    argv: Sequence[str] | None = None,
    *,
    fid_feature_extractor: nn.Module | None = None,
    prog: str = "ssdd-evaluate",
) -> Any:
    """``ssdd-evaluate``; returns the :class:`~ssdd_diffusers.evaluation.EvaluationReport`.

    ``fid_feature_extractor`` (library/test hook) replaces the Inception network with a given module.
    """
    from ..evaluation import MetricSettings, evaluate_models, load_feature_extractor, parse_model_spec

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_evaluate_parser(prog).parse_args(argv)
    steps = _per_model(args.steps, len(args.models), "steps")
    labels = _per_model(args.labels, len(args.models), "labels")
    if args.labels is not None and len(args.labels) == 1 and len(args.models) > 1:
        raise SystemExit("error: --labels needs one label per model")
    specs = [
        parse_model_spec(text, steps=_steps(s), label=label)
        for text, s, label in zip(args.models, steps, labels)
    ]

    compute_fid = args.fid_feature_extractor != "none" or fid_feature_extractor is not None
    extractor = fid_feature_extractor
    if extractor is None and args.fid_feature_extractor not in ("inception", "none"):
        extractor = load_feature_extractor(args.fid_feature_extractor)
    metrics = MetricSettings(
        **lpips_settings(args.lpips_backbone),
        compute_fid=compute_fid,
        fid_feature_extractor=extractor,
        skip_unavailable=args.skip_unavailable_metrics,
    )
    dataset = dataset_from_args(args, args.max_samples)
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
        settings={"data": describe_data(args), "resolution": args.resolution},
    )
    paths = report.save(args.output_dir)
    print(report.to_markdown())
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return report


def evaluate_command(argv: Sequence[str] | None = None) -> int:
    """``ssdd-evaluate`` console script: :func:`evaluate_main` with one-line errors; returns 0."""
    return run_guarded(lambda: evaluate_main(argv))
