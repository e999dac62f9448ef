"""Region losses over the whole batch: soft Dice, generalized Dice (Sudre et al. 2017), (focal) Tversky.

All are formulas on per-class soft statistics over the non-ignored pixels ``i`` of the whole batch (not per
image), from ``soft_class_stats`` (one autograd Function with a fused backward):
``I_c = sum_i p_ic [y_i = c]`` (soft true positives), ``P_c = sum_i p_ic`` (soft predicted pixels),
``G_c = #{i : y_i = c}`` (target pixels), ``FP_c = P_c - I_c``, ``FN_c = G_c - I_c``; ``p = softmax(logits)``.
A class with ``G_c = 0`` is *absent*. Per-class losses are averaged with class weights
(``class_weighted_mean``). Conventions: ``train_seg.losses.base``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import (TINY, SegmentationLoss, autocast_off, check_choice, check_number, class_counts, float32_math,
                   float32_on, safe_pow, split_target)

__all__ = ["DiceLoss", "GeneralizedDiceLoss", "TverskyLoss", "ABSENT_MODES", "GDL_WEIGHT_TYPES",
           "soft_class_stats", "dice_score", "tversky_index", "class_weighted_mean", "dice_loss", "tversky_loss",
           "generalized_dice_weights", "generalized_dice_loss"]


ABSENT_MODES = ("include", "mask")
GDL_WEIGHT_TYPES = ("square", "simple", "uniform")


class _SoftClassStats(torch.autograd.Function):
    """``(I, P)`` per class from the softmax, with a fused backward.

    Forward keeps ``q = softmax(z) * valid``. With upstream gradients ``a_c = dL/dP_c`` and ``b_c = dL/dI_c``
    the gradient with respect to the probabilities is ``a_c + b_c [c = y_i]`` (0 at ignored pixels), so through
    the softmax ``dL/dz_ic = q_ic (a_c - s_i) + [c = y_i] b_c q_ic`` with
    ``s_i = sum_c a_c q_ic + b_{y_i} q_{i y_i}``: one matrix-vector product, one in-place pass over ``q`` (which
    becomes the gradient) and one scatter, instead of autograd's dense one-hot, reductions, separate softmax
    backward and their fresh (N, C, H, W) buffers.
    """

    @staticmethod
    def _masked_probs(logits: Tensor, valid: Tensor) -> Tensor:
        return torch.softmax(logits, dim=1).mul_(valid.unsqueeze(1))

    @staticmethod
    def forward(ctx, logits: Tensor, safe_target: Tensor, valid: Tensor):
        num_classes = logits.shape[1]
        probs = _SoftClassStats._masked_probs(logits, valid)
        index = safe_target.unsqueeze(1)
        target_probs = probs.gather(1, index)
        # torch.sum reduces pairwise (accurate); the per-class intersection is a scatter, done in float64
        # because serial float32 additions of ~1 values stall past 2**24 and drift long before.
        prob_sum = probs.sum(dim=(0, 2, 3))
        intersection = torch.zeros(num_classes, dtype=torch.float64, device=logits.device)
        intersection.index_add_(0, safe_target.flatten(), target_probs.flatten().double())
        ctx.save_for_backward(logits, valid, index, target_probs)
        ctx.probs = probs  # becomes the gradient in place; see backward
        return intersection.float(), prob_sum

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_intersection: Tensor | None, grad_prob_sum: Tensor | None):
        logits, valid, index, target_probs = ctx.saved_tensors
        probs, ctx.probs = ctx.probs, None
        if probs is None:  # a second backward (retain_graph=True): the buffer was consumed, recompute
            probs = _SoftClassStats._masked_probs(logits, valid)
        n, c, h, w = probs.shape
        a = grad_prob_sum if grad_prob_sum is not None else probs.new_zeros(c)
        b = grad_intersection if grad_intersection is not None else probs.new_zeros(c)
        b_target_probs = b[index] * target_probs  # (N, 1, H, W)
        with autocast_off(probs.device.type):  # backward may run inside autocast: keep the matmul in float32
            s = torch.matmul(a.view(1, 1, c), probs.view(n, c, h * w)) + b_target_probs.view(n, 1, h * w)
        # q * (a_c - s_i) in place, a few images at a time: the broadcast factor (a_c - s_i) is a temporary of
        # ~2**22 elements, reused by the allocator, instead of a fresh (N, C, H, W) tensor
        grad_logits = probs.view(n, c, h * w)
        step = max(1, (1 << 22) // (c * h * w))
        for start in range(0, n, step):
            grad_logits[start:start + step].mul_(a.view(1, c, 1) - s[start:start + step])
        grad_logits = grad_logits.view(n, c, h, w)
        grad_logits.scatter_add_(1, index, b_target_probs)
        return grad_logits, None, None


def soft_class_stats(logits: Tensor, target: Tensor, ignore_index: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(I, P, G)``: float32 vectors of length C (see the module docstring); gradients flow through I and P."""
    safe_target, valid = split_target(target, ignore_index)
    # The fused backward views the probabilities as (N, C, H*W).
    intersection, prob_sum = _SoftClassStats.apply(logits.contiguous(), safe_target, valid)
    counts = class_counts(safe_target, valid, logits.shape[1]).float()
    return intersection, prob_sum, counts


