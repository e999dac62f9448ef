"""Object-level metrics (train_seg.evaluation.objects) on hand-drawn masks and against scipy.ndimage.label with a
brute-force matching written independently."""
import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from train_seg.evaluation.objects import ObjectCounts, components, match_objects, object_metrics

IGNORE = 255


def canvas(h=20, w=20):
    return np.zeros((h, w), dtype=bool)


def box(mask, top, left, height, width):
    mask[top:top + height, left:left + width] = True
    return mask


def counts(pred, target, valid=None, min_pixels=1):
    valid = np.ones_like(target) if valid is None else valid
    return match_objects(pred, target, valid, min_pixels).tolist()


def test_a_perfect_object_and_empty_images():
    gt = box(canvas(), 2, 2, 5, 5)
    assert counts(gt.copy(), gt) == [1, 1, 1, 1.0]
    assert counts(canvas(), canvas()) == [0, 0, 0, 0.0]      # nothing anywhere
    assert counts(gt, canvas()) == [0, 1, 0, 0.0]            # a false alarm on an image without the class
    assert counts(canvas(), gt) == [1, 0, 0, 0.0]            # a miss


def test_a_split_prediction_matches_only_above_half():
    gt = box(canvas(), 0, 0, 10, 10)                          # 100 px
    halves = box(box(canvas(), 0, 0, 10, 5), 0, 6, 10, 4)    # 50 px + 40 px, column 5 left empty: two objects
    assert counts(halves, gt) == [1, 2, 0, 0.0]               # IoU 0.5 is not > 0.5
    big = box(box(canvas(), 0, 0, 10, 6), 0, 7, 10, 3)       # 60 px (IoU 0.6) + 30 px
    assert counts(big, gt) == [1, 2, 1, pytest.approx(0.6)]


def test_merged_and_diagonally_touching_objects():
    two = box(box(canvas(), 0, 0, 4, 4), 0, 8, 4, 4)         # two ground-truth objects of 16 px
    bridge = box(canvas(), 0, 0, 4, 12)                       # one prediction over both and the gap: 48 px
    assert counts(bridge, two) == [2, 1, 0, 0.0]              # IoU 16/48 each: neither is found
    corner = box(box(canvas(), 0, 0, 3, 3), 3, 3, 3, 3)      # squares touching at one corner
    assert components(corner, 1)[1] == 1                      # one object with 8-connectivity
    assert ndimage.label(corner)[1] == 2                      # (two with scipy's default 4-connectivity)


def test_ignored_pixels_leave_the_prediction_and_excuse_a_mostly_ignored_false_alarm():
    gt = box(canvas(), 0, 0, 4, 4)                            # 16 px
    valid = ~box(canvas(), 0, 4, 4, 12)                       # columns 4..15 ignored
    spill = box(canvas(), 0, 0, 4, 8)                         # the object and 16 px on ignored ground
    assert counts(spill, gt, valid) == [1, 1, 1, 1.0]         # IoU on valid pixels only: 16 / 16
    alarm = box(canvas(), 10, 4, 2, 6)                        # 12 px, all on valid ground: a false alarm
    assert counts(alarm, gt, valid) == [1, 1, 0, 0.0]
    valid[10:12, 6:] = False                                  # now 8 of its 12 px are ignored
    assert counts(alarm, gt, valid) == [1, 0, 0, 0.0]


def test_components_below_min_pixels_are_dropped_on_both_sides():
    gt = box(box(canvas(), 0, 0, 5, 5), 10, 10, 2, 2)        # 25 px and 4 px
    pred = box(box(canvas(), 0, 0, 5, 5), 15, 15, 3, 1)      # the object, and a 3 px speck
    assert counts(pred, gt, min_pixels=5) == [1, 1, 1, 1.0]
    assert counts(pred, gt, min_pixels=1) == [2, 2, 1, 1.0]


