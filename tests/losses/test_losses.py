"""Losses of train_seg.losses against independent computations, analytic values and invariants.

References here are written differently from the library on purpose: explicit loops over the pixels of tiny
tensors, dense one-hot sums, Berman's per-class ``lovasz_grad`` loop, torch / torchvision functions, float64.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import hydra.utils
import pytest
import torch
import torch.nn.functional as F
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

import train_seg.losses as L
from train_seg.losses.dice import ABSENT_MODES, GDL_WEIGHT_TYPES, generalized_dice_weights
from train_seg.losses.base import SegmentationLoss

IGNORE = 255
ROOT = Path(__file__).resolve().parents[2]
LOSS_CONFIGS = sorted((ROOT / "src" / "train_seg" / "configs" / "loss").glob("*.yaml"))

W3 = [0.5, 1.0, 2.0]  # class weights for the 3-class losses below
MULTICLASS = {  # name -> factory of a 3-class loss
    "ce": lambda: L.CrossEntropyLoss(),
    "ce_smooth_weighted": lambda: L.CrossEntropyLoss(label_smoothing=0.1, weight=W3),
    "logit_adjusted_weighted": lambda: L.LogitAdjustedLoss(prior=[0.85, 0.1, 0.05], weight=W3),
    "focal": lambda: L.FocalLoss(gamma=2.0),
    "focal_alpha_weighted": lambda: L.FocalLoss(gamma=0.5, alpha=0.25, weight=W3),
    "dice": lambda: L.DiceLoss(),
    "dice_log_mask_weighted": lambda: L.DiceLoss(log_loss=True, absent="mask", weight=W3),
    "gdl": lambda: L.GeneralizedDiceLoss(),
    "tversky": lambda: L.TverskyLoss(alpha=0.3, beta=0.7),
    "focal_tversky_weighted": lambda: L.TverskyLoss(alpha=0.3, beta=0.7, gamma=0.75, weight=W3),
    "lovasz": lambda: L.LovaszSoftmaxLoss(),
    "lovasz_all": lambda: L.LovaszSoftmaxLoss(classes="all"),
    "ohem_weighted": lambda: L.OhemCrossEntropyLoss(thresh=0.7, min_kept=10, weight=W3),
    "combo": lambda: L.WeightedSum({"ce": L.CrossEntropyLoss(weight=W3), "dice": L.DiceLoss()}, {"dice": 0.5}),
}
BINARY = {  # name -> factory of a one-channel loss
    "bce": lambda: L.BCEWithLogitsLoss(),
    "bce_pos_weighted": lambda: L.BCEWithLogitsLoss(pos_weight=3.0, weight=[0.3, 3.0]),
    "sigmoid_focal_weighted": lambda: L.SigmoidFocalLoss(weight=[0.3, 3.0]),
    "binary_dice": lambda: L.BinaryDiceLoss(),
    "binary_dice_weighted": lambda: L.BinaryDiceLoss(weight=[0.3, 3.0]),
}


# -- inputs ----------------------------------------------------------------------------------------------------------
def batch(n=2, c=3, h=4, w=5, seed=0, ignore_frac=0.2, absent=(), scale=2.0):
    """Random logits (n, c, h, w) and target with ~ignore_frac ignored pixels; classes in ``absent`` never occur."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, h, w, generator=gen) * scale
    present = [k for k in range(c) if k not in absent]
    target = torch.tensor(present)[torch.randint(0, len(present), (n, h, w), generator=gen)]
    target[torch.rand(n, h, w, generator=gen) < ignore_frac] = IGNORE
    return logits, target


def binary_batch(n=2, h=4, w=5, seed=0, ignore_frac=0.2):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, 1, h, w, generator=gen) * 2
    target = torch.randint(0, 2, (n, h, w), generator=gen)
    target[torch.rand(n, h, w, generator=gen) < ignore_frac] = IGNORE
    return logits, target


def logits_of(probs) -> torch.Tensor:
    """Logits whose softmax over dim 1 is ``probs`` (given as [image][pixel-row][pixel-col][class])."""
    return torch.tensor(probs, dtype=torch.float64).log().permute(0, 3, 1, 2).float()


def confident(target, c, margin=30.0):
    """Logits predicting ``target`` with probability ~1 (ignored pixels predict class 0)."""
    safe = target.masked_fill(target == IGNORE, 0)
    return F.one_hot(safe, c).permute(0, 3, 1, 2).float() * margin


def grad_of(loss_fn, logits, target):
    x = logits.detach().clone().requires_grad_(True)
    value = loss_fn(x, target)
    value.backward()
    return value.detach(), x.grad


# -- independent references -----------------------------------------------------------------------------------------
def ref_pixel_loss(logits, target, weight=None, gamma=0.0, alpha=None, keep=None):
    """Explicit loop over pixels: sum a[y] w[y] (1 - p_y)^gamma (-log p_y) / sum w[y] (float64)."""
    n, c, h, w = logits.shape
    num = logits.new_zeros((), dtype=torch.float64)
    den = 0.0
    for i in range(n):
        for r in range(h):
            for col in range(w):
                y = int(target[i, r, col])
                if y == IGNORE or (keep is not None and not keep[i, r, col]):
                    continue
                z = logits[i, :, r, col].double()
                log_p = z[y] - torch.logsumexp(z, 0)
                wy = 1.0 if weight is None else float(weight[y])
                a = 1.0 if alpha is None else float(alpha[y])
                num = num + a * wy * (1 - log_p.exp()) ** gamma * -log_p
                den += wy
    return num / den if den > 0 else num * 0


def ref_region_stats(logits, target):
    """Dense one-hot sums (float64): I, P, G per class over the non-ignored pixels."""
    c = logits.shape[1]
    valid = (target != IGNORE).unsqueeze(1).double()
    onehot = F.one_hot(target.masked_fill(target == IGNORE, 0), c).permute(0, 3, 1, 2).double() * valid
    probs = torch.softmax(logits.double(), 1) * valid
    return (probs * onehot).sum((0, 2, 3)), probs.sum((0, 2, 3)), onehot.sum((0, 2, 3))


def ref_dice(logits, target, weight=None, smooth=1.0, absent="include", log_loss=False):
    inter, psum, count = ref_region_stats(logits, target)
    dice = (2 * inter + smooth) / (psum + count + smooth)
    per_class = -dice.log() if log_loss else 1 - dice
    w = torch.ones_like(per_class) if weight is None else torch.as_tensor(weight).double()
    if absent == "mask":
        w = w * (count > 0)
    return (w * per_class).sum() / w.sum()


def ref_tversky(logits, target, alpha, beta, gamma=1.0, weight=None, smooth=1.0):
    inter, psum, count = ref_region_stats(logits, target)
    index = (inter + smooth) / (inter + alpha * (psum - inter) + beta * (count - inter) + smooth)
    per_class = (1 - index) ** gamma
    w = torch.ones_like(per_class) if weight is None else torch.as_tensor(weight).double()
    return (w * per_class).sum() / w.sum()


def ref_gdl(logits, target, smooth=1.0, weight_type="square"):
    inter, psum, count = ref_region_stats(logits, target)
    power = {"square": 2, "simple": 1, "uniform": 0}[weight_type]
    w = [1.0 / float(g) ** power if g > 0 else None for g in count]
    largest = max(x for x in w if x is not None)
    w = torch.tensor([largest if x is None else x for x in w], dtype=torch.float64)
    w = w / w.sum()
    return 1 - (2 * (w * inter).sum() + smooth) / ((w * (psum + count)).sum() + smooth)


def berman_lovasz_grad(gt_sorted):
    """Berman et al.'s reference ``lovasz_grad`` (lovasz_losses.py)."""
    gts = gt_sorted.sum()
    intersection = gts - gt_sorted.cumsum(0)
    union = gts + (1 - gt_sorted).cumsum(0)
    jaccard = 1.0 - intersection / union
    if len(gt_sorted) > 1:
        jaccard[1:] = jaccard[1:] - jaccard[:-1]
    return jaccard


