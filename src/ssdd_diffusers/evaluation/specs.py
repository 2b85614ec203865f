"""Which model to evaluate: ``[kind:]path[@steps=N][@label=NAME][@subfolder=DIR]`` specs, locating the
model folder (a model, a training checkpoint or a pipeline) and loading SSDD or diffusers autoencoders.

Every part of the package that loads a saved model by path (evaluation, the command line, the training
scripts' ``--pretrained_*`` and teacher flags) finds its folder with :func:`locate_model`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin
from torch import Tensor, nn

from ..torch_utils import own_cpu_memory_
from ..weights_files import broken_weights_error
from .reconstruction import is_ssdd, reconstruct

SSDD_CLASS_NAME = "SSDDAutoencoder"
KL_CLASS_NAME = "AutoencoderKL"

#: ``kind:`` prefixes accepted in a model spec, mapped to a class name.
KIND_ALIASES: dict[str, str] = {
    "ssdd": SSDD_CLASS_NAME,
    "ssddautoencoder": SSDD_CLASS_NAME,
    "kl": KL_CLASS_NAME,
    "vae": KL_CLASS_NAME,
    "autoencoderkl": KL_CLASS_NAME,
}

MODEL_SUBFOLDERS: tuple[str | None, ...] = (None, "vae_ema", "vae")
"""Where a model's ``config.json`` is looked for when no subfolder is given, in order: the folder itself,
a training checkpoint's EMA weights (``vae_ema/``), then ``vae/`` (a checkpoint's training weights, or the
VAE of a diffusers pipeline)."""

_OPTION_RE = re.compile(r"^(steps|label|subfolder)=(.*)$")


@dataclass
class ModelSpec:
    """Which model to evaluate and how.

    Attributes:
        path: local folder or Hub repo id.
        class_name: ``"SSDDAutoencoder"``, ``"AutoencoderKL"`` (or another diffusers autoencoder class);
            ``None`` = detect from the folder's ``config.json`` ``_class_name``.
        label: name in the tables and the grid; ``None`` = derived from the path and the steps.
        num_inference_steps: SSDD decode steps; ``None`` = the model's ``config.num_inference_steps``.
            Ignored (reported as ``None``) for non-SSDD models.
        subfolder: subfolder inside ``path`` (e.g. ``"vae"`` of a pipeline); ``None`` = ``path`` itself,
            or ``vae/`` when ``path`` is a pipeline folder without a top-level ``config.json``.
    """

    path: str
    class_name: str | None = None
    label: str | None = None
    num_inference_steps: int | None = None
    subfolder: str | None = None


def _resolve_kind(kind: str) -> str:
    """Class name for a ``kind:`` prefix (alias, or a diffusers class name given verbatim)."""
    alias = KIND_ALIASES.get(kind.lower())
    if alias is not None:
        return alias
    import diffusers

    if kind == SSDD_CLASS_NAME or isinstance(getattr(diffusers, kind, None), type):
        return kind
    raise ValueError(
        f"unknown model kind {kind!r}; use one of {sorted(KIND_ALIASES)} or a diffusers class name"
    )


def parse_model_spec(text: str, steps: int | None = None, label: str | None = None) -> ModelSpec:
    """Parse ``[kind:]path[@steps=N][@label=NAME][@subfolder=DIR]``.

    ``kind`` is ``ssdd``, ``kl`` / ``vae`` / ``autoencoderkl`` or a diffusers class name; without it the
    class is detected when the model is loaded. ``steps`` and ``label`` (e.g. from ``--steps`` and
    ``--labels``) are used when the spec does not set them itself.

    Examples: ``./ssdd-M@steps=8``, ``kl:stabilityai/sd-vae-ft-ema@label=SD-VAE``,
    ``ssdd:org/ssdd-f8c4-M-1step@steps=1``.
    """
    if not text:
        raise ValueError("empty model spec")
    parts = text.split("@")
    path_parts = [parts[0]]
    options: dict[str, str] = {}
    for part in parts[1:]:
        match = _OPTION_RE.match(part)
        if match is None:  # an '@' that belongs to the path itself
            if options:
                raise ValueError(f"cannot parse option {part!r} in model spec {text!r}")
            path_parts.append(part)
            continue
        options[match.group(1)] = match.group(2)
    path = "@".join(path_parts)

    class_name = None
    prefix, sep, rest = path.partition(":")
    if sep and rest and prefix and not os.path.exists(path):
        try:
            class_name = _resolve_kind(prefix)
            path = rest
        except ValueError:
            if len(prefix) > 1 and "/" not in prefix and "\\" not in prefix:
                raise
    if "steps" in options:
        value = options["steps"]
        try:
            steps = None if value in ("", "default") else int(value)
        except ValueError:
            message = f"steps must be an integer >= 1 or 'default', got {value!r} in {text!r}"
            raise ValueError(message) from None
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps} in {text!r}")
    return ModelSpec(
        path=path,
        class_name=class_name,
        label=options.get("label", label) or None,
        num_inference_steps=steps,
        subfolder=options.get("subfolder") or None,
    )


class _ConfigReader(ConfigMixin):
    """Reads a ``config.json`` whatever class wrote it (``ConfigMixin.load_config`` needs a class)."""

    config_name = "config.json"


def read_config(path: str | os.PathLike, subfolder: str | None = None) -> dict[str, Any]:
    """``config.json`` of a local folder or Hub repo (any diffusers class)."""
    config = _ConfigReader.load_config(str(path), subfolder=subfolder)
    return dict(config[0] if isinstance(config, tuple) else config)


def locate_model(path: str | os.PathLike, subfolder: str | None = None) -> tuple[dict[str, Any], str | None]:
    """``(config, subfolder)`` of the model saved at ``path`` (local folder or Hub id).

    With ``subfolder`` only that folder is read; otherwise :data:`MODEL_SUBFOLDERS` are tried in order.
    Raises ``OSError`` listing what was tried when none holds a ``config.json``.
    """
    candidates = [subfolder] if subfolder is not None else list(MODEL_SUBFOLDERS)
    errors = []
    for candidate in candidates:
        try:
            return read_config(path, candidate), candidate
        except (OSError, ValueError) as error:  # EnvironmentError when config.json is absent
            errors.append(f"{candidate or '.'}: {' '.join(str(error).split())}")
    raise OSError(f"could not read a model config from {str(path)!r}: " + " | ".join(errors))


def detect_model_class(path: str, subfolder: str | None = None) -> tuple[str, str | None]:
    """``(class name, subfolder)`` from the ``_class_name`` of the config :func:`locate_model` finds."""
    config, found = locate_model(path, subfolder)
    class_name = config.get("_class_name")
    if not class_name:
        raise ValueError(f"{path!r} has a config.json without _class_name; pass kind:path explicitly")
    return str(class_name), found


def _model_class(class_name: str) -> type:
    if class_name == SSDD_CLASS_NAME:
        from ..models import SSDDAutoencoder

        return SSDDAutoencoder
    import diffusers

    cls = getattr(diffusers, class_name, None)
    if not isinstance(cls, type):
        raise ValueError(
            f"unsupported model class {class_name!r} (not SSDDAutoencoder nor a diffusers class)"
        )
    return cls


def load_pretrained(
    path: str | os.PathLike, subfolder: str | None = None, class_name: str | None = None, **kwargs: Any
) -> nn.Module:
    """``from_pretrained`` of the model at ``path`` (found with :func:`locate_model`); the class comes from
    ``class_name`` or the config's ``_class_name``. ``kwargs`` go to ``from_pretrained``."""
    config, found = locate_model(path, subfolder)
    cls = _model_class(class_name or str(config.get("_class_name") or SSDD_CLASS_NAME))
    if found is not None:
        kwargs["subfolder"] = found
    try:
        model = cls.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError) as error:  # a truncated download: name the file instead
        broken = broken_weights_error(error, path, found)
        if broken is None:
            raise
        raise broken from error
    return own_cpu_memory_(model)  # any class: aligned like SSDD's


