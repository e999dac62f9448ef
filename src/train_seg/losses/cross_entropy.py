"""Weighted cross-entropy with ``ignore_index`` and an empty-batch guard."""

from __future__ import annotations

from torch import Tensor, nn

from . import _functional as LF

__all__ = ["CrossEntropyLoss"]


class CrossEntropyLoss(nn.Module):
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

    def __init__(self, weight=None, ignore_index: int = 255, label_smoothing: float = 0.0):
        super().__init__()
        name = type(self).__name__
        self.ignore_index = LF.check_ignore_index(name, ignore_index)
        self.label_smoothing = LF.check_number(name, "label_smoothing", label_smoothing, low=0.0, high=1.0)
        self.register_buffer("weight", LF.as_class_vector(name, "weight", weight), persistent=False)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        LF.check_inputs(type(self).__name__, logits, target, weight=self.weight)
        return LF.cross_entropy(logits, target, self.weight, self.ignore_index, self.label_smoothing)

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing:g}"