def ref_lovasz(logits, target, classes="present"):
    """Berman's ``lovasz_softmax_flat``: a loop over classes, one sort each (float64)."""
    c = logits.shape[1]
    probs = torch.softmax(logits.double(), 1).permute(0, 2, 3, 1).reshape(-1, c)
    labels = target.flatten()
    keep = labels != IGNORE
    probs, labels = probs[keep], labels[keep]
    if probs.numel() == 0:
        return probs.sum() * 0
    losses = []
    for k in (range(c) if classes in ("all", "present") else classes):
        fg = (labels == k).double()
        if classes == "present" and fg.sum() == 0:
            continue
        errors = (fg - probs[:, k]).abs()
        errors_sorted, perm = torch.sort(errors, 0, descending=True)
        losses.append(torch.dot(errors_sorted, berman_lovasz_grad(fg[perm])))
    return torch.stack(losses).mean() if losses else probs.sum() * 0


def ref_ohem_keep(logits, target, thresh, min_kept):
    """Sort-based OHEM selection: p < thresh, or p <= the min_kept-th smallest valid p."""
    probs = torch.softmax(logits.double(), 1)
    valid = target != IGNORE
    p = probs.gather(1, target.masked_fill(~valid, 0).unsqueeze(1)).squeeze(1)
    keep = (p < thresh) & valid
    values = torch.sort(p[valid]).values
    if min_kept > 0 and values.numel() > 0:
        kth = values[min(min_kept, values.numel()) - 1]
        keep |= (p <= kth) & valid
    return keep


# -- analytic tables -------------------------------------------------------------------------------------------------
# One image, two pixels (1 x 2), C = 2: pixel 0 p = (0.75, 0.25) target 0; pixel 1 p = (0.5, 0.5) target 1.
# Class 0: I = 0.75, P = 1.25, G = 1; class 1: I = 0.5, P = 0.75, G = 1.
TWO_PIXELS = ([[[[0.75, 0.25], [0.5, 0.5]]]], [[[0, 1]]])
# Three pixels (1 x 3), C = 2: p(class 0) = 0.75, 0.5, 0.25, targets 0, 0, 1.
# Class 0: I = 1.25, P = 1.5, G = 2; class 1: I = 0.75, P = 1.5, G = 1.
THREE_PIXELS = ([[[[0.75, 0.25], [0.5, 0.5], [0.25, 0.75]]]], [[[0, 0, 1]]])
# C = 3, class 2 absent: pixel 0 p = (0.5, 0.25, 0.25) target 0; pixel 1 p = (0.25, 0.5, 0.25) target 1.
# Classes 0, 1: I = 0.5, P = 0.75, G = 1; class 2: I = 0, P = 0.5, G = 0.
ABSENT_CLASS = ([[[[0.5, 0.25, 0.25], [0.25, 0.5, 0.25]]]], [[[0, 1]]])

ANALYTIC_CASES = [
    # (id, loss, case, expected)
    ("dice", L.DiceLoss(), TWO_PIXELS, 1 - (2.5 / 3.25 + 2.0 / 2.75) / 2),
    ("dice_smooth0", L.DiceLoss(smooth=0.0), TWO_PIXELS, 1 - (1.5 / 2.25 + 1.0 / 1.75) / 2),
    ("dice_log", L.DiceLoss(log_loss=True), TWO_PIXELS, -(math.log(2.5 / 3.25) + math.log(2.0 / 2.75)) / 2),
    # weights (1, 3): (1 * L_0 + 3 * L_1) / 4
    ("dice_weighted", L.DiceLoss(weight=[1.0, 3.0]), TWO_PIXELS, ((1 - 2.5 / 3.25) + 3 * (1 - 2.0 / 2.75)) / 4),
    # absent class 2: Dice_2 = s / (P_2 + s) = 1 / 1.5 is averaged in, or masked out
    ("dice_absent_include", L.DiceLoss(), ABSENT_CLASS, 1 - (2 / 2.75 + 2 / 2.75 + 1 / 1.5) / 3),
    ("dice_absent_mask", L.DiceLoss(absent="mask"), ABSENT_CLASS, 1 - 2 / 2.75),
    # Tversky alpha = 0.3 (FP), beta = 0.7 (FN): class 0 FP = 0.5, FN = 0.25; class 1 FP = 0.25, FN = 0.5
    ("tversky", L.TverskyLoss(alpha=0.3, beta=0.7), TWO_PIXELS,
     1 - (1.75 / (0.75 + 0.15 + 0.175 + 1) + 1.5 / (0.5 + 0.075 + 0.35 + 1)) / 2),
    ("focal_tversky_g2", L.TverskyLoss(alpha=0.3, beta=0.7, gamma=2.0), TWO_PIXELS,
     ((1 - 1.75 / 2.075) ** 2 + (1 - 1.5 / 1.925) ** 2) / 2),
    # GDL square: G = (1, 1) -> r = (0.5, 0.5); 1 - (2 (0.375 + 0.25) + 1) / (0.5 * 2.25 + 0.5 * 1.75 + 1)
    ("gdl_equal_counts", L.GeneralizedDiceLoss(), TWO_PIXELS, 1 - 2.25 / 3.0),
    # GDL square: G = (2, 1) -> r = (1/4, 1) / 1.25 = (0.2, 0.8); numerator 2 (0.25 + 0.6) + 1 = 2.7,
    # denominator 0.2 * 3.5 + 0.8 * 2.5 + 1 = 3.7
    ("gdl_square", L.GeneralizedDiceLoss(), THREE_PIXELS, 1 - 2.7 / 3.7),
    # GDL simple: r = (1/2, 1) / 1.5 = (1/3, 2/3): numerator 2 (1.25/3 + 1.5/3) + 1, denominator 3.5/3 + 5/3 + 1
    ("gdl_simple", L.GeneralizedDiceLoss(weight_type="simple"), THREE_PIXELS,
     1 - (2 * (1.25 + 1.5) / 3 + 1) / (3.5 / 3 + 5 / 3 + 1)),
    # GDL uniform, class 2 absent gets the largest present weight: r = 1/3 each
    ("gdl_uniform_absent", L.GeneralizedDiceLoss(weight_type="uniform"), ABSENT_CLASS,
     1 - (2 * 1.0 / 3 + 1) / ((1.75 + 1.75 + 0.5) / 3 + 1)),
    # Lovasz: class 0 errors (bg 0.5, fg 0.25) -> grad (1/2, 1/2) -> 0.375; class 1 errors (fg 0.5, bg 0.25)
    # -> grad (1, 0) -> 0.5; mean 0.4375
    ("lovasz", L.LovaszSoftmaxLoss(), TWO_PIXELS, 0.4375),
    # classes="all" with class 2 absent: its loss is its largest probability 0.25. Class 0: errors fg 0.5,
    # bg 0.25 -> grad (1, 0) -> 0.5; class 1 the same -> 0.5; mean (0.5 + 0.5 + 0.25) / 3
    ("lovasz_all", L.LovaszSoftmaxLoss(classes="all"), ABSENT_CLASS, 1.25 / 3),
    ("lovasz_present", L.LovaszSoftmaxLoss(), ABSENT_CLASS, 0.5),
    ("lovasz_list", L.LovaszSoftmaxLoss(classes=[2]), ABSENT_CLASS, 0.25),
    # CE: -(log 0.75 + log 0.5) / 2; weights (1, 3): -(log 0.75 + 3 log 0.5) / 4
    ("ce", L.CrossEntropyLoss(), TWO_PIXELS, -(math.log(0.75) + math.log(0.5)) / 2),
    ("ce_weighted", L.CrossEntropyLoss(weight=[1.0, 3.0]), TWO_PIXELS, -(math.log(0.75) + 3 * math.log(0.5)) / 4),
    # focal gamma 2: -(0.25^2 log 0.75 + 0.5^2 log 0.5) / 2; scalar alpha 0.25: class 0 x 0.75, class 1 x 0.25
    ("focal", L.FocalLoss(gamma=2.0), TWO_PIXELS, -(0.0625 * math.log(0.75) + 0.25 * math.log(0.5)) / 2),
    ("focal_alpha", L.FocalLoss(gamma=2.0, alpha=0.25), TWO_PIXELS,
     -(0.75 * 0.0625 * math.log(0.75) + 0.25 * 0.25 * math.log(0.5)) / 2),
    ("focal_alpha_list", L.FocalLoss(gamma=1.0, alpha=[2.0, 1.0]), TWO_PIXELS,
     -(2 * 0.25 * math.log(0.75) + 0.5 * math.log(0.5)) / 2),
    # OHEM thresh 0.6, min_kept 0: only pixel 1 (p = 0.5) is hard
    ("ohem", L.OhemCrossEntropyLoss(thresh=0.6, min_kept=0), TWO_PIXELS, -math.log(0.5)),
    ("ohem_min_kept", L.OhemCrossEntropyLoss(thresh=0.1, min_kept=1), TWO_PIXELS, -math.log(0.5)),
]


