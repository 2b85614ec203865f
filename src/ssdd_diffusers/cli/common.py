"""Pieces shared by the ``ssdd-diffusers`` subcommands: the help formatter, one-line error reporting,
model loading with clear errors, and the data / model / image arguments."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from ..dependencies import MissingDependencyError
from ..evaluation.specs import MODEL_SUBFOLDERS
from ..torch_utils import DTYPES
from .errors import InputError

T = TypeVar("T")


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("data (exactly one source)")
    g.add_argument(
        "--data_dir",
        type=str,
        default=None,
        help="Local folder of images (searched recursively; the imagefolder layout works).",
    )
    g.add_argument(
        "--dataset_name",
        type=str,
        default=None,
        help="datasets source: Hub name or save_to_disk folder ('imagefolder' with --data_dir).",
    )
    g.add_argument("--dataset_config_name", type=str, default=None, help="datasets configuration name.")
    g.add_argument("--split", type=str, default="train", help="Dataset split (e.g. 'validation').")
    g.add_argument("--image_column", type=str, default=None, help="Image column (default: detected).")
    g.add_argument("--streaming", action="store_true", help="Stream a Hub dataset (use --max_samples).")
    g.add_argument("--cache_dir", type=str, default=None, help="datasets / Hub cache folder.")
    g.add_argument(
        "--sample_photos",
        type=str,
        default=None,
        choices=["heldout", "train", "all"],
        help="The real photos bundled with scikit-image (offline smoke test).",
    )
    g.add_argument("--max_samples", type=int, default=None, help="Use at most this many images.")
    g.add_argument("--resolution", type=int, default=256, help="Resize shorter side + centre crop.")
    g.add_argument("--batch_size", type=int, default=8, help="Images per batch.")
    g.add_argument("--num_workers", type=int, default=2, help="Data-loading worker processes.")
    g.add_argument("--device", type=str, default="auto", help="'auto', 'cpu', 'cuda', 'cuda:1', ...")
    g.add_argument("--dtype", type=str, default="float32", choices=sorted(DTYPES), help="Model precision.")
    g.add_argument("--no_progress", action="store_true", help="Hide the progress bars.")  # fmt: skip


def dataset_from_args(args: argparse.Namespace, max_samples: int | None) -> Any:
    from ..evaluation import build_eval_dataset

    if args.dataset_name is None and args.data_dir is None and args.sample_photos is None:
        raise SystemExit("error: pass one of --data_dir, --dataset_name or --sample_photos")
    return build_eval_dataset(
        resolution=args.resolution,
        data_dir=args.data_dir,
        dataset_name=args.dataset_name,
        dataset_config_name=args.dataset_config_name,
        split=args.split,
        image_column=args.image_column,
        sample_photos=args.sample_photos,
        max_samples=max_samples,
        streaming=args.streaming,
        cache_dir=args.cache_dir,
    )


def describe_data(args: argparse.Namespace) -> str:
    if args.sample_photos is not None:
        return f"scikit-image sample photos ({args.sample_photos})"
    if args.data_dir is not None:
        return f"folder {args.data_dir}"
    config = f"/{args.dataset_config_name}" if args.dataset_config_name else ""
    return f"{args.dataset_name}{config} [{args.split}]"


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the example epilogs as written; appends meaningful defaults (not None / False) to the help."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 1000 else text[:997] + "..."


def expected_errors() -> tuple[type[BaseException], ...]:
    from safetensors import SafetensorError

    return (OSError, ValueError, SafetensorError, torch.OutOfMemoryError, MissingDependencyError)


def run_guarded(command: Any) -> int:
    """Run ``command()``; expected failures become one ``error: ...`` line on stderr and exit status 1."""
    try:
        command()
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except SystemExit as exit_:
        if isinstance(exit_.code, str):  # raise SystemExit("error: ...") from the reused commands
            print(" ".join(exit_.code.split()), file=sys.stderr)
            raise SystemExit(1) from None
        raise
    except expected_errors() as error:
        message = one_line(error)
        if not isinstance(error, InputError) and isinstance(error, OSError) and error.filename:
            message = f"{message} ({error.filename})" if str(error.filename) not in message else message
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(1) from None
    return 0


def call_guarded(function: Callable[[], T]) -> T:
    """``function()``'s result; an expected failure exits as in :func:`run_guarded` (one line, status 1)."""
    results: list[T] = []
    run_guarded(lambda: results.append(function()))
    return results[0]


