"""``ssdd-diffusers`` command line: every subcommand in-process on tiny offline models and generated images.

Numbers are checked against the model called directly: reconstructions and decodes are bit-identical
(same seed, same per-image batch of one), latents equal ``encode(x).latent_dist.mode()``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.configs import FIXTURES, perturb_, tiny_config
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ssdd_diffusers import SSDDAutoencoder
from ssdd_diffusers.cli import benchmark as bench
from ssdd_diffusers.cli import (
    build_evaluate_parser,
    build_latent_stats_parser,
    build_parser,
    contenders,
    latent_stats_command,
    main,
)
from ssdd_diffusers.data import to_signed_tensor
from ssdd_diffusers.evaluation.metrics import psnr, ssim, to_uint8

pytestmark = pytest.mark.filterwarnings("ignore:LPIPS is built with a RANDOMLY INITIALISED")

UPSTREAM_SMALL = FIXTURES / "upstream_parity_small" / "small_state_dict.safetensors"
MULTIPLE = 8  # tiny_config: f4 encoder, decoder factor 8


def _image(seed: int, width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
    channels = [
        0.5 + 0.4 * np.sin(2 * np.pi * (rng.uniform(1, 3) * xx + rng.uniform(1, 3) * yy)) for _ in "rgb"
    ]
    array = np.clip(np.stack(channels, -1) + rng.normal(0, 0.03, (height, width, 3)), 0, 1)
    return Image.fromarray((array * 255).astype(np.uint8), mode="RGB")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny-ssdd"
    perturb_(SSDDAutoencoder(**tiny_config()), seed=2).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def vae(model_dir: Path) -> SSDDAutoencoder:
    """The saved model loaded back (what the CLI runs), to compare with bit for bit."""
    return SSDDAutoencoder.from_pretrained(model_dir).eval()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``a.png`` 40x32 (fits the model) and ``sub/b.png`` 45x37 (needs a crop to 40x32)."""
    root = tmp_path_factory.mktemp("images")
    _image(0, 40, 32).save(root / "a.png")
    (root / "sub").mkdir()
    _image(1, 45, 37).save(root / "sub" / "b.png")
    return root


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    (root / "x.png").write_bytes(b"\x89PNG garbage, not an image" * 3)
    (root / "latents.safetensors").write_bytes(b"garbage that is not safetensors")
    (root / "not_a_model").mkdir()
    (root / "not_a_model" / "readme.txt").write_text("no config here")
    (root / "empty").mkdir()
    (root / "upstream.ckpt").write_bytes(b"not a torch checkpoint")
    save_file({"z": torch.randn(1, 3, 4, 4)}, str(root / "three_channels.safetensors"))
    return {p.name: p for p in root.iterdir()}


def _pixels(image: Image.Image, box: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    return to_signed_tensor(image.crop(box) if box else image)[None]


@torch.no_grad()
def _direct_reconstruction(vae: SSDDAutoencoder, x: torch.Tensor, steps: int, seed: int) -> torch.Tensor:
    z = vae.encode(x).latent_dist.mode()
    return vae.decode(z, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed)).sample


def _png(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)[None]


# ----------------------------------------------------------------------------------------------------
# reconstruct
# ----------------------------------------------------------------------------------------------------
def test_reconstruct_writes_pngs_and_direct_metrics(vae, model_dir, images, tmp_path, capsys) -> None:
    out = tmp_path / "recon"
    argv = ["reconstruct", str(model_dir), str(images), "--output_dir", str(out), "--steps", "1"]
    assert main(argv + ["--seed", "3", "--lpips_backbone", "random", "--no_progress"]) == 0
    captured = capsys.readouterr()
    assert "b.png: centre-cropped 45x37 -> 40x32" in captured.err
    metric_lines = [line for line in captured.out.splitlines() if "PSNR" in line and "LPIPS" in line]
    assert len(metric_lines) == 3  # two images + the mean

    summary = json.loads((out / "metrics.json").read_text())
    assert summary["num_inference_steps"] == 1 and summary["seed"] == 3
    rows = {Path(r["file"]).name: r for r in summary["images"]}
    originals = {
        "a.png": _pixels(Image.open(images / "a.png")),
        "b.png": _pixels(Image.open(images / "sub" / "b.png"), (2, 2, 42, 34)),  # centre 40x32 of 45x37
    }
    for name, x in originals.items():
        png = out / name
        assert Image.open(png).size == (40, 32)
        expected = _direct_reconstruction(vae, x, steps=1, seed=3)
        assert torch.equal(_png(png), to_uint8(expected))
        row = rows[name]
        assert (row["width"], row["height"]) == (40, 32)
        assert row["psnr"] == pytest.approx(float(psnr(to_uint8(x), to_uint8(expected))[0]), abs=1e-9)
        assert row["ssim"] == pytest.approx(float(ssim(to_uint8(x), to_uint8(expected))[0]), abs=1e-9)
        assert math.isfinite(row["lpips"]) and row["lpips"] >= 0
    assert rows["a.png"]["preprocessing"] is None and "45x37" in rows["b.png"]["preprocessing"]
    assert summary["mean"]["psnr"] == pytest.approx((rows["a.png"]["psnr"] + rows["b.png"]["psnr"]) / 2)
    with open(out / "metrics.csv") as handle:
        table = list(csv.DictReader(handle))
    assert [Path(r["file"]).name for r in table] == ["a.png", "b.png"]
    assert float(table[0]["psnr"]) == pytest.approx(rows["a.png"]["psnr"])