@pytest.mark.parametrize("name, loss, case, expected", ANALYTIC_CASES, ids=[c[0] for c in ANALYTIC_CASES])
def test_analytic_values(name, loss, case, expected):
    probs, target = case
    value = loss(logits_of(probs), torch.tensor(target))
    assert value.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("c", [2, 5])
def test_uniform_logits_ce_and_focal(c):
    # p_y = 1 / C everywhere: CE = log C, focal = (1 - 1/C)^gamma log C
    logits = torch.zeros(2, c, 3, 3)
    target = torch.randint(0, c, (2, 3, 3))
    assert L.CrossEntropyLoss()(logits, target).item() == pytest.approx(math.log(c), rel=1e-6)
    assert L.FocalLoss(gamma=2)(logits, target).item() == pytest.approx((1 - 1 / c) ** 2 * math.log(c), rel=1e-6)


# -- against references ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("weighted", [False, True])
def test_pixel_losses_match_pixel_loop(seed, weighted):
    logits, target = batch(seed=seed, absent=(1,))
    weight = torch.tensor([0.5, 2.0, 1.5]) if weighted else None
    cases = [
        (L.CrossEntropyLoss(weight=weight), {}),
        (L.FocalLoss(gamma=2.0, weight=weight), {"gamma": 2.0}),
        (L.FocalLoss(gamma=0.5, alpha=0.3, weight=weight), {"gamma": 0.5, "alpha": [0.7, 0.3, 0.3]}),
        (L.FocalLoss(gamma=1.0, alpha=[1.0, 0.2, 3.0], weight=weight), {"gamma": 1.0, "alpha": [1.0, 0.2, 3.0]}),
    ]
    for loss, kwargs in cases:
        expected = ref_pixel_loss(logits, target, weight=weight, **kwargs)
        torch.testing.assert_close(loss(logits, target).double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_cross_entropy_matches_torch(smoothing):
    logits, target = batch(c=4, seed=3)
    weight = torch.tensor([1.0, 0.5, 2.0, 3.0])
    for w in (None, weight):
        expected = F.cross_entropy(logits, target, weight=w, ignore_index=IGNORE, label_smoothing=smoothing)
        got = L.CrossEntropyLoss(weight=w, label_smoothing=smoothing)(logits, target)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        g_ref = grad_of(lambda x, y: F.cross_entropy(x, y, weight=w, ignore_index=IGNORE,
                                                     label_smoothing=smoothing), logits, target)[1]
        g_got = grad_of(L.CrossEntropyLoss(weight=w, label_smoothing=smoothing), logits, target)[1]
        torch.testing.assert_close(g_got, g_ref, rtol=1e-5, atol=1e-7)


def ref_logit_adjusted(logits, target, prior, tau, weight=None, floor=1e-6):
    """Menon et al.'s loss written out per pixel in float64: -log(exp(z_y + tau log pi_y) / sum_c exp(z_c + tau
    log pi_c)), weighted by w[y] and divided by the sum of the weights of the non-ignored pixels."""
    n, c, h, w = logits.shape
    numerator = denominator = 0.0
    for b in range(n):
        for i in range(h):
            for j in range(w):
                y = int(target[b, i, j])
                if y == IGNORE:
                    continue
                shifted = [float(logits[b, k, i, j]) + tau * math.log(max(prior[k], floor)) for k in range(c)]
                top = max(shifted)
                log_norm = top + math.log(sum(math.exp(v - top) for v in shifted))
                wy = 1.0 if weight is None else float(weight[y])
                numerator += wy * (log_norm - shifted[y])
                denominator += wy
    return torch.tensor(numerator / max(denominator, 1e-12), dtype=torch.float64)


@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("weighted", [False, True])
def test_logit_adjusted_matches_the_formula_written_out(tau, weighted):
    logits, target = batch(c=4, seed=5)
    prior = [0.8, 0.15, 0.05, 0.0]  # a class without training pixels gets the floor
    weight = torch.tensor([0.5, 1.0, 2.0, 4.0]) if weighted else None
    got = L.LogitAdjustedLoss(prior=prior, tau=tau, weight=weight, ignore_index=IGNORE)(logits, target)
    torch.testing.assert_close(got.double(), ref_logit_adjusted(logits, target, prior, tau, weight), rtol=1e-5,
                               atol=1e-6)
    # its gradient is CE's at the shifted logits: softmax(z + tau log pi) - onehot(y), per pixel (unweighted)
    shift = tau * torch.tensor(prior).clamp_min(1e-6).log().view(1, -1, 1, 1)
    g_ref = grad_of(lambda x, y: F.cross_entropy(x + shift, y, weight=weight, ignore_index=IGNORE), logits, target)[1]
    g_got = grad_of(L.LogitAdjustedLoss(prior=prior, tau=tau, weight=weight), logits, target)[1]
    torch.testing.assert_close(g_got, g_ref, rtol=1e-5, atol=1e-7)


def test_logit_adjusted_with_tau_one_is_balanced_softmax_and_tau_zero_is_ce():
    logits, target = batch(c=3, seed=6, ignore_frac=0.0)
    prior = torch.tensor([0.7, 0.2, 0.1])
    # Balanced Softmax (Ren et al. 2020): -log(pi_y e^{z_y} / sum_c pi_c e^{z_c})
    e = logits.double().exp() * prior.double().view(1, -1, 1, 1)
    balanced = -(e.gather(1, target.unsqueeze(1)).squeeze(1) / e.sum(1)).log().mean()
    torch.testing.assert_close(L.LogitAdjustedLoss(prior=prior, tau=1.0)(logits, target).double(), balanced,
                               rtol=1e-5, atol=1e-6)
    for weight, smoothing in ((None, 0.0), (W3, 0.1)):
        logits, target = batch(c=3, seed=7)
        adjusted = L.LogitAdjustedLoss(prior=prior, tau=0.0, weight=weight, label_smoothing=smoothing)
        assert torch.equal(adjusted(logits, target),
                           L.CrossEntropyLoss(weight=weight, label_smoothing=smoothing)(logits, target))
    assert torch.equal(L.LogitAdjustedLoss()(logits, target), L.CrossEntropyLoss()(logits, target))  # no prior
    # a shift of the prior by a constant factor changes nothing (only ratios enter the softmax)
    torch.testing.assert_close(L.LogitAdjustedLoss(prior=prior * 3)(logits, target),
                               L.LogitAdjustedLoss(prior=prior)(logits, target))
    with pytest.raises(ValueError, match=r"prior has 2 entries .*C=3"):
        L.LogitAdjustedLoss(prior=[0.5, 0.5])(logits, target)


@pytest.mark.parametrize("gamma, alpha", [(2.0, None), (0.5, 0.25), (1.0, [1.0, 0.5, 2.0, 0.1]), (3.0, None)])
def test_focal_gradient_matches_autograd_reference(gamma, alpha):
    """The hand-written slope of the fused pixel loss against autograd through a log-softmax reference."""
    logits, target = batch(c=4, seed=5)
    weight = torch.tensor([1.0, 0.5, 2.0, 3.0])
    alpha_vector = L.FocalLoss(alpha=alpha).alpha_vector if isinstance(alpha, list) else None
    if isinstance(alpha, float):
        alpha_vector = torch.tensor([1 - alpha, alpha, alpha, alpha])

    def reference(x, y):
        valid = y != IGNORE
        safe = y.masked_fill(~valid, 0)
        log_p = torch.log_softmax(x.double(), 1).gather(1, safe.unsqueeze(1)).squeeze(1)
        w = weight[safe] * valid
        a = 1.0 if alpha_vector is None else alpha_vector[safe]
        return (a * (1 - log_p.exp()) ** gamma * -log_p * w).sum() / w.sum()

    value, grad = grad_of(L.FocalLoss(gamma=gamma, alpha=alpha, weight=weight), logits, target)
    ref_value, ref_grad = grad_of(reference, logits, target)
    torch.testing.assert_close(value.double(), ref_value, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-7)


def test_ohem_gradient_matches_autograd_reference():
    logits, target = batch(c=3, h=6, w=6, seed=3, scale=3.0)
    weight = torch.tensor([1.0, 2.0, 0.5])
    keep = ref_ohem_keep(logits, target, 0.6, 10)

    def reference(x, y):
        ce = F.cross_entropy(x, y.masked_fill(~keep, IGNORE), weight=weight, ignore_index=IGNORE, reduction="sum")
        return ce / weight[y.masked_fill(~keep, 0)][keep].sum()

    torch.testing.assert_close(grad_of(L.OhemCrossEntropyLoss(0.6, 10, weight=weight), logits, target)[1],
                               grad_of(reference, logits, target)[1], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_region_losses_match_one_hot_reference(seed):
    logits, target = batch(c=4, seed=seed, absent=(2,))
    weight = torch.tensor([0.5, 2.0, 1.0, 3.0])
    cases = [
        (L.DiceLoss(), ref_dice(logits, target)),
        (L.DiceLoss(weight=weight, smooth=0.5), ref_dice(logits, target, weight=weight, smooth=0.5)),
        (L.DiceLoss(absent="mask", log_loss=True), ref_dice(logits, target, absent="mask", log_loss=True)),
        (L.TverskyLoss(alpha=0.2, beta=0.8, weight=weight), ref_tversky(logits, target, 0.2, 0.8, weight=weight)),
        (L.TverskyLoss(alpha=0.3, beta=0.7, gamma=0.75), ref_tversky(logits, target, 0.3, 0.7, gamma=0.75)),
        (L.GeneralizedDiceLoss(), ref_gdl(logits, target)),
        (L.GeneralizedDiceLoss(weight_type="simple", smooth=0.1), ref_gdl(logits, target, 0.1, "simple")),
        (L.GeneralizedDiceLoss(weight_type="uniform"), ref_gdl(logits, target, weight_type="uniform")),
    ]
    for loss, expected in cases:
        torch.testing.assert_close(loss(logits, target).double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_region_loss_gradients_match_autograd_reference(seed):
    """The fused backward of the per-class statistics against autograd through the one-hot reference."""
    logits, target = batch(c=4, seed=seed, absent=(3,))
    weight = torch.tensor([0.5, 2.0, 1.0, 3.0])
    pairs = [
        (L.DiceLoss(weight=weight), lambda x, y: ref_dice(x, y, weight=weight)),
        (L.DiceLoss(log_loss=True, absent="mask"), lambda x, y: ref_dice(x, y, absent="mask", log_loss=True)),
        (L.TverskyLoss(alpha=0.3, beta=0.7, gamma=2.0), lambda x, y: ref_tversky(x, y, 0.3, 0.7, 2.0)),
        (L.GeneralizedDiceLoss(), ref_gdl),
    ]
    for loss, reference in pairs:
        torch.testing.assert_close(grad_of(loss, logits, target)[1],
                                   grad_of(reference, logits, target)[1].float(), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("classes", ["present", "all", [0, 2]])
def test_lovasz_matches_berman_reference(seed, classes):
    logits, target = batch(c=4, h=5, w=6, seed=seed, absent=(2,))
    loss = L.LovaszSoftmaxLoss(classes=classes)
    value, grad = grad_of(loss, logits, target)
    ref_value, ref_grad = grad_of(lambda x, y: ref_lovasz(x, y, classes), logits, target)
    torch.testing.assert_close(value.double(), ref_value, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad.float(), rtol=1e-4, atol=1e-6)


def test_lovasz_larger_batch_with_many_ties_matches_reference():
    # quantised probabilities create ties, where only the value (not the gradient) is uniquely defined
    logits, target = batch(n=3, c=5, h=16, w=16, seed=7)
    logits = (logits * 2).round() / 2
    torch.testing.assert_close(L.LovaszSoftmaxLoss()(logits, target).double(), ref_lovasz(logits, target),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("min_kept", [0, 5, 15, 1000])
def test_ohem_selection_and_value(min_kept):
    logits, target = batch(c=3, h=5, w=6, seed=2, scale=3.0)
    weight = torch.tensor([1.0, 2.0, 0.5])
    keep = ref_ohem_keep(logits, target, 0.5, min_kept)
    valid_count = int((target != IGNORE).sum())
    assert int(keep.sum()) >= min(min_kept, valid_count)
    expected = ref_pixel_loss(logits, target, weight=weight, keep=keep)
    got = L.OhemCrossEntropyLoss(thresh=0.5, min_kept=min_kept, weight=weight)(logits, target)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_ohem_keeps_min_kept_hardest_and_gradient_only_there():
    logits, target = batch(c=3, h=6, w=6, seed=4, ignore_frac=0.0, scale=4.0)
    _, grad = grad_of(L.OhemCrossEntropyLoss(thresh=1e-6, min_kept=7), logits, target)
    touched = grad.abs().sum(1) > 0
    assert int(touched.sum()) == 7  # no pixel below thresh: exactly the 7 lowest p_y (no ties here)
    p = torch.softmax(logits, 1).gather(1, target.unsqueeze(1)).squeeze(1)
    assert p[touched].max() < p[~touched].min()


def test_ohem_with_all_kept_equals_cross_entropy():
    logits, target = batch(seed=6)
    weight = torch.tensor([1.0, 2.0, 0.5])
    torch.testing.assert_close(L.OhemCrossEntropyLoss(thresh=1.0, min_kept=10**6, weight=weight)(logits, target),
                               L.CrossEntropyLoss(weight=weight)(logits, target))


# -- binary ----------------------------------------------------------------------------------------------------------
def test_binary_losses_match_torch_and_torchvision():
    logits, target = binary_batch(h=6, w=7, seed=1)
    valid = target != IGNORE
    x, y = logits.squeeze(1)[valid], target[valid].float()
    torch.testing.assert_close(L.BCEWithLogitsLoss()(logits, target),
                               F.binary_cross_entropy_with_logits(x, y))
    pos_weight = torch.tensor([2.5])
    torch.testing.assert_close(L.BCEWithLogitsLoss(pos_weight=2.5)(logits, target),
                               F.binary_cross_entropy_with_logits(x, y, pos_weight=pos_weight))
    for alpha, gamma in [(0.25, 2.0), (0.6, 0.5), (None, 1.0)]:
        expected = torchvision.ops.sigmoid_focal_loss(x, y, alpha=-1 if alpha is None else alpha, gamma=gamma,
                                                      reduction="mean")
        torch.testing.assert_close(L.SigmoidFocalLoss(alpha=alpha, gamma=gamma)(logits, target), expected)
    # per-pixel weights w[y]: weighted mean
    w = torch.tensor([0.5, 4.0])
    pixel_w = w[y.long()]
    expected = (F.binary_cross_entropy_with_logits(x, y, reduction="none") * pixel_w).sum() / pixel_w.sum()
    torch.testing.assert_close(L.BCEWithLogitsLoss(weight=w)(logits, target), expected)
    expected = (torchvision.ops.sigmoid_focal_loss(x, y, reduction="none") * pixel_w).sum() / pixel_w.sum()
    torch.testing.assert_close(L.SigmoidFocalLoss(weight=w)(logits, target), expected)


def test_binary_dice_explicit():
    logits, target = binary_batch(seed=2)
    p = torch.sigmoid(logits.squeeze(1).double())
    inter = psum = count = 0.0
    wsum = {0: 0.5, 1: 4.0}
    for idx in range(target.numel()):
        y, pi = int(target.flatten()[idx]), float(p.flatten()[idx])
        if y == IGNORE:
            continue
        inter += wsum[y] * pi * (y == 1)
        psum += wsum[y] * pi
        count += wsum[y] * (y == 1)
    expected = 1 - (2 * inter + 1.0) / (psum + count + 1.0)
    assert L.BinaryDiceLoss(weight=[0.5, 4.0])(logits, target).item() == pytest.approx(expected, rel=1e-5)
    # uniform weights are the plain Dice
    torch.testing.assert_close(L.BinaryDiceLoss(weight=[2.0, 2.0], smooth=0.0)(logits, target),
                               L.BinaryDiceLoss(smooth=0.0)(logits, target))


def test_binary_without_foreground_penalises_predictions():
    logits = torch.full((1, 1, 2, 2), 0.0)
    target = torch.zeros(1, 2, 2, dtype=torch.long)
    # P = 4 * 0.5 = 2, G = 0: L = P / (P + s) = 2 / 3
    assert L.BinaryDiceLoss()(logits, target).item() == pytest.approx(2 / 3, rel=1e-6)
    assert L.BinaryDiceLoss()(torch.full((1, 1, 2, 2), -30.0), target).item() < 1e-6


# -- invariants ------------------------------------------------------------------------------------------------------
def test_focal_gamma_zero_equals_cross_entropy_exactly():
    logits, target = batch(c=4, seed=8)
    for weight in (None, torch.tensor([0.1, 1.0, 5.0, 2.0])):
        ce_value, ce_grad = grad_of(L.CrossEntropyLoss(weight=weight), logits, target)
        focal_value, focal_grad = grad_of(L.FocalLoss(gamma=0.0, weight=weight), logits, target)
        assert torch.equal(ce_value, focal_value)
        assert torch.equal(ce_grad, focal_grad)
        torch.testing.assert_close(ce_value, F.cross_entropy(logits, target, weight=weight, ignore_index=IGNORE))


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10**6), scale=st.floats(0.01, 100.0), gamma=st.sampled_from([0.0, 1.0, 2.0]))
def test_pixel_losses_invariant_to_weight_scale(seed, scale, gamma):
    logits, target = batch(c=4, seed=seed)
    binary_logits, binary_target = binary_batch(seed=seed)
    weight = torch.rand(4, generator=torch.Generator().manual_seed(seed)) + 0.1
    cases = [
        (lambda w: L.CrossEntropyLoss(weight=w), logits, target, weight),
        (lambda w: L.FocalLoss(gamma=gamma, weight=w), logits, target, weight),
        (lambda w: L.OhemCrossEntropyLoss(min_kept=5, weight=w), logits, target, weight),
        (lambda w: L.BCEWithLogitsLoss(weight=w), binary_logits, binary_target, weight[:2]),
        (lambda w: L.SigmoidFocalLoss(weight=w), binary_logits, binary_target, weight[:2]),
    ]
    for make, x, y, w in cases:
        torch.testing.assert_close(make(w)(x, y), make(w * scale)(x, y), rtol=1e-5, atol=1e-6)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10**6), gamma=st.floats(0.1, 5.0))
def test_focal_never_exceeds_cross_entropy(seed, gamma):
    logits, target = batch(c=3, seed=seed)
    assert L.FocalLoss(gamma=gamma)(logits, target) <= L.CrossEntropyLoss()(logits, target) + 1e-6


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10**6), n=st.integers(1, 2), c=st.integers(2, 5), h=st.integers(1, 6),
       ignore_frac=st.sampled_from([0.0, 0.3, 1.0]))
