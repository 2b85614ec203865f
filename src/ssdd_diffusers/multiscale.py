r"""Multi-scale coarse-to-fine decoding for SSDD (Pyramidal-Flow style, arXiv 2603.19570).

The SSDD U-ViT decoder ``v = decoder(x_t, t, z)`` accepts any image size that is a multiple of 8 with
the same latent ``z``, so one network serves every stage of a coarse-to-fine sampler.

Conventions (as :mod:`ssdd_diffusers.sampling`): noise level ``t`` in [0, 1] (1 = pure noise),
``x_t = (1 - t)·x + t·ε``, velocity ``v = x - ε`` ("clean minus noise"), Euler ``x ← x + v·(t - t')``.

Stage layout (K stages, k = 0 … K-1)
------------------------------------
* Resolution: stage k runs at ``(H, W) / 2^(K-1-k)``; every stage size must be a multiple of the
  decoder's factor (8), i.e. ``H`` and ``W`` multiples of ``8·2^(K-1)`` (:func:`stage_resolutions`).
* The global noise axis [1, 0] is split into K equal segments; stage k ends at the level
  ``e_k = 1 - (k+1)/K`` (K = 4: .75, .5, .25, 0).
* Start levels (Pyramidal-Flow correction with γ = 1/3): ``s_0 = 1`` and, for k ≥ 1,
  ``s_k = e_{k-1}·√(1 + 1/γ) / (1 + e_{k-1}(√(1 + 1/γ) - 1))``; for γ = 1/3, ``s_k = 2e/(1+e)``
  (K = 4: 1, .857, .667, .400).

Within stage k a local time τ ∈ [0, 1] interpolates between the stage's start and end states::

    x_τ = (1 - τ)·x_end + τ·x_start,   x_end = (1 - e_k)·D_k(x) + e_k·ε,
                                       x_start = (1 - s_k)·U(D_{k-1}(x)) + s_k·ε   (same ε),

where ``D_k`` is the (bilinear, antialiased) downsampling to the stage-k size and ``U`` the 2x nearest
upsampling (``x_start = ε`` for k = 0). The network regresses the stage-local velocity, in SSDD's sign::

    v = x_end - x_start    (so that x_end = x_τ + τ·v, as x̂0 = x_t + t·v in SSDD)

(the released code of the paper regresses ``x_start - x_end``; the sign is flipped here so that K = 1
*is* SSDD's flow matching and a trained SSDD decoder is a valid initialisation).

Re-noising between stages
-------------------------
After stage k-1 the state is ``(1 - e)·D_{k-1}(x) + e·ε'`` (``e = e_{k-1}``). It is upsampled 2x
(nearest), which makes its noise constant on 2x2 blocks, then ``x ← α·U(x) + β·n`` with::

    α = 1 / (√(1 + 1/γ)·(1 - s) + s),   β = α·(1 - s)/√γ,   s = 1 - e
    n ~ N(0, Σ) on each 2x2 block,  Σ = (1 + γ)·I - γ·11ᵀ   (unit variance, within-block correlation -γ)

so that the result is exactly ``(1 - s_k)·U(D_{k-1}(x)) + s_k·ε''`` with isotropic unit ε'': the
noise covariance is ``α²e²·11ᵀ + β²Σ = β²(1 + γ)·I`` because ``α²e² = β²γ``, and
``β·√(1 + γ) = s_k``, ``α·(1 - e) = 1 - s_k``. K = 4: (α, β) = (.571, .742), (.667, .577), (.800, .346).
**Sign of the correlation:** the digest writes Σ = (1-γ)I + γ11ᵀ; only the *negative* within-block
correlation (-γ, Pyramidal Flow's choice) cancels the positive correlation that nearest upsampling puts
into the old noise, and only then do the stated α and β give an isotropic marginal. We use -γ.

Time remapping
--------------
The network sees a *global* timestep. Segment lengths are proportional to the stage path length
``s_k - e_k``: boundaries ``g_0 = 1``, ``g_{k+1} = g_k - (s_k - e_k)/Σ_j (s_j - e_j)``, ``g_K = 0`` and
``t = g_{k+1} + τ·(g_k - g_{k+1})``. K = 4: [1→.8244], [.8244→.5736], [.5736→.2809], [.2809→0]. The
paper's code discretises to 1000 integer timesteps (``ceil(1000·g)``, at least 1), which gives its
published [1→.825], [.825→.574], [.574→.281], [.281→.001] (``num_train_timesteps=1000`` here). SSDD
uses continuous time, so the library default is the continuous map; for K = 1 it is the identity.

Noise (what is deterministic)
-----------------------------
The sampler is driven by one full-resolution ``ε ~ N(0, I)`` of shape (B, C, H, W), as the ordinary
sampler, and everything else is derived from it deterministically (:func:`derive_multiscale_noise`):
``ε_{K-1} = ε``, ``ε_{k-1} = 2·AvgPool2(ε_k)`` (unit variance) and, for γ = 1/3,
``n_k = (2/√3)·(ε_k - U(AvgPool2(ε_k)))``. The block residual ``ε_k - U(AvgPool2(ε_k))`` has variance
3/4 and within-block covariance -1/4, i.e. exactly ``(3/4)·Σ`` for γ = 1/3, and it is independent of the
block mean; so the coarse start noise ``ε_0 = 2^(K-1)·AvgPool_{2^(K-1)}(ε)`` and all re-noise draws are
independent with the right laws. Hence ``decode(z, noise=ε)`` is a pure function of ``ε`` (no generator),
slices decode like the full batch, and teacher and student see the same noise in distillation. Other γ
need extra randomness: :func:`correlated_block_noise` draws Σ-noise from a generator.

Sampler and step split
----------------------
:func:`multiscale_euler_sample` runs ``n_k`` Euler steps in stage k on the τ-grid
``τ_i = (1 - i/n_k)^p`` (the ordinary SSDD grid; p = ``time_grid_power``), evaluating the network at the
remapped global time, then upsamples and re-noises. K = 1 calls :func:`~ssdd_diffusers.sampling.
euler_sample` unchanged (bit-identical to the ordinary sampler). ``N`` total steps are split by
:func:`default_stage_steps`; see its docstring for the rule.

Training and per-scale distillation: :mod:`ssdd_diffusers.training.multiscale`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from .sampling import VelocityFn, euler_sample, flow_time_grid

DEFAULT_GAMMA = 1.0 / 3.0
DECODER_MULTIPLE = 8

__all__ = [
    "DEFAULT_GAMMA",
    "MultiScaleLayout",
    "MultiScaleNoise",
    "correlated_block_noise",
    "default_stage_steps",
    "derive_multiscale_noise",
    "downsample_image",
    "draw_multiscale_noise",
    "multiscale_euler_sample",
    "renoise",
    "resolve_stage_steps",
    "stage_resolutions",
    "upsample_nearest2x",
]


# ====================================================================================================
# Stage layout
# ====================================================================================================
@dataclass(frozen=True)
class MultiScaleLayout:
    r"""The noise/time layout of a K-stage coarse-to-fine flow (resolution-independent part).

    Args:
        num_stages: K ≥ 1.
        gamma: Pyramidal-Flow correction γ ∈ (0, 1/3] (paper: 1/3).

    All sequences are indexed by stage k = 0 … K-1 (``time_boundaries`` has K + 1 entries).
    """

    num_stages: int
    gamma: float = DEFAULT_GAMMA

    def __post_init__(self) -> None:
        if int(self.num_stages) != self.num_stages or self.num_stages < 1:
            raise ValueError(f"num_stages must be an integer >= 1; got {self.num_stages}.")
        if not 0.0 < self.gamma <= 1.0 / 3.0 + 1e-12:
            raise ValueError(f"gamma must be in (0, 1/3] (the 2x2 covariance must be PSD); got {self.gamma}.")

    # ------------------------------------------------------------------------------------------------
    @property
    def end_levels(self) -> tuple[float, ...]:
        """``e_k = 1 - (k + 1)/K``: the noise level at the end of stage k (0 for the last stage)."""
        k_total = self.num_stages
        return tuple(1.0 - (k + 1) / k_total if k < k_total - 1 else 0.0 for k in range(k_total))

    @property
    def start_levels(self) -> tuple[float, ...]:
        """``s_0 = 1``, ``s_k = c·e_{k-1} / (1 + (c - 1)·e_{k-1})`` with ``c = √(1 + 1/γ)`` (k ≥ 1)."""
        return (1.0,) + tuple(self.renoise_coefficients(k)[2] for k in range(1, self.num_stages))

    def renoise_coefficients(self, stage: int) -> tuple[float, float, float]:
        r"""``(α, β, s_k)`` of the re-noising that enters stage ``k ≥ 1``.

        With ``s = 1 - e_{k-1}`` (the signal level at the end of stage k-1)::

            α = 1 / (√(1 + 1/γ)·(1 - s) + s),   β = α·(1 - s)/√γ,   s_k = β·√(1 + γ) = 1 - α·s.
        """
        if not 1 <= stage < self.num_stages:
            raise ValueError(f"re-noising enters stages 1 … {self.num_stages - 1}; got stage {stage}.")
        gamma = self.gamma
        signal = 1.0 - self.end_levels[stage - 1]
        alpha = 1.0 / (math.sqrt(1.0 + 1.0 / gamma) * (1.0 - signal) + signal)
        beta = alpha * (1.0 - signal) / math.sqrt(gamma)
        return alpha, beta, 1.0 - alpha * signal

    @property
    def path_lengths(self) -> tuple[float, ...]:
        """``s_k - e_k``: the span of noise levels each stage traverses."""
        return tuple(s - e for s, e in zip(self.start_levels, self.end_levels))

    def time_boundaries(self, num_train_timesteps: int | None = None) -> tuple[float, ...]:
        r"""Global-time boundaries ``g_0 = 1 > g_1 > … > g_K`` (stage k spans [g_k → g_{k+1}]).

        ``g_{k+1} = g_k - (s_k - e_k) / Σ_j (s_j - e_j)`` (lengths ∝ stage path length), ``g_K = 0``.
        With ``num_train_timesteps = T`` the boundaries are discretised as the paper's code does,
        ``max(ceil(T·g), 1) / T`` (T = 1000, K = 4: 1, .825, .574, .281, .001).
        """
        lengths = self.path_lengths
        total = sum(lengths)
        bounds = [1.0]
        for length in lengths[:-1]:
            bounds.append(bounds[-1] - length / total)
        bounds.append(0.0)
        if num_train_timesteps is not None:
            steps = int(num_train_timesteps)
            # round() first guards against float noise just above an integer before the ceiling
            bounds = [max(math.ceil(round(steps * g, 9)), 1) / steps for g in bounds]
        return tuple(bounds)

    def global_time(self, stage: int, tau: Tensor | float) -> Tensor:
        """Remapped global timestep ``t = g_{k+1} + τ·(g_k - g_{k+1})``; identity for K = 1.

        Args:
            stage: k.
            tau: local time(s) τ ∈ [0, 1], any shape (float32).
        """
        tau = torch.as_tensor(tau, dtype=torch.float32)
        if self.num_stages == 1:
            return tau
        bounds = self.time_boundaries()
        hi, lo = bounds[stage], bounds[stage + 1]
        return lo + tau * (hi - lo)

    def stage_resolutions(
        self, height: int, width: int, multiple: int = DECODER_MULTIPLE
    ) -> list[tuple[int, int]]:
        """``[(H, W)/2^(K-1), …, (H/2, W/2), (H, W)]``; raises ``ValueError`` unless every stage size is a
        multiple of ``multiple`` (the decoder's downsampling factor, 8)."""
        return stage_resolutions(height, width, self.num_stages, multiple)


def stage_resolutions(
    height: int, width: int, num_stages: int, multiple: int = DECODER_MULTIPLE
) -> list[tuple[int, int]]:
    """Stage sizes ``(H, W) / 2^(K-1-k)`` for k = 0 … K-1, validated to be multiples of ``multiple``."""
    factor = 2 ** (num_stages - 1)
    need = multiple * factor
    if height % need or width % need:
        raise ValueError(
            f"Multi-scale decoding with {num_stages} stages needs image height and width that are multiples "
            f"of {need} (= {multiple} x 2^{num_stages - 1}, so that the coarsest stage, 1/{factor} of the "
            f"image, is still a multiple of {multiple}); got {height}x{width}. Use fewer stages or "
            f"another size."
        )
    return [
        (height // 2 ** (num_stages - 1 - k), width // 2 ** (num_stages - 1 - k)) for k in range(num_stages)
    ]


def default_stage_steps(num_steps: int, num_stages: int) -> tuple[int, ...]:
    """Split ``N`` Euler steps over K stages (coarse → fine): equal shares, remainder to the coarsest.

    ``N = 12``: K = 2 → (6, 6), K = 3 → (4, 4, 4), K = 4 → (3, 3, 3, 3); ``N = 10, K = 3`` → (4, 3, 3).
    The equal split keeps every stage's step density on its own noise segment similar; extra steps go
    to coarse stages because they cost 1/4, 1/16, … of a full-resolution step. Requires ``N ≥ K``
    (one step per stage is the distilled model).
    """
    if num_stages < 1:
        raise ValueError(f"num_stages must be >= 1; got {num_stages}.")
    if num_steps < num_stages:
        raise ValueError(
            f"Multi-scale decoding needs at least one step per stage: num_inference_steps={num_steps} < "
            f"{num_stages} stages."
        )
    base, extra = divmod(num_steps, num_stages)
    return tuple(base + (1 if k < extra else 0) for k in range(num_stages))


def resolve_stage_steps(
    num_steps: int, num_stages: int, stage_steps: Sequence[int] | None = None
) -> tuple[int, ...]:
    """Per-stage steps: ``stage_steps`` when given and consistent with (K, N), else the default split."""
    if stage_steps is not None:
        steps = tuple(int(s) for s in stage_steps)
        if len(steps) == num_stages and sum(steps) == num_steps and min(steps) >= 1:
            return steps
    return default_stage_steps(num_steps, num_stages)


# ====================================================================================================
# Resampling and noise
# ====================================================================================================
def upsample_nearest2x(x: Tensor) -> Tensor:
    """(B, C, h, w) -> (B, C, 2h, 2w), every pixel copied to a 2x2 block."""
    return x.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)


def downsample_image(images: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear, antialiased resize of (B, C, H, W) images to ``size`` (identity at the same size).

    Computed in float32 and cast back (antialiased interpolation has no half-precision CPU kernel)."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    out = F.interpolate(images.float(), size=size, mode="bilinear", align_corners=False, antialias=True)
    return out.to(images.dtype)


def _block_mean_up(x: Tensor) -> Tensor:
    """U(AvgPool2(x)): the 2x2-block mean broadcast back to (B, C, H, W)."""
    return upsample_nearest2x(F.avg_pool2d(x, 2))


def correlated_block_noise(
    shape: Sequence[int],
    generator: torch.Generator | None = None,
    gamma: float = DEFAULT_GAMMA,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    r"""2x2-block-correlated Gaussian noise ``n ~ N(0, Σ)`` per block, ``Σ = (1 + γ)·I - γ·11ᵀ``.

    Unit variance, correlation -γ between the four pixels of a block, independent across blocks and
    channels. Built from ``w ~ N(0, I)`` as ``n = √(1+γ)·(w - m) + √(1-3γ)·m`` with ``m = U(AvgPool2(w))``
    (``w - m`` and ``m`` are the projections on the block-mean-free and block-constant subspaces, whose
    covariances are ``I - 11ᵀ/4`` and ``11ᵀ/4``; Σ has eigenvalue 1+γ on the first and 1-3γ on the second).

    Args:
        shape: (B, C, H, W) with H, W even.
    """
    if shape[-1] % 2 or shape[-2] % 2:
        raise ValueError(f"2x2-block noise needs even height and width; got shape {tuple(shape)}.")
    w = torch.randn(tuple(shape), generator=generator, device=device, dtype=torch.float32)
    m = _block_mean_up(w)
    n = math.sqrt(1.0 + gamma) * (w - m)
    if gamma < 1.0 / 3.0:
        n = n + math.sqrt(max(1.0 - 3.0 * gamma, 0.0)) * m
    return n.to(dtype)


@dataclass
class MultiScaleNoise:
    """All randomness of one multi-scale sampling run.

    Attributes:
        initial: (B, C, H/2^(K-1), W/2^(K-1)) start noise of stage 0, N(0, I).
        renoise: K-1 tensors; ``renoise[k-1]`` (B, C, h_k, w_k) is the Σ-noise ``n`` entering stage k.
    """

    initial: Tensor
    renoise: list[Tensor] = field(default_factory=list)

    def split(self, size: int) -> list[MultiScaleNoise]:
        """Per-chunk views along the batch (for sliced decoding)."""
        parts = [self.initial.split(size)] + [r.split(size) for r in self.renoise]
        return [MultiScaleNoise(chunk[0], list(chunk[1:])) for chunk in zip(*parts)]


def derive_multiscale_noise(noise: Tensor, num_stages: int, gamma: float = DEFAULT_GAMMA) -> MultiScaleNoise:
    r"""Deterministic multi-scale noise from one full-resolution ``ε ~ N(0, I)`` (B, C, H, W).

    ``ε_{K-1} = ε``; ``ε_{k-1} = 2·AvgPool2(ε_k)``; ``n_k = (2/√3)·(ε_k - U(AvgPool2(ε_k)))`` for k ≥ 1.
    ``initial = ε_0 = 2^(K-1)·AvgPool_{2^(K-1)}(ε)``. Each ``ε_k`` is N(0, I); each ``n_k`` has the
    block covariance ``(4/3)(I - 11ᵀ/4) = (4/3)I - (1/3)11ᵀ`` = Σ(γ = 1/3), and all of them are mutually
    independent (orthogonal projections of one Gaussian vector). Only γ = 1/3 is exact this way.
    For K = 1 returns ``MultiScaleNoise(noise, [])`` unchanged.
    """
    if num_stages > 1 and abs(gamma - DEFAULT_GAMMA) > 1e-12:
        raise ValueError(
            "Noise can only be derived deterministically from a full-resolution noise for gamma = 1/3; "
            "draw it with correlated_block_noise(...) for other values."
        )
    height, width = noise.shape[-2:]
    factor = 2 ** (num_stages - 1)
    if height % factor or width % factor:
        raise ValueError(f"noise size {height}x{width} is not divisible by 2^(K-1) = {factor}.")
    renoise: list[Tensor] = []
    current = noise.float()
    for _ in range(num_stages - 1):
        pooled = F.avg_pool2d(current, 2)
        renoise.append(((current - upsample_nearest2x(pooled)) * (2.0 / math.sqrt(3.0))).to(noise.dtype))
        current = pooled * 2.0
    renoise.reverse()
    return MultiScaleNoise(current.to(noise.dtype), renoise)


def draw_multiscale_noise(
    shape: Sequence[int],
    num_stages: int,
    generator: torch.Generator | None = None,
    gamma: float = DEFAULT_GAMMA,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> MultiScaleNoise:
    """Independent draws from ``generator``: N(0, I) at the coarsest size, Σ-noise for each re-noising.

    Args:
        shape: full-resolution (B, C, H, W).
    """
    batch, channels, height, width = shape
    sizes = stage_resolutions(height, width, num_stages, multiple=1)
    initial = torch.randn(
        (batch, channels, *sizes[0]), generator=generator, device=device, dtype=torch.float32
    ).to(dtype)
    renoise = [
        correlated_block_noise((batch, channels, *size), generator, gamma, device, dtype)
        for size in sizes[1:]
    ]
    return MultiScaleNoise(initial, renoise)


def renoise(x: Tensor, noise: Tensor, layout: MultiScaleLayout, stage: int) -> Tensor:
    r"""Enter stage ``k ≥ 1``: ``α·U(x) + β·n`` (x at the end of stage k-1, (B, C, h, w)).

    Lifts ``(1 - e_{k-1})·x_low + e_{k-1}·ε`` to ``(1 - s_k)·U(x_low) + s_k·ε''`` with isotropic ε''.
    ``noise`` is n, (B, C, 2h, 2w), with the block covariance Σ of :func:`correlated_block_noise`.
    """
    alpha, beta, _ = layout.renoise_coefficients(stage)
    return alpha * upsample_nearest2x(x) + beta * noise.to(x.dtype)


# ====================================================================================================
# Sampler
# ====================================================================================================
def multiscale_euler_sample(
    velocity: VelocityFn,
    noise: Tensor | MultiScaleNoise,
    stage_steps: Sequence[int],
    layout: MultiScaleLayout | int,
    time_grid_power: float = 2.0,
    return_stages: bool = False,
) -> Tensor | tuple[Tensor, list[Tensor]]:
    r"""Coarse-to-fine Euler sampling.

    For k = 0 … K-1: ``n_k = stage_steps[k]`` Euler steps on the τ-grid ``τ_i = (1 - i/n_k)^p``,
    ``x ← x + v(x, g(τ_i))·(τ_i - τ_{i+1})`` with the remapped global time ``g``; then, unless k is the
    last stage, ``x ← α_{k+1}·U(x) + β_{k+1}·n_{k+1}``.

    Args:
        velocity: ``velocity(x, t)`` for x (B, C, h, w) at any stage size and t (B,) float32 global time.
        noise: full-resolution ε (B, C, H, W) (the multi-scale noise is derived from it, see
            :func:`derive_multiscale_noise`) or a ready :class:`MultiScaleNoise`.
        stage_steps: Euler steps per stage, length K.
        layout: a :class:`MultiScaleLayout` or K.
        time_grid_power: p of the per-stage τ-grid.
        return_stages: also return the end state of every stage (before upsampling and re-noising).

    Returns:
        (B, C, H, W) sample, and with ``return_stages`` the list of K stage end states.
        K = 1 with a tensor ``noise`` is exactly ``euler_sample(velocity, noise, flow_time_grid(N, p))``.
    """
    if isinstance(layout, int):
        layout = MultiScaleLayout(layout)
    num_stages = layout.num_stages
    steps = [int(s) for s in stage_steps]
    if len(steps) != num_stages or min(steps) < 1:
        raise ValueError(f"stage_steps must hold {num_stages} integers >= 1; got {tuple(stage_steps)}.")
    if not isinstance(noise, MultiScaleNoise):
        noise = derive_multiscale_noise(noise, num_stages, layout.gamma)
    if len(noise.renoise) != num_stages - 1:
        raise ValueError(f"noise has {len(noise.renoise)} re-noise tensors; {num_stages - 1} needed.")

    x = noise.initial
    ends: list[Tensor] = []
    for k in range(num_stages):
        if k > 0:
            x = renoise(x, noise.renoise[k - 1], layout, k)
        grid = flow_time_grid(steps[k], time_grid_power, device=x.device)
        if num_stages == 1:
            x = euler_sample(velocity, x, grid)
        else:
            x = euler_sample(_remapped(velocity, layout, k), x, grid)
        ends.append(x)
    return (x, ends) if return_stages else x


def _remapped(velocity: VelocityFn, layout: MultiScaleLayout, stage: int) -> VelocityFn:
    """Wrap ``velocity(x, t_global)`` as a function of the local τ of ``stage``."""

    def local(x: Tensor, tau: Tensor) -> Tensor:
        return velocity(x, layout.global_time(stage, tau).to(tau.device))

    return local
