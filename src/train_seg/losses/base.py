"""What every loss shares: the ``SegmentationLoss`` base class, argument and input checks, float32 helpers.

Conventions of every loss of ``train_seg.losses`` (each class docstring states its own formula):

* Shapes: logits ``(N, C, H, W)`` of any float dtype (``C = 1`` for the binary losses); target ``(N, H, W)``
  of an integer dtype, labels in ``[0, C)`` (``{0, 1}`` for binary) or ``ignore_index``; a scalar result.
* dtype: float32 with autocast disabled, also under autocast (region sums over a million pixels overflow fp16,
  bf16 keeps 8 mantissa bits); pixel counts are exact int64 ``bincount``s.
* ``ignore_index`` pixels count nowhere: their labels become 0 before any gather (label 255 would crash a
  CUDA gather), then their contribution is masked out.
* Pixel losses reduce as ``sum_i w[y_i] l_i / sum_i w[y_i]`` over non-ignored pixels (scaling ``w`` leaves
  them unchanged); a batch without a valid pixel gives ``0 / max(0, 1e-12) = 0`` with a gradient graph.
* Errors: a ``ValueError`` whose message starts with the class name, names the argument and shows the bad
  value; the forward checks look at shapes and dtypes only and never sync the device.
"""

from __future__ import annotations

import contextlib
import functools
import math
import numbers

import torch
from torch import Tensor, nn

__all__ = ["SegmentationLoss", "TINY", "check_ignore_index", "check_number", "check_choice", "as_class_vector",
           "check_inputs", "autocast_off", "float32_math", "float32_on", "split_target", "pixel_weights",
           "weighted_pixel_mean", "class_counts", "safe_pow"]


# -- argument validation (constructors) -------------------------------------------------------------------------
def check_ignore_index(owner: str, ignore_index) -> int:
    """``ignore_index`` as an int (bool is refused), else a ValueError."""
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
    """``value`` if it is one of ``choices``, else a ValueError listing them."""
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


# Denominators of weighted means are clamped to this: 0 / TINY = 0 for an empty (all ignored) batch.
TINY = 1e-12


def autocast_off(device_type: str):
    """A context disabling autocast on ``device_type`` (a no-op where autocast does not exist)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def float32_math(fn):
    """Runs ``fn(logits, target, ...)`` with autocast disabled and float32 logits (see the module docstring)."""
    @functools.wraps(fn)
    def wrapper(logits: Tensor, target: Tensor, *args, **kwargs):
        with autocast_off(logits.device.type):
            return fn(logits.float(), target, *args, **kwargs)
    return wrapper


def split_target(target: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """``(safe_target, valid)``: int64 labels with ignored pixels set to 0 (safe to gather), and the bool mask
    of non-ignored pixels."""
    target = target.long()
    valid = target != ignore_index
    return target.masked_fill(~valid, 0), valid


def float32_on(vector: Tensor | None, like: Tensor) -> Tensor | None:
    """``vector`` as float32 on the device of ``like``; None stays None."""
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


class SegmentationLoss(nn.Module):
    """Base class of the segmentation losses, called as ``loss(logits, target)`` (see the module docstring).

    A loss class declares, as class attributes: ``binary`` -- True for one-channel sigmoid losses (logits
    ``(N, 1, H, W)``, class-weight vector ``[w_bg, w_fg]``), False for multi-class softmax losses (one weight
    per class); the config check pairs ``model.binary_head`` with the losses by it. ``takes_class_weights`` --
    True exactly when the constructor accepts ``weight``, the class-weight vector the builder
    (``train_seg.engine.builder``) injects; it is kept as the non-persistent buffer ``self.weight`` (None when not
    given), so ``.to(device)`` moves it and checkpoints do not store it. ``repr_fields`` -- the attribute names
    shown by ``repr``, in order. The constructor validates ``ignore_index`` (stored as ``self.ignore_index``)
    and, when ``takes_class_weights``, ``weight`` (finite, >= 0, not all zero; exactly 2 entries when
    ``binary``); a ``weight`` given to a class that takes none is a TypeError.

    Subclasses call ``super().__init__(ignore_index=..., weight=...)`` (``weight`` only if they take class
    weights), validate their own arguments, and in ``forward`` call ``check_inputs`` before the math.
    """

    binary: bool = False
    takes_class_weights: bool = False
    repr_fields: tuple[str, ...] = ("ignore_index",)

    def __init__(self, ignore_index: int = 255, weight=None):
        super().__init__()
        self.ignore_index = check_ignore_index(self.owner, ignore_index)
        if self.takes_class_weights:
            vector = as_class_vector(self.owner, "weight", weight, length=2 if self.binary else None)
            self.register_buffer("weight", vector, persistent=False)
        elif weight is not None:
            raise TypeError(f"{self.owner}: takes_class_weights is False, so it has no weight argument")

    @property
    def owner(self) -> str:
        """The class name, which starts every error message."""
        return type(self).__name__

    def check_inputs(self, logits: Tensor, target: Tensor, **class_vectors) -> None:
        """Shape and dtype checks of ``forward(logits, target)`` (one-channel logits when ``binary``); the
        ``weight`` buffer and any other ``class_vectors`` must have one entry per class. Never syncs the device."""
        if self.takes_class_weights:
            class_vectors = {"weight": self.weight, **class_vectors}
        check_inputs(self.owner, logits, target, binary=self.binary, **class_vectors)

    def _repr_field(self, name: str) -> str:
        """The text of field ``name`` in ``repr``: floats as ``:g``, strings and tuples as ``repr``, else ``str``."""
        value = getattr(self, name)
        if isinstance(value, float):
            return f"{value:g}"
        if isinstance(value, (str, tuple)):
            return repr(value)
        return str(value)

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={self._repr_field(name)}" for name in self.repr_fields)