def test_lovasz_property_matches_reference(seed, n, c, h, ignore_frac):
    logits, target = batch(n=n, c=c, h=h, w=3, seed=seed, ignore_frac=ignore_frac)
    torch.testing.assert_close(L.LovaszSoftmaxLoss()(logits, target).double(), ref_lovasz(logits, target),
                               rtol=1e-5, atol=1e-6)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10**6), smooth=st.floats(0.0, 5.0), scale=st.floats(0.1, 20.0))
def test_region_losses_bounded(seed, smooth, scale):
    logits, target = batch(c=4, seed=seed, scale=scale)
    for loss in (L.DiceLoss(smooth=smooth), L.TverskyLoss(smooth=smooth, alpha=0.2, beta=0.8),
                 L.GeneralizedDiceLoss(smooth=smooth), L.LovaszSoftmaxLoss()):
        value = loss(logits, target).item()
        assert -1e-6 <= value <= 1 + 1e-6, (loss, value)


def test_region_losses_invariant_to_class_weight_scale():
    logits, target = batch(c=4, seed=20, absent=(1,))
    weight = torch.tensor([0.3, 2.0, 1.0, 0.7])
    for make in (lambda w: L.DiceLoss(weight=w), lambda w: L.TverskyLoss(alpha=0.3, beta=0.7, gamma=0.75, weight=w),
                 lambda w: L.BinaryDiceLoss(weight=w[:2], smooth=0.0)):
        x = logits[:, :1] if isinstance(make(weight), L.BinaryDiceLoss) else logits
        y = target.clamp(max=1).masked_fill(target == IGNORE, IGNORE) if x.shape[1] == 1 else target
        torch.testing.assert_close(make(weight)(x, y), make(weight * 37.0)(x, y))


