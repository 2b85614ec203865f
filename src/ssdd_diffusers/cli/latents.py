"""``ssdd-diffusers encode`` / ``decode``: images to a safetensors file of latents, and back to PNGs."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..evaluation.reconstruction import decode_latents, encode_latents
from ..torch_utils import DTYPES, resolve_device
from .common import iter_images, load_cli_model, seeded_generator
from .images import (
    InputError,
    LatentFile,
    collect_images,
    load_latents,
    output_names,
    save_latents,
    save_png,
    size_multiple,
)


def encode_command(args: argparse.Namespace) -> None:
    """Encode every image; write one safetensors file of latents with names in its metadata."""
    output = Path(args.output)
    if output.suffix != ".safetensors":
        raise InputError(f"--output must end with .safetensors, got {args.output!r}")
    paths = collect_images(args.inputs)
    names = output_names(paths)
    loaded = load_cli_model(args.model, None, resolve_device(args.device), DTYPES[args.dtype])
    latents, kept, sources, sizes = [], [], [], []
    for index, path, prepared in iter_images(args, paths, size_multiple(loaded.model), "encode"):
        latents.append(
            encode_latents(loaded.model, prepared.pixels, args.sample, seeded_generator(args.seed))
            .float()
            .cpu()
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


def decode_command(args: argparse.Namespace) -> None:
    """Decode every latent of a latents file to a PNG."""
    from tqdm.auto import tqdm

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
        if min(z.shape[-2:]) < 1 or (z.shape[-2] * factor) % multiple or (z.shape[-1] * factor) % multiple:
            raise InputError(
                f"latents {name!r} of {z.shape[-1]}x{z.shape[-2]} would decode to "
                f"{z.shape[-1] * factor}x{z.shape[-2] * factor} px; the model needs positive multiples of "
                f"{multiple}"
            )
        if not bool(torch.isfinite(z).all()):
            raise InputError(f"latents {name!r} contain NaN or infinite values; expected finite numbers")
    output_dir = Path(args.output_dir)
    for name, z in tqdm(
        list(zip(data.names, data.latents)), desc="decode", unit="img", disable=args.no_progress
    ):
        image = decode_latents(
            loaded.model, z, loaded.num_inference_steps, generator=seeded_generator(args.seed)
        )
        path = save_png(image.float(), output_dir / f"{name}.png")
        tqdm.write(f"{name}: {tuple(z.shape[1:])} -> {path}")
    print(f"wrote {len(data.latents)} PNGs to {output_dir}")
