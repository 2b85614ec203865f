"""Bad inputs against the command lines (``ssdd-diffusers``, ``ssdd-evaluate``, ``ssdd-latent-stats`` and the
training scripts): exit status 1 and one ``error: ...`` line on stderr that names the problem, no traceback.
The same failures through the Python API: ``tests/core/test_bad_inputs.py``."""

from __future__ import annotations

import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.bad_inputs import WEIGHTS, save_model_folders
from helpers.configs import FIXTURES
from PIL import Image
from safetensors.torch import save_file

from ssdd_diffusers.cli import evaluate_command, latent_stats_command, main

pytestmark = pytest.mark.usefixtures("single_thread")

REPO = Path(__file__).resolve().parents[2]
UPSTREAM_SMALL = FIXTURES / "upstream_parity_small" / "small_state_dict.safetensors"
EXTENSIONS = "(.bmp, .gif, .jpeg, .jpg, .png, .tif, .tiff, .webp)"
QUIET_EVAL = "--num_workers 0 --no_progress --fid_feature_extractor none --lpips_backbone none"
QUIET_STATS = "--num_workers 0 --no_progress --no_write"


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Model folders of ``helpers.bad_inputs``, a folder of one 32x32 image, an empty folder, a 3x3 image
    and latents files that are wrong in one way each."""
    root = tmp_path_factory.mktemp("bad_cli")
    paths = save_model_folders(root)
    (root / "images").mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / "images" / "a.png")
    (root / "empty" / "sub").mkdir(parents=True)
    (root / "empty" / "sub" / "notes.txt").write_text("no images here")
    Image.fromarray(np.zeros((3, 3, 3), np.uint8)).save(root / "tiny.png")
    nan = torch.randn(1, 4, 8, 8)
    nan[0, 1, 2, 3] = float("nan")
    latents = {
        "nan": nan,
        "inf": torch.full((4, 8, 8), float("inf")),
        "empty_batch": torch.zeros(0, 4, 8, 8),
        "flat": torch.zeros(4, 8),
        "zero_size": torch.zeros(1, 4, 0, 0),
    }
    for name, z in latents.items():
        save_file({"z": z}, str(root / f"{name}.safetensors"))
        paths[name] = root / f"{name}.safetensors"
    return {**paths, "root": root, "images": root / "images", "empty": root / "empty"}


#: case -> (command line, a fragment of the one error line); ``{name}``: a path of the ``paths`` fixture,
#: ``{out}``: a fresh folder.
CASES: dict[str, tuple[str, str]] = {
    # NaN / inf latents
    "decode-nan": (
        "decode {ssdd} {nan} --output_dir {out}",
        "latents 'z_0' contain NaN or infinite values; expected finite numbers",
    ),
    "decode-inf": (
        "decode {ssdd} {inf} --output_dir {out}",
        "latents 'z' contain NaN or infinite values",
    ),
    # empty batch, wrong shapes
    "decode-empty-batch": (
        "decode {ssdd} {empty_batch} --output_dir {out}",
        "holds no (C, h, w) or (B, C, h, w) latent tensor",
    ),
    "decode-2d": ("decode {ssdd} {flat} --output_dir {out}", "holds no (C, h, w) or (B, C, h, w)"),
    "decode-zero-size": (
        "decode {ssdd} {zero_size} --output_dir {out}",
        "latents 'z_0' of 0x0 would decode to 0x0 px; the model needs positive multiples of 8",
    ),
    # 0 steps
    "decode-steps-0": ("decode {ssdd} {nan} --output_dir {out} --steps 0", "--steps must be >= 1"),
    "reconstruct-steps-0": (
        "reconstruct {ssdd} {images} --output_dir {out} --steps 0",
        "--steps must be >= 1, got 0",
    ),
    "reconstruct-config-steps-0": (
        "reconstruct {steps0} {images} --output_dir {out}",
        "num_inference_steps must be >= 1; got 0",
    ),
    "evaluate-steps-0": (f"evaluate {{ssdd}} --data_dir {{images}} --steps 0 {QUIET_EVAL}", "--steps takes"),
    "evaluate-steps-text": (
        f"evaluate {{ssdd}} --data_dir {{images}} --steps two {QUIET_EVAL}",
        "--steps takes integers >= 1 or 'default', got 'two'",
    ),
    "evaluate-spec-steps-0": (
        f"evaluate {{ssdd}}@steps=0 --data_dir {{images}} {QUIET_EVAL}",
        "steps must be >= 1, got 0 in",
    ),
    "evaluate-spec-steps-text": (
        f"evaluate {{ssdd}}@steps=x --data_dir {{images}} {QUIET_EVAL}",
        "steps must be an integer >= 1 or 'default', got 'x'",
    ),
    "convert-steps-0": (
        "convert {upstream} {out} --num_inference_steps 0",
        "num_inference_steps must be >= 1; got 0",
    ),
    # image folders without images
    "reconstruct-empty-folder": (
        "reconstruct {ssdd} {empty} --output_dir {out}",
        f"no images {EXTENSIONS} found under folder '{{empty}}'",
    ),
    "encode-empty-folder": (
        "encode {ssdd} {empty} --output {out}/z.safetensors",
        f"no images {EXTENSIONS} found under folder '{{empty}}'",
    ),
    "evaluate-empty-folder": (
        f"evaluate {{ssdd}} --data_dir {{empty}} {QUIET_EVAL}",
        f"no images {EXTENSIONS} found under {{empty}}",
    ),
    "stats-empty-folder": (
        f"stats {{ssdd}} --data_dir {{empty}} {QUIET_STATS}",
        f"no images {EXTENSIONS} found under {{empty}}",
    ),
    # resolutions smaller than the model's factor
    "reconstruct-resolution-4": (
        "reconstruct {ssdd} {images} --output_dir {out} --resolution 4",
        "--resolution 4 must be a positive multiple of 8 for this model",
    ),
    "encode-resolution-0": (
        "encode {ssdd} {images} --output {out}/z.safetensors --resolution 0",
        "--resolution 0 must be a positive multiple of 8",
    ),
    "encode-tiny-image": (
        "encode {ssdd} {root}/tiny.png --output {out}/z.safetensors",
        "image of 3x3 is smaller than the model's size multiple 8; pass --resolution",
    ),
    "evaluate-resolution-4": (
        f"evaluate {{ssdd}} --data_dir {{images}} --resolution 4 {QUIET_EVAL}",
        "evaluate at a resolution that is a positive multiple of 8",
    ),
    "stats-resolution-2": (
        f"stats {{ssdd}} --data_dir {{images}} --resolution 2 {QUIET_STATS}",
        "--resolution 2 must be a positive multiple of 4 for this model",
    ),
    # folders of another class
    "reconstruct-kl-as-ssdd": (
        "reconstruct ssdd:{kl} {images} --output_dir {out}",
        "holds a AutoencoderKL config, not an SSDDAutoencoder",
    ),
    "reconstruct-pipeline-as-ssdd": (
        "reconstruct ssdd:{pipeline} {images} --output_dir {out}",
        "holds a AutoencoderKL config, not an SSDDAutoencoder",
    ),
    "reconstruct-unet": (
        "reconstruct {unet} {images} --output_dir {out}",
        "holds a UNet2DModel, not an autoencoder",
    ),
    "evaluate-unet": (
        f"evaluate {{unet}} --data_dir {{images}} {QUIET_EVAL}",
        "holds a UNet2DModel, not an autoencoder",
    ),
    "stats-unet": (
        f"stats {{unet}} --data_dir {{images}} {QUIET_STATS}",
        "holds a UNet2DModel, not an autoencoder",
    ),
    # truncated weights
    "reconstruct-truncated": (
        "reconstruct {truncated} {images} --output_dir {out}",
        f"weights file '{{truncated}}/{WEIGHTS}' is truncated or corrupt",
    ),
    "decode-truncated": (
        "decode {truncated} {nan} --output_dir {out}",
        "is truncated or corrupt (",
    ),
    "evaluate-truncated": (
        f"evaluate {{truncated}} --data_dir {{images}} {QUIET_EVAL}",
        "; re-download it, or save the model again",
    ),
    "stats-truncated": (
        f"stats {{truncated}} --data_dir {{images}} {QUIET_STATS}",
        "is truncated or corrupt",
    ),
    "convert-truncated": (
        f"convert {{truncated}}/{WEIGHTS} {{out}}",
        f"checkpoint '{{truncated}}/{WEIGHTS}' is truncated or corrupt",
    ),
}


def _argv(template: str, paths: dict[str, Path], out: Path) -> list[str]:
    argv = template.format(**paths, out=out, upstream=UPSTREAM_SMALL).split()
    if argv[0] in ("reconstruct", "encode", "decode"):
        argv.append("--no_progress")
    if argv[0] == "reconstruct":
        argv += ["--lpips_backbone", "none"]
    return argv


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_error_line(case: str, paths, tmp_path: Path, capsys) -> None:
    template, fragment = CASES[case]
    argv = _argv(template, paths, tmp_path / "out")
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 1
    line = _one_error_line(capsys)
    assert fragment.format(**paths) in line, line


@pytest.mark.parametrize("command", [evaluate_command, latent_stats_command], ids=["evaluate", "stats"])
def test_console_aliases(command, paths, capsys) -> None:
    """``ssdd-evaluate`` / ``ssdd-latent-stats`` report like ``ssdd-diffusers evaluate`` / ``stats``."""
    quiet = QUIET_EVAL if command is evaluate_command else QUIET_STATS
    with pytest.raises(SystemExit) as exit_:
        command([str(paths["truncated"]), "--data_dir", str(paths["images"]), *quiet.split()])
    assert exit_.value.code == 1
    assert "is truncated or corrupt" in _one_error_line(capsys)


@pytest.mark.parametrize(
    "script, arguments, fragment",
    [
        ("train_ssdd.py", "--train_data_dir {empty}", f"no images {EXTENSIONS} found under --train_data_dir"),
        (
            "train_ssdd.py",
            "--train_data_dir {root}/missing",
            "--train_data_dir '{root}/missing' is not a folder",
        ),
        (
            "train_ssdd.py",
            "--sample_photos train --resolution 4",
            "--resolution must be a positive multiple of 8",
        ),
        (
            "distill_ssdd.py",
            "--sample_photos train --teacher_model_name_or_path {ssdd} --resolution 0",
            "; got 0",
        ),
    ],
)
def test_training_scripts(script: str, arguments: str, fragment: str, paths, monkeypatch, capsys) -> None:
    """The scripts as run by ``python`` / ``accelerate launch`` (in-process here): bad arguments exit 1."""
    argv = arguments.format(**paths).split()
    monkeypatch.setattr(sys, "argv", [script, *argv, "--output_dir", "unused"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(REPO / "training" / script), run_name="__main__")
    assert exit_.value.code == 1
    assert fragment.format(**paths) in _one_error_line(capsys)


@pytest.mark.slow  # a fresh interpreter: importing torch and diffusers dominates
def test_console_script_truncated_weights(paths, tmp_path: Path) -> None:
    """The installed ``ssdd-diffusers`` in a real process: status 1, one error line, no traceback."""
    script = Path(sys.executable).parent / "ssdd-diffusers"
    executable = str(script) if script.exists() else shutil.which("ssdd-diffusers")
    assert executable, "the ssdd-diffusers console script is not installed (pip install -e .)"
    argv = _argv("decode {truncated} {nan} --output_dir {out}", paths, tmp_path)
    result = subprocess.run([executable, *argv], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "is truncated or corrupt" in errors[0], result.stderr[-3000:]
