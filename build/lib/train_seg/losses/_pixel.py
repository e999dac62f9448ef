"""Pixel losses of the target-class log-probability: cross-entropy, softmax focal loss, OHEM cross-entropy.

All three are the weighted pixel mean ``sum_i s_i w[y_i] (1 - p_i)^gamma (-log p_i) / sum_i w[y_i]`` over
non-ignored pixels ``i`` (``p_i = softmax(logits)_{i, y_i}``, ``s`` a numerator-only scale such as focal alpha,
``gamma = 0`` for cross-entropy), computed by one autograd Function with a fused backward; OHEM restricts the
pixels to the hard ones. Conventions: :mod:`train_seg.losses._functional`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import TINY, _on, float32_math, pixel_weights, split_target

__all__ = ["pixel_log_prob_loss", "cross_entropy", "focal_alpha_vector", "focal_loss", "ohem_cross_entropy"]


class _PixelLogProbLoss(torch.autograd.Function):
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


def _focal_terms(log_p: Tensor, gamma: float, numerator_weights: Tensor, denominator: Tensor):
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
    return _PixelLogProbLoss.apply(logits, safe_target,
                                   lambda log_p: _focal_terms(log_p, gamma, numerator_weights, denominator))


@float32_math
def cross_entropy(logits: Tensor, target: Tensor, weight: Tensor | None = None, ignore_index: int = 255,
                  label_smoothing: float = 0.0) -> Tensor:
    """Weighted-mean cross-entropy ``sum_i w[y_i] (-log p_{i,y_i}) / sum_i w[y_i]`` over non-ignored pixels.

    With ``label_smoothing = eps`` the per-pixel loss is torch's: ``(1 - eps) w[y] (-log p_y) +
    (eps / C) sum_c w_c (-log p_c)``, divided by the same ``sum_i w[y_i]``.
    """
    weight = _on(weight, logits)
    safe_target, valid = split_target(target, ignore_index)
    weights = pixel_weights(safe_target, valid, weight)
    if label_smoothing > 0:
        # torch computes the smoothed numerator exactly as documented above; only its mean is replaced.
        total = F.cross_entropy(logits, target.long(), weight=weight, ignore_index=ignore_index,
                                reduction="sum", label_smoothing=label_smoothing)
        return total / weights.sum().clamp_min(TINY)
    return pixel_log_prob_loss(logits, safe_target, weights)


def focal_alpha_vector(alpha, num_classes: int, like: Tensor) -> Tensor | None:
    """Per-class focal alpha: a scalar is ``[1 - alpha, alpha, ..., alpha]`` (binary convention: alpha for
    the classes >= 1), a vector is used as given, ``None`` stays ``None``."""
    if alpha is None:
        return None
    if isinstance(alpha, Tensor):
        return _on(alpha, like)
    vector = like.new_full((num_classes,), float(alpha), dtype=torch.float32)
    vector[0] = 1.0 - float(alpha)
    return vector


@float32_math
def focal_loss(logits: Tensor, target: Tensor, gamma: float = 2.0, alpha=None, weight: Tensor | None = None,
               ignore_index: int = 255) -> Tensor:
    """Softmax focal loss ``sum_i a[y_i] w[y_i] (1 - p_y)^gamma (-log p_y) / sum_i w[y_i]`` (see FocalLoss)."""
    weight = _on(weight, logits)
    safe_target, valid = split_target(target, ignore_index)
    alpha = focal_alpha_vector(alpha, logits.shape[1], logits)
    scale = None if alpha is None else alpha[safe_target]
    return pixel_log_prob_loss(logits, safe_target, pixel_weights(safe_target, valid, weight), gamma, scale)


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
    weight = _on(weight, logits)
    safe_target, valid = split_target(target, ignore_index)

    def terms(log_p: Tensor):
        kept = _ohem_keep(log_p, valid, thresh, min_kept)
        weights = pixel_weights(safe_target, kept, weight)
        return _focal_terms(log_p, 0.0, weights, weights.sum().clamp_min(TINY))

    return _PixelLogProbLoss.apply(logits, safe_target, terms)