def test_tversky_half_half_equals_dice():
    logits, target = batch(c=4, seed=9)
    weight = torch.tensor([1.0, 2.0, 0.5, 1.5])
    for smooth in (0.0, 0.5, 1.0):
        torch.testing.assert_close(L.TverskyLoss(alpha=0.5, beta=0.5, smooth=smooth, weight=weight)(logits, target),
                                   L.DiceLoss(smooth=2 * smooth, weight=weight)(logits, target))


def test_tversky_beta_penalises_false_negatives():
    # under-segmentation of class 1: raising beta (FN weight) raises the loss, raising alpha does not as much
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    target[0, :2] = 1
    logits = confident(torch.zeros_like(target), 2, margin=3.0)
    recall = L.TverskyLoss(alpha=0.1, beta=0.9)(logits, target)
    precision = L.TverskyLoss(alpha=0.9, beta=0.1)(logits, target)
    assert recall > precision


PERFECT_CASES = ["ce", "focal", "dice", "dice_log_mask_weighted", "gdl", "tversky", "focal_tversky_weighted", "lovasz",
                 "lovasz_all", "ohem_weighted", "combo"]


@pytest.mark.parametrize("name", PERFECT_CASES)
def test_perfect_prediction_near_zero_and_good_below_bad(name):
    logits, target = batch(n=2, c=3, h=6, w=6, seed=10)
    loss = MULTICLASS[name]()
    perfect = loss(confident(target, 3), target).item()
    good = loss(confident(target, 3, margin=3.0) + 0.5 * logits, target).item()
    wrong = confident((target + 1) % 3, 3, margin=3.0)
    bad = loss(wrong + 0.5 * logits, target).item()
    assert 0 <= perfect < 1e-4 and perfect < good < bad


