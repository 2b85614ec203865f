"""The SSDD training loop, with 🤗 Accelerate: decoder or joint training, single-step and per-scale
distillation, EMA, validation, atomic checkpoints with exact resume, the model card and the Hub upload.

``training/train_ssdd.py`` and ``training/distill_ssdd.py`` run :func:`main`; the quickstart and the
training benchmark call it too, so there is one loop. Tests call ``main(parse_args([...]))`` in-process.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..dependencies import require

require("accelerate", "schedulefree", "datasets", extra="training", feature="SSDD training")

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from torch.utils.data import DataLoader, IterableDataset
from tqdm.auto import tqdm

from ..data import SamplePhotoDataset, TrainTransform, collate_images, load_image_dataset
from ..model_card import public_source_name, strip_local_paths_from_config, write_model_card
from ..models import SSDDAutoencoder
from .checkpoints import (
    crash_point,
    publish_files,
    read_checkpoint_state,
    resolve_resume_checkpoint,
    save_checkpoint_atomic,
)
from .ema import create_ema, ema_is_averaging
from .hub import push_folder_to_hub
from .model_loading import build_model, load_teacher
from .multiscale import teacher_multiscale_targets
from .objective import (
    AutoencoderKLObjective,
    AutoencoderObjective,
    LossWeights,
    SSDDObjective,
    distillation_targets,
)
from .optim import (
    create_lr_scheduler,
    create_optimizer,
    schedule_free_eval,
    set_optimizer_mode,
    weight_decay_param_groups,
)
from .reproducibility import (
    EpochShuffleSampler,
    SeededAugmentDataset,
    SeededAugmentIterableDataset,
    derive_seed,
    step_generator,
)
from .validation import run_validation, validation_images

logger = get_logger(__name__, log_level="INFO")

FINAL_STAGING = "final.tmp"
"""Folder of output_dir where the final model is written before being moved in place."""

PROGRESS_KEYS = ("loss", "fm", "lpips", "repa", "kl", "recon")
"""Loss terms shown in the progress bar."""


# ====================================================================================================
# Set-up
# ====================================================================================================
def create_accelerator(args: argparse.Namespace) -> Accelerator:
    """The ``Accelerator`` of a run (mixed precision, accumulation, trackers, output folder)."""
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
    return accelerator


def build_objective(args: argparse.Namespace, vae: Any) -> AutoencoderObjective:
    """The training objective around ``vae`` with the loss weights and networks of ``args``."""
    weights = LossWeights(
        args.fm_weight, args.lpips_weight, args.repa_weight, args.kl_weight, args.recon_weight
    )
    if args.gradient_checkpointing:
        vae.enable_gradient_checkpointing()
    if args.decoder_type == "kl":
        objective = AutoencoderKLObjective(
            vae, weights, args.train_encoder, args.recon_loss, args.lpips_net, args.lpips_backbone
        )
        return objective.train()
    if args.multiscale_stages > 1:
        vae.register_to_config(multiscale_stages=args.multiscale_stages, multiscale_steps=None)
    if args.distill:
        vae.register_to_config(num_inference_steps=args.multiscale_stages)
    if args.gradient_checkpointing:
        vae.enable_gradient_checkpointing()
    weights = LossWeights(
        args.fm_weight, args.lpips_weight, args.repa_weight, args.kl_weight, args.recon_weight
    )
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
        one_step_fraction=args.one_step_fraction,
        recon_loss=args.recon_loss,
        distill_noise=args.distill_noise,
        multiscale_stages=args.multiscale_stages,
    )
    objective.train()
    num_trainable = sum(p.numel() for p in objective.trainable_parameters())
    logger.info(f"Trainable parameters: {num_trainable / 1e6:.2f}M (encoder trained: {args.train_encoder})")
    return objective


def build_datasets(args: argparse.Namespace) -> tuple[Any, Any]:
    """(training dataset wrapped for reproducible augmentation, raw dataset for validation images)."""
    transform = TrainTransform(args.resolution, args.random_resize_scale, args.random_flip)
    if args.sample_photos is not None:
        raw: Any = SamplePhotoDataset(args.sample_photos, transform, crops_per_image=args.crops_per_image)
    else:
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


def build_dataloader(args: argparse.Namespace, dataset: Any) -> tuple[DataLoader, EpochShuffleSampler | None]:
    """Shuffled (per ``(seed, epoch)``) loader of a map-style dataset, or a plain loader of a stream."""
    sampler = None if isinstance(dataset, IterableDataset) else EpochShuffleSampler(len(dataset), args.seed)
    # Each iterator draws its workers' base seed from `generator` (reseeded per epoch by train_loop), not
    # from the global RNG, whose state a resumed run (killed anywhere) must restore exactly.
    loader = DataLoader(
        dataset,
        batch_size=args.train_batch_size,
        sampler=sampler,
        collate_fn=collate_images,
        num_workers=args.dataloader_num_workers,
        generator=torch.Generator(),
    )
    return loader, sampler


def register_checkpoint_hooks(accelerator: Accelerator, ema: Any, model_class: type) -> None:
    """Save and load the model (diffusers format), the REPA projector and the EMA with accelerate state."""

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
            loaded = model_class.from_pretrained(load_dir, subfolder="vae")
            unwrapped.vae.load_state_dict(loaded.state_dict())
            if unwrapped.repa is not None:
                from safetensors.torch import load_file

                projector = load_file(os.path.join(load_dir, "repa_projector.safetensors"))
                unwrapped.repa.projector.load_state_dict(projector)
            del loaded
        if ema is not None:
            from diffusers.training_utils import EMAModel

            loaded_ema = EMAModel.from_pretrained(os.path.join(load_dir, "vae_ema"), model_class)
            ema.load_state_dict(loaded_ema.state_dict())
            ema.to(accelerator.device)
            del loaded_ema

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)


def _tracker_config(args: argparse.Namespace) -> dict[str, Any]:
    return {
        k: v if isinstance(v, (int, float, str, bool)) else str(v)
        for k, v in vars(args).items()
        if k != "hub_token"
    }


# ====================================================================================================
# One optimisation step
# ====================================================================================================
def compute_losses(
    model: Any,
    teacher: SSDDAutoencoder | None,
    images: torch.Tensor,
    generator: torch.Generator,
    args: argparse.Namespace,
    accelerator: Accelerator,
    loss_scale: float = 1.0,
) -> dict[str, torch.Tensor]:
    """The objective's losses of one micro-batch; with a teacher, its targets are computed first."""
    if teacher is None:
        return model(images, generator, loss_scale=loss_scale)
    with accelerator.autocast():
        if args.multiscale_stages > 1:
            z, noise, stage_ends = teacher_multiscale_targets(
                teacher, images, generator, args.multiscale_stages, args.teacher_steps
            )
            target: Any = [t.float() for t in stage_ends]
        else:
            z, noise, sample = distillation_targets(teacher, images, generator, args.teacher_steps)
            target = sample.float()
    return model(images, generator, z=z, noise=noise, target=target, loss_scale=loss_scale)


