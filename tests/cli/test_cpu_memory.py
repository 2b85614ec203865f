"""reuse_freed_memory keeps freed CPU memory inside the block and hands it back on exit."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers.configs import perturb_, tiny_config

from ssdd_diffusers import SSDDAutoencoder
from ssdd_diffusers.cli import cpu_memory
from ssdd_diffusers.cli.cpu_memory import reuse_freed_memory

RSS_PROBE = """
import json
from pathlib import Path

import torch

from ssdd_diffusers.cli.cpu_memory import reuse_freed_memory

MIB = 2**20


def rss_mib():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024


size = 256 * MIB
baseline = rss_mib()
with reuse_freed_memory() as active:
    block = torch.ones(size // 4)  # 256 MiB, touched
    del block
    kept = rss_mib() - baseline  # freed, but kept (already faulted in) by malloc for the next tensor
    smaller = torch.ones(size // 8)  # 128 MiB: served from the kept block, no new pages
    grown = rss_mib() - baseline - kept
    del smaller
returned = rss_mib() - baseline
block = torch.ones(size // 4)  # outside the block: the default behaviour is back
del block
after = rss_mib() - baseline
print(json.dumps(dict(active=active, kept=kept, grown=grown, returned=returned, after=after)))
"""


@pytest.mark.skipif(not cpu_memory.is_supported(), reason="needs Linux with glibc")
def test_freed_memory_is_kept_inside_and_returned_after() -> None:
    """Measured in a fresh process: the resident set of a long test session depends on earlier tests."""
    result = subprocess.run([sys.executable, "-c", RSS_PROBE], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rss = json.loads(result.stdout.strip().splitlines()[-1])
    assert rss["active"]
    assert rss["kept"] > 200, rss
    assert rss["grown"] < 32, rss
    assert rss["returned"] < 64, rss  # malloc_trim handed it back
    assert rss["after"] < 64, rss  # a freed large tensor no longer stays resident


def test_nested_blocks_and_disabled_and_unsupported(monkeypatch: pytest.MonkeyPatch) -> None:
    with reuse_freed_memory(enabled=False) as active:
        assert not active
    if cpu_memory.is_supported():
        with reuse_freed_memory() as outer, reuse_freed_memory() as inner:
            assert outer and inner and cpu_memory._depth == 2
        assert cpu_memory._depth == 0
    monkeypatch.setattr(cpu_memory, "_glibc", lambda: None)  # e.g. macOS or musl
    with reuse_freed_memory() as active:
        assert not active


def test_decode_is_identical_with_memory_reuse() -> None:
    vae = perturb_(SSDDAutoencoder(**tiny_config())).eval()
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        plain = vae.decode(z).sample
        with reuse_freed_memory():
            reused = vae.decode(z).sample
    torch.testing.assert_close(reused, plain, atol=0, rtol=0)