@pytest.mark.parametrize("name", ["dice", "tversky", "focal_tversky_weighted"])
def test_absent_class_still_penalised_by_default(name):
    # class 2 never occurs in the target: predicting it costs (absent="include"), masking it does not
    logits, target = batch(c=3, seed=11, absent=(2,), ignore_frac=0.0)
    clean = confident(target, 3)
    spurious = clean.clone()
    spurious[:, 2, :2] = 60.0  # predict class 2 on some pixels
    loss = MULTICLASS[name]()
    assert loss(spurious, target) > loss(clean, target) + 1e-3
    masked = {"dice": L.DiceLoss(absent="mask"), "tversky": L.TverskyLoss(alpha=0.3, beta=0.7, absent="mask"),
              "focal_tversky_weighted": L.TverskyLoss(alpha=0.3, beta=0.7, gamma=0.75, absent="mask")}[name]
    assert masked(clean, target).item() < 1e-4


# -- empty batches, precision, autocast ------------------------------------------------------------------------------
def _all_losses():
    for name, make in MULTICLASS.items():
        yield name, make(), 3
    for name, make in BINARY.items():
        yield name, make(), 1


ALL_LOSSES = list(_all_losses())
ALL_IDS = [name for name, _, _ in ALL_LOSSES]


@pytest.mark.parametrize("name, loss, c", ALL_LOSSES, ids=ALL_IDS)
def test_all_ignored_batch_gives_zero_with_gradient(name, loss, c):
    logits = torch.randn(2, c, 3, 4, requires_grad=True)
    target = torch.full((2, 3, 4), IGNORE)
    value = loss(logits, target)
    assert value.item() == 0.0 and value.requires_grad
    value.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().max() == 0


@pytest.mark.parametrize("name, loss, c", ALL_LOSSES, ids=ALL_IDS)
def test_all_background_batch_finite(name, loss, c):
    logits = torch.randn(2, c, 3, 4, requires_grad=True)
    target = torch.zeros(2, 3, 4, dtype=torch.long)
    value = loss(logits, target)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name, loss, c", ALL_LOSSES, ids=ALL_IDS)
def test_autocast_and_half_logits_finite(name, loss, c, dtype):
    """A half-precision convolution head under CPU autocast (bf16, and fp16 as trainer.precision=16-mixed runs it),
    backward inside it too: finite values and gradients, within 2% of the fp32 loss; fp16 logits as such (x 100,
    near the fp16 range) stay finite."""
    logits, target = batch(c=c, seed=12) if c > 1 else binary_batch(seed=12)
    ignored = torch.full_like(target, IGNORE)
    weight = torch.randn(c, c, 1, 1) * 0.5
    for y in (target, ignored):
        x = logits.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=dtype):
            out = F.conv2d(x, weight)
            assert out.dtype == dtype
            value = loss(out, y)
            value.backward()
        assert value.dtype == torch.float32 and torch.isfinite(value), (name, value)
        assert torch.isfinite(x.grad).all(), name
        reference = loss(F.conv2d(logits, weight), y)
        assert value.item() == pytest.approx(reference.item(), rel=0.02, abs=1e-3), (name, dtype)
        if dtype == torch.float16:
            x = logits.clone().requires_grad_(True)
            value = loss((x * 100).half(), y)
            value.backward()
            assert value.dtype == torch.float32 and torch.isfinite(value), (name, value)
            assert torch.isfinite(x.grad).all(), name
        if y is ignored:
            assert value.item() == 0.0


def test_backward_inside_autocast_keeps_float32_gradients():
    # a trainer may call backward() inside the autocast block: the fused backwards must stay in float32
    logits, target = batch(n=2, c=5, h=8, w=8, seed=19)
    for loss in (L.DiceLoss(), L.GeneralizedDiceLoss(), L.FocalLoss(), L.LovaszSoftmaxLoss()):
        _, expected = grad_of(loss, logits, target)
        x = logits.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss(x, target).backward()
        torch.testing.assert_close(x.grad, expected, rtol=1e-5, atol=1e-7)


def test_region_sums_do_not_overflow_in_half_precision():
    # 2 x 256 x 256 pixels: counts and sums far beyond the fp16 range (65,504)
    target = torch.zeros(2, 256, 256, dtype=torch.long)
    target[:, :64] = 1
    logits = confident(target, 2, margin=4.0).half()
    for loss in (L.DiceLoss(), L.GeneralizedDiceLoss(), L.TverskyLoss(), L.LovaszSoftmaxLoss()):
        value = loss(logits, target)
        assert torch.isfinite(value) and 0 <= value.item() < 0.05


def test_second_backward_with_retained_graph():
    logits, target = batch(c=4, seed=13)
    for loss in (L.CrossEntropyLoss(), L.FocalLoss(), L.DiceLoss(), L.TverskyLoss(gamma=2.0), L.OhemCrossEntropyLoss(),
                 L.LovaszSoftmaxLoss(classes="all")):
        x = logits.clone().requires_grad_(True)
        value = loss(x, target)
        value.backward(retain_graph=True)
        first = x.grad.clone()
        value.backward()
        torch.testing.assert_close(x.grad, 2 * first)


def test_channels_last_and_integer_target_dtypes():
    logits, target = batch(c=4, seed=14)
    for loss in (L.CrossEntropyLoss(), L.DiceLoss(), L.LovaszSoftmaxLoss(), L.FocalLoss()):
        expected = loss(logits, target)
        torch.testing.assert_close(loss(logits.to(memory_format=torch.channels_last), target), expected)
        torch.testing.assert_close(loss(logits, target.to(torch.int32)), expected)
        torch.testing.assert_close(loss(logits, target.to(torch.uint8)), expected)


def test_weight_is_a_buffer_that_follows_to():
    loss = L.DiceLoss(weight=[1, 2, 3])
    assert "weight" in dict(loss.named_buffers()) and "weight" not in loss.state_dict()
    assert loss.to(torch.float64).weight.dtype == torch.float64
    logits, target = batch(c=3, seed=15)
    assert torch.isfinite(loss(logits, target))
    assert isinstance(L.FocalLoss(weight=torch.tensor([1.0, 2.0])).weight, torch.Tensor)


# -- WeightedSum -----------------------------------------------------------------------------------------------------
def test_weighted_sum_equals_sum_of_parts_and_fills_last_terms():
    logits, target = batch(c=4, seed=16)
    weight = torch.tensor([1.0, 2.0, 0.5, 1.5])
    parts = {"ce": L.CrossEntropyLoss(weight=weight), "dice": L.DiceLoss(), "lovasz": L.LovaszSoftmaxLoss()}
    combo = L.WeightedSum(parts, {"ce": 0.5, "dice": 2.0})  # lovasz: missing -> 1.0
    x = logits.clone().requires_grad_(True)
    total = combo(x, target)
    expected = 0.5 * parts["ce"](logits, target) + 2.0 * parts["dice"](logits, target) + parts["lovasz"](logits, target)
    torch.testing.assert_close(total, expected)
    assert set(combo.last_terms) == {"ce", "dice", "lovasz"}
    for name, value in combo.last_terms.items():
        assert not value.requires_grad and value.ndim == 0
        torch.testing.assert_close(value, parts[name](logits, target))
    total.backward()
    assert torch.isfinite(x.grad).all()
    assert isinstance(combo.terms, torch.nn.ModuleDict)