def _looks_like_hub_id(path: str) -> bool:
    return path.count("/") == 1 and not path.startswith((".", "/", "~")) and "\\" not in path


def load_cli_model(text: str, steps: int | None, device: torch.device, dtype: torch.dtype) -> Any:
    """A :class:`~ssdd_diffusers.evaluation.LoadedAutoencoder` from a model argument, with clear errors
    for a missing path, a folder without ``config.json`` and a model that is not an autoencoder."""
    from ..evaluation import load_autoencoder, parse_model_spec

    if steps is not None and steps < 1:
        raise InputError(f"--steps must be >= 1, got {steps}")
    spec = parse_model_spec(text, steps=steps)
    path = Path(spec.path).expanduser()
    if path.is_dir():
        folders = [path / spec.subfolder] if spec.subfolder else [path / (s or "") for s in MODEL_SUBFOLDERS]
        if not any((folder / "config.json").is_file() for folder in folders):
            raise InputError(f"{spec.path!r} is not a model folder (no config.json in {folders[0]})")
        spec.path = str(path)
    elif path.exists():
        raise InputError(f"model {spec.path!r} is a file; pass a model folder (config.json + weights)")
    elif not _looks_like_hub_id(spec.path):
        raise InputError(f"model folder not found: {spec.path!r} (nor a Hub id 'org/name')")
    with warnings.catch_warnings():  # huggingface_hub deprecation noise on a failed Hub lookup
        warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
        loaded = load_autoencoder(spec, device=device, dtype=dtype)
    if steps is not None and not loaded.is_ssdd:
        print(f"note: --steps is ignored for a {loaded.class_name}", file=sys.stderr)
    return loaded  # load_autoencoder refuses a model without encode / decode


def add_model_arguments(parser: argparse.ArgumentParser, steps: bool = True) -> None:
    parser.add_argument(
        "model",
        help="Model folder, Hub id or [kind:]spec (e.g. ssdd:./ssdd-f8c4-M, kl:org/vae@subfolder=vae).",
    )
    if steps:
        parser.add_argument(
            "--steps", type=int, default=None, help="SSDD decode steps (default: the model's config)."
        )
    parser.add_argument("--device", type=str, default="auto", help="'auto', 'cpu', 'cuda', 'cuda:1', ...")
    parser.add_argument(
        "--dtype", type=str, default="float32", choices=sorted(DTYPES), help="Model precision."
    )
    parser.add_argument("--no_progress", action="store_true", help="Hide the progress bar.")


def add_image_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", help="Image files and/or folders (searched recursively).")
    parser.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="Resize the shorter side and centre-crop to this square size; default: keep the size, "
        "centre-cropped to a multiple of the model's factor.",
    )
    parser.add_argument(
        "--skip_unreadable",
        action="store_true",
        help="Warn about and skip unreadable images instead of stopping with an error.",
    )


def iter_images(args: argparse.Namespace, paths: list[Path], multiple: int, desc: str) -> Any:
    """Yield ``(index, path, PreparedImage)`` with a progress bar; notes go to stderr."""
    from tqdm.auto import tqdm

    from .images import check_resolution, load_image, prepare_image

    check_resolution(args.resolution, multiple)
    bar = tqdm(paths, desc=desc, unit="img", disable=args.no_progress)
    for index, path in enumerate(bar):
        try:
            prepared = prepare_image(load_image(path), multiple, args.resolution)
        except InputError as error:
            if not args.skip_unreadable:
                raise
            tqdm.write(f"warning: skipping {path}: {one_line(error)}", file=sys.stderr)
            continue
        if prepared.note:
            tqdm.write(f"note: {path}: {prepared.note}", file=sys.stderr)
        yield index, path, prepared
    bar.close()


def seeded_generator(seed: int) -> torch.Generator:
    """CPU generator seeded with ``seed``: SSDD noise of ``--seed`` is ``decode(z, generator=...)``'s."""
    return torch.Generator(device="cpu").manual_seed(int(seed))
