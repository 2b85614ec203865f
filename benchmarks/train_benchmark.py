"""Training throughput of the training loop itself: images per second and peak memory of
:func:`ssdd_diffusers.training.trainer.main` (``training/train_ssdd.py``).

Each (decoder, resolution, batch) case runs the loop on a fresh model with a frozen encoder and random
crops of the photos bundled with scikit-image, for ``--warmup + --repeats`` optimisation steps, on the
device accelerate picks (CUDA when there is one; ``--device cpu`` forces the CPU) with
``--mixed-precision`` (accelerate's autocast: ``bf16`` on GPUs). Decoders:

- an SSDD preset (``S``, ``B``, ...): the flow-matching loss alone (LPIPS and REPA add fixed-cost side
  networks that need downloaded weights);
- ``kl``: the deterministic baseline, a diffusers ``AutoencoderKL`` decoder (``--decoder_type kl``, L1
  reconstruction loss), as the fidelity benchmark trains it. It needs an AutoencoderKL encoder:
  ``--encoder sd-vae``.

``--encoder f8c4`` gives every SSDD case a fresh SSDD f8c4 encoder; ``--encoder sd-vae`` gives every case
(SSDD and ``kl``) the same frozen random-weight AutoencoderKL encoder in the Stable Diffusion VAE
configuration, so the cases differ only in the decoder.

Reported per case, over the steps after the warm-up: the median wall time per optimisation step (one step
to the next: waiting for data, encoder forward, decoder forward and backward, gradient clipping, optimiser,
EMA update and the loss read-back that synchronises the GPU), images/s from it, the median of the loop's
own compute timer (launch time on CUDA, where kernels run asynchronously; compute time on the CPU) and, on
CUDA, the peak ``torch.cuda.max_memory_allocated`` of the run (weights, optimiser and EMA state included).
A case that fails is recorded with its error message and the others still run.

Examples::

    python benchmarks/train_benchmark.py --resolutions 128 256 --batch-sizes 1 \
        --json benchmarks/results/train_cpu.json --markdown benchmarks/results/train_cpu.md
    python benchmarks/train_benchmark.py --decoders S kl --encoder sd-vae --resolutions 256 \
        --batch-sizes 32 --mixed-precision bf16 --dataloader-workers 8 --json train_gpu.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

import torch

from ssdd_diffusers.training.arguments import parse_args as parse_training_args
from ssdd_diffusers.training.trainer import main as run_training


def save_sd_vae_encoder(folder: Path) -> Path:
    """A random-weight AutoencoderKL in the Stable Diffusion VAE configuration, saved to ``folder`` (the
    frozen ``--pretrained_encoder`` of every case with ``--encoder sd-vae``)."""
    from diffusers import AutoencoderKL

    from ssdd_diffusers.cli.contenders import SD_VAE_CONFIG

    torch.manual_seed(0)
    AutoencoderKL(**SD_VAE_CONFIG).save_pretrained(folder)
    return folder


def training_argv(
    args: argparse.Namespace, decoder: str, resolution: int, batch: int, encoder_dir: Path | None
) -> list[str]:
    """The ``train_ssdd.py`` flags of one case."""
    argv = [
        "--sample_photos", "all",
        "--crops_per_image", "16",
        "--resolution", str(resolution),
        "--train_batch_size", str(batch),
        "--max_train_steps", str(args.warmup + args.repeats),
        "--lpips_weight", "0",
        "--optimizer", args.optimizer,
        "--lr_warmup_steps", "0",
        "--mixed_precision", args.mixed_precision,
        "--dataloader_num_workers", str(args.dataloader_workers),
        "--report_to", "none",
        "--validation_steps", "0",
        "--num_validation_images", "0",
        "--checkpointing_steps", "0",
        "--no_progress",
    ]  # fmt: skip
    if decoder == "kl":
        argv += ["--decoder_type", "kl", "--recon_weight", "1", "--repa_weight", "0"]
    else:
        argv += ["--decoder", decoder, "--repa_weight", "0"]
    if encoder_dir is not None:
        argv += ["--pretrained_encoder", str(encoder_dir)]
    else:
        argv += ["--encoder", "f8c4"]
    if args.gradient_checkpointing:
        argv.append("--gradient_checkpointing")
    return argv


def run_case(
    args: argparse.Namespace, decoder: str, resolution: int, batch: int, encoder_dir: Path | None
) -> dict[str, Any]:
    """One case: the loop's per-step times after the warm-up, and the peak CUDA memory."""
    cuda = args.device != "cpu" and torch.cuda.is_available()
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        allocated_before = torch.cuda.memory_allocated()
    with tempfile.TemporaryDirectory() as output_dir:
        argv = training_argv(args, decoder, resolution, batch, encoder_dir) + ["--output_dir", output_dir]
        result = run_training(parse_training_args(argv))
    history = result["loss_history"][args.warmup :]
    if not history:
        raise RuntimeError(f"the loop ran {result['global_step']} steps, fewer than --warmup + 1")
    wall = [batch / entry["images_per_s"] for entry in history]  # one step to the next, synchronised
    median = statistics.median(wall)
    row: dict[str, Any] = {
        "step_s_median": round(median, 4),
        "step_s_all": [round(t, 4) for t in wall],
        "images_per_s": round(batch / median, 3),
        "compute_s_median": round(statistics.median(e["step_seconds"] for e in history), 4),
        "peak_gib": None,
    }
    if cuda:
        peak = torch.cuda.max_memory_allocated() - allocated_before
        row["peak_gib"] = round(peak / 2**30, 2)
    return row


