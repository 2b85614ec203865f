"""Model cards (``README.md``) for saved SSDD model folders.

A card has YAML metadata (``library_name``, ``license``, ``tags``, ``base_model``, readable by
``huggingface_hub.ModelCard`` / ``metadata_load``) and three Markdown parts:

* **Model configuration**: a table of the architecture fields of ``config.json`` (encoder preset and
  widths, decoder size, latent channels, downsampling factor, default number of decoding steps,
  ``scaling_factor`` / ``shift_factor``) and the parameter counts (from ``info`` or read from the
  safetensors header of the folder, without loading the weights);
* **Training**: data, steps, recipe and validation metrics (written by the training scripts);
* **Evaluation**, only when given: a Markdown table, the JSON of ``ssdd-evaluate`` /
  :meth:`~ssdd_diffusers.evaluation.EvaluationReport.to_dict`, an ``EvaluationReport``, or a path to
  ``metrics.json`` / ``metrics.md`` / a folder written by :meth:`EvaluationReport.save`.

The information a card was made from is kept in an HTML comment at its end, so that
:func:`write_model_card_for_folder` can add an evaluation to a trained model's card without losing the
training summary::

    from ssdd_diffusers.model_card import write_model_card_for_folder

    write_model_card_for_folder("./ssdd-f8c4-M-256", evaluation="eval_results/metrics.json")

Nothing private is published: a card names a local folder (a training data folder, an initial or teacher
model, an evaluation file) by its last component only, or as "a local folder" when that component would
be empty or the user's name (:func:`public_source_name`); Hub ids are kept as they are. The same goes for
the ``_name_or_path`` that diffusers writes into ``config.json`` (:func:`strip_local_paths_from_config`).
An upload that loses its connection raises one ``ConnectionError`` saying that retrying is safe
(:func:`interrupted_upload_as_error`).
"""

from __future__ import annotations

import getpass
import json
import math
import os
import re
import struct
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path, PureWindowsPath
from typing import Any

import yaml

from .presets import DECODER_SIZES, decoder_preset, encoder_preset

CARD_NAME = "README.md"
CONFIG_NAME = "config.json"
WEIGHTS_NAMES = ("diffusion_pytorch_model.safetensors",)
"""Weight files whose safetensors header is read to count parameters."""
EVALUATION_FILE_NAMES = ("metrics.md", "metrics.json", "eval_results.md", "eval_results.json")
"""Files looked for, in this order, when ``evaluation`` is a folder."""
CARD_TAGS = [
    "ssdd",
    "autoencoder",
    "diffusion-decoder",
    "image-reconstruction",
    "diffusers",
    "diffusers-training",
]
_DATA_MARKER = "ssdd-model-card-data:"
_DATA_RE = re.compile(r"<!-- " + re.escape(_DATA_MARKER) + r" (.*?) -->", re.DOTALL)
_TRAINING_KEYS = ("stage", "data", "num_images", "global_step", "train_batch_size", "recipe", "validation")
_HUB_ID_RE = re.compile(r"[\w.-]+/[\w.-]+")
LOCAL_FOLDER = "a local folder"
"""How a local path appears in published text when its last component is empty or private."""
_PATH_INFO_KEYS = ("base_model", "data", "evaluation_source")
"""``info`` entries that may hold a local path (as do the string values of ``info["recipe"]``)."""


# ====================================================================================================
# What gets published
# ====================================================================================================
def is_hub_id(value: str) -> bool:
    """Whether ``value`` reads as a Hub repo id (``namespace/name``) and is not an existing local path."""
    return bool(_HUB_ID_RE.fullmatch(value)) and not value.startswith(".") and not os.path.exists(value)


def _is_private(name: str) -> bool:
    """Whether ``name`` holds the user name or the home folder's name as a word (``alice-photos``)."""
    for get in (getpass.getuser, lambda: Path.home().name):
        try:
            private = get()
        except (KeyError, OSError, RuntimeError):  # no user name / home folder to be found
            continue
        if private and re.search(rf"(?<![^\W_]){re.escape(private)}(?![^\W_])", name, re.IGNORECASE):
            return True
    return False