def test_weighted_sum_rejects_unknown_weight_and_bad_terms():
    with pytest.raises(ValueError, match="dcie"):
        L.WeightedSum({"ce": L.CrossEntropyLoss(), "dice": L.DiceLoss()}, {"dcie": 1.0})
    with pytest.raises(ValueError, match="non-empty"):
        L.WeightedSum({})
    with pytest.raises(ValueError, match="nn.Module"):
        L.WeightedSum({"ce": "not a loss"})
    with pytest.raises(ValueError, match="finite"):
        L.WeightedSum({"ce": L.CrossEntropyLoss()}, {"ce": float("nan")})


def test_weighted_sum_moves_term_buffers():
    combo = L.WeightedSum({"ce": L.CrossEntropyLoss(weight=[1.0, 2.0])})
    assert combo.to(torch.float64).terms["ce"].weight.dtype == torch.float64


# -- argument and shape validation -----------------------------------------------------------------------------------
BAD_ARGS = [
    (L.FocalLoss, {"gamma": -1}, "FocalLoss: gamma must be >= 0, got -1"),
    (L.FocalLoss, {"alpha": 1.5}, "alpha must be <= 1"),
    (L.FocalLoss, {"alpha": [1.0, -2.0]}, "alpha must be finite and >= 0"),
    (L.CrossEntropyLoss, {"label_smoothing": 1.5}, "label_smoothing must be <= 1"),
    (L.LogitAdjustedLoss, {"tau": -1}, "LogitAdjustedLoss: tau must be >= 0, got -1"),
    (L.LogitAdjustedLoss, {"prior_floor": 0.0}, "prior_floor must be > 0"),
    (L.LogitAdjustedLoss, {"prior": [0.5, -0.1]}, "prior must be finite and >= 0"),
    (L.LogitAdjustedLoss, {"prior": [0.5, float("nan")]}, "prior must be finite and >= 0"),
    (L.CrossEntropyLoss, {"weight": [1.0, float("inf")]}, "weight must be finite"),
    (L.CrossEntropyLoss, {"weight": [0.0, 0.0]}, "at least one positive"),
    (L.CrossEntropyLoss, {"weight": [[1.0, 2.0]]}, "1-D"),
    (L.CrossEntropyLoss, {"ignore_index": 2.5}, "ignore_index must be an int"),
    (L.DiceLoss, {"smooth": -1.0}, "smooth must be >= 0"),
    (L.DiceLoss, {"absent": "drop"}, "absent must be one of"),
    (L.GeneralizedDiceLoss, {"weight_type": "cubic"}, "weight_type must be one of"),
    (L.TverskyLoss, {"alpha": -0.1}, "alpha must be >= 0"),
    (L.TverskyLoss, {"alpha": 0.0, "beta": 0.0}, "alpha \\+ beta must be > 0"),
    (L.TverskyLoss, {"gamma": 0.0}, "gamma must be > 0"),
    (L.LovaszSoftmaxLoss, {"classes": "some"}, "classes must be one of"),
    (L.LovaszSoftmaxLoss, {"classes": [-1]}, "classes must be"),
    (L.OhemCrossEntropyLoss, {"thresh": 0.0}, "thresh must be > 0"),
    (L.OhemCrossEntropyLoss, {"min_kept": -5}, "min_kept must be an int >= 0"),
    (L.BCEWithLogitsLoss, {"weight": [1.0, 2.0, 3.0]}, "weight must have 2 entries"),
    (L.BCEWithLogitsLoss, {"pos_weight": -1.0}, "pos_weight must be finite and >= 0"),
    (L.SigmoidFocalLoss, {"alpha": 2.0}, "alpha must be <= 1"),
    (L.BinaryDiceLoss, {"smooth": float("nan")}, "smooth must be a finite number"),
]


@pytest.mark.parametrize("cls, kwargs, message", BAD_ARGS, ids=[f"{c.__name__}-{k}" for c, k, _ in BAD_ARGS])
def test_bad_constructor_arguments(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)


