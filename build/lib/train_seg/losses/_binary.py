"""Binary (one-channel, sigmoid) losses: BCE, sigmoid focal, binary Dice.

Logits ``(N, 1, H, W)``; label 1 is foreground, any other non-ignored label background; the class-weight vector
is ``[w_bg, w_fg]``, used per pixel as ``w[y_i]``. Conventions: :mod:`train_seg.losses._functional`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import _on, float32_math, safe_pow, split_target, weighted_pixel_mean
from ._region import dice_score

__all__ = ["binary_cross_entropy", "sigmoid_focal_loss", "binary_dice_loss"]


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
    fg, weights = _binary_target(target, ignore_index, _on(weight, logits))
    pixel_loss = F.binary_cross_entropy_with_logits(logits.squeeze(1), fg, pos_weight=_on(pos_weight, logits),
                                                    reduction="none")
    return weighted_pixel_mean(pixel_loss, weights)


@float32_math
def sigmoid_focal_loss(logits: Tensor, target: Tensor, alpha: float | None = 0.25, gamma: float = 2.0,
                       weight: Tensor | None = None, ignore_index: int = 255) -> Tensor:
    """torchvision's ``sigmoid_focal_loss`` per pixel, reduced as ``sum_i w[y_i] l_i / sum_i w[y_i]``."""
    fg, weights = _binary_target(target, ignore_index, _on(weight, logits))
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
    fg, weights = _binary_target(target, ignore_index, _on(weight, logits))
    prob = torch.sigmoid(logits.squeeze(1))
    weighted_prob = prob * weights
    intersection = (weighted_prob * fg).sum()
    return 1.0 - dice_score(intersection, weighted_prob.sum(), (weights * fg).sum(), smooth)
