"""One training epoch and one evaluation pass. One code path for CPU and CUDA: only the autocast dtype and the
GradScaler's ``enabled`` flag differ (fp16 needs loss scaling, bf16 and fp32 do not).
"""
from __future__ import annotations

import math
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from tqdm import tqdm  # not tqdm.auto: its asyncio class calls iter(loader) a second time (extra workers)

from train_seg.metrics import ConfusionMatrix, predictions


@dataclass(frozen=True)
class LoopSettings:
    """How the loop runs on its device: the autocast dtype (None = fp32), memory format, the auxiliary-head loss
    weight, gradient clipping, how often the loss is read back and logged, and whether progress bars show."""

    device: torch.device
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False
    aux_weight: float = 0.0
    grad_clip: float | None = None
    log_every: int = 10
    progress: bool = True

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager:
    """Mixed-precision context for ``dtype`` on ``device`` (a disabled autocast, i.e. fp32, when dtype is None)."""
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def to_device(images: torch.Tensor, settings: LoopSettings) -> torch.Tensor:
    return images.to(settings.device, non_blocking=True).contiguous(memory_format=settings.memory_format)


def predict_batch(model: nn.Module, images: torch.Tensor, device: torch.device, amp_dtype: torch.dtype | None = None,
                  channels_last: bool = False) -> torch.Tensor:
    """The one inference step: images ``(N, C, H, W)`` to the device, autocast, ``model(x)["out"]``.

    Returns the logits ``(N, K, H, W)`` on the device, in the autocast dtype (bf16 logits are exact in float32, so
    an arg-max needs no copy). The caller puts the model in eval mode and disables autograd."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
    with autocast(device, amp_dtype):
        return model(images)["out"]


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


def _optimizer_step(loss: torch.Tensor, model: nn.Module, optimizer, scheduler, scaler, grad_clip) -> None:
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if grad_clip is not None:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    if scheduler is not None:
        scheduler.step()


def train_one_epoch(model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                    scaler: torch.amp.GradScaler, loader, settings: LoopSettings, *, epoch: int, global_step: int,
                    max_steps: int | None = None,
                    on_log: Callable[[dict, int], None] | None = None) -> tuple[int, float]:
    """Trains until the loader is exhausted or ``global_step`` reaches ``max_steps``.

    The loss is accumulated on the device and read back (a host sync) only every ``settings.log_every`` steps, when
    ``train/loss``, ``train/loss/<term>`` and ``train/lr`` are handed to ``on_log(scalars, step)``.
    Returns ``(global_step, mean loss over the epoch's steps)``.
    """
    model.train()
    loss_sum = torch.zeros((), device=settings.device)
    window_sum = torch.zeros((), device=settings.device)
    term_sums: dict[str, torch.Tensor] = {}
    steps = window_steps = images_seen = 0
    tic = time.perf_counter()
    bar = tqdm(loader, desc=f"train {epoch}", disable=not settings.progress, dynamic_ncols=True, leave=False)
    for images, targets in bar:
        if max_steps is not None and global_step >= max_steps:
            break
        images, targets = to_device(images, settings), targets.to(settings.device, non_blocking=True)
        with autocast(settings.device, settings.amp_dtype):
            loss, _, terms = forward_loss(model, criterion, images, targets, settings.aux_weight)
        _optimizer_step(loss, model, optimizer, scheduler, scaler, settings.grad_clip)
        global_step, steps, window_steps = global_step + 1, steps + 1, window_steps + 1
        images_seen += images.shape[0]
        loss_sum += loss.detach()
        window_sum += loss.detach()
        for name, value in terms.items():
            term_sums[name] = term_sums.get(name, 0) + value.float()
        if window_steps == settings.log_every:
            # sync point: once every log_every steps, never per step
            scalars = _window_scalars(window_sum, term_sums, window_steps, optimizer)
            if on_log is not None:
                on_log(scalars, global_step)
            rate = images_seen / max(time.perf_counter() - tic, 1e-9)
            bar.set_postfix(loss=f"{scalars['train/loss']:.4f}", lr=f"{scalars['train/lr']:.2e}", img_s=f"{rate:.1f}")
            window_sum.zero_()
            term_sums.clear()
            window_steps = 0
    if window_steps and on_log is not None:
        on_log(_window_scalars(window_sum, term_sums, window_steps, optimizer), global_step)
    bar.close()
    return global_step, float(loss_sum) / steps if steps else math.nan


def _window_scalars(window_sum: torch.Tensor, term_sums: dict, steps: int, optimizer) -> dict[str, float]:
    """Mean loss and per-term losses over the last ``steps`` steps, and the current lr (reads the device once)."""
    scalars = {"train/loss": float(window_sum) / steps, "train/lr": optimizer.param_groups[0]["lr"]}
    scalars.update({f"train/loss/{name}": float(value) / steps for name, value in term_sums.items()})
    return scalars


@torch.inference_mode()
def evaluate(model: nn.Module, loader, num_classes: int, settings: LoopSettings, desc: str = "eval",
             infer: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None) -> ConfusionMatrix:
    """Accumulates one confusion matrix over the whole loader (on the device), reduced across processes once.
    ``infer(model, images) -> logits`` replaces the plain ``predict_batch`` (sliding windows, test-time
    augmentation: ``train_seg.inference.infer_logits``)."""
    model.eval()
    confusion = ConfusionMatrix(num_classes, device=settings.device)
    tic = time.perf_counter()
    seen = 0
    bar = tqdm(loader, desc=desc, disable=not settings.progress, dynamic_ncols=True, leave=False)
    for images, targets in bar:
        logits = (predict_batch(model, images, settings.device, settings.amp_dtype, settings.channels_last)
                  if infer is None else infer(model, images))
        confusion.update(predictions(logits), targets.to(settings.device, non_blocking=True))
        seen += images.shape[0]
        bar.set_postfix(img_s=f"{seen / max(time.perf_counter() - tic, 1e-9):.1f}", refresh=False)
    bar.close()
    confusion.reduce()
    return confusion
