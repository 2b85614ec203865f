"""LPIPS perceptual distance (the ``lpips`` package) in float32, frozen and always in eval mode.

One implementation serves the evaluation metric (AlexNet trunk, :class:`~.metrics.LPIPSMetric`) and the
training loss (VGG trunk, ``ssdd_diffusers.training.losses.LPIPSLoss``).
"""

from __future__ import annotations

import logging
import warnings
from typing import Literal

import torch
from torch import Tensor, nn

from ..dependencies import require
from ..torch_utils import keep_float32

logger = logging.getLogger(__name__)

LPIPSBackbone = Literal["pretrained", "random"]

#: The trunks of the lpips package.
LPIPS_NETS = ("vgg", "alex", "squeeze")


def is_custom_distance(net: str) -> bool:
    """Whether ``net`` names a custom distance network (``package.module:factory``), not an lpips trunk;
    raises ``ValueError`` when it is neither."""
    if net in LPIPS_NETS:
        return False
    if ":" in net:
        return True
    raise ValueError(f"lpips_net must be one of {LPIPS_NETS} or 'package.module:factory'; got {net!r}.")


#: eps of the patched ``lpips.normalize_tensor`` (the lpips package uses 1e-10).
LPIPS_NORMALIZE_EPS = 1e-8

RANDOM_BACKBONE_WARNING = (
    "LPIPS is built with a RANDOMLY INITIALISED {net} backbone (backbone='random'). The resulting "
    "perceptual distance is MEANINGLESS and must only be used in tests; use backbone='pretrained' for "
    "training and evaluation."
)


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
    require("lpips", extra="eval", feature="LPIPS")
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


class LPIPSDistance(nn.Module):
    """Frozen perceptual distance, always in eval mode: LPIPS (default VGG, as in SSDD training) or a
    custom distance network.

    Computed in float32 with autocast disabled. Gradients flow to the inputs, never to the network.

    Args:
        net: lpips trunk, ``"vgg"`` for the training loss, ``"alex"`` for the evaluation metric.
        backbone: ``"pretrained"`` (ImageNet trunk via torchvision) or ``"random"`` (tests only).
        network: instead of LPIPS, a module mapping two (B, 3, H, W) batches in [-1, 1] to per-image
            distances (B,), e.g. an offline stand-in whose weights are at hand (``net`` and ``backbone``
            are then unused). One returning a scalar serves :meth:`forward` only.
    """

    def __init__(
        self,
        net: Literal["vgg", "alex", "squeeze"] = "vgg",
        backbone: LPIPSBackbone = "pretrained",
        network: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.is_lpips = network is None
        self.net = build_lpips_network(net, backbone) if network is None else network.requires_grad_(False)
        self.net.eval()

    def train(self, mode: bool = True) -> LPIPSDistance:
        """Ignore ``mode``: the network stays in eval mode (lpips has dropout layers)."""
        return super().train(False)

    def _distances(self, input: Tensor, target: Tensor) -> Tensor:
        if input.shape != target.shape or input.dim() != 4 or input.shape[1] != 3:
            raise ValueError(
                f"expected two (B, 3, H, W) tensors, got {tuple(input.shape)} and {tuple(target.shape)}"
            )
        keep_float32(self.net)
        with torch.autocast(device_type=input.device.type, enabled=False):
            if self.is_lpips:
                return self.net(input.float(), target.float(), normalize=False)
            return self.net(input.float(), target.float()).float()

    def distance(self, input: Tensor, target: Tensor) -> Tensor:
        """Per-image distance.

        Args:
            input: (B, 3, H, W) in [-1, 1].
            target: (B, 3, H, W) in [-1, 1].

        Returns:
            (B,) float32 distances.
        """
        return self._distances(input, target).reshape(input.shape[0])

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        """Batch-mean distance: (B, 3, H, W) x2 in [-1, 1] -> float32 scalar."""
        return self._distances(input, target).mean()
