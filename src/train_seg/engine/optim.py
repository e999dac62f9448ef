"""Learning-rate schedules, stepped once per optimisation step (not per epoch)."""
from __future__ import annotations

import math

import torch

SCHEDULES = ("poly", "cosine", "constant")


def lr_factor(step: int, total_steps: int, kind: str = "poly", power: float = 0.9, warmup_steps: int = 0,
              warmup_factor: float = 0.001, min_factor: float = 0.0) -> float:
    """Multiplier of the base learning rate at optimisation step ``step`` (0-based).

    Warmup: for ``step < warmup_steps`` the factor rises linearly from ``warmup_factor`` to 1.
    After warmup, with ``t = (step - warmup_steps) / (total_steps - warmup_steps)`` clamped to [0, 1]:
    poly ``(1 - t) ** power`` (torchvision's reference recipe, power 0.9), cosine ``0.5 (1 + cos(pi t))``,
    constant ``1``; the result never falls below ``min_factor``.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return warmup_factor + (1.0 - warmup_factor) * step / warmup_steps
    span = max(1, total_steps - warmup_steps)
    t = min(max((step - warmup_steps) / span, 0.0), 1.0)
    if kind == "poly":
        factor = (1.0 - t) ** power
    elif kind == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * t))
    elif kind == "constant":
        factor = 1.0
    else:
        raise ValueError(f"scheduler.kind={kind!r} is not known; choose one of {', '.join(SCHEDULES)}.")
    return max(factor, min_factor)


def warmup_schedule(optimizer: torch.optim.Optimizer, total_steps: int, kind: str = "poly", power: float = 0.9,
                    warmup_steps: int = 0, warmup_factor: float = 0.001, min_factor: float = 0.0):
    """``LambdaLR`` over ``lr_factor``; ``total_steps`` is supplied by the trainer (max_steps or epochs x batches)."""
    if kind not in SCHEDULES:
        raise ValueError(f"scheduler.kind={kind!r} is not known; choose one of {', '.join(SCHEDULES)}.")
    if warmup_steps < 0 or not 0.0 < warmup_factor <= 1.0 or power <= 0:
        raise ValueError(
            f"scheduler: need warmup_steps >= 0, 0 < warmup_factor <= 1 and power > 0; got warmup_steps={warmup_steps}, "
            f"warmup_factor={warmup_factor}, power={power}."
        )
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(step, total_steps, kind, power, warmup_steps, warmup_factor, min_factor),
    )
