"""Loss math of :mod:`train_seg.losses`: every formula written once, vectorised, in float32.

This module gathers the functions of the family modules, where each is defined: ``_checks`` (argument and
input validation), ``_common`` (float32 math, ignored pixels, weighted means, class counts), ``_pixel``
(cross-entropy, focal, OHEM), ``_region`` (Dice, Tversky, generalized Dice), ``_lovasz`` (Lovasz-softmax) and
``_binary`` (one-channel BCE, sigmoid focal, binary Dice). The ``nn.Module`` classes validate their arguments
and call these functions. Conventions shared by all:

* **Shapes.** logits ``(N, C, H, W)`` of any float dtype; target ``(N, H, W)`` of an integer dtype with
  labels in ``[0, C)`` or ``ignore_index``. Binary losses take ``C == 1`` and labels in ``{0, 1}``.
* **Precision.** Each function runs with autocast disabled and casts the logits to float32: region sums
  over a million pixels overflow fp16 (max 65,504) and bf16 keeps 8 bits of mantissa. Pixel counts are
  integer (``bincount``); sums of probabilities per class use float64 accumulators where torch would
  otherwise add serially in float32.
* **Ignored pixels** count nowhere. Their labels are replaced by 0 before any gather (a one-hot or gather
  of label 255 crashes on CUDA), then their contribution is masked out.
* **Pixel losses** (CE, focal, OHEM, binary BCE / focal) reduce as the weighted mean
  ``sum_i w[y_i] l_i / sum_i w[y_i]`` over non-ignored pixels ``i``: scaling the weights leaves the loss
  unchanged. A batch without a valid pixel gives ``0 / max(0, tiny) = 0`` with a gradient graph.
* **Region losses** (Dice, Tversky, generalized Dice) use per-class statistics over the whole batch:
  ``I_c = sum_i p_ic [y_i = c]`` (soft true positives), ``P_c = sum_i p_ic`` (soft predicted pixels),
  ``G_c = #{i : y_i = c}`` (target pixels), sums over non-ignored pixels ``i``; then
  ``FP_c = P_c - I_c`` and ``FN_c = G_c - I_c``. A class with ``G_c = 0`` is *absent*.
"""

from __future__ import annotations

from ._binary import binary_cross_entropy, binary_dice_loss, sigmoid_focal_loss
from ._checks import as_class_vector, check_choice, check_ignore_index, check_inputs, check_number
from ._common import (TINY, class_counts, float32_math, pixel_weights, safe_pow, split_target,
                      weighted_pixel_mean)
from ._lovasz import lovasz_class_selection, lovasz_softmax
from ._pixel import cross_entropy, focal_alpha_vector, focal_loss, ohem_cross_entropy, pixel_log_prob_loss
from ._region import (ABSENT_MODES, GDL_WEIGHT_TYPES, class_weighted_mean, dice_loss, dice_score,
                      generalized_dice_loss, generalized_dice_weights, soft_class_stats, tversky_index,
                      tversky_loss)

# private helpers that used to live here, still importable from this module
from ._binary import _binary_target  # noqa: F401
from ._common import _autocast_off, _on  # noqa: F401
from ._lovasz import _ONE_BITS, _lovasz_sorted_grad, _LovaszSoftmax  # noqa: F401
from ._pixel import _focal_terms, _ohem_keep, _PixelLogProbLoss  # noqa: F401
from ._region import _ratio, _SoftClassStats  # noqa: F401

__all__ = [
    "TINY", "ABSENT_MODES", "GDL_WEIGHT_TYPES",
    # _checks
    "check_ignore_index", "check_number", "check_choice", "as_class_vector", "check_inputs",
    # _common
    "float32_math", "split_target", "pixel_weights", "weighted_pixel_mean", "class_counts", "safe_pow",
    # _pixel
    "pixel_log_prob_loss", "cross_entropy", "focal_alpha_vector", "focal_loss", "ohem_cross_entropy",
    # _region
    "soft_class_stats", "dice_score", "tversky_index", "class_weighted_mean", "dice_loss", "tversky_loss",
    "generalized_dice_weights", "generalized_dice_loss",
    # _lovasz
    "lovasz_class_selection", "lovasz_softmax",
    # _binary
    "binary_cross_entropy", "sigmoid_focal_loss", "binary_dice_loss",
]
