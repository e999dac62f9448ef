"""Helpers shared by every loss family: float32 math with autocast off, ignored pixels, weighted means, counts.

Conventions are those of :mod:`train_seg.losses._functional` (its module docstring states them in full).
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import Tensor

__all__ = ["TINY", "float32_math", "split_target", "pixel_weights", "weighted_pixel_mean", "class_counts",
           "safe_pow"]

# Denominators of weighted means are clamped to this: 0 / TINY = 0 for an empty (all ignored) batch.
TINY = 1e-12


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
