"""Losses for one-channel heads (foreground vs background): BCE, sigmoid focal, binary Dice.

Shared conventions: logits ``(N, 1, H, W)``, target ``(N, H, W)`` integer with 1 = foreground, 0 =
background and ``ignore_index`` = ignored (any other label counts as background). ``weight`` is the 2-class
weight vector ``[w_bg, w_fg]`` produced by the class weighting, used per pixel as ``w[y_i]``; the pixel losses
reduce as the weighted mean ``sum_i w[y_i] l_i / sum_i w[y_i]`` over non-ignored pixels (so scaling ``weight``
does not change them). float32 with autocast disabled; an all-ignored batch gives 0 with a gradient graph.
Functional forms: ``binary_cross_entropy``, ``sigmoid_focal_loss``, ``binary_dice_loss``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import (SegmentationLoss, as_class_vector, check_number, float32_math, float32_on, safe_pow,
                   split_target, weighted_pixel_mean)
from .dice import dice_score

__all__ = ["BCEWithLogitsLoss", "SigmoidFocalLoss", "BinaryDiceLoss", "binary_cross_entropy",
           "sigmoid_focal_loss", "binary_dice_loss"]


def _binary_target(target: Tensor, ignore_index: int, weight: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(fg, pixel_weight)``: float foreground indicator (label 1) and ``w[y]`` (0 at ignored pixels)."""
    safe_target, valid = split_target(target, ignore_index)
    fg = (safe_target == 1) & valid
    if weight is None:
        return fg.float(), valid.float()
    return fg.float(), torch.where(fg, weight[1], weight[0]) * valid


@float32_math
def binary_cross_entropy(logits: Tensor, target: Tensor, weight: Tensor | None = None,
                         pos_weight: Tensor | None = None, ignore_index: int = 255) -> Tensor:
    """``sum_i w[y_i] bce_i / sum_i w[y_i]``, ``bce_i = -(pw y log s(x) + (1 - y) log(1 - s(x)))``."""
    fg, weights = _binary_target(target, ignore_index, float32_on(weight, logits))
    pixel_loss = F.binary_cross_entropy_with_logits(logits.squeeze(1), fg,
                                                    pos_weight=float32_on(pos_weight, logits), reduction="none")
    return weighted_pixel_mean(pixel_loss, weights)


@float32_math
def sigmoid_focal_loss(logits: Tensor, target: Tensor, alpha: float | None = 0.25, gamma: float = 2.0,
                       weight: Tensor | None = None, ignore_index: int = 255) -> Tensor:
    """torchvision's ``sigmoid_focal_loss`` per pixel, reduced as ``sum_i w[y_i] l_i / sum_i w[y_i]``."""
    fg, weights = _binary_target(target, ignore_index, float32_on(weight, logits))
    x = logits.squeeze(1)
    bce = F.binary_cross_entropy_with_logits(x, fg, reduction="none")
    prob = torch.sigmoid(x)
    one_minus_p_t = prob + fg - 2.0 * prob * fg  # 1 - p_t, p_t = p y + (1 - p)(1 - y)
    pixel_loss = bce if gamma == 0 else bce * safe_pow(one_minus_p_t, gamma)
    if alpha is not None:
        pixel_loss = pixel_loss * (alpha * fg + (1.0 - alpha) * (1.0 - fg))
    return weighted_pixel_mean(pixel_loss, weights)


@float32_math
def binary_dice_loss(logits: Tensor, target: Tensor, weight: Tensor | None = None, ignore_index: int = 255,
                     smooth: float = 1.0) -> Tensor:
    """``1 - (2 I + s) / (P + G + s)`` of the foreground, sums weighted per pixel by ``w[y_i]``."""
    fg, weights = _binary_target(target, ignore_index, float32_on(weight, logits))
    prob = torch.sigmoid(logits.squeeze(1))
    weighted_prob = prob * weights
    intersection = (weighted_prob * fg).sum()
    return 1.0 - dice_score(intersection, weighted_prob.sum(), (weights * fg).sum(), smooth)


