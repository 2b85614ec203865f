"""The SSDD training objective: one ``nn.Module`` that owns the autoencoder, the LPIPS network and the REPA
head and computes the named losses of a batch, for decoder or joint training, GAN-free single-step
distillation, and their multi-scale counterparts (:mod:`.multiscale`).

Keeping everything trainable inside one module lets ``accelerate``/DDP synchronise the REPA projector
together with the decoder.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..multiscale import MultiScaleLayout, MultiScaleNoise
from .losses import REPALoss, flow_matching_loss, kl_loss, perceptual_loss, repa_block_index
from .multiscale import StageBatch, multiscale_distillation_loss, multiscale_flow_matching_loss


# Objective
# ====================================================================================================
@dataclass
class LossWeights:
    """Weights of the SSDD loss terms; a weight of 0 disables the term (and its module is not built).

    Defaults are the upstream recipe: ``1·FM + 0.5·LPIPS + 0.25·REPA + 1e-6·KL`` (KL only applies when
    the encoder trains). In distillation ``fm`` weights the L2 distance to the teacher sample. ``recon``
    weights a reconstruction loss (L1 or L2) of the one-step estimate x̂0 against the ground truth (off in
    the upstream recipe).
    """

    fm: float = 1.0
    lpips: float = 0.5
    repa: float = 0.25
    kl: float = 1e-6
    recon: float = 0.0

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
    one_step_fraction: float = 0.0,
) -> Tensor:
    """Flow-matching times ``t = sigmoid(N(mean, std²))``, shape (B,), float32, in (0, 1); with
    ``one_step_fraction`` p > 0, each time is set to exactly 1 (pure noise: the input of a one-step
    decode) with probability p. The logit-normal alone puts 1.4% of its mass above t = 0.9."""
    u = torch.randn(batch_size, generator=generator, device=device, dtype=torch.float32)
    t = torch.sigmoid(u * std + mean)
    if one_step_fraction > 0:
        pick = torch.rand(batch_size, generator=generator, device=device) < one_step_fraction
        t = torch.where(pick, torch.ones_like(t), t)
    return t


RECON_LOSSES = ("l1", "l2")


def reconstruction_loss(prediction: Tensor, target: Tensor, kind: str = "l1") -> Tensor:
    """Mean absolute (``"l1"``) or squared (``"l2"``) error in float32."""
    diff = prediction.float() - target.float()
    return diff.abs().mean() if kind == "l1" else diff.pow(2).mean()


LOSS_TERMS = ("fm", "lpips", "repa", "kl", "recon")


def weighted_sum(
    weights: LossWeights, terms: dict[str, Tensor | None], loss_scale: float = 1.0
) -> dict[str, Tensor]:
    """``{"loss": loss_scale · Σ_k weight_k · term_k}`` plus every term, detached.

    ``terms`` maps the names of :data:`LOSS_TERMS` to a scalar or ``None`` (term off); they are added in
    that order. ``fm`` is dropped when its weight is 0 (the other terms are ``None`` then).
    """
    total = None
    losses: dict[str, Tensor] = {}
    for name in LOSS_TERMS:
        value = terms.get(name)
        weight = getattr(weights, name)
        if value is None or (name == "fm" and weight <= 0):
            continue
        losses[name] = value
        total = weight * value if total is None else total + weight * value
    if total is None:
        raise ValueError("every loss term is switched off (all weights are 0)")
    out = {"loss": total.float() * loss_scale}
    out.update({name: value.detach() for name, value in losses.items()})
    return out


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


class AutoencoderObjective(nn.Module):
    """What the training loop needs of an objective: the autoencoder ``vae`` (its encoder frozen unless
    ``train_encoder``), the modules the optimiser updates and a train mode that keeps a frozen encoder in
    eval mode. ``forward(images, generator, loss_scale=...)`` returns ``{"loss", <term>: ...}``."""

    vae: nn.Module
    train_encoder: bool

    def trainable_modules(self) -> list[nn.Module]:
        """Modules whose parameters the optimiser updates (frozen parameters are skipped there)."""
        return [self.vae]

    def trainable_parameters(self) -> list[nn.Parameter]:
        """All parameters with ``requires_grad`` (a frozen encoder and the loss networks excluded)."""
        return [p for p in self.parameters() if p.requires_grad]

    def train(self, mode: bool = True) -> AutoencoderObjective:
        """Set train mode; a frozen encoder stays in eval mode (it has no dropout, but be explicit)."""
        super().train(mode)
        if not self.train_encoder:
            self.vae.encoder.eval()
        return self


class SSDDObjective(AutoencoderObjective):
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

    With ``multiscale_stages`` K > 1 the same terms come from the coarse-to-fine objective of
    :mod:`.multiscale` (``target`` is then the list of the teacher's K stage end states). Both paths
    build their terms with the same methods (:meth:`encode_latents`, :meth:`predict_velocity`,
    :meth:`repa_term`) and add them up in :meth:`weighted_losses`.

    Args:
        vae: the ``SSDDAutoencoder`` being trained.
        weights: loss weights; 0 disables a term and skips building its module.
        train_encoder: train encoder + quant_conv (adds the KL term); otherwise they are frozen.
        lpips_net / lpips_backbone: LPIPS trunk (or a custom distance, ``package.module:factory``, see
            :func:`~ssdd_diffusers.training.losses.perceptual_loss`) and ``"pretrained"`` (real) or
            ``"random"`` (tests only).
        repa_model: DINOv2 name or folder for REPA.
        repa_block: middle-transformer block whose output REPA aligns (default ``min(4, L // 2)``).
        logit_normal_mean / logit_normal_std: the time distribution ``t = sigmoid(N(mean, std²))``.
        one_step_fraction: share of training samples at exactly t = 1 (see :func:`sample_logit_normal`).
        recon_loss: ``"l1"`` or ``"l2"``, the reconstruction term weighted by ``weights.recon``: x̂0 against
            the images in training, the student's one-step sample against the images in distillation.
        distill_noise: ``"shared"`` (upstream: the student starts from the teacher's noise and regresses
            its sample) or ``"independent"`` (the student draws its own noise, so the best it can do is
            the teacher's mean sample: a deterministic one-step decoder).
        multiscale_stages: K of the multi-scale objective (1 = ordinary SSDD training).
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
        one_step_fraction: float = 0.0,
        recon_loss: str = "l1",
        distill_noise: str = "shared",
        multiscale_stages: int = 1,
    ) -> None:
        super().__init__()
        self.vae = vae
        self.multiscale_stages = int(multiscale_stages)
        self.weights = weights or LossWeights()
        self.train_encoder = train_encoder
        self.logit_normal_mean = logit_normal_mean
        self.logit_normal_std = logit_normal_std
        if not 0.0 <= one_step_fraction <= 1.0:
            raise ValueError(f"one_step_fraction must be in [0, 1]; got {one_step_fraction}.")
        if recon_loss not in RECON_LOSSES:
            raise ValueError(f"recon_loss must be one of {RECON_LOSSES}; got {recon_loss!r}.")
        if distill_noise not in ("shared", "independent"):
            raise ValueError(f"distill_noise must be 'shared' or 'independent'; got {distill_noise!r}.")
        single_scale_only = one_step_fraction > 0 or self.weights.recon > 0 or distill_noise != "shared"
        if self.multiscale_stages > 1 and single_scale_only:
            raise ValueError(
                "one_step_fraction, the recon loss and independent distillation noise apply to single-scale "
                "training only."
            )
        self.one_step_fraction = one_step_fraction
        self.recon_loss = recon_loss
        self.distill_noise = distill_noise
        set_encoder_trainable(vae, train_encoder)

        self.lpips = perceptual_loss(lpips_net, lpips_backbone) if self.weights.lpips > 0 else None
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

    # ------------------------------------------------------------------------------------------------
    # Building blocks shared by the single- and multi-scale objectives
    # ------------------------------------------------------------------------------------------------
    def encode_latents(self, images: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Any]:
        """Posterior sample z (and the posterior); no gradient through a frozen encoder."""
        with torch.set_grad_enabled(self.train_encoder and torch.is_grad_enabled()):
            posterior = self.vae.encode(images).latent_dist
            z = posterior.sample(generator=generator)
        return z, posterior

    def sample_times(
        self, batch_size: int, generator: torch.Generator | None, device: torch.device
    ) -> Tensor:
        """Training times (B,) float32: the objective's logit-normal, with its share of t = 1."""
        return sample_logit_normal(
            batch_size,
            generator,
            device,
            self.logit_normal_mean,
            self.logit_normal_std,
            self.one_step_fraction,
        )

    def predict_velocity(self, x_t: Tensor, t: Tensor, z: Tensor) -> Tensor:
        """``vae.decoder(x_t, t, z)``; the REPA block's tokens of this call are kept for :meth:`repa_term`."""
        if self._capture is not None:
            self._capture.reset()
        return self.vae.decoder(x_t, t, z)

    def repa_term(self, images: Tensor) -> Tensor | None:
        """REPA loss of the tokens captured in the last :meth:`predict_velocity` call against DINOv2
        features of ``images`` (the clean ground truth of that call's samples); ``None`` without REPA."""
        if self.repa is None or self._capture is None:
            return None
        tokens = self._capture.pop()  # (B, Hm, Wm, D)
        grid = (tokens.shape[1], tokens.shape[2])
        return self.repa(tokens.reshape(tokens.shape[0], grid[0] * grid[1], -1), grid, images)

    def kl_term(self, posterior: Any) -> Tensor | None:
        """KL of the posterior when the encoder trains (and the KL weight is positive), else ``None``."""
        if not self.train_encoder or self.weights.kl <= 0 or posterior is None:
            return None
        return kl_loss(posterior)

    def recon_term(self, prediction: Tensor, images: Tensor) -> Tensor | None:
        """Reconstruction loss of ``prediction`` against ``images`` when its weight is positive."""
        if self.weights.recon <= 0:
            return None
        return reconstruction_loss(prediction, images, self.recon_loss)

    def weighted_losses(self, terms: dict[str, Tensor | None], loss_scale: float = 1.0) -> dict[str, Tensor]:
        """:func:`weighted_sum` of ``terms`` with this objective's weights."""
        return weighted_sum(self.weights, terms, loss_scale)

    # ------------------------------------------------------------------------------------------------
    def forward(
        self,
        images: Tensor,
        generator: torch.Generator | None = None,
        *,
        z: Tensor | None = None,
        noise: Tensor | None = None,
        target: Tensor | list[Tensor] | None = None,
        loss_scale: float = 1.0,
    ) -> dict[str, Tensor]:
        """Losses for one batch of ground-truth ``images`` (B, 3, H, W) in [-1, 1].

        Args:
            images: ground-truth images (REPA always aligns with these).
            generator: source of z-sampling, t and ε (pass one seeded per step for exact resume).
            z / noise / target: distillation inputs (teacher latents, shared starting noise, teacher
                sample, or the K stage end states with ``multiscale_stages > 1``). With ``target`` the
                distillation objective is computed.
            loss_scale: multiplies ``"loss"`` (0 turns a step into a no-op for an all-corrupt batch).
        """
        if target is not None:
            if z is None:
                z, _ = self.encode_latents(images, generator)
            if noise is None or self.distill_noise == "independent":
                noise = torch.randn(
                    images.shape, generator=generator, device=images.device, dtype=torch.float32
                )
            terms = self._distillation_terms(images, z, noise, target)
        elif self.multiscale_stages > 1:
            terms = self.multiscale_training_terms(images, generator, self.multiscale_stages)
        else:
            terms = self._training_terms(images, generator)
        return self.weighted_losses(terms, loss_scale)

    def _training_terms(self, images: Tensor, generator: torch.Generator | None) -> dict[str, Tensor | None]:
        """Flow matching at a random time, LPIPS on the one-step estimate x̂0, REPA, KL."""
        z, posterior = self.encode_latents(images, generator)
        noise = torch.randn(images.shape, generator=generator, device=images.device, dtype=torch.float32)
        noise = noise.to(images.dtype)
        t = self.sample_times(images.shape[0], generator, images.device)
        t_ = t.view(-1, 1, 1, 1).to(images.dtype)
        x_t = (1 - t_) * images + t_ * noise
        v_pred = self.predict_velocity(x_t, t, z)
        x0_pred = x_t + t.view(-1, 1, 1, 1).to(v_pred.dtype) * v_pred
        return {
            "fm": flow_matching_loss(v_pred, images - noise) if self.weights.fm > 0 else None,
            "lpips": self.lpips(x0_pred, images) if self.lpips is not None else None,
            "repa": self.repa_term(images),
            "kl": self.kl_term(posterior),
            "recon": self.recon_term(x0_pred, images),
        }

    def _distillation_terms(
        self, images: Tensor, z: Tensor, noise: Tensor, target: Tensor | list[Tensor]
    ) -> dict[str, Tensor | None]:
        """The student's one-step sample from the teacher's noise against the teacher's sample."""
        if self.multiscale_stages > 1:
            return self.multiscale_distillation_terms(images, z, noise, target, self.multiscale_stages)
        noise = noise.to(images.dtype)
        teacher_sample = target.to(images.dtype)
        t = torch.ones(images.shape[0], device=images.device, dtype=torch.float32)
        v_pred = self.predict_velocity(noise, t, z)
        student_sample = noise + v_pred
        return {
            "fm": flow_matching_loss(v_pred, teacher_sample - noise) if self.weights.fm > 0 else None,
            "lpips": self.lpips(student_sample, teacher_sample) if self.lpips is not None else None,
            "repa": self.repa_term(images),
            "recon": self.recon_term(student_sample, images),
        }

    # ------------------------------------------------------------------------------------------------
    # Multi-scale (arXiv 2603.19570): the same terms from the coarse-to-fine objective of .multiscale
    # ------------------------------------------------------------------------------------------------
    def multiscale_training_terms(
        self, images: Tensor, generator: torch.Generator | None, layout: MultiScaleLayout | int
    ) -> dict[str, Tensor | None]:
        """Terms of multi-scale decoder training: FM over the stages, LPIPS on final-stage samples, REPA
        at every stage (the hooked block's tokens against DINOv2 features of the image at that stage's
        token grid) and KL when the encoder trains."""
        z, posterior = self.encode_latents(images, generator)

        def repa_hook(group: StageBatch, v_pred: Tensor) -> Tensor | None:
            return self.repa_term(images[group.index])

        parts = multiscale_flow_matching_loss(
            self.predict_velocity,
            images,
            z,
            layout,
            generator,
            lpips_fn=self.lpips,
            stage_hook=repa_hook if self.repa is not None else None,
            logit_normal=(self.logit_normal_mean, self.logit_normal_std),
        )
        return {
            "fm": parts["fm"],
            "lpips": parts.get("lpips"),
            "repa": parts.get("hook"),
            "kl": self.kl_term(posterior),
        }

    def multiscale_distillation_terms(
        self,
        images: Tensor,
        z: Tensor,
        noise: Tensor | MultiScaleNoise,
        teacher_stages: Sequence[Tensor],
        layout: MultiScaleLayout | int,
    ) -> dict[str, Tensor | None]:
        """Terms of per-scale distillation: the per-stage L2 of ``multiscale_distillation_loss``, LPIPS of
        the final student and teacher images, REPA of the final stage against the ground truth."""
        parts = multiscale_distillation_loss(
            lambda x, t: self.predict_velocity(x, t, z), noise, teacher_stages, layout
        )
        lpips = None
        if self.lpips is not None:
            lpips = self.lpips(parts["sample"], teacher_stages[-1].to(parts["sample"].dtype))
        return {"fm": parts["mse"], "lpips": lpips, "repa": self.repa_term(images)}


