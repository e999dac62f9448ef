import numpy as np
import pytest

from train_seg.data.base import DatasetError, SegmentationDataset
from train_seg.data.synthetic import CLASS_NAMES, SyntheticShapes


@pytest.fixture(scope="module")
def train_split():
    return SyntheticShapes("train")


def _counts(split):
    k = len(CLASS_NAMES)
    pixels = np.zeros(k, np.int64)
    empty = 0
    for i in range(len(split)):
        c = np.bincount(split.load_mask(i).ravel(), minlength=k)
        pixels += c
        empty += c[1:].sum() == 0
    return pixels, empty


def test_default_split_meets_the_imbalance_contract(train_split):
    pixels, empty = _counts(train_split)
    share = pixels / pixels.sum()
    assert len(CLASS_NAMES) >= 4
    assert share[0] >= 0.70  # background dominates
    assert share[1] > 0.05  # one large class
    assert 0.01 < share[2] < 0.10  # a medium (band) class
    assert 0 < share[3] < 0.01  # the rare class: under 1% of the pixels (rare by frequency, see the docstring)
    car_images = sum(int((train_split.load_mask(i) == 3).any()) for i in range(len(train_split)))
    assert car_images / len(train_split) <= 0.25  # in at most a quarter of the images
    assert empty / len(train_split) >= 0.10  # images without any foreground


def test_deterministic_and_split_dependent():
    a, b = SyntheticShapes("train", num_train=5), SyntheticShapes("train", num_train=5)
    for i in range(5):
        assert np.array_equal(a.load_image(i), b.load_image(i))
        assert np.array_equal(a.load_mask(i), b.load_mask(i))
    val = SyntheticShapes("val", num_val=5)
    assert not np.array_equal(a.load_image(1), val.load_image(1))
    other_seed = SyntheticShapes("train", num_train=5, seed=1)
    assert not np.array_equal(a.load_image(1), other_seed.load_image(1))
    assert a.identity() != other_seed.identity() != val.identity()


def test_colour_alone_does_not_identify_the_rare_class(train_split):
    """Per-pixel colours of 'car' overlap those of other classes: a model must use texture and shape."""
    car, other = [], []
    for i in range(len(train_split)):
        image, mask = train_split.load_image(i).reshape(-1, 3), train_split.load_mask(i).ravel()
        car.append(image[mask == 3])
        other.append(image[(mask != 3)][::50])
    car, other = np.concatenate(car), np.concatenate(other)
    lo, hi = np.percentile(car, 10, axis=0), np.percentile(car, 90, axis=0)
    inside = np.all((other >= lo) & (other <= hi), axis=1).mean()
    assert inside > 0.01  # a colour box holding 80% of car pixels per channel also holds other pixels


def test_shapes_and_dataset_wrapper():
    split = SyntheticShapes("val", num_val=3, image_size=64)
    image, mask = split.load_image(0), split.load_mask(0)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8 and mask.shape == (64, 64)
    x, y = SegmentationDataset(split)[0]
    assert x.shape == (3, 64, 64) and x.dtype.is_floating_point and 0 <= x.min() and x.max() <= 1
    assert y.dtype.__str__() == "torch.int64" and set(y.unique().tolist()) <= {0, 1, 2, 3}


def test_ignore_border_marks_boundaries():
    plain = SyntheticShapes("train", num_train=20, image_size=64)
    bordered = SyntheticShapes("train", num_train=20, image_size=64, ignore_border=1)
    found = False
    for i in range(20):
        m0, m1 = plain.load_mask(i), bordered.load_mask(i)
        changed = m0.astype(np.int64) != m1
        assert np.all(m1[changed] == 255)
        found |= changed.any()
    assert found


@pytest.mark.parametrize("kwargs, key", [({"num_train": 0}, "num_train"), ({"empty_fraction": 2}, "empty_fraction"),
                                         ({"ignore_index": 2}, "ignore_index"), ({"image_size": 8}, "image_size")])
def test_bad_arguments_name_the_key(kwargs, key):
    with pytest.raises(DatasetError, match=key):
        SyntheticShapes("train", **kwargs)


def test_binary_variant_keeps_only_the_rare_class_as_foreground():
    full, binary = SyntheticShapes("train", num_train=30), SyntheticShapes("train", num_train=30, binary=True)
    assert binary.class_names == ["background", "car"] and len(binary.palette) == 2
    assert binary.identity() != full.identity()
    for i in range(30):
        assert np.array_equal(binary.load_mask(i), (full.load_mask(i) == 3).astype(np.uint8))
        assert np.array_equal(binary.load_image(i), full.load_image(i))


def test_car_size_and_probability_options():
    big = SyntheticShapes("train", num_train=40, car_size=(30, 30), car_probability=1.0)
    sides = []
    for i in range(len(big)):
        mask = big.load_mask(i) == 3
        if mask.any():
            rows = np.flatnonzero(mask.any(axis=1))
            sides.append(rows[-1] - rows[0] + 1)
    assert sides and max(sides) >= 30 and min(sides) >= 29  # one car is 30 px (two may overlap: larger)
    none = SyntheticShapes("train", num_train=40, car_probability=0.0)
    assert not any((none.load_mask(i) == 3).any() for i in range(len(none)))
    assert big.identity() != none.identity()
    with pytest.raises(DatasetError, match="dataset.car_size"):
        SyntheticShapes("train", car_size=(12, 8))
    with pytest.raises(DatasetError, match="dataset.car_probability"):
        SyntheticShapes("train", car_probability=1.5)


def test_the_calib_split_is_a_third_split_of_its_own():
    calib, train, val = (SyntheticShapes(s, num_train=4, num_val=4, num_calib=3, image_size=64)
                         for s in ("calib", "train", "val"))
    assert len(calib) == 3 and calib.identity() != train.identity() and "calib" in calib.identity()
    for other in (train, val):
        assert not any(np.array_equal(calib.load_image(i), other.load_image(j)) for i in range(3) for j in range(3))
    assert np.array_equal(calib.load_mask(1), SyntheticShapes("calib", num_calib=3, image_size=64).load_mask(1))
