"""Softmax focal loss (Lin et al. 2017) for C classes."""

from __future__ import annotations

import numbers

from torch import Tensor

from ._checks import as_class_vector, check_number
from ._pixel import focal_loss
from .base import SegmentationLoss

__all__ = ["FocalLoss"]


class FocalLoss(SegmentationLoss):
    """Softmax focal loss, reduced like weighted cross-entropy.

    Formula (Lin et al. 2017, softmax form): per non-ignored pixel ``i`` with label ``y``,
    ``l_i = -(1 - p_y)^gamma log p_y``, ``p = softmax(logits)``; then
    ``L = sum_i a[y_i] w[y_i] l_i / sum_i w[y_i]``.

    * ``w`` are the class weights (``weight``, all 1 when None): numerator and denominator, so scaling them does
      not change the loss and ``gamma=0, alpha=None`` equals :class:`CrossEntropyLoss` with the same
      ``weight`` exactly.
    * ``a`` is alpha, a *multiplier of the numerator only* (as in Lin et al. and torchvision, where alpha scales
      the loss without renormalising): a scalar ``alpha`` follows the binary convention ``a = [1 - alpha,
      alpha, ..., alpha]`` (alpha for the classes >= 1, ``1 - alpha`` for class 0); a list gives ``a`` per
      class; None means ``a = 1``. Alpha therefore changes the loss scale (``alpha=0.25`` roughly divides it
      by 4 on foreground pixels), class weights do not.

    ``ignore_index`` pixels count nowhere; an all-ignored batch gives 0 with a gradient graph. Classes absent
    from the target only enter through the softmax normaliser. No smoothing. ``(1 - p_y)`` is computed as
    ``-expm1(log p_y)`` in float32 (autocast disabled); ``(1 - p_y)^gamma`` is 0 (no gradient) for
    ``1 - p_y <= 1e-12``, so the gradient stays finite for ``gamma < 1``.
    Shapes: logits ``(N, C, H, W)``, target ``(N, H, W)`` integer; returns a scalar.
    """

    binary = False
    takes_class_weights = True
    repr_fields = ("gamma", "alpha", "ignore_index")

    def __init__(self, gamma: float = 2.0, alpha=None, weight=None, ignore_index: int = 255):
        super().__init__(ignore_index=ignore_index, weight=weight)
        self.gamma = check_number(self.owner, "gamma", gamma, low=0.0)
        self.alpha = None  # scalar alpha (float) or None; a per-class alpha lives in the buffer alpha_vector
        vector = None
        if isinstance(alpha, numbers.Real) and not isinstance(alpha, bool):
            self.alpha = check_number(self.owner, "alpha", alpha, low=0.0, high=1.0)
        elif alpha is not None:
            vector = as_class_vector(self.owner, "alpha", alpha)
        self.register_buffer("alpha_vector", vector, persistent=False)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        self.check_inputs(logits, target, alpha=self.alpha_vector)
        alpha = self.alpha_vector if self.alpha_vector is not None else self.alpha
        return focal_loss(logits, target, self.gamma, alpha, self.weight, self.ignore_index)

    def _repr_field(self, name: str) -> str:
        if name == "alpha":  # the scalar as given (str, not :g), or the per-class list
            return str(self.alpha if self.alpha_vector is None else self.alpha_vector.tolist())
        return super()._repr_field(name)