class AutoencoderKLObjective(AutoencoderObjective):
    """The deterministic baseline: a diffusers ``AutoencoderKL`` trained to reconstruct the images with the
    reconstruction loss (``weights.recon``, L1 by default) and LPIPS (``weights.lpips``), on its frozen
    encoder's latents, or jointly with its encoder (``train_encoder``, adding ``weights.kl``·KL). It is
    what SSDD is compared with at equal compute; the training loop runs it like :class:`SSDDObjective`
    (``--decoder_type kl``).

    ``forward(images, generator)`` draws ``z`` from the posterior (as SSDD training does) and returns
    ``{"loss", "recon"?, "lpips"?, "kl"?}``.
    """

    repa = None

    def __init__(
        self,
        vae: nn.Module,
        weights: LossWeights | None = None,
        train_encoder: bool = False,
        recon_loss: str = "l1",
        lpips_net: str = "vgg",
        lpips_backbone: str = "pretrained",
    ) -> None:
        super().__init__()
        self.vae = vae
        self.weights = weights or LossWeights(fm=0.0, lpips=0.0, repa=0.0, kl=1e-6, recon=1.0)
        if recon_loss not in RECON_LOSSES:
            raise ValueError(f"recon_loss must be one of {RECON_LOSSES}; got {recon_loss!r}.")
        if self.weights.recon <= 0 and self.weights.lpips <= 0:
            raise ValueError("an AutoencoderKL needs --recon_weight > 0 or --lpips_weight > 0.")
        self.train_encoder = train_encoder
        self.recon_loss = recon_loss
        set_encoder_trainable(vae, train_encoder)
        self.lpips = perceptual_loss(lpips_net, lpips_backbone) if self.weights.lpips > 0 else None

    def forward(
        self, images: Tensor, generator: torch.Generator | None = None, *, loss_scale: float = 1.0
    ) -> dict[str, Tensor]:
        """Losses of one batch of images (B, 3, H, W) in [-1, 1]."""
        with torch.set_grad_enabled(self.train_encoder and torch.is_grad_enabled()):
            posterior = self.vae.encode(images).latent_dist
            z = posterior.sample(generator=generator)
        reconstruction = self.vae.decode(z).sample
        recon = (
            reconstruction_loss(reconstruction, images, self.recon_loss) if self.weights.recon > 0 else None
        )
        terms = {
            "lpips": self.lpips(reconstruction, images) if self.lpips is not None else None,
            "kl": kl_loss(posterior) if self.train_encoder and self.weights.kl > 0 else None,
            "recon": recon,
        }
        return weighted_sum(self.weights, terms, loss_scale)


def set_encoder_trainable(vae: nn.Module, trainable: bool) -> None:
    """Freeze (``requires_grad=False``, eval mode) or unfreeze the encoder and ``quant_conv``."""
    for module in (vae.encoder, vae.quant_conv):
        if module is None:  # AutoencoderKL(use_quant_conv=False)
            continue
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
