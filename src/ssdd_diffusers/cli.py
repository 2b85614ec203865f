"""Console entry points: ``ssdd-diffusers`` (subcommands) and the aliases ``ssdd-evaluate`` and
``ssdd-latent-stats``.

``ssdd-diffusers`` subcommands::

    ssdd-diffusers reconstruct ./ssdd-f8c4-M photos/ --output_dir recon/   # PNGs + PSNR/SSIM/LPIPS
    ssdd-diffusers encode ./ssdd-f8c4-M photos/ --output latents.safetensors
    ssdd-diffusers decode ./ssdd-f8c4-M latents.safetensors --output_dir decoded/
    ssdd-diffusers convert upstream_ckpt.safetensors ./ssdd-f8c4-M
    ssdd-diffusers evaluate ./ssdd-f8c4-M@steps=8 kl:stabilityai/sd-vae-ft-ema --data_dir val/
    ssdd-diffusers stats ./ssdd-f8c4-M --data_dir ./images --resolution 256
    ssdd-diffusers benchmark --resolutions 256 --contenders ssdd-S-1 kl --skip-slow

Bad input (a missing or corrupt file, a folder that is not a model, ...) ends the command with exit
status 1 and one ``error: ...`` line on stderr.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .image_io import (
    InputError,
    LatentFile,
    check_resolution,
    collect_images,
    load_image,
    load_latents,
    output_names,
    prepare_image,
    save_latents,
    save_png,
    size_multiple,
)

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
    g.add_argument("--dataset_config_name", type=str, default=None, help="datasets configuration name.")
    g.add_argument("--split", type=str, default="train", help="Dataset split (e.g. 'validation').")
    g.add_argument("--image_column", type=str, default=None, help="Image column (default: detected).")
    g.add_argument("--streaming", action="store_true", help="Stream a Hub dataset (use --max_samples).")
    g.add_argument("--cache_dir", type=str, default=None, help="datasets / Hub cache folder.")
    g.add_argument(
        "--sample_photos",
        type=str,
        default=None,
        choices=["heldout", "train", "all"],
        help="The real photos bundled with scikit-image (offline smoke test).",
    )
    g.add_argument("--max_samples", type=int, default=None, help="Use at most this many images.")
    g.add_argument("--resolution", type=int, default=256, help="Resize shorter side + centre crop.")
    g.add_argument("--batch_size", type=int, default=8, help="Images per batch.")
    g.add_argument("--num_workers", type=int, default=2, help="Data-loading worker processes.")
    g.add_argument("--device", type=str, default="auto", help="'auto', 'cpu', 'cuda', 'cuda:1', ...")
    g.add_argument("--dtype", type=str, default="float32", choices=sorted(DTYPES), help="Model precision.")
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
    g.add_argument("--output_dir", type=str, default="ssdd-eval", help="Where the results are written.")
    g.add_argument("--grid_images", type=int, default=8, help="Images per row of the PNG grid.")
    return parser


def _lpips_settings(choice: str) -> dict[str, Any]:
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


def evaluate_main(
    argv: Sequence[str] | None = None,
    *,
    fid_feature_extractor: nn.Module | None = None,
    prog: str = "ssdd-evaluate",
) -> Any:
    """``ssdd-evaluate``; returns the :class:`~ssdd_diffusers.evaluation.EvaluationReport`.

    ``fid_feature_extractor`` (library/test hook) replaces the Inception network with a given module.
    """
    from .evaluation import MetricSettings, evaluate_models, load_feature_extractor, parse_model_spec

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_evaluate_parser(prog).parse_args(argv)
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
        **_lpips_settings(args.lpips_backbone),
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


def latent_stats_main(argv: Sequence[str] | None = None, prog: str = "ssdd-latent-stats") -> Any:
    """``ssdd-latent-stats``; returns the :class:`~ssdd_diffusers.latent_stats.LatentStats`."""
    import json
    import os

    from .evaluation import iterate_batches, load_autoencoder, parse_model_spec, resolve_device
    from .latent_stats import compute_latent_stats, write_latent_stats

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_latent_stats_parser(prog).parse_args(argv)
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


# ====================================================================================================
# ssdd-diffusers: shared pieces
# ====================================================================================================
class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the example epilogs as written; appends meaningful defaults (not None / False) to the help."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 1000 else text[:997] + "..."


def _expected_errors() -> tuple[type[BaseException], ...]:
    from safetensors import SafetensorError

    return (OSError, ValueError, SafetensorError, torch.OutOfMemoryError)


def _run_guarded(command: Any) -> int:
    """Run ``command()``; expected failures become one ``error: ...`` line on stderr and exit status 1."""
    try:
        command()
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except SystemExit as exit_:
        if isinstance(exit_.code, str):  # raise SystemExit("error: ...") from the reused commands
            print(" ".join(exit_.code.split()), file=sys.stderr)
            raise SystemExit(1) from None
        raise
    except _expected_errors() as error:
        message = _one_line(error)
        if not isinstance(error, InputError) and isinstance(error, OSError) and error.filename:
            message = f"{message} ({error.filename})" if str(error.filename) not in message else message
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(1) from None
    return 0


def evaluate_command(argv: Sequence[str] | None = None) -> int:
    """``ssdd-evaluate`` console script: :func:`evaluate_main` with one-line errors; returns 0."""
    return _run_guarded(lambda: evaluate_main(argv))


def latent_stats_command(argv: Sequence[str] | None = None) -> int:
    """``ssdd-latent-stats`` console script: :func:`latent_stats_main` with one-line errors; returns 0."""
    return _run_guarded(lambda: latent_stats_main(argv))


def _looks_like_hub_id(path: str) -> bool:
    return path.count("/") == 1 and not path.startswith((".", "/", "~")) and "\\" not in path


def load_cli_model(text: str, steps: int | None, device: torch.device, dtype: torch.dtype) -> Any:
    """A :class:`~ssdd_diffusers.evaluation.LoadedAutoencoder` from a model argument, with clear errors
    for a missing path, a folder without ``config.json`` and a model that is not an autoencoder."""
    from .evaluation import load_autoencoder, parse_model_spec

    if steps is not None and steps < 1:
        raise InputError(f"--steps must be >= 1, got {steps}")
    spec = parse_model_spec(text, steps=steps)
    path = Path(spec.path).expanduser()
    if path.is_dir():
        folders = [path / spec.subfolder] if spec.subfolder else [path, path / "vae"]
        if not any((folder / "config.json").is_file() for folder in folders):
            raise InputError(f"{spec.path!r} is not a model folder (no config.json in {folders[0]})")
        spec.path = str(path)
    elif path.exists():
        raise InputError(f"model {spec.path!r} is a file; pass a model folder (config.json + weights)")
    elif not _looks_like_hub_id(spec.path):
        raise InputError(f"model folder not found: {spec.path!r} (nor a Hub id 'org/name')")
    with warnings.catch_warnings():  # huggingface_hub deprecation noise on a failed Hub lookup
        warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
        loaded = load_autoencoder(spec, device=device, dtype=dtype)
    if steps is not None and not loaded.is_ssdd:
        print(f"note: --steps is ignored for a {loaded.class_name}", file=sys.stderr)
    if not (hasattr(loaded.model, "encode") and hasattr(loaded.model, "decode")):
        raise InputError(f"{spec.path!r} holds a {loaded.class_name}, not an autoencoder")
    return loaded


def _generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(int(seed))


@torch.no_grad()
def encode_image(loaded: Any, pixels: torch.Tensor, sample: bool = False, seed: int = 0) -> torch.Tensor:
    """Latents (1, C, h, w) of ``pixels`` in [-1, 1]: posterior mode, or a sample seeded with ``seed``."""
    x = pixels.to(device=loaded.device, dtype=loaded.dtype)
    encoded = loaded.model.encode(x)
    dist = getattr(encoded, "latent_dist", None)
    if dist is None:
        return encoded.latents
    return dist.sample(generator=_generator(seed)) if sample else dist.mode()


@torch.no_grad()
def decode_latents(loaded: Any, z: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Float32 image (1, 3, H, W) from latents; SSDD starts from noise drawn by a generator seeded with
    ``seed`` (``vae.decode(z, generator=torch.Generator().manual_seed(seed))``)."""
    z = z.to(device=loaded.device, dtype=loaded.dtype)
    if loaded.is_ssdd:
        return loaded.model.decode(
            z, num_inference_steps=loaded.num_inference_steps, generator=_generator(seed)
        ).sample.float()
    return loaded.model.decode(z).sample.float()


