import math

import pytest
import torch

from train_seg.evaluation.metrics import ConfusionMatrix, metrics_from_confusion, predictions

IGNORE = 255


def _confusion(pred, target, k):
    cm = ConfusionMatrix(k)
    cm.update(torch.tensor(pred), torch.tensor(target))
    return cm


def test_confusion_counts_rows_target_columns_prediction_and_drops_ignored():
    target = [[0, 0, 1, 1], [2, IGNORE, 0, 1]]
    pred = [[0, 1, 1, 1], [0, 2, 0, 2]]
    cm = _confusion(pred, target, 3)
    expected = torch.tensor([[2, 1, 0], [0, 2, 1], [1, 0, 0]])  # counted by hand; the ignored pixel is dropped
    assert torch.equal(cm.matrix, expected)


def test_hand_computed_metrics_with_absent_class_and_ignored_pixels():
    # class 3 is neither present nor predicted -> absent (NaN) and excluded from mIoU
    target = [0, 0, 0, 0, 1, 1, 2, IGNORE, IGNORE]
    pred = [0, 0, 0, 1, 1, 2, 2, 3, 1]
    m = _confusion(pred, target, 4).compute()
    # class 0: TP 3, FP 0, FN 1 -> IoU 3/4; class 1: TP 1, FP 1, FN 1 -> 1/3; class 2: TP 1, FP 1, FN 0 -> 1/2
    assert m["iou"][:3].tolist() == pytest.approx([3 / 4, 1 / 3, 1 / 2])
    assert math.isnan(m["iou"][3])
    assert m["mIoU"] == pytest.approx((3 / 4 + 1 / 3 + 1 / 2) / 3)
    assert m["precision"][:3].tolist() == pytest.approx([1.0, 1 / 2, 1 / 2])
    assert m["recall"][:3].tolist() == pytest.approx([3 / 4, 1 / 2, 1.0])
    assert m["dice"][:3].tolist() == pytest.approx([6 / 7, 1 / 2, 2 / 3])
    assert m["pixel_acc"] == pytest.approx(5 / 7)
    assert m["mean_acc"] == pytest.approx((3 / 4 + 1 / 2 + 1) / 3)
    assert m["fwIoU"] == pytest.approx(4 / 7 * 3 / 4 + 2 / 7 * 1 / 3 + 1 / 7 * 1 / 2)
    assert m["support"].tolist() == [4, 2, 1, 0]


def test_class_predicted_but_absent_from_target_has_iou_zero_not_nan():
    m = _confusion([0, 1], [0, 0], 2).compute()
    assert m["iou"].tolist() == pytest.approx([0.5, 0.0])
    assert math.isnan(m["recall"][1]) and m["precision"][1] == 0.0
    assert m["mIoU"] == pytest.approx(0.25)


def test_accumulates_over_batches_not_mean_of_batch_ious():
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([1, 1, 1, 1]), torch.tensor([1, 1, 1, 1]))  # batch IoU_1 = 1
    cm.update(torch.tensor([0, 0, 0, 0]), torch.tensor([1, 0, 0, 0]))  # batch IoU_1 = 0 (absent in pred)
    m = cm.compute()
    assert m["iou"][1].item() == pytest.approx(4 / 5)  # not (1 + 0) / 2


def test_rare_miou_over_rare_classes_only():
    m = _confusion([0, 1, 2, 2], [0, 1, 2, 1], 3).compute(rare=torch.tensor([False, True, True]))
    assert m["rare_mIoU"] == pytest.approx((1 / 2 + 1 / 2) / 2)


def test_random_against_independent_loop():
    g = torch.Generator().manual_seed(0)
    k = 5
    target = torch.randint(0, k, (3, 7, 9), generator=g)
    target[0, :2] = IGNORE
    pred = torch.randint(0, k, (3, 7, 9), generator=g)
    m = _confusion(pred.tolist(), target.tolist(), k).compute()
    for c in range(k):
        valid = target != IGNORE
        tp = ((pred == c) & (target == c) & valid).sum().item()
        fp = ((pred == c) & (target != c) & valid).sum().item()
        fn = ((pred != c) & (target == c) & valid).sum().item()
        assert m["iou"][c].item() == pytest.approx(tp / (tp + fp + fn))


def test_empty_matrix_gives_nan_summaries():
    m = metrics_from_confusion(torch.zeros(3, 3, dtype=torch.int64))
    assert math.isnan(m["mIoU"]) and math.isnan(m["pixel_acc"]) and all(math.isnan(v) for v in m["iou"].tolist())


def test_predictions_argmax_and_binary_threshold():
    logits = torch.tensor([[[[0.1]], [[2.0]], [[-1.0]]]])
    assert predictions(logits).tolist() == [[[1]]]
    binary = torch.tensor([[[[-0.3, 0.2]]]])
    assert predictions(binary).tolist() == [[[0, 1]]]


def test_predictions_match_argmax_on_ties_and_nan_in_bf16():
    """``predictions`` takes ``max(1).indices`` for speed; it must give argmax's first-maximum indices."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randint(0, 3, (2, 21, 16, 16), generator=g).to(torch.bfloat16)  # many ties in every pixel
    logits[0, 5, 0, 0] = float("nan")
    expected = logits.float().argmax(1)
    assert torch.equal(predictions(logits), expected)
    assert predictions(logits)[0, 0, 0].item() == 5


def test_labels_outside_the_class_range_count_nowhere():
    """Negative labels, ignore_index and any label >= K are dropped, whatever the prediction."""
    target = [[-1, 0, 3, IGNORE, 1, 7]]
    pred = [[2, 0, 1, 2, 2, 0]]
    cm = _confusion(pred, target, 3)
    expected = torch.zeros(3, 3, dtype=torch.int64)
    expected[0, 0] = 1
    expected[1, 2] = 1
    assert torch.equal(cm.matrix, expected) and cm.matrix.sum() == 2


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        ConfusionMatrix(2).update(torch.zeros(2, 2, dtype=torch.long), torch.zeros(4, dtype=torch.long))
