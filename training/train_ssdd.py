#!/usr/bin/env python
"""Train an SSDD autoencoder (flow matching + LPIPS + REPA (+ KL)) with accelerate.

Covers every stage of the SSDD recipe (design §4):

* joint encoder + decoder training: ``--train_encoder`` (adds the KL term);
* decoder training on a frozen encoder taken from an SSDD model or any diffusers ``AutoencoderKL``:
  ``--pretrained_encoder PATH_OR_REPO``;
* fine-tuning from a saved model: ``--pretrained_model_name_or_path``;
* single-step distillation from a frozen N-step teacher: ``--distill --teacher_model_name_or_path``
  (or ``training/distill_ssdd.py``).

Run ``accelerate launch training/train_ssdd.py --help`` (plain ``python`` works too). Tests call
``main(parse_args([...]))`` in-process.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from torch.utils.data import DataLoader, IterableDataset
from tqdm.auto import tqdm

from ssdd_diffusers import SSDDAutoencoder
from ssdd_diffusers.data import EvalTransform, TrainTransform, collate_images, load_image_dataset
from ssdd_diffusers.multiscale import teacher_multiscale_targets
from ssdd_diffusers.presets import decoder_preset
from ssdd_diffusers.training_utils import (
    OPTIMIZERS,
    EpochShuffleSampler,
    LossWeights,
    SeededAugmentDataset,
    SeededAugmentIterableDataset,
    SSDDObjective,
    create_ema,
    create_lr_scheduler,
    create_optimizer,
    distillation_targets,
    ema_is_averaging,
    format_losses,
    psnr,
    push_folder_to_hub,
    read_checkpoint_state,
    reconstruct,
    reconstruction_grid,
    resolve_resume_checkpoint,
    save_checkpoint_atomic,
    schedule_free_eval,
    set_optimizer_mode,
    step_generator,
    weight_decay_param_groups,
    write_model_card,
)

logger = get_logger(__name__, log_level="INFO")

DEFAULT_LR = 8e-4
DEFAULT_DISTILL_LR = 1e-4
ENCODER_CONFIG_KEYS = (
    "in_channels",
    "latent_channels",
    "block_out_channels",
    "layers_per_block",
    "double_z",
    "norm_num_groups",
    "scaling_factor",
    "shift_factor",
    "latents_mean",
    "latents_std",
)


# ====================================================================================================
# Arguments
# ====================================================================================================
def build_parser(distill: bool = False) -> argparse.ArgumentParser:
    """Argument parser shared by ``train_ssdd.py`` and ``distill_ssdd.py`` (``distill`` sets defaults)."""
    parser = argparse.ArgumentParser(
        description="Single-step distillation of an SSDD decoder."
        if distill
        else "Train an SSDD autoencoder.",
    )
    g = parser.add_argument_group("model")
    g.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        default=None,
        help="Fine-tune (or, with --distill, initialise the student) from this SSDD model.",
    )
    g.add_argument("--pretrained_model_subfolder", type=str, default=None)
    g.add_argument(
        "--pretrained_encoder",
        type=str,
        default=None,
        help="Take a frozen encoder from this SSDDAutoencoder or diffusers AutoencoderKL "
        "(folder or Hub repo); the decoder is a fresh --decoder preset.",
    )
    g.add_argument(
        "--pretrained_encoder_subfolder",
        type=str,
        default=None,
        help="E.g. 'vae' for the AutoencoderKL inside a Stable Diffusion repo.",
    )
    g.add_argument("--encoder", type=str, default="f8c4", help="Encoder preset f{F}c{C} for a fresh model.")
    g.add_argument("--decoder", type=str, default="M", help="Decoder preset: XS, S, B, M, L, XL, H, XH, G.")
    g.add_argument(
        "--model_config",
        type=str,
        default=None,
        help="JSON object (or path to a .json file) of SSDDAutoencoder config overrides for a "
        "fresh model or a fresh decoder.",
    )
    g.add_argument(
        "--train_encoder",
        action="store_true",
        help="Train encoder + decoder jointly (adds the KL term). Default: frozen encoder.",
    )
    g.add_argument("--gradient_checkpointing", action="store_true")

    g = parser.add_argument_group("distillation")
    g.add_argument(
        "--distill",
        action="store_true",
        default=distill,
        help="GAN-free single-step distillation from a frozen N-step teacher.",
    )
    g.add_argument(
        "--teacher_model_name_or_path",
        type=str,
        default=None,
        help="Teacher SSDD model; in a checkpoint folder its vae_ema/ (EMA weights) is used.",
    )
    g.add_argument("--teacher_subfolder", type=str, default=None)
    g.add_argument("--teacher_steps", type=int, default=12, help="Euler steps of the teacher sampler.")
    g.add_argument(
        "--multiscale_stages",
        type=int,
        default=1,
        help="K > 1: multi-scale coarse-to-fine training (arXiv 2603.19570) with K stages at "
        "resolution/2^(K-1) ... resolution; with --distill, per-scale distillation of a "
        "K-stage teacher into one step per stage.",
    )

    g = parser.add_argument_group("data")
    g.add_argument(
        "--dataset_name",
        type=str,
        default=None,
        help="datasets source: Hub name, dataset script or save_to_disk folder.",
    )
    g.add_argument("--dataset_config_name", type=str, default=None)
    g.add_argument("--dataset_split", type=str, default="train")
    g.add_argument("--image_column", type=str, default=None)
    g.add_argument("--streaming", action="store_true")
    g.add_argument(
        "--train_data_dir",
        type=str,
        default=None,
        help="Folder of images (imagefolder layout or plain, searched recursively).",
    )
    g.add_argument("--cache_dir", type=str, default=None)
    g.add_argument("--max_train_samples", type=int, default=None)
    g.add_argument("--resolution", type=int, default=128)
    g.add_argument(
        "--random_resize_scale",
        type=float,
        default=1.0,
        help="Resize the shorter side to a random size in [S, scale*S] before the random crop.",
    )
    g.add_argument("--random_flip", action="store_true")
    g.add_argument("--dataloader_num_workers", type=int, default=0)

    g = parser.add_argument_group("losses")
    g.add_argument(
        "--fm_weight",
        type=float,
        default=1.0,
        help="Flow-matching weight (the L2-to-teacher weight when distilling).",
    )
    g.add_argument("--lpips_weight", type=float, default=0.5)
    g.add_argument("--repa_weight", type=float, default=0.25)
    g.add_argument("--kl_weight", type=float, default=1e-6, help="Only used with --train_encoder.")
    g.add_argument("--lpips_net", type=str, default="vgg", choices=["vgg", "alex", "squeeze"])
    g.add_argument(
        "--lpips_backbone",
        type=str,
        default="pretrained",
        choices=["pretrained", "random"],
        help="'random' is meaningless and for offline tests only.",
    )
    g.add_argument(
        "--repa_model",
        type=str,
        default="facebook/dinov2-base",
        help="DINOv2 Hub id or local folder for REPA.",
    )
    g.add_argument("--repa_block", type=int, default=None, help="Default: min(4, num_layers // 2).")
    g.add_argument("--logit_normal_mean", type=float, default=0.0)
    g.add_argument("--logit_normal_std", type=float, default=1.0)

    g = parser.add_argument_group("optimisation")
    g.add_argument("--optimizer", type=str, default="radam_schedulefree", choices=OPTIMIZERS)
    g.add_argument(
        "--learning_rate",
        type=float,
        default=None,
        help=f"Default {DEFAULT_LR} ({DEFAULT_DISTILL_LR} with --distill).",
    )
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_epsilon", type=float, default=1e-8)
    g.add_argument("--weight_decay", type=float, default=1e-2)
    g.add_argument("--lr_scheduler", type=str, default="constant_with_warmup", help="AdamW only.")
    g.add_argument("--lr_warmup_steps", type=int, default=500, help="AdamW only.")
    g.add_argument("--max_grad_norm", type=float, default=0.1, help="<= 0 disables clipping.")
    g.add_argument("--train_batch_size", type=int, default=16, help="Per device.")
    g.add_argument("--num_train_epochs", type=int, default=100)
    g.add_argument("--max_train_steps", type=int, default=None, help="Overrides --num_train_epochs.")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"])
    g.add_argument("--allow_tf32", action="store_true")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--ema_decay", type=float, default=0.999, help="0 disables the EMA.")
    g.add_argument(
        "--ema_start_step",
        type=int,
        default=50_000,
        help="Before this step the EMA is a copy of the weights (decay 0).",
    )

    g = parser.add_argument_group("logging, validation, checkpoints")
    g.add_argument("--output_dir", type=str, default="ssdd-model")
    g.add_argument("--logging_dir", type=str, default="logs")
    g.add_argument("--report_to", type=str, default="tensorboard", choices=["tensorboard", "wandb", "none"])
    g.add_argument("--tracker_project_name", type=str, default="ssdd-distill" if distill else "ssdd")
    g.add_argument("--validation_steps", type=int, default=1000, help="0 disables periodic validation.")
    g.add_argument("--num_validation_images", type=int, default=4)
    g.add_argument("--validation_inference_steps", type=int, default=12)
    g.add_argument("--checkpointing_steps", type=int, default=5000, help="0 disables checkpoints.")
    g.add_argument("--checkpoints_total_limit", type=int, default=None)
    g.add_argument("--resume_from_checkpoint", type=str, default=None, help="'latest' or a checkpoint path.")

    g = parser.add_argument_group("hub")
    g.add_argument("--push_to_hub", action="store_true")
    g.add_argument("--hub_model_id", type=str, default=None)
    g.add_argument("--hub_token", type=str, default=None)
    g.add_argument("--hub_private", action="store_true")
    return parser


def parse_args(input_args: list[str] | None = None, distill: bool = False) -> argparse.Namespace:
    """Parse and validate the command line (``input_args`` for in-process use)."""
    args = build_parser(distill).parse_args(input_args)
    if (args.dataset_name is None) == (args.train_data_dir is None):
        raise ValueError("Pass exactly one of --dataset_name or --train_data_dir.")
    if args.report_to == "wandb" and args.hub_token is not None:
        raise ValueError("--report_to wandb with --hub_token would expose the token; use `hf auth login`.")
    if args.distill and args.teacher_model_name_or_path is None:
        raise ValueError("--distill needs --teacher_model_name_or_path.")
    if args.distill and args.train_encoder:
        raise ValueError("Distillation keeps the encoder frozen; drop --train_encoder.")
    if args.pretrained_model_name_or_path and args.pretrained_encoder:
        raise ValueError(
            "--pretrained_encoder builds a fresh decoder; it conflicts with --pretrained_model_name_or_path."
        )
    if args.streaming and args.max_train_steps is None:
        raise ValueError("--streaming needs --max_train_steps (the dataset length is unknown).")
    if args.resolution % 8:
        raise ValueError("--resolution must be a multiple of 8.")
    if args.multiscale_stages < 1 or args.resolution % (8 * 2 ** (args.multiscale_stages - 1)):
        raise ValueError(
            f"--multiscale_stages {args.multiscale_stages} needs --resolution a multiple of "
            f"{8 * 2 ** max(args.multiscale_stages - 1, 0)} (every stage a multiple of 8)."
        )
    if args.learning_rate is None:
        args.learning_rate = DEFAULT_DISTILL_LR if args.distill else DEFAULT_LR
    if args.lpips_backbone == "random":
        logging.getLogger(__name__).warning(
            "!!! --lpips_backbone random: LPIPS uses a RANDOM backbone. The perceptual loss is meaningless; "
            "use this only for tests. !!!"
        )
    env_rank = int(os.environ.get("LOCAL_RANK", -1))
    if env_rank != -1:
        args.local_rank = env_rank
    return args


# ====================================================================================================
# Models
# ====================================================================================================
def _config_overrides(value: str | None) -> dict[str, Any]:
    if not value:
        return {}
    path = Path(value)
    text = path.read_text() if value.endswith(".json") and path.is_file() else value
    overrides = json.loads(text)
    if not isinstance(overrides, dict):
        raise ValueError("--model_config must be a JSON object")
    return overrides


def _load_ssdd(path: str, subfolder: str | None = None) -> SSDDAutoencoder:
    """Load an SSDD model; inside a checkpoint folder prefer the EMA weights (``vae_ema/``)."""
    if subfolder is None and (Path(path) / "vae_ema" / "config.json").is_file():
        subfolder = "vae_ema"
    elif subfolder is None and (Path(path) / "vae" / "config.json").is_file():
        subfolder = "vae"
    return SSDDAutoencoder.from_pretrained(path, subfolder=subfolder)


def build_model(args: argparse.Namespace) -> tuple[SSDDAutoencoder, str]:
    """The model to train and a description of where it came from."""
    overrides = _config_overrides(args.model_config)
    if args.pretrained_model_name_or_path:
        vae = _load_ssdd(args.pretrained_model_name_or_path, args.pretrained_model_subfolder)
        return vae, args.pretrained_model_name_or_path
    if args.distill:
        teacher_path = args.teacher_model_name_or_path
        return _load_ssdd(teacher_path, args.teacher_subfolder), teacher_path
    if args.pretrained_encoder:
        return _model_on_pretrained_encoder(args, overrides), args.pretrained_encoder
    return SSDDAutoencoder.from_preset(args.encoder, decoder=args.decoder, **overrides), ""


def _model_on_pretrained_encoder(args: argparse.Namespace, overrides: dict[str, Any]) -> SSDDAutoencoder:
    from diffusers import AutoencoderKL

    source, subfolder = args.pretrained_encoder, args.pretrained_encoder_subfolder
    fixed = sorted(k for k in overrides if k in ENCODER_CONFIG_KEYS)
    if fixed:
        raise ValueError(
            f"--model_config sets encoder keys {fixed}, but --pretrained_encoder fixes the encoder; "
            "pass only decoder and sampling keys."
        )
    config = AutoencoderKL.load_config(source, subfolder=subfolder)
    class_name = config.get("_class_name")
    if class_name == "AutoencoderKL":
        kl = AutoencoderKL.from_pretrained(source, subfolder=subfolder)
        vae = SSDDAutoencoder.from_autoencoder_kl(kl, decoder=args.decoder, **overrides)
        return vae.to(torch.float32)
    if class_name == "SSDDAutoencoder":
        src = SSDDAutoencoder.from_pretrained(source, subfolder=subfolder)
        encoder_config = {k: src.config[k] for k in ENCODER_CONFIG_KEYS if k in src.config}
        vae = SSDDAutoencoder(**{**encoder_config, **decoder_preset(args.decoder), **overrides})
        vae.encoder.load_state_dict(src.encoder.state_dict())
        vae.quant_conv.load_state_dict(src.quant_conv.state_dict())
        return vae
    raise ValueError(f"--pretrained_encoder {source!r} holds a {class_name}; expected AutoencoderKL or SSDD.")


def load_teacher(args: argparse.Namespace) -> SSDDAutoencoder:
    """Frozen teacher in eval mode (EMA weights of a checkpoint folder when present)."""
    teacher = _load_ssdd(args.teacher_model_name_or_path, args.teacher_subfolder)
    teacher.requires_grad_(False)
    return teacher.eval()


# ====================================================================================================
# Data
# ====================================================================================================
def build_datasets(args: argparse.Namespace) -> tuple[Any, Any]:
    """(training dataset wrapped for reproducible augmentation, raw dataset for validation images)."""
    transform = TrainTransform(args.resolution, args.random_resize_scale, args.random_flip)
    raw = load_image_dataset(
        dataset_name=args.dataset_name,
        dataset_config_name=args.dataset_config_name,
        split=args.dataset_split,
        train_data_dir=args.train_data_dir,
        image_column=args.image_column,
        streaming=args.streaming,
        cache_dir=args.cache_dir,
        max_samples=args.max_train_samples,
        transform=transform,
    )
    if isinstance(raw, IterableDataset):
        return SeededAugmentIterableDataset(raw, args.seed), raw
    return SeededAugmentDataset(raw, args.seed), raw


def validation_images(raw: Any, resolution: int, count: int) -> torch.Tensor | None:
    """The first ``count`` readable images of the source, centre-cropped (fixed validation batch)."""
    if count <= 0:
        return None
    dataset = copy.copy(raw)
    dataset.transform = EvalTransform(resolution)
    images: list[torch.Tensor] = []
    if isinstance(dataset, IterableDataset):
        for sample in dataset:
            if sample is not None:
                images.append(sample["pixel_values"])
            if len(images) >= count:
                break
    else:
        for index in range(len(dataset)):
            sample = dataset[index]
            if sample is not None:
                images.append(sample["pixel_values"])
            if len(images) >= count:
                break
    return torch.stack(images) if images else None


# ====================================================================================================
# Validation
# ====================================================================================================
def run_validation(
    vae: SSDDAutoencoder,
    images: torch.Tensor,
    args: argparse.Namespace,
    accelerator: Accelerator,
    step: int,
    ema: Any = None,
    tag: str = "",
) -> dict[str, float]:
    """Main process: reconstruction grid (input | 1-step | N-step) PNG and PSNR, EMA weights if averaging."""
    params = list(vae.parameters())
    use_ema = ema_is_averaging(ema)
    if use_ema:
        ema.store(params)
        ema.copy_to(params)
    was_training = vae.training
    vae.eval()
    steps = args.validation_inference_steps
    images = images.to(accelerator.device)
    with torch.no_grad(), accelerator.autocast():
        one = reconstruct(vae, images, vae.config.multiscale_stages, seed=args.seed).float()
        many = reconstruct(vae, images, steps, seed=args.seed).float()
    metrics = {
        "val/psnr_1step": float(psnr(one, images).mean()),
        f"val/psnr_{steps}step": float(psnr(many, images).mean()),
    }
    grid = reconstruction_grid([images, one, many])
    folder = Path(args.output_dir) / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    grid.save(folder / f"{tag or f'step_{step:07d}'}.png")
    for tracker in accelerator.trackers:
        try:
            if tracker.name == "tensorboard":
                import numpy as np

                tracker.writer.add_image("validation", np.asarray(grid), step, dataformats="HWC")
            elif tracker.name == "wandb":
                import wandb

                tracker.log({"validation": wandb.Image(grid, caption="input | 1-step | N-step")}, step=step)
        except Exception as error:  # image logging is best effort
            logger.warning(f"Could not log the validation grid to {tracker.name}: {error}")
    accelerator.log(metrics, step=step)
    logger.info(f"Validation at step {step}: " + ", ".join(f"{k}={v:.3f}" for k, v in metrics.items()))
    if was_training:
        vae.train()
    if use_ema:
        ema.restore(params)
    return metrics


# ====================================================================================================
# Main
# ====================================================================================================
def _tracker_config(args: argparse.Namespace) -> dict[str, Any]:
    return {
        k: v if isinstance(v, (int, float, str, bool)) else str(v)
        for k, v in vars(args).items()
        if k != "hub_token"
    }


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Train (or distil) and save the final model. Returns a summary (losses per step, counters, metrics)."""
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)
        ),
        dataloader_config=DataLoaderConfiguration(dispatch_batches=False),
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    logger.info(accelerator.state, main_process_only=False)
    set_seed(args.seed)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    repo_id = None
    if args.push_to_hub and accelerator.is_main_process:
        from huggingface_hub import create_repo

        repo_id = create_repo(
            args.hub_model_id or output_dir.name,
            exist_ok=True,
            token=args.hub_token,
            private=args.hub_private,
        ).repo_id

    # ---------------------------------------------------------------- models and objective
    vae, base_model = build_model(args)
    vae = vae.to(torch.float32)
    teacher = None
    if args.multiscale_stages > 1:
        vae.register_to_config(multiscale_stages=args.multiscale_stages, multiscale_steps=None)
    if args.distill:
        teacher = load_teacher(args).to(accelerator.device)
        vae.register_to_config(num_inference_steps=args.multiscale_stages)
    if args.gradient_checkpointing:
        vae.enable_gradient_checkpointing()
    weights = LossWeights(args.fm_weight, args.lpips_weight, args.repa_weight, args.kl_weight)
    objective = SSDDObjective(
        vae,
        weights,
        train_encoder=args.train_encoder,
        lpips_net=args.lpips_net,
        lpips_backbone=args.lpips_backbone,
        repa_model=args.repa_model,
        repa_block=args.repa_block,
        logit_normal_mean=args.logit_normal_mean,
        logit_normal_std=args.logit_normal_std,
        multiscale_stages=args.multiscale_stages,
    )
    objective.train()
    num_trainable = sum(p.numel() for p in objective.trainable_parameters())
    logger.info(f"Trainable parameters: {num_trainable / 1e6:.2f}M (encoder trained: {args.train_encoder})")

    ema = None
    if args.ema_decay > 0:
        ema = create_ema(vae, decay=args.ema_decay, start_step=args.ema_start_step)
        ema.to(accelerator.device)

    # ---------------------------------------------------------------- data
    train_dataset, raw_dataset = build_datasets(args)
    val_images = None
    if accelerator.is_main_process:
        val_images = validation_images(raw_dataset, args.resolution, args.num_validation_images)
    sampler = None
    if isinstance(train_dataset, IterableDataset):
        dataloader = DataLoader(
            train_dataset,
            batch_size=args.train_batch_size,
            collate_fn=collate_images,
            num_workers=args.dataloader_num_workers,
        )
    else:
        sampler = EpochShuffleSampler(len(train_dataset), seed=args.seed)
        dataloader = DataLoader(
            train_dataset,
            batch_size=args.train_batch_size,
            sampler=sampler,
            collate_fn=collate_images,
            num_workers=args.dataloader_num_workers,
        )

    # ---------------------------------------------------------------- optimiser
    groups = weight_decay_param_groups(objective.trainable_modules(), args.weight_decay)
    optimizer = create_optimizer(
        args.optimizer,
        groups,
        args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
    )

    steps_per_epoch = None
    if not isinstance(train_dataset, IterableDataset):
        batches = math.ceil(len(train_dataset) / (args.train_batch_size * accelerator.num_processes))
        steps_per_epoch = math.ceil(batches / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    lr_scheduler = create_lr_scheduler(
        args.optimizer,
        optimizer,
        args.lr_scheduler,
        warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        total_steps=max_train_steps * accelerator.num_processes,
    )
    if lr_scheduler is not None:
        model, optimizer, dataloader, lr_scheduler = accelerator.prepare(
            objective, optimizer, dataloader, lr_scheduler
        )
    else:
        model, optimizer, dataloader = accelerator.prepare(objective, optimizer, dataloader)
    if steps_per_epoch is not None:
        steps_per_epoch = math.ceil(len(dataloader) / args.gradient_accumulation_steps)
        num_epochs = math.ceil(max_train_steps / steps_per_epoch)
    else:
        num_epochs = 1 << 30

    # ---------------------------------------------------------------- checkpoint hooks
    def save_model_hook(models: list, weights_: list, save_dir: str) -> None:
        if accelerator.is_main_process:
            for m in models:
                unwrapped = accelerator.unwrap_model(m)
                unwrapped.vae.save_pretrained(os.path.join(save_dir, "vae"))
                if unwrapped.repa is not None:
                    from safetensors.torch import save_file

                    state = {k: v.contiguous() for k, v in unwrapped.repa.projector.state_dict().items()}
                    save_file(state, os.path.join(save_dir, "repa_projector.safetensors"))
            if ema is not None:
                ema.save_pretrained(os.path.join(save_dir, "vae_ema"))
        while weights_:
            weights_.pop()

    def load_model_hook(models: list, load_dir: str) -> None:
        while models:
            unwrapped = accelerator.unwrap_model(models.pop())
            loaded = SSDDAutoencoder.from_pretrained(load_dir, subfolder="vae")
            unwrapped.vae.load_state_dict(loaded.state_dict())
            if unwrapped.repa is not None:
                from safetensors.torch import load_file

                projector = load_file(os.path.join(load_dir, "repa_projector.safetensors"))
                unwrapped.repa.projector.load_state_dict(projector)
            del loaded
        if ema is not None:
            from diffusers.training_utils import EMAModel

            loaded_ema = EMAModel.from_pretrained(os.path.join(load_dir, "vae_ema"), SSDDAutoencoder)
            ema.load_state_dict(loaded_ema.state_dict())
            ema.to(accelerator.device)
            del loaded_ema

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)

    if accelerator.is_main_process:
        accelerator.init_trackers(args.tracker_project_name, config=_tracker_config(args))

    # ---------------------------------------------------------------- resume
    global_step = 0
    skipped_before = 0
    images_before = 0
    resume_path = resolve_resume_checkpoint(output_dir, args.resume_from_checkpoint)
    if args.resume_from_checkpoint and resume_path is None:
        logger.info(f"No complete checkpoint in {output_dir}; starting a new run.")
    if resume_path is not None:
        logger.info(f"Resuming from {resume_path}")
        accelerator.load_state(str(resume_path))
        state = read_checkpoint_state(resume_path)
        global_step = int(state["step"])
        skipped_before = int(state.get("skipped_images", 0))
        images_before = int(state.get("images_seen", 0))
    set_optimizer_mode(optimizer, train=True)
    first_epoch = global_step // steps_per_epoch if steps_per_epoch else 0
    resume_batches = (
        (global_step - first_epoch * steps_per_epoch) * args.gradient_accumulation_steps
        if steps_per_epoch
        else global_step * args.gradient_accumulation_steps
    )

    # ---------------------------------------------------------------- training loop
    unwrapped = accelerator.unwrap_model(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    total_batch = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(
        f"***** Running {'distillation' if args.distill else 'training'} *****\n"
        f"  examples = {len(train_dataset) if sampler is not None else 'streaming'}, epochs = "
        f"{num_epochs if steps_per_epoch else '?'}, per-device batch = {args.train_batch_size}, "
        f"total batch = {total_batch}, accumulation = {args.gradient_accumulation_steps}, "
        f"steps = {max_train_steps}, "
        f"start step = {global_step}"
    )
    progress = tqdm(
        total=max_train_steps,
        initial=global_step,
        desc="Steps",
        disable=not accelerator.is_local_main_process,
    )
    loss_history: list[dict[str, float]] = []
    last_metrics: dict[str, float] = {}
    skipped_local = 0
    images_local = 0
    micro_step = 0
    sums: dict[str, torch.Tensor] = {}
    step_images = 0
    tick = time.perf_counter()

    def counters() -> tuple[int, int]:
        totals = torch.tensor([skipped_local, images_local], device=accelerator.device, dtype=torch.long)
        totals = accelerator.reduce(totals, reduction="sum")
        return skipped_before + int(totals[0]), images_before + int(totals[1])

    done = global_step >= max_train_steps
    for epoch in range(first_epoch, num_epochs):
        if done:
            break
        # accelerate's loader re-applies its own epoch counter to the sampler/dataset when iterated (and
        # copies it into skip_first_batches' loader): set it too, so order and augmentation follow `epoch`.
        dataloader.set_epoch(epoch)
        if sampler is not None:
            sampler.set_epoch(epoch)
        train_dataset.set_epoch(epoch)
        loader = dataloader
        if epoch == first_epoch and resume_batches > 0:
            loader = accelerator.skip_first_batches(dataloader, resume_batches)
        for batch in loader:
            pixel_values = batch["pixel_values"]
            skipped_local += int(batch["num_skipped"])
            loss_scale = 1.0
            if pixel_values is None:  # every image of this micro-batch was corrupt: a zero-weight step
                pixel_values = torch.zeros(1, 3, args.resolution, args.resolution)
                loss_scale = 0.0
            pixel_values = pixel_values.to(accelerator.device, non_blocking=True)
            batch_size = pixel_values.shape[0] if loss_scale else 0
            generator = step_generator(
                args.seed, global_step, micro_step, accelerator.process_index, accelerator.device
            )
            with accelerator.accumulate(model):
                if teacher is not None and args.multiscale_stages > 1:
                    with accelerator.autocast():
                        z, noise, stage_ends = teacher_multiscale_targets(
                            teacher, pixel_values, generator, args.multiscale_stages, args.teacher_steps
                        )
                    out = model(
                        pixel_values,
                        generator,
                        z=z,
                        noise=noise,
                        target=[t.float() for t in stage_ends],
                        loss_scale=loss_scale,
                    )
                elif teacher is not None:
                    with accelerator.autocast():
                        z, noise, target = distillation_targets(
                            teacher, pixel_values, generator, args.teacher_steps
                        )
                    out = model(
                        pixel_values,
                        generator,
                        z=z,
                        noise=noise,
                        target=target.float(),
                        loss_scale=loss_scale,
                    )
                else:
                    out = model(pixel_values, generator, loss_scale=loss_scale)
                accelerator.backward(out["loss"])
                grad_norm = None
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    grad_norm = accelerator.clip_grad_norm_(trainable, args.max_grad_norm)
                optimizer.step()
                if lr_scheduler is not None:
                    lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            micro_step += 1
            images_local += batch_size
            step_images += batch_size
            for key, value in out.items():
                sums[key] = sums.get(key, 0.0) + value.detach().float()

            if not accelerator.sync_gradients:
                continue
            # ------------------------------------------------------------ one optimisation step done
            global_step += 1
            if ema is not None:
                ema.step(unwrapped.vae.parameters())
            keys = sorted(sums)
            means = torch.stack([sums[k] / micro_step for k in keys])
            means = accelerator.reduce(means, reduction="mean")
            logs = {k: float(v) for k, v in zip(keys, means)}
            if grad_norm is not None:
                logs["grad_norm"] = float(grad_norm)
            logs["lr"] = float(optimizer.param_groups[0]["lr"])
            now = time.perf_counter()
            logs["images_per_s"] = step_images * accelerator.num_processes / max(now - tick, 1e-9)
            tick, step_images, micro_step, sums = now, 0, 0, {}
            loss_history.append({"step": global_step, **logs})
            progress.update(1)
            progress.set_postfix(
                **format_losses(logs, ["loss", "fm", "lpips", "repa", "kl"]),
                img_s=f"{logs['images_per_s']:.1f}",
            )
            accelerator.log(logs, step=global_step)

            do_validation = bool(args.validation_steps) and global_step % args.validation_steps == 0
            do_checkpoint = bool(args.checkpointing_steps) and global_step % args.checkpointing_steps == 0
            if do_validation or do_checkpoint:
                with schedule_free_eval(optimizer):  # on every process, so replicas stay identical
                    if do_validation and accelerator.is_main_process and val_images is not None:
                        last_metrics = run_validation(
                            unwrapped.vae, val_images, args, accelerator, global_step, ema
                        )
                        objective.train()
                    if do_checkpoint:
                        skipped, seen = counters()
                        save_checkpoint_atomic(
                            accelerator,
                            output_dir,
                            global_step,
                            state={"skipped_images": skipped, "images_seen": seen, "epoch": epoch},
                            total_limit=args.checkpoints_total_limit,
                        )
            if global_step >= max_train_steps:
                done = True
                break
    progress.close()

    # ---------------------------------------------------------------- final model
    skipped_total, images_total = counters()
    accelerator.wait_for_everyone()
    set_optimizer_mode(optimizer, train=False)  # schedule-free: the averaged (evaluation) weights
    final_vae = unwrapped.vae
    if ema_is_averaging(ema):
        ema.copy_to(final_vae.parameters())
    result: dict[str, Any] = {
        "global_step": global_step,
        "loss_history": loss_history,
        "skipped_images": skipped_total,
        "images_seen": images_total,
        "output_dir": str(output_dir),
        "validation": last_metrics,
    }
    if accelerator.is_main_process:
        final_vae.eval()
        if args.distill:
            final_vae.register_to_config(num_inference_steps=args.multiscale_stages)
        if val_images is not None:
            result["validation"] = run_validation(
                final_vae, val_images, args, accelerator, global_step, tag="final"
            )
        final_vae.save_pretrained(output_dir, safe_serialization=True)
        recipe = {
            "stage": "distillation"
            if args.distill
            else ("joint encoder+decoder" if args.train_encoder else "decoder (frozen encoder)"),
            "optimizer": args.optimizer,
            "learning_rate": args.learning_rate,
            "weight_decay": args.weight_decay,
            "max_grad_norm": args.max_grad_norm,
            "fm_weight": args.fm_weight,
            "lpips_weight": args.lpips_weight,
            "lpips": f"{args.lpips_net} ({args.lpips_backbone})",
            "repa_weight": args.repa_weight,
            "repa_model": args.repa_model,
            "kl_weight": args.kl_weight if args.train_encoder else 0.0,
            "ema_decay": args.ema_decay,
            "ema_start_step": args.ema_start_step,
            "random_resize_scale": args.random_resize_scale,
            "random_flip": args.random_flip,
            "total_batch_size": total_batch,
            "mixed_precision": accelerator.mixed_precision,
            "multiscale_stages": args.multiscale_stages,
        }
        if args.distill:
            recipe["teacher"] = args.teacher_model_name_or_path
            recipe["teacher_steps"] = args.teacher_steps
        write_model_card(
            output_dir,
            {
                "repo_id": repo_id or args.hub_model_id,
                "stage": recipe["stage"],
                "base_model": base_model,
                "data": args.dataset_name or args.train_data_dir,
                "num_images": images_total,
                "skipped_images": skipped_total,
                "resolution": args.resolution,
                "global_step": global_step,
                "train_batch_size": args.train_batch_size,
                "recipe": recipe,
                "validation": result["validation"],
                "num_inference_steps": final_vae.config.num_inference_steps,
            },
        )
        if args.push_to_hub:
            push_folder_to_hub(output_dir, repo_id, token=args.hub_token, private=args.hub_private)
            result["repo_id"] = repo_id
        logger.info(
            f"Saved {output_dir}. Skipped {skipped_total} unreadable image(s) out of "
            f"{images_total + skipped_total} loaded."
        )
    accelerator.end_training()
    return result


if __name__ == "__main__":
    main(parse_args())
