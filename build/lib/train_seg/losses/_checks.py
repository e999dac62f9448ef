"""Argument checks of the loss constructors and input checks of ``forward(logits, target)``.

Every failure is a ``ValueError`` whose message starts with the owner (the loss class name), names the argument
and shows the bad value. The forward checks look at shapes and dtypes only: they never sync the device.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

__all__ = ["check_ignore_index", "check_number", "check_choice", "as_class_vector", "check_inputs"]


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
