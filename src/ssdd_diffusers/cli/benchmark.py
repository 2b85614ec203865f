"""Decode (and encode) speed and memory: SSDD presets against diffusers' AutoencoderKL, AutoencoderTiny,
AutoencoderDC and ConsistencyDecoderVAE (:mod:`.contenders`), in one process, interleaved and repeated.

Timing: every contender is built once; for each (resolution, batch) all contenders see the same latents;
after ``--warmup`` untimed runs each, ``--repeats`` rounds are run in which every contender decodes once
(round-robin, so load changes on a shared machine hit all contenders alike); the median is reported.

A contender that fails (to build, decode, count FLOPs or measure memory) is recorded with its error message
(``"error"``, ``"flops_error"``, ``"memory_error"`` in its row) and the others still run; an unknown
contender name is a usage error, reported before anything runs.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` around one decode (weights excluded). On CPU,
one fresh child process per (contender, resolution, batch): it builds the model, runs one decode, resets
the kernel's resident-set high-water mark (``/proc/self/clear_refs``), runs a second decode and reports
VmHWM - VmRSS(before), i.e. the extra resident memory of one decode over the loaded model ("peak RSS
delta"). The weight bytes are reported separately.

Example (``ssdd-diffusers benchmark`` and ``python benchmarks/decode_benchmark.py`` take the same flags)::

    ssdd-diffusers benchmark --resolutions 256 512 1024 \
        --contenders ssdd-S-1 ssdd-B-1 ssdd-M-1 ssdd-S-12 kl consistency \
        --json benchmarks/results/decode_cpu.json --markdown benchmarks/results/decode_cpu.md

Contender names: ``ssdd-{XS,S,B,M,L,XL,H}-{steps}`` (suffix ``-tiled`` decodes in 256 px tiles, ``-fused``
uses the Triton norm kernels, ``decoder.fused_norm_kernels``, eager CUDA only, ``-cl`` forces the decoder
trunk into channels_last with the PyTorch norms, ``-nchw`` into NCHW with the PyTorch norms; without them the
decoder's defaults apply),
``kl`` (AutoencoderKL, SD-VAE configuration), ``kl-tiled``, ``tiny`` (AutoencoderTiny, the TAESD
configuration), ``dc`` (AutoencoderDC, its default f32c32 configuration, decoding 32-channel latents at
1/32 resolution), ``consistency`` (ConsistencyDecoderVAE, default configuration, its default 2 steps; very
slow on CPU: by default timed once, at 256 px only).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..evaluation.memory import PeakMemoryMeter
from ..torch_utils import DTYPES, synchronize
from .contenders import (
    DEFAULT_TILE_OVERLAP,
    DEFAULT_TILE_SIZE,
    SLOW_CONTENDERS,
    Contender,
    build_contender,
    check_contender_name,
)

MEMORY_METHODS = {
    "cuda_peak_allocated": "torch.cuda.max_memory_allocated - allocated before one decode",
    "cpu_peak_rss_delta": "peak RSS delta of one decode in a fresh child process (VmHWM - VmRSS before)",
}
"""How peak memory is measured, by :class:`~ssdd_diffusers.evaluation.memory.PeakMemoryMeter` kind."""

__all__ = [
    "build_parser",
    "gflop_count",
    "main",
    "matmul_gflops",
    "measure_memory_here",
    "memory_in_child",
    "memory_report",
    "parse_args",
    "run_benchmark",
    "timed",
    "to_markdown",
]

ERROR_CHARS = 500
"""Characters of an error message kept in a report row."""


def error_message(error: BaseException) -> str:
    """``"Type: message"`` of an exception (truncated), for a report row; the traceback goes to stderr."""
    traceback.print_exception(error, file=sys.stderr)
    text = f"{type(error).__name__}: {error}".strip()
    return text if len(text) <= ERROR_CHARS else text[: ERROR_CHARS - 3] + "..."


def _free_device_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _record_failure(
    failed: dict[str, str],
    active: list[str],
    name: str,
    error: BaseException,
    where: str,
    device: torch.device,
) -> None:
    """Record ``name``'s error in ``failed`` and drop it from ``active`` (the contenders still timed)."""
    failed[name] = error_message(error)
    active.remove(name)
    print(f"{name} {where} failed: {failed[name]}", file=sys.stderr, flush=True)
    _free_device_memory(device)


