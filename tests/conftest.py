"""Test environment (offline Hugging Face Hub and datasets) and shared fixtures.

Tiny model configurations and other test helpers live in the ``helpers`` package next to this file;
the tests folder is put on ``sys.path`` here so that test modules can ``import helpers...``.
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers.configs import perturb_, tiny_config  # noqa: E402


@pytest.fixture(autouse=True)
def _seeded_global_random_state():
    """Every test starts from the same global random state (torch, NumPy, ``random``), whatever ran
    before it in the same process: an unseeded ``torch.randn`` in a test draws the same values in any
    order, alone or under xdist, so no test depends on the order of the suite."""
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)


@pytest.fixture
def tiny_vae():
    from ssdd_diffusers import SSDDAutoencoder

    torch.manual_seed(0)
    return perturb_(SSDDAutoencoder(**tiny_config())).eval()


@pytest.fixture(scope="module")
def single_thread():
    """Tiny tensors: one intra-op thread is as fast, and immune to oversubscription on shared CPUs.

    Opt in per module with ``pytestmark = pytest.mark.usefixtures("single_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
