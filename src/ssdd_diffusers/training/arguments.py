"""Command-line flags of the SSDD training scripts (``training/train_ssdd.py``, ``training/distill_ssdd.py``)
and the quickstart, which share one parser so that every flag has one spelling."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from ..evaluation.lpips import is_custom_distance
from .optim import OPTIMIZERS

DEFAULT_LR = 8e-4
DEFAULT_DISTILL_LR = 1e-4


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
        "--decoder_type",
        type=str,
        default="ssdd",
        choices=["ssdd", "kl"],
        help="kl: instead of SSDD, train a diffusers AutoencoderKL with --recon_weight (L1) and "
        "--lpips_weight: a fresh decoder on the frozen encoder of --pretrained_encoder (an AutoencoderKL), "
        "the deterministic baseline to compare SSDD with at equal compute; or, with --train_encoder and "
        "--model_config (an AutoencoderKL config), a fresh AutoencoderKL trained jointly (+ --kl_weight KL).",
    )
    g.add_argument(
        "--prediction_type",
        type=str,
        default=None,
        choices=["velocity", "edm"],
        help="Decoder output of a fresh model or decoder: velocity (upstream SSDD) or edm (preconditioned, "
        "the one-step output carries no starting noise). Default: velocity.",
    )
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
        "--distill_noise",
        type=str,
        default="shared",
        choices=["shared", "independent"],
        help="shared (upstream): the student starts from the teacher's noise and regresses its sample; "
        "independent: the student draws its own noise, so it learns the teacher's mean sample (a "
        "deterministic one-step decoder).",
    )
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
    g.add_argument(
        "--sample_photos",
        type=str,
        default=None,
        choices=["train", "heldout", "all"],
        help="The real photos bundled with scikit-image (offline; the quickstart's data).",
    )
    g.add_argument(
        "--crops_per_image",
        type=int,
        default=64,
        help="--sample_photos: random crops per photo and epoch.",
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
    g.add_argument(
        "--lpips_net",
        type=str,
        default="vgg",
        help="LPIPS trunk: vgg, alex or squeeze; or a custom perceptual distance 'package.module:factory' "
        "(a module mapping two (B, 3, H, W) images in [-1, 1] to per-image distances), e.g. where the "
        "LPIPS weights cannot be downloaded.",
    )
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
    g.add_argument(
        "--one_step_fraction",
        type=float,
        default=0.0,
        help="Share of training samples at t = 1 (pure noise), the input of one-step decoding; the "
        "logit-normal alone puts 1.4%% of its samples above t = 0.9.",
    )
    g.add_argument(
        "--recon_weight",
        type=float,
        default=0.0,
        help="Weight of a reconstruction loss of the one-step estimate x0_hat against the image "
        "(in distillation: of the student's sample).",
    )
    g.add_argument("--recon_loss", type=str, default="l1", choices=["l1", "l2"])

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
    g.add_argument(
        "--max_train_minutes",
        type=float,
        default=None,
        help="Guard: stop (and save) after this much training time, with a warning. Runs are "
        "reproducible only when they end by their step count.",
    )
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
    g.add_argument("--no_progress", action="store_true", help="Hide the progress bar.")

    g = parser.add_argument_group("hub")
    g.add_argument("--push_to_hub", action="store_true")
    g.add_argument("--hub_model_id", type=str, default=None)
    g.add_argument("--hub_token", type=str, default=None)
    g.add_argument("--hub_private", action="store_true")
    return parser


def _check_image_folder(path: str) -> None:
    """``ValueError`` unless ``path`` is a folder with at least one image (stops at the first one)."""
    from ..data import IMAGE_EXTENSIONS

    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"--train_data_dir {path!r} is not a folder.")
    if not any(p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() for p in root.rglob("*")):
        extensions = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise ValueError(f"no images ({extensions}) found under --train_data_dir {path!r}.")


def parse_args(input_args: list[str] | None = None, distill: bool = False) -> argparse.Namespace:
    """Parse and validate the command line (``input_args`` for in-process use)."""
    args = build_parser(distill).parse_args(input_args)
    sources = [args.dataset_name, args.train_data_dir, args.sample_photos]
    if sum(source is not None for source in sources) != 1:
        raise ValueError("Pass exactly one of --dataset_name, --train_data_dir or --sample_photos.")
    if args.report_to == "wandb" and args.hub_token is not None:
        raise ValueError("--report_to wandb with --hub_token would expose the token; use `hf auth login`.")
    if args.distill and args.teacher_model_name_or_path is None:
        raise ValueError("--distill needs --teacher_model_name_or_path.")
    if args.distill and args.train_encoder:
        raise ValueError("Distillation keeps the encoder frozen; drop --train_encoder.")
    if args.decoder_type == "kl":
        conflicts = [
            flag
            for flag, used in (
                ("--distill", args.distill),
                ("--pretrained_model_name_or_path", args.pretrained_model_name_or_path),
                ("--multiscale_stages", args.multiscale_stages > 1),
                ("--prediction_type", args.prediction_type),
                (
                    "--model_config (the decoder copies the encoder's config)",
                    args.model_config and args.pretrained_encoder,
                ),
            )
            if used
        ]
        if conflicts:
            raise ValueError(f"--decoder_type kl does not combine with {', '.join(conflicts)}.")
        if args.train_encoder == bool(args.pretrained_encoder):
            raise ValueError(
                "--decoder_type kl trains a decoder on a frozen --pretrained_encoder, or (--train_encoder "
                "with --model_config) a fresh AutoencoderKL; pass exactly one of the two."
            )
    if args.prediction_type and (args.pretrained_model_name_or_path or args.distill):
        raise ValueError(
            "--prediction_type sets up a fresh model or decoder; a saved model (or teacher) keeps its own."
        )
    if args.pretrained_model_name_or_path and args.pretrained_encoder:
        raise ValueError(
            "--pretrained_encoder builds a fresh decoder; it conflicts with --pretrained_model_name_or_path."
        )
    if args.streaming and args.max_train_steps is None:
        raise ValueError("--streaming needs --max_train_steps (the dataset length is unknown).")
    if args.resolution < 8 or args.resolution % 8:
        raise ValueError(f"--resolution must be a positive multiple of 8; got {args.resolution}.")
    if args.train_data_dir is not None:
        _check_image_folder(args.train_data_dir)
    if args.multiscale_stages < 1 or args.resolution % (8 * 2 ** (args.multiscale_stages - 1)):
        raise ValueError(
            f"--multiscale_stages {args.multiscale_stages} needs --resolution a multiple of "
            f"{8 * 2 ** max(args.multiscale_stages - 1, 0)} (every stage a multiple of 8)."
        )
    if args.learning_rate is None:
        args.learning_rate = DEFAULT_DISTILL_LR if args.distill else DEFAULT_LR
    is_custom_distance(args.lpips_net)  # an early error for a name that is neither a trunk nor a factory
    if args.lpips_backbone == "random":
        logging.getLogger(__name__).warning(
            "!!! --lpips_backbone random: LPIPS uses a RANDOM backbone. The perceptual loss is meaningless; "
            "use this only for tests. !!!"
        )
    env_rank = int(os.environ.get("LOCAL_RANK", -1))
    if env_rank != -1:
        args.local_rank = env_rank
    return args