def _ratio(numerator: Tensor, denominator: Tensor) -> Tensor:
    """``numerator / denominator``, and 1 where the denominator is 0 (nothing predicted, nothing to find)."""
    return torch.where(denominator > 0, numerator / denominator.clamp_min(TINY), torch.ones_like(numerator))


def dice_score(intersection: Tensor, prob_sum: Tensor, counts: Tensor, smooth: float) -> Tensor:
    """Soft Dice per class ``(2 I_c + s) / (P_c + G_c + s)``."""
    return _ratio(2.0 * intersection + smooth, prob_sum + counts + smooth)


def tversky_index(intersection: Tensor, prob_sum: Tensor, counts: Tensor, alpha: float, beta: float,
                  smooth: float) -> Tensor:
    """Tversky index per class ``(I_c + s) / (I_c + alpha FP_c + beta FN_c + s)``."""
    false_pos = prob_sum - intersection
    false_neg = counts - intersection
    return _ratio(intersection + smooth, intersection + alpha * false_pos + beta * false_neg + smooth)


def class_weighted_mean(per_class: Tensor, counts: Tensor, weight: Tensor | None, absent: str) -> Tensor:
    """``sum_c w_c L_c / sum_c w_c``; ``absent="mask"`` gives absent classes (``G_c = 0``) weight 0."""
    class_weight = torch.ones_like(per_class) if weight is None else weight
    if absent == "mask":
        class_weight = class_weight * (counts > 0)
    return (class_weight * per_class).sum() / class_weight.sum().clamp_min(TINY)


@float32_math
def dice_loss(logits: Tensor, target: Tensor, weight: Tensor | None = None, ignore_index: int = 255,
              smooth: float = 1.0, absent: str = "include", log_loss: bool = False) -> Tensor:
    """Class-weighted mean of ``1 - Dice_c`` (or ``-log Dice_c``); see DiceLoss."""
    intersection, prob_sum, counts = soft_class_stats(logits, target, ignore_index)
    dice = dice_score(intersection, prob_sum, counts, smooth)
    per_class = -torch.log(dice.clamp_min(TINY)) if log_loss else 1.0 - dice
    return class_weighted_mean(per_class, counts, float32_on(weight, logits), absent)


@float32_math
def tversky_loss(logits: Tensor, target: Tensor, alpha: float = 0.5, beta: float = 0.5, gamma: float = 1.0,
                 weight: Tensor | None = None, ignore_index: int = 255, smooth: float = 1.0,
                 absent: str = "include") -> Tensor:
    """Class-weighted mean of ``(1 - TI_c)^gamma``; see TverskyLoss."""
    intersection, prob_sum, counts = soft_class_stats(logits, target, ignore_index)
    index = tversky_index(intersection, prob_sum, counts, alpha, beta, smooth)
    per_class = 1.0 - index
    if gamma != 1.0:
        # the gradient of x^gamma is infinite at x = 0 for gamma < 1 (a perfectly predicted class)
        per_class = safe_pow(per_class, gamma)
    return class_weighted_mean(per_class, counts, float32_on(weight, logits), absent)


def generalized_dice_weights(counts: Tensor, weight_type: str, absent: str) -> Tensor:
    """Sudre's class weights ``1/G_c^2`` (square), ``1/G_c`` (simple) or 1 (uniform), normalised to sum 1.

    The powers are taken of the proportions ``G_c / max_c G_c`` (in ``(0, 1]``), not of the raw counts: the
    normalised weights are the same, but depend only on the ratios of the counts (scale-invariant), and the raw
    weights are ``>= 1``, so their sum never reaches the 1e-12 clamp (``1/G^2`` of raw counts does, for classes
    of more than ~1e6 pixels) and the weights sum to 1 for any batch size.
    An absent class (``G_c = 0``) would get ``1/0``: with ``absent="include"`` it gets the largest weight of
    the present classes (as MONAI does), so predicting it is penalised like missing the rarest present class;
    with ``absent="mask"`` it gets 0. No class present: all weights 0 (the loss is then 0).
    """
    present = counts > 0
    if weight_type == "uniform":
        raw = torch.ones_like(counts)
    else:
        power = 2.0 if weight_type == "square" else 1.0
        proportion = torch.where(present, counts / counts.max().clamp_min(1), 1.0)  # absent: 1, masked below
        raw = proportion.pow(-power)
    raw = raw * present
    if absent == "include":
        raw = torch.where(present, raw, raw.max())
    return raw / raw.sum().clamp_min(TINY)


