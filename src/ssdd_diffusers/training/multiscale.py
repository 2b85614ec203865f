r"""Multi-scale (coarse-to-fine) training and per-scale distillation of the SSDD decoder (arXiv 2603.19570).

The stage layout, noise and sampler are in :mod:`ssdd_diffusers.multiscale`; this module builds the
training tensors and losses on top of them.

:func:`multiscale_flow_matching_targets` builds the per-stage training tensors of a batch (each sample
gets one stage; samples are grouped by stage since stages have different sizes);
:func:`multiscale_flow_matching_loss` is the FM loss (plus optional LPIPS on final-stage samples and
REPA hooks); :func:`multiscale_distillation_loss` is the GAN-free per-scale distillation: the student
takes one Euler step per stage from the same noise as the teacher and regresses the teacher's per-stage
end states, with gradients through the whole chain.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..multiscale import (
    MultiScaleLayout,
    MultiScaleNoise,
    derive_multiscale_noise,
    downsample_image,
    multiscale_euler_sample,
    renoise,
    resolve_stage_steps,
    upsample_nearest2x,
)
from ..sampling import VelocityFn

__all__ = [
    "StageBatch",
    "multiscale_distillation_loss",
    "multiscale_distillation_targets",
    "multiscale_flow_matching_loss",
    "multiscale_flow_matching_targets",
    "teacher_multiscale_targets",
]


@dataclass
class StageBatch:
    r"""Training tensors of the samples assigned to one stage (n samples, stage size (h, w)).

    Attributes:
        stage: k.
        index: (n,) long, positions of these samples in the full batch.
        x_t: (n, C, h, w) network input ``x_τ = (1 - τ)·x_end + τ·x_start``.
        t: (n,) float32 remapped global time (what the network sees).
        tau: (n,) float32 local time.
        target: (n, C, h, w) velocity ``x_end - x_start``.
        x_end / x_start: (n, C, h, w) the stage's end and start states.
        clean: (n, C, h, w) the image at the stage size (the signal of ``x_end``).
        noise: (n, C, h, w) the shared ε.
    """

    stage: int
    index: Tensor
    x_t: Tensor
    t: Tensor
    tau: Tensor
    target: Tensor
    x_end: Tensor
    x_start: Tensor
    clean: Tensor
    noise: Tensor

    def predicted_end(self, v_pred: Tensor) -> Tensor:
        """One-step estimate of the stage end state, ``x̂_end = x_τ + τ·v̂`` (x̂0 on the last stage)."""
        return self.x_t + self.tau.view(-1, 1, 1, 1).to(v_pred.dtype) * v_pred


def multiscale_flow_matching_targets(
    images: Tensor,
    layout: MultiScaleLayout | int,
    generator: torch.Generator | None = None,
    stages: Tensor | None = None,
    tau: Tensor | None = None,
    noise: Sequence[Tensor] | None = None,
    logit_normal: tuple[float, float] = (0.0, 1.0),
) -> list[StageBatch]:
    r"""Per-stage flow-matching inputs and targets for a batch of images (B, C, H, W) in [-1, 1].

    Each sample i gets a stage ``k_i ~ U{0 … K-1}`` and a local time ``τ_i = sigmoid(N(μ, σ²))`` (SSDD's
    logit-normal), then at the stage size (h, w) = (H, W)/2^(K-1-k)::

        ε ~ N(0, I) (h, w);  x_end = (1 - e_k)·D_k(x) + e_k·ε;
        x_start = (1 - s_k)·U(D_{k-1}(x)) + s_k·ε   (k ≥ 1),  x_start = ε  (k = 0, s_0 = 1);
        x_τ = (1 - τ)·x_end + τ·x_start;  target v = x_end - x_start;  t = g_{k+1} + τ·(g_k - g_{k+1}).

    ``D`` is bilinear antialiased downsampling, ``U`` 2x nearest upsampling. For K = 1 this is SSDD's
    ``x_t = (1 - t)·x + t·ε``, ``v = x - ε``. Random draws, in order: stages, τ, then ε per stage group.

    Args:
        images: (B, C, H, W); H, W multiples of 8·2^(K-1).
        layout: :class:`MultiScaleLayout` or K.
        generator: source of all draws.
        stages / tau: optional fixed (B,) stage indices / local times.
        noise: optional per-stage ε, ``noise[k]`` of shape (B, C, h_k, w_k) (rows of the group are used).
        logit_normal: (μ, σ) of the τ distribution.

    Returns:
        One :class:`StageBatch` per stage that received samples, in stage order.
    """
    if isinstance(layout, int):
        layout = MultiScaleLayout(layout)
    num_stages = layout.num_stages
    batch = images.shape[0]
    device = images.device
    sizes = layout.stage_resolutions(*images.shape[-2:])
    if stages is None:
        stages = torch.randint(0, num_stages, (batch,), generator=generator, device=device)
    stages = torch.as_tensor(stages, device=device).long()
    if tau is None:
        mean, std = logit_normal
        tau = torch.sigmoid(torch.randn(batch, generator=generator, device=device) * std + mean)
    tau = torch.as_tensor(tau, dtype=torch.float32, device=device)

    groups: list[StageBatch] = []
    for k in range(num_stages):
        index = torch.nonzero(stages == k).flatten()
        if index.numel() == 0:
            continue
        x = images[index]
        size = sizes[k]
        clean = downsample_image(x, size)
        if noise is not None:
            eps = noise[k][index].to(images.dtype)
        else:
            eps = torch.randn((index.numel(), x.shape[1], *size), generator=generator, device=device).to(
                images.dtype
            )
        e_k, s_k = layout.end_levels[k], layout.start_levels[k]
        x_end = (1.0 - e_k) * clean + e_k * eps
        if k == 0:
            x_start = eps
        else:
            x_start = (1.0 - s_k) * upsample_nearest2x(downsample_image(x, sizes[k - 1])) + s_k * eps
        tau_k = tau[index]
        tau_b = tau_k.view(-1, 1, 1, 1).to(images.dtype)
        groups.append(
            StageBatch(
                stage=k,
                index=index,
                x_t=(1 - tau_b) * x_end + tau_b * x_start,
                t=layout.global_time(k, tau_k).to(device),
                tau=tau_k,
                target=x_end - x_start,
                x_end=x_end,
                x_start=x_start,
                clean=clean,
                noise=eps,
            )
        )
    return groups


DecoderFn = Callable[[Tensor, Tensor, Tensor], Tensor]
"""``decoder(x_t, t, z) -> v``: the SSDD decoder network (``vae.decoder``)."""


def multiscale_flow_matching_loss(
    decoder: DecoderFn,
    images: Tensor,
    z: Tensor,
    layout: MultiScaleLayout | int,
    generator: torch.Generator | None = None,
    lpips_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    stage_hook: Callable[[StageBatch, Tensor], Tensor | None] | None = None,
    **target_kwargs,
) -> dict[str, Tensor]:
    r"""Multi-scale flow-matching loss of one batch.

    ``FM = (1/B)·Σ_i mean_pixels (v̂_i - v_i)²`` (every sample weighs the same whatever its stage size;
    float32), with ``v̂ = decoder(x_τ, t_global, z)`` evaluated once per stage group.

    Args:
        decoder: ``decoder(x_t, t, z)``; z is indexed per group (``z[group.index]``).
        images: (B, C, H, W) ground truth in [-1, 1].
        z: (B, Z, h, w) latents.
        layout: :class:`MultiScaleLayout` or K.
        generator: source of the draws of :func:`multiscale_flow_matching_targets`.
        lpips_fn: optional ``lpips(x̂0, x)``, applied to final-stage samples only (where x̂0 = x_τ + τ·v̂
            estimates the full-resolution image); returned as ``"lpips"`` (0 when no sample is there).
        stage_hook: optional ``hook(group, v_pred) -> scalar | None`` called right after each group's
            forward (e.g. REPA on captured tokens); the scalars are averaged with group-size weights
            and returned as ``"hook"``.
        **target_kwargs: forwarded to :func:`multiscale_flow_matching_targets` (``stages``, ``tau``, …).

    Returns:
        ``{"fm", "lpips"?, "hook"?, "groups"}``: scalars with gradient, and ``groups`` a tensor with
        the number of samples per stage (K,).
    """
    if isinstance(layout, int):
        layout = MultiScaleLayout(layout)
    groups = multiscale_flow_matching_targets(images, layout, generator, **target_kwargs)
    batch = images.shape[0]
    fm = images.new_zeros((), dtype=torch.float32)
    lpips = images.new_zeros((), dtype=torch.float32)
    hook_total = images.new_zeros((), dtype=torch.float32)
    hook_weight = 0
    counts = torch.zeros(layout.num_stages, dtype=torch.long)
    for group in groups:
        n = group.index.numel()
        counts[group.stage] = n
        v_pred = decoder(group.x_t, group.t, z[group.index])
        per_sample = (v_pred.float() - group.target.float()).pow(2).flatten(1).mean(1)
        fm = fm + per_sample.sum() / batch
        if lpips_fn is not None and group.stage == layout.num_stages - 1:
            lpips = lpips_fn(group.predicted_end(v_pred), group.clean)
        if stage_hook is not None:
            value = stage_hook(group, v_pred)
            if value is not None:
                hook_total = hook_total + value.float() * n
                hook_weight += n
    out = {"fm": fm, "groups": counts}
    if lpips_fn is not None:
        out["lpips"] = lpips
    if stage_hook is not None:
        out["hook"] = hook_total / max(hook_weight, 1)
    return out


# ====================================================================================================
# Per-scale distillation
# ====================================================================================================
@torch.no_grad()
def multiscale_distillation_targets(
    teacher_velocity: VelocityFn,
    noise: Tensor | MultiScaleNoise,
    layout: MultiScaleLayout | int,
    teacher_steps: Sequence[int],
    time_grid_power: float = 2.0,
) -> list[Tensor]:
    """The frozen teacher's K stage end states from ``noise`` (no gradient): ``teacher_steps[k]`` Euler
    steps in stage k. Returns a list of K tensors (B, C, h_k, w_k); the last is the teacher sample."""
    _, ends = multiscale_euler_sample(
        teacher_velocity, noise, teacher_steps, layout, time_grid_power, return_stages=True
    )
    return ends


@torch.no_grad()
def teacher_multiscale_targets(
    teacher,
    images: Tensor,
    generator: torch.Generator | None,
    num_stages: int,
    num_inference_steps: int = 12,
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Frozen-teacher inputs for per-scale distillation of one batch (the multi-scale analogue of
    ``training_utils.distillation_targets``): ``z = teacher.encode(x).mode()``, ``ε ~ N(0, I)`` at full
    resolution from ``generator``, and the teacher's K stage end states with ``num_inference_steps``
    Euler steps split by ``resolve_stage_steps`` (the teacher's ``config.multiscale_steps`` when they
    fit). Returns ``(z, ε, stage_ends)``."""
    z = teacher.encode(images).latent_dist.mode()
    noise = torch.randn(images.shape, generator=generator, device=images.device, dtype=torch.float32)
    steps = resolve_stage_steps(num_inference_steps, num_stages, teacher.config.multiscale_steps)
    ends = multiscale_distillation_targets(
        lambda x, t: teacher.decoder(x, t, z),
        noise.to(images.dtype),
        num_stages,
        steps,
        teacher.config.time_grid_power,
    )
    return z, noise, ends