def _default_label(path: str, class_name: str, steps: int | None) -> str:
    name = Path(path.rstrip("/\\")).name or path
    if class_name == SSDD_CLASS_NAME:
        return f"{name} ({steps} step{'s' if steps != 1 else ''})"
    return name


class LoadedAutoencoder:
    """A model ready for evaluation: holds the network, its label and how to reconstruct with it.

    Build with :func:`load_autoencoder` (from a spec) or :meth:`from_model` (an in-memory model).
    """

    def __init__(
        self,
        model: nn.Module,
        label: str,
        num_inference_steps: int | None = None,
        source: str | None = None,
    ) -> None:
        self.model = model.eval()
        self.class_name = type(model).__name__
        self.is_ssdd = is_ssdd(model)
        if self.is_ssdd and num_inference_steps is None:
            num_inference_steps = int(model.config.num_inference_steps)
        self.num_inference_steps = num_inference_steps if self.is_ssdd else None
        self.label = label
        self.source = source or "<in-memory>"

    @classmethod
    def from_model(
        cls, model: nn.Module, label: str | None = None, num_inference_steps: int | None = None
    ) -> LoadedAutoencoder:
        """Wrap an in-memory ``SSDDAutoencoder`` / ``AutoencoderKL``."""
        wrapped = cls(model, label or type(model).__name__, num_inference_steps)
        if label is None:
            wrapped.label = _default_label(
                type(model).__name__, wrapped.class_name, wrapped.num_inference_steps
            )
        return wrapped

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def spatial_compression_ratio(self) -> int:
        ratio = getattr(self.model, "spatial_compression_ratio", None)
        if isinstance(ratio, int):
            return ratio
        blocks = getattr(self.model.config, "block_out_channels", None)
        return 2 ** (len(blocks) - 1) if blocks else 1

    def reconstruct(self, images: Tensor, noise: Tensor | None = None) -> Tensor:
        """Encode (posterior mode) and decode ``images`` (B, 3, H, W) in [-1, 1]; returns float32.

        ``noise`` (B, 3, H, W) is the SSDD starting noise; ignored by other models.
        """
        return reconstruct(self.model, images, self.num_inference_steps, noise=noise)


def load_autoencoder(
    spec: ModelSpec | str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> LoadedAutoencoder:
    """Load the model of ``spec`` (class from ``kind:`` or detected from ``config.json``) in eval mode."""
    if isinstance(spec, str):
        spec = parse_model_spec(spec)
    model = load_pretrained(spec.path, spec.subfolder, spec.class_name, torch_dtype=dtype)
    if not (hasattr(model, "encode") and hasattr(model, "decode")):
        raise ValueError(f"{spec.path!r} holds a {type(model).__name__}, not an autoencoder")
    model = model.to(device).eval()
    model.requires_grad_(False)
    wrapped = LoadedAutoencoder(
        model, label="", num_inference_steps=spec.num_inference_steps, source=spec.path
    )
    wrapped.label = spec.label or _default_label(spec.path, wrapped.class_name, wrapped.num_inference_steps)
    return wrapped
