"""Killed at any moment, training resumes to the same result.

``test_sigkill_anywhere_resumes_bit_identically`` runs ``training/train_ssdd.py`` as a real process,
checkpointing every step, and SIGKILLs it several times: while a checkpoint is being written and while
the final model is being written (both through the ``SSDD_TEST_CRASH_AT`` hook of
:mod:`ssdd_diffusers.training.checkpoints`), and at seeded random delays after a step. Each time it
resumes with ``--resume_from_checkpoint latest``; the end result must be bit-identical to an
uninterrupted run. The random delays are reproducible, the instants they fall on depend on the machine's
speed: the assertions hold wherever they fall. The other tests simulate a kill at each point of a save
in-process and check the fsync order.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers.configs import TINY_MODEL_CONFIG
from helpers.dino import make_tiny_dino
from helpers.images import make_image_folder
from safetensors.torch import load_file

from ssdd_diffusers.training import checkpoints
from ssdd_diffusers.training.checkpoints import (
    CHECKPOINT_MARKER,
    CRASH_ENV,
    crash_point,
    publish_files,
    resolve_resume_checkpoint,
    save_checkpoint_atomic,
)

REPO = Path(__file__).resolve().parents[2]
TRAIN_SCRIPT = REPO / "training" / "train_ssdd.py"
STEPS = 12  # 8 images, batch 2: 4 steps per epoch, so kills also land in later epochs
LIMIT = 2  # --checkpoints_total_limit
WEIGHTS = "diffusion_pytorch_model.safetensors"
_COMPLETE_RE = re.compile(r"^checkpoint-(\d+)$")


# ----------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Generated images and a tiny DINOv2 (REPA on: its projector is part of the checkpoint)."""
    root = tmp_path_factory.mktemp("kill_resume_assets")
    return {"images": make_image_folder(root / "images", count=8), "dino": make_tiny_dino(root / "dino")}


def train_argv(assets: dict[str, Path], output_dir: Path) -> list[str]:
    """A tiny run with every piece of state that must resume: AdamW + warm-up schedule, EMA, REPA
    projector, data order across epochs."""
    return [
        str(TRAIN_SCRIPT),
        "--train_data_dir", str(assets["images"]),
        "--output_dir", str(output_dir),
        "--resolution", "32",
        "--model_config", json.dumps(TINY_MODEL_CONFIG),
        "--lpips_weight", "0",  # frozen, stateless, and slow to build: not needed here
        "--repa_model", str(assets["dino"]),
        "--train_batch_size", "2",
        "--report_to", "none",
        "--validation_steps", "0",
        "--num_validation_images", "0",
        "--seed", "0",
        "--optimizer", "adamw",
        "--learning_rate", "2e-3",
        "--lr_warmup_steps", "3",
        "--ema_start_step", "1",
        "--ema_decay", "0.9",
        "--max_train_steps", str(STEPS),
        "--checkpointing_steps", "1",
        "--checkpoints_total_limit", str(LIMIT),
        "--resume_from_checkpoint", "latest",
        "--no_progress",
    ]  # fmt: skip