def multiscale_distillation_loss(
    student_velocity: VelocityFn,
    noise: Tensor | MultiScaleNoise,
    teacher_stages: Sequence[Tensor],
    layout: MultiScaleLayout | int,
    stage_weights: Sequence[float] | None = None,
    lpips_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    lpips_weight: float = 0.5,
    teacher_forcing: bool = False,
) -> dict[str, Tensor]:
    r"""GAN-free per-scale distillation: one student Euler step per stage, from the teacher's noise.

    Student chain (same ε, same re-noise draws as the teacher)::

        y_0 = ε_0 + v_S(ε_0, g_0)                      (the τ: 1 → 0 jump of stage 0)
        y_k = r_k + v_S(r_k, g_k),  r_k = α_k·U(y_{k-1}) + β_k·n_k
        L = Σ_k w_k·MSE(y_k, y_k^teacher) / Σ_k w_k  (+ λ·LPIPS(y_{K-1}, y_{K-1}^teacher) when given)

    Gradients flow through the whole chain (as in the paper's stage-2 training). With
    ``teacher_forcing`` the student's stage k starts instead from the teacher's re-noised
    ``α_k·U(y_{k-1}^teacher) + β_k·n_k`` (stages decouple; no exposure to its own errors).

    Args:
        student_velocity: ``velocity(x, t)`` of the student (global t).
        noise: the full-resolution ε or :class:`MultiScaleNoise` the teacher used.
        teacher_stages: K teacher stage end states (:func:`multiscale_distillation_targets`).
        layout: :class:`MultiScaleLayout` or K.
        stage_weights: w_k (default all 1).
        lpips_fn: optional ``lpips(student_final, teacher_final)`` (SSDD distillation: VGG LPIPS).
        lpips_weight: λ (SSDD: 0.5).
        teacher_forcing: see above.

    Returns:
        ``{"loss", "mse", "lpips"?, "stage_mse"}`` (``stage_mse``: (K,) detached per-stage MSE);
        ``"sample"``: the student's final image (with gradient).
    """
    if isinstance(layout, int):
        layout = MultiScaleLayout(layout)
    num_stages = layout.num_stages
    if len(teacher_stages) != num_stages:
        raise ValueError(f"teacher_stages must hold {num_stages} tensors; got {len(teacher_stages)}.")
    if not isinstance(noise, MultiScaleNoise):
        noise = derive_multiscale_noise(noise, num_stages, layout.gamma)
    weights = [1.0] * num_stages if stage_weights is None else [float(w) for w in stage_weights]
    x = noise.initial
    stage_mse = []
    total = x.new_zeros((), dtype=torch.float32)
    for k in range(num_stages):
        if k > 0:
            previous = teacher_stages[k - 1] if teacher_forcing else x
            x = renoise(previous, noise.renoise[k - 1], layout, k)
        t = layout.global_time(k, torch.ones(x.shape[0])).to(x.device)
        x = x + student_velocity(x, t)  # one Euler step, τ: 1 -> 0
        mse = F.mse_loss(x.float(), teacher_stages[k].float())
        stage_mse.append(mse.detach())
        total = total + weights[k] * mse
    mse_total = total / sum(weights)
    out = {"mse": mse_total, "stage_mse": torch.stack(stage_mse), "sample": x}
    loss = mse_total
    if lpips_fn is not None:
        out["lpips"] = lpips_fn(x, teacher_stages[-1])
        loss = loss + lpips_weight * out["lpips"]
    out["loss"] = loss
    return out
