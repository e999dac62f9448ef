"""Cross-entropy with online hard example mining over pixels (OHEM, as in PSPNet / MMSegmentation).

The selection happens inside the fused ``train_seg.losses.cross_entropy.PixelLogProbLoss``, from the
target log-probabilities it computes anyway. Conventions: ``train_seg.losses.base``.
"""

from __future__ import annotations

import numbers

from torch import Tensor

from .base import TINY, SegmentationLoss, check_number, float32_math, float32_on, pixel_weights, split_target
from .cross_entropy import PixelLogProbLoss, focal_terms

__all__ = ["OhemCrossEntropyLoss", "ohem_cross_entropy"]


def _ohem_keep(log_p: Tensor, valid: Tensor, thresh: float, min_kept: int) -> Tensor:
    """Bool mask of the kept pixels: valid and (p_y < thresh or p_y <= the min_kept-th smallest valid p_y)."""
    prob = log_p.exp()
    kept = prob < thresh
    if min_kept > 0:
        # ignored pixels get 2: never among the k smallest unless fewer than k pixels are valid, and then the
        # k-th value is 2 and every valid pixel is kept.
        ranked = prob.masked_fill(~valid, 2.0).flatten()
        kth = ranked.kthvalue(min(min_kept, ranked.numel())).values
        kept |= prob <= kth
    return kept & valid


@float32_math
def ohem_cross_entropy(logits: Tensor, target: Tensor, thresh: float = 0.7, min_kept: int = 100_000,
                       weight: Tensor | None = None, ignore_index: int = 255) -> Tensor:
    """Cross-entropy over the hard pixels only (see OhemCrossEntropyLoss for the selection rule)."""
    weight = float32_on(weight, logits)
    safe_target, valid = split_target(target, ignore_index)

    def terms(log_p: Tensor):
        kept = _ohem_keep(log_p, valid, thresh, min_kept)
        weights = pixel_weights(safe_target, kept, weight)
        return focal_terms(log_p, 0.0, weights, weights.sum().clamp_min(TINY))

    return PixelLogProbLoss.apply(logits, safe_target, terms)


class OhemCrossEntropyLoss(SegmentationLoss):
    """Weighted cross-entropy over the hard pixels of the batch.

    Selection (no gradient): with ``p_i`` the softmax probability of pixel ``i``'s true class, a non-ignored
    pixel is kept if ``p_i < thresh`` (hard) or if it is among the ``min_kept`` pixels of lowest ``p_i`` in the
    whole batch (``p_i <= k``-th smallest value, so ties may keep a few more). Hence at least
    ``min(min_kept, #valid pixels)`` pixels are kept, and every hard pixel is kept. This equals
    MMSegmentation's ``OHEMPixelSampler`` rule ``p < max(thresh, p_(min_kept))`` up to ties.

    Loss: ``L = sum_{i kept} w[y_i] (-log p_i) / sum_{i kept} w[y_i]`` (the weighted mean of
    ``CrossEntropyLoss`` restricted to the kept pixels; 0 with a gradient graph if none is kept).

    Args:
        thresh: probability threshold in (0, 1].
        min_kept: minimum number of kept pixels per batch (all images together), >= 0. The default 100,000
            is MMSegmentation's; it is an absolute count, so scale it with batch size and crop size.
        weight: class weights ``(C,)``; ignore_index: label of pixels that count nowhere.

    Classes absent from the target only enter through the softmax. No smoothing. float32, autocast disabled.
    Shapes: logits ``(N, C, H, W)``, target ``(N, H, W)`` integer; returns a scalar.
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