@dataclass
class LoopState:
    """Counters of the training loop (restored from a checkpoint when resuming)."""

    global_step: int = 0
    skipped_before: int = 0
    images_before: int = 0
    skipped_local: int = 0
    images_local: int = 0
    loss_history: list[dict[str, float]] = field(default_factory=list)
    last_metrics: dict[str, float] = field(default_factory=dict)
    stopped_by_time_budget: bool = False

    def totals(self, accelerator: Accelerator) -> tuple[int, int]:
        """(skipped images, images seen) over all processes, since the start of the run."""
        local = torch.tensor(
            [self.skipped_local, self.images_local], device=accelerator.device, dtype=torch.long
        )
        local = accelerator.reduce(local, reduction="sum")
        return self.skipped_before + int(local[0]), self.images_before + int(local[1])


def resume(args: argparse.Namespace, accelerator: Accelerator, output_dir: Path) -> LoopState:
    """Load the checkpoint of ``--resume_from_checkpoint`` (if any) and return the restored counters."""
    state = LoopState()
    resume_path = resolve_resume_checkpoint(output_dir, args.resume_from_checkpoint)
    if args.resume_from_checkpoint and resume_path is None:
        logger.info(f"No complete checkpoint in {output_dir}; starting a new run.")
    if resume_path is not None:
        logger.info(f"Resuming from {resume_path}")
        accelerator.load_state(str(resume_path))
        saved = read_checkpoint_state(resume_path)
        state.global_step = int(saved["step"])
        state.skipped_before = int(saved.get("skipped_images", 0))
        state.images_before = int(saved.get("images_seen", 0))
    return state


