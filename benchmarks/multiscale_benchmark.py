"""Multi-scale (coarse-to-fine) decoding against full-resolution decoding: speed, and optionally quality.

Speed (always): an SSDD preset with random weights (default ``S``, f8c4) decodes the same random latent
at ``--resolution`` (default 256) with ``--steps`` Euler steps (default 12) at full resolution, and with
the same number of steps split over K stages for every ``--stages`` value (default 3 and 4; the library's
default split, plus any ``--split K:n0,n1,...`` given). Contenders are run round-robin (``--repeats``
rounds after one cheap warm-up each, so load changes on a shared machine hit all alike) and the median
wall time and process CPU time are reported with the speed-ups over full resolution (with ``--threads
1`` the CPU time is the robust figure on a shared machine: it excludes time spent waiting for a core);
the FLOP ratio from ``torch.utils.flop_counter`` is reported alongside as the load-independent figure.

Quality (with ``--model``): a trained model folder (``save_pretrained`` output of a multi-scale training
run; ``--teacher`` a full-resolution model, default the same folder) encodes held-out photos
(``--images`` folder, or scikit-image's bundled photos), then decodes them (a) at full resolution with
the teacher, N steps, and (b) coarse-to-fine with the model for every K, N steps. Reported: PSNR and
LPIPS (AlexNet, if its ImageNet weights are available offline) of (b) against (a), and of both against
the ground truth.

Example::

    python benchmarks/multiscale_benchmark.py --resolution 256 --stages 3 4 --repeats 3 \\
        --json benchmarks/results/multiscale_cpu.json --markdown benchmarks/results/multiscale_cpu.md
    python benchmarks/multiscale_benchmark.py --model runs/quickstart-ms3/final --stages 3 --skip-speed
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from ssdd_diffusers import SSDDAutoencoder
from ssdd_diffusers.evaluation.metrics import psnr, to_uint8
from ssdd_diffusers.multiscale import MultiScaleLayout, default_stage_steps, stage_resolutions


# ------------------------------------------------------------------------------------------------
# Speed
# ------------------------------------------------------------------------------------------------
def parse_split(text: str) -> tuple[int, tuple[int, ...]]:
    """``"3:5,4,3"`` -> (3, (5, 4, 3))."""
    stages, steps = text.split(":")
    split = tuple(int(s) for s in steps.split(","))
    if len(split) != int(stages):
        raise argparse.ArgumentTypeError(f"split {text!r} must list {stages} step counts")
    return int(stages), split


def decoder_flops(vae: SSDDAutoencoder, z: torch.Tensor, size: tuple[int, int]) -> float:
    """FLOPs of one decoder call on a (B, 3, *size) input with latents z."""
    x = torch.zeros(z.shape[0], 3, *size)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        vae.decoder(x, torch.ones(z.shape[0]), z)
    return float(counter.get_total_flops())


def speed_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    vae = SSDDAutoencoder.from_preset("f8c4", decoder=args.decoder).eval()
    f = vae.spatial_compression_ratio
    res = args.resolution
    z = torch.randn(args.batch, vae.config.latent_channels, res // f, res // f)
    noise = torch.randn(args.batch, 3, res, res, generator=torch.Generator().manual_seed(1))

    contenders: list[tuple[str, int, tuple[int, ...]]] = [(f"full-{args.steps}", 1, (args.steps,))]
    for k in args.stages:
        contenders.append((f"ms{k}-{args.steps}-default", k, default_stage_steps(args.steps, k)))
    for k, split in args.split or []:
        if sum(split) != args.steps:
            raise SystemExit(f"--split {k}:{split} does not sum to --steps {args.steps}")
        contenders.append((f"ms{k}-{args.steps}-" + "-".join(map(str, split)), k, split))

    flops_per_size: dict[tuple[int, int], float] = {}
    for _, k, _split in contenders:
        for size in stage_resolutions(res, res, k):
            if size not in flops_per_size:
                flops_per_size[size] = decoder_flops(vae, z, size)

    def run(k: int, split: tuple[int, ...], steps: int | None = None) -> torch.Tensor:
        vae.register_to_config(multiscale_steps=split if k > 1 else None)
        return vae.decode(z, noise=noise, num_inference_steps=steps or sum(split), multiscale_stages=k).sample

    results: dict[str, dict[str, Any]] = {}
    with torch.inference_mode():
        for name, k, split in contenders:  # warm-up: one step per stage touches every stage size
            run(k, (1,) * k)
            results[name] = {"stages": k, "split": list(split), "times_s": [], "cpu_times_s": []}
        for _ in range(args.repeats):
            for name, k, split in contenders:
                start, cpu_start = time.perf_counter(), time.process_time()
                run(k, split)
                results[name]["times_s"].append(time.perf_counter() - start)
                results[name]["cpu_times_s"].append(time.process_time() - cpu_start)
                print(
                    f"  {name}: wall {results[name]['times_s'][-1]:.2f} s, "
                    f"CPU {results[name]['cpu_times_s'][-1]:.2f} s",
                    flush=True,
                )
    full = contenders[0][0]
    full_median = statistics.median(results[full]["times_s"])
    full_cpu = statistics.median(results[full]["cpu_times_s"])
    full_flops = args.steps * flops_per_size[(res, res)]
    for name, k, split in contenders:
        r = results[name]
        r["median_s"] = statistics.median(r["times_s"])
        r["speedup"] = full_median / r["median_s"]
        r["median_cpu_s"] = statistics.median(r["cpu_times_s"])
        r["cpu_speedup"] = full_cpu / r["median_cpu_s"]
        sizes = stage_resolutions(res, res, k)
        r["gflops"] = sum(n * flops_per_size[s] for n, s in zip(split, sizes)) / 1e9
        r["flop_speedup"] = full_flops / 1e9 / r["gflops"]
    return {
        "decoder": args.decoder,
        "resolution": res,
        "batch": args.batch,
        "steps": args.steps,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "decoder_gflops_per_call": {f"{s[0]}x{s[1]}": v / 1e9 for s, v in sorted(flops_per_size.items())},
        "contenders": results,
    }


# ------------------------------------------------------------------------------------------------
# Quality
# ------------------------------------------------------------------------------------------------
def load_photos(folder: str | None, resolution: int, limit: int) -> torch.Tensor:
    """(N, 3, R, R) photos in [-1, 1], resized (shorter side) and centre-cropped to R: a folder's images,
    or the photos bundled with scikit-image."""
    from ssdd_diffusers.data import EvalTransform, decode_image, find_images, sample_photos

    images = (
        [decode_image(p) for p in find_images(folder)[:limit]] if folder else sample_photos("all")[:limit]
    )
    transform = EvalTransform(resolution)
    return torch.stack([transform(image) for image in images])


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean PSNR (dB) of images in [-1, 1] after clamping and 8-bit quantisation."""
    return float(psnr(to_uint8(b), to_uint8(a)).clamp(max=100).mean())