@pytest.mark.parametrize("name, loss, c", ALL_LOSSES, ids=ALL_IDS)
def test_forward_shape_errors_name_the_shapes(name, loss, c):
    logits = torch.randn(2, c, 3, 4)
    with pytest.raises(ValueError, match=r"logits must be 4-D .*\(2, 3, 4\)"):
        loss(logits[:, 0], torch.zeros(2, 3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"target must be 3-D .*\(2, 1, 3, 4\)"):
        loss(logits, torch.zeros(2, 1, 3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(2, 3, 5\) must agree on N, H, W"):
        loss(logits, torch.zeros(2, 3, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="integer class labels"):
        loss(logits, torch.zeros(2, 3, 4))


def test_forward_checks_class_vectors_and_binary_channels():
    logits, target = batch(c=3)
    with pytest.raises(ValueError, match=r"weight has 4 entries .*C=3"):
        L.CrossEntropyLoss(weight=[1, 1, 1, 1])(logits, target)
    with pytest.raises(ValueError, match=r"alpha has 2 entries"):
        L.FocalLoss(alpha=[0.5, 0.5])(logits, target)
    with pytest.raises(ValueError, match=r"one-channel logits \(N, 1, H, W\), got shape \(2, 3, 4, 5\)"):
        L.BCEWithLogitsLoss()(logits, target)
    with pytest.raises(ValueError, match=r"classes \[5\] out of range"):
        L.LovaszSoftmaxLoss(classes=[5])(logits, target)


def test_public_api_and_docstrings():
    expected = {"CrossEntropyLoss", "LogitAdjustedLoss", "FocalLoss", "DiceLoss", "GeneralizedDiceLoss", "TverskyLoss", "LovaszSoftmaxLoss",
                "OhemCrossEntropyLoss", "WeightedSum", "BCEWithLogitsLoss", "SigmoidFocalLoss", "BinaryDiceLoss"}
    assert set(L.__all__) == expected
    for name in expected - {"WeightedSum"}:
        doc = inspect.getdoc(getattr(L, name))
        assert "ignore" in doc.lower() and ("smooth" in doc.lower()), name


# -- configs ---------------------------------------------------------------------------------------------------------
def _instantiate_loss(node, weight):
    """What the trainer's builder does: pop ``class_weights``, inject ``weight`` where the constructor takes it."""
    spec = OmegaConf.to_container(node, resolve=True)
    if spec["_target_"] == "train_seg.losses.WeightedSum":
        terms = {name: _instantiate_loss(OmegaConf.create(term), weight) for name, term in spec["terms"].items()}
        return L.WeightedSum(terms=terms, weights=spec.get("weights") or {})
    use_weights = spec.pop("class_weights", True)
    cls = hydra.utils.get_class(spec["_target_"])
    kwargs = {"weight": weight} if use_weights and "weight" in inspect.signature(cls).parameters else {}
    if "prior" in inspect.signature(cls).parameters:
        kwargs["prior"] = [0.7, 0.2, 0.08, 0.02]
    return hydra.utils.instantiate(spec, **kwargs)


def test_loss_configs_exist():
    names = {p.stem for p in LOSS_CONFIGS}
    assert {"ce", "focal", "dice", "generalized_dice", "tversky", "focal_tversky", "lovasz", "ohem", "bce",
            "sigmoid_focal", "binary_dice", "ce_dice", "focal_dice", "ce_lovasz"} <= names


@pytest.mark.parametrize("path", LOSS_CONFIGS, ids=[p.stem for p in LOSS_CONFIGS])
def test_loss_config_instantiates_and_runs(path):
    text = path.read_text()
    assert text.lstrip().startswith("#"), "each loss config starts with a comment"
    assert "weight:" not in text.replace("pos_weight:", ""), "class weights are injected by the builder"
    cfg = OmegaConf.merge(OmegaConf.create({"dataset": {"ignore_index": IGNORE}}),
                          {"loss": OmegaConf.load(path)})
    binary = any(key in path.stem for key in ("bce", "sigmoid", "binary"))
    c = 1 if binary else 4
    logits, target = binary_batch(seed=17) if binary else batch(c=4, seed=17)
    for weight in (None, torch.tensor([0.5, 2.0]) if binary else torch.tensor([0.2, 1.0, 1.5, 3.0])):
        loss = _instantiate_loss(cfg.loss, weight)
        x = logits.clone().requires_grad_(True)
        value = loss(x, target)
        value.backward()
        assert value.ndim == 0 and torch.isfinite(value) and torch.isfinite(x.grad).all()
    assert x.shape[1] == c
    if isinstance(loss, L.WeightedSum):
        assert set(loss.last_terms) == set(cfg.loss.terms)


def test_weighted_sum_from_hydra_recursive_instantiate():
    cfg = OmegaConf.merge(OmegaConf.create({"dataset": {"ignore_index": IGNORE}}),
                          {"loss": OmegaConf.load(ROOT / "src" / "train_seg" / "configs" / "loss" / "ce_dice.yaml")})
    loss = hydra.utils.instantiate(cfg.loss)
    logits, target = batch(c=4, seed=18)
    assert torch.isfinite(loss(logits, target)) and set(loss.last_terms) == {"ce", "dice"}


# -- the loss family: declared attributes -----------------------------------------------------------------------------
SIGMOID_LOSSES = {"BCEWithLogitsLoss", "SigmoidFocalLoss", "BinaryDiceLoss"}


@pytest.mark.parametrize("name", sorted(L.__all__))
def test_declared_attributes_match_the_constructor(name):
    """The independent check that ``binary`` and ``takes_class_weights`` do not lie."""
    cls = getattr(L, name)
    assert cls.takes_class_weights is ("weight" in inspect.signature(cls).parameters)
    assert getattr(cls, "takes_class_prior", False) is ("prior" in inspect.signature(cls).parameters)
    if name == "WeightedSum":  # composition: its terms decide (an instance property)
        assert isinstance(inspect.getattr_static(cls, "binary"), property)
        return
    assert issubclass(cls, SegmentationLoss)
    assert cls.binary is (name in SIGMOID_LOSSES)
    loss = cls()
    assert loss.binary is cls.binary
    assert ("weight" in loss._buffers) is cls.takes_class_weights  # the buffer exists exactly when weights are taken


@pytest.mark.parametrize("name, loss, c", ALL_LOSSES, ids=ALL_IDS)
def test_instances_declare_the_head_they_need(name, loss, c):
    assert loss.binary is (c == 1)


def test_weighted_sum_is_binary_when_all_its_terms_are():
    assert L.WeightedSum({"bce": L.BCEWithLogitsLoss(), "dice": L.BinaryDiceLoss()}).binary is True
    assert L.WeightedSum({"ce": L.CrossEntropyLoss(), "dice": L.DiceLoss()}).binary is False
    assert L.WeightedSum({"bce": L.BCEWithLogitsLoss(), "dice": L.DiceLoss()}).binary is False  # a mix fits no head
    assert L.WeightedSum({"bce": L.BCEWithLogitsLoss(), "own": torch.nn.BCEWithLogitsLoss()}).binary is False


def test_builder_injects_the_prior_where_a_loss_declares_takes_class_prior():
    from train_seg.engine import builder as build
    prior = torch.tensor([0.9, 0.08, 0.02])
    node = OmegaConf.create({"_target_": "train_seg.losses.LogitAdjustedLoss", "tau": 0.5})
    loss = build.build_criterion(node, None, prior)
    torch.testing.assert_close(loss.log_prior, prior.log())
    combo = build.build_criterion(OmegaConf.create({"_target_": "train_seg.losses.WeightedSum", "terms": {
        "la": {"_target_": "train_seg.losses.LogitAdjustedLoss"}, "ce": {"_target_": "train_seg.losses.CrossEntropyLoss"}
    }}), torch.tensor([1.0, 2.0, 3.0]), prior)
    torch.testing.assert_close(combo.terms["la"].log_prior, prior.log())
    assert torch.equal(combo.terms["la"].weight, torch.tensor([1.0, 2.0, 3.0])) and not hasattr(combo.terms["ce"],
                                                                                                 "log_prior")


def test_builder_reads_takes_class_weights():
    from train_seg.engine import builder as build
    weights = torch.tensor([0.5, 1.0, 2.0])
    by_module_path = build.build_criterion(OmegaConf.create({"_target_": "train_seg.losses.dice.DiceLoss"}), weights)
    assert torch.equal(by_module_path.weight, weights)
    # a class that does not declare takes_class_weights gets no class weights, even if it accepts ``weight``
    foreign = build.build_criterion(OmegaConf.create({"_target_": "torch.nn.CrossEntropyLoss"}), weights)
    assert foreign.weight is None


def test_head_check_reads_binary_and_tolerates_unknown_targets():
    from train_seg.config.validation import ConfigError, _check_head_and_loss

    def check(binary_head, loss):
        _check_head_and_loss(OmegaConf.create({"model": {"binary_head": binary_head}, "loss": loss}))

    bce_dice = {"_target_": "train_seg.losses.WeightedSum",
                "terms": {"bce": {"_target_": "train_seg.losses.BCEWithLogitsLoss"},
                          "dice": {"_target_": "train_seg.losses.binary.BinaryDiceLoss"}}}
    check(True, bce_dice)
    check(False, {"_target_": "train_seg.losses.CrossEntropyLoss"})
    check(False, {"_target_": "no_such_module.SomeLoss"})  # left to build.py's import error
    with pytest.raises(ConfigError, match=r"loss \(SomeLoss\) is multi-class"):
        check(True, {"_target_": "no_such_module.SomeLoss"})
    with pytest.raises(ConfigError, match=r"the loss \(BinaryDiceLoss\) is for a one-channel head"):
        check(False, bce_dice["terms"]["dice"])


# -- generalized Dice weights -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("absent", ABSENT_MODES)
@pytest.mark.parametrize("weight_type", GDL_WEIGHT_TYPES)
def test_generalized_dice_weights_are_scale_invariant(weight_type, absent):
    counts = torch.tensor([1.0, 3.0, 0.0, 10.0])
    power = {"square": 2, "simple": 1, "uniform": 0}[weight_type]
    raw = [g ** -power if g > 0 else None for g in counts.tolist()]
    largest = max(x for x in raw if x is not None)
    raw = [(largest if absent == "include" else 0.0) if x is None else x for x in raw]
    expected = torch.tensor(raw) / sum(raw)
    small = generalized_dice_weights(counts, weight_type, absent)
    assert torch.allclose(small, expected, rtol=1e-6, atol=0)
    for scale in (1e6, 1e7):  # 1 / G^2 is 1e-12 .. 1e-16 here, below the 1e-12 clamp of the normaliser
        big = generalized_dice_weights(counts * scale, weight_type, absent)
        assert big.sum().item() == pytest.approx(1.0, abs=1e-6)
        assert torch.allclose(big, small, rtol=1e-6, atol=0)


def test_generalized_dice_weights_of_large_equal_classes():
    for pixels in (4e6, 1e7):  # used to give 0.0625 each (sum 0.125) for 4e6
        weights = generalized_dice_weights(torch.tensor([pixels, pixels]), "square", "include")
        assert torch.allclose(weights, torch.tensor([0.5, 0.5]), rtol=1e-6, atol=0)
    assert generalized_dice_weights(torch.zeros(3), "square", "include").tolist() == [0.0, 0.0, 0.0]
