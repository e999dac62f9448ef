"""One training epoch and one evaluation pass. One code path for CPU and CUDA: only the autocast dtype and the
GradScaler's ``enabled`` flag differ (fp16 needs loss scaling, bf16 and fp32 do not).
"""
from __future__ import annotations

import math
import time
from contextlib import AbstractContextManager
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from train_seg.metrics import ConfusionMatrix, predictions

# trainer.precision -> autocast dtype (None = full fp32)
PRECISIONS = {"32": None, "16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager:
    """Mixed-precision context for ``dtype`` on ``device`` (a disabled autocast, i.e. fp32, when dtype is None)."""
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def forward_loss(model: nn.Module, criterion: nn.Module, images, targets, aux_weight: float):
    """Model forward + loss; torchvision's DeepLabV3 returns ``{"out": logits, "aux": aux_logits?}``.

    The auxiliary head (if any) is trained with the same criterion, scaled by ``aux_weight``.
    Returns ``(loss, logits, terms)`` with ``terms`` the detached per-term values of a ``WeightedSum`` loss.
    """
    outputs = model(images)
    loss = criterion(outputs["out"], targets)
    terms = dict(getattr(criterion, "last_terms", None) or {})
    if "aux" in outputs and aux_weight > 0:
        aux = criterion(outputs["aux"], targets)
        terms["aux"] = aux.detach()
        loss = loss + aux_weight * aux
    return loss, outputs["out"], terms


def train_one_epoch(
    model: nn.Module,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    scaler: torch.amp.GradScaler,
    loader,
    device: torch.device,
    *,
    epoch: int,
    global_step: int,
    amp_dtype: torch.dtype | None = None,
    aux_weight: float = 0.0,
    grad_clip: float | None = None,
    max_steps: int | None = None,
    channels_last: bool = False,
    log_every: int = 10,
    log_scalars: Callable[[dict, int], None] | None = None,
    progress: bool = True,
) -> tuple[int, float]:
    """Trains until the loader is exhausted or ``global_step`` reaches ``max_steps``.

    The loss is accumulated on the device and read back (a host sync) only every ``log_every`` steps, when
    ``train/loss``, ``train/loss/<term>`` and ``train/lr`` are logged through ``log_scalars(scalars, step)``.
    Returns ``(global_step, mean loss over the epoch's steps)``.
    """
    model.train()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    loss_sum = torch.zeros((), device=device)
    window_sum = torch.zeros((), device=device)
    term_sums: dict[str, torch.Tensor] = {}
    steps = window_steps = images_seen = 0
    tic = time.perf_counter()
    bar = tqdm(loader, desc=f"train {epoch}", disable=not progress, dynamic_ncols=True, leave=False)
    for images, targets in bar:
        if max_steps is not None and global_step >= max_steps:
            break
        images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        targets = targets.to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            loss, _, terms = forward_loss(model, criterion, images, targets, aux_weight)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if grad_clip is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        if scheduler is not None:
            scheduler.step()
        global_step += 1
        steps += 1
        window_steps += 1
        images_seen += images.shape[0]
        loss_sum += loss.detach()
        window_sum += loss.detach()
        for name, value in terms.items():
            term_sums[name] = term_sums.get(name, 0) + value.float()
        if window_steps == log_every:
            # sync point: once every log_every steps, never per step
            scalars = _window_scalars(window_sum, term_sums, window_steps, optimizer)
            if log_scalars is not None:
                log_scalars(scalars, global_step)
            rate = images_seen / max(time.perf_counter() - tic, 1e-9)
            bar.set_postfix(loss=f"{scalars['train/loss']:.4f}", lr=f"{scalars['train/lr']:.2e}", img_s=f"{rate:.1f}")
            window_sum.zero_()
            term_sums.clear()
            window_steps = 0
    if window_steps and log_scalars is not None:
        log_scalars(_window_scalars(window_sum, term_sums, window_steps, optimizer), global_step)
    bar.close()
    mean_loss = float(loss_sum) / steps if steps else math.nan
    return global_step, mean_loss


def _window_scalars(window_sum: torch.Tensor, term_sums: dict, steps: int, optimizer) -> dict[str, float]:
    """Mean loss and per-term losses over the last ``steps`` steps, and the current lr (reads the device once)."""
    scalars = {"train/loss": float(window_sum) / steps, "train/lr": optimizer.param_groups[0]["lr"]}
    scalars.update({f"train/loss/{name}": float(value) / steps for name, value in term_sums.items()})
    return scalars


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader,
    device: torch.device,
    num_classes: int,
    *,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    progress: bool = True,
    desc: str = "eval",
) -> ConfusionMatrix:
    """Accumulates one confusion matrix over the whole loader (on the device), reduced across processes once."""
    model.eval()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    confusion = ConfusionMatrix(num_classes, device=device)
    tic = time.perf_counter()
    seen = 0
    bar = tqdm(loader, desc=desc, disable=not progress, dynamic_ncols=True, leave=False)
    for images, targets in bar:
        images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        targets = targets.to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            logits = model(images)["out"]
        confusion.update(predictions(logits.float()), targets)
        seen += images.shape[0]
        bar.set_postfix(img_s=f"{seen / max(time.perf_counter() - tic, 1e-9):.1f}", refresh=False)
    bar.close()
    confusion.reduce()
    return confusion