# ------------------------------------------------------------------------------------------------
# Measurement helpers
# ------------------------------------------------------------------------------------------------


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall-clock seconds of one call (device synchronised)."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def measure_memory_here(
    contender: Contender, z: torch.Tensor, device: torch.device, what: str, warmup: bool = True
) -> dict:
    """Peak extra memory of one decode (or encode) over the loaded model, in MiB."""
    x = None
    if what == "encode":
        x = torch.randn(z.shape[0], 3, z.shape[-2] * 8, z.shape[-1] * 8, device=z.device, dtype=z.dtype)
    run = (lambda: contender.decode(z)) if what == "decode" else (lambda: contender.encode(x))
    weights = sum(p.numel() * p.element_size() for p in contender.model.parameters()) / 2**20
    meter = PeakMemoryMeter(device)
    with torch.no_grad():
        if warmup:
            run()  # warm-up (allocator caches, oneDNN primitives, compile)
        gc.collect()
        meter.set_baseline()  # the loaded model: the peak is what one call adds
        meter.start()
        run()
        meter.stop()
    method = MEMORY_METHODS.get(meter.kind, "not measured")
    peak = meter.peak_mb
    return {
        "peak_mib": None if peak is None else round(peak, 1),
        "weights_mib": round(weights, 1),
        "memory_method": method,
    }


