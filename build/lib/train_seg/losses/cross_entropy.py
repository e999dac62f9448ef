"""Weighted cross-entropy with ``ignore_index`` and an empty-batch guard."""

from __future__ import annotations

from torch import Tensor

from ._checks import check_number
from ._pixel import cross_entropy
from .base import SegmentationLoss

__all__ = ["CrossEntropyLoss"]


class CrossEntropyLoss(SegmentationLoss):
    """Softmax cross-entropy, the weighted mean over non-ignored pixels.

    Formula: ``L = sum_i w[y_i] (-log p_{i,y_i}) / sum_i w[y_i]``, ``p = softmax(logits)`` over the class
    dimension, ``w`` the class weights (all 1 when ``weight`` is None), ``i`` over the non-ignored pixels of the
    whole batch. Scaling ``w`` does not change the loss (torch's ``reduction="mean"`` convention).

    Args:
        weight: class weights ``(C,)`` (None, a list or a tensor); kept as a non-persistent buffer.
        ignore_index: label of pixels that count nowhere (neither numerator nor denominator).
        label_smoothing: ``eps`` in [0, 1], torch's convention: the target distribution is
            ``(1 - eps) onehot(y) + eps / C``, so a pixel contributes ``(1 - eps) w[y] (-log p_y) +
            (eps / C) sum_c w_c (-log p_c)``; the denominator stays ``sum_i w[y_i]``.

    Classes absent from the target only enter through the softmax normaliser. A batch whose pixels are all
    ignored gives 0 with a gradient graph (never NaN). Computed in float32 with autocast disabled.
    Shapes: logits ``(N, C, H, W)``, target ``(N, H, W)`` integer; returns a scalar.
    """

    binary = False
    takes_class_weights = True
    repr_fields = ("ignore_index", "label_smoothing")

    def __init__(self, weight=None, ignore_index: int = 255, label_smoothing: float = 0.0):
        super().__init__(ignore_index=ignore_index, weight=weight)
        self.label_smoothing = check_number(self.owner, "label_smoothing", label_smoothing, low=0.0, high=1.0)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        self.check_inputs(logits, target)
        return cross_entropy(logits, target, self.weight, self.ignore_index, self.label_smoothing)
