"""Optional dependencies: the core install decodes latents (torch, diffusers, safetensors,
huggingface_hub); training, evaluation and the data loaders come with extras.

:func:`require` turns a missing optional package into one clear line that names the pip command.
"""

from __future__ import annotations

import importlib.util

EXTRAS = {
    "training": "pip install 'ssdd-diffusers[training]'",
    "eval": "pip install 'ssdd-diffusers[eval]'",
}


class MissingDependencyError(ImportError):
    """An optional package that a feature needs is not installed."""


def require(*modules: str, extra: str, feature: str) -> None:
    """Raise :class:`MissingDependencyError` unless every module in ``modules`` can be imported.

    Args:
        modules: importable module names (``"accelerate"``, ``"skimage"``, ...).
        extra: the package extra that installs them (``"training"`` or ``"eval"``).
        feature: what needs them, for the message.
    """
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingDependencyError(
            f"{feature} needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not "
            f"installed: {EXTRAS[extra]}"
        )