class BCEWithLogitsLoss(SegmentationLoss):
    """Binary cross-entropy on logits, weighted mean over non-ignored pixels.

    Formula: ``l_i = -(pw y_i log s(x_i) + (1 - y_i) log(1 - s(x_i)))`` (torch's
    ``binary_cross_entropy_with_logits``, ``s`` the sigmoid, ``pw`` = ``pos_weight`` or 1) and
    ``L = sum_i w[y_i] l_i / sum_i w[y_i]``. ``pos_weight`` has torch's meaning: it multiplies the positive
    term inside the loss and is not part of the denominator; ``weight = [w_bg, w_fg]`` weights numerator and
    denominator. Use one or the other (both multiply). No smoothing. An image without foreground is a plain
    background BCE.
    """

    binary = True
    takes_class_weights = True
    repr_fields = ("pos_weight", "ignore_index")

    def __init__(self, weight=None, pos_weight=None, ignore_index: int = 255):
        super().__init__(ignore_index=ignore_index, weight=weight)
        if pos_weight is not None:
            pos_weight = as_class_vector(self.owner, "pos_weight", [pos_weight]
                                         if isinstance(pos_weight, (int, float)) else pos_weight, length=1)
        self.register_buffer("pos_weight", pos_weight, persistent=False)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        self.check_inputs(logits, target)
        return binary_cross_entropy(logits, target, self.weight, self.pos_weight, self.ignore_index)

    def _repr_field(self, name: str) -> str:
        if name == "pos_weight":  # the scalar of the 1-entry buffer, as str (not :g)
            return str(None if self.pos_weight is None else float(self.pos_weight))
        return super()._repr_field(name)


class SigmoidFocalLoss(SegmentationLoss):
    """Sigmoid focal loss with ``torchvision.ops.sigmoid_focal_loss`` semantics per pixel.

    Formula: ``p = s(x)``, ``p_t = p y + (1 - p)(1 - y)``, ``l_i = a_t (1 - p_t)^gamma bce_i`` with
    ``a_t = alpha y + (1 - alpha)(1 - y)`` (``a_t = 1`` when ``alpha`` is None, torchvision's ``alpha < 0``);
    reduced as ``L = sum_i w[y_i] l_i / sum_i w[y_i]`` over non-ignored pixels: alpha multiplies the numerator
    only (as in torchvision, whose ``reduction="mean"`` is this with ``w = 1`` and no ignored pixels), class
    weights ``[w_bg, w_fg]`` both numerator and denominator. ``(1 - p_t)^gamma`` is 0 (no gradient) for
    ``1 - p_t <= 1e-12``. No smoothing. A batch without foreground is the background term alone.
    """

    binary = True
    takes_class_weights = True
    repr_fields = ("alpha", "gamma", "ignore_index")

    def __init__(self, alpha: float | None = 0.25, gamma: float = 2.0, weight=None, ignore_index: int = 255):
        super().__init__(ignore_index=ignore_index, weight=weight)
        self.alpha = None if alpha is None else check_number(self.owner, "alpha", alpha, low=0.0, high=1.0)
        self.gamma = check_number(self.owner, "gamma", gamma, low=0.0)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        self.check_inputs(logits, target)
        return sigmoid_focal_loss(logits, target, self.alpha, self.gamma, self.weight, self.ignore_index)

    def _repr_field(self, name: str) -> str:
        if name == "alpha":  # as given (str, not :g); None when disabled
            return str(self.alpha)
        return super()._repr_field(name)


class BinaryDiceLoss(SegmentationLoss):
    """Soft Dice loss of the foreground over the whole batch.

    Formula: ``p_i = s(x_i)``, per-pixel weight ``v_i = w[y_i]`` (1 without ``weight``, 0 at ignored pixels),
    ``I = sum_i v_i p_i y_i``, ``P = sum_i v_i p_i``, ``G = sum_i v_i y_i``, ``L = 1 - (2 I + s) / (P + G + s)``.
    With ``weight = [w_bg, w_fg]`` this is ``1 - (2 I' + s') / (2 I' + FN' + (w_bg / w_fg) FP' + s')`` in
    unweighted soft counts (``s' = s / w_fg``): a heavier foreground weight makes false positives relatively
    cheaper (recall-oriented, like Tversky with ``alpha < beta``); uniform weights give the plain Dice.
    A batch without foreground (``G = 0``) still penalises predicted foreground: ``L = P / (P + s)``.
    ``smooth`` ``s >= 0``; ``P + G + s = 0`` (all ignored with ``s = 0``) scores Dice 1, loss 0.
    """

    binary = True
    takes_class_weights = True
    repr_fields = ("ignore_index", "smooth")

    def __init__(self, weight=None, ignore_index: int = 255, smooth: float = 1.0):
        super().__init__(ignore_index=ignore_index, weight=weight)
        self.smooth = check_number(self.owner, "smooth", smooth, low=0.0)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        self.check_inputs(logits, target)
        return binary_dice_loss(logits, target, self.weight, self.ignore_index, self.smooth)