@float32_math
def generalized_dice_loss(logits: Tensor, target: Tensor, ignore_index: int = 255, smooth: float = 1.0,
                          weight_type: str = "square", absent: str = "include") -> Tensor:
    """``1 - (2 sum_c w_c I_c + s) / (sum_c w_c (P_c + G_c) + s)``; see GeneralizedDiceLoss."""
    intersection, prob_sum, counts = soft_class_stats(logits, target, ignore_index)
    class_weight = generalized_dice_weights(counts, weight_type, absent)
    numerator = 2.0 * (class_weight * intersection).sum() + smooth
    denominator = (class_weight * (prob_sum + counts)).sum() + smooth
    return 1.0 - _ratio(numerator, denominator)


class DiceLoss(SegmentationLoss):
    """Soft multi-class Dice loss, per class over the whole batch, class-weighted mean.

    Formula: ``p = softmax(logits)``; per class ``Dice_c = (2 I_c + s) / (P_c + G_c + s)`` with
    ``I_c = sum_i p_ic [y_i = c]``, ``P_c = sum_i p_ic``, ``G_c = #{i: y_i = c}``, sums over the non-ignored
    pixels ``i`` of the batch; ``L_c = 1 - Dice_c`` (``-log Dice_c`` with ``log_loss=True``, Dice clamped at
    1e-12); ``L = sum_c w_c L_c / sum_c w_c``.

    Args:
        weight: class weights ``w`` (None = uniform), used as the weights of the mean over classes.
        ignore_index: label of pixels that count nowhere (in none of I, P, G).
        smooth: ``s >= 0``, added to numerator and denominator (pixel units). A class with ``P_c + G_c + s = 0``
            (possible only with ``s = 0``: all pixels ignored) scores Dice 1.
        absent: a class absent from the target (``G_c = 0``) has ``Dice_c = s / (P_c + s)``: with ``"include"``
            (default) it is still averaged in, so predicting it is penalised (what images without foreground
            need; with ``s = 0`` its loss is 1 whenever anything is predicted); ``"mask"`` gives it weight 0.
            If no class is left the loss is 0.
        log_loss: use ``-log Dice_c`` instead of ``1 - Dice_c``.

    An all-ignored batch gives 0 with a gradient graph. Shapes: logits ``(N, C, H, W)``, target ``(N, H, W)``
    integer; returns a scalar. float32 with autocast disabled (sums of the intersection in float64).
    """

    binary = False
    takes_class_weights = True
    repr_fields = ("ignore_index", "smooth", "absent", "log_loss")

    def __init__(self, weight=None, ignore_index: int = 255, smooth: float = 1.0, absent: str = "include",
                 log_loss: bool = False):
        super().__init__(ignore_index=ignore_index, weight=weight)
        self.smooth = check_number(self.owner, "smooth", smooth, low=0.0)
        self.absent = check_choice(self.owner, "absent", absent, ABSENT_MODES)
        self.log_loss = check_choice(self.owner, "log_loss", log_loss, (False, True))

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        self.check_inputs(logits, target)
        return dice_loss(logits, target, self.weight, self.ignore_index, self.smooth, self.absent, self.log_loss)


