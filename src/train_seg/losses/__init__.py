"""Segmentation losses for class-imbalanced data.

Every loss is an ``nn.Module`` called as ``loss(logits, target)`` with logits ``(N, C, H, W)`` (``(N, 1, H, W)``
for the binary losses) and an integer target ``(N, H, W)``; it returns a scalar computed in float32 (autocast
disabled inside). Pixels labelled ``ignore_index`` count nowhere; an all-ignored batch gives 0 with a gradient.
Pixel losses are weighted means ``sum_i w[y_i] l_i / sum_i w[y_i]``; region losses are computed per class over
the whole batch and averaged over classes with the class weights. Each class docstring states its formula.
Each family is one module holding its functional form and its class: ``cross_entropy``, ``focal``, ``ohem``,
``dice`` (Dice, generalized Dice, Tversky), ``lovasz``, ``binary``, ``combo``; shared conventions, checks and
helpers are in ``train_seg.losses.base``. Every class except the composition ``WeightedSum`` derives from
``train_seg.losses.base.SegmentationLoss`` and declares ``binary`` (one-channel sigmoid loss) and
``takes_class_weights`` (its constructor accepts ``weight``, which the builder then injects); a loss that declares
``takes_class_prior`` gets the training split's pixel shares as ``prior``.
"""

from .binary import BCEWithLogitsLoss, BinaryDiceLoss, SigmoidFocalLoss
from .combo import WeightedSum
from .cross_entropy import CrossEntropyLoss, LogitAdjustedLoss
from .dice import DiceLoss, GeneralizedDiceLoss, TverskyLoss
from .focal import FocalLoss
from .lovasz import LovaszSoftmaxLoss
from .ohem import OhemCrossEntropyLoss

__all__ = [
    "CrossEntropyLoss",
    "LogitAdjustedLoss",
    "FocalLoss",
    "DiceLoss",
    "GeneralizedDiceLoss",
    "TverskyLoss",
    "LovaszSoftmaxLoss",
    "OhemCrossEntropyLoss",
    "WeightedSum",
    "BCEWithLogitsLoss",
    "SigmoidFocalLoss",
    "BinaryDiceLoss",
]