def memory_in_child(args: argparse.Namespace, name: str, resolution: int, batch: int, what: str) -> dict:
    """Run ``measure_memory_here`` in a fresh interpreter (CPU) so earlier runs cannot hide the peak."""
    cmd = [
        sys.executable,
        "-m",
        "ssdd_diffusers.cli.benchmark",
        "--child-memory",
        name,
        str(resolution),
        str(batch),
        what,
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--threads",
        str(args.threads),
        "--memory-warmup",
        str(args.memory_warmup),
        "--tile-size",
        str(args.tile_size),
        "--tile-overlap",
        str(args.tile_overlap),
    ]
    if args.channels_last:
        cmd.append("--channels-last")
    if args.compile:
        cmd += ["--compile", "--compile-mode", args.compile_mode] + (["--freezing"] if args.freezing else [])
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.memory_timeout)
    except subprocess.TimeoutExpired:
        return {"peak_mib": None, "memory_error": f"timeout after {args.memory_timeout}s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"peak_mib": None, "memory_error": (proc.stderr or proc.stdout)[-500:]}


def gflop_count(contender: Contender, z: torch.Tensor) -> float | None:
    """FLOPs (in GFLOP) of one decoder-network forward on ``z``, by torch.utils.flop_counter."""
    if contender.flops_fn is None:
        return None
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        contender.flops_fn(z)
    return counter.get_total_flops() / 1e9


def matmul_gflops(device: torch.device, dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> dict:
    """Achieved GFLOP/s of a large square matmul: the machine's practical dense-compute ceiling."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    times = [timed(lambda: a @ b, device) for _ in range(repeats)]
    best, median = min(times), statistics.median(times)
    flops = 2 * size**3
    return {
        "size": size,
        "best_gflops": round(flops / best / 1e9, 1),
        "median_gflops": round(flops / median / 1e9, 1),
    }


# ------------------------------------------------------------------------------------------------
# Main benchmark
# ------------------------------------------------------------------------------------------------


def _command_line(args: argparse.Namespace) -> str:
    """The command recorded in the report: ``args.command_line`` or this process's ``sys.argv``."""
    recorded = getattr(args, "command_line", None)
    if recorded:
        return recorded
    return " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])


def run_benchmark(args: argparse.Namespace) -> dict:
    """Time (and measure the memory of) every contender; returns ``{"meta": ..., "results": [...]}``.

    An unknown contender name raises ``ValueError`` first. A contender that fails to build, or to decode at
    one (resolution, batch), gets a row with ``"error"`` there and the others go on."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    compile_mode = args.compile_mode if args.compile else None
    names = [c for c in args.contenders if not (args.skip_slow and c in SLOW_CONTENDERS)]
    for name in names:
        check_contender_name(name)
    contenders = {}
    build_errors: dict[str, str] = {}
    for name in names:
        t0 = time.perf_counter()
        try:
            contenders[name] = build_contender(
                name, device, dtype, args.channels_last, compile_mode, args.tile_size, args.tile_overlap
            )
        except Exception as error:  # noqa: BLE001 - recorded in the report, the others still run
            build_errors[name] = error_message(error)
            print(f"failed to build {name}: {build_errors[name]}", file=sys.stderr, flush=True)
            _free_device_memory(device)
            continue
        print(f"built {name} in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)

    results: list[dict] = []
    for resolution in args.resolutions:
        for batch in args.batch_sizes:
            failed = dict(build_errors)  # name -> error at this (resolution, batch)
            zs = {}
            for n in contenders:
                try:
                    zs[n] = contenders[n].latents(batch, resolution, device, dtype, args.channels_last)
                except Exception as error:  # noqa: BLE001
                    failed[n] = error_message(error)
            gen = torch.Generator().manual_seed(resolution * 1000 + batch + 1)
            x = torch.randn(batch, 3, resolution, resolution, generator=gen).to(device=device, dtype=dtype)
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            in_size = [n for n in names if n not in SLOW_CONTENDERS or resolution in args.slow_resolutions]
            active = [n for n in in_size if n not in failed]
            times: dict[str, list[float]] = {n: [] for n in active}
            enc_times: dict[str, list[float]] = {n: [] for n in active}
            warm_s: dict[str, float] = {}
            where = f"{resolution}px b{batch}"
            with torch.no_grad():
                for name in list(active):  # warm-up (includes compilation with --compile)
                    c = contenders[name]
                    try:
                        warm = [
                            timed(lambda c=c, z=zs[name]: c.decode(z), device)
                            for _ in range(args.slow_warmup if name in SLOW_CONTENDERS else args.warmup)
                        ]
                        warm_s[name] = round(sum(warm), 3)
                        if args.encode and c.encode is not None and name not in SLOW_CONTENDERS:
                            for _ in range(args.warmup):
                                timed(lambda c=c, x=x: c.encode(x), device)
                    except Exception as error:  # noqa: BLE001 - recorded, the others still run
                        _record_failure(failed, active, name, error, where, device)
                for r in range(args.repeats):
                    for name in list(active):
                        if name in SLOW_CONTENDERS and r >= args.slow_repeats:
                            continue
                        c = contenders[name]
                        try:
                            times[name].append(timed(lambda c=c, z=zs[name]: c.decode(z), device))
                            if args.encode and c.encode is not None and name not in SLOW_CONTENDERS:
                                enc_times[name].append(timed(lambda c=c, x=x: c.encode(x), device))
                        except Exception as error:  # noqa: BLE001
                            _record_failure(failed, active, name, error, where, device)
                    print(
                        f"{resolution}px b{batch} round {r + 1}/{args.repeats}: "
                        + ", ".join(f"{n}={times[n][-1]:.3f}s" for n in active if len(times[n]) > r),
                        file=sys.stderr,
                        flush=True,
                    )
            for name in in_size:
                if name in failed:
                    notes = contenders[name].notes if name in contenders else ""
                    error_row = {"contender": name, "resolution": resolution, "batch": batch, "notes": notes}
                    results.append({**error_row, "error": failed[name]})
                    continue
                c = contenders[name]
                med = statistics.median(times[name])
                row: dict[str, Any] = {
                    "contender": name,
                    "resolution": resolution,
                    "batch": batch,
                    "notes": c.notes,
                    "decoder_params_m": round(c.decoder_params / 1e6, 2),
                    "decode_s_median": round(med, 4),
                    "decode_s_all": [round(t, 4) for t in times[name]],
                    "images_per_s": round(batch / med, 5),
                    "us_per_pixel": round(med / (batch * resolution * resolution) * 1e6, 4),
                    "warmup_s": warm_s.get(name),
                }
                if enc_times[name]:
                    row["encode_s_median"] = round(statistics.median(enc_times[name]), 4)
                if args.flops and name not in SLOW_CONTENDERS:
                    try:
                        gf = gflop_count(c, zs[name])
                    except Exception as error:  # noqa: BLE001
                        gf, row["flops_error"] = None, error_message(error)
                    steps = c.extra.get("steps", 1)
                    if gf is not None:
                        row["decoder_gflop_per_image"] = round(gf / batch, 2)
                        row["achieved_gflops"] = round(gf * steps / med, 1)
                results.append(row)
            if args.memory and not args.child_memory:
                for name in active:
                    if name in SLOW_CONTENDERS and not args.slow_memory:
                        continue
                    row = next(
                        r
                        for r in results
                        if r["contender"] == name and r["resolution"] == resolution and r["batch"] == batch
                    )
                    try:
                        if device.type == "cuda":
                            row.update(measure_memory_here(contenders[name], zs[name], device, "decode"))
                        else:
                            row.update(memory_in_child(args, name, resolution, batch, "decode"))
                    except Exception as error:  # noqa: BLE001
                        row.update(peak_mib=None, memory_error=error_message(error))
                        _free_device_memory(device)
                    print(
                        f"memory {name} {resolution}px: {row.get('peak_mib')} MiB",
                        file=sys.stderr,
                        flush=True,
                    )
            # ratios to AutoencoderKL in the same run
            kl = next(
                (
                    r
                    for r in results
                    if r["contender"] == "kl" and r["resolution"] == resolution and r["batch"] == batch
                ),
                None,
            )
            if kl is not None and "error" not in kl:
                for r in results:
                    if r["resolution"] == resolution and r["batch"] == batch and "error" not in r:
                        r["speed_vs_kl"] = round(
                            kl["decode_s_median"] / r["decode_s_median"], 3
                        )  # same batch
                        if r.get("peak_mib") is not None and kl.get("peak_mib"):
                            r["memory_vs_kl"] = round(r["peak_mib"] / kl["peak_mib"], 3)

    meta = {
        "command": _command_line(args),
        "torch": torch.__version__,
        "device": args.device,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "compile": compile_mode,
        "inductor_freezing": bool(args.compile and args.freezing),
        "channels_last": args.channels_last,
        "reuse_cpu_memory": args.reuse_cpu_memory,
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "loadavg_start": os.getloadavg(),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "timing": "median wall time of decode(z).sample under torch.no_grad, contenders interleaved",
        "memory_method": MEMORY_METHODS[
            "cuda_peak_allocated" if device.type == "cuda" else "cpu_peak_rss_delta"
        ],
    }
    try:
        import diffusers

        meta["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    if args.flops:
        try:
            meta["matmul"] = matmul_gflops(device, dtype)
        except Exception as error:  # noqa: BLE001
            meta["matmul_error"] = error_message(error)
    meta["loadavg_end"] = os.getloadavg()
    return {"meta": meta, "results": results}


def memory_report(args: argparse.Namespace) -> dict:
    """Peak memory only (one child process per contender and resolution, batch = first batch size)."""
    rows = []
    for resolution in args.resolutions:
        for name in args.contenders:
            row = {"contender": name, "resolution": resolution, "batch": args.batch_sizes[0]}
            row.update(memory_in_child(args, name, resolution, args.batch_sizes[0], "decode"))
            print(f"memory {name} {resolution}px: {row.get('peak_mib')} MiB", file=sys.stderr, flush=True)
            rows.append(row)
    meta = {
        "command": _command_line(args),
        "torch": torch.__version__,
        "device": args.device,
        "dtype": args.dtype,
        "memory_method": MEMORY_METHODS[
            "cpu_peak_rss_delta" if args.device == "cpu" else "cuda_peak_allocated"
        ],
    }
    return {"meta": meta, "results": rows}


def to_markdown(report: dict) -> str:
    """Per-resolution tables with ratios to AutoencoderKL."""
    meta, rows = report["meta"], report["results"]
    lines = [
        f"torch {meta['torch']}, {meta['device']} ({meta['threads']} threads), {meta['dtype']}, "
        f"compile={meta['compile']}"
        + (" (inductor freezing)" if meta.get("inductor_freezing") else "")
        + f", channels_last={meta['channels_last']}, "
        + ("freed CPU memory reused, " if meta.get("reuse_cpu_memory") else "")
        + f"median of {meta['repeats']} interleaved runs (load {meta['loadavg_start'][0]:.1f} -> "
        f"{meta['loadavg_end'][0]:.1f}). Memory: {meta['memory_method']}.",
        "",
    ]
    has_mem = any(r.get("peak_mib") is not None for r in rows)
    has_enc = any("encode_s_median" in r for r in rows)
    has_flops = any("decoder_gflop_per_image" in r for r in rows)
    header = ["res", "batch", "contender", "decoder params (M)", "decode ms", "images/s", "x KL"]
    if has_enc:
        header.append("encode ms")
    if has_mem:
        header += ["peak MiB", "mem x KL"]
    if has_flops:
        header += ["GFLOP/img/step", "GFLOP/s"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        if "error" in r:
            error = r["error"].replace("|", "/").replace("\n", " ")
            cells = [str(r["resolution"]), str(r["batch"]), r["contender"], f"error: {error}"]
            lines.append("| " + " | ".join(cells + ["-"] * (len(header) - len(cells))) + " |")
            continue
        cells = [
            str(r["resolution"]),
            str(r["batch"]),
            r["contender"],
            f"{r['decoder_params_m']:.1f}",
            f"{r['decode_s_median'] * 1000:.0f}",
            f"{r['images_per_s']:.2f}",
            f"{r['speed_vs_kl']:.2f}" if "speed_vs_kl" in r else "-",
        ]
        if has_enc:
            cells.append(f"{r['encode_s_median'] * 1000:.0f}" if "encode_s_median" in r else "-")
        if has_mem:
            cells.append(f"{r['peak_mib']:.0f}" if r.get("peak_mib") is not None else "-")
            cells.append(f"{r['memory_vs_kl']:.2f}" if "memory_vs_kl" in r else "-")
        if has_flops:
            cells.append(f"{r['decoder_gflop_per_image']:.1f}" if "decoder_gflop_per_image" in r else "-")
            cells.append(f"{r['achieved_gflops']:.0f}" if "achieved_gflops" in r else "-")
        lines.append("| " + " | ".join(cells) + " |")
    if "matmul" in meta:
        m = meta["matmul"]
        lines += [
            "",
            f"Large fp32 matmul ({m['size']}x{m['size']}) on the same machine: best "
            f"{m['best_gflops']} GFLOP/s, median {m['median_gflops']} GFLOP/s.",
        ]
    return "\n".join(lines) + "\n"


EXAMPLE = (
    "example:\n  ssdd-diffusers benchmark --resolutions 256 512 --contenders ssdd-S-1 ssdd-M-1 kl \\\n"
    "      --skip-slow --json decode_cpu.json --markdown decode_cpu.md"
)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """Parser of the decode benchmark (``benchmarks/decode_benchmark.py`` / ``ssdd-diffusers benchmark``)."""
    p = argparse.ArgumentParser(
        prog=prog,
        description=__doc__.split("\n\n")[0],
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--resolutions", type=int, nargs="+", default=[256, 512, 1024], help="Image sizes (px, square)."
    )
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1], help="Batch sizes to time.")
    p.add_argument(
        "--contenders",
        nargs="+",
        default=["ssdd-S-1", "ssdd-B-1", "ssdd-M-1", "ssdd-S-12", "kl", "consistency"],
        help="ssdd-{XS,S,B,M,L,XL,H}-{steps}[-tiled][-fused][-cl|-nchw], kl, kl-tiled, "
        "tiny (AutoencoderTiny), dc (AutoencoderDC f32c32), consistency.",
    )
    p.add_argument("--repeats", type=int, default=5, help="Timed interleaved rounds (median reported).")
    p.add_argument("--warmup", type=int, default=1, help="Untimed decodes per contender first.")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="Weights and latents dtype.")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch default)")
    p.add_argument(
        "--compile", action="store_true", help="torch.compile the decoder network of every contender"
    )
    p.add_argument(
        "--compile-mode", default="default", help="torch.compile mode (default, max-autotune, ...)"
    )
    p.add_argument(
        "--freezing",
        action="store_true",
        help="with --compile: torch._inductor.config.freezing = True (constant-folds weights; on CPU "
        "prepacks oneDNN convolution weights)",
    )
    p.add_argument("--channels-last", action="store_true", help="channels_last weights and inputs")
    p.add_argument(
        "--reuse-cpu-memory",
        action="store_true",
        help="time every contender inside ssdd_diffusers.cli.cpu_memory.reuse_freed_memory() (glibc keeps "
        "freed memory instead of re-faulting fresh pages for each large tensor)",
    )
    p.add_argument("--encode", action="store_true", help="also time encode(x) (not for slow contenders)")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip peak-memory measurement")
    p.add_argument("--memory-timeout", type=float, default=300.0, help="seconds per memory child process")
    p.add_argument(
        "--tile-size", type=int, default=DEFAULT_TILE_SIZE, help="tile size (px) of *-tiled contenders"
    )
    p.add_argument("--tile-overlap", type=float, default=DEFAULT_TILE_OVERLAP, help="tile overlap factor")
    p.add_argument("--memory-warmup", type=int, default=1, help="untimed decodes before the memory run")
    p.add_argument("--memory-only", action="store_true", help="skip timing; peak memory only")
    p.add_argument(
        "--flops", action="store_true", help="FLOP count per decoder forward + large-matmul GFLOP/s"
    )
    p.add_argument("--skip-slow", action="store_true", help="drop ConsistencyDecoderVAE")
    p.add_argument(
        "--slow-resolutions", type=int, nargs="+", default=[256], help="resolutions of slow contenders"
    )
    p.add_argument("--slow-repeats", type=int, default=1, help="timed rounds of slow contenders")
    p.add_argument("--slow-warmup", type=int, default=0, help="untimed decodes of slow contenders")
    p.add_argument("--slow-memory", action="store_true", help="also measure memory of slow contenders")
    p.add_argument(
        "--quick", action="store_true", help="256 px only, 3 repeats, no slow contenders, no memory"
    )
    p.add_argument("--json", type=Path, help="write the report as JSON here")
    p.add_argument("--markdown", type=Path, help="write the Markdown table here")
    p.add_argument(
        "--child-memory", nargs=4, metavar=("NAME", "RES", "BATCH", "WHAT"), help=argparse.SUPPRESS
    )
    return p


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    """Parse the flags (``--quick`` expands to its settings)."""
    args = build_parser(prog).parse_args(argv)
    if args.quick:
        args.resolutions, args.repeats, args.skip_slow, args.memory = [256], 3, True, False
    args.command_line = None if argv is None else " ".join([prog or "decode_benchmark", *argv])
    return args


def main(argv: list[str] | None = None, prog: str | None = None) -> dict:
    """Run the benchmark (or one memory child); print the table, write ``--json`` / ``--markdown``.

    Returns the report (``{"meta", "results"}``; the child's measurement with ``--child-memory``).
    """
    args = parse_args(argv, prog)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compile and args.freezing:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
    if args.child_memory:
        name, res, batch, what = args.child_memory
        device, dtype = torch.device(args.device), DTYPES[args.dtype]
        compile_mode = args.compile_mode if args.compile else None
        c = build_contender(
            name, device, dtype, args.channels_last, compile_mode, args.tile_size, args.tile_overlap
        )
        z = c.latents(int(batch), int(res), device, dtype, args.channels_last)
        measured = measure_memory_here(c, z, device, what, warmup=args.memory_warmup > 0)
        print(json.dumps(measured))
        return measured
    if args.memory_only:
        report = memory_report(args)
        text = "| res | contender | peak MiB | weights MiB |\n|---|---|---|---|\n" + "".join(
            f"| {r['resolution']} | {r['contender']} | {r.get('peak_mib')} | {r.get('weights_mib')} |\n"
            for r in report["results"]
        )
        text = f"Peak memory, {report['meta']['memory_method']}.\n\n" + text
    else:
        from .cpu_memory import reuse_freed_memory

        with reuse_freed_memory(args.reuse_cpu_memory):
            report = run_benchmark(args)
        text = to_markdown(report)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text)
    return report


if __name__ == "__main__":
    main()
