"""Library-side training logic for SSDD, so that the training scripts stay thin.

Contents:

* :class:`SSDDObjective`: one ``nn.Module`` that owns the autoencoder, the LPIPS network and the REPA
  head, and computes the named losses of one batch (flow matching, LPIPS, REPA, KL) for decoder or
  joint training, and the GAN-free single-step distillation objective (:func:`distillation_targets`
  produces the frozen teacher's N-step targets). Keeping everything trainable inside one module lets
  ``accelerate``/DDP synchronise the REPA projector together with the decoder.
* Optimisation: weight-decay parameter groups (:func:`weight_decay_param_groups`), the optimiser
  factory (:func:`create_optimizer`: ``radam_schedulefree`` or ``adamw`` with warm-up) and the
  schedule-free train/eval switch (:func:`schedule_free_eval`).
* EMA (:func:`create_ema`) with ``--ema_start_step`` semantics.
* Reproducibility: randomness as a pure function of ``(seed, step, ...)`` (:func:`step_generator`,
  :class:`EpochShuffleSampler`, :class:`SeededAugmentDataset`), which makes resuming exact.
* Checkpoints: atomic writes (:func:`save_checkpoint_atomic`), ``latest`` resolution that ignores
  incomplete folders (:func:`resolve_resume_checkpoint`), rotation (:func:`prune_checkpoints`).
* Validation helpers (:func:`psnr`, :func:`reconstruction_grid`), the model card
  (:func:`write_model_card`, re-exported from :mod:`ssdd_diffusers.model_card`) and the Hub upload
  (:func:`push_folder_to_hub`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import Dataset, IterableDataset, Sampler

from .evaluation import make_image_grid
from .losses import LPIPSLoss, REPALoss, flow_matching_loss, kl_loss, repa_block_index
from .metrics import to_uint8
from .model_card import write_model_card, write_model_card_for_folder

logger = logging.getLogger(__name__)

OPTIMIZERS = ("radam_schedulefree", "adamw")
CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_TMP_SUFFIX = ".tmp"
CHECKPOINT_MARKER = "ssdd_checkpoint.json"
"""File written last into a checkpoint folder; a folder without it is incomplete."""
_CHECKPOINT_RE = re.compile(rf"^{re.escape(CHECKPOINT_PREFIX)}(\d+)$")


# ====================================================================================================
# Objective
# ====================================================================================================
@dataclass
class LossWeights:
    """Weights of the SSDD loss terms; a weight of 0 disables the term (and its module is not built).

    Defaults are the upstream recipe: ``1·FM + 0.5·LPIPS + 0.25·REPA + 1e-6·KL`` (KL only applies when
    the encoder trains). In distillation ``fm`` weights the L2 distance to the teacher sample.
    """

    fm: float = 1.0
    lpips: float = 0.5
    repa: float = 0.25
    kl: float = 1e-6

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value < 0 or not math.isfinite(value):
                raise ValueError(f"loss weight {name} must be a finite number >= 0, got {value}")


def sample_logit_normal(
    batch_size: int,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    mean: float = 0.0,
    std: float = 1.0,
) -> Tensor:
    """Flow-matching times ``t = sigmoid(N(mean, std²))``, shape (B,), float32, in (0, 1)."""
    u = torch.randn(batch_size, generator=generator, device=device, dtype=torch.float32)
    return torch.sigmoid(u * std + mean)


class BlockOutputCapture:
    """Forward hook that keeps the first output of ``module`` since the last :meth:`reset`.

    Used to read the middle-transformer tokens for REPA. Under gradient checkpointing the block runs a
    second time during backward; only the first (graph-connected) output of a forward pass is kept.
    """

    def __init__(self, module: nn.Module) -> None:
        self.output: Tensor | None = None
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if self.output is None:
            self.output = output[0] if isinstance(output, (tuple, list)) else output

    def reset(self) -> None:
        """Forget the captured output (call before each forward pass)."""
        self.output = None

    def pop(self) -> Tensor:
        """Return the captured output and forget it."""
        if self.output is None:
            raise RuntimeError("the hooked block did not run during the forward pass")
        output, self.output = self.output, None
        return output

    def remove(self) -> None:
        """Remove the hook."""
        self._handle.remove()


class SSDDObjective(nn.Module):
    """The SSDD training objective around an ``SSDDAutoencoder``.

    ``forward(images, generator)`` returns a dict of scalar tensors: ``"loss"`` (weighted sum, with
    gradient) and each enabled term, ``"fm"``, ``"lpips"``, ``"repa"``, ``"kl"``, unweighted and detached.

    Decoder training (default): ``z = posterior.sample()`` (under ``no_grad`` when the encoder is frozen),
    ``t ~ sigmoid(N(0, 1))``, ``x_t = (1-t)·x + t·ε``, ``FM = ||v̂ - (x - ε)||²``,
    ``LPIPS(x̂0, x)`` with ``x̂0 = x_t + t·v̂``, ``REPA(tokens, x)`` and ``KL(posterior)`` when the encoder
    trains.

    Distillation (``forward(images, z=z, noise=eps, target=x_teacher)``): the student takes one step from
    ``ε`` at ``t = 1``: ``x̂ = ε + v̂(ε, 1, z)``; ``FM = ||x̂ - x_teacher||²`` (the L2 term),
    ``LPIPS(x̂, x_teacher)`` and ``REPA(tokens, x)`` against the ground-truth images.

    Args:
        vae: the ``SSDDAutoencoder`` being trained.
        weights: loss weights; 0 disables a term and skips building its module.
        train_encoder: train encoder + quant_conv (adds the KL term); otherwise they are frozen.
        lpips_net / lpips_backbone: LPIPS trunk and ``"pretrained"`` (real) or ``"random"`` (tests only).
        repa_model: DINOv2 name or folder for REPA.
        repa_block: middle-transformer block whose output REPA aligns (default ``min(4, L // 2)``).
        multiscale_stages: K > 1 trains the multi-scale (coarse-to-fine) objective of
            ``ssdd_diffusers.multiscale`` (``multiscale_objective_losses``); with ``target`` (then the list
            of the teacher's K stage end states) the per-scale distillation objective
            (``multiscale_objective_distillation_losses``).
    """

    def __init__(
        self,
        vae: nn.Module,
        weights: LossWeights | None = None,
        train_encoder: bool = False,
        lpips_net: str = "vgg",
        lpips_backbone: str = "pretrained",
        repa_model: str = "facebook/dinov2-base",
        repa_block: int | None = None,
        logit_normal_mean: float = 0.0,
        logit_normal_std: float = 1.0,
        multiscale_stages: int = 1,
    ) -> None:
        super().__init__()
        self.vae = vae
        self.multiscale_stages = int(multiscale_stages)
        self.weights = weights or LossWeights()
        self.train_encoder = train_encoder
        self.logit_normal_mean = logit_normal_mean
        self.logit_normal_std = logit_normal_std
        set_encoder_trainable(vae, train_encoder)

        self.lpips = LPIPSLoss(net=lpips_net, backbone=lpips_backbone) if self.weights.lpips > 0 else None
        self.repa: REPALoss | None = None
        self._capture: BlockOutputCapture | None = None
        if self.weights.repa > 0:
            blocks = vae.decoder.mid_block.transformer_blocks
            index = repa_block_index(len(blocks)) if repa_block is None else repa_block
            hidden_dim = vae.decoder.mid_block.proj_in.out_features
            self.repa = REPALoss(hidden_dim, model_name_or_path=repa_model)
            self.repa_block = index
            self._capture = BlockOutputCapture(blocks[index])

    # ------------------------------------------------------------------------------------------------
    def trainable_modules(self) -> list[nn.Module]:
        """Modules whose parameters the optimiser updates: the autoencoder and the REPA projector."""
        modules: list[nn.Module] = [self.vae]
        if self.repa is not None:
            modules.append(self.repa.projector)
        return modules

    def trainable_parameters(self) -> list[nn.Parameter]:
        """All parameters with ``requires_grad`` (frozen encoder, LPIPS and DINOv2 excluded)."""
        return [p for p in self.parameters() if p.requires_grad]

    def train(self, mode: bool = True) -> SSDDObjective:
        """Set train mode; a frozen encoder stays in eval mode (it has no dropout, but be explicit)."""
        super().train(mode)
        if not self.train_encoder:
            self.vae.encoder.eval()
        return self

    # ------------------------------------------------------------------------------------------------
    def encode_latents(self, images: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Any]:
        """Posterior sample z (and the posterior); no gradient through a frozen encoder."""
        with torch.set_grad_enabled(self.train_encoder and torch.is_grad_enabled()):
            posterior = self.vae.encode(images).latent_dist
            z = posterior.sample(generator=generator)
        return z, posterior

    def forward(
        self,
        images: Tensor,
        generator: torch.Generator | None = None,
        *,
        z: Tensor | None = None,
        noise: Tensor | None = None,
        target: Tensor | None = None,
        loss_scale: float = 1.0,
    ) -> dict[str, Tensor]:
        """Losses for one batch of ground-truth ``images`` (B, 3, H, W) in [-1, 1].

        Args:
            images: ground-truth images (REPA always aligns with these).
            generator: source of z-sampling, t and ε (pass one seeded per step for exact resume).
            z / noise / target: distillation inputs (teacher latents, shared starting noise, teacher
                sample). With ``target`` the single-step distillation objective is computed.
            loss_scale: multiplies ``"loss"`` (0 turns a step into a no-op for an all-corrupt batch).
        """
        if self.multiscale_stages > 1:
            from .multiscale import multiscale_objective_distillation_losses, multiscale_objective_losses

            if target is None:
                out = multiscale_objective_losses(self, images, generator, self.multiscale_stages)
            else:
                out = multiscale_objective_distillation_losses(
                    self, images, z, noise, target, self.multiscale_stages
                )
            out["loss"] = out["loss"] * loss_scale
            return out
        batch = images.shape[0]
        device = images.device
        distill = target is not None
        posterior = None
        if z is None:
            z, posterior = self.encode_latents(images, generator)
        if noise is None:
            noise = torch.randn(images.shape, generator=generator, device=device, dtype=torch.float32)
        noise = noise.to(images.dtype)

        if distill:
            t = torch.ones(batch, device=device, dtype=torch.float32)
            x_t = noise
            clean = target.to(images.dtype)
        else:
            t = sample_logit_normal(batch, generator, device, self.logit_normal_mean, self.logit_normal_std)
            t_ = t.view(-1, 1, 1, 1).to(images.dtype)
            x_t = (1 - t_) * images + t_ * noise
            clean = images
        v_target = clean - noise

        if self._capture is not None:
            self._capture.reset()
        v_pred = self.vae.decoder(x_t, t, z)
        x0_pred = x_t + t.view(-1, 1, 1, 1).to(v_pred.dtype) * v_pred

        losses: dict[str, Tensor] = {}
        total = images.new_zeros((), dtype=torch.float32)
        if self.weights.fm > 0:
            losses["fm"] = flow_matching_loss(v_pred, v_target)
            total = total + self.weights.fm * losses["fm"]
        if self.lpips is not None:
            losses["lpips"] = self.lpips(x0_pred, clean)
            total = total + self.weights.lpips * losses["lpips"]
        if self.repa is not None and self._capture is not None:
            tokens = self._capture.pop()  # (B, Hm, Wm, D)
            grid = (tokens.shape[1], tokens.shape[2])
            losses["repa"] = self.repa(tokens.reshape(batch, grid[0] * grid[1], -1), grid, images)
            total = total + self.weights.repa * losses["repa"]
        if self.train_encoder and self.weights.kl > 0 and posterior is not None:
            losses["kl"] = kl_loss(posterior)
            total = total + self.weights.kl * losses["kl"]
        out = {"loss": total * loss_scale}
        out.update({name: value.detach() for name, value in losses.items()})
        return out


def set_encoder_trainable(vae: nn.Module, trainable: bool) -> None:
    """Freeze (``requires_grad=False``, eval mode) or unfreeze the encoder and ``quant_conv``."""
    for module in (vae.encoder, vae.quant_conv):
        module.requires_grad_(trainable)
        if not trainable:
            module.eval()


@torch.no_grad()
def distillation_targets(
    teacher: nn.Module,
    images: Tensor,
    generator: torch.Generator | None,
    num_inference_steps: int = 12,
) -> tuple[Tensor, Tensor, Tensor]:
    """Frozen-teacher targets for single-step distillation.

    ``z = teacher.encode(x).latent_dist.mode()``, ``ε ~ N(0, I)`` from ``generator`` and
    ``x_T = teacher.decode(z, noise=ε, num_inference_steps=N)``, all without gradient.

    Returns:
        ``(z, noise, teacher_sample)``.
    """
    z = teacher.encode(images).latent_dist.mode()
    noise = torch.randn(images.shape, generator=generator, device=images.device, dtype=torch.float32)
    sample = teacher.decode(z, noise=noise, num_inference_steps=num_inference_steps).sample
    return z, noise, sample.to(images.dtype)


# ====================================================================================================
# Optimisation
# ====================================================================================================
_DECAY_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d)


def split_weight_decay_parameters(
    modules: nn.Module | Iterable[nn.Module],
) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """Split trainable parameters into (decay, no_decay) lists of ``(name, parameter)``.

    Following the SSDD recipe (design §4), only the ``weight`` of convolution and linear layers is
    decayed; biases, normalisation parameters (1-D), relative-position bias tables and any other
    parameter (embeddings, ...) are not. Frozen parameters are left out; shared ones are listed once.
    """
    if isinstance(modules, nn.Module):
        modules = [modules]
    decay: list[tuple[str, nn.Parameter]] = []
    no_decay: list[tuple[str, nn.Parameter]] = []
    seen: set[int] = set()
    for index, root in enumerate(modules):
        for module_name, module in root.named_modules():
            for param_name, param in module.named_parameters(recurse=False):
                if not param.requires_grad or id(param) in seen:
                    continue
                seen.add(id(param))
                name = f"{index}.{module_name}.{param_name}" if module_name else f"{index}.{param_name}"
                if isinstance(module, _DECAY_MODULES) and param_name == "weight" and param.ndim > 1:
                    decay.append((name, param))
                else:
                    no_decay.append((name, param))
    return decay, no_decay


def weight_decay_param_groups(
    modules: nn.Module | Iterable[nn.Module], weight_decay: float
) -> list[dict[str, Any]]:
    """Parameter groups ``[{decay params, weight_decay}, {the rest, 0.0}]`` (empty groups dropped)."""
    decay, no_decay = split_weight_decay_parameters(modules)
    groups = [
        {"params": [p for _, p in decay], "weight_decay": weight_decay},
        {"params": [p for _, p in no_decay], "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]


def create_optimizer(
    name: str,
    param_groups: list[dict[str, Any]],
    learning_rate: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """``radam_schedulefree`` (``schedulefree.RAdamScheduleFree``, no LR schedule) or ``adamw``.

    Weight decay comes from the groups (see :func:`weight_decay_param_groups`). A schedule-free
    optimiser starts in eval mode; call ``optimizer.train()`` before the first step.
    """
    if name == "radam_schedulefree":
        import schedulefree

        return schedulefree.RAdamScheduleFree(param_groups, lr=learning_rate, betas=betas, eps=eps)
    if name == "adamw":
        return torch.optim.AdamW(param_groups, lr=learning_rate, betas=betas, eps=eps)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}")


def create_lr_scheduler(
    optimizer_name: str,
    optimizer: torch.optim.Optimizer,
    scheduler_name: str = "constant_with_warmup",
    warmup_steps: int = 0,
    total_steps: int | None = None,
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """``diffusers.optimization.get_scheduler`` for AdamW (linear warm-up by default); ``None`` for a
    schedule-free optimiser, which needs no schedule."""
    if is_schedule_free(optimizer) or optimizer_name == "radam_schedulefree":
        return None
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        scheduler_name, optimizer=optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps
    )


def _base_optimizer(optimizer: Any) -> Any:
    """Unwrap accelerate's ``AcceleratedOptimizer`` (and DeepSpeed's extra wrapper)."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def is_schedule_free(optimizer: Any) -> bool:
    """Whether ``optimizer`` (possibly wrapped by accelerate) is a schedule-free optimiser."""
    base = _base_optimizer(optimizer)
    return bool(base.param_groups) and "train_mode" in base.param_groups[0]


def set_optimizer_mode(optimizer: Any, train: bool) -> None:
    """Schedule-free ``optimizer.train()``/``.eval()`` (swaps the model weights between the gradient
    point y and the averaged point x); a no-op for other optimisers."""
    if not is_schedule_free(optimizer):
        return
    base = _base_optimizer(optimizer)
    if train:
        base.train()
    else:
        base.eval()


@contextlib.contextmanager
def schedule_free_eval(optimizer: Any) -> Iterator[None]:
    """Context in which the model holds the schedule-free evaluation weights (x).

    Use around validation and checkpoint saving, on every process (the switch is not bit-exactly
    reversible, so all replicas must perform the same switches to stay identical).
    """
    set_optimizer_mode(optimizer, train=False)
    try:
        yield
    finally:
        set_optimizer_mode(optimizer, train=True)


def clip_grad_norm(parameters: Iterable[Tensor], max_norm: float) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_``; a ``max_norm`` <= 0 only measures the norm."""
    params = [p for p in parameters if p.grad is not None]
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    if not params:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))


# ====================================================================================================
# EMA
# ====================================================================================================
def create_ema(model: nn.Module, decay: float = 0.999, start_step: int = 50_000) -> Any:
    """``diffusers.training_utils.EMAModel`` over ``model`` with SSDD's ``--ema_start_step`` semantics.

    For the first ``start_step`` optimisation steps the decay is 0 (the EMA is a copy of the weights);
    after that it is ``min(decay, (1 + n) / (10 + n))`` with ``n`` the number of steps since the start.
    """
    from diffusers.training_utils import EMAModel

    return EMAModel(
        model.parameters(),
        decay=decay,
        min_decay=0.0,
        update_after_step=start_step,
        use_ema_warmup=False,
        model_cls=type(model),
        model_config=model.config,
    )


def ema_is_averaging(ema: Any) -> bool:
    """Whether the EMA has started averaging (before ``start_step`` it only copies the weights)."""
    return ema is not None and ema.optimization_step > ema.update_after_step + 1


# ====================================================================================================
# Reproducible randomness
# ====================================================================================================
def derive_seed(*values: int) -> int:
    """A well-mixed 63-bit seed from integers (``numpy.random.SeedSequence``)."""
    state = np.random.SeedSequence([int(v) & 0xFFFFFFFF for v in values]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def step_generator(
    seed: int, step: int, micro_step: int, process_index: int, device: torch.device | str
) -> torch.Generator:
    """Generator for the training noise of one micro-batch, a pure function of its coordinates.

    Nothing about the noise has to be checkpointed, so a resumed run draws the same z, t and ε as an
    uninterrupted one; each process draws different noise.
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(derive_seed(seed, step, micro_step, process_index, 0x55DD))
    return generator


class EpochShuffleSampler(Sampler[int]):
    """Random permutation of ``range(n)`` that depends only on ``(seed, epoch)``.

    Every process computes the same order (accelerate then shards the batches), and a resumed run can
    skip the batches already consumed in the current epoch. Call :meth:`set_epoch` at each epoch.
    """

    def __init__(self, num_samples: int, seed: int = 0, shuffle: bool = True) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch``."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.num_samples))
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, 0x5A))
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())