def quality_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    model = SSDDAutoencoder.from_pretrained(args.model).eval()
    teacher = SSDDAutoencoder.from_pretrained(args.teacher or args.model).eval()
    images = load_photos(args.images, args.resolution, args.num_images)
    lpips = None
    try:
        from ssdd_diffusers.evaluation.metrics import LPIPSMetric

        lpips = LPIPSMetric("pretrained").eval()
    except Exception as error:  # no offline AlexNet weights: report PSNR only
        print(f"LPIPS unavailable ({type(error).__name__}: {error}); reporting PSNR only")

    def lpips_value(a: torch.Tensor, b: torch.Tensor) -> float | None:
        if lpips is None:
            return None
        qa = ((a.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        qb = ((b.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return float(lpips(qa, qb).mean())

    out: dict[str, Any] = {"model": args.model, "teacher": args.teacher or args.model, "images": len(images)}
    with torch.inference_mode():
        z_t = teacher.encode(images).latent_dist.mode()
        z_m = model.encode(images).latent_dist.mode()
        noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
        full = teacher.decode(z_t, noise=noise, num_inference_steps=args.steps, multiscale_stages=1).sample
        out[f"full-{args.steps}"] = {"psnr_gt": _psnr(full, images), "lpips_gt": lpips_value(full, images)}
        for k in args.stages:
            ms = model.decode(z_m, noise=noise, num_inference_steps=args.steps, multiscale_stages=k).sample
            out[f"ms{k}-{args.steps}"] = {
                "split": list(default_stage_steps(args.steps, k)),
                "psnr_vs_full": _psnr(ms, full),
                "lpips_vs_full": lpips_value(ms, full),
                "psnr_gt": _psnr(ms, images),
                "lpips_gt": lpips_value(ms, images),
            }
    return out


# ------------------------------------------------------------------------------------------------
def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def to_markdown(report: dict[str, Any]) -> str:
    lines = []
    speed = report.get("speed")
    if speed:
        lines += [
            f"Decoder {speed['decoder']}, {speed['resolution']} px, batch {speed['batch']}, "
            f"{speed['steps']} steps, CPU threads {speed['threads']}, median of {speed['repeats']} "
            "interleaved rounds.",
            "",
            "| sampler | stages | steps per stage | median wall s | wall speed-up | median CPU s "
            "| CPU-time speed-up | GFLOP | FLOP speed-up |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, r in speed["contenders"].items():
            lines.append(
                f"| {name} | {r['stages']} | {'/'.join(map(str, r['split']))} | {r['median_s']:.2f} | "
                f"{r['speedup']:.2f}x | {r['median_cpu_s']:.2f} | {r['cpu_speedup']:.2f}x | "
                f"{r['gflops']:.0f} | {r['flop_speedup']:.2f}x |"
            )
    quality = report.get("quality")
    if quality:
        lines += ["", f"Quality on {quality['images']} held-out photos:", ""]
        lines += ["| decode | PSNR vs full-res teacher | LPIPS vs teacher | PSNR vs GT | LPIPS vs GT |"]
        lines += ["|---|---|---|---|---|"]
        for name, r in quality.items():
            if isinstance(r, dict):
                cells = [_fmt(r.get(key)) for key in ("psnr_vs_full", "lpips_vs_full", "psnr_gt", "lpips_gt")]
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--decoder", default="S")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--stages", type=int, nargs="+", default=[3, 4])
    parser.add_argument("--split", type=parse_split, action="append", help="extra split, e.g. 3:5,4,3")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--model", default=None, help="trained multi-scale model folder (quality)")
    parser.add_argument("--teacher", default=None, help="full-resolution model folder (default --model)")
    parser.add_argument("--images", default=None, help="folder of held-out photos (default: skimage's)")
    parser.add_argument("--num-images", type=int, default=5)
    parser.add_argument("--json", default=None)
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for k in args.stages:
        MultiScaleLayout(k).stage_resolutions(args.resolution, args.resolution)

    report: dict[str, Any] = {"platform": platform.platform(), "torch": torch.__version__}
    if not args.skip_speed:
        report["speed"] = speed_benchmark(args)
    if args.model:
        report["quality"] = quality_benchmark(args)
    text = to_markdown(report)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(text)
    return report


if __name__ == "__main__":
    main()
