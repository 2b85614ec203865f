#!/usr/bin/env python
"""Class-conditional ImageNet samples from DiT, decoded by an SSDD autoencoder.

    python examples/dit_with_ssdd.py --ssdd org/ssdd-f8c4-M-sdvae --classes 207 360 387 974 \\
        --steps 25 --guidance_scale 4.0 --compare --output dit_ssdd.png

``facebook/DiT-XL-2-256`` denoises the latent space of the Stable Diffusion VAE (``sd-vae-ft-ema``,
f8c4, scaling factor 0.18215). An SSDD model built on that frozen encoder decodes the same latents::

    kl = AutoencoderKL.from_pretrained("stabilityai/sd-vae-ft-ema")
    vae = SSDDAutoencoder.from_autoencoder_kl(kl, decoder="M")   # then train the decoder:
    # accelerate launch training/train_ssdd.py --pretrained_encoder stabilityai/sd-vae-ft-ema ...

The script shows both ways of plugging it in: ``DiTPipeline.from_pretrained(..., vae=ssdd)`` and, with
``--compare``, swapping VAEs on a loaded pipeline (``pipe.vae = ...``) to decode the same DiT samples
with the pipeline's own AutoencoderKL, side by side (top row KL, bottom row SSDD).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch
from diffusers import AutoencoderKL, DiTPipeline
from diffusers.utils import make_image_grid

from ssdd_diffusers import SSDDAutoencoder
from ssdd_diffusers.interop import check_replaces_pipeline_vae
from ssdd_diffusers.torch_utils import DTYPES


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--ssdd", required=True, help="SSDDAutoencoder folder or Hub id (trained on the SD-VAE)."
    )
    parser.add_argument("--ssdd_subfolder", default=None, help="Subfolder of --ssdd holding the model.")
    parser.add_argument("--dit", default="facebook/DiT-XL-2-256", help="DiT pipeline folder or Hub id.")
    parser.add_argument("--classes", type=int, nargs="+", default=[207, 360, 387, 974], help="ImageNet ids.")
    parser.add_argument("--steps", type=int, default=25, help="DiT denoising steps.")
    parser.add_argument("--guidance_scale", type=float, default=4.0, help="Classifier-free guidance scale.")
    parser.add_argument("--decode_steps", type=int, default=None, help="SSDD decode steps (default: config).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the DiT sampler.")
    parser.add_argument("--compare", action="store_true", help="Also decode with the pipeline's own VAE.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default="fp16" if torch.cuda.is_available() else "fp32"
    )
    parser.add_argument("--output", default="dit_ssdd.png", help="Where to write the image grid (PNG).")
    return parser.parse_args(argv)


def generate(pipe: DiTPipeline, args: argparse.Namespace) -> list:
    """One sample per class, same seed for every call (so two VAEs decode identical latents)."""
    generator = torch.Generator("cpu").manual_seed(args.seed)
    return pipe(
        class_labels=args.classes,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        generator=generator,
    ).images


def main(argv: Sequence[str] | None = None) -> list:
    args = parse_args(argv)
    dtype = DTYPES[args.dtype]
    ssdd = SSDDAutoencoder.from_pretrained(args.ssdd, subfolder=args.ssdd_subfolder, torch_dtype=dtype)
    if args.decode_steps is not None:
        ssdd.register_to_config(num_inference_steps=args.decode_steps)

    try:  # same latent channels, downsampling and scaling as the pipeline's own VAE
        check_replaces_pipeline_vae(ssdd, args.dit)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None

    # 1) Load the pipeline with the SSDD model in place of its VAE (its own VAE is not even loaded).
    pipe = DiTPipeline.from_pretrained(args.dit, vae=ssdd, torch_dtype=dtype).to(args.device)
    ssdd_images = generate(pipe, args)
    rows = [ssdd_images]

    if args.compare:
        # 2) Swap VAEs on a loaded pipeline: decode the same DiT samples with the original KL decoder.
        kl = AutoencoderKL.from_pretrained(args.dit, subfolder="vae", torch_dtype=dtype).to(args.device)
        pipe.vae = kl
        rows.insert(0, generate(pipe, args))
        pipe.vae = ssdd

    grid = make_image_grid([image for row in rows for image in row], rows=len(rows), cols=len(args.classes))
    grid.save(args.output)
    print(
        f"wrote {args.output} ({'KL top, SSDD bottom' if args.compare else 'SSDD'}; classes {args.classes})"
    )
    return rows


if __name__ == "__main__":
    main()