class SeededAugmentDataset(Dataset):
    """Map-style wrapper: item ``i`` is produced with torch's RNG seeded from ``(seed, epoch, i)``.

    The wrapped dataset's random augmentation (which uses torch's global RNG) thus depends only on the
    sample's coordinates, not on how many batches were prefetched or skipped; the global RNG state is
    restored afterwards.
    """

    def __init__(self, dataset: Dataset, seed: int = 0) -> None:
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation seeds of ``epoch``."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.seed, self.epoch, int(index), 0xA6))
            return self.dataset[index]


class SeededAugmentIterableDataset(IterableDataset):
    """Iterable counterpart of :class:`SeededAugmentDataset` (seeds from the stream position)."""

    def __init__(self, dataset: IterableDataset, seed: int = 0) -> None:
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation seeds of ``epoch`` and forward the epoch to the stream."""
        self.epoch = epoch
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __iter__(self) -> Iterator[Any]:
        iterator = iter(self.dataset)
        position = 0
        while True:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(derive_seed(self.seed, self.epoch, position, 0xA6))
                try:
                    item = next(iterator)
                except StopIteration:
                    return
            position += 1
            yield item


# ====================================================================================================
# Checkpoints
# ====================================================================================================
def checkpoint_step(path: str | os.PathLike) -> int | None:
    """Step of a ``checkpoint-N`` folder name, ``None`` for any other name (``checkpoint-N.tmp``, ...)."""
    match = _CHECKPOINT_RE.match(Path(path).name)
    return int(match.group(1)) if match else None


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    """A ``checkpoint-N`` folder holding the completion marker (written last, before the rename)."""
    path = Path(path)
    return path.is_dir() and checkpoint_step(path) is not None and (path / CHECKPOINT_MARKER).is_file()


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of ``output_dir``, oldest first; temporary or incomplete folders are ignored."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if is_complete_checkpoint(p)]
    return sorted(found, key=lambda p: checkpoint_step(p) or 0)


def resolve_resume_checkpoint(output_dir: str | os.PathLike, value: str | None) -> Path | None:
    """Checkpoint folder to resume from.

    ``"latest"``: the newest complete checkpoint of ``output_dir`` (``None`` if there is none, so a run
    can always be started with ``--resume_from_checkpoint latest``). A path (absolute, or a folder name
    inside ``output_dir``) must be a complete checkpoint, else ``FileNotFoundError``.
    """
    if value is None:
        return None
    if value == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(value)
    if not path.is_absolute() and not path.exists():
        path = Path(output_dir) / value
    if not path.is_dir() or not (path / CHECKPOINT_MARKER).is_file():
        raise FileNotFoundError(f"{value} is not a complete checkpoint folder (missing {CHECKPOINT_MARKER})")
    return path


def read_checkpoint_state(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON completion marker of a checkpoint (``step`` and the training counters)."""
    return json.loads((Path(path) / CHECKPOINT_MARKER).read_text())