# ====================================================================================================
# Main
# ====================================================================================================
@dataclass
class TrainingRun:
    """What one run works with, built by :func:`setup` (``model`` is the accelerate-prepared objective)."""

    args: argparse.Namespace
    accelerator: Accelerator
    objective: AutoencoderObjective
    model: Any
    teacher: SSDDAutoencoder | None
    optimizer: Any
    lr_scheduler: Any
    ema: Any
    dataloader: DataLoader
    sampler: EpochShuffleSampler | None
    train_dataset: Any
    val_images: torch.Tensor | None
    output_dir: Path
    max_train_steps: int
    steps_per_epoch: int | None
    num_epochs: int
    base_model: str = ""
    repo_id: str | None = None
    state: LoopState = field(default_factory=LoopState)

    @property
    def total_batch(self) -> int:
        args = self.args
        return args.train_batch_size * self.accelerator.num_processes * args.gradient_accumulation_steps


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Train (or distil) and save the final model. Returns a summary (losses per step, counters, metrics)."""
    run = setup(args)
    run.state = resume(args, run.accelerator, run.output_dir)
    set_optimizer_mode(run.optimizer, train=True)
    logger.info(
        f"***** Running {'distillation' if args.distill else 'training'} *****\n"
        f"  examples = {len(run.train_dataset) if run.sampler is not None else 'streaming'}, epochs = "
        f"{run.num_epochs if run.steps_per_epoch else '?'}, per-device batch = {args.train_batch_size}, "
        f"total batch = {run.total_batch}, accumulation = {args.gradient_accumulation_steps}, "
        f"steps = {run.max_train_steps}, start step = {run.state.global_step}"
    )
    train_loop(run)
    return finish(run)


def setup(args: argparse.Namespace) -> TrainingRun:
    """Accelerator, models, objective, EMA, data, optimiser and checkpoint hooks of a run."""
    output_dir = Path(args.output_dir)
    accelerator = create_accelerator(args)
    repo_id = None
    if args.push_to_hub and accelerator.is_main_process:
        from huggingface_hub import create_repo

        repo_id = create_repo(
            args.hub_model_id or output_dir.name,
            exist_ok=True,
            token=args.hub_token,
            private=args.hub_private,
        ).repo_id

    vae, base_model = build_model(args)
    vae = vae.to(torch.float32)
    teacher = load_teacher(args).to(accelerator.device) if args.distill else None
    objective = build_objective(args, vae)
    ema = None
    if args.ema_decay > 0:
        ema = create_ema(vae, decay=args.ema_decay, start_step=args.ema_start_step)
        ema.to(accelerator.device)

    train_dataset, raw_dataset = build_datasets(args)
    val_images = None
    if accelerator.is_main_process:
        val_images = validation_images(raw_dataset, args.resolution, args.num_validation_images)
    dataloader, sampler = build_dataloader(args, train_dataset)

    groups = weight_decay_param_groups(objective.trainable_modules(), args.weight_decay)
    betas = (args.adam_beta1, args.adam_beta2)
    optimizer = create_optimizer(
        args.optimizer, groups, args.learning_rate, betas=betas, eps=args.adam_epsilon
    )
    steps_per_epoch = None
    if sampler is not None:
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
    num_epochs = 1 << 30  # a stream: the step count ends the run
    if steps_per_epoch is not None:
        steps_per_epoch = math.ceil(len(dataloader) / args.gradient_accumulation_steps)
        num_epochs = math.ceil(max_train_steps / steps_per_epoch)
    register_checkpoint_hooks(accelerator, ema, type(vae))
    if accelerator.is_main_process:
        accelerator.init_trackers(args.tracker_project_name, config=_tracker_config(args))
    return TrainingRun(
        args, accelerator, objective, model, teacher, optimizer, lr_scheduler, ema, dataloader, sampler,
        train_dataset, val_images, output_dir, max_train_steps, steps_per_epoch, num_epochs, base_model,
        repo_id,
    )  # fmt: skip


def train_loop(run: TrainingRun) -> None:
    """Run optimisation steps until ``max_train_steps`` (or the ``--max_train_minutes`` guard)."""
    args, accelerator, state = run.args, run.accelerator, run.state
    first_epoch = state.global_step // run.steps_per_epoch if run.steps_per_epoch else 0
    done_in_epoch = state.global_step - first_epoch * (run.steps_per_epoch or 0)
    resume_batches = done_in_epoch * args.gradient_accumulation_steps
    trainable = [p for p in run.model.parameters() if p.requires_grad]
    progress = tqdm(
        total=run.max_train_steps,
        initial=state.global_step,
        desc="Steps",
        disable=args.no_progress or not accelerator.is_local_main_process,
    )
    deadline = None if args.max_train_minutes is None else time.monotonic() + 60.0 * args.max_train_minutes
    micro_step = 0
    sums: dict[str, torch.Tensor] = {}
    step_images = 0
    step_seconds = 0.0
    tick = time.perf_counter()
    done = state.global_step >= run.max_train_steps
    for epoch in range(first_epoch, run.num_epochs):
        if done:
            break
        # accelerate's loader re-applies its own epoch counter to the sampler/dataset when iterated (and
        # copies it into skip_first_batches' loader): set it too, so order and augmentation follow `epoch`.
        run.dataloader.set_epoch(epoch)
        run.dataloader.generator.manual_seed(derive_seed(args.seed, epoch, 0xB5))
        if run.sampler is not None:
            run.sampler.set_epoch(epoch)
        run.train_dataset.set_epoch(epoch)
        loader = run.dataloader
        if epoch == first_epoch and resume_batches > 0:
            loader = accelerator.skip_first_batches(run.dataloader, resume_batches)
        for batch in loader:
            pixel_values = batch["pixel_values"]
            state.skipped_local += int(batch["num_skipped"])
            loss_scale = 1.0
            if pixel_values is None:  # every image of this micro-batch was corrupt: a zero-weight step
                pixel_values = torch.zeros(1, 3, args.resolution, args.resolution)
                loss_scale = 0.0
            pixel_values = pixel_values.to(accelerator.device, non_blocking=True)
            batch_size = pixel_values.shape[0] if loss_scale else 0
            generator = step_generator(
                args.seed, state.global_step, micro_step, accelerator.process_index, accelerator.device
            )
            compute_start = time.perf_counter()
            with accelerator.accumulate(run.model):
                out = compute_losses(
                    run.model, run.teacher, pixel_values, generator, args, accelerator, loss_scale
                )
                accelerator.backward(out["loss"])
                grad_norm = None
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    grad_norm = accelerator.clip_grad_norm_(trainable, args.max_grad_norm)
                run.optimizer.step()
                if run.lr_scheduler is not None:
                    run.lr_scheduler.step()
                run.optimizer.zero_grad(set_to_none=True)
            step_seconds += time.perf_counter() - compute_start
            micro_step += 1
            state.images_local += batch_size
            step_images += batch_size
            for key, value in out.items():
                sums[key] = sums.get(key, 0.0) + value.detach().float()
            if not accelerator.sync_gradients:
                continue

            # ------------------------------------------------------------ one optimisation step done
            state.global_step += 1
            if run.ema is not None:
                run.ema.step(run.objective.vae.parameters())
            keys = sorted(sums)
            means = accelerator.reduce(torch.stack([sums[k] / micro_step for k in keys]), reduction="mean")
            logs = {k: float(v) for k, v in zip(keys, means)}
            if grad_norm is not None:
                logs["grad_norm"] = float(grad_norm)
            logs["lr"] = float(run.optimizer.param_groups[0]["lr"])
            now = time.perf_counter()
            logs["images_per_s"] = step_images * accelerator.num_processes / max(now - tick, 1e-9)
            logs["step_seconds"] = step_seconds
            tick, step_images, step_seconds, micro_step, sums = now, 0, 0.0, 0, {}
            state.loss_history.append({"step": state.global_step, **logs})
            progress.update(1)
            progress.set_postfix(**{k: f"{logs[k]:.4g}" for k in PROGRESS_KEYS if k in logs},
                                 img_s=f"{logs['images_per_s']:.1f}")  # fmt: skip
            accelerator.log(logs, step=state.global_step)
            validate_and_checkpoint(run, epoch)
            out_of_time = deadline is not None and time.monotonic() > deadline
            if out_of_time and state.global_step < run.max_train_steps:
                state.stopped_by_time_budget = True
                logger.warning(
                    f"--max_train_minutes {args.max_train_minutes} reached: stopping at step "
                    f"{state.global_step} of {run.max_train_steps}; not reproducible by its step count."
                )
            if state.global_step >= run.max_train_steps or state.stopped_by_time_budget:
                done = True
                break
    progress.close()


def validate_and_checkpoint(run: TrainingRun, epoch: int) -> None:
    """Periodic validation (main process) and checkpoint (every process), on the evaluation weights."""
    args, accelerator, step = run.args, run.accelerator, run.state.global_step
    do_validation = bool(args.validation_steps) and step % args.validation_steps == 0
    do_checkpoint = bool(args.checkpointing_steps) and step % args.checkpointing_steps == 0
    if not (do_validation or do_checkpoint):
        return
    with schedule_free_eval(run.optimizer):  # on every process, so replicas stay identical
        if do_validation and accelerator.is_main_process and run.val_images is not None:
            vae = run.objective.vae
            run.state.last_metrics = run_validation(vae, run.val_images, args, accelerator, step, run.ema)
            run.objective.train()
        if do_checkpoint:
            skipped, seen = run.state.totals(accelerator)
            save_checkpoint_atomic(
                accelerator,
                run.output_dir,
                step,
                state={"skipped_images": skipped, "images_seen": seen, "epoch": epoch},
                total_limit=args.checkpoints_total_limit,
            )


def finish(run: TrainingRun) -> dict[str, Any]:
    """Save the final model (EMA weights once averaging, else the evaluation weights) with its card."""
    args, accelerator, state = run.args, run.accelerator, run.state
    skipped_total, images_total = state.totals(accelerator)
    accelerator.wait_for_everyone()
    set_optimizer_mode(run.optimizer, train=False)  # schedule-free: the averaged (evaluation) weights
    final_vae = run.objective.vae
    if ema_is_averaging(run.ema):
        run.ema.copy_to(final_vae.parameters())
    result: dict[str, Any] = {
        "global_step": state.global_step,
        "loss_history": state.loss_history,
        "skipped_images": skipped_total,
        "images_seen": images_total,
        "output_dir": str(run.output_dir),
        "validation": state.last_metrics,
        "stopped_by_time_budget": state.stopped_by_time_budget,
    }
    if accelerator.is_main_process:
        final_vae.eval()
        if args.distill:
            final_vae.register_to_config(num_inference_steps=args.multiscale_stages)
        if run.val_images is not None:
            result["validation"] = run_validation(
                final_vae, run.val_images, args, accelerator, state.global_step, tag="final"
            )
        # Written into a staging folder, then moved file by file (config.json, README.md last), so that a
        # kill never leaves a half-written model in output_dir (a leftover final.tmp is replaced here).
        staging = run.output_dir / FINAL_STAGING
        if staging.exists():
            shutil.rmtree(staging)
        final_vae.save_pretrained(staging, safe_serialization=True)
        strip_local_paths_from_config(staging)  # `_name_or_path` of a loaded initial model or teacher
        if isinstance(final_vae, SSDDAutoencoder):
            info = {**card_info(run, result), "num_inference_steps": final_vae.config.num_inference_steps}
            write_model_card(staging, info)
        crash_point("final:staged")
        publish_files(staging, run.output_dir, last=("config.json", "README.md"))
        if args.push_to_hub:
            push_folder_to_hub(run.output_dir, run.repo_id, token=args.hub_token, private=args.hub_private)
            result["repo_id"] = run.repo_id
        logger.info(
            f"Saved {run.output_dir}. Skipped {skipped_total} unreadable image(s) out of "
            f"{images_total + skipped_total} loaded."
        )
    accelerator.end_training()
    return result


def card_info(run: TrainingRun, result: dict[str, Any]) -> dict[str, Any]:
    """What the model card says about this run (see :func:`ssdd_diffusers.model_card.write_model_card`);
    local folders (data, initial model, teacher, REPA model) by their last component only."""
    args = run.args
    stage = (
        "distillation"
        if args.distill
        else ("joint encoder+decoder" if args.train_encoder else "decoder (frozen encoder)")
    )
    recipe = {
        "stage": stage,
        "optimizer": args.optimizer,
        "learning_rate": args.learning_rate,
        "weight_decay": args.weight_decay,
        "max_grad_norm": args.max_grad_norm,
        "fm_weight": args.fm_weight,
        "lpips_weight": args.lpips_weight,
        "lpips": f"{args.lpips_net} ({args.lpips_backbone})",
        "repa_weight": args.repa_weight,
        "repa_model": public_source_name(args.repa_model),
        "kl_weight": args.kl_weight if args.train_encoder else 0.0,
        "recon_weight": args.recon_weight,
        "recon_loss": args.recon_loss,
        "one_step_fraction": args.one_step_fraction,
        "ema_decay": args.ema_decay,
        "ema_start_step": args.ema_start_step,
        "random_resize_scale": args.random_resize_scale,
        "random_flip": args.random_flip,
        "total_batch_size": run.total_batch,
        "mixed_precision": run.accelerator.mixed_precision,
        "multiscale_stages": args.multiscale_stages,
    }
    if args.distill:
        recipe["teacher"] = public_source_name(args.teacher_model_name_or_path)
        recipe["teacher_steps"] = args.teacher_steps
        recipe["distill_noise"] = args.distill_noise
    return {
        "repo_id": run.repo_id or args.hub_model_id,
        "stage": stage,
        "base_model": public_source_name(run.base_model),
        "data": public_source_name(args.dataset_name or args.train_data_dir)
        or f"scikit-image sample photos ({args.sample_photos})",
        "num_images": result["images_seen"],
        "skipped_images": result["skipped_images"],
        "resolution": args.resolution,
        "global_step": result["global_step"],
        "train_batch_size": args.train_batch_size,
        "recipe": recipe,
        "validation": result["validation"],
    }