def _add_model_arguments(parser: argparse.ArgumentParser, steps: bool = True) -> None:
    parser.add_argument(
        "model",
        help="Model folder, Hub id or [kind:]spec (e.g. ssdd:./ssdd-f8c4-M, kl:org/vae@subfolder=vae).",
    )
    if steps:
        parser.add_argument(
            "--steps", type=int, default=None, help="SSDD decode steps (default: the model's config)."
        )
    parser.add_argument("--device", type=str, default="auto", help="'auto', 'cpu', 'cuda', 'cuda:1', ...")
    parser.add_argument(
        "--dtype", type=str, default="float32", choices=sorted(DTYPES), help="Model precision."
    )
    parser.add_argument("--no_progress", action="store_true", help="Hide the progress bar.")


def _add_image_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", help="Image files and/or folders (searched recursively).")
    parser.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="Resize the shorter side and centre-crop to this square size; default: keep the size, "
        "centre-cropped to a multiple of the model's factor.",
    )
    parser.add_argument(
        "--skip_unreadable",
        action="store_true",
        help="Warn about and skip unreadable images instead of stopping with an error.",
    )


def _iter_images(args: argparse.Namespace, paths: list[Path], multiple: int, desc: str) -> Any:
    """Yield ``(index, path, PreparedImage)`` with a progress bar; notes go to stderr."""
    from tqdm.auto import tqdm

    check_resolution(args.resolution, multiple)
    bar = tqdm(paths, desc=desc, unit="img", disable=args.no_progress)
    for index, path in enumerate(bar):
        try:
            prepared = prepare_image(load_image(path), multiple, args.resolution)
        except InputError as error:
            if not args.skip_unreadable:
                raise
            tqdm.write(f"warning: skipping {path}: {_one_line(error)}", file=sys.stderr)
            continue
        if prepared.note:
            tqdm.write(f"note: {path}: {prepared.note}", file=sys.stderr)
        yield index, path, prepared
    bar.close()