def prune_checkpoints(output_dir: str | os.PathLike, total_limit: int | None, reserve: int = 1) -> list[Path]:
    """Delete the oldest complete checkpoints so that at most ``total_limit - reserve`` remain (room for
    the ``reserve`` about to be written), plus stale temporary folders. Returns the deleted paths."""
    root = Path(output_dir)
    removed: list[Path] = []
    if root.is_dir():
        for stale in root.glob(f"{CHECKPOINT_PREFIX}*{CHECKPOINT_TMP_SUFFIX}"):
            shutil.rmtree(stale, ignore_errors=True)
            removed.append(stale)
    if total_limit is None or total_limit <= 0:
        return removed
    checkpoints = list_checkpoints(root)
    excess = len(checkpoints) - max(total_limit - reserve, 0)
    for path in checkpoints[: max(excess, 0)]:
        logger.info("Removing old checkpoint %s (checkpoints_total_limit=%d)", path, total_limit)
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def save_checkpoint_atomic(
    accelerator: Any,
    output_dir: str | os.PathLike,
    step: int,
    state: Mapping[str, Any] | None = None,
    total_limit: int | None = None,
) -> Path:
    """``accelerator.save_state`` into ``checkpoint-N.tmp``, then rename it to ``checkpoint-N``.

    Must be called on every process. The main process first rotates old checkpoints (keeping at most
    ``total_limit`` including the new one), writes the completion marker (``state`` as JSON) last, and
    renames the folder with ``os.replace``; an interrupted save leaves only a ``.tmp`` folder, which
    ``latest`` ignores and the next save removes.
    """
    root = Path(output_dir)
    final = root / f"{CHECKPOINT_PREFIX}{step}"
    tmp = root / f"{CHECKPOINT_PREFIX}{step}{CHECKPOINT_TMP_SUFFIX}"
    if accelerator.is_main_process:
        prune_checkpoints(root, total_limit, reserve=0 if final.exists() else 1)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        marker = {"step": int(step), "time": time.time(), **(dict(state) if state else {})}
        (tmp / CHECKPOINT_MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        logger.info("Saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


# ====================================================================================================
# Validation
# ====================================================================================================
def psnr(prediction: Tensor, target: Tensor) -> Tensor:
    """Per-image PSNR (dB) of images in [-1, 1], clamped and quantised to 8 bits first: (B,).

    Unlike :func:`ssdd_diffusers.metrics.psnr`, identical images give 100 dB (not inf), so that loggers
    always receive a finite number."""
    mse = ((to_uint8(prediction).float() - to_uint8(target).float()) / 255.0).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def reconstruction_grid(columns: Sequence[Tensor], padding: int = 2) -> Image.Image:
    """One row per image, one column per tensor (e.g. input | 1-step | N-step), white padding."""
    rows = [torch.stack([column[r] for column in columns]) for r in range(columns[0].shape[0])]
    return make_image_grid(rows, padding=padding)


@torch.no_grad()
def reconstruct(vae: Any, images: Tensor, num_inference_steps: int, seed: int = 0) -> Tensor:
    """Encode (posterior mode) and decode ``images`` with fixed noise from ``seed``."""
    z = vae.encode(images).latent_dist.mode()
    generator = torch.Generator(device=images.device).manual_seed(seed)
    return vae.decode(z, num_inference_steps=num_inference_steps, generator=generator).sample


# ====================================================================================================
# Model card and Hub
# ====================================================================================================
HUB_IGNORE_PATTERNS = [f"{CHECKPOINT_PREFIX}*", "*.tmp", "logs/*", "logs"]


def push_folder_to_hub(
    output_dir: str | os.PathLike,
    repo_id: str,
    token: str | None = None,
    private: bool = False,
    commit_message: str = "End of training",
) -> Any:
    """Create the model repo (if needed) and upload ``output_dir`` without intermediate checkpoints."""
    from huggingface_hub import create_repo, upload_folder

    repo_id = create_repo(repo_id, exist_ok=True, token=token, private=private).repo_id
    return upload_folder(
        repo_id=repo_id,
        folder_path=str(output_dir),
        commit_message=commit_message,
        ignore_patterns=HUB_IGNORE_PATTERNS,
        token=token,
    )


def format_losses(values: Mapping[str, float], keys: Iterable[str] | None = None) -> dict[str, str]:
    """Short strings of loss values for a progress bar postfix."""
    keys = keys if keys is not None else values.keys()
    return {k: f"{values[k]:.4g}" for k in keys if k in values}


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """Run ``fn`` and return ``(result, seconds)``."""
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


__all__ = [
    "CHECKPOINT_MARKER",
    "OPTIMIZERS",
    "BlockOutputCapture",
    "EpochShuffleSampler",
    "LossWeights",
    "SSDDObjective",
    "SeededAugmentDataset",
    "SeededAugmentIterableDataset",
    "clip_grad_norm",
    "create_ema",
    "create_lr_scheduler",
    "create_optimizer",
    "derive_seed",
    "distillation_targets",
    "ema_is_averaging",
    "is_complete_checkpoint",
    "is_schedule_free",
    "list_checkpoints",
    "prune_checkpoints",
    "psnr",
    "push_folder_to_hub",
    "read_checkpoint_state",
    "reconstruct",
    "reconstruction_grid",
    "resolve_resume_checkpoint",
    "sample_logit_normal",
    "save_checkpoint_atomic",
    "schedule_free_eval",
    "set_encoder_trainable",
    "set_optimizer_mode",
    "split_weight_decay_parameters",
    "step_generator",
    "weight_decay_param_groups",
    "write_model_card",
    "write_model_card_for_folder",
]
