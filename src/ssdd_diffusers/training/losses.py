"""Training losses for SSDD: flow matching, LPIPS, REPA and the encoder KL term.

Each loss is independent so that a training script can weight it (SSDD defaults: 1·FM + 0.5·LPIPS
+ 0.25·REPA + 1e-6·KL, the KL term only when the encoder trains). Images are (B, 3, H, W) in [-1, 1].
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..dependencies import require
from ..evaluation.lpips import LPIPSDistance, is_custom_distance
from ..evaluation.metrics import load_module
from ..torch_utils import keep_float32

if TYPE_CHECKING:
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

LPIPSLoss = LPIPSDistance
"""The LPIPS training loss: :class:`~ssdd_diffusers.evaluation.lpips.LPIPSDistance` (VGG trunk by default),
whose ``forward`` is the batch mean."""


def perceptual_loss(net: str, backbone: str = "pretrained") -> LPIPSDistance:
    """The perceptual training loss (``forward``: the batch mean): LPIPS with trunk ``net`` (``"vgg"``,
    ``"alex"``, ``"squeeze"``) or, for a ``net`` of the form ``package.module:factory``, that distance
    network (a module mapping two (B, 3, H, W) images in [-1, 1] to per-image distances), frozen and in
    float32 like LPIPS."""
    if is_custom_distance(net):
        return LPIPSLoss(network=load_module(net, "perceptual distance"))
    return LPIPSLoss(net=net, backbone=backbone)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------
# Flow matching
# ----------------------------------------------------------------------------------------------------
def flow_matching_loss(v_pred: Tensor, v_target: Tensor) -> Tensor:
    """Mean squared error between predicted and target velocity, computed in float32.

    Args:
        v_pred: predicted velocity, any shape (typically (B, 3, H, W)), any float dtype.
        v_target: target velocity ``x - eps``, same shape.

    Returns:
        Scalar float32 tensor.
    """
    if v_pred.shape != v_target.shape:
        raise ValueError(f"v_pred {tuple(v_pred.shape)} and v_target {tuple(v_target.shape)} differ in shape")
    return F.mse_loss(v_pred.float(), v_target.float())


# ----------------------------------------------------------------------------------------------------
# REPA
# ----------------------------------------------------------------------------------------------------
def repa_block_index(num_layers: int) -> int:
    """Index of the middle-transformer block whose output REPA aligns: ``min(4, num_layers // 2)``."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    return min(4, num_layers // 2)


class REPALoss(nn.Module):
    """REPA: align projected decoder tokens with frozen DINOv2 patch features of the clean image.

    ``loss = 1 - mean cosine(projector(h), dino(x))`` over batch and tokens, in [0, 2].

    Args:
        hidden_dim: width D of the decoder tokens.
        model_name_or_path: local folder or Hub id for ``transformers.Dinov2Model.from_pretrained``.
        projector_dim: hidden width of the projector MLP (default ``hidden_dim``).

    The projector ``Linear(D, P) -> SiLU -> Linear(P, dino_hidden_size)`` is trainable; DINOv2 is
    frozen, float32 and always in eval mode (its weights are part of ``state_dict()``).
    """

    def __init__(
        self,
        hidden_dim: int,
        model_name_or_path: str = "facebook/dinov2-base",
        projector_dim: int | None = None,
    ) -> None:
        super().__init__()
        require("transformers", extra="training", feature="REPA")
        from transformers import Dinov2Model

        # No dtype argument (its name differs across transformers versions): cast after loading.
        self.dino = Dinov2Model.from_pretrained(model_name_or_path).to(torch.float32)
        self.dino.requires_grad_(False)
        self.dino.eval()
        config = self.dino.config
        patch = config.patch_size
        self.patch_size = int(patch if isinstance(patch, int) else patch[0])
        self.num_prefix_tokens = 1 + int(getattr(config, "num_register_tokens", 0) or 0)
        self.dino_dim = int(config.hidden_size)
        width = projector_dim or hidden_dim
        self.projector = nn.Sequential(
            nn.Linear(hidden_dim, width), nn.SiLU(), nn.Linear(width, self.dino_dim)
        )
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> REPALoss:
        """Set the projector's mode; DINOv2 stays in eval mode."""
        super().train(mode)
        self.dino.eval()
        return self

    def dino_input(self, images: Tensor, grid_size: tuple[int, int]) -> Tensor:
        """Map (B, 3, H, W) images in [-1, 1] to DINO pixels (B, 3, Hm·p, Wm·p), ImageNet-normalised."""
        height, width = grid_size[0] * self.patch_size, grid_size[1] * self.patch_size
        x = (images.float() + 1.0) / 2.0
        x = F.interpolate(x, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
        return (x - self.mean) / self.std

    @torch.no_grad()
    def dino_features(self, images: Tensor, grid_size: tuple[int, int]) -> Tensor:
        """DINOv2 patch tokens of the clean images: (B, 3, H, W) in [-1, 1] -> (B, Hm·Wm, dino_dim)."""
        keep_float32(self.dino)
        pixel_values = self.dino_input(images, grid_size)
        hidden = self.dino(pixel_values=pixel_values).last_hidden_state
        return hidden[:, self.num_prefix_tokens :]

    def forward(self, hidden_states: Tensor, grid_size: tuple[int, int], images: Tensor) -> Tensor:
        """REPA loss.

        Args:
            hidden_states: (B, N, D) decoder tokens, row-major over the (Hm, Wm) grid, N = Hm·Wm.
            grid_size: (Hm, Wm), the token grid.
            images: (B, 3, H, W) clean ground-truth images in [-1, 1].

        Returns:
            float32 scalar in [0, 2].
        """
        batch, num_tokens, _ = hidden_states.shape
        grid_h, grid_w = int(grid_size[0]), int(grid_size[1])
        if num_tokens != grid_h * grid_w:
            raise ValueError(
                f"hidden_states has {num_tokens} tokens but grid_size {grid_h}x{grid_w} "
                f"needs N = {grid_h * grid_w}"
            )
        if images.shape[0] != batch:
            raise ValueError(f"batch mismatch: hidden_states {batch}, images {images.shape[0]}")
        target = self.dino_features(images, (grid_h, grid_w))
        pred = self.projector(hidden_states)
        cosine = F.cosine_similarity(pred.float(), target.float(), dim=-1)
        return 1.0 - cosine.mean()


# ----------------------------------------------------------------------------------------------------
# KL
# ----------------------------------------------------------------------------------------------------
def kl_loss(posterior: DiagonalGaussianDistribution) -> Tensor:
    """KL(q(z|x) || N(0, I)) per image, averaged over the batch.

    ``0.5 · Σ_{C,H,W}(μ² + σ² − 1 − log σ²)`` via ``posterior.kl()`` (B,) -> float32 scalar.
    """
    kl = posterior.kl().float()
    return kl.to(posterior.mean.device).mean()