def to_markdown(report: dict[str, Any]) -> str:
    """One table row per case (errors included)."""
    meta = report["meta"]
    lines = [
        f"Training-loop steps ({meta['optimizer']}, EMA) on {meta['device']}, mixed precision "
        f"{meta['mixed_precision']}, encoder {meta['encoder']} (frozen), torch {meta['torch']}, "
        f"{meta['threads']} threads, median of {meta['repeats']} steps after {meta['warmup']} warm-up; "
        f"step = wall time from one step to the next (data wait, forward, backward, optimiser, EMA).",
        "",
        "| decoder | res | batch | step s | images/s | peak GiB |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        head = f"| {r['decoder']} | {r['resolution']} | {r['batch']} |"
        if "error" in r:
            error = r["error"].replace("|", "/").replace("\n", " ")
            lines.append(f"{head} error: {error} | - | - |")
            continue
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        lines.append(f"{head} {r['step_s_median']:.3f} | {r['images_per_s']:.2f} | {peak} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--decoders",
        "--preset",
        dest="decoders",
        nargs="+",
        default=["S"],
        help="SSDD decoder presets (S, B, ...) and/or kl (the AutoencoderKL decoder; needs --encoder sd-vae)",
    )
    p.add_argument(
        "--encoder",
        choices=["f8c4", "sd-vae"],
        default="f8c4",
        help="frozen encoder: a fresh SSDD f8c4 encoder, or one random-weight SD-VAE AutoencoderKL encoder "
        "shared by every case",
    )
    p.add_argument("--resolutions", type=int, nargs="+", default=[128, 256])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1])
    p.add_argument("--repeats", type=int, default=3, help="Timed steps per case (median reported).")
    p.add_argument("--warmup", type=int, default=1, help="Untimed first steps per case.")
    p.add_argument("--optimizer", default="radam_schedulefree", choices=["radam_schedulefree", "adamw"])
    p.add_argument(
        "--mixed-precision", default="no", choices=["no", "fp16", "bf16"], help="accelerate's autocast"
    )
    p.add_argument("--device", choices=["auto", "cpu"], default="auto", help="cpu: no GPU even if present")
    p.add_argument("--dataloader-workers", type=int, default=0, help="data loader worker processes")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if "kl" in args.decoders and args.encoder != "sd-vae":
        raise SystemExit("--decoders kl needs --encoder sd-vae (an AutoencoderKL encoder).")
    if args.device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "true"
    device = "cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu"

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        encoder_dir = save_sd_vae_encoder(Path(tmp) / "sd-vae") if args.encoder == "sd-vae" else None
        for decoder in args.decoders:
            for resolution in args.resolutions:
                for batch in args.batch_sizes:
                    row: dict[str, Any] = {"decoder": decoder, "resolution": resolution, "batch": batch}
                    try:
                        row.update(run_case(args, decoder, resolution, batch, encoder_dir))
                        print(f"{decoder} {resolution}px batch {batch}: {row['images_per_s']} images/s, "
                              f"peak {row['peak_gib']} GiB", file=sys.stderr, flush=True)  # fmt: skip
                    except Exception as error:  # noqa: BLE001 - recorded, the other cases still run
                        traceback.print_exc()
                        row["error"] = f"{type(error).__name__}: {error}"[:500]
                        print(
                            f"{decoder} {resolution}px batch {batch} failed: {row['error']}", file=sys.stderr
                        )
                    rows.append(row)
    meta = {
        "command": " ".join([os.path.relpath(sys.argv[0])] + (sys.argv[1:] if argv is None else argv)),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "mixed_precision": args.mixed_precision,
        "encoder": args.encoder,
        "optimizer": args.optimizer,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "dataloader_workers": args.dataloader_workers,
        "loop": "ssdd_diffusers.training.trainer.main; step_s: wall time from one step to the next",
        "loss": "SSDD: flow-matching MSE (no LPIPS/REPA); kl: L1 reconstruction",
        "peak_memory": "torch.cuda.max_memory_allocated during the run minus allocated before (CUDA only)",
        "gradient_checkpointing": args.gradient_checkpointing,
        "loadavg": os.getloadavg(),
    }
    report = {"meta": meta, "results": rows}
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
