"""Object-level metrics: how many objects of a class were found, not how many pixels.

Per image and class, the connected components (8-connectivity, OpenCV) of the ground truth and of the prediction
are the objects; components of fewer than ``min_pixels`` pixels are dropped on both sides. A ground-truth object
is *found* when a predicted object overlaps it with IoU > 0.5; at that threshold a match is unique by
construction (as in panoptic quality, Kirillov et al. 2019). Pixels labelled ``ignore_index`` are removed from
predicted objects before their IoU is computed, and an unmatched predicted object more than half of whose pixels
are ignored is not counted (PQ's void rule). Counts add up over images (and processes); per class:
``objects`` (ground truth), ``found`` (matched), ``recall`` = found / objects, ``precision`` = matched / predicted objects,
``f1`` = 2 matched / (objects + predicted), ``matched_iou`` = mean IoU of the matched pairs; NaN where the
denominator is 0.
"""
from __future__ import annotations

import cv2
import numpy as np
import torch

from train_seg.distributed import all_reduce_sum_

# columns of ObjectCounts.counts
GT, PRED, MATCHED, IOU_SUM = range(4)
MATCH_IOU = 0.5
OBJECT_MODES = ("rare", "all", "none")
OBJECT_KEYS = ("objects", "found", "recall", "precision", "f1", "matched_iou")
DEFAULT_MIN_PIXELS = 16  # configs' metrics.min_object_pixels (train_seg.config.schema.MetricsConfig)


def components(mask: np.ndarray, min_pixels: int) -> tuple[np.ndarray, int]:
    """Labels ``1..n`` of the 8-connected components of the bool ``mask`` with at least ``min_pixels`` pixels
    (0 elsewhere, smaller components included) and ``n``."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8,
                                                                ltype=cv2.CV_32S)
    keep = np.zeros(count, dtype=np.int32)
    kept = np.flatnonzero(stats[1:, cv2.CC_STAT_AREA] >= min_pixels) + 1
    keep[kept] = np.arange(1, kept.size + 1, dtype=np.int32)
    return keep[labels], int(kept.size)


def match_objects(pred: np.ndarray, target: np.ndarray, valid: np.ndarray, min_pixels: int) -> np.ndarray:
    """``[objects, predicted, matched, sum of matched IoU]`` for one image and class: bool masks ``pred`` (class
    predicted), ``target`` (class in the ground truth) and ``valid`` (not ``ignore_index``), all ``(H, W)``."""
    gt_labels, num_gt = components(target, min_pixels)
    pred_labels, num_pred = components(pred, min_pixels)
    if num_pred == 0:
        return np.array([num_gt, 0, 0, 0.0])
    valid_pred = np.bincount(pred_labels[valid], minlength=num_pred + 1)
    total_pred = np.bincount(pred_labels.ravel(), minlength=num_pred + 1)
    counted = valid_pred[1:] * 2 >= total_pred[1:]  # PQ: an object mostly on ignored pixels is not a false alarm
    if num_gt == 0:
        return np.array([0, int(counted.sum()), 0, 0.0])
    both = (gt_labels > 0) & (pred_labels > 0) & valid
    pairs = np.bincount(gt_labels[both] * (num_pred + 1) + pred_labels[both], minlength=(num_gt + 1) * (num_pred + 1))
    intersection = pairs.reshape(num_gt + 1, num_pred + 1)[1:, 1:]
    gt_area = np.bincount(gt_labels.ravel(), minlength=num_gt + 1)[1:]
    union = gt_area[:, None] + valid_pred[None, 1:] - intersection
    iou = np.where(union > 0, intersection / np.maximum(union, 1), 0.0)
    matched = iou > MATCH_IOU
    hit_pred = matched.any(0)
    predicted = int((counted | hit_pred).sum())
    return np.array([num_gt, predicted, int(matched.sum()), float(iou[matched].sum())])


class ObjectCounts:
    """Accumulates ``counts`` ``(K, 4)`` float64 (columns ``GT``, ``PRED``, ``MATCHED``, ``IOU_SUM``) for the
    classes in ``classes`` (the other rows stay 0) over batches of hard labels.

    ``update(pred, target)`` takes integer tensors ``(N, H, W)`` (copied to the CPU); ``reduce()`` sums over
    processes. Raises ValueError for ``min_pixels < 1`` or a class index outside ``[0, K)``."""

    def __init__(self, num_classes: int, classes, min_pixels: int, ignore_index: int):
        self.classes = [int(c) for c in classes]
        if min_pixels < 1 or any(not 0 <= c < num_classes for c in self.classes):
            raise ValueError(f"ObjectCounts: min_pixels must be >= 1 and classes in [0, {num_classes}), got "
                             f"{min_pixels} and {self.classes}")
        self.min_pixels = int(min_pixels)
        self.ignore_index = int(ignore_index)
        self.counts = torch.zeros((num_classes, 4), dtype=torch.float64)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        if not self.classes:
            return
        pred = pred.detach().cpu().numpy()
        target = target.detach().cpu().numpy()
        sums = np.zeros((len(self.classes), 4))
        for image_pred, image_target in zip(pred.reshape(-1, *pred.shape[-2:]), target.reshape(-1, *target.shape[-2:])):
            valid = image_target != self.ignore_index
            for row, c in enumerate(self.classes):
                sums[row] += match_objects(image_pred == c, image_target == c, valid, self.min_pixels)
        self.counts[self.classes] += torch.from_numpy(sums)

    def reduce(self) -> None:
        all_reduce_sum_(self.counts)


def object_metrics(counts: torch.Tensor, classes) -> dict[str, torch.Tensor]:
    """Per-class float64 tensors ``objects``, ``found``, ``recall``, ``precision``, ``f1``, ``matched_iou`` from ``counts``
    ``(K, 4)``; NaN for classes not in ``classes`` (the indices counted) and where a denominator is 0."""
    counts = counts.to(torch.float64)
    mask = torch.zeros(counts.shape[0], dtype=torch.bool)
    mask[[int(c) for c in classes]] = True
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    gt, pred, matched, iou_sum = counts.unbind(1)

    def ratio(num, den):
        return torch.where(mask & (den > 0), num / den.clamp_min(1), nan)

    return {"objects": torch.where(mask, gt, nan), "found": torch.where(mask, matched, nan), "recall": ratio(matched, gt), "precision": ratio(matched, pred),
            "f1": ratio(2 * matched, gt + pred), "matched_iou": ratio(iou_sum, matched)}


def counted_classes(metrics_cfg, rare) -> list[int]:
    """The class indices whose objects a run's ``metrics`` node asks for (``objects``: rare | all | none; a config
    without the node: rare), ``rare`` being the rare-class mask (one bool per class)."""
    mode = (metrics_cfg or {}).get("objects", "rare")
    if mode not in OBJECT_MODES:
        raise ValueError(f"metrics.objects={mode!r} is not valid; choose one of {', '.join(OBJECT_MODES)}.")
    rare = torch.as_tensor(rare, dtype=torch.bool).cpu()
    return {"rare": torch.nonzero(rare).flatten().tolist(), "all": list(range(rare.numel())), "none": []}[mode]


def object_counter(metrics_cfg, rare, ignore_index: int) -> ObjectCounts | None:
    """The counter of ``counted_classes`` with ``metrics_cfg``'s ``min_object_pixels``; None when none is counted."""
    classes = counted_classes(metrics_cfg, rare)
    if not classes:
        return None
    min_pixels = int((metrics_cfg or {}).get("min_object_pixels", DEFAULT_MIN_PIXELS))
    return ObjectCounts(len(rare), classes, min_pixels, ignore_index)
