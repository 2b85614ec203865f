"""``ssdd-diffusers reconstruct``: encode + decode images, write PNGs and per-image PSNR / SSIM / LPIPS."""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path
from typing import Any

from ..evaluation.reconstruction import decode_latents, encode_latents
from ..torch_utils import DTYPES, resolve_device
from .common import iter_images, load_cli_model, seeded_generator
from .errors import InputError
from .evaluate import lpips_settings
from .images import check_resolution, collect_images, output_names, save_png, size_multiple


def _json_float(value: float | None) -> float | str | None:
    if value is None or math.isfinite(value):
        return value
    return "inf" if value > 0 else "-inf"


def reconstruct_command(args: argparse.Namespace) -> None:
    """Encode (posterior mode) + decode every image; write PNGs, print and save per-image metrics."""
    from tqdm.auto import tqdm

    from ..evaluation import MetricSettings, build_metrics

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
    settings = MetricSettings(**lpips_settings(args.lpips_backbone), compute_fid=False, skip_unavailable=True)
    scorer, unavailable = build_metrics(settings, device)
    for metric, reason in unavailable.items():
        print(f"note: {metric} not computed: {reason}", file=sys.stderr)
    rows: list[dict[str, Any]] = []
    for index, path, prepared in iter_images(args, paths, multiple, "reconstruct"):
        z = encode_latents(loaded.model, prepared.pixels)
        recon = decode_latents(
            loaded.model, z, loaded.num_inference_steps, generator=seeded_generator(args.seed)
        )
        recon = recon.float()
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
