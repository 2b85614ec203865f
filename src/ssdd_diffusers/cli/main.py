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
import importlib
import logging
import sys
from collections.abc import Sequence
from typing import Any

from ..torch_utils import DTYPES
from .common import Formatter, add_image_arguments, add_model_arguments, run_guarded
from .evaluate import evaluate_main
from .stats import latent_stats_main


def _subparser(
    subparsers: Any, name: str, summary: str, example: str, **kwargs: Any
) -> argparse.ArgumentParser:
    return subparsers.add_parser(
        name,
        help=summary,
        description=summary,
        epilog=f"example:\n  {example}",
        formatter_class=Formatter,
        **kwargs,
    )


def build_parser() -> argparse.ArgumentParser:
    """Parser of ``ssdd-diffusers`` (``evaluate``, ``stats``, ``benchmark`` forward to their own parsers)."""
    from .. import __version__

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
    add_model_arguments(p)
    add_image_arguments(p)
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
    p.set_defaults(handler=("reconstruct", "reconstruct_command"))

    p = _subparser(
        sub,
        "encode",
        "Encode images into one .safetensors file of latents (names and settings in its metadata).",
        "ssdd-diffusers encode ./ssdd-f8c4-M photos/ --output latents.safetensors",
    )
    add_model_arguments(p, steps=False)
    add_image_arguments(p)
    p.add_argument("--output", required=True, help="Latents file to write (.safetensors).")
    p.add_argument("--sample", action="store_true", help="Sample the posterior instead of taking its mode.")
    p.add_argument("--seed", type=int, default=0, help="Seed of --sample (same for every image).")
    p.set_defaults(handler=("latents", "encode_command"))

    p = _subparser(
        sub,
        "decode",
        "Decode a latents file (from 'encode', or any (C,h,w) / (B,C,h,w) safetensors tensors) to PNGs.",
        "ssdd-diffusers decode ./ssdd-f8c4-M latents.safetensors --output_dir decoded/ --steps 4",
    )
    add_model_arguments(p)
    p.add_argument("latents", help="A .safetensors latents file.")
    p.add_argument("--output_dir", required=True, help="Folder for the PNGs.")
    p.add_argument(
        "--seed", type=int, default=0, help="Seed of the SSDD starting noise (same for every image)."
    )
    p.set_defaults(handler=("latents", "decode_command"))

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
    p.set_defaults(handler=("convert", "convert_command"))

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
        return run_guarded(_forwarded(argv[0], argv[1:]))
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    def run() -> Any:
        from .cpu_memory import reuse_freed_memory

        module, function = args.handler  # imported when run: a missing extra is then one error line
        handler = getattr(importlib.import_module(f".{module}", __package__), function)
        with reuse_freed_memory():  # large CPU decodes: no re-faulting of freed activations
            return handler(args)

    return run_guarded(run)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