def _looks_local(text: str) -> bool:
    if not text or is_hub_id(text):
        return False
    return (
        "/" in text
        or "\\" in text
        or text.startswith("~")
        or text in (".", "..")
        or bool(re.match(r"[A-Za-z]:[\\/]", text))
        or os.path.exists(text)
    )


def public_source_name(source: str | os.PathLike | None) -> str:
    """How a model or data source appears in published text (model cards, configs).

    Hub ids (``"org/name"``) and other plain names are returned as they are; a local path (absolute,
    relative with a separator, ``~``-based, or an existing file or folder) becomes its last component,
    or ``"a local folder"`` (:data:`LOCAL_FOLDER`) when that is empty or holds the user's name (or the
    home folder's) as a word. ``None`` gives ``""``. POSIX and Windows separators are both understood.
    """
    if source is None:
        return ""
    text = os.fspath(source)
    if not isinstance(source, os.PathLike) and not _looks_local(text):
        return text
    name = PureWindowsPath(text.rstrip("/\\")).name  # splits on "/" and "\\"
    if not name or name in (".", "..") or name.startswith("~"):
        name = Path(text).expanduser().resolve().name
    return LOCAL_FOLDER if not name or _is_private(name) else name


def public_card_info(info: Mapping[str, Any]) -> dict[str, Any]:
    """``info`` with the entries that may hold a local path (``base_model``, ``data``,
    ``evaluation_source``, string values of ``recipe``) passed through :func:`public_source_name`."""
    public = dict(info)
    for key in _PATH_INFO_KEYS:
        if isinstance(public.get(key), (str, os.PathLike)):
            public[key] = public_source_name(public[key])
    if isinstance(public.get("recipe"), Mapping):
        public["recipe"] = {
            key: public_source_name(value) if isinstance(value, (str, os.PathLike)) else value
            for key, value in public["recipe"].items()
        }
    return public


def strip_local_paths_from_config(folder: str | os.PathLike) -> bool:
    """Make the ``config.json`` of a saved folder publishable; returns whether it was rewritten.

    diffusers' ``from_pretrained`` records where a model was loaded from as ``_name_or_path`` and
    ``save_pretrained`` writes it; a local path there becomes :func:`public_source_name` of it (a Hub id
    is kept). The file keeps diffusers' layout (2-space indent, sorted keys).
    """
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        return False
    config = json.loads(path.read_text(encoding="utf-8"))
    source = config.get("_name_or_path")
    if not isinstance(source, str) or public_source_name(source) == source:
        return False
    config["_name_or_path"] = public_source_name(source)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return True


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Exceptions of a lost connection, for the HTTP client of the installed ``huggingface_hub``."""
    import importlib

    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module_name, names in (
        ("httpx2", ("TransportError",)),
        ("httpx", ("TransportError",)),
        ("requests.exceptions", ("ConnectionError", "Timeout", "ChunkedEncodingError")),
    ):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        errors += [getattr(module, name) for name in names if hasattr(module, name)]
    return tuple(errors)


@contextmanager
def interrupted_upload_as_error(repo_id: str, what: str = "the upload") -> Iterator[None]:
    """Turn a connection lost during a Hub upload into one ``ConnectionError`` naming ``repo_id``.

    The message says that the upload was interrupted and that retrying is safe (the local files are not
    modified); the original exception is chained. Answers of the Hub (``HfHubHTTPError`` and its
    subclasses) and ``OfflineModeIsEnabled`` pass through unchanged.
    """
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    try:
        yield
    except (HfHubHTTPError, OfflineModeIsEnabled):
        raise
    except _transport_errors() as error:
        raise ConnectionError(
            f"Uploading {what} to the Hub repo {repo_id!r} was interrupted ({type(error).__name__}: "
            f"{error}). The local files are untouched; it is safe to retry."
        ) from error


# ====================================================================================================
# Configuration and parameter counts
# ====================================================================================================
def _as_list(value: Any) -> list[Any] | None:
    return list(value) if isinstance(value, (list, tuple)) else None


def encoder_description(config: Mapping[str, Any]) -> str:
    """``"f8c4"`` for a standard encoder preset, else ``"f8c4 (custom widths [..], N layer(s)/level)"``."""
    widths = _as_list(config.get("block_out_channels")) or []
    factor = 2 ** max(len(widths) - 1, 0)
    name = f"f{factor}c{config.get('latent_channels', '?')}"
    try:
        preset = encoder_preset(name)
    except ValueError:
        preset = None
    layers = config.get("layers_per_block")
    if preset and list(preset["block_out_channels"]) == widths and preset["layers_per_block"] == layers:
        return f"`{name}`"
    return f"`{name}` (custom widths {widths}, {layers} layer(s) per level)"


def decoder_size_name(config: Mapping[str, Any]) -> str | None:
    """Name of the decoder preset (``"XS"`` ... ``"G"``) the config matches exactly, else ``None``."""

    def norm(value: Any) -> Any:
        return _as_list(value) or value

    for name in DECODER_SIZES:
        if all(norm(v) == norm(config.get(k)) for k, v in decoder_preset(name).items()):
            return name
    return None


def _safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape from a safetensors header (the weights are not read)."""
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__"}


