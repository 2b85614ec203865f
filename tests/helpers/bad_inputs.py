"""Model folders that are wrong in one way each, for the bad-input tests of the API and the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .configs import perturb_, tiny_autoencoder_kl, tiny_config

WEIGHTS = "diffusion_pytorch_model.safetensors"


def truncate(path: Path, fraction: float = 0.5) -> Path:
    """Cut the file at ``path`` to ``fraction`` of its size (an interrupted download), in place."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


def tiny_unet():
    """A tiny random diffusers ``UNet2DModel``: a saved model that is not an autoencoder."""
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=8,
        block_out_channels=(32, 32),
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        layers_per_block=1,
    )


def save_model_folders(root: Path) -> dict[str, Path]:
    """Folders under ``root``: ``ssdd`` (a good tiny SSDD model), ``kl`` (an ``AutoencoderKL``), ``unet``
    (a ``UNet2DModel``), ``pipeline`` (``model_index.json`` + ``vae/``), ``truncated`` (the SSDD model with
    its weights file cut in half) and ``steps0`` (its config with ``num_inference_steps`` 0)."""
    from ssdd_diffusers import SSDDAutoencoder

    torch.manual_seed(0)
    folders = {name: root / name for name in ("ssdd", "kl", "unet", "pipeline", "truncated", "steps0")}
    perturb_(SSDDAutoencoder(**tiny_config()), seed=2).save_pretrained(folders["ssdd"])
    tiny_autoencoder_kl().save_pretrained(folders["kl"])
    tiny_unet().save_pretrained(folders["unet"])
    tiny_autoencoder_kl().save_pretrained(folders["pipeline"] / "vae")
    (folders["pipeline"] / "model_index.json").write_text(
        json.dumps({"_class_name": "StableDiffusionPipeline", "vae": ["diffusers", "AutoencoderKL"]})
    )
    shutil.copytree(folders["ssdd"], folders["truncated"])
    truncate(folders["truncated"] / WEIGHTS)
    shutil.copytree(folders["ssdd"], folders["steps0"])
    config = json.loads((folders["steps0"] / "config.json").read_text())
    (folders["steps0"] / "config.json").write_text(json.dumps({**config, "num_inference_steps": 0}))
    return folders
