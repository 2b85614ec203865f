"""``benchmarks/gpu_bf16.sh``, the prepared GPU measurement: its dry run on the CPU (every step, with a
failing contender, check and training case injected: each is recorded with its error and the rest still
runs), and the per-contender error recording of the decode benchmark it relies on."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ssdd_diffusers import SSDDAutoencoder
from ssdd_diffusers.cli import benchmark as bench
from ssdd_diffusers.cli import contenders

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_bf16.sh"
DECODE_STEPS = ("decode_eager_256", "decode_compiled_256", "decode_eager_1024", "decode_compiled_1024",
                "decode_cudagraphs_b4")  # fmt: skip
RESULT_FILES = (
    *(f"{name}.{ext}" for name in DECODE_STEPS for ext in ("json", "md")),
    "gpu_env.json", "gpu_agreement.json", "gpu_agreement.md", "profile_ssdd_fastest.json",
    "profile_ssdd_fastest.txt", "train.json", "train.md", "steps.json", "steps.md",
)  # fmt: skip
STEPS = ("env", "agreement", *DECODE_STEPS, "profile", "train")


def test_script_is_valid_bash() -> None:
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    result = subprocess.run([bash, "-n", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_explicit_decoder_paths() -> None:
    """``-nchw`` / ``-cl`` / ``-fused`` pin the path whatever the decoder's defaults; a plain name keeps
    them."""
    cpu = torch.device("cpu")
    assert contenders.parse_ssdd("ssdd-S-1-nchw") == ("S", 1, False, False)
    for name in ("ssdd-S-1-nchw-cl", "ssdd-S-1-nchw-fused"):
        assert contenders.parse_ssdd(name) is None, name
    raw = SSDDAutoencoder.from_preset("f8c4", decoder="XS").decoder
    expected = {
        "ssdd-XS-1": (raw.channels_last, raw.fused_norm_kernels),  # the decoder's defaults, untouched
        "ssdd-XS-1-nchw": (False, False),
        "ssdd-XS-1-cl": (True, False),
    }
    if importlib.util.find_spec("triton") is not None:
        expected["ssdd-XS-1-fused"] = (raw.channels_last, True)  # layout: the automatic choice
    for name, (layout, fused) in expected.items():
        decoder = contenders.build_contender(name, cpu, torch.float32, False, None).model.decoder
        assert (decoder.channels_last, decoder.fused_norm_kernels) == (layout, fused), name


def test_decode_benchmark_records_failing_contenders(monkeypatch, tmp_path) -> None:
    """A contender that fails to build, or to decode, gets a row with its error; the others are timed."""
    build = bench.build_contender

    def build_with_failing_decode(name, *args, **kwargs):
        contender = build(name, *args, **kwargs)
        if name == "tiny":

            def decode(z):
                raise RuntimeError("injected decode failure")

            contender.decode = decode
        return contender

    monkeypatch.setattr(bench, "build_contender", build_with_failing_decode)
    out = tmp_path / "bench.json"
    argv = ["--contenders", "ssdd-ZZ-1", "ssdd-XS-1", "tiny", "kl", "--resolutions", "64", "--repeats", "2"]
    argv += ["--warmup", "1", "--no-memory", "--json", str(out), "--markdown", str(tmp_path / "b.md")]
    bench.main(argv)
    rows = {row["contender"]: row for row in json.loads(out.read_text())["results"]}
    assert rows["ssdd-ZZ-1"]["error"].startswith("ValueError: Unknown decoder size 'ZZ'")
    assert rows["tiny"]["error"] == "RuntimeError: injected decode failure"
    for name in ("ssdd-XS-1", "kl"):
        assert "error" not in rows[name] and len(rows[name]["decode_s_all"]) == 2, name
        assert rows[name]["speed_vs_kl"] > 0
    assert "speed_vs_kl" not in rows["tiny"]
    markdown = (tmp_path / "b.md").read_text()
    assert "| 64 | 1 | tiny | error: RuntimeError: injected decode failure |" in markdown


@pytest.mark.slow  # a few minutes: every step of the script on the CPU
def test_dry_run_runs_every_step_and_records_failures(tmp_path) -> None:
    bash = shutil.which("bash")
    if bash is None or shutil.which("timeout") is None:
        pytest.skip("needs bash and coreutils timeout")
    pytest.importorskip("triton")
    pytest.importorskip("skimage")
    env = {
        **os.environ,
        "DRY_RUN": "1",
        "OUT": str(tmp_path / "results"),
        "PYTHON": sys.executable,
        # one failing contender in every decode step, one failing agreement path, one failing training case
        "EXTRA_CONTENDERS": "ssdd-ZZ-1",
        "AGREE_PATHS": "nchw cl fused default bogus",
        "TRAIN_DECODERS": "XS kl ZZ",
    }
    result = subprocess.run(
        [bash, str(SCRIPT)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1500
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = tmp_path / "results"
    assert "elapsed total" in result.stdout
    for name in RESULT_FILES:
        assert (out / name).is_file(), name
    for name in STEPS:
        assert (out / "logs" / f"{name}.log").is_file(), name

    summary = json.loads((out / "steps.json").read_text())
    assert summary["final"] and summary["dry_run"] and summary["elapsed_s"] > 0
    steps = {step["name"]: step for step in summary["steps"]}
    assert set(STEPS) <= steps.keys()
    assert any(name.startswith("precompile-") for name in steps)
    bad = {name: (step["status"], step["missing"]) for name, step in steps.items() if not step["ok"]}
    assert summary["all_ok"] and not bad, bad

    # the injected failures are recorded, each in its own step, and the others produced results
    for name in DECODE_STEPS:
        rows = json.loads((out / f"{name}.json").read_text())["results"]
        failed = [row for row in rows if "error" in row]
        assert [row["contender"] for row in failed] == ["ssdd-ZZ-1"], name
        assert "Unknown decoder size 'ZZ'" in failed[0]["error"]
        timed = [row for row in rows if "error" not in row]
        assert timed and all(row["decode_s_median"] > 0 for row in timed), name
        assert {"ssdd-XS-1", "kl"} <= {row["contender"] for row in timed}, name
        assert any("ssdd-ZZ-1" in error for error in steps[name]["errors"]), name
    eager = {row["contender"] for row in json.loads((out / "decode_eager_256.json").read_text())["results"]}
    assert {"ssdd-XS-1-nchw", "ssdd-XS-1-cl", "ssdd-XS-1-fused", "tiny", "dc"} <= eager

    checks = json.loads((out / "gpu_agreement.json").read_text())["checks"]
    assert "unknown path 'bogus'" in checks["32px/bfloat16/bogus"]["error"]
    for size in (32, 64):
        for dtype in ("bfloat16", "float16"):
            for path in ("nchw", "cl", "default"):
                check = checks[f"{size}px/{dtype}/{path}"]
                assert check["finite"] and check["rel_rms"] < 0.05, (size, dtype, path, check)
                assert checks[f"{size}px/{dtype}/{path}/large_latents"]["finite"], (size, dtype, path)
    assert "device_vs_cpu_max_abs" in checks["32px/fp32/reference"]
    assert steps["agreement"]["errors"] and all("bogus" in error for error in steps["agreement"]["errors"])

    train = {row["decoder"]: row for row in json.loads((out / "train.json").read_text())["results"]}
    assert "Unknown decoder size 'ZZ'" in train["ZZ"]["error"]
    for decoder in ("XS", "kl"):
        assert train[decoder]["images_per_s"] > 0 and len(train[decoder]["step_s_all"]) == 1, decoder
    profile = json.loads((out / "profile_ssdd_fastest.json").read_text())
    assert "error" not in profile and profile["contender"].startswith("ssdd-XS-1")
    env_report = json.loads((out / "gpu_env.json").read_text())
    assert env_report["bf16_matmul"]["tflops_best_of_3x10"] > 0
