"""``examples/quickstart.py --quick``: train, distil, evaluate, save, reload; deterministic with its seed."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from types import ModuleType

import pytest
from PIL import Image

from ssdd_diffusers import SSDDAutoencoder

QUICKSTART = Path(__file__).resolve().parents[2] / "examples" / "quickstart.py"


def _load_quickstart() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ssdd_quickstart_example", QUICKSTART)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(module: ModuleType, output_dir: Path) -> dict:
    return module.main(["--quick", "--output_dir", str(output_dir), "--no_progress", "--num_threads", "1"])


@pytest.fixture(scope="module")
def quickstart_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    module = _load_quickstart()
    first_dir = tmp_path_factory.mktemp("quickstart_a")
    first = _run(module, first_dir)
    second = _run(module, tmp_path_factory.mktemp("quickstart_b"))
    return first_dir, first, second


def test_quick_run_writes_outputs_and_reloads(quickstart_runs: tuple[Path, dict, dict]) -> None:
    output_dir, summary, _ = quickstart_runs
    for name in (
        "metrics.json",
        "metrics.md",
        "reconstructions.png",
        "teacher/config.json",
        "student/config.json",
    ):
        assert (output_dir / name).is_file(), name
    assert json.loads((output_dir / "metrics.json").read_text())["quickstart"]["seed"] == 0

    student = SSDDAutoencoder.from_pretrained(output_dir / "student")
    teacher = SSDDAutoencoder.from_pretrained(output_dir / "teacher")
    assert student.config.num_inference_steps == 1
    assert (
        teacher.config.num_inference_steps == summary["quickstart"]["model_config"]["num_inference_steps"] > 1
    )

    rows = {model["label"]: model for model in summary["models"]}
    teacher_label = f"teacher ({teacher.config.num_inference_steps} steps)"
    assert set(rows) == {teacher_label, "student (1 step)"}
    for row in rows.values():
        assert (
            math.isfinite(row["metrics"]["psnr"])
            and row["num_images"] == summary["quickstart"]["num_heldout_images"]
        )
    markdown = (output_dir / "metrics.md").read_text()
    assert f"| {teacher_label} |" in markdown and "| student (1 step) |" in markdown

    # grid: originals, teacher, student rows of 4 images at 32 px (2 px padding)
    assert Image.open(output_dir / "reconstructions.png").size == (4 * 34 + 2, 3 * 34 + 2)

    agreement = summary["quickstart"]["student_vs_teacher_psnr"]
    assert agreement["after_distillation"] > agreement["before_distillation"]
    assert not summary["quickstart"]["train"]["stopped_by_time_budget"]


def test_quick_run_is_deterministic(quickstart_runs: tuple[Path, dict, dict]) -> None:
    _, first, second = quickstart_runs
    assert [m["metrics"] for m in first["models"]] == [m["metrics"] for m in second["models"]]
    assert first["quickstart"]["student_vs_teacher_psnr"] == second["quickstart"]["student_vs_teacher_psnr"]
    for phase in ("train", "distill"):
        assert first["quickstart"][phase]["loss_last10"] == second["quickstart"][phase]["loss_last10"]
