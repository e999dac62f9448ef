"""Cross-entropy, and the fused target-log-probability loss it shares with focal loss and OHEM.

``pixel_log_prob_loss`` is the weighted pixel mean ``sum_i s_i w[y_i] (1 - p_i)^gamma (-log p_i) /
sum_i w[y_i]`` over non-ignored pixels ``i`` (``p_i = softmax(logits)_{i, y_i}``, ``s`` a numerator-only scale
such as focal alpha, ``gamma = 0`` for cross-entropy), one autograd Function with a fused backward
(``PixelLogProbLoss``); ``.focal`` and ``.ohem`` build on it. ``LogitAdjustedLoss`` is
cross-entropy on prior-shifted logits. Conventions: ``.base``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import TINY, SegmentationLoss, check_number, float32_math, float32_on, pixel_weights, split_target

__all__ = ["CrossEntropyLoss", "LogitAdjustedLoss", "PixelLogProbLoss", "focal_terms", "pixel_log_prob_loss",
           "cross_entropy", "log_prior"]


class PixelLogProbLoss(torch.autograd.Function):
    """``L = sum_i F_i(log p_{i,y_i})`` with a fused backward, for pixel losses whose derivative is known.

    ``terms(log_p) -> (L, dL/dlog p_i)`` computes the value and the per-pixel slope ``s_i`` without autograd.
    The gradient with respect to the logits is ``s_i (onehot(y_i) - p_i)``: an in-place ``exp`` of the saved
    log-probabilities, an in-place scale and a scatter of ``s`` at the target. The whole forward+backward
    allocates one (N, C, H, W) tensor and runs a handful of per-pixel kernels; autograd through ``gather``
    (and F.cross_entropy) allocates three, runs the log-softmax backward and one kernel per elementary op.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, safe_target: Tensor, terms):
        log_probs = torch.log_softmax(logits, dim=1)
        index = safe_target.unsqueeze(1)
        value, slope = terms(log_probs.gather(1, index).squeeze(1))
        ctx.save_for_backward(logits, index, slope)
        ctx.log_probs = log_probs  # becomes the gradient in place; see backward
        return value

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        logits, index, slope = ctx.saved_tensors
        log_probs, ctx.log_probs = ctx.log_probs, None
        if log_probs is None:  # a second backward (retain_graph=True): the buffer was consumed, recompute
            log_probs = torch.log_softmax(logits, dim=1)
        pixel_grad = (slope * grad).unsqueeze(1)
        grad_logits = log_probs.exp_().mul_(-pixel_grad)
        grad_logits.scatter_add_(1, index, pixel_grad)
        return grad_logits, None, None


def focal_terms(log_p: Tensor, gamma: float, numerator_weights: Tensor, denominator: Tensor):
    """Value and slope of ``sum_i a_i (1 - p_i)^gamma (-log p_i) / D`` (``a_i`` = numerator weights).

    ``d/dlog p [(1 - p)^gamma (-log p)] = gamma (1 - p)^(gamma - 1) p log p - (1 - p)^gamma``. ``1 - p`` is
    ``-expm1(log p)`` (precise when p -> 1); for ``gamma < 1`` values of ``1 - p <= 1e-12`` count as 0 so the
    slope stays finite. ``gamma = 0`` is plain cross-entropy.
    """
    scale = numerator_weights / denominator
    if gamma == 0:
        return -(scale * log_p).sum(), -scale
    q = -torch.expm1(log_p)
    if gamma >= 1:
        modulating, derivative = q.pow(gamma), gamma * q.pow(gamma - 1.0)
    else:
        positive = q > TINY
        q_safe = q.clamp_min(TINY)
        modulating = torch.where(positive, q_safe.pow(gamma), 0.0)
        derivative = torch.where(positive, gamma * q_safe.pow(gamma - 1.0), 0.0)
    weighted = scale * modulating
    slope = scale * derivative * log_p.exp() * log_p - weighted
    return -(weighted * log_p).sum(), slope