def test_reconstruct_resolution_and_no_lpips(vae, model_dir, images, tmp_path) -> None:
    out = tmp_path / "recon"
    argv = ["reconstruct", str(model_dir), str(images / "sub" / "b.png"), "--output_dir", str(out)]
    assert main(argv + ["--resolution", "24", "--lpips_backbone", "none", "--no_progress"]) == 0
    assert Image.open(out / "b.png").size == (24, 24)
    summary = json.loads((out / "metrics.json").read_text())
    assert "lpips" not in summary["images"][0] and summary["lpips_backbone"] == "off"
    from ssdd_diffusers.data import EvalTransform

    x = EvalTransform(24)(Image.open(images / "sub" / "b.png"))[None]
    expected = _direct_reconstruction(vae, x, steps=vae.config.num_inference_steps, seed=0)
    assert torch.equal(_png(out / "b.png"), to_uint8(expected))


# ----------------------------------------------------------------------------------------------------
# encode / decode
# ----------------------------------------------------------------------------------------------------
def test_encode_decode_round_trip(vae, model_dir, images, tmp_path) -> None:
    latents = tmp_path / "z.safetensors"
    assert main(["encode", str(model_dir), str(images), "--output", str(latents), "--no_progress"]) == 0
    with safe_open(str(latents), framework="pt") as handle:
        metadata = handle.metadata()
    assert json.loads(metadata["names"]) == ["a", "b"]
    assert [Path(f).name for f in json.loads(metadata["files"])] == ["a.png", "b.png"]
    assert json.loads(metadata["posterior"]) == "mode"
    stored = load_file(str(latents))
    inputs = [
        _pixels(Image.open(images / "a.png")),
        _pixels(Image.open(images / "sub" / "b.png"), (2, 2, 42, 34)),
    ]
    with torch.no_grad():
        for i, x in enumerate(inputs):
            expected = vae.encode(x).latent_dist.mode()
            assert stored[f"latents.{i:05d}"].shape == (4, 8, 10)
            torch.testing.assert_close(stored[f"latents.{i:05d}"][None], expected, rtol=0, atol=0)

    out = tmp_path / "decoded"
    argv = ["decode", str(model_dir), str(latents), "--output_dir", str(out), "--steps", "2", "--seed", "5"]
    assert main(argv + ["--no_progress"]) == 0
    for i, name in enumerate(["a", "b"]):
        assert Image.open(out / f"{name}.png").size == (40, 32)
        z = stored[f"latents.{i:05d}"][None]
        with torch.no_grad():
            expected = vae.decode(z, num_inference_steps=2, generator=torch.Generator().manual_seed(5)).sample
        assert torch.equal(_png(out / f"{name}.png"), to_uint8(expected))


