"""Training batches that are a pure function of ``(seed, epoch, position)``.

A resumed run must see exactly the batches and augmentations the uninterrupted run saw, so
nothing here draws from the global random generators or from a worker's history:

- :class:`EpochSampler` orders an epoch from ``(seed, epoch)`` alone and gives every draw
  its own augmentation seed from ``(seed, epoch, position)`` (and the epoch). It shards
  across processes like ``DistributedSampler`` (which it is, so Lightning leaves it in
  place under DDP) and can start part-way through an epoch.
- :class:`SeededSamples` is the dataset view the loader reads: it reseeds the dataset's random
  choices from the draw's seed before loading it, so an augmentation does not depend on which
  worker loads the sample, how many workers there are, or what they loaded before; from a
  given epoch on it closes the dataset's strong augmentation (the draw says its epoch, so
  persistent workers follow too).
- :class:`ResumableLoader` counts the batches it has handed out in the current epoch and
  saves that as its state; Lightning keeps the state of a loader that has ``state_dict`` /
  ``load_state_dict`` in the checkpoint and hands it back on a mid-epoch resume.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

SEED_RANGE = 2**32  # augmentation seeds fit every generator's seed type (np.random.seed too)


class EpochSampler(DistributedSampler):
    """Yields ``(index, seed, epoch)`` draws: this process's share of the epoch's order.

    The order is a permutation drawn from ``(seed, epoch)`` (or ``0..n-1`` without
    ``shuffle``), padded by repeating its start so every process gets the same number of
    samples (as ``DistributedSampler`` does); process ``rank`` takes every ``num_replicas``-th
    position. ``seed`` of a draw is a function of ``(seed, epoch, position)``.

    ``len()`` is always the whole epoch's share, also when resuming part-way through it:
    Lightning derives the epoch length and the schedule's step count from it.
    """

    def __init__(
        self,
        dataset: Dataset,
        seed: int = 0,
        shuffle: bool = True,
        num_replicas: int = 1,
        rank: int = 0,
        drop_last: bool = False,
    ) -> None:
        super().__init__(
            dataset,
            num_replicas=num_replicas,
            rank=rank,
            shuffle=shuffle,
            seed=int(seed) % SEED_RANGE,
            drop_last=drop_last,
        )
        self.start = 0  # samples of this process's share to skip in the current epoch

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning before each epoch; a new epoch starts at its beginning."""
        if epoch != self.epoch:
            self.start = 0
        self.epoch = int(epoch)

    def resume(self, epoch: int, start: int, seed: int | None = None) -> None:
        """Continue ``epoch`` (of the run seeded with ``seed``) after the first ``start``
        samples of this process's share."""
        self.epoch, self.start = int(epoch), max(int(start), 0)
        if seed is not None:
            self.seed = int(seed)

    def draws(self) -> list[tuple[int, int, int]]:
        """This process's whole share of the current epoch, ``(index, seed, epoch)`` in order."""
        rng = np.random.default_rng([self.seed, self.epoch])
        count = len(self.dataset)
        order = rng.permutation(count) if self.shuffle else np.arange(count)
        if self.drop_last:
            order = order[: self.total_size]
        elif self.total_size > count:
            order = np.resize(order, self.total_size)  # repeats the start, like DistributedSampler
        seeds = rng.integers(0, SEED_RANGE, size=self.total_size)
        positions = range(self.rank, self.total_size, self.num_replicas)
        return [(int(order[p]), int(seeds[p]), self.epoch) for p in positions]

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        start, self.start = self.start, 0  # the skip applies to one pass only
        return iter(self.draws()[start:])


class SeededSamples(Dataset):
    """``dataset`` read with ``(index, seed, epoch)`` keys: each sample's randomness from its
    seed.

    A dataset with ``reseed(seed)`` (every detkit dataset: its own generator and its
    transforms') is reseeded; any other dataset gets the global generators seeded around the
    call and put back afterwards, so the training process's own streams are untouched when
    there are no workers. With ``close_augmentation_from``, draws of that epoch and later
    are loaded with the dataset's strong augmentation closed (``close_augmentation``).
    """

    def __init__(self, dataset: Dataset, close_augmentation_from: int | None = None) -> None:
        self.dataset = dataset
        self.close_augmentation_from = close_augmentation_from

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int, int]) -> Any:
        index, seed, epoch = key
        if self.close_augmentation_from is not None:
            self.dataset.close_augmentation(epoch >= self.close_augmentation_from)
        reseed = getattr(self.dataset, "reseed", None)
        if reseed is not None:
            reseed(seed)
            return self.dataset[index]
        with _global_generators_seeded(seed):
            return self.dataset[index]


class _global_generators_seeded:  # noqa: N801 - used as a context manager
    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __enter__(self) -> None:
        self.saved = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        random.seed(self.seed)
        np.random.seed(self.seed % SEED_RANGE)
        torch.manual_seed(self.seed)

    def __exit__(self, *exc) -> None:
        python, numpy, torch_state = self.saved
        random.setstate(python)
        np.random.set_state(numpy)
        torch.set_rng_state(torch_state)


class ResumableLoader(DataLoader):
    """A ``DataLoader`` over an :class:`EpochSampler` that can stop and resume mid-epoch.

    Its state is the seed, the epoch and the number of samples (of this process's share)
    handed out in it (the seed too: a run started with a random seed resumes with it).
    Iteration starts lazily, at the first batch requested: Lightning creates the
    iterator before it tells the sampler the epoch, and worker processes would otherwise
    start loading the wrong epoch's samples.
    """

    def __init__(
        self,
        dataset: Dataset,
        sampler: EpochSampler,
        close_augmentation_from: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(SeededSamples(dataset, close_augmentation_from), sampler=sampler, **kwargs)
        self._handed_out = 0  # batches of the current epoch, skipped ones included

    def __iter__(self) -> Iterator[Any]:
        sampler = self.sampler
        self._handed_out = -(-sampler.start // self.batch_size)
        for batch in super().__iter__():
            self._handed_out += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        sampler = self.sampler
        samples = self._handed_out * self.batch_size
        return {"seed": int(sampler.seed), "epoch": int(sampler.epoch), "samples": samples}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.resume(state["epoch"], state["samples"], state.get("seed"))
        self._handed_out = -(-self.sampler.start // self.batch_size)
