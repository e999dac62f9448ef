"""Lovasz-softmax loss (Berman, Triki & Blaschko 2018): every class at once, one sort of integer keys.

``lovasz_softmax`` is the functional form (an autograd Function with a sparse fused backward),
``LovaszSoftmaxLoss`` the module. Conventions: ``train_seg.losses.base``.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from .base import SegmentationLoss, check_choice, class_counts, float32_math, split_target

__all__ = ["LovaszSoftmaxLoss", "lovasz_class_selection", "lovasz_softmax"]


# float32 bit pattern of 1.0: non-negative float32 values sort like their int32 bit patterns.
_ONE_BITS = 0x3F800000


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


class LovaszSoftmaxLoss(SegmentationLoss):
    """Lovasz-softmax: a convex surrogate of the per-class Jaccard (IoU) loss, over the whole batch.

    Formula (Berman's ``lovasz_softmax_flat``, ``per_image=False``): ``p = softmax(logits)``; for class ``c``
    the errors of the non-ignored pixels are ``e_i = 1 - p_ic`` if ``y_i = c`` else ``p_ic``; sorted by
    decreasing error, ``L_c = sum_k e_(k) g_k`` with ``g`` the increments of the Jaccard loss of the top-k set
    (``lovasz_grad``). ``L`` is the plain mean of ``L_c`` over the selected classes (no class weights).

    Args:
        ignore_index: label of pixels that count nowhere (they are not sorted at all).
        classes: ``"present"`` (default): the classes present in the (non-ignored) target; ``"all"``: every
            class, where an absent class scores its largest predicted probability (Berman's ``lovasz_grad``
            of an empty foreground is ``[1, 0, ...]``); or a list of class indices.

    No smoothing. No selected class (e.g. every pixel ignored) gives 0 with a gradient graph. Computed in
    float32 with autocast disabled; one sort of integer (class, error) keys for all classes, exact up to the
    float32 order of the errors, with background pixels that cannot contribute dropped before the sort.
    Shapes: logits ``(N, C, H, W)``, target ``(N, H, W)`` integer; returns a scalar.
    """

    binary = False
    takes_class_weights = False  # a plain mean over the selected classes
    repr_fields = ("ignore_index", "classes")

    def __init__(self, ignore_index: int = 255, classes="present"):
        super().__init__(ignore_index=ignore_index)
        name = self.owner
        if isinstance(classes, str):
            classes = check_choice(name, "classes", classes, ("present", "all"))
        else:
            try:
                indices = list(classes)
            except TypeError:
                indices = None
            if (not indices or any(isinstance(c, bool) or not isinstance(c, numbers.Integral) or c < 0
                                   for c in indices)):
                raise ValueError(f"{name}: classes must be 'present', 'all' or a non-empty list of class "
                                 f"indices >= 0, got {classes!r}")
            classes = tuple(int(c) for c in indices)
        self.classes = classes

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        self.check_inputs(logits, target)
        if isinstance(self.classes, tuple) and max(self.classes) >= logits.shape[1]:
            raise ValueError(f"{self.owner}: classes {list(self.classes)} out of range for logits "
                             f"{tuple(logits.shape)} with C={logits.shape[1]}")
        return lovasz_softmax(logits, target, self.ignore_index, self.classes)
