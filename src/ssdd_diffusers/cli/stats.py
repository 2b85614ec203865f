"""``ssdd-latent-stats`` (``ssdd-diffusers stats``): latent mean / std written into the model config."""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

from ..torch_utils import DTYPES
from .common import add_data_arguments, dataset_from_args, describe_data, run_guarded


def build_latent_stats_parser(prog: str = "ssdd-latent-stats") -> argparse.ArgumentParser:
    """Parser of ``ssdd-latent-stats`` (``ssdd-diffusers stats``)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  ssdd-diffusers stats ./ssdd-f8c4-M --data_dir ./images --resolution 256 "
        "--max_samples 5000",
        description="Encode a dataset (posterior mode) and write per-channel latents_mean / latents_std, "
        "shift_factor = scalar mean and scaling_factor = 1 / scalar std into the model config, for "
        "training latent diffusion models on its latents (pipelines use (z - shift) * scaling).",
    )
    parser.add_argument("model", help="Model spec: [kind:]path_or_hub_id[@subfolder=DIR].")
    add_data_arguments(parser)
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


def latent_stats_main(argv: Sequence[str] | None = None, prog: str = "ssdd-latent-stats") -> Any:
    """``ssdd-latent-stats``; returns the :class:`~ssdd_diffusers.evaluation.latent_stats.LatentStats`."""
    from ..evaluation import iterate_batches, load_autoencoder, parse_model_spec
    from ..evaluation.latent_stats import compute_latent_stats, write_latent_stats
    from ..torch_utils import resolve_device
    from .images import check_resolution

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_latent_stats_parser(prog).parse_args(argv)
    spec = parse_model_spec(args.model)
    if not args.no_write and args.output_dir is None and not os.path.isdir(spec.path):
        raise SystemExit(
            "error: a Hub model needs --output_dir (or --no_write); in-place needs a local folder"
        )
    device = resolve_device(args.device)
    loaded = load_autoencoder(spec, device=device, dtype=DTYPES[args.dtype])
    check_resolution(args.resolution, loaded.spatial_compression_ratio)  # stats only encode
    dataset = dataset_from_args(args, args.max_samples)
    try:
        total = len(dataset)
    except TypeError:
        total = args.max_samples
    batches = (images for images, _ in iterate_batches(dataset, args.batch_size, args.num_workers))
    stats = compute_latent_stats(loaded.model, batches, total=total, progress=not args.no_progress)
    print(f"Latent statistics of {spec.path} on {describe_data(args)} at {args.resolution} px:")
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
        if args.output_dir is not None:  # a new folder: `_name_or_path` names the source folder at most
            from ..model_card import strip_local_paths_from_config

            strip_local_paths_from_config(args.output_dir)
        print(f"wrote latents_mean, latents_std, shift_factor, scaling_factor to {path}")
    return stats


def _loaded_subfolder(path: str) -> str | None:
    from ..evaluation import detect_model_class

    return detect_model_class(path)[1]


def latent_stats_command(argv: Sequence[str] | None = None) -> int:
    """``ssdd-latent-stats`` console script: :func:`latent_stats_main` with one-line errors; returns 0."""
    return run_guarded(lambda: latent_stats_main(argv))