def _json_float(value: float | None) -> float | str | None:
    if value is None or math.isfinite(value):
        return value
    return "inf" if value > 0 else "-inf"


# ====================================================================================================
# ssdd-diffusers subcommands
# ====================================================================================================
def _reconstruct(args: argparse.Namespace) -> None:
    """Encode (posterior mode) + decode every image; write PNGs, print and save per-image metrics."""
    from tqdm.auto import tqdm

    from .evaluation import MetricSettings, build_metrics, resolve_device

    paths = collect_images(args.inputs)
    output_dir = Path(args.output_dir)
    names = output_names(paths)
    inputs = {p.resolve() for p in paths}
    if any((output_dir / f"{n}.png").resolve() in inputs for n in names):
        raise InputError(f"--output_dir {str(output_dir)!r} would overwrite input images; choose another")
    device = resolve_device(args.device)
    loaded = load_cli_model(args.model, args.steps, device, DTYPES[args.dtype])
    multiple = size_multiple(loaded.model)
    check_resolution(args.resolution, multiple)
    settings = MetricSettings(
        **_lpips_settings(args.lpips_backbone), compute_fid=False, skip_unavailable=True
    )
    scorer, unavailable = build_metrics(settings, device)
    for metric, reason in unavailable.items():
        print(f"note: {metric} not computed: {reason}", file=sys.stderr)
    rows: list[dict[str, Any]] = []
    for index, path, prepared in _iter_images(args, paths, multiple, "reconstruct"):
        z = encode_image(loaded, prepared.pixels)
        recon = decode_latents(loaded, z, args.seed)
        values = {k: float(v[0]) for k, v in scorer.update(prepared.pixels.to(device), recon).items()}
        output = save_png(recon, output_dir / f"{names[index]}.png")
        width, height = prepared.size
        rows.append(
            {"file": str(path), "output": str(output), "width": width, "height": height,
             "original_width": prepared.original_size[0], "original_height": prepared.original_size[1],
             "preprocessing": prepared.note, **values}
        )  # fmt: skip
        tqdm.write(f"{path}: {_metrics_text(values)} ({width}x{height}) -> {output}")
    if not rows:
        raise InputError("no image could be read")
    means = {k: v for k, v in scorer.compute().items() if k != "num_images"}
    print(f"mean over {len(rows)} image{'s' if len(rows) != 1 else ''}: {_metrics_text(means)}")
    summary = {
        "model": args.model,
        "class_name": loaded.class_name,
        "num_inference_steps": loaded.num_inference_steps,
        "seed": args.seed,
        "resolution": args.resolution,
        "lpips_backbone": args.lpips_backbone if "lpips" in means else "off",
        "unavailable_metrics": unavailable,
        "mean": {k: _json_float(v) for k, v in means.items()},
        "images": [{k: _json_float(v) if isinstance(v, float) else v for k, v in r.items()} for r in rows],
    }
    (output_dir / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    keys = ["file", "output", "width", "height", "psnr", "ssim"] + (["lpips"] if "lpips" in means else [])
    with open(output_dir / "metrics.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {len(rows)} PNGs, metrics.json and metrics.csv to {output_dir}")


def _metrics_text(values: dict[str, float]) -> str:
    parts = [f"PSNR {values['psnr']:.2f} dB", f"SSIM {values['ssim']:.4f}"]
    if "lpips" in values:
        parts.append(f"LPIPS {values['lpips']:.4f}")
    return ", ".join(parts)


def _encode(args: argparse.Namespace) -> None:
    """Encode every image; write one safetensors file of latents with names in its metadata."""
    from .evaluation import resolve_device

    output = Path(args.output)
    if output.suffix != ".safetensors":
        raise InputError(f"--output must end with .safetensors, got {args.output!r}")
    paths = collect_images(args.inputs)
    names = output_names(paths)
    loaded = load_cli_model(args.model, None, resolve_device(args.device), DTYPES[args.dtype])
    latents, kept, sources, sizes = [], [], [], []
    for index, path, prepared in _iter_images(args, paths, size_multiple(loaded.model), "encode"):
        latents.append(
            encode_image(loaded, prepared.pixels, sample=args.sample, seed=args.seed).float().cpu()
        )
        kept.append(names[index])
        sources.append(str(path))
        sizes.append(list(prepared.size))
    if not latents:
        raise InputError("no image could be read")
    config = loaded.model.config
    metadata = {
        "files": sources,
        "image_sizes": sizes,
        "model": args.model,
        "latent_channels": int(latents[0].shape[1]),
        "spatial_compression_ratio": loaded.spatial_compression_ratio,
        "posterior": "sample" if args.sample else "mode",
        "seed": args.seed if args.sample else None,
        "scaled": False,
        "scaling_factor": getattr(config, "scaling_factor", None),
        "shift_factor": getattr(config, "shift_factor", None),
    }
    save_latents(output, LatentFile(latents, kept, metadata))
    shapes = sorted({tuple(z.shape[1:]) for z in latents})
    print(f"wrote {len(latents)} latents {', '.join(str(s) for s in shapes)} to {output}")


def _decode(args: argparse.Namespace) -> None:
    """Decode every latent of a latents file to a PNG."""
    from tqdm.auto import tqdm

    from .evaluation import resolve_device

    data = load_latents(args.latents)
    loaded = load_cli_model(args.model, args.steps, resolve_device(args.device), DTYPES[args.dtype])
    expected = getattr(loaded.model.config, "latent_channels", None)
    factor, multiple = loaded.spatial_compression_ratio, size_multiple(loaded.model)
    for name, z in zip(data.names, data.latents):
        if expected is not None and z.shape[1] != expected:
            raise InputError(
                f"latents {name!r} have {z.shape[1]} channels but the model expects {expected} "
                f"(shape {tuple(z.shape[1:])})"
            )
        if (z.shape[-2] * factor) % multiple or (z.shape[-1] * factor) % multiple:
            raise InputError(
                f"latents {name!r} of {z.shape[-1]}x{z.shape[-2]} would decode to "
                f"{z.shape[-1] * factor}x{z.shape[-2] * factor} px; the model needs multiples of {multiple}"
            )
    output_dir = Path(args.output_dir)
    for name, z in tqdm(
        list(zip(data.names, data.latents)), desc="decode", unit="img", disable=args.no_progress
    ):
        path = save_png(decode_latents(loaded, z, args.seed), output_dir / f"{name}.png")
        tqdm.write(f"{name}: {tuple(z.shape[1:])} -> {path}")
    print(f"wrote {len(data.latents)} PNGs to {output_dir}")


def _parse_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise InputError(f"--set expects KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _convert(args: argparse.Namespace) -> None:
    """Upstream SSDD checkpoint -> diffusers folder (config inferred from the tensor shapes)."""
    import inspect
    import pickle

    from safetensors import SafetensorError

    from .conversion import load_state_dict_file
    from .models import SSDDAutoencoder

    checkpoint, output = Path(args.checkpoint), Path(args.output_dir)
    if not checkpoint.is_file():
        raise InputError(f"no such checkpoint file: {args.checkpoint!r}")
    if (output / "config.json").exists() and not args.overwrite:
        raise InputError(f"{args.output_dir!r} already holds a model; pass --overwrite to replace it")
    overrides = dict(_parse_override(item) for item in args.set or [])
    for key in ("num_inference_steps", "time_grid_power", "scaling_factor", "shift_factor", "sample_size"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    allowed = set(inspect.signature(SSDDAutoencoder.__init__).parameters) - {"self"}
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise InputError(f"unknown config key(s) {unknown}; valid keys: {sorted(allowed)}")
    try:
        state = load_state_dict_file(checkpoint)
    except (pickle.UnpicklingError, RuntimeError, EOFError, SafetensorError) as error:
        raise InputError(
            f"cannot read checkpoint {args.checkpoint!r}: not a safetensors file nor a tensors-only torch "
            f"checkpoint ({type(error).__name__})"
        ) from error
    except ValueError as error:
        raise InputError(f"cannot convert {args.checkpoint!r}: {_one_line(error)}") from error
    try:  # a ValueError says what the weights look like if they are not upstream SSDD weights
        model = SSDDAutoencoder.from_upstream_checkpoint(state, torch_dtype=DTYPES[args.dtype], **overrides)
    except (ValueError, RuntimeError, TypeError) as error:
        raise InputError(f"cannot convert {args.checkpoint!r}: {_one_line(error)}") from error
    model.save_pretrained(output)
    params = sum(p.numel() for p in model.parameters())
    config = model.config
    print(
        f"converted {checkpoint} -> {output}: {params / 1e6:.2f}M parameters, encoder "
        f"f{model.spatial_compression_ratio}c{config.latent_channels}, decoder widths "
        f"{list(config.decoder_block_out_channels)}, {config.decoder_transformer_layers} transformer layers, "
        f"{config.num_inference_steps} default step(s), {args.dtype}"
    )


# ====================================================================================================
# ssdd-diffusers: parser and main
# ====================================================================================================
def _subparser(
    subparsers: Any, name: str, summary: str, example: str, **kwargs: Any
) -> argparse.ArgumentParser:
    return subparsers.add_parser(
        name,
        help=summary,
        description=summary,
        epilog=f"example:\n  {example}",
        formatter_class=_Formatter,
        **kwargs,
    )


def build_parser() -> argparse.ArgumentParser:
    """Parser of ``ssdd-diffusers`` (``evaluate``, ``stats``, ``benchmark`` forward to their own parsers)."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="ssdd-diffusers",
        description="SSDD autoencoders from the command line: reconstruct, encode and decode images, convert "
        "upstream checkpoints, evaluate, compute latent statistics and benchmark decoding.",
        epilog="Run 'ssdd-diffusers COMMAND --help' for the flags of a command.",
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {__version__}", help="Print the version."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = _subparser(
        sub,
        "reconstruct",
        "Encode (posterior mode) and decode images; save PNGs and per-image PSNR / SSIM / LPIPS.",
        "ssdd-diffusers reconstruct ./ssdd-f8c4-M photos/ cat.jpg --output_dir recon/ --steps 1",
    )
    _add_model_arguments(p)
    _add_image_arguments(p)
    p.add_argument("--output_dir", required=True, help="Folder for the PNGs, metrics.json and metrics.csv.")
    p.add_argument(
        "--seed", type=int, default=0, help="Seed of the SSDD starting noise (same for every image)."
    )
    p.add_argument(
        "--lpips_backbone",
        default="pretrained",
        choices=["pretrained", "random", "none"],
        help="LPIPS AlexNet weights; 'none' skips LPIPS, 'random' is for offline tests only (meaningless).",
    )
    p.set_defaults(handler=_reconstruct)

    p = _subparser(
        sub,
        "encode",
        "Encode images into one .safetensors file of latents (names and settings in its metadata).",
        "ssdd-diffusers encode ./ssdd-f8c4-M photos/ --output latents.safetensors",
    )
    _add_model_arguments(p, steps=False)
    _add_image_arguments(p)
    p.add_argument("--output", required=True, help="Latents file to write (.safetensors).")
    p.add_argument("--sample", action="store_true", help="Sample the posterior instead of taking its mode.")
    p.add_argument("--seed", type=int, default=0, help="Seed of --sample (same for every image).")
    p.set_defaults(handler=_encode)

    p = _subparser(
        sub,
        "decode",
        "Decode a latents file (from 'encode', or any (C,h,w) / (B,C,h,w) safetensors tensors) to PNGs.",
        "ssdd-diffusers decode ./ssdd-f8c4-M latents.safetensors --output_dir decoded/ --steps 4",
    )
    _add_model_arguments(p)
    p.add_argument("latents", help="A .safetensors latents file.")
    p.add_argument("--output_dir", required=True, help="Folder for the PNGs.")
    p.add_argument(
        "--seed", type=int, default=0, help="Seed of the SSDD starting noise (same for every image)."
    )
    p.set_defaults(handler=_decode)

    p = _subparser(
        sub,
        "convert",
        "Convert an upstream SSDD checkpoint (.safetensors / .pt / .ckpt) into a diffusers model folder; "
        "the configuration is inferred from the tensor shapes.",
        "ssdd-diffusers convert ssdd_f8c4_M.safetensors ./ssdd-f8c4-M --num_inference_steps 1",
    )
    p.add_argument("checkpoint", help="Upstream SSDD checkpoint file.")
    p.add_argument("output_dir", help="Folder to save_pretrained the converted model into.")
    p.add_argument(
        "--num_inference_steps", type=int, default=None, help="Default decode steps in the config."
    )
    p.add_argument(
        "--time_grid_power", type=float, default=None, help="Time-grid power (upstream t_pow_shift)."
    )
    p.add_argument("--scaling_factor", type=float, default=None, help="Latent scaling_factor in the config.")
    p.add_argument("--shift_factor", type=float, default=None, help="Latent shift_factor in the config.")
    p.add_argument("--sample_size", type=int, default=None, help="Nominal image size in the config.")
    p.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="Any other config value (JSON value); repeatable."
    )
    p.add_argument(
        "--dtype", default="float32", choices=sorted(DTYPES), help="Precision of the saved weights."
    )
    p.add_argument("--overwrite", action="store_true", help="Replace a model already in OUTPUT_DIR.")
    p.set_defaults(handler=_convert)

    for name, summary in FORWARDED_HELP.items():
        sub.add_parser(name, help=summary, add_help=False)
    return parser


FORWARDED_HELP = {
    "evaluate": "Compare SSDD and AutoencoderKL models: rFID, PSNR, SSIM, LPIPS, speed, memory "
    "(= ssdd-evaluate).",
    "stats": "Latent mean / std of a dataset, written into the model config (= ssdd-latent-stats).",
    "benchmark": "Decode speed and memory of SSDD presets against AutoencoderKL "
    "(= benchmarks/decode_benchmark.py).",
}


def _forwarded(name: str, argv: list[str]) -> Any:
    prog = f"ssdd-diffusers {name}"
    if name == "evaluate":
        return lambda: evaluate_main(argv, prog=prog)
    if name == "stats":
        return lambda: latent_stats_main(argv, prog=prog)
    from . import benchmark

    return lambda: benchmark.main(argv, prog=prog)


def main(argv: Sequence[str] | None = None) -> int:
    """``ssdd-diffusers``: run one subcommand; returns 0, exits 1 with one ``error:`` line on bad input."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in FORWARDED_HELP:
        return _run_guarded(_forwarded(argv[0], argv[1:]))
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    def run() -> Any:
        from .cpu_memory import reuse_freed_memory

        with reuse_freed_memory():  # large CPU decodes: no re-faulting of freed activations
            return args.handler(args)

    return _run_guarded(run)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
