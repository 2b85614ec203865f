"""Clear errors for damaged weights files.

A ``.safetensors`` file cut short by an interrupted download or copy makes the loaders fail with messages
that do not say what is wrong (diffusers: ``Unable to load weights from checkpoint file ...``, safetensors:
``MetadataIncompleteBuffer``). :func:`safetensors_problem` checks a file's header against its size, and
:func:`broken_weights_error` turns a loading error into one that names the damaged file and the fix.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

SAFETENSORS_SUFFIX = ".safetensors"
_HEADER_LENGTH_BYTES = 8
_QUOTED_SAFETENSORS = re.compile(r"'([^']+\.safetensors)'")


def safetensors_problem(path: str | os.PathLike) -> str | None:
    """What is wrong with the ``.safetensors`` file at ``path``, or ``None`` when its header is valid
    JSON and its size is the one the header describes."""
    path = Path(path)
    size = path.stat().st_size
    if size < _HEADER_LENGTH_BYTES:
        return f"{size} bytes, shorter than the {_HEADER_LENGTH_BYTES}-byte header length"
    with open(path, "rb") as handle:
        header_length = int.from_bytes(handle.read(_HEADER_LENGTH_BYTES), "little")
        if _HEADER_LENGTH_BYTES + header_length > size:
            return f"{size:,} bytes, but its header alone claims {_HEADER_LENGTH_BYTES + header_length:,}"
        try:
            header = json.loads(handle.read(header_length))
        except (UnicodeDecodeError, ValueError):
            return "its header is not valid JSON"
    if not isinstance(header, dict):
        return "its header is not a JSON object"
    try:
        data_end = max(
            (int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"),
            default=0,
        )
    except (TypeError, KeyError, IndexError, ValueError):
        return "its header has malformed tensor entries"
    expected = _HEADER_LENGTH_BYTES + header_length + data_end
    if size != expected:
        return f"{size:,} bytes where its header describes {expected:,}"
    return None


def broken_weights_error(
    error: BaseException, path: str | os.PathLike | None = None, subfolder: str | None = None
) -> OSError | None:
    """An ``OSError`` naming the truncated or corrupt ``.safetensors`` file behind ``error``, or ``None``.

    Looks at the ``.safetensors`` paths quoted in ``error``'s message (diffusers quotes the file it
    failed on, also for a Hub download) and, when ``path`` is a local folder, at the ``.safetensors``
    files of ``path`` / ``subfolder``. Re-raise ``error`` itself when this returns ``None``.
    """
    candidates = [Path(found) for found in _QUOTED_SAFETENSORS.findall(str(error))]
    if path is not None:
        folder = Path(path) / (subfolder or "")
        if folder.is_dir():
            candidates.extend(sorted(folder.glob(f"*{SAFETENSORS_SUFFIX}")))
    seen: set[Path] = set()
    for candidate in candidates:
        if candidate in seen or not candidate.is_file():
            continue
        seen.add(candidate)
        problem = safetensors_problem(candidate)
        if problem is not None:
            return OSError(
                f"weights file {str(candidate)!r} is truncated or corrupt ({problem}); re-download it, or "
                "save the model again"
            )
    return None


__all__ = ["broken_weights_error", "safetensors_problem"]
