"""Cross-entropy with online hard example mining over pixels (OHEM, as in PSPNet / MMSegmentation)."""

from __future__ import annotations

import numbers

from torch import Tensor

from ._checks import check_number
from ._pixel import ohem_cross_entropy
from .base import SegmentationLoss

__all__ = ["OhemCrossEntropyLoss"]


class OhemCrossEntropyLoss(SegmentationLoss):
    """Weighted cross-entropy over the hard pixels of the batch.

    Selection (no gradient): with ``p_i`` the softmax probability of pixel ``i``'s true class, a non-ignored
    pixel is kept if ``p_i < thresh`` (hard) or if it is among the ``min_kept`` pixels of lowest ``p_i`` in the
    whole batch (``p_i <= k``-th smallest value, so ties may keep a few more). Hence at least
    ``min(min_kept, #valid pixels)`` pixels are kept, and every hard pixel is kept. This equals
    MMSegmentation's ``OHEMPixelSampler`` rule ``p < max(thresh, p_(min_kept))`` up to ties.

    Loss: ``L = sum_{i kept} w[y_i] (-log p_i) / sum_{i kept} w[y_i]`` (the weighted mean of
    :class:`CrossEntropyLoss` restricted to the kept pixels; 0 with a gradient graph if none is kept).

    Args:
        thresh: probability threshold in (0, 1].
        min_kept: minimum number of kept pixels per batch (all images together), >= 0. The default 100,000
            is MMSegmentation's; it is an absolute count, so scale it with batch size and crop size.
        weight: class weights ``(C,)``; ignore_index: label of pixels that count nowhere.

    Classes absent from the target only enter through the softmax. No smoothing. float32, autocast disabled.
    """

    binary = False
    takes_class_weights = True
    repr_fields = ("thresh", "min_kept", "ignore_index")

    def __init__(self, thresh: float = 0.7, min_kept: int = 100_000, weight=None, ignore_index: int = 255):
        super().__init__(ignore_index=ignore_index, weight=weight)
        self.thresh = check_number(self.owner, "thresh", thresh, low=0.0, high=1.0, low_open=True)
        if isinstance(min_kept, bool) or not isinstance(min_kept, numbers.Integral) or min_kept < 0:
            raise ValueError(f"{self.owner}: min_kept must be an int >= 0, got {min_kept!r}")
        self.min_kept = int(min_kept)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        self.check_inputs(logits, target)
        return ohem_cross_entropy(logits, target, self.thresh, self.min_kept, self.weight, self.ignore_index)
