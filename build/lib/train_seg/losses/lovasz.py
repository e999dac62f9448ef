"""Lovasz-softmax loss (Berman, Triki & Blaschko 2018), vectorised over classes."""

from __future__ import annotations

import numbers

from torch import Tensor

from ._checks import check_choice
from ._lovasz import lovasz_softmax
from .base import SegmentationLoss

__all__ = ["LovaszSoftmaxLoss"]


class LovaszSoftmaxLoss(SegmentationLoss):
    """Lovasz-softmax: a convex surrogate of the per-class Jaccard (IoU) loss, over the whole batch.

    Formula (Berman's ``lovasz_softmax_flat``, ``per_image=False``): ``p = softmax(logits)``; for class ``c``
    the errors of the non-ignored pixels are ``e_i = 1 - p_ic`` if ``y_i = c`` else ``p_ic``; sorted by
    decreasing error, ``L_c = sum_k e_(k) g_k`` with ``g`` the increments of the Jaccard loss of the top-k set
    (``lovasz_grad``). ``L`` is the plain mean of ``L_c`` over the selected classes (no class weights).

    Args:
        ignore_index: label of pixels that count nowhere (they are not sorted at all).
        classes: ``"present"`` (default): the classes present in the (non-ignored) target; ``"all"``: every
            class, where an absent class scores its largest predicted probability (Berman's ``lovasz_grad``
            of an empty foreground is ``[1, 0, ...]``); or a list of class indices.

    No smoothing. No selected class (e.g. every pixel ignored) gives 0 with a gradient graph. Computed in
    float32 with autocast disabled; one sort of integer (class, error) keys for all classes, exact up to the
    float32 order of the errors, with background pixels that cannot contribute dropped before the sort.
    """

    binary = False
    takes_class_weights = False  # a plain mean over the selected classes
    repr_fields = ("ignore_index", "classes")

    def __init__(self, ignore_index: int = 255, classes="present"):
        super().__init__(ignore_index=ignore_index)
        name = self.owner
        if isinstance(classes, str):
            classes = check_choice(name, "classes", classes, ("present", "all"))
        else:
            try:
                indices = list(classes)
            except TypeError:
                indices = None
            if (not indices or any(isinstance(c, bool) or not isinstance(c, numbers.Integral) or c < 0
                                   for c in indices)):
                raise ValueError(f"{name}: classes must be 'present', 'all' or a non-empty list of class "
                                 f"indices >= 0, got {classes!r}")
            classes = tuple(int(c) for c in indices)
        self.classes = classes

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        self.check_inputs(logits, target)
        if isinstance(self.classes, tuple) and max(self.classes) >= logits.shape[1]:
            raise ValueError(f"{self.owner}: classes {list(self.classes)} out of range for logits "
                             f"{tuple(logits.shape)} with C={logits.shape[1]}")
        return lovasz_softmax(logits, target, self.ignore_index, self.classes)
