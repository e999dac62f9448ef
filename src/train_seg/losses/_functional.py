"""Loss math of :mod:`train_seg.losses`: every formula written once, vectorised, in float32.

The ``nn.Module`` classes validate their arguments and call the functions below. Conventions shared by all:

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

import contextlib
import functools
import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor

# Denominators of weighted means are clamped to this: 0 / TINY = 0 for an empty (all ignored) batch.
TINY = 1e-12
# float32 bit pattern of 1.0: non-negative float32 values sort like their int32 bit patterns.
_ONE_BITS = 0x3F800000
ABSENT_MODES = ("include", "mask")
GDL_WEIGHT_TYPES = ("square", "simple", "uniform")


# -- argument validation (constructors) -------------------------------------------------------------------------
def check_ignore_index(owner: str, ignore_index) -> int:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise ValueError(f"{owner}: ignore_index must be an int, got {ignore_index!r}")
    return int(ignore_index)


def check_number(owner: str, name: str, value, *, low=None, high=None, low_open=False, high_open=False) -> float:
    """``value`` as a finite float inside ``[low, high]`` (ends open when asked), else a ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{owner}: {name} must be a finite number, got {value!r}")
    value = float(value)
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"{owner}: {name} must be {'>' if low_open else '>='} {low:g}, got {value:g}")
    if high is not None and (value > high or (high_open and value == high)):
        raise ValueError(f"{owner}: {name} must be {'<' if high_open else '<='} {high:g}, got {value:g}")
    return value