def pixel_log_prob_loss(logits: Tensor, safe_target: Tensor, weights: Tensor, gamma: float = 0.0,
                        numerator_scale: Tensor | None = None) -> Tensor:
    """``sum_i s_i w_i (1 - p_i)^gamma (-log p_i) / sum_i w_i``, ``p_i = softmax(logits)_{i, y_i}``: the weighted
    pixel mean shared by cross-entropy (gamma 0), focal loss and OHEM; ``s`` scales the numerator only."""
    denominator = weights.sum().clamp_min(TINY)
    numerator_weights = weights if numerator_scale is None else weights * numerator_scale
    return PixelLogProbLoss.apply(logits, safe_target,
                                   lambda log_p: focal_terms(log_p, gamma, numerator_weights, denominator))


@float32_math
def cross_entropy(logits: Tensor, target: Tensor, weight: Tensor | None = None, ignore_index: int = 255,
                  label_smoothing: float = 0.0) -> Tensor:
    """Weighted-mean cross-entropy ``sum_i w[y_i] (-log p_{i,y_i}) / sum_i w[y_i]`` over non-ignored pixels.

    With ``label_smoothing = eps`` the per-pixel loss is torch's: ``(1 - eps) w[y] (-log p_y) +
    (eps / C) sum_c w_c (-log p_c)``, divided by the same ``sum_i w[y_i]``.
    """
    weight = float32_on(weight, logits)
    safe_target, valid = split_target(target, ignore_index)
    weights = pixel_weights(safe_target, valid, weight)
    if label_smoothing > 0:
        # torch computes the smoothed numerator exactly as documented above; only its mean is replaced.
        total = F.cross_entropy(logits, target.long(), weight=weight, ignore_index=ignore_index,
                                reduction="sum", label_smoothing=label_smoothing)
        return total / weights.sum().clamp_min(TINY)
    return pixel_log_prob_loss(logits, safe_target, weights)


class CrossEntropyLoss(SegmentationLoss):
    """Softmax cross-entropy, the weighted mean over non-ignored pixels.

    Formula: ``L = sum_i w[y_i] (-log p_{i,y_i}) / sum_i w[y_i]``, ``p = softmax(logits)`` over the class
    dimension, ``w`` the class weights (all 1 when ``weight`` is None), ``i`` over the non-ignored pixels of the
    whole batch. Scaling ``w`` does not change the loss (torch's ``reduction="mean"`` convention).

    Args:
        weight: class weights ``(C,)`` (None, a list or a tensor); kept as a non-persistent buffer.
        ignore_index: label of pixels that count nowhere (neither numerator nor denominator).
        label_smoothing: ``eps`` in [0, 1], torch's convention: the target distribution is
            ``(1 - eps) onehot(y) + eps / C``, so a pixel contributes ``(1 - eps) w[y] (-log p_y) +
            (eps / C) sum_c w_c (-log p_c)``; the denominator stays ``sum_i w[y_i]``.

    Classes absent from the target only enter through the softmax normaliser. A batch whose pixels are all
    ignored gives 0 with a gradient graph (never NaN). Computed in float32 with autocast disabled.
    Shapes: logits ``(N, C, H, W)``, target ``(N, H, W)`` integer; returns a scalar.
    """

    binary = False
    takes_class_weights = True
    repr_fields = ("ignore_index", "label_smoothing")

    def __init__(self, weight=None, ignore_index: int = 255, label_smoothing: float = 0.0):
        super().__init__(ignore_index=ignore_index, weight=weight)
        self.label_smoothing = check_number(self.owner, "label_smoothing", label_smoothing, low=0.0, high=1.0)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        self.check_inputs(logits, target)
        return cross_entropy(logits, target, self.weight, self.ignore_index, self.label_smoothing)


