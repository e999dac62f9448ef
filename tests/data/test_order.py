"""The epoch order: which sample, with which augmentation seed, at each position of an epoch, on one process or
sharded over ranks (data/order.py)."""
from __future__ import annotations

import numpy as np
import pytest

from train_seg.data.order import EpochOrder, SeededSamples
from train_seg.data.sampler import RepeatFactorSampler


def test_epoch_order_is_a_function_of_seed_and_epoch_and_resumes_at_any_position():
    order = EpochOrder(10, seed=3)
    order.set_epoch(2)
    whole = list(order)
    again = EpochOrder(10, seed=3)
    again.set_epoch(2)
    again.start_at(4)
    assert list(again) == whole[4:] and len(again) == 6
    assert sorted(i for i, _ in whole) == list(range(10))
    order.set_epoch(3)
    assert [i for i, _ in order] != [i for i, _ in whole]  # a new order each epoch
    assert len({seed for _, seed in whole}) == 10  # every position its own augmentation seed
    with pytest.raises(ValueError, match="outside the epoch"):
        again.start_at(11)


def test_epoch_order_shards_disjoint_rank_shares_with_the_same_seeds():
    presence = np.zeros((9, 3), dtype=bool)
    presence[:, 0] = True
    presence[:2, 2] = True  # a rare class in two images: those repeat
    single = EpochOrder(9, seed=1, base=RepeatFactorSampler(presence, threshold=0.5, seed=1))
    single.set_epoch(1)
    whole = list(single)
    ranks = [EpochOrder(9, seed=1, base=RepeatFactorSampler(presence, threshold=0.5, seed=1), rank=r, world_size=2)
             for r in range(2)]
    shares = []
    for rank in ranks:
        rank.set_epoch(1)
        shares.append(list(rank))
    usable = len(whole) - len(whole) % 2
    assert len(whole) > 9  # oversampled
    assert sorted(shares[0] + shares[1]) == sorted(whole[:usable])  # same (index, seed) pairs, split in two
    assert len(shares[0]) == len(shares[1]) == usable // 2 and not set(shares[0]) & set(shares[1])


def test_seeded_samples_augment_by_position_not_by_process_history():
    class Recorder:
        def __init__(self):
            self.seed = None

        def __len__(self):
            return 3

        def reseed(self, seed):
            self.seed = seed

        def __getitem__(self, index):
            return index, self.seed

    data = SeededSamples(Recorder())
    assert data[(2, 77)] == (2, 77) and data[(1, 5)] == (1, 5)
    assert data[0] == (0, 5)  # a plain index loads without reseeding (evaluation, overlays)
