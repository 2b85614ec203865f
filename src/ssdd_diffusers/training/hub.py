"""Publishing a training output folder to the Hugging Face Hub (without its intermediate checkpoints)."""

from __future__ import annotations

import os
from typing import Any

from .checkpoints import CHECKPOINT_PREFIX

HUB_IGNORE_PATTERNS = [f"{CHECKPOINT_PREFIX}*", "*.tmp", "logs/*", "logs"]


def push_folder_to_hub(
    output_dir: str | os.PathLike,
    repo_id: str,
    token: str | None = None,
    private: bool = False,
    commit_message: str = "End of training",
) -> Any:
    """Create the model repo (if needed) and upload ``output_dir`` without intermediate checkpoints.

    ``output_dir`` is only read. A lost connection raises one ``ConnectionError`` that names the repo
    and says that retrying is safe (see :func:`ssdd_diffusers.model_card.interrupted_upload_as_error`).
    """
    from huggingface_hub import create_repo, upload_folder

    from ..model_card import interrupted_upload_as_error

    with interrupted_upload_as_error(repo_id, "the model folder"):
        repo_id = create_repo(repo_id, exist_ok=True, token=token, private=private).repo_id
        return upload_folder(
            repo_id=repo_id,
            folder_path=str(output_dir),
            commit_message=commit_message,
            ignore_patterns=HUB_IGNORE_PATTERNS,
            token=token,
        )