class GeneralizedDiceLoss(SegmentationLoss):
    """Generalized Dice loss (Sudre et al. 2017), over the whole batch.

    Formula: ``L = 1 - (2 sum_c r_c I_c + s) / (sum_c r_c (P_c + G_c) + s)`` with ``I, P, G`` as in
    ``DiceLoss`` and class weights ``r_c`` computed from the batch's target counts:
    ``1 / G_c^2`` (``weight_type="square"``, Sudre's choice), ``1 / G_c`` (``"simple"``) or 1 (``"uniform"``,
    a global Dice), then normalised to sum to 1, so ``smooth`` is in pixel units as in DiceLoss (the ratio
    itself does not depend on the scale of ``r``).

    Absent classes (``G_c = 0``, where ``1/G_c^2`` is infinite): with ``absent="include"`` (default) they get
    the largest weight of the present classes (MONAI's rule), so predicting them is penalised like missing the
    rarest present class; ``absent="mask"`` gives them weight 0. Always finite; with no class present at all
    (all pixels ignored) the loss is 0 with a gradient graph.

    There is no ``weight`` argument: the class weighting is the ``weight_type`` rule itself, so the trainer's
    class weights are not injected into this loss.

    Args:
        ignore_index: label of pixels that count nowhere.
        smooth: ``s >= 0`` added to numerator and denominator (after the normalisation of ``r``).
        weight_type: ``"square"``, ``"simple"`` or ``"uniform"``.
        absent: ``"include"`` or ``"mask"``, see above.

    Shapes and dtype as in DiceLoss.
    """

    binary = False
    takes_class_weights = False  # the weight_type rule is its class weighting
    repr_fields = ("ignore_index", "smooth", "weight_type", "absent")

    def __init__(self, ignore_index: int = 255, smooth: float = 1.0, weight_type: str = "square",
                 absent: str = "include"):
        super().__init__(ignore_index=ignore_index)
        self.smooth = check_number(self.owner, "smooth", smooth, low=0.0)
        self.weight_type = check_choice(self.owner, "weight_type", weight_type, GDL_WEIGHT_TYPES)
        self.absent = check_choice(self.owner, "absent", absent, ABSENT_MODES)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        self.check_inputs(logits, target)
        return generalized_dice_loss(logits, target, self.ignore_index, self.smooth, self.weight_type, self.absent)


class TverskyLoss(SegmentationLoss):
    """Tversky loss (Salehi et al. 2017) and focal Tversky loss, per class over the whole batch.

    Formula: ``TI_c = (I_c + s) / (I_c + alpha FP_c + beta FN_c + s)`` with ``FP_c = P_c - I_c`` (soft false
    positives) and ``FN_c = G_c - I_c`` (false negatives), ``I, P, G`` as in ``DiceLoss``;
    ``L_c = (1 - TI_c)^gamma``; ``L = sum_c w_c L_c / sum_c w_c``.

    * ``alpha`` weights false positives, ``beta`` false negatives: ``beta > alpha`` favours recall (rare classes).
      ``alpha = beta = 0.5`` gives ``TI_c = (I_c + s) / ((P_c + G_c) / 2 + s)``, i.e. ``DiceLoss`` with
      smooth ``2 s`` (identical for ``s = 0``).
    * Focal Tversky: the exponent is applied as written, ``(1 - TI)^gamma`` (segmentation_models_pytorch's
      convention). Abraham & Khan (2019) write ``(1 - TI)^(1/gamma_AK)``: their recommended ``gamma_AK = 4/3`` is
      ``gamma = 0.75`` here. ``(1 - TI)^gamma`` is 0 (no gradient) for ``1 - TI <= 1e-12``, so the gradient stays finite
      for ``gamma < 1`` at a perfectly predicted class.
    * Absent classes and ``smooth`` as in DiceLoss: an absent class has ``TI_c = s / (alpha P_c + s)`` and is
      averaged in (``absent="include"``) or given weight 0 (``"mask"``). Ignored pixels count nowhere; an
      all-ignored batch gives 0 with a gradient graph.

    Shapes, dtype and ``weight`` (the class weights of the mean over classes) as in DiceLoss.
    """

    binary = False
    takes_class_weights = True
    repr_fields = ("alpha", "beta", "gamma", "ignore_index", "smooth", "absent")

    def __init__(self, alpha: float = 0.5, beta: float = 0.5, gamma: float = 1.0, weight=None,
                 ignore_index: int = 255, smooth: float = 1.0, absent: str = "include"):
        super().__init__(ignore_index=ignore_index, weight=weight)
        name = self.owner
        self.alpha = check_number(name, "alpha", alpha, low=0.0)
        self.beta = check_number(name, "beta", beta, low=0.0)
        if self.alpha + self.beta == 0:
            raise ValueError(f"{name}: alpha + beta must be > 0, got alpha={alpha}, beta={beta}")
        self.gamma = check_number(name, "gamma", gamma, low=0.0, low_open=True)
        self.smooth = check_number(name, "smooth", smooth, low=0.0)
        self.absent = check_choice(name, "absent", absent, ABSENT_MODES)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        self.check_inputs(logits, target)
        return tversky_loss(logits, target, self.alpha, self.beta, self.gamma, self.weight, self.ignore_index,
                            self.smooth, self.absent)
