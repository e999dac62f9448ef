"""Repeat-factor sampler: factors against hand computation, reproducibility per (seed, epoch), exact lengths,
oversampling in expectation, and the Hydra config."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from omegaconf import OmegaConf

from train_seg.data.sampler import RepeatFactorSampler, compute_repeat_factors

CONFIG = Path(__file__).resolve().parents[2] / "src" / "train_seg" / "configs" / "sampler" / "repeat_factor.yaml"

# 10 images, 3 classes. Image fractions f = [9/10, 2/10, 1/10]; image 9 has no labelled class.
PRESENCE = np.zeros((10, 3), dtype=bool)
PRESENCE[:9, 0] = True
PRESENCE[[1, 2], 1] = True
PRESENCE[2, 2] = True

# threshold t = 0.5: r_c = max(1, sqrt(t / f_c)) = [1, sqrt(2.5), sqrt(5)]; r_i = max over classes in image i
EXPECTED = [1.0, math.sqrt(0.5 / 0.2), math.sqrt(0.5 / 0.1)] + [1.0] * 7


def test_repeat_factors_by_hand():
    assert compute_repeat_factors(PRESENCE, 0.5).tolist() == pytest.approx(EXPECTED)
    sampler = RepeatFactorSampler(PRESENCE, threshold=0.5)
    assert sampler.repeat_factors.tolist() == pytest.approx(EXPECTED)
    assert sampler.expected_length == pytest.approx(sum(EXPECTED))


def test_common_class_never_lowers_a_factor():
    # class 0 (in 90% of images) has sqrt(0.5 / 0.9) < 1 -> clamped to 1, and max over classes keeps rare factors
    assert compute_repeat_factors(PRESENCE[:, :1], 0.5).tolist() == [1.0] * 10


def test_ignore_classes():
    factors = compute_repeat_factors(PRESENCE, 0.5, ignore_classes=[2])
    assert factors.tolist() == pytest.approx([1.0, math.sqrt(2.5), math.sqrt(2.5)] + [1.0] * 7)
    with pytest.raises(ValueError, match="ignore_classes"):
        compute_repeat_factors(PRESENCE, 0.5, ignore_classes=[3])


def test_threshold_zero_is_plain_shuffle():
    sampler = RepeatFactorSampler(PRESENCE, threshold=0.0, seed=1)
    assert len(sampler) == 10 and sorted(sampler) == list(range(10))


def test_counts_are_stochastic_roundings():
    sampler = RepeatFactorSampler(PRESENCE, threshold=0.5, seed=0)
    for epoch in range(20):
        sampler.set_epoch(epoch)
        counts = np.bincount(list(sampler), minlength=10)
        assert counts[1] in (1, 2) and counts[2] in (2, 3)
        assert (counts[[0, *range(3, 10)]] == 1).all()


def test_same_seed_and_epoch_same_order():
    a = RepeatFactorSampler(PRESENCE, threshold=0.5, seed=7)
    b = RepeatFactorSampler(PRESENCE, threshold=0.5, seed=7)
    a.set_epoch(3)
    b.set_epoch(3)
    first = list(a)
    assert list(a) == first  # iterating twice
    assert list(b) == first  # a fresh sampler (resume)
    a.set_epoch(4)
    a.set_epoch(3)
    assert list(a) == first


def test_epochs_and_seeds_differ():
    sampler = RepeatFactorSampler(PRESENCE, threshold=0.5, seed=7)
    orders = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        orders.append(list(sampler))
    assert orders[0] != orders[1] != orders[2]
    other = RepeatFactorSampler(PRESENCE, threshold=0.5, seed=8)
    assert list(other) != orders[0]


def test_len_matches_iteration_every_epoch():
    sampler = RepeatFactorSampler(PRESENCE, threshold=0.5, seed=3)
    lengths = set()
    for epoch in range(30):
        sampler.set_epoch(epoch)
        length = len(sampler)
        assert length == len(list(sampler))
        lengths.add(length)
    assert lengths <= {11, 12, 13, 14} and len(lengths) > 1


def test_rare_images_appear_more_often_in_expectation():
    sampler = RepeatFactorSampler(PRESENCE, threshold=0.5, seed=0)
    epochs = 2000
    totals = np.zeros(10)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        totals += np.bincount(sampler.epoch_indices(), minlength=10)
    mean = totals / epochs
    assert mean[2] > mean[1] > mean[0] == 1.0
    # stochastic rounding is unbiased: E[count_i] = r_i (std of a mean over 2000 epochs < 0.012)
    assert mean.tolist() == pytest.approx(EXPECTED, abs=0.05)


def test_no_shuffle_keeps_index_order():
    sampler = RepeatFactorSampler(PRESENCE, threshold=0.5, shuffle=False)
    indices = list(sampler)
    assert indices == sorted(indices) and set(indices) == set(range(10))


def test_data_loader_length_is_exact():
    sampler = RepeatFactorSampler(PRESENCE, threshold=0.5, seed=2)
    dataset = torch.utils.data.TensorDataset(torch.arange(10))
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, sampler=sampler)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(loader)
        assert len(loader) == len(batches) == math.ceil(len(sampler) / 4)
        assert torch.cat([b[0] for b in batches]).tolist() == list(sampler)


def test_empty_split():
    sampler = RepeatFactorSampler(np.zeros((0, 3), bool))
    assert len(sampler) == 0 and list(sampler) == []


@pytest.mark.parametrize("kwargs", [{"threshold": -0.1}, {"threshold": float("nan")}, {"seed": -1}])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        RepeatFactorSampler(PRESENCE, **kwargs)


def test_config_instantiates_like_the_builder():
    cfg = OmegaConf.load(CONFIG)
    sampler = instantiate(cfg, presence=PRESENCE, seed=42)
    assert isinstance(sampler, RepeatFactorSampler)
    assert sampler.threshold == 0.1 and sampler.seed == 42
    # t = 0.1: only class 2 (f = 0.1) is at the threshold -> r = 1 everywhere; class 1 (f = 0.2) is above it
    assert sampler.repeat_factors.tolist() == [1.0] * 10


@settings(max_examples=50, deadline=None)
@given(
    presence=arrays(bool, st.tuples(st.integers(1, 30), st.integers(1, 5))),
    threshold=st.floats(0, 1),
    epoch=st.integers(0, 1000),
)
def test_each_image_appears_floor_or_ceil_of_its_factor(presence, threshold, epoch):
    sampler = RepeatFactorSampler(presence, threshold=threshold, seed=0)
    sampler.set_epoch(epoch)
    factors = sampler.repeat_factors
    assert (factors >= 1).all()
    counts = np.bincount(list(sampler), minlength=len(factors))
    assert ((counts == np.floor(factors)) | (counts == np.ceil(factors))).all()
    assert len(sampler) == counts.sum()
