"""Class statistics -> class weight vector.

One pure function per scheme (registered in ``SCHEMES``), then one normalisation policy and an optional clip, all
behind ``class_weights(stats, scheme, normalize, max_ratio, **params)``. Notation: ``K`` classes, ``N_c`` pixels of
class ``c`` in the training split, ``N = sum_c N_c`` (ignore pixels excluded everywhere), ``p_c = N_c / N``,
``n_c`` images containing ``c``.

Conventions (decided here, see docs/losses.md, ``weighting``):
  * Absent classes. A class with zero pixels in the training split (``N_c = 0``, equivalently ``n_c = 0``) has an
    infinite or undefined weight under every frequency-based formula. It gets the LARGEST weight among the present
    classes instead: finite, and consistent with "rarer weighs more". Its weight never multiplies a target pixel
    of the training split (so it does not change CE/focal at all); it only matters for region losses, where it
    scales the penalty for predicting a class that is absent, and that penalty should stay as strong as for the
    rarest class seen (0 would let the model predict it for free). If every class is absent (empty split) all
    weights are 1. ``none`` and ``manual`` are not frequency-based and keep their values.
  * Order: scheme -> absent-class fill -> clip (``max_ratio``) -> normalise. Clipping is relative
    (``w <= min(w) * max_ratio``) and therefore scale-free, so clipping before normalising bounds the same ratio
    while the normalisation, applied last, holds exactly.
  * Weights are computed in float64 and returned as a float32 tensor of shape ``(K,)``, all finite and > 0.
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Sequence

import numpy as np
import torch

from train_seg.data.class_stats import ClassStats

__all__ = [
    "SCHEMES",
    "NORMALIZATIONS",
    "class_weights",
    "all_scheme_weights",
    "format_weight_table",
    "scheme_defaults",
]


# ----------------------------------------------------------------------------------------------------------------
# helpers


def _fill_absent(weights: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Absent classes get the largest weight among present classes; all ones when no class is present."""
    if not present.any():
        return np.ones_like(weights, dtype=np.float64)
    return np.where(present, weights, weights[present].max())


def _pixel_counts(stats: ClassStats) -> np.ndarray:
    return stats.pixel_counts.astype(np.float64)


