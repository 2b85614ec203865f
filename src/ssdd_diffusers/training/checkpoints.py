"""Training checkpoints: atomic writes (``checkpoint-N.tmp`` renamed when complete), ``latest`` resolution
that ignores incomplete folders, and rotation (``--checkpoints_total_limit``)."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_TMP_SUFFIX = ".tmp"
CHECKPOINT_MARKER = "ssdd_checkpoint.json"
"""File written last into a checkpoint folder; a folder without it is incomplete."""
_CHECKPOINT_RE = re.compile(rf"^{re.escape(CHECKPOINT_PREFIX)}(\d+)$")


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


def prune_checkpoints(output_dir: str | os.PathLike, total_limit: int | None, reserve: int = 1) -> list[Path]:
    """Delete the oldest complete checkpoints so that at most ``total_limit - reserve`` remain (room for
    the ``reserve`` about to be written), plus stale temporary folders. Returns the deleted paths."""
    root = Path(output_dir)
    removed: list[Path] = []
    if root.is_dir():
        for stale in root.glob(f"{CHECKPOINT_PREFIX}*{CHECKPOINT_TMP_SUFFIX}"):
            shutil.rmtree(stale, ignore_errors=True)
            removed.append(stale)
    if total_limit is None or total_limit <= 0:
        return removed
    checkpoints = list_checkpoints(root)
    excess = len(checkpoints) - max(total_limit - reserve, 0)
    for path in checkpoints[: max(excess, 0)]:
        logger.info("Removing old checkpoint %s (checkpoints_total_limit=%d)", path, total_limit)
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def save_checkpoint_atomic(
    accelerator: Any,
    output_dir: str | os.PathLike,
    step: int,
    state: Mapping[str, Any] | None = None,
    total_limit: int | None = None,
) -> Path:
    """``accelerator.save_state`` into ``checkpoint-N.tmp``, then rename it to ``checkpoint-N``.

    Must be called on every process. The main process first rotates old checkpoints (keeping at most
    ``total_limit`` including the new one), writes the completion marker (``state`` as JSON) last, and
    renames the folder with ``os.replace``; an interrupted save leaves only a ``.tmp`` folder, which
    ``latest`` ignores and the next save removes.
    """
    root = Path(output_dir)
    final = root / f"{CHECKPOINT_PREFIX}{step}"
    tmp = root / f"{CHECKPOINT_PREFIX}{step}{CHECKPOINT_TMP_SUFFIX}"
    if accelerator.is_main_process:
        prune_checkpoints(root, total_limit, reserve=0 if final.exists() else 1)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        marker = {"step": int(step), "time": time.time(), **(dict(state) if state else {})}
        (tmp / CHECKPOINT_MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        logger.info("Saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final
