"""One model shared by a thread pool (a web service): concurrent decodes equal serial ones, and the
inference caches stay bounded when sizes and times keep changing."""

from __future__ import annotations

import importlib
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from helpers.configs import perturb_, tiny_config

from ssdd_diffusers import SSDDAutoencoder
from ssdd_diffusers.models.norm_statistics import BoundedCache
from ssdd_diffusers.models.uvit_decoder import TIME_CACHE_ENTRIES

# the module, not the function of the same name that ``ssdd_diffusers.models`` exports
attention = importlib.import_module("ssdd_diffusers.models.local_attention")

pytestmark = pytest.mark.usefixtures("single_thread")  # one intra-op thread: the same kernels in every thread

# (latent height, width, steps): f4 latents of 32..64 px images; 16-latent sides are tiled (tiles of 32 px);
# the 16 x 16 and 16 x 12 grids give the middle transformer padded attention keys at window 4.
JOBS = [(8, 8, 1), (8, 12, 2), (12, 8, 1), (16, 16, 1), (16, 12, 2), (8, 16, 1)]


def _fresh_model() -> SSDDAutoencoder:
    torch.manual_seed(0)
    vae = perturb_(SSDDAutoencoder(**tiny_config(num_inference_steps=1, sample_size=32))).eval()
    vae.enable_tiling(tile_sample_min_size=32)  # only images larger than 32 px are tiled
    return vae


def _latents(height: int, width: int, seed: int) -> torch.Tensor:
    return torch.randn(1, 4, height, width, generator=torch.Generator().manual_seed(seed))


def _decode(vae: SSDDAutoencoder, job: tuple[int, int, int], seed: int) -> torch.Tensor:
    height, width, steps = job
    with torch.no_grad():
        return vae.decode(_latents(height, width, seed), num_inference_steps=steps).sample


def test_decodes_from_eight_threads_equal_serial_decodes() -> None:
    work = [(job, seed) for seed in range(4) for job in JOBS]  # 24 decodes, every size several times
    serial = [_decode(_fresh_model(), job, seed) for job, seed in work]  # each on a model with empty caches

    shared = _fresh_model()  # caches start empty; all threads race to fill them
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda item: _decode(shared, *item), work))
    for (job, seed), got, expected in zip(work, results, serial):
        assert torch.equal(got, expected), (job, seed)
    # Tiling pools statistics per call and per thread: nothing is left behind on the shared modules.
    norms = [m for m in shared.decoder.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert not any(norm._forward_hooks for norm in norms)


def test_caches_stay_bounded_when_sizes_and_times_keep_changing() -> None:
    vae = perturb_(SSDDAutoencoder(**tiny_config(num_inference_steps=1))).eval()
    decoder = vae.decoder
    with torch.no_grad():
        for i in range(3 * TIME_CACHE_ENTRIES):  # a sampler with ever new times
            decoder(torch.randn(1, 3, 16, 16), 1.0 - i / (4 * TIME_CACHE_ENTRIES), torch.randn(1, 4, 4, 4))
        assert len(decoder._time_cache) == TIME_CACHE_ENTRIES
        for height in range(2, 2 + 2 * 12, 2):  # a server meeting ever new image sizes (8 .. 96 px high)
            vae.decode(torch.randn(1, 4, height, 4))
    assert len(decoder._time_cache) <= TIME_CACHE_ENTRIES
    assert len(attention._LAYOUT_CACHE) <= attention._LAYOUT_CACHE_SIZE


def test_time_modulations_are_reused_and_rebuilt_after_a_weight_change() -> None:
    """A one-step decode computes its time embedding once per model; a weight update invalidates it."""
    vae = perturb_(SSDDAutoencoder(**tiny_config(num_inference_steps=1))).eval()
    z = _latents(8, 8, 0)
    calls = []
    handle = vae.decoder.time_embedding.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        first = vae.decode(z).sample
        again = vae.decode(z).sample
        assert len(calls) == 1 and torch.equal(first, again)
        vae.decoder.down_blocks[0].resnets[0].time_emb_proj.bias.add_(0.5)  # in place: version bump
        changed = vae.decode(z).sample
    assert len(calls) == 2 and not torch.equal(changed, first)
    with torch.enable_grad():  # training computes them per call, with gradients
        vae.decode(z)
    handle.remove()
    assert len(calls) == 3


def test_bounded_cache_evicts_least_recently_used_and_survives_copies() -> None:
    import copy
    import pickle

    cache = BoundedCache(max_entries=2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # "a" is now the most recent
    cache.put("c", 3)
    assert cache.get("b") is None and cache.get("a") == 1 and cache.get("c") == 3 and len(cache) == 2
    for clone in (copy.deepcopy(cache), pickle.loads(pickle.dumps(cache))):  # e.g. an EMA copy of the model
        assert len(clone) == 0 and clone.max_entries == 2
        clone.put("x", 0)
        assert clone.get("x") == 0
    with pytest.raises(ValueError, match="max_entries"):
        BoundedCache(0)
