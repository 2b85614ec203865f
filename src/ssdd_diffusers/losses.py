"""Training losses for SSDD: flow matching, LPIPS, REPA and the encoder KL term.

Each loss is independent so that a training script can weight it (SSDD defaults: 1·FM + 0.5·LPIPS
+ 0.25·REPA + 1e-6·KL, the KL term only when the encoder trains). Images are (B, 3, H, W) in [-1, 1].
"""

from __future__ import annotations

import logging
import warnings
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

logger = logging.getLogger(__name__)

LPIPSBackbone = Literal["pretrained", "random"]

#: eps of the patched ``lpips.normalize_tensor`` (the lpips package uses 1e-10).
LPIPS_NORMALIZE_EPS = 1e-8

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

RANDOM_BACKBONE_WARNING = (
    "LPIPS is built with a RANDOMLY INITIALISED {net} backbone (backbone='random'). The resulting "
    "perceptual distance is MEANINGLESS and must only be used in tests; use backbone='pretrained' for "
    "training and evaluation."
)


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
# LPIPS
# ----------------------------------------------------------------------------------------------------
def _normalize_tensor(in_feat: Tensor, eps: float = LPIPS_NORMALIZE_EPS) -> Tensor:
    """Drop-in replacement for ``lpips.normalize_tensor``: unit-normalise features along channels.

    Forward value is ``x / (||x||_2 + eps)`` exactly as in lpips, with eps 1e-8 instead of 1e-10.
    The larger eps bounds the gradient of tiny feature vectors by ~1/eps (1e8 instead of 1e10, which
    matters for low-precision backward passes). The norm comes from ``torch.linalg.vector_norm``,
    whose gradient at an all-zero feature vector is 0, where lpips' ``sqrt(sum(x**2))`` gives 0/0 =
    NaN (in the fp32 trunks the preceding ReLU happens to mask that NaN before it reaches the input).

    Args:
        in_feat: (B, C, H, W) features.
    """
    norm = torch.linalg.vector_norm(in_feat, ord=2, dim=1, keepdim=True)
    return in_feat / (norm + eps)


_normalize_tensor._ssdd_patched = True  # type: ignore[attr-defined]


def patch_lpips_normalize_tensor() -> None:
    """Install :func:`_normalize_tensor` as ``lpips.normalize_tensor`` (idempotent).

    ``lpips.LPIPS.forward`` resolves ``lpips.normalize_tensor`` from the package namespace at call
    time, so replacing that one attribute is enough; no lpips source or class is modified. The patch is
    process-wide (as in upstream SSDD), which changes LPIPS values only by O(1e-8) relative.
    """
    import lpips

    if not getattr(lpips.normalize_tensor, "_ssdd_patched", False):
        lpips.normalize_tensor = _normalize_tensor


def build_lpips_network(net: Literal["vgg", "alex", "squeeze"], backbone: LPIPSBackbone) -> nn.Module:
    """Build a frozen ``lpips.LPIPS`` network in eval mode, with the eps patch installed.

    ``backbone="pretrained"`` keeps lpips' real loading path: torchvision loads the ImageNet backbone
    from the torch hub cache (``$TORCH_HOME/hub/checkpoints``), downloading it when absent. The linear
    heads always come from the lpips package. ``backbone="random"`` (``pnet_rand=True``) needs no
    download but makes the distance meaningless; it warns loudly.
    """
    import lpips

    if backbone not in ("pretrained", "random"):
        raise ValueError(f"backbone must be 'pretrained' or 'random', got {backbone!r}")
    if backbone == "random":
        message = RANDOM_BACKBONE_WARNING.format(net=net)
        warnings.warn(message, UserWarning, stacklevel=3)
        logger.warning(message)
    patch_lpips_normalize_tensor()
    with warnings.catch_warnings():
        # lpips calls torchvision with the legacy ``pretrained=`` argument; silence that deprecation only.
        warnings.filterwarnings(
            "ignore",
            message=r"(The parameter 'pretrained' is deprecated|Arguments other than a weight enum)",
            category=UserWarning,
        )
        model = lpips.LPIPS(net=net, pnet_rand=backbone == "random", verbose=False)
    model.requires_grad_(False)
    return model.eval()


def _keep_float32(module: nn.Module) -> None:
    """Undo a parent's ``.to(bfloat16)`` / ``.half()`` on a frozen float32 network."""
    param = next(module.parameters(), None)
    if param is not None and param.dtype != torch.float32:
        module.float()


class LPIPSLoss(nn.Module):
    """Frozen LPIPS perceptual distance (default VGG, as in SSDD training), always in eval mode.

    Computed in float32 with autocast disabled. Gradients flow to the inputs, never to the network.

    Args:
        net: lpips trunk, ``"vgg"`` for the training loss, ``"alex"`` for the evaluation metric.
        backbone: ``"pretrained"`` (ImageNet trunk via torchvision) or ``"random"`` (tests only).
    """

    def __init__(
        self, net: Literal["vgg", "alex", "squeeze"] = "vgg", backbone: LPIPSBackbone = "pretrained"
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.net = build_lpips_network(net, backbone)

    def train(self, mode: bool = True) -> LPIPSLoss:
        """Ignore ``mode``: the network stays in eval mode (lpips has dropout layers)."""
        return super().train(False)

    def distance(self, input: Tensor, target: Tensor) -> Tensor:
        """Per-image LPIPS distance.

        Args:
            input: (B, 3, H, W) in [-1, 1].
            target: (B, 3, H, W) in [-1, 1].

        Returns:
            (B,) float32 distances.
        """
        if input.shape != target.shape or input.dim() != 4 or input.shape[1] != 3:
            raise ValueError(
                f"expected two (B, 3, H, W) tensors, got {tuple(input.shape)} and {tuple(target.shape)}"
            )
        _keep_float32(self.net)
        with torch.autocast(device_type=input.device.type, enabled=False):
            dist = self.net(input.float(), target.float(), normalize=False)
        return dist.reshape(input.shape[0])

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        """Batch-mean LPIPS distance: (B, 3, H, W) x2 in [-1, 1] -> float32 scalar."""
        return self.distance(input, target).mean()


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
        _keep_float32(self.dino)
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