def log_prior(prior, floor: float) -> Tensor:
    """``log(max(pi_c, floor))`` of a class prior ``(C,)`` (pixel shares; not renormalised: a constant shift of
    every logit leaves the softmax unchanged). Raises ValueError when the prior is not finite and >= 0."""
    prior = torch.as_tensor(prior, dtype=torch.float64).reshape(-1)
    if prior.numel() == 0 or not bool(torch.isfinite(prior).all()) or bool((prior < 0).any()):
        raise ValueError(f"LogitAdjustedLoss: prior must be finite and >= 0 per class, got {prior.tolist()}")
    return prior.clamp_min(floor).log().float()


class LogitAdjustedLoss(SegmentationLoss):
    """Logit-adjusted cross-entropy: cross-entropy on ``logits + tau * log(prior)``.

    Menon et al., "Long-tail learning via logit adjustment", ICLR 2021 (the logit-adjusted loss, eq. 10); with
    ``tau = 1`` it is the Balanced Softmax of Ren et al., "Balanced Meta-Softmax for Long-Tailed Visual
    Recognition", NeurIPS 2020. Formula: ``L = sum_i w[y_i] (-log q_{i,y_i}) / sum_i w[y_i]`` with ``q =
    softmax(z_i + tau * log pi)``, ``z`` the logits, ``pi_c`` the prior of class ``c`` (the builder injects the
    training split's pixel shares), ``w`` the class weights, ``i`` over the non-ignored pixels. A frequent class
    gets a head start in training, so the model's raw logits (what prediction uses) learn to favour rare classes.

    Args:
        prior: ``(C,)`` class prior, >= 0 (None: uniform, i.e. plain cross-entropy); kept as ``log(max(pi,
            prior_floor))`` in the non-persistent buffer ``log_prior``.
        tau: adjustment strength >= 0; ``tau = 0`` is exactly ``CrossEntropyLoss``.
        prior_floor: the share given to a class with no training pixels (> 0; ``log 0`` is ``-inf``).
        weight, ignore_index, label_smoothing: as for ``CrossEntropyLoss``, applied to the shifted logits.
    Shapes: logits ``(N, C, H, W)``, target ``(N, H, W)``; a scalar in float32 (autocast disabled).
    """

    binary = False
    takes_class_weights = True
    takes_class_prior = True
    repr_fields = ("ignore_index", "tau", "prior_floor", "label_smoothing")

    def __init__(self, prior=None, tau: float = 1.0, prior_floor: float = 1e-6, weight=None,
                 ignore_index: int = 255, label_smoothing: float = 0.0):
        super().__init__(ignore_index=ignore_index, weight=weight)
        self.tau = check_number(self.owner, "tau", tau, low=0.0)
        self.label_smoothing = check_number(self.owner, "label_smoothing", label_smoothing, low=0.0, high=1.0)
        self.prior_floor = check_number(self.owner, "prior_floor", prior_floor, low=0.0, low_open=True)
        vector = None if prior is None else log_prior(prior, self.prior_floor)
        self.register_buffer("log_prior", vector, persistent=False)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        vectors = {} if self.log_prior is None else {"prior": self.log_prior}
        self.check_inputs(logits, target, **vectors)
        return logit_adjusted_cross_entropy(logits, target, self.log_prior, self.tau, self.weight,
                                            self.ignore_index, self.label_smoothing)


@float32_math
def logit_adjusted_cross_entropy(logits: Tensor, target: Tensor, log_prior: Tensor | None, tau: float,
                                 weight: Tensor | None = None, ignore_index: int = 255,
                                 label_smoothing: float = 0.0) -> Tensor:
    """``cross_entropy`` of ``logits + tau * log_prior`` (one value per class; None or ``tau = 0``: none)."""
    if log_prior is not None and tau != 0:
        logits = logits + (tau * float32_on(log_prior, logits)).view(1, -1, *([1] * (logits.dim() - 2)))
    return cross_entropy(logits, target, weight, ignore_index, label_smoothing)
