"""Training checkpoints: crash-safe writes (``checkpoint-N.tmp`` fsynced, then renamed when complete),
``latest`` resolution that ignores incomplete folders, and rotation (``--checkpoints_total_limit``).

A process killed at any moment (SIGKILL, OOM, pre-emption) or a power loss leaves either the previous
checkpoints intact or the new one complete: files and folders are fsynced before the rename that
publishes them, old checkpoints are deleted only after the new one is published, and deletions first
rename the folder to a ``.tmp`` name so that a half-deleted checkpoint is never taken for a complete one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_TMP_SUFFIX = ".tmp"
CHECKPOINT_MARKER = "ssdd_checkpoint.json"
"""File written last into a checkpoint folder; a folder without it is incomplete."""
_CHECKPOINT_RE = re.compile(rf"^{re.escape(CHECKPOINT_PREFIX)}(\d+)$")

CRASH_ENV = "SSDD_TEST_CRASH_AT"
"""Test-only fault injection: when this environment variable equals the name of a :func:`crash_point`
(``"checkpoint-N:files"``, ``"checkpoint-N:marker"``, ``"checkpoint-N:renamed"``, ``"final:staged"``),
the process SIGKILLs itself there. Unset (as outside tests), it has no effect."""


def crash_point(name: str) -> None:
    """Test hook: SIGKILL this process if ``$SSDD_TEST_CRASH_AT == name`` (see :data:`CRASH_ENV`)."""
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's data, or a directory's entries, to disk (directories: POSIX only)."""
    if os.name == "nt" and Path(path).is_dir():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file under ``root``, then every folder (deepest first, ``root`` last)."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            fsync_path(os.path.join(folder, name))
        fsync_path(folder)


def write_file_durably(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` and fsync it (the caller renames or fsyncs the folder)."""
    Path(path).write_text(text, encoding="utf-8")
    fsync_path(path)


def remove_folder(path: str | os.PathLike) -> Path:
    """Delete a folder crash-safely: rename it to ``<name>.old.tmp`` (atomic), then delete that.

    A kill during the deletion leaves a ``.tmp`` folder, which ``latest`` ignores and the next save
    removes, never a half-deleted folder under its original name. Returns the original path.
    """
    path = Path(path)
    trash = path.with_name(f"{path.name}.old{CHECKPOINT_TMP_SUFFIX}")
    if trash.exists():
        shutil.rmtree(trash)
    os.replace(path, trash)
    fsync_path(path.parent)
    shutil.rmtree(trash, ignore_errors=True)
    return path


def publish_files(staging: str | os.PathLike, dest: str | os.PathLike, last: Sequence[str] = ()) -> None:
    """Move the (flat) files of ``staging`` into ``dest``, each atomically, then delete ``staging``.

    Files are fsynced first; those named in ``last`` are moved last, in that order (``config.json``
    last: a model folder with a new config then has its new weights). ``dest`` is fsynced at the end.
    """
    staging, dest = Path(staging), Path(dest)
    fsync_tree(staging)
    names = sorted(p.name for p in staging.iterdir() if p.name not in last)
    names += [name for name in last if (staging / name).exists()]
    for name in names:
        os.replace(staging / name, dest / name)
    fsync_path(dest)
    shutil.rmtree(staging)


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """Step of a ``checkpoint-N`` folder name, ``None`` for any other name (``checkpoint-N.tmp``, ...)."""
    match = _CHECKPOINT_RE.match(Path(path).name)
    return int(match.group(1)) if match else None


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    """A ``checkpoint-N`` folder holding the completion marker (written last, before the rename)."""
    path = Path(path)
    return path.is_dir() and checkpoint_step(path) is not None and (path / CHECKPOINT_MARKER).is_file()


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of ``output_dir``, oldest first; temporary or incomplete folders are ignored."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if is_complete_checkpoint(p)]
    return sorted(found, key=lambda p: checkpoint_step(p) or 0)


def resolve_resume_checkpoint(output_dir: str | os.PathLike, value: str | None) -> Path | None:
    """Checkpoint folder to resume from.

    ``"latest"``: the newest complete checkpoint of ``output_dir`` (``None`` if there is none, so a run
    can always be started with ``--resume_from_checkpoint latest``). A path (absolute, or a folder name
    inside ``output_dir``) must be a complete checkpoint, else ``FileNotFoundError``.
    """
    if value is None:
        return None
    if value == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(value)
    if not path.is_absolute() and not path.exists():
        path = Path(output_dir) / value
    if not path.is_dir() or not (path / CHECKPOINT_MARKER).is_file():
        raise FileNotFoundError(f"{value} is not a complete checkpoint folder (missing {CHECKPOINT_MARKER})")
    return path


def read_checkpoint_state(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON completion marker of a checkpoint (``step`` and the training counters)."""
    return json.loads((Path(path) / CHECKPOINT_MARKER).read_text())


def prune_checkpoints(output_dir: str | os.PathLike, total_limit: int | None) -> list[Path]:
    """Delete stale temporary folders, then the oldest complete checkpoints beyond ``total_limit``.

    Called after a new checkpoint is published, so the newest ``total_limit`` (complete) ones survive.
    Returns the deleted paths.
    """
    root = Path(output_dir)
    removed: list[Path] = []
    if root.is_dir():
        for stale in root.glob(f"{CHECKPOINT_PREFIX}*{CHECKPOINT_TMP_SUFFIX}"):
            shutil.rmtree(stale, ignore_errors=True)
            removed.append(stale)
    if total_limit is None or total_limit <= 0:
        return removed
    checkpoints = list_checkpoints(root)
    for path in checkpoints[: max(len(checkpoints) - total_limit, 0)]:
        logger.info("Removing old checkpoint %s (checkpoints_total_limit=%d)", path, total_limit)
        removed.append(remove_folder(path))
    return removed


def save_checkpoint_atomic(
    accelerator: Any,
    output_dir: str | os.PathLike,
    step: int,
    state: Mapping[str, Any] | None = None,
    total_limit: int | None = None,
) -> Path:
    """``accelerator.save_state`` into ``checkpoint-N.tmp``, then publish it as ``checkpoint-N``.

    Must be called on every process. The main process then fsyncs every file and folder, writes the
    completion marker (``state`` as JSON) last, renames the folder with ``os.replace``, fsyncs
    ``output_dir``, and only then rotates old checkpoints (keeping ``total_limit``, the new one
    included) and removes stale ``.tmp`` folders. A save killed at any point leaves a ``.tmp`` folder,
    which ``latest`` ignores, and the previous checkpoints intact.
    """
    root = Path(output_dir)
    final = root / f"{CHECKPOINT_PREFIX}{step}"
    tmp = root / f"{CHECKPOINT_PREFIX}{step}{CHECKPOINT_TMP_SUFFIX}"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        fsync_tree(tmp)
        crash_point(f"{final.name}:files")
        marker = {"step": int(step), "time": time.time(), **(dict(state) if state else {})}
        write_file_durably(tmp / CHECKPOINT_MARKER, json.dumps(marker, indent=2, sort_keys=True))
        fsync_path(tmp)
        crash_point(f"{final.name}:marker")
        if final.exists():  # re-saving a step (resumed from an older checkpoint): set the old one aside
            remove_folder(final)
        os.replace(tmp, final)
        fsync_path(root)
        crash_point(f"{final.name}:renamed")
        prune_checkpoints(root, total_limit)
        logger.info("Saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final