def start(argv: list[str], log: Path, crash_at: str | None = None) -> subprocess.Popen:
    """Start a training process (its own session, output to ``log``); ``crash_at`` sets the hook."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1"}
    env.pop(CRASH_ENV, None)
    if crash_at is not None:
        env[CRASH_ENV] = crash_at
    with log.open("w") as out:
        return subprocess.Popen(
            [sys.executable, *argv], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip


def finish(proc: subprocess.Popen, log: Path, expected_rc: int) -> None:
    """Wait for ``proc`` and check its exit status (``-SIGKILL`` for a killed process)."""
    try:
        rc = proc.wait(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert rc == expected_rc, log.read_text()[-5000:]


def complete_steps(output_dir: Path) -> list[int]:
    """Steps of the complete checkpoints, found without the library: ``checkpoint-N`` with a marker."""
    found = []
    for name in os.listdir(output_dir) if output_dir.is_dir() else []:
        match = _COMPLETE_RE.match(name)
        if match and (output_dir / name / CHECKPOINT_MARKER).is_file():
            found.append(int(match.group(1)))
    return sorted(found)


def resumed_from(log: Path) -> int:
    """The step a run resumed from, read from its log (0 for a fresh start)."""
    text = log.read_text()
    match = re.search(r"Resuming from \S*checkpoint-(\d+)\b", text)
    if match:
        return int(match.group(1))
    assert "No complete checkpoint" in text, text[-3000:]
    return 0


def assert_same(a: Any, b: Any, where: str) -> None:
    """Bitwise equality of nested state (tensors with ``torch.equal``, arrays with ``np.array_equal``)."""
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


# ----------------------------------------------------------------------------------------------------
# The training process, killed
# ----------------------------------------------------------------------------------------------------
def test_sigkill_anywhere_resumes_bit_identically(assets: dict[str, Path], tmp_path: Path) -> None:
    """SIGKILL mid-checkpoint, at random moments and mid-final-save; each resume from `latest` takes the
    newest complete checkpoint; the final weights, EMA, optimiser and RNG states equal an uninterrupted
    run's bit for bit."""
    ref, out = tmp_path / "uninterrupted", tmp_path / "killed"
    rng = random.Random(20)
    ref_log = tmp_path / "ref.log"
    reference = start(train_argv(assets, ref), ref_log)  # runs while the killed run starts (2 cores)
    argv = train_argv(assets, out)
    logs = iter(tmp_path / f"run{i}.log" for i in range(100))

    # 1. Killed while checkpoint-3 is being written: its files are in checkpoint-3.tmp, no marker yet.
    log = next(logs)
    finish(start(argv, log, crash_at="checkpoint-3:files"), log, -signal.SIGKILL)
    partial = out / "checkpoint-3.tmp"
    assert (partial / "optimizer.bin").is_file() and (partial / "vae" / WEIGHTS).is_file()
    assert not (partial / CHECKPOINT_MARKER).exists() and not (out / "checkpoint-3").exists()
    assert complete_steps(out) == [1, 2]  # rotation (limit 2) has not deleted checkpoint-1 beforehand
    assert resolve_resume_checkpoint(out, "latest") == out / "checkpoint-2"
    decoy = out / "checkpoint-99"  # a folder without the completion marker: never resumed from
    decoy.mkdir()
    for name in ("optimizer.bin", "random_states_0.pkl"):
        (decoy / name).write_bytes((partial / name).read_bytes())

    # 2. Killed at seeded random moments, each at least one step after it resumed.
    for _ in range(2):
        before = complete_steps(out)[-1]
        log = next(logs)
        proc = start(argv, log)
        deadline = time.monotonic() + 240
        while complete_steps(out)[-1] <= before and proc.poll() is None:
            assert time.monotonic() < deadline, "no progress"
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.5))  # about one step: lands anywhere, checkpoint writes included
        os.killpg(proc.pid, signal.SIGKILL)
        finish(proc, log, -signal.SIGKILL)
        assert resumed_from(log) == before  # not the partial checkpoint-3.tmp, nor the decoy
    assert decoy.is_dir() and not (decoy / CHECKPOINT_MARKER).exists()  # left alone, never used
    shutil.rmtree(decoy)
    assert complete_steps(out)[-1] < STEPS, "the random kills left no steps to train"

    # 3. Killed while the final model is written: nothing half-written is visible in output_dir.
    before = complete_steps(out)[-1]
    log = next(logs)
    finish(start(argv, log, crash_at="final:staged"), log, -signal.SIGKILL)
    assert resumed_from(log) == before
    assert complete_steps(out)[-2:] == [STEPS - 1, STEPS]
    assert (out / "final.tmp" / WEIGHTS).is_file() and (out / "final.tmp" / "config.json").is_file()
    assert not (out / WEIGHTS).exists() and not (out / "config.json").exists()

    # 4. Resumed once more: nothing left to train, the final model is written.
    log = next(logs)
    finish(start(argv, log), log, 0)
    assert resumed_from(log) == STEPS
    finish(reference, ref_log, 0)
    assert resumed_from(ref_log) == 0
    expected = {"README.md", "config.json", WEIGHTS, f"checkpoint-{STEPS - 1}", f"checkpoint-{STEPS}"}
    assert set(os.listdir(ref)) == expected
    assert set(os.listdir(out)) == expected  # rotation kept LIMIT checkpoints; no .tmp folder is left

    for ckpt in (f"checkpoint-{STEPS - 1}", f"checkpoint-{STEPS}"):
        for name in (f"vae/{WEIGHTS}", f"vae_ema/{WEIGHTS}", "repa_projector.safetensors"):
            assert_same(load_file(ref / ckpt / name), load_file(out / ckpt / name), f"{ckpt}/{name}")
        for name in ("optimizer.bin", "scheduler.bin"):
            a = torch.load(ref / ckpt / name, weights_only=True)
            assert_same(a, torch.load(out / ckpt / name, weights_only=True), f"{ckpt}/{name}")
        rng_states = [torch.load(d / ckpt / "random_states_0.pkl", weights_only=False) for d in (ref, out)]
        assert_same(*rng_states, f"{ckpt}/random_states")  # python, numpy, torch RNGs, accelerate's step
        markers = [json.loads((d / ckpt / CHECKPOINT_MARKER).read_text()) for d in (ref, out)]
        for marker in markers:
            marker.pop("time")
        step = int(ckpt.split("-")[1])
        expected_marker = {
            "step": step,
            "epoch": (step - 1) // 4,
            "images_seen": 2 * step,
            "skipped_images": 0,
        }
        assert markers[0] == markers[1] == expected_marker
    final_ref, final_out = load_file(ref / WEIGHTS), load_file(out / WEIGHTS)
    assert_same(final_ref, final_out, WEIGHTS)
    ema = load_file(ref / f"checkpoint-{STEPS}" / "vae_ema" / WEIGHTS)
    assert ema.keys() == final_ref.keys()  # the exported weights are the EMA's
    assert all(torch.equal(final_ref[k], ema[k]) for k in ema)
    assert json.loads((out / "config.json").read_text()) == json.loads((ref / "config.json").read_text())


