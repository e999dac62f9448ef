"""Region losses over the whole batch: soft Dice, generalized Dice (Sudre et al. 2017), (focal) Tversky.

All three are formulas on the per-class statistics ``I_c`` (soft true positives), ``P_c`` (sum of predicted
probabilities) and ``G_c`` (target pixel count) of :func:`train_seg.losses._region.soft_class_stats`,
computed in float32 with autocast disabled, over the non-ignored pixels of the whole batch (not per image).
"""

from __future__ import annotations

from torch import Tensor

from ._checks import check_choice, check_number
from ._region import ABSENT_MODES, GDL_WEIGHT_TYPES, dice_loss, generalized_dice_loss, tversky_loss
from .base import SegmentationLoss

__all__ = ["DiceLoss", "GeneralizedDiceLoss", "TverskyLoss"]


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
    integer; returns a scalar.
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
    :class:`DiceLoss` and class weights ``r_c`` computed from the batch's target counts:
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
    positives) and ``FN_c = G_c - I_c`` (false negatives), ``I, P, G`` as in :class:`DiceLoss`;
    ``L_c = (1 - TI_c)^gamma``; ``L = sum_c w_c L_c / sum_c w_c``.

    * ``alpha`` weights false positives, ``beta`` false negatives: ``beta > alpha`` favours recall (rare classes).
      ``alpha = beta = 0.5`` gives ``TI_c = (I_c + s) / ((P_c + G_c) / 2 + s)``, i.e. :class:`DiceLoss` with
      smooth ``2 s`` (identical for ``s = 0``).
    * Focal Tversky: the exponent is applied as written, ``(1 - TI)^gamma`` (segmentation_models_pytorch's
      convention). Abraham & Khan (2019) write ``(1 - TI)^(1/gamma_AK)``: their recommended ``gamma_AK = 4/3`` is
      ``gamma = 0.75`` here. ``(1 - TI)^gamma`` is 0 (no gradient) for ``1 - TI <= 1e-12``, so the gradient stays finite
      for ``gamma < 1`` at a perfectly predicted class.
    * Absent classes and ``smooth`` as in DiceLoss: an absent class has ``TI_c = s / (alpha P_c + s)`` and is
      averaged in (``absent="include"``) or given weight 0 (``"mask"``). Ignored pixels count nowhere; an
      all-ignored batch gives 0 with a gradient graph.
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
