"""Softmax focal loss (Lin et al. 2017) for C classes: the functional form and ``FocalLoss``.

The math is ``train_seg.losses.cross_entropy.pixel_log_prob_loss`` with ``gamma > 0`` and alpha as a
numerator-only scale. Conventions: ``train_seg.losses.base``.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from .base import (SegmentationLoss, as_class_vector, check_number, float32_math, float32_on, pixel_weights,
                   split_target)
from .cross_entropy import pixel_log_prob_loss

__all__ = ["FocalLoss", "focal_alpha_vector", "focal_loss"]


def focal_alpha_vector(alpha, num_classes: int, like: Tensor) -> Tensor | None:
    """Per-class focal alpha: a scalar is ``[1 - alpha, alpha, ..., alpha]`` (binary convention: alpha for
    the classes >= 1), a vector is used as given, ``None`` stays ``None``."""
    if alpha is None:
        return None
    if isinstance(alpha, Tensor):
        return float32_on(alpha, like)
    vector = like.new_full((num_classes,), float(alpha), dtype=torch.float32)
    vector[0] = 1.0 - float(alpha)
    return vector


@float32_math
def focal_loss(logits: Tensor, target: Tensor, gamma: float = 2.0, alpha=None, weight: Tensor | None = None,
               ignore_index: int = 255) -> Tensor:
    """Softmax focal loss ``sum_i a[y_i] w[y_i] (1 - p_y)^gamma (-log p_y) / sum_i w[y_i]`` (see FocalLoss)."""
    weight = float32_on(weight, logits)
    safe_target, valid = split_target(target, ignore_index)
    alpha = focal_alpha_vector(alpha, logits.shape[1], logits)
    scale = None if alpha is None else alpha[safe_target]
    return pixel_log_prob_loss(logits, safe_target, pixel_weights(safe_target, valid, weight), gamma, scale)


class FocalLoss(SegmentationLoss):
    """Softmax focal loss, reduced like weighted cross-entropy.

    Formula (Lin et al. 2017, softmax form): per non-ignored pixel ``i`` with label ``y``,
    ``l_i = -(1 - p_y)^gamma log p_y``, ``p = softmax(logits)``; then
    ``L = sum_i a[y_i] w[y_i] l_i / sum_i w[y_i]``.

    * ``w`` are the class weights (``weight``, all 1 when None): numerator and denominator, so scaling them does
      not change the loss and ``gamma=0, alpha=None`` equals ``CrossEntropyLoss`` with the same
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