def count_parameters(folder: str | os.PathLike) -> dict[str, int] | None:
    """``{"total", "encoder", "decoder"}`` parameter counts of a saved folder's safetensors weights.

    ``encoder`` includes ``quant_conv``; ``None`` when the folder has no (single-file) safetensors weights.
    """
    for name in WEIGHTS_NAMES:
        path = Path(folder) / name
        if path.is_file():
            shapes = _safetensors_shapes(path)
            break
    else:
        return None
    counts = {"total": 0, "encoder": 0, "decoder": 0}
    for key, shape in shapes.items():
        size = math.prod(shape)
        counts["total"] += size
        if key.startswith(("encoder.", "quant_conv.")):
            counts["encoder"] += size
        elif key.startswith("decoder."):
            counts["decoder"] += size
    return counts


def _millions(value: Any) -> str:
    return f"{value / 1e6:.2f} M ({value:,})" if isinstance(value, int) else str(value)


def config_rows(
    config: Mapping[str, Any], parameters: Mapping[str, Any] | None = None
) -> list[tuple[str, str]]:
    """``(field, value)`` rows of the model-configuration table."""
    widths = _as_list(config.get("block_out_channels")) or []
    factor = 2 ** max(len(widths) - 1, 0)
    latent_channels = config.get("latent_channels", "?")
    rows = [("Class", f"`{config.get('_class_name', 'SSDDAutoencoder')}`")]
    rows.append(("Encoder", encoder_description(config)))
    size = decoder_size_name(config)
    widths_dec = _as_list(config.get("decoder_block_out_channels"))
    layers = config.get("decoder_transformer_layers", "?")
    heads, window = config.get("decoder_attention_heads", "?"), config.get("decoder_attention_window", "?")
    decoder = f"`{size}`" if size else "custom"
    decoder += f" (widths {widths_dec}, {layers} transformer layers, {heads} heads, window {window})"
    rows.append(("Decoder size", decoder))
    rows.append(("Latent channels", str(latent_channels)))
    rows.append(("Downsampling factor", f"{factor} (latent = image / {factor} per side)"))
    sample_size = config.get("sample_size")
    if isinstance(sample_size, int) and factor:
        side = sample_size // factor
        rows.append(("Latent shape at `sample_size`", f"{latent_channels}×{side}×{side} at {sample_size} px"))
    rows.append(("Default `num_inference_steps`", str(config.get("num_inference_steps", "?"))))
    if config.get("time_grid_power") is not None:
        rows.append(("Time grid power", str(config["time_grid_power"])))
    rows.append(("`scaling_factor`", str(config.get("scaling_factor", 1.0))))
    rows.append(("`shift_factor`", str(config.get("shift_factor"))))
    if config.get("latents_mean") is not None or config.get("latents_std") is not None:
        rows.append(("Per-channel latent statistics", "`latents_mean` / `latents_std` set"))
    stages = config.get("multiscale_stages") or 1
    if stages > 1:
        rows.append(("Multi-scale stages", f"{stages} (steps {config.get('multiscale_steps')})"))
    if parameters:
        for key in ("total", "encoder", "decoder"):
            if parameters.get(key) is not None:
                label = "Parameters" if key == "total" else f"Parameters ({key})"
                rows.append((label, _millions(parameters[key])))
    if config.get("_diffusers_version"):
        rows.append(("Saved with diffusers", str(config["_diffusers_version"])))
    return rows


