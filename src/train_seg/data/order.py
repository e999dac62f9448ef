"""The order of a training epoch, as a pure function of ``(seed, epoch)``: what makes a run resumable at any step.

``EpochOrder`` (the training loader's sampler) draws epoch ``e``'s index list (a permutation, or the repeat-factor
list of ``train_seg.data.sampler``) from ``(seed, e)`` alone and gives every position ``p`` the augmentation seed
``SeedSequence([seed, e, p])``; it yields ``(index, sample_seed)`` pairs, and ``SeededSamples`` reseeds the
augmentation pipeline with ``sample_seed`` before loading ``index``. A batch therefore depends only on its position:
not on ``trainer.num_workers``, and not on what ran before (``start_at`` resumes mid-epoch with exactly the batches
of the uninterrupted run). Under ``torch.distributed`` rank ``r`` of ``W`` takes positions ``r, r + W, ...`` of
the same list, truncated to a multiple of ``W``. Only the albumentations pipeline's own generators are reseeded:
transforms drawing from python's or numpy's global generators are not reproducible across a mid-epoch resume.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch


class EpochOrder(torch.utils.data.Sampler):
    """Sampler of ``(index, sample_seed)`` pairs for one epoch at a time (see the module docstring).

    Args:
      num_samples: the size of the training split (used when ``base`` is None: one random permutation per epoch).
      seed: the run's seed.
      base: a sampler with ``set_epoch(epoch)`` and ``epoch_indices()`` (the repeat-factor sampler) whose list is
        used instead of a permutation.
      rank, world_size: this process's share under torch.distributed.
    """

    def __init__(self, num_samples: int, seed: int, base=None, rank: int = 0, world_size: int = 1):
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size}).")
        self.num_samples, self.seed, self.base = int(num_samples), int(seed), base
        self.rank, self.world_size = int(rank), int(world_size)
        self.epoch = 0
        self.start = 0  # positions of this rank's share already consumed (set by start_at, cleared by set_epoch)
        self._order: np.ndarray | None = None

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch and starts it from its first position."""
        self.epoch, self.start, self._order = int(epoch), 0, None
        if self.base is not None:
            self.base.set_epoch(self.epoch)

    def start_at(self, position: int) -> None:
        """Skips the first ``position`` samples of this rank's share of the current epoch (a resumed epoch)."""
        if not 0 <= position <= len(self.epoch_order()):
            raise ValueError(f"position {position} is outside the epoch's {len(self.epoch_order())} samples.")
        self.start = int(position)

    def full_order(self) -> np.ndarray:
        """The whole epoch's index list, the same on every rank."""
        if self.base is not None:
            return np.asarray(self.base.epoch_indices(), dtype=np.int64)
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.num_samples, generator=generator).numpy()

    def epoch_order(self) -> np.ndarray:
        """This rank's positions' indices for the current epoch (what a checkpoint records as the epoch's order)."""
        if self._order is None:
            order = self.full_order()
            usable = len(order) - len(order) % self.world_size
            self._order = order[:usable][self.rank::self.world_size]
        return self._order

    def sample_seed(self, position: int) -> int:
        """The augmentation seed of the epoch's global ``position`` (independent of rank and world size)."""
        return int(np.random.SeedSequence([self.seed, self.epoch, position]).generate_state(1)[0])

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = self.epoch_order()
        for local in range(self.start, len(order)):
            yield int(order[local]), self.sample_seed(local * self.world_size + self.rank)

    def __len__(self) -> int:
        return len(self.epoch_order()) - self.start


class SeededSamples(torch.utils.data.Dataset):
    """A dataset indexed by ``(index, sample_seed)``: reseeds ``dataset``'s augmentation pipeline
    (``dataset.reseed``), then returns ``dataset[index]``. A plain integer key loads without reseeding."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        if isinstance(key, tuple):
            index, seed = key
            self.dataset.reseed(seed)
            return self.dataset[index]
        return self.dataset[key]

    def __getattr__(self, name):  # source, transform, class_names, ... of the wrapped dataset
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)
