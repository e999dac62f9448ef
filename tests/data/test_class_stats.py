"""Class statistics on a tiny in-memory split: hand counts (ignore pixels excluded), presence, bad mask values,
and the on-disk cache (hit, invalidation, corruption)."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from train_seg.data.base import DatasetError, SegmentationSource
from train_seg.data.class_stats import ClassStats, cache_path, compute_class_stats


class InMemorySource(SegmentationSource):
    """Masks held as numpy arrays; counts ``load_mask`` calls so tests can see cache hits."""

    def __init__(self, masks, class_names=("background", "car", "person"), ignore_index=255, identity="v1"):
        self.masks = [np.asarray(m) for m in masks]
        self.class_names = list(class_names)
        self.palette = [(i, i, i) for i in range(len(class_names))]
        self.ignore_index = ignore_index
        self._identity = identity
        self.load_calls = 0

    def __len__(self):
        return len(self.masks)

    def load_image(self, index):
        return np.zeros((*self.masks[index].shape, 3), dtype=np.uint8)

    def load_mask(self, index):
        self.load_calls += 1
        return self.masks[index]

    def identity(self):
        return self._identity

    def describe(self, index):
        return f"/data/masks/{index:03d}.png"


# Hand counts:            class 0  class 1  class 2  ignored  valid pixels
MASKS = [
    [[0, 0, 1], [255, 1, 1]],  # 2        3        -        1        5
    [[2, 2], [0, 255]],        # 1        -        2        1        3
    [[255, 255], [255, 255]],  # -        -        -        4        0
    [[0, 0, 0, 0]],            # 4        -        -        -        4
]


@pytest.fixture
def source() -> InMemorySource:
    return InMemorySource([np.asarray(m, dtype=np.uint8) for m in MASKS])


def test_counts_by_hand(source):
    stats = compute_class_stats(source, progress=False)
    assert stats.pixel_counts.tolist() == [7, 3, 2]
    assert stats.pixel_counts.dtype == np.int64 and stats.image_counts.dtype == np.int64
    assert stats.image_counts.tolist() == [3, 1, 1]
    assert stats.ignored_pixels == 6
    assert stats.total_pixels == 12
    assert stats.num_classes == 3 and stats.num_images == 4
    assert stats.pixel_share.tolist() == pytest.approx([7 / 12, 3 / 12, 2 / 12])
    assert stats.image_pixels.tolist() == [5, 3, 0, 4]
    assert stats.pixels_of_images_containing.tolist() == [12, 5, 3]


def test_presence_matrix(source):
    stats = compute_class_stats(source, progress=False)
    assert stats.presence.dtype == bool
    assert stats.presence.tolist() == [
        [True, True, False],
        [True, False, True],
        [False, False, False],
        [True, False, False],
    ]


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int32, np.int64, np.uint16])
def test_mask_dtypes(dtype):
    stats = compute_class_stats(InMemorySource([np.asarray(m, dtype=dtype) for m in MASKS]), progress=False)
    assert stats.pixel_counts.tolist() == [7, 3, 2]


def test_other_ignore_index():
    masks = [np.array([[0, -1], [2, 2]], dtype=np.int32), np.array([[-1, -1]], dtype=np.int32)]
    stats = compute_class_stats(InMemorySource(masks, ignore_index=-1), progress=False)
    assert stats.pixel_counts.tolist() == [1, 0, 2]
    assert stats.ignored_pixels == 3
    assert stats.pixel_share.tolist() == pytest.approx([1 / 3, 0, 2 / 3])


def test_empty_split_and_all_ignored():
    empty = compute_class_stats(InMemorySource([]), progress=False)
    assert empty.presence.shape == (0, 3) and empty.total_pixels == 0
    assert empty.pixel_share.tolist() == [0.0, 0.0, 0.0]
    ignored = compute_class_stats(InMemorySource([np.full((2, 2), 255, np.uint8)]), progress=False)
    assert ignored.pixel_share.tolist() == [0.0, 0.0, 0.0] and ignored.ignored_pixels == 4


def test_bad_values_name_file_values_and_fix():
    masks = [np.zeros((2, 2), np.int32), np.array([[0, 7, 3], [-1, 255, 7]], dtype=np.int32)]
    with pytest.raises(DatasetError) as info:
        compute_class_stats(InMemorySource(masks), progress=False)
    message = str(info.value)
    assert "/data/masks/001.png" in message
    assert "[-1, 3, 7]" in message
    assert "0..2" in message and "ignore_index=255" in message
    assert "dataset.ignore_index" in message


def test_many_bad_values_are_truncated():
    mask = np.arange(0, 40, dtype=np.uint8).reshape(4, 10)
    with pytest.raises(DatasetError, match=r"\[3, 4, 5, 6, 7, 8, 9, 10, 11, 12\] \(and 27 more\)"):
        compute_class_stats(InMemorySource([mask]), progress=False)


def test_float_mask_is_rejected():
    with pytest.raises(DatasetError, match="000.png.*dtype float32"):
        compute_class_stats(InMemorySource([np.zeros((2, 2), np.float32)]), progress=False)


def test_dict_round_trip_is_json(source):
    stats = compute_class_stats(source, progress=False)
    data = json.loads(json.dumps(stats.to_dict()))
    back = ClassStats.from_dict(data)
    for field in ("pixel_counts", "image_counts", "presence", "image_pixels"):
        assert np.array_equal(getattr(back, field), getattr(stats, field)), field
    assert back.ignored_pixels == stats.ignored_pixels
    assert data["present_classes"] == [[0, 1], [0, 2], [], [0]]
    summary = stats.to_dict(include_presence=False)
    assert "present_classes" not in summary and summary["pixel_counts"] == [7, 3, 2]


def test_inconsistent_shapes_rejected():
    with pytest.raises(ValueError, match="inconsistent shapes"):
        ClassStats(np.zeros(3), np.zeros(2), np.zeros((1, 3), bool), 0)


# ---------------------------------------------------------------------------------------------------- cache


def test_cache_hit_does_not_read_masks(source, tmp_path, caplog):
    cache_dir = tmp_path / "nested" / "cache"  # created if missing
    first = compute_class_stats(source, cache_dir=cache_dir, progress=False)
    assert source.load_calls == 4
    assert cache_path(source, cache_dir).is_file()
    assert [p.name for p in cache_dir.iterdir()] == [cache_path(source, cache_dir).name]  # no temp file left
    with caplog.at_level(logging.INFO, logger="train_seg.data.class_stats"):
        second = compute_class_stats(source, cache_dir=cache_dir, progress=False)
    assert source.load_calls == 4
    assert "cache hit" in caplog.text
    assert second.to_dict() == first.to_dict()


def test_cache_invalidated_when_identity_changes(source, tmp_path):
    compute_class_stats(source, cache_dir=tmp_path, progress=False)
    changed = InMemorySource([np.zeros((3, 3), np.uint8)], identity="v2")
    stats = compute_class_stats(changed, cache_dir=tmp_path, progress=False)
    assert changed.load_calls == 1
    assert stats.pixel_counts.tolist() == [9, 0, 0]
    assert len(list(tmp_path.iterdir())) == 2


def test_cache_key_covers_label_space(source, tmp_path):
    other_ignore = InMemorySource(source.masks, ignore_index=0)
    other_names = InMemorySource(source.masks, class_names=("background", "person", "car"))
    paths = {cache_path(s, tmp_path) for s in (source, other_ignore, other_names)}
    assert len(paths) == 3


@pytest.mark.parametrize("garbage", ["{not json", "", '{"pixel_counts": [1, 2, 3]}', "[1, 2]"])
def test_corrupt_cache_is_recomputed(source, tmp_path, caplog, garbage):
    path = cache_path(source, tmp_path)
    path.write_text(garbage)
    with caplog.at_level(logging.WARNING, logger="train_seg.data.class_stats"):
        stats = compute_class_stats(source, cache_dir=tmp_path, progress=False)
    assert source.load_calls == 4
    assert stats.pixel_counts.tolist() == [7, 3, 2]
    assert "ignoring unreadable cache" in caplog.text
    # rewritten: the next call is a hit
    compute_class_stats(source, cache_dir=tmp_path, progress=False)
    assert source.load_calls == 4


def test_cache_with_wrong_number_of_images_is_recomputed(source, tmp_path):
    # a dataset whose identity() failed to change: the cached presence does not fit the split, recompute
    stale = InMemorySource(source.masks[:2])
    compute_class_stats(stale, cache_dir=tmp_path, progress=False)
    stats = compute_class_stats(source, cache_dir=tmp_path, progress=False)
    assert source.load_calls == 4 and stats.num_images == 4


def test_unwritable_cache_is_a_warning(source, tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with caplog.at_level(logging.WARNING, logger="train_seg.data.class_stats"):
        stats = compute_class_stats(source, cache_dir=blocker / "cache", progress=False)
    assert stats.pixel_counts.tolist() == [7, 3, 2]
    assert "could not write cache" in caplog.text