# ----------------------------------------------------------------------------------------------------
# One save, interrupted in-process at each point
# ----------------------------------------------------------------------------------------------------
class Killed(BaseException):
    """Stands for SIGKILL in-process (a BaseException, so that nothing catches it)."""


def tiny_accelerator() -> Any:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    accelerator.prepare(torch.nn.Linear(2, 2))
    return accelerator


def kill_at(monkeypatch: pytest.MonkeyPatch, target: str) -> None:
    """Make ``crash_point(target)`` raise :class:`Killed`."""

    def point(name: str) -> None:
        if name == target:
            raise Killed(name)

    monkeypatch.setattr(checkpoints, "crash_point", point)


@pytest.mark.parametrize(
    ("point", "latest", "left"),
    [
        ("files", 2, ["checkpoint-2", "checkpoint-4.tmp"]),
        ("marker", 2, ["checkpoint-2", "checkpoint-4.tmp"]),
        ("renamed", 4, ["checkpoint-2", "checkpoint-4"]),  # the old one is deleted only after the rename
    ],
)
def test_save_killed_at_each_point_keeps_a_complete_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, point: str, latest: int, left: list[str]
) -> None:
    """With --checkpoints_total_limit 1, a save killed anywhere leaves a complete checkpoint to resume
    from; the next save removes the leftovers and rotates."""
    accelerator = tiny_accelerator()
    save_checkpoint_atomic(accelerator, tmp_path, 2, state={"images_seen": 4}, total_limit=1)
    kill_at(monkeypatch, f"checkpoint-4:{point}")
    with pytest.raises(Killed):
        save_checkpoint_atomic(accelerator, tmp_path, 4, state={"images_seen": 8}, total_limit=1)
    assert sorted(os.listdir(tmp_path)) == left
    assert resolve_resume_checkpoint(tmp_path, "latest") == tmp_path / f"checkpoint-{latest}"
    assert checkpoints.read_checkpoint_state(tmp_path / f"checkpoint-{latest}")["images_seen"] == 2 * latest
    if point == "marker":  # a .tmp folder holding a marker is still not a checkpoint
        assert (tmp_path / "checkpoint-4.tmp" / CHECKPOINT_MARKER).is_file()
    monkeypatch.undo()
    save_checkpoint_atomic(accelerator, tmp_path, 6, total_limit=1)
    assert os.listdir(tmp_path) == ["checkpoint-6"]