def check_choice(owner: str, name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{owner}: {name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def as_class_vector(owner: str, name: str, values, length: int | None = None) -> Tensor | None:
    """``None`` or a 1-D float32 tensor of finite, non-negative values, not all zero (a class-weight vector).

    Accepts a list, tuple, numpy array or tensor; ``length`` (if given) is the required number of entries.
    """
    if values is None:
        return None
    try:
        vector = torch.as_tensor(values, dtype=torch.float32).detach().clone()
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{owner}: {name} must be None, a list or a 1-D tensor of numbers, got {values!r}") from exc
    if vector.dim() != 1 or vector.numel() == 0:
        raise ValueError(f"{owner}: {name} must be a non-empty 1-D sequence, got shape {tuple(vector.shape)}")
    if length is not None and vector.numel() != length:
        raise ValueError(f"{owner}: {name} must have {length} entries, got {vector.numel()}")
    if not torch.isfinite(vector).all() or (vector < 0).any():
        raise ValueError(f"{owner}: {name} must be finite and >= 0, got {vector.tolist()}")
    if not (vector > 0).any():
        raise ValueError(f"{owner}: {name} must have at least one positive entry, got {vector.tolist()}")
    return vector


# -- input validation (forward) -----------------------------------------------------------------------------------
def check_inputs(owner: str, logits: Tensor, target: Tensor, *, binary: bool = False, **class_vectors) -> None:
    """Shape and dtype checks of ``forward(logits, target)``; ``class_vectors`` (name -> tensor or None) must
    have one entry per class (two, ``[background, foreground]``, for binary losses). Never syncs the device."""
    if not isinstance(logits, Tensor) or not isinstance(target, Tensor):
        raise ValueError(f"{owner}: logits and target must be tensors, got {type(logits).__name__} "
                         f"and {type(target).__name__}")
    if logits.dim() != 4:
        raise ValueError(f"{owner}: logits must be 4-D (N, C, H, W), got shape {tuple(logits.shape)}")
    if target.dim() != 3:
        raise ValueError(f"{owner}: target must be 3-D (N, H, W), got shape {tuple(target.shape)}")
    if logits.shape[0] != target.shape[0] or logits.shape[2:] != target.shape[1:]:
        raise ValueError(f"{owner}: logits {tuple(logits.shape)} and target {tuple(target.shape)} must agree on "
                         "N, H, W")
    if not logits.is_floating_point():
        raise ValueError(f"{owner}: logits must be floating point, got {logits.dtype}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise ValueError(f"{owner}: target must hold integer class labels, got {target.dtype}")
    classes = logits.shape[1]
    if binary and classes != 1:
        raise ValueError(f"{owner}: binary losses take one-channel logits (N, 1, H, W), got shape "
                         f"{tuple(logits.shape)}; use a multi-class loss for {classes} classes")
    if classes == 0:
        raise ValueError(f"{owner}: logits have no class channel, shape {tuple(logits.shape)}")
    expected = 2 if binary else classes
    for name, vector in class_vectors.items():
        if vector is not None and vector.numel() != expected:
            what = "2 entries [background, foreground]" if binary else f"one entry per class (C={classes})"
            raise ValueError(f"{owner}: {name} has {vector.numel()} entries but needs {what}; logits "
                             f"{tuple(logits.shape)}")


# -- shared helpers ------------------------------------------------------------------------------------------------
def _autocast_off(device_type: str):
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def float32_math(fn):
    """Runs ``fn(logits, target, ...)`` with autocast disabled and float32 logits (see the module docstring)."""
    @functools.wraps(fn)
    def wrapper(logits: Tensor, target: Tensor, *args, **kwargs):
        with _autocast_off(logits.device.type):
            return fn(logits.float(), target, *args, **kwargs)
    return wrapper


def split_target(target: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """``(safe_target, valid)``: int64 labels with ignored pixels set to 0 (safe to gather), and the bool mask
    of non-ignored pixels."""
    target = target.long()
    valid = target != ignore_index
    return target.masked_fill(~valid, 0), valid


def _on(vector: Tensor | None, like: Tensor) -> Tensor | None:
    return None if vector is None else vector.to(device=like.device, dtype=torch.float32)


def pixel_weights(safe_target: Tensor, valid: Tensor, weight: Tensor | None) -> Tensor:
    """Per-pixel weight ``w[y_i]`` (1 without class weights), 0 at ignored pixels; float32, shape of target."""
    if weight is None:
        return valid.float()
    return weight[safe_target] * valid


def weighted_pixel_mean(pixel_loss: Tensor, weights: Tensor) -> Tensor:
    """``sum_i w_i l_i / sum_i w_i``, 0 (with a gradient graph) if all ``w_i = 0``."""
    return (pixel_loss * weights).sum() / weights.sum().clamp_min(TINY)


def class_counts(safe_target: Tensor, valid: Tensor, num_classes: int) -> Tensor:
    """``G_c``: int64 number of non-ignored pixels of each class (exact, unlike float32 atomics past 2**24)."""
    labels = safe_target.masked_fill(~valid, num_classes).flatten()
    return torch.bincount(labels, minlength=num_classes + 1)[:num_classes]


def safe_pow(base: Tensor, exponent: float) -> Tensor:
    """``base ** exponent`` for ``base >= 0``, with a finite gradient at 0 even for ``exponent < 1``: values at or
    below 1e-12 give exactly 0 (and no gradient)."""
    return torch.where(base > TINY, base.clamp_min(TINY).pow(exponent), torch.zeros_like(base))


# -- pixel losses of the target-class log-probability (CE, focal, OHEM) -----------------------------------------
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


# -- per-class soft statistics (Dice, Tversky, generalized Dice) ---------------------------------------------------
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
        with _autocast_off(probs.device.type):  # backward may run inside autocast: keep the matmul in float32
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
    return class_weighted_mean(per_class, counts, _on(weight, logits), absent)


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
    return class_weighted_mean(per_class, counts, _on(weight, logits), absent)


def generalized_dice_weights(counts: Tensor, weight_type: str, absent: str) -> Tensor:
    """Sudre's class weights ``1/G_c^2`` (square), ``1/G_c`` (simple) or 1 (uniform), normalised to sum 1.

    An absent class (``G_c = 0``) would get ``1/0``: with ``absent="include"`` it gets the largest weight of
    the present classes (as MONAI does), so predicting it is penalised like missing the rarest present class;
    with ``absent="mask"`` it gets 0. No class present: all weights 0 (the loss is then 0).
    """
    present = counts > 0
    if weight_type == "uniform":
        raw = torch.ones_like(counts)
    else:
        power = 2.0 if weight_type == "square" else 1.0
        raw = torch.where(present, counts.clamp_min(1.0).pow(-power), torch.zeros_like(counts))
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


# -- Lovasz-softmax --------------------------------------------------------------------------------------------------
def lovasz_class_selection(classes, counts: Tensor) -> Tensor:
    """Bool mask of the classes averaged by the Lovasz loss: present ones, all, or an explicit list."""
    if classes == "present":
        return counts > 0
    selected = torch.zeros_like(counts, dtype=torch.bool)
    if classes == "all":
        return ~selected
    index = torch.as_tensor(list(classes), dtype=torch.long, device=counts.device)
    return selected.index_fill_(0, index, True)


def _lovasz_sorted_grad(fg: Tensor, segment_sizes: Tensor, fg_per_class: Tensor) -> tuple[Tensor, Tensor]:
    """Berman's ``lovasz_grad`` for every class at once, in closed form (no cancellation): ``(grad, class)``.

    ``fg``: foreground flag of the kept elements sorted by class, then by decreasing error; ``segment_sizes``:
    number of kept elements of each class, of which ``fg_per_class`` are foreground. Within a class with ``G``
    foreground pixels, let ``f``/``b`` count the foreground/background elements before the current one. The
    Jaccard loss of the top-k set is ``J = (f + b) / (G + b)``, so its increment is ``1 / (G + b)`` for a
    foreground element and ``(G - f) / ((G + b)(G + b + 1))`` for a background one; for ``G = 0`` it is 1 for the
    first element and 0 after (``J = 1`` as soon as anything is predicted). Counts are int32 (exact).
    """
    device, size = fg.device, fg.numel()
    cls = torch.repeat_interleave(torch.arange(segment_sizes.numel(), dtype=torch.int32, device=device),
                                  segment_sizes, output_size=size)
    seg_start = (torch.cumsum(segment_sizes, 0) - segment_sizes).to(torch.int32)
    fg_start = (torch.cumsum(fg_per_class, 0) - fg_per_class).to(torch.int32)
    fg_int = fg.to(torch.int32)
    f = torch.cumsum(fg_int, 0, dtype=torch.int32).sub_(fg_int).sub_(fg_start.index_select(0, cls))
    b = torch.arange(size, dtype=torch.int32, device=device).sub_(seg_start.index_select(0, cls)).sub_(f)
    g = fg_per_class.to(torch.float32).index_select(0, cls)
    g_plus_b = b.to(torch.float32).add_(g).clamp_min_(1.0)
    background_grad = (g - f).div_(g_plus_b * (g_plus_b + 1.0))
    grad = torch.where(fg, g_plus_b.reciprocal_(), background_grad)
    # a class without foreground (only kept when selected and absent): 1 for its first element, 0 after
    first_of_empty = seg_start[(fg_per_class == 0) & (segment_sizes > 0)].long()
    grad.index_fill_(0, first_of_empty, 1.0)
    return grad, cls


class _LovaszSoftmax(torch.autograd.Function):
    """Per-class Lovasz-softmax losses ``(C,)`` for all classes at once, with a sparse fused backward.

    Forward: errors ``e_ic = |[y_i = c] - p_ic|`` of the valid pixels; one sort of int64 keys
    ``class << 32 | order bits of e << 1 | background bit`` (non-negative float32 values sort like their bit
    patterns, so the order is exact, and the sorted keys give back class, error and foreground flag);
    closed-form ``lovasz_grad``; ``L_c = sum_k e_(k) g_k``.
    Exact pruning before the sort: a background element whose error is below the smallest foreground error of
    its class sorts after all of that class's foreground, where the Jaccard increment is 0, so it is dropped
    (with random logits almost all background is dropped; a confident model keeps most). An absent selected
    class keeps only its largest errors (ties), whose increment is 1 for the first. Index bookkeeping is int32
    when the logits have fewer than 2**31 elements (large fresh int64 buffers are slow on CPU).
    Backward: with ``d_k = dL/dp`` at the kept elements (sparse), the softmax backward
    ``p_ic (d_ic - sum_c' p_ic' d_ic')`` is one in-place pass over the saved probabilities plus two scatters.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, safe_target: Tensor, valid: Tensor, selected: Tensor, counts: Tensor):
        n, c, h, w = logits.shape
        hw = h * w
        probs = torch.softmax(logits, dim=1)
        index = safe_target.unsqueeze(1)
        valid_map = valid.unsqueeze(1)
        # background threshold per class: the smallest foreground error (errors of background are probabilities)
        fg_error = (1.0 - probs.gather(1, index)).masked_fill_(~valid_map, math.inf)
        threshold = torch.full((c,), math.inf, device=logits.device)
        threshold.scatter_reduce_(0, safe_target.view(-1), fg_error.view(-1), reduce="amin")
        present = counts > 0
        if bool((selected & ~present).any()):
            largest = probs.masked_fill(~valid_map, -1.0).amax(dim=(0, 2, 3))
            threshold = torch.where(present, threshold, torch.nextafter(largest, torch.zeros_like(largest)))
        threshold = torch.where(selected, threshold, torch.full_like(threshold, math.inf))
        kept = (probs > threshold.view(1, c, 1, 1)).logical_and_(valid_map)
        kept.scatter_(1, index, valid_map)  # every valid pixel is kept for its own class
        flat = kept.view(-1).nonzero().squeeze(1)  # ascending in (N, C, H, W) order
        del kept
        flat = flat.to(torch.int32) if probs.numel() < 2**31 else flat
        image_class = torch.div(flat, hw, rounding_mode="floor")  # image * C + class
        cls = image_class % c
        pixel = torch.div(image_class, c, rounding_mode="floor").mul_(hw).add_(flat - image_class * hw)
        del image_class
        is_fg = safe_target.to(cls.dtype).view(-1).index_select(0, pixel) == cls
        kept_prob = probs.view(-1).index_select(0, flat)
        errors = torch.where(is_fg, 1.0 - kept_prob, kept_prob).clamp_min_(0.0)
        # key = class << 32 | (bits(1.0) - bits(error)) << 1 | background: ascending = by class, error descending
        key = cls.to(torch.int64).mul_(1 << 31)
        key.add_(_ONE_BITS - errors.view(torch.int32)).mul_(2).add_(~is_fg)
        del errors
        sorted_key, order = torch.sort(key, stable=True)
        del key
        low = sorted_key.to(torch.int32)  # the low 32 bits: error order bits and background bit
        del sorted_key
        sorted_errors = (_ONE_BITS - (low >> 1)).view(torch.float32)
        segment_sizes = torch.bincount(cls, minlength=c)
        grad_sorted, sorted_cls = _lovasz_sorted_grad((low & 1) == 0, segment_sizes, counts)
        per_class = torch.zeros(c, dtype=torch.float64, device=logits.device)
        per_class.index_add_(0, sorted_cls, sorted_errors.mul_(grad_sorted).double())
        # d L_c / d p at each kept element, back in (N, C, H, W) order: +g for background, -g for foreground
        prob_dloss = torch.empty_like(grad_sorted).scatter_(0, order, grad_sorted)
        prob_dloss.mul_(kept_prob).mul_(1.0 - 2.0 * is_fg)
        ctx.save_for_backward(logits, cls, pixel, flat, prob_dloss)
        ctx.probs = probs  # becomes the gradient in place; see backward
        return per_class.float()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_per_class: Tensor):
        logits, cls, pixel, flat, prob_dloss = ctx.saved_tensors
        probs, ctx.probs = ctx.probs, None
        if probs is None:  # a second backward (retain_graph=True): the buffer was consumed, recompute
            probs = torch.softmax(logits, dim=1)
        n, c, h, w = probs.shape
        prob_grad = grad_per_class.index_select(0, cls).mul_(prob_dloss)  # p_k * dL/dp_k
        row_sum = torch.zeros(n * h * w, dtype=probs.dtype, device=probs.device).index_add_(0, pixel, prob_grad)
        grad_logits = probs.mul_(-row_sum.view(n, 1, h, w))
        grad_logits.view(-1).index_add_(0, flat, prob_grad)
        return grad_logits, None, None, None, None


@float32_math
def lovasz_softmax(logits: Tensor, target: Tensor, ignore_index: int = 255, classes="present") -> Tensor:
    """Mean over the selected classes of the Lovasz extension of the Jaccard loss; see LovaszSoftmaxLoss."""
    safe_target, valid = split_target(target, ignore_index)
    counts = class_counts(safe_target, valid, logits.shape[1])
    selected = lovasz_class_selection(classes, counts)
    per_class = _LovaszSoftmax.apply(logits.contiguous(), safe_target, valid, selected, counts)
    return (per_class * selected).sum() / selected.sum().clamp_min(1)


# -- binary (one-channel) losses ------------------------------------------------------------------------------------
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