# ====================================================================================================
# Evaluation
# ====================================================================================================
def _flatten(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Scalar entries of ``metrics``, nested mappings as ``outer/inner`` keys; lists are left out."""
    flat: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}/"))
        elif not isinstance(value, (list, tuple)):
            flat[f"{prefix}{key}"] = value
    return flat


def _metrics_table(metrics: Mapping[str, Any]) -> str:
    """A ``| metric | value |`` table (floats with 4 decimals) of the scalar entries of ``metrics``."""
    lines = ["| metric | value |", "|---|---|"]
    lines += [
        f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |"
        for k, v in _flatten(metrics).items()
    ]
    return "\n".join(lines) + "\n"


def _evaluation_from_path(path: Path) -> str:
    if path.is_dir():
        for name in EVALUATION_FILE_NAMES:
            if (path / name).is_file():
                return _evaluation_from_path(path / name)
        raise FileNotFoundError(f"no evaluation file ({', '.join(EVALUATION_FILE_NAMES)}) in {path}")
    if path.suffix.lower() == ".json":
        return evaluation_markdown(json.loads(path.read_text()))
    return path.read_text()


def evaluation_markdown(evaluation: Any) -> str | None:
    """Markdown of an evaluation, or ``None`` when there is none (``None`` or blank).

    Accepts a Markdown string, a path (``str`` without ``|`` or a line break, or ``os.PathLike``) to a
    JSON / Markdown file or to a folder written by ``EvaluationReport.save``, the JSON of
    ``EvaluationReport.to_dict`` (its ``"markdown"`` table is used, so the card needs no evaluation
    code), any other mapping of metric -> value (nested mappings become ``outer/inner`` rows, lists are
    left out), or anything with a ``to_markdown()`` method (an ``EvaluationReport``).
    """
    if evaluation is None:
        return None
    if hasattr(evaluation, "to_markdown"):
        text = evaluation.to_markdown()
    elif isinstance(evaluation, os.PathLike):
        text = _evaluation_from_path(Path(evaluation))
    elif isinstance(evaluation, str):
        if not evaluation.strip():
            return None
        is_markdown = "|" in evaluation or "\n" in evaluation.strip()
        text = evaluation if is_markdown else _evaluation_from_path(Path(evaluation))
    elif isinstance(evaluation, Mapping):
        if isinstance(evaluation.get("markdown"), str):  # EvaluationReport.to_dict()
            text = evaluation["markdown"]
        elif _flatten(evaluation):
            text = _metrics_table(evaluation)
        else:
            return None
    else:
        raise TypeError(f"unsupported evaluation of type {type(evaluation).__name__}")
    text = text.strip()
    return text + "\n" if text else None


# ====================================================================================================
# Card
# ====================================================================================================
def _metadata(info: Mapping[str, Any]) -> str:
    data: dict[str, Any] = {"library_name": "diffusers", "license": "apache-2.0", "tags": list(CARD_TAGS)}
    base_model = str(info.get("base_model") or "")
    if base_model and is_hub_id(base_model):
        data["base_model"] = base_model  # Hub ids only; local paths are not valid metadata
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def _training_lines(info: Mapping[str, Any]) -> list[str]:
    lines = [
        "## Training",
        "",
        f"- Stage: {info.get('stage', 'decoder training')}",
        f"- Data: {info.get('data', 'unknown')} ({info.get('num_images', '?')} images; "
        f"{info.get('skipped_images', 0)} unreadable images skipped)",
        f"- Resolution: {info.get('resolution', '?')} px",
        f"- Optimisation steps: {info.get('global_step', '?')} "
        f"(per-device batch {info.get('train_batch_size', '?')})",
    ]
    if info.get("base_model"):
        lines.append(f"- Initialised from: `{info['base_model']}`")
    recipe = dict(info.get("recipe") or {})
    if recipe:
        lines += ["", "### Recipe", "", "| setting | value |", "|---|---|"]
        lines += [f"| `{key}` | `{value}` |" for key, value in recipe.items()]
    validation = dict(info.get("validation") or {})
    if validation:
        lines += ["", "### Validation (fixed validation batch)", "", _metrics_table(validation).rstrip()]
    return lines + [""]


def _encode_data(info: Mapping[str, Any]) -> str:
    # JSON never has "--" outside strings; escaping it inside strings keeps the HTML comment closed.
    return json.dumps(info, ensure_ascii=True, default=str).replace("--", "-\\u002d")


def read_card_info(path: str | os.PathLike) -> dict[str, Any]:
    """The ``info`` a card written by this module was made from (``{}`` for any other README)."""
    path = Path(path)
    if path.is_dir():
        path = path / CARD_NAME
    if not path.is_file():
        return {}
    match = _DATA_RE.search(path.read_text(encoding="utf-8"))
    if not match:
        return {}
    try:
        data = json.loads(match.group(1))
    except json.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}


def render_model_card(
    info: Mapping[str, Any],
    config: Mapping[str, Any] | None = None,
    parameters: Mapping[str, Any] | None = None,
) -> str:
    """Text of a model card (see the module docstring); ``info`` as for :func:`write_model_card`.

    Local paths in ``info`` appear as :func:`public_source_name` gives them (see :func:`public_card_info`).
    """
    info = public_card_info(info)
    repo_id = info.get("repo_id")
    title = repo_id or info.get("title") or "SSDD autoencoder"
    steps = info.get("num_inference_steps", (config or {}).get("num_inference_steps", "?"))
    load_from = repo_id or "path/to/this/folder"
    lines = ["---", _metadata(info).rstrip(), "---", "", f"# {title}", ""]
    lines += [
        "An SSDD (Single-Step Diffusion Decoder, arXiv 2510.04961) autoencoder for `ssdd-diffusers`: "
        "a KL encoder and a flow-matching U-ViT pixel decoder, GAN-free.",
        "",
        "```python",
        "import torch",
        "from ssdd_diffusers import SSDDAutoencoder",
        "",
        f'vae = SSDDAutoencoder.from_pretrained("{load_from}")',
        "z = vae.encode(images).latent_dist.mode()      # images: (B, 3, H, W) in [-1, 1]",
        f"recon = vae.decode(z).sample                   # {steps} Euler step(s) by default",
        "```",
        "",
        "In a diffusers pipeline, pass the autoencoder as a component (`vae=SSDDAutoencoder.from_pretrained"
        f'("{load_from}")` or `pipe.vae = vae`); a Hub pipeline repository naming `ssdd_diffusers` classes '
        "in its `model_index.json` does not load.",
        "",
    ]
    if config:
        lines += ["## Model configuration", "", "| field | value |", "|---|---|"]
        lines += [f"| {name} | {value} |" for name, value in config_rows(config, parameters)]
        lines.append("")
    if any(key in info for key in _TRAINING_KEYS):
        lines += _training_lines(info)
    evaluation = evaluation_markdown(info.get("evaluation"))
    if evaluation:
        lines += ["## Evaluation", ""]
        if info.get("evaluation_source"):
            lines += [f"Source: `{info['evaluation_source']}`", ""]
        lines += [evaluation.rstrip(), ""]
    stored = {k: v for k, v in info.items() if k != "evaluation"}
    if evaluation:
        stored["evaluation"] = evaluation
    lines.append(f"<!-- {_DATA_MARKER} {_encode_data(stored)} -->")
    return "\n".join(lines) + "\n"


def _read_config(folder: Path) -> dict[str, Any] | None:
    path = folder / CONFIG_NAME
    return json.loads(path.read_text()) if path.is_file() else None


def _parameters(folder: Path, info: Mapping[str, Any]) -> Mapping[str, Any] | None:
    given = info.get("num_parameters")
    if isinstance(given, Mapping):
        return given
    if isinstance(given, int):
        return {"total": given}
    return count_parameters(folder)


def write_model_card(output_dir: str | os.PathLike, info: Mapping[str, Any]) -> Path:
    """Write ``README.md`` into ``output_dir`` (a folder written by ``save_pretrained``).

    The configuration table comes from ``output_dir/config.json`` (omitted if absent) and the parameter
    counts from ``info["num_parameters"]`` (an int or ``{"total", "encoder", "decoder"}``) or the
    safetensors header. ``info`` keys used: ``repo_id``, ``title``, ``stage``, ``base_model``, ``data``,
    ``num_images``, ``skipped_images``, ``resolution``, ``global_step``, ``train_batch_size``, ``recipe``
    (a dict of flags), ``validation`` (a dict of metrics), ``num_inference_steps``, ``evaluation``
    (anything :func:`evaluation_markdown` accepts) and ``evaluation_source``. The Training section is
    written when any training key is present, the Evaluation section only when an evaluation is given.
    """
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    info = dict(info)
    evaluation = info.get("evaluation")
    if isinstance(evaluation, (str, os.PathLike)) and not info.get("evaluation_source"):
        if isinstance(evaluation, os.PathLike) or ("|" not in evaluation and "\n" not in evaluation):
            info["evaluation_source"] = Path(evaluation).name
    text = render_model_card(info, _read_config(folder), _parameters(folder, info))
    path = folder / CARD_NAME
    path.write_text(text, encoding="utf-8")
    return path


def write_model_card_for_folder(
    folder: str | os.PathLike,
    evaluation: Any = None,
    repo_id: str | None = None,
    info: Mapping[str, Any] | None = None,
) -> Path:
    """(Re)write the card of a saved model folder from its ``config.json``.

    The information of a card previously written by this module (training summary, evaluation, repo id)
    is kept and updated with ``info``, ``repo_id`` and ``evaluation`` (see :func:`evaluation_markdown`;
    ``None`` keeps the previous evaluation, if any). Raises ``FileNotFoundError`` without ``config.json``.
    """
    folder = Path(folder)
    if not (folder / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{folder} has no {CONFIG_NAME}; save the model with save_pretrained first")
    merged = {**read_card_info(folder), **dict(info or {})}
    if repo_id is not None:
        merged["repo_id"] = repo_id
    if evaluation is not None:
        merged["evaluation"] = evaluation
        merged.pop("evaluation_source", None)
    return write_model_card(folder, merged)


__all__ = [
    "CARD_NAME",
    "LOCAL_FOLDER",
    "config_rows",
    "count_parameters",
    "decoder_size_name",
    "encoder_description",
    "evaluation_markdown",
    "interrupted_upload_as_error",
    "is_hub_id",
    "public_card_info",
    "public_source_name",
    "read_card_info",
    "render_model_card",
    "strip_local_paths_from_config",
    "write_model_card",
    "write_model_card_for_folder",
]