def test_resaving_a_step_replaces_it(tmp_path: Path) -> None:
    """Saving step N again (resumed from an older checkpoint) replaces checkpoint-N, leaving no trash."""
    accelerator = tiny_accelerator()
    save_checkpoint_atomic(accelerator, tmp_path, 2, state={"run": 1})
    save_checkpoint_atomic(accelerator, tmp_path, 2, state={"run": 2})
    assert os.listdir(tmp_path) == ["checkpoint-2"]
    assert checkpoints.read_checkpoint_state(tmp_path / "checkpoint-2")["run"] == 2


def record_io(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, ...]]:
    """Record (in order) the fsyncs and renames made by the checkpoint module."""
    events: list[tuple[str, ...]] = []
    fsync, replace = checkpoints.fsync_path, os.replace

    def recording_fsync(path: str | os.PathLike) -> None:
        events.append(("fsync", str(Path(path))))
        fsync(path)

    def recording_replace(src: str | os.PathLike, dst: str | os.PathLike) -> None:
        events.append(("replace", str(Path(src)), str(Path(dst))))
        replace(src, dst)

    monkeypatch.setattr(checkpoints, "fsync_path", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    return events


def test_checkpoint_is_fsynced_before_rename_and_rotation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every file and folder of the new checkpoint (marker included) is fsynced before the rename that
    publishes it; the parent folder is fsynced after it; only then is the old checkpoint removed."""
    accelerator = tiny_accelerator()
    save_checkpoint_atomic(accelerator, tmp_path, 2, total_limit=1)
    events = record_io(monkeypatch)
    final = save_checkpoint_atomic(accelerator, tmp_path, 4, total_limit=1)
    tmp = str(tmp_path / "checkpoint-4.tmp")
    publish = events.index(("replace", tmp, str(final)))
    synced_before = {e[1] for e in events[:publish] if e[0] == "fsync"}
    written = {str(p).replace(str(final), tmp) for p in final.rglob("*")} | {tmp}
    assert {str(tmp) + "/" + CHECKPOINT_MARKER, tmp + "/random_states_0.pkl"} <= written
    assert written <= synced_before
    last_tmp_sync = max(i for i, e in enumerate(events[:publish]) if e == ("fsync", tmp))
    marker_sync = events.index(("fsync", tmp + "/" + CHECKPOINT_MARKER))
    assert marker_sync < last_tmp_sync  # the marker's folder entry is flushed too
    parent_sync = events.index(("fsync", str(tmp_path)), publish)
    removal = events.index(
        ("replace", str(tmp_path / "checkpoint-2"), str(tmp_path / "checkpoint-2.old.tmp"))
    )
    assert publish < parent_sync < removal
    assert os.listdir(tmp_path) == ["checkpoint-4"]


def test_publish_files_moves_config_and_card_last(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The final model is moved in file by file after an fsync, weights first, config.json then README.md."""
    staging, dest = tmp_path / "final.tmp", tmp_path / "out"
    staging.mkdir()
    dest.mkdir()
    (dest / "config.json").write_text("old")
    for name in ("README.md", "config.json", WEIGHTS):
        (staging / name).write_text(name)
    events = record_io(monkeypatch)
    publish_files(staging, dest, last=("config.json", "README.md"))
    moved = [Path(e[2]).name for e in events if e[0] == "replace"]
    assert moved == [WEIGHTS, "config.json", "README.md"]
    first_move = next(i for i, e in enumerate(events) if e[0] == "replace")
    synced = {Path(e[1]).name for e in events[:first_move] if e[0] == "fsync"}
    assert {WEIGHTS, "config.json", "README.md", "final.tmp"} <= synced
    assert events[-1] == ("fsync", str(dest))
    assert sorted(os.listdir(dest)) == ["README.md", "config.json", WEIGHTS]
    assert (dest / "config.json").read_text() == "config.json" and not staging.exists()


def test_crash_hook_only_fires_on_its_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unset or naming another point, the test hook does nothing; on its name it sends SIGKILL."""
    sent: list[tuple[int, int]] = []

    def kill(pid: int, sig: int) -> None:
        sent.append((pid, sig))

    monkeypatch.setattr(os, "kill", kill)
    monkeypatch.delenv(CRASH_ENV, raising=False)
    crash_point("checkpoint-3:files")
    monkeypatch.setenv(CRASH_ENV, "checkpoint-3:marker")
    crash_point("checkpoint-3:files")
    assert sent == []
    crash_point("checkpoint-3:marker")
    assert sent == [(os.getpid(), signal.SIGKILL)]
