"""reuse_freed_memory keeps freed CPU memory inside the block and hands it back on exit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import perturb_, tiny_config

from ssdd_diffusers import SSDDAutoencoder, cpu_memory
from ssdd_diffusers.cpu_memory import reuse_freed_memory

MIB = 2**20


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


@pytest.mark.skipif(not cpu_memory.is_supported(), reason="needs Linux with glibc")
def test_freed_memory_is_kept_inside_and_returned_after() -> None:
    size = 256 * MIB
    baseline = rss_mib()
    with reuse_freed_memory() as active:
        assert active
        block = torch.ones(size // 4)  # 256 MiB, touched
        del block
        kept = rss_mib() - baseline  # freed, but kept (already faulted in) by malloc for the next tensor
        smaller = torch.ones(size // 8)  # 128 MiB: served from the kept block, no new pages
        grown = rss_mib() - baseline - kept
        del smaller
    returned = rss_mib() - baseline
    assert kept > 200, kept
    assert grown < 32, grown
    assert returned < 64, returned  # malloc_trim handed it back

    # Outside the block the default behaviour is back: a freed large tensor does not stay resident.
    block = torch.ones(size // 4)
    del block
    assert rss_mib() - baseline < 64


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
