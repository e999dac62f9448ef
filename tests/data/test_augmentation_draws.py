"""What the training pipelines actually draw: every transform of a real config's pipeline decides independently of
the others (flip combinations at their expected rates, a flip independent of the scale factor), whether the
pipeline is reseeded per sample (the trainer's path: ``EpochOrder`` seeds, ``SeededSamples``) or called again and
again without reseeding.

The images are ramps (red rises along x, green along y) in place of each fixture's pictures, so the output tensor
shows what was drawn: the sign of the red slope is the horizontal flip, of the green slope the vertical one, and the
red slope's size falls as the random scale factor grows."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from _dataset_fixtures import FOLDER_CLASSES, write_ade20k, write_cityscapes, write_folder, write_voc
from train_seg.data.base import SegmentationDataset
from train_seg.data.order import EpochOrder, SeededSamples
from train_seg.engine.builder import build_source, build_transform

SAMPLES = 400
SIGMAS = 4.5  # a count is accepted within 4.5 binomial standard deviations of its expectation (p ~ 7e-6 per check)


class RampSource:
    """A real dataset split whose images are replaced by same-sized ramps; masks, classes and sizes stay real."""

    def __init__(self, source):
        self.source = source

    def __getattr__(self, name):
        return getattr(self.source, name)

    def __len__(self):
        return len(self.source)

    def load_image(self, index: int) -> np.ndarray:
        h, w = self.source.load_image(index).shape[:2]
        ys, xs = np.mgrid[0:h, 0:w]
        red = np.rint(xs * 255.0 / max(w - 1, 1))
        green = np.rint(ys * 255.0 / max(h - 1, 1))
        return np.stack([red, green, np.full_like(red, 128)], axis=-1).astype(np.uint8)


def _slopes(image: torch.Tensor) -> tuple[float, float]:
    """Mean red step between horizontal neighbours and mean green step between vertical ones, over the picture's
    pixels (blue 128 there; the padding that PadIfNeeded adds after the scaling is 0 in every channel)."""
    red, green, blue = (image[c].numpy() for c in range(3))
    valid = blue > (float(blue.min()) + float(blue.max())) / 2 if blue.max() > blue.min() else np.ones_like(blue, bool)
    across = valid[:, 1:] & valid[:, :-1]
    down = valid[1:, :] & valid[:-1, :]
    dx = float((red[:, 1:] - red[:, :-1])[across].mean()) if across.any() else 0.0
    dy = float((green[1:, :] - green[:-1, :])[down].mean()) if down.any() else 0.0
    return dx, dy


def _draws(dataset: SegmentationDataset, seed: int = 0, reseed: bool = True) -> np.ndarray:
    """``(SAMPLES, 2)`` red and green slopes of the training samples of consecutive epochs, as the trainer loads
    them (reseeded per position) or with the pipeline called in sequence and never reseeded."""
    out, order, epoch = [], EpochOrder(len(dataset), seed=seed), 0
    samples = SeededSamples(dataset)
    while len(out) < SAMPLES:
        order.set_epoch(epoch)
        for index, sample_seed in order:
            image, _ = samples[(index, sample_seed)] if reseed else dataset[index]
            out.append(_slopes(image))
        epoch += 1
    return np.asarray(out[:SAMPLES])


def _within(count: int, n: int, p: float) -> bool:
    return abs(count - n * p) <= SIGMAS * (n * p * (1 - p)) ** 0.5


def _dataset(make_cfg, tmp_path, name: str) -> SegmentationDataset:
    data = tmp_path / "data"
    overrides = [f"dataset={name}"]
    if name == "voc":
        write_voc(data)
    elif name == "cityscapes":
        write_cityscapes(data)
        overrides.append("dataset.transforms.base_size=32")
    elif name == "ade20k":
        write_ade20k(data)
        overrides.append("dataset.transforms.base_size=32")
    elif name == "folder":
        write_folder(data, "subfolders", "index")
        overrides.append(f"dataset.classes=[{','.join(FOLDER_CLASSES)}]")
    if name != "synthetic":
        overrides += [f"dataset.root={data}", "dataset.transforms.crop_size=16"]
    cfg = make_cfg(*overrides, f"paths.cache_dir={tmp_path / 'cache'}", tiny=name == "synthetic")
    return SegmentationDataset(RampSource(build_source(cfg.dataset, "train")),
                               build_transform(cfg.dataset, "train", int(cfg.seed)))


@pytest.mark.parametrize("reseed", [True, False], ids=["reseeded-per-sample", "consecutive-calls"])
def test_the_two_flips_of_the_default_pipeline_are_independent(make_cfg, tmp_path, reseed):
    draws = _draws(_dataset(make_cfg, tmp_path, "synthetic"), reseed=reseed)
    horizontal, vertical = draws[:, 0] < 0, draws[:, 1] < 0
    assert np.all(draws != 0)  # every sample shows both slopes
    for h in (False, True):
        for v in (False, True):
            count = int(np.sum((horizontal == h) & (vertical == v)))
            assert _within(count, SAMPLES, 0.25), f"flip horizontal={h} vertical={v}: {count} of {SAMPLES}"


@pytest.mark.parametrize("name", ["voc", "cityscapes", "ade20k", "folder"])
def test_a_real_pipelines_flip_is_independent_of_its_scale(make_cfg, tmp_path, name):
    draws = _draws(_dataset(make_cfg, tmp_path, name))
    flipped = draws[:, 0] < 0
    slope = np.abs(draws[:, 0])
    assert np.all(slope > 0)
    # RandomScale draws s uniformly from [0.5, 2]; the red slope is proportional to 1 / s, so the samples above the
    # median slope are those scaled by less than the median factor (1.25)
    small = slope > np.median(slope)
    assert 3.0 < slope.max() / slope.min() < 5.0  # the 4x range of the scale factor is really drawn
    assert _within(int(flipped.sum()), SAMPLES, 0.5), f"{name}: {int(flipped.sum())} of {SAMPLES} flipped"
    for scaled_down in (False, True):
        group = small == scaled_down
        count, n = int(np.sum(flipped & group)), int(group.sum())
        assert _within(count, n, 0.5), f"{name}: {count} of the {n} samples with small={scaled_down} flipped"


def test_a_samples_draws_are_a_function_of_its_seed_alone(make_cfg, tmp_path):
    dataset = _dataset(make_cfg, tmp_path, "voc")
    samples = SeededSamples(dataset)
    first = samples[(0, 123)]
    samples[(1, 456)]  # anything in between
    again = samples[(0, 123)]
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(samples[(0, 124)][0], first[0]) or not torch.equal(samples[(0, 125)][0], first[0])
