#!/usr/bin/env python
"""Text-to-image with a Stable Diffusion pipeline whose VAE decoder is SSDD.

    python examples/sd_with_ssdd.py --ssdd org/ssdd-f8c4-M-sdvae \\
        --model stable-diffusion-v1-5/stable-diffusion-v1-5 --prompt "a photo of a red fox in snow" \\
        --compare --output sd_ssdd.png

SD 1.x/2.x UNets denoise the latent space of their ``vae`` subfolder (an f8c4 AutoencoderKL). An SSDD
model built on that frozen encoder (``SSDDAutoencoder.from_autoencoder_kl`` + ``train_ssdd.py
--pretrained_encoder <repo> --pretrained_encoder_subfolder vae``) keeps ``scaling_factor`` and decodes the
pipeline's latents. ``StableDiffusionPipeline`` passes its ``generator`` to ``vae.decode``, so SSDD's
decoding noise is seeded by the pipeline's seed too.

Both ways of plugging it in are shown: ``from_pretrained(..., vae=ssdd)`` and, with ``--compare``,
``pipe.vae = ...`` on a loaded pipeline (top row: the pipeline's own VAE, bottom row: SSDD).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline
from diffusers.utils import make_image_grid

from ssdd_diffusers import SSDDAutoencoder
from ssdd_diffusers.interop import check_replaces_pipeline_vae
from ssdd_diffusers.torch_utils import DTYPES


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--ssdd", required=True, help="SSDDAutoencoder folder or Hub id (on the pipeline's VAE)."
    )
    parser.add_argument("--ssdd_subfolder", default=None, help="Subfolder of --ssdd holding the model.")
    parser.add_argument(
        "--model", default="stable-diffusion-v1-5/stable-diffusion-v1-5", help="SD pipeline folder or Hub id."
    )
    parser.add_argument("--prompt", nargs="+", default=["a photo of a red fox in snow"], help="Prompt(s).")
    parser.add_argument("--height", type=int, default=512, help="Image height (multiple of 8).")
    parser.add_argument("--width", type=int, default=512, help="Image width (multiple of 8).")
    parser.add_argument("--steps", type=int, default=30, help="Denoising steps.")
    parser.add_argument("--guidance_scale", type=float, default=7.5, help="Classifier-free guidance scale.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the sampler (and of SSDD's noise).")
    parser.add_argument("--compare", action="store_true", help="Also decode with the pipeline's own VAE.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default="fp16" if torch.cuda.is_available() else "fp32"
    )
    parser.add_argument("--output", default="sd_ssdd.png", help="Where to write the image grid (PNG).")
    return parser.parse_args(argv)


def generate(pipe: StableDiffusionPipeline, args: argparse.Namespace) -> list:
    generator = torch.Generator("cpu").manual_seed(args.seed)
    return pipe(
        args.prompt,
        height=args.height,
        width=args.width,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        generator=generator,
    ).images


def main(argv: Sequence[str] | None = None) -> list:
    args = parse_args(argv)
    dtype = DTYPES[args.dtype]
    ssdd = SSDDAutoencoder.from_pretrained(args.ssdd, subfolder=args.ssdd_subfolder, torch_dtype=dtype)
    try:  # same latent channels, downsampling and scaling as the pipeline's own VAE
        check_replaces_pipeline_vae(ssdd, args.model)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    pipe = StableDiffusionPipeline.from_pretrained(args.model, vae=ssdd, torch_dtype=dtype).to(args.device)
    rows = [generate(pipe, args)]
    if args.compare:
        pipe.vae = AutoencoderKL.from_pretrained(args.model, subfolder="vae", torch_dtype=dtype).to(
            args.device
        )
        rows.insert(0, generate(pipe, args))
        pipe.vae = ssdd
    grid = make_image_grid([image for row in rows for image in row], rows=len(rows), cols=len(args.prompt))
    grid.save(args.output)
    print(f"wrote {args.output} ({'KL top, SSDD bottom' if args.compare else 'SSDD'})")
    return rows


if __name__ == "__main__":
    main()
