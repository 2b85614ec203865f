"""Reproducible randomness: every random draw of training is a pure function of ``(seed, step, ...)``, so a
run resumed from a checkpoint draws exactly what the uninterrupted run would have drawn."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, Sampler


def derive_seed(*values: int) -> int:
    """A well-mixed 63-bit seed from integers (``numpy.random.SeedSequence``)."""
    state = np.random.SeedSequence([int(v) & 0xFFFFFFFF for v in values]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def step_generator(
    seed: int, step: int, micro_step: int, process_index: int, device: torch.device | str
) -> torch.Generator:
    """Generator for the training noise of one micro-batch, a pure function of its coordinates.

    Nothing about the noise has to be checkpointed, so a resumed run draws the same z, t and ε as an
    uninterrupted one; each process draws different noise.
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(derive_seed(seed, step, micro_step, process_index, 0x55DD))
    return generator


class EpochShuffleSampler(Sampler[int]):
    """Random permutation of ``range(n)`` that depends only on ``(seed, epoch)``.

    Every process computes the same order (accelerate then shards the batches), and a resumed run can
    skip the batches already consumed in the current epoch. Call :meth:`set_epoch` at each epoch.
    """

    def __init__(self, num_samples: int, seed: int = 0, shuffle: bool = True) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch``."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.num_samples))
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, 0x5A))
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())


class SeededAugmentDataset(Dataset):
    """Map-style wrapper: item ``i`` is produced with torch's RNG seeded from ``(seed, epoch, i)``.

    The wrapped dataset's random augmentation (which uses torch's global RNG) thus depends only on the
    sample's coordinates, not on how many batches were prefetched or skipped; the global RNG state is
    restored afterwards.
    """

    def __init__(self, dataset: Dataset, seed: int = 0) -> None:
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation seeds of ``epoch``."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.seed, self.epoch, int(index), 0xA6))
            return self.dataset[index]


class SeededAugmentIterableDataset(IterableDataset):
    """Iterable counterpart of :class:`SeededAugmentDataset` (seeds from the stream position)."""

    def __init__(self, dataset: IterableDataset, seed: int = 0) -> None:
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation seeds of ``epoch`` and forward the epoch to the stream."""
        self.epoch = epoch
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __iter__(self) -> Iterator[Any]:
        iterator = iter(self.dataset)
        position = 0
        while True:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(derive_seed(self.seed, self.epoch, position, 0xA6))
                try:
                    item = next(iterator)
                except StopIteration:
                    return
            position += 1
            yield item