def reference(pred, target, valid, min_pixels):
    """scipy labels (8-connectivity) and an explicit loop over every pair."""
    eight = np.ones((3, 3), dtype=int)
    gt_labels, n_gt = ndimage.label(target, structure=eight)
    pred_labels, n_pred = ndimage.label(pred, structure=eight)
    gts = [gt_labels == i for i in range(1, n_gt + 1) if (gt_labels == i).sum() >= min_pixels]
    preds = [pred_labels == j for j in range(1, n_pred + 1) if (pred_labels == j).sum() >= min_pixels]
    matched, iou_sum, hit = 0, 0.0, set()
    for g in gts:
        for j, p in enumerate(preds):
            p_valid = p & valid
            inter = (g & p_valid).sum()
            union = g.sum() + p_valid.sum() - inter
            if union and inter / union > 0.5:
                matched += 1
                iou_sum += inter / union
                hit.add(j)
    counted = sum(1 for j, p in enumerate(preds) if j in hit or (p & valid).sum() * 2 >= p.sum())
    return [len(gts), counted, matched, iou_sum]


@pytest.mark.parametrize("seed", range(6))
def test_matches_an_independent_computation_on_random_masks(seed):
    rng = np.random.default_rng(seed)
    target = ndimage.binary_dilation(rng.random((40, 48)) < 0.02, iterations=2)
    # a prediction near the truth: shifted, with blobs added and removed
    pred = np.roll(target, rng.integers(-1, 2), axis=1) ^ ndimage.binary_dilation(rng.random((40, 48)) < 0.01)
    valid = ~ndimage.binary_dilation(rng.random((40, 48)) < 0.005, iterations=2)
    for min_pixels in (1, 6):
        got = match_objects(pred, target, valid, min_pixels)
        expected = reference(pred, target, valid, min_pixels)
        assert got[:3].tolist() == expected[:3] and got[3] == pytest.approx(expected[3])
        assert expected[0] >= 3  # the draw holds several objects


def test_object_counts_add_up_over_images_and_give_the_metrics():
    gt = np.full((2, 20, 20), 0)
    gt[0][box(canvas(), 0, 0, 5, 5)] = 2
    gt[1][box(canvas(), 10, 10, 4, 4)] = 2
    gt[1][box(canvas(), 0, 0, 4, 4)] = 1
    gt[1, 19, :] = IGNORE
    pred = gt.copy()
    pred[pred == IGNORE] = 0
    pred[1][box(canvas(), 10, 10, 4, 4)] = 0                 # image 1's class-2 object missed
    pred[0][box(canvas(), 12, 12, 3, 3)] = 2                 # a false alarm in image 0
    objects = ObjectCounts(3, classes=[2], min_pixels=4, ignore_index=IGNORE)
    objects.update(torch.from_numpy(pred[:1]), torch.from_numpy(gt[:1]))
    objects.update(torch.from_numpy(pred[1:]), torch.from_numpy(gt[1:]))
    assert objects.counts[2].tolist() == [2, 2, 1, 1.0] and objects.counts[:2].abs().sum() == 0
    metrics = object_metrics(objects.counts, [2])
    assert metrics["objects"][2] == 2 and metrics["recall"][2] == 0.5 and metrics["precision"][2] == 0.5
    assert metrics["f1"][2] == 0.5 and metrics["matched_iou"][2] == 1.0
    assert all(math.isnan(metrics[key][c]) for key in metrics for c in (0, 1))  # not computed: NaN, not 0
    empty = object_metrics(torch.zeros(3, 4), [0])
    assert empty["objects"][0] == 0 and math.isnan(empty["recall"][0]) and math.isnan(empty["precision"][0])
    with pytest.raises(ValueError, match="min_pixels must be >= 1"):
        ObjectCounts(3, [2], 0, IGNORE)
    with pytest.raises(ValueError, match=r"classes in \[0, 3\)"):
        ObjectCounts(3, [3], 4, IGNORE)