def _number(key: str, value: Any) -> float:
    """``value`` as a finite float, or a ValueError naming ``weighting.<key>``."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"weighting.{key}={value!r} is not a number.") from None
    if not math.isfinite(number):
        raise ValueError(f"weighting.{key}={value!r} must be finite.")
    return number


# ----------------------------------------------------------------------------------------------------------------
# schemes: (stats, **params) -> (K,) float64, finite and > 0


def none(stats: ClassStats) -> np.ndarray:
    """No weighting: ``w_c = 1``."""
    return np.ones(stats.num_classes, dtype=np.float64)


def power(stats: ClassStats, power: float = 0.5) -> np.ndarray:
    """Power of inverse frequency, the continuous knob between the three classic choices:
    ``w_c = (N / (K * N_c)) ** power``. ``power = 0`` is ``none`` (every weight 1), ``0.5`` is ``sqrt_inverse``,
    ``1`` is ``inverse`` (exactly: those two schemes are this function at those powers). ``power`` must be finite
    and >= 0; values above 1 are allowed (weights more extreme than inverse frequency). Absent classes get the
    largest present weight, like every frequency-based scheme (so with ``power = 0`` they weigh 1 too)."""
    power = _number("power", power)
    if power < 0:
        raise ValueError(f"weighting.power={power} must be >= 0 (0 = no weighting, 0.5 = sqrt_inverse, 1 = inverse).")
    counts = _pixel_counts(stats)
    with np.errstate(divide="ignore", invalid="ignore"):
        weights = (counts.sum() / (stats.num_classes * counts)) ** power
    return _fill_absent(weights, counts > 0)


def inverse(stats: ClassStats) -> np.ndarray:
    """Inverse class frequency: ``w_c = N / (K * N_c)`` (the "balanced" weights of scikit-learn's
    ``compute_class_weight``); a class holding exactly ``1/K`` of the pixels weighs 1. ``power`` with ``power=1``."""
    return power(stats, 1.0)


def sqrt_inverse(stats: ClassStats) -> np.ndarray:
    """Square root of inverse frequency: ``w_c = sqrt(N / (K * N_c))``, a softer inverse (ratios are square-rooted,
    fewer false positives on rare classes). ``power`` with ``power=0.5`` (numpy computes ``x ** 0.5`` as
    ``sqrt(x)``, bit for bit)."""
    return power(stats, 0.5)


def median_freq(stats: ClassStats) -> np.ndarray:
    """Median frequency balancing (Eigen & Fergus, ICCV 2015, "Predicting depth, surface normals and semantic
    labels with a common multi-scale convolutional architecture"): ``w_c = median(f) / f_c`` with
    ``f_c = N_c / P_c`` where ``P_c`` is the number of (non-ignored) pixels of the images that contain ``c``, i.e.
    the frequency of ``c`` over the images where it is present. The median is over the present classes
    (``f_c > 0``); with an even number of them it is the mean of the two middle values (``np.median``)."""
    counts = _pixel_counts(stats)
    present = counts > 0
    if not present.any():
        return np.ones(stats.num_classes, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        frequency = counts / stats.pixels_of_images_containing.astype(np.float64)
        weights = np.median(frequency[present]) / frequency
    return _fill_absent(weights, present)


def enet(stats: ClassStats, c: float = 1.02) -> np.ndarray:
    """ENet weighting (Paszke et al. 2016, "ENet: A Deep Neural Network Architecture for Real-Time Semantic
    Segmentation", section 5.2): ``w_c = 1 / ln(c + p_c)`` with ``p_c = N_c / N`` and ``c = 1.02`` by default,
    which bounds the weights in ``[1/ln(c + 1), 1/ln(c)]`` (about 1.45 to 50.5). ``c`` must be > 1."""
    c = _number("c", c)
    if c <= 1.0:
        raise ValueError(f"weighting.c={c} must be > 1 (1/ln(c + p) is infinite or negative otherwise); ENet: 1.02.")
    counts = _pixel_counts(stats)
    total = counts.sum()
    share = counts / total if total > 0 else np.zeros_like(counts)
    return _fill_absent(1.0 / np.log(c + share), counts > 0)


_EFFECTIVE_NUM_COUNTS = ("images", "pixels")


def effective_num(stats: ClassStats, beta: float = 0.999, count: str = "images") -> np.ndarray:
    """Class-balanced weights from the effective number of samples (Cui et al., CVPR 2019, "Class-Balanced Loss
    Based on Effective Number of Samples"): ``w_c = (1 - beta) / (1 - beta^n_c)``, computed stably as
    ``(1 - beta) / -expm1(n_c * ln(beta))``. ``0 <= beta < 1``; beta -> 1 tends to inverse frequency, beta = 0 to
    no weighting.

    ``count="images"`` (default): ``n_c`` = images containing ``c``; a mask is one "sample".
    ``count="pixels"``: ``n_c = N_c``. Beware: ``beta^n_c = exp(n_c ln beta)`` underflows to 0 as soon as
    ``n_c * (1 - beta) >> 1``; with ``10^5-10^9`` pixels per class that is every beta below about ``1 - 1e-6``,
    and then all weights equal ``1 - beta`` (no weighting) unless beta is extremely close to 1.
    """
    beta = _number("beta", beta)
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"weighting.beta={beta} must be in [0, 1) (Cui et al. use 0.9 ... 0.9999).")
    if count not in _EFFECTIVE_NUM_COUNTS:
        raise ValueError(f"weighting.count={count!r} is not valid; choose one of: {', '.join(_EFFECTIVE_NUM_COUNTS)}.")
    samples = (stats.image_counts if count == "images" else stats.pixel_counts).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_beta = np.log(beta) if beta > 0 else -np.inf
        weights = (1.0 - beta) / -np.expm1(samples * log_beta)
    return _fill_absent(weights, samples > 0)


def log(stats: ClassStats, mu: float = 0.15) -> np.ndarray:
    """Clipped log inverse frequency (the common Keras ``create_class_weight(labels_dict, mu=0.15)`` recipe):
    ``w_c = max(1, ln(mu * N / N_c))``. With ``mu = 0.15`` every class above ``mu / e`` = 5.5% of the pixels
    weighs 1 and rarer classes grow logarithmically. ``mu > 0``."""
    mu = _number("mu", mu)
    if mu <= 0:
        raise ValueError(f"weighting.mu={mu} must be > 0 (the usual value is 0.15).")
    counts = _pixel_counts(stats)
    with np.errstate(divide="ignore", invalid="ignore"):
        weights = np.maximum(1.0, np.log(mu * counts.sum() / counts))
    return _fill_absent(weights, counts > 0)


def manual(stats: ClassStats, values: Sequence[float] | None = None) -> np.ndarray:
    """Explicit weights ``w_c = values[c]``: one positive finite number per class, in class-index order. Absent
    classes keep their given value; normalisation and clip still apply (``normalize: none`` keeps them verbatim)."""
    if values is None or isinstance(values, (str, bytes)):
        raise ValueError(
            f"weighting.values must be a list of {stats.num_classes} positive numbers (one per class) for "
            f"scheme 'manual'; got {values!r}."
        )
    try:
        weights = np.asarray([float(v) for v in values], dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"weighting.values={list(values)!r} must contain numbers only.") from None
    if weights.shape != (stats.num_classes,):
        raise ValueError(
            f"weighting.values has {weights.size} entries but the dataset has K={stats.num_classes} classes "
            f"(one weight per entry of dataset class_names, in order)."
        )
    if not (np.isfinite(weights).all() and (weights > 0).all()):
        raise ValueError(f"weighting.values={weights.tolist()} must all be finite and > 0.")
    return weights


SCHEMES: dict[str, Callable[..., np.ndarray]] = {
    "none": none,
    "inverse": inverse,
    "sqrt_inverse": sqrt_inverse,
    "power": power,
    "median_freq": median_freq,
    "enet": enet,
    "effective_num": effective_num,
    "log": log,
    "manual": manual,
}


# ----------------------------------------------------------------------------------------------------------------
# normalisation policies: (K,) > 0 -> (K,)

NORMALIZATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "mean": lambda w: w / w.mean(),  # average weight 1: the loss scale of unweighted training
    "sum": lambda w: w / w.sum(),
    "max": lambda w: w / w.max(),
    "none": lambda w: w,
}


def scheme_defaults(scheme: str) -> dict[str, Any]:
    """Parameters of ``scheme`` and their defaults (``inspect.Parameter.empty`` when mandatory)."""
    parameters = list(inspect.signature(SCHEMES[scheme]).parameters.values())[1:]
    return {p.name: p.default for p in parameters}


def _choices(names) -> str:
    return ", ".join(names)


def class_weights(
    stats: ClassStats,
    scheme: str = "none",
    normalize: str = "mean",
    max_ratio: float | None = None,
    **params: Any,
) -> torch.Tensor:
    """``(K,)`` float32 class weights from the training split's ``stats``.

    ``scheme``: a key of ``SCHEMES`` (its parameters go in ``params``). ``max_ratio`` (>= 1 or None): weights
    above ``min(w) * max_ratio`` are lowered to it, before normalisation. ``normalize``: ``mean`` (mean 1),
    ``sum`` (sum 1), ``max`` (max 1) or ``none``. Bad values raise ``ValueError`` naming the ``weighting.*`` key.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"weighting.scheme={scheme!r} is not a known scheme; choose one of: {_choices(SCHEMES)}.")
    if normalize not in NORMALIZATIONS:
        raise ValueError(
            f"weighting.normalize={normalize!r} is not valid; choose one of: {_choices(NORMALIZATIONS)}."
        )
    known = scheme_defaults(scheme)
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ValueError(
            f"weighting.{unknown[0]} is not a parameter of scheme {scheme!r}; its parameters are: "
            f"{_choices(known) or '(none)'}."
        )
    if max_ratio is not None:
        max_ratio = _number("max_ratio", max_ratio)
        if max_ratio < 1:
            raise ValueError(f"weighting.max_ratio={max_ratio} must be >= 1 (or null for no clip).")

    weights = np.asarray(SCHEMES[scheme](stats, **params), dtype=np.float64)
    if max_ratio is not None:
        weights = np.minimum(weights, weights.min() * max_ratio)
    weights = NORMALIZATIONS[normalize](weights)
    assert np.isfinite(weights).all(), f"non-finite class weights {weights} (scheme {scheme})"
    return torch.as_tensor(weights, dtype=torch.float32)


def all_scheme_weights(stats: ClassStats, normalize: str = "mean") -> dict[str, torch.Tensor]:
    """Weights of every scheme with its default parameters. Skipped: ``manual`` (it has no default) and ``power``
    (at its default ``power=0.5`` it is the ``sqrt_inverse`` column)."""
    skipped = ("manual", "power")
    return {name: class_weights(stats, name, normalize=normalize) for name in SCHEMES if name not in skipped}


def format_weight_table(class_names: Sequence[str], stats: ClassStats, weights) -> str:
    """Aligned text table: class, pixel share (%), images containing the class, weight. ``weights`` is one
    ``(K,)`` vector (tensor, array or list) or a dict ``{column name: (K,) vector}`` (e.g. ``all_scheme_weights``)."""
    columns = weights if isinstance(weights, dict) else {"weight": weights}
    columns = {name: np.asarray(torch.as_tensor(w, dtype=torch.float64)).reshape(-1) for name, w in columns.items()}
    num_classes = stats.num_classes
    for name, column in columns.items():
        if column.shape != (num_classes,):
            raise ValueError(f"format_weight_table: {name} has {column.size} values for {num_classes} classes.")
    if len(class_names) != num_classes:
        raise ValueError(f"format_weight_table: {len(class_names)} class names for {num_classes} classes.")

    def share(pct: float) -> str:
        if pct == 0:
            return "0"
        return "<0.01" if pct < 0.01 else f"{pct:.2f}"

    header = ["class", "pixels %", "images", *columns]
    rows = [
        [
            str(name),
            share(100.0 * stats.pixel_share[c]),
            f"{stats.image_counts[c]}/{stats.num_images}",
            *(f"{column[c]:.4g}" for column in columns.values()),
        ]
        for c, name in enumerate(class_names)
    ]
    widths = [max(len(row[j]) for row in [header, *rows]) for j in range(len(header))]

    def join(cells: list[str]) -> str:
        return "  ".join(cell.ljust(w) if j == 0 else cell.rjust(w) for j, (cell, w) in enumerate(zip(cells, widths)))

    lines = [join(header), join(["-" * w for w in widths])]
    for c, row in enumerate(rows):
        lines.append(join(row) + ("  (absent from split)" if stats.pixel_counts[c] == 0 else ""))
    return "\n".join(text.rstrip() for text in lines)