def test_encode_sample_and_generic_latent_file(vae, model_dir, images, tmp_path) -> None:
    latents = tmp_path / "z.safetensors"
    argv = ["encode", str(model_dir), str(images / "a.png"), "--output", str(latents)]
    assert main(argv + ["--sample", "--seed", "7", "--no_progress"]) == 0
    with torch.no_grad():
        dist = vae.encode(_pixels(Image.open(images / "a.png"))).latent_dist
        expected = dist.sample(generator=torch.Generator().manual_seed(7))
    stored = load_file(str(latents))["latents.00000"][None]
    torch.testing.assert_close(stored, expected, rtol=0, atol=0)
    assert not torch.allclose(stored, dist.mode())

    generic = tmp_path / "generic.safetensors"
    save_file({"z": torch.randn(2, 4, 4, 6)}, str(generic))  # a batch: two images of 24x16 px
    out = tmp_path / "decoded"
    assert main(["decode", str(model_dir), str(generic), "--output_dir", str(out), "--no_progress"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["z_0.png", "z_1.png"]
    assert Image.open(out / "z_1.png").size == (24, 16)


def test_skip_unreadable_images(model_dir, images, bad_inputs, tmp_path, capsys) -> None:
    latents = tmp_path / "z.safetensors"
    argv = ["encode", str(model_dir), str(images), str(bad_inputs["x.png"]), "--output", str(latents)]
    assert main(argv + ["--skip_unreadable", "--no_progress"]) == 0
    assert "warning: skipping" in capsys.readouterr().err
    with safe_open(str(latents), framework="pt") as handle:
        assert json.loads(handle.metadata()["names"]) == ["a", "b"]


# ----------------------------------------------------------------------------------------------------
# convert
# ----------------------------------------------------------------------------------------------------
def test_convert_upstream_checkpoint(tmp_path) -> None:
    out = tmp_path / "converted"
    assert main(["convert", str(UPSTREAM_SMALL), str(out), "--num_inference_steps", "1"]) == 0
    loaded = SSDDAutoencoder.from_pretrained(out)
    reference = SSDDAutoencoder.from_upstream_checkpoint(UPSTREAM_SMALL)
    assert loaded.config.num_inference_steps == 1
    assert list(loaded.config.decoder_block_out_channels) == list(reference.config.decoder_block_out_channels)
    expected = reference.state_dict()
    actual = loaded.state_dict()
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key
    # the existing folder is protected unless --overwrite
    with pytest.raises(SystemExit):
        main(["convert", str(UPSTREAM_SMALL), str(out)])
    assert main(["convert", str(UPSTREAM_SMALL), str(out), "--overwrite", "--set", "scaling_factor=0.5"]) == 0
    assert SSDDAutoencoder.load_config(out)["scaling_factor"] == 0.5


# ----------------------------------------------------------------------------------------------------
# stats, evaluate, benchmark (forwarded to their own parsers)
# ----------------------------------------------------------------------------------------------------
def test_stats_and_evaluate_subcommands(model_dir, images, tmp_path) -> None:
    stats_json = tmp_path / "stats.json"
    data = ["--data_dir", str(images), "--resolution", "32", "--num_workers", "0", "--no_progress"]
    assert main(["stats", str(model_dir), *data, "--no_write", "--stats_json", str(stats_json)]) == 0
    stats = json.loads(stats_json.read_text())
    assert len(stats["mean"]) == 4 and len(stats["std"]) == 4 and stats["num_images"] == 2
    assert latent_stats_command([str(model_dir), *data, "--no_write"]) == 0  # the ssdd-latent-stats alias

    out = tmp_path / "eval"
    extra = ["--fid_feature_extractor", "none", "--lpips_backbone", "none", "--warmup_batches", "0"]
    assert main(["evaluate", f"{model_dir}@steps=1", *data, *extra, "--output_dir", str(out)]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["models"][0]["num_images"] == 2 and report["models"][0]["num_inference_steps"] == 1


ORIGINAL_BENCHMARK_FLAGS = {
    "--resolutions", "--batch-sizes", "--contenders", "--repeats", "--warmup", "--device", "--dtype",
    "--threads", "--compile", "--compile-mode", "--channels-last", "--encode", "--no-memory",
    "--memory-timeout", "--tile-size", "--tile-overlap", "--memory-warmup", "--memory-only", "--flops",
    "--skip-slow", "--slow-resolutions", "--slow-repeats", "--slow-warmup", "--slow-memory", "--quick",
    "--json", "--markdown", "--child-memory", "-h", "--help",
}  # fmt: skip


def test_benchmark_memory_child_process() -> None:
    """The CPU memory measurement runs ``python -m ssdd_diffusers.cli.benchmark --child-memory ...``."""
    args = bench.parse_args(["--device", "cpu", "--memory-warmup", "0"])
    result = bench.memory_in_child(args, "ssdd-XS-1", 64, 1, "decode")
    assert "memory_error" not in result, result.get("memory_error")
    assert result["peak_mib"] >= 0 and result["weights_mib"] > 0


def test_benchmark_contender_names() -> None:
    assert contenders.parse_ssdd("ssdd-S-1") == ("S", 1, False, False)
    assert contenders.parse_ssdd("ssdd-b-12-tiled") == ("B", 12, True, False)
    assert contenders.parse_ssdd("ssdd-S-1-fused") == ("S", 1, False, True)
    assert contenders.parse_ssdd("ssdd-S-1-fused-tiled") == ("S", 1, True, True)
    for name in ("kl", "ssdd-S", "ssdd-S-x", "ssdd-S-1-big", "ssdd-S-1-tiled-tiled"):
        assert contenders.parse_ssdd(name) is None, name
    contender = contenders.build_contender("ssdd-XS-1-fused", torch.device("cpu"), torch.float32, False, None)
    assert contender.model.decoder.fused_norm_kernels
    assert contenders.parse_ssdd("ssdd-S-1-cl") == ("S", 1, False, False)
    contender = contenders.build_contender("ssdd-XS-1-cl", torch.device("cpu"), torch.float32, False, None)
    assert contender.model.decoder.channels_last is True


def test_benchmark_reference_decoders_tiny_and_dc() -> None:
    """AutoencoderTiny (TAESD, f8c4) and AutoencoderDC (f32c32) decode their own latents to 64 px images."""
    cpu = torch.device("cpu")
    for name, channels, factor in (("tiny", 4, 8), ("dc", 32, 32)):
        contender = contenders.build_contender(name, cpu, torch.float32, False, None)
        z = contender.latents(2, 64, cpu, torch.float32)
        assert z.shape == (2, channels, 64 // factor, 64 // factor), name
        with torch.no_grad():
            assert contender.decode(z).shape == (2, 3, 64, 64), name
        assert torch.equal(z, contender.latents(2, 64, cpu, torch.float32))  # seeded: the same every call


def test_benchmark_subcommand_writes_report(tmp_path) -> None:
    flags = {s for a in bench.build_parser()._actions for s in a.option_strings}
    # benchmarks/decode_benchmark.py keeps its flags (plus the allocator and freezing options)
    assert flags == ORIGINAL_BENCHMARK_FLAGS | {"--reuse-cpu-memory", "--freezing"}
    out = tmp_path / "bench.json"
    argv = ["benchmark", "--contenders", "ssdd-XS-1", "--resolutions", "64", "--repeats", "1"]
    argv += ["--reuse-cpu-memory"]
    assert (
        main(
            argv + ["--warmup", "0", "--no-memory", "--json", str(out), "--markdown", str(tmp_path / "b.md")]
        )
        == 0
    )
    report = json.loads(out.read_text())
    assert report["meta"]["command"].startswith("ssdd-diffusers benchmark --contenders ssdd-XS-1")
    assert report["meta"]["reuse_cpu_memory"] is True and report["meta"]["inductor_freezing"] is False
    assert {"torch", "device", "dtype", "repeats", "warmup", "timing", "memory_method"} <= report[
        "meta"
    ].keys()
    (row,) = report["results"]
    assert (row["contender"], row["resolution"], row["batch"]) == ("ssdd-XS-1", 64, 1)
    expected = {
        "decoder_params_m",
        "decode_s_median",
        "decode_s_all",
        "images_per_s",
        "us_per_pixel",
        "warmup_s",
    }
    assert expected <= row.keys() and len(row["decode_s_all"]) == 1
    assert row["decoder_params_m"] == pytest.approx(5.0, abs=0.1)  # XS decoder
    assert "| 64 | 1 | ssdd-XS-1 |" in (tmp_path / "b.md").read_text()
    assert "freed CPU memory reused" in (tmp_path / "b.md").read_text()


# ----------------------------------------------------------------------------------------------------
# help
# ----------------------------------------------------------------------------------------------------
def _all_parsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    parsers = {"ssdd-diffusers": parser}
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    parsers.update({name: p for name, p in sub.choices.items() if p.add_help})
    parsers.update(
        evaluate=build_evaluate_parser(), stats=build_latent_stats_parser(), benchmark=bench.build_parser()
    )
    return parsers


def test_every_flag_has_help_and_every_subcommand_an_example(capsys) -> None:
    for name, parser in _all_parsers().items():
        for action in parser._actions:
            if action.help == argparse.SUPPRESS or isinstance(action, argparse._SubParsersAction):
                continue
            assert action.help, f"{name}: {action.option_strings or action.dest} has no help"
        if name != "ssdd-diffusers":
            assert parser.description and "example" in (parser.epilog or "").lower(), name
    for command in ("reconstruct", "encode", "decode", "convert", "evaluate", "stats", "benchmark"):
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code == 0
        assert f"usage: ssdd-diffusers {command}" in capsys.readouterr().out


def test_console_script_help() -> None:
    script = Path(sys.executable).parent / "ssdd-diffusers"
    path = str(script) if script.exists() else shutil.which("ssdd-diffusers")
    assert path, "the ssdd-diffusers console script is not installed (pip install -e .)"
    result = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for command in ("reconstruct", "encode", "decode", "convert", "evaluate", "stats", "benchmark"):
        assert command in result.stdout
    scripts = {e.name: e for e in entry_points(group="console_scripts") if e.name.startswith("ssdd-")}
    assert {"ssdd-diffusers", "ssdd-evaluate", "ssdd-latent-stats"} <= scripts.keys()
    assert all(callable(entry.load()) for entry in scripts.values())


# ----------------------------------------------------------------------------------------------------
# errors: exit status 1 and exactly one "error: ..." line on stderr
# ----------------------------------------------------------------------------------------------------
ERROR_CASES = {
    "reconstruct-missing-image": (
        "reconstruct {model} {tmp}/missing.png --output_dir {tmp}/o",
        "no such image",
    ),
    "reconstruct-corrupt-image": (
        "reconstruct {model} {bad}/x.png --output_dir {tmp}/o",
        "cannot read image",
    ),
    "reconstruct-not-a-model": (
        "reconstruct {bad}/not_a_model {images} --output_dir {tmp}/o",
        "not a model folder",
    ),
    "reconstruct-missing-model": (
        "reconstruct {tmp}/nope/model {images} --output_dir {tmp}/o",
        "model folder not found",
    ),
    "reconstruct-empty-folder": ("reconstruct {model} {bad}/empty --output_dir {tmp}/o", "no images"),
    "reconstruct-bad-resolution": (
        "reconstruct {model} {images} --output_dir {tmp}/o --resolution 30",
        "multiple of 8",
    ),
    "reconstruct-overwrites-inputs": (
        "reconstruct {model} {images}/a.png --output_dir {images}",
        "overwrite input",
    ),
    "encode-missing-folder": (
        "encode {model} {tmp}/missing_dir --output {tmp}/z.safetensors",
        "no such image",
    ),
    "encode-corrupt-image": ("encode {model} {bad}/x.png --output {tmp}/z.safetensors", "cannot read image"),
    "encode-not-a-model": (
        "encode {bad}/not_a_model {images} --output {tmp}/z.safetensors",
        "not a model folder",
    ),
    "decode-missing-latents": (
        "decode {model} {tmp}/missing.safetensors --output_dir {tmp}/o",
        "no such latents",
    ),
    "decode-corrupt-latents": (
        "decode {model} {bad}/latents.safetensors --output_dir {tmp}/o",
        "cannot read latents",
    ),
    "decode-wrong-channels": (
        "decode {model} {bad}/three_channels.safetensors --output_dir {tmp}/o",
        "3 channels but the model expects 4",
    ),
    "decode-not-a-model": (
        "decode {bad}/not_a_model {bad}/three_channels.safetensors --output_dir {tmp}/o",
        "not a model folder",
    ),
    "convert-missing": ("convert {tmp}/missing.safetensors {tmp}/o", "no such checkpoint"),
    "convert-corrupt": ("convert {bad}/upstream.ckpt {tmp}/o", "not a safetensors file nor a tensors-only"),
    "convert-not-upstream": (
        "convert {model}/diffusion_pytorch_model.safetensors {tmp}/o",
        "looks like a diffusers-format SSDDAutoencoder state dict",
    ),
    "convert-unknown-key": ("convert {upstream} {tmp}/o --set colour=red", "unknown config key"),
    "stats-not-a-model": ("stats {bad}/not_a_model --data_dir {images} --no_write", "model config"),
    "evaluate-missing-data": ("evaluate {model} --data_dir {tmp}/missing_dir --num_workers 0", "not found"),
    "benchmark-unknown-contender": (
        "benchmark --contenders vqgan --no-memory --resolutions 64",
        "Unknown contender",
    ),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_bad_input_exits_with_one_error_line(case, model_dir, images, bad_inputs, tmp_path, capsys) -> None:
    template, fragment = ERROR_CASES[case]
    paths = {
        "model": model_dir,
        "images": images,
        "bad": next(iter(bad_inputs.values())).parent,
        "tmp": tmp_path,
    }
    argv = [arg.format(**paths, upstream=UPSTREAM_SMALL) for arg in template.split()]
    if argv[0] in ("reconstruct", "encode", "decode"):
        argv += ["--no_progress"] + (["--lpips_backbone", "none"] if argv[0] == "reconstruct" else [])
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert fragment in lines[0], lines[0]
