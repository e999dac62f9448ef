"""One training epoch (the evaluation pass is ``train_seg.evaluation.loop.evaluate``). One code path for CPU and CUDA: only the autocast dtype and the
GradScaler's ``enabled`` flag differ (fp16 needs loss scaling, bf16 and fp32 do not).

The parts of a step carry ``torch.profiler`` labels (``train_seg.to_device``, ``.forward``, ``.loss``,
``.backward``, ``.optimizer``), so a profile of a run
reads as the loop does (``scripts/profile_epoch.py``); they cost a few microseconds a step when no profiler runs.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.profiler import record_function
from tqdm import tqdm  # not tqdm.auto: its asyncio class calls iter(loader) a second time (extra workers)

from train_seg.evaluation.loop import autocast, memory_format, to_device


@dataclass(frozen=True)
class LoopSettings:
    """How the loop runs on its device: the autocast dtype (None = fp32), memory format, the auxiliary-head loss
    weight, gradient clipping, how often the loss is read back and logged, whether progress bars show, and after how
    many consecutive non-finite steps training stops."""

    device: torch.device
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False
    aux_weight: float = 0.0
    grad_clip: float | None = None
    log_every: int = 10
    progress: bool = True
    max_bad_steps: int = 25

    @property
    def memory_format(self) -> torch.memory_format:
        return memory_format(self.channels_last)


def forward_loss(model: nn.Module, criterion: nn.Module, images, targets, aux_weight: float):
    """Model forward + loss; torchvision's DeepLabV3 returns ``{"out": logits, "aux": aux_logits?}``.

    The auxiliary head (if any) is trained with the same criterion, scaled by ``aux_weight``.
    Returns ``(loss, logits, terms)`` with ``terms`` the detached per-term values of a ``WeightedSum`` loss.
    """
    with record_function("train_seg.forward"):
        outputs = model(images)
    with record_function("train_seg.loss"):
        loss = criterion(outputs["out"], targets)
        terms = dict(getattr(criterion, "last_terms", None) or {})
        if "aux" in outputs and aux_weight > 0:
            aux = criterion(outputs["aux"], targets)
            terms["aux"] = aux.detach()
            loss = loss + aux_weight * aux
    return loss, outputs["out"], terms


@dataclass
class EpochProgress:
    """How far an epoch got, and its partial sums: what a mid-epoch checkpoint records so that a resumed epoch ends
    with the same loss means and log windows as an uninterrupted one. ``batches`` counts consumed batches (also the
    skipped steps'); ``steps`` and ``loss_sum`` only the steps that updated the weights."""

    batches: int = 0
    steps: int = 0
    loss_sum: float = 0.0
    window_steps: int = 0
    window_sum: float = 0.0
    window_terms: dict = field(default_factory=dict)
    skipped: int = 0  # steps skipped in this epoch for a non-finite loss or gradient
    bad_streak: int = 0  # consecutive skipped steps, carried across epochs

    def to_dict(self) -> dict:
        return {**self.__dict__, "window_terms": dict(self.window_terms)}

    @classmethod
    def from_dict(cls, data: dict) -> "EpochProgress":
        return cls(**{**data, "window_terms": dict(data.get("window_terms") or {})})


class NonFiniteLossError(FloatingPointError):
    """``trainer.max_bad_steps`` optimizer steps in a row had a non-finite loss or gradient."""


def _optimizer_step(loss: torch.Tensor, model: nn.Module, optimizer, scheduler, scaler, grad_clip) -> bool:
    """Backward and optimizer step unless the loss or the gradient is non-finite (then no weight changes; with fp16
    the GradScaler skips such steps itself and lowers its scale). The scheduler steps either way, so the schedule
    stays a function of the step. Returns whether the weights were updated."""
    with record_function("train_seg.backward"):
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
    with record_function("train_seg.optimizer"):
        scaler.unscale_(optimizer)  # a no-op when the scaler is disabled (fp32, bf16)
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)
        finite = bool(torch.isfinite(norm) & torch.isfinite(loss.detach()))  # the one host sync of a step
        if finite:
            if grad_clip is not None:
                torch.nn.utils.clip_grads_with_norm_(model.parameters(), grad_clip, norm)
            scaler.step(optimizer)
        scaler.update()
        if scheduler is not None:
            scheduler.step()
    return finite


def train_one_epoch(model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                    scaler: torch.amp.GradScaler, loader, settings: LoopSettings, *, epoch: int, global_step: int,
                    max_steps: int | None = None,
                    on_log: Callable[[dict, int], None] | None = None,
                    progress: EpochProgress | None = None,
                    on_step: Callable[[EpochProgress, int], None] | None = None) -> tuple[int, float]:
    """Trains until the loader is exhausted or ``global_step`` reaches ``max_steps``.

    The loss is accumulated on the device and read back only every ``settings.log_every`` steps, when
    ``train/loss``, ``train/loss/<term>``, ``train/lr`` and ``train/skipped_steps`` (this epoch) are handed to
    ``on_log(scalars, step)``. A step whose loss or gradient is non-finite is skipped (no weight update, not in the
    loss means); after ``settings.max_bad_steps`` in a row ``NonFiniteLossError`` names the step and each loss term.
    ``progress`` continues a partly done epoch (its loader already starts after the consumed batches);
    ``on_step(progress, global_step)`` runs after every step but the epoch's last (checkpoints, signals).
    Returns ``(global_step, mean loss over the epoch's updating steps)``.
    """
    model.train()
    progress = progress if progress is not None else EpochProgress()
    sums = _DeviceSums(progress, settings.device)
    images_seen, tic = 0, time.perf_counter()
    epoch_batches = progress.batches + len(loader)
    bar = tqdm(loader, desc=f"train {epoch}", disable=not settings.progress, dynamic_ncols=True, leave=False,
               initial=progress.batches, total=epoch_batches)
    for images, targets in bar:
        if max_steps is not None and global_step >= max_steps:
            break
        with record_function("train_seg.to_device"):
            images, targets = to_device(images, settings.device, settings.channels_last), targets.to(settings.device, non_blocking=True)
        with autocast(settings.device, settings.amp_dtype):
            loss, _, terms = forward_loss(model, criterion, images, targets, settings.aux_weight)
        updated = _optimizer_step(loss, model, optimizer, scheduler, scaler, settings.grad_clip)
        global_step, progress.batches = global_step + 1, progress.batches + 1
        images_seen += images.shape[0]
        sums.count(updated, loss, terms)
        if progress.bad_streak >= settings.max_bad_steps:
            raise NonFiniteLossError(_bad_steps_message(global_step, loss, terms, progress.bad_streak))
        if progress.window_steps == settings.log_every:  # sync point: once every log_every steps, never per step
            scalars = sums.log_window(on_log, optimizer, global_step)
            rate = images_seen / max(time.perf_counter() - tic, 1e-9)
            bar.set_postfix(loss=f"{scalars['train/loss']:.4f}", lr=f"{scalars['train/lr']:.2e}", img_s=f"{rate:.1f}")
        # not after the epoch's last step: the epoch's end checkpoints (so a mid-epoch checkpoint at step S is
        # always followed by more training steps, and nothing else is ever logged at S after it)
        final = progress.batches == epoch_batches or (max_steps is not None and global_step >= max_steps)
        if on_step is not None and not final:
            sums.store()
            on_step(progress, global_step)
    if progress.window_steps:
        sums.log_window(on_log, optimizer, global_step)
    sums.store()
    bar.close()
    return global_step, progress.loss_sum / progress.steps if progress.steps else math.nan


class _DeviceSums:
    """The epoch's and the log window's loss sums, kept on the device (no host sync per step) and copied into the
    ``EpochProgress`` only when a checkpoint or the epoch's end needs them."""

    def __init__(self, progress: EpochProgress, device: torch.device):
        self.progress = progress
        self.loss = torch.tensor(progress.loss_sum, device=device)
        self.window = torch.tensor(progress.window_sum, device=device)
        self.terms = {name: torch.tensor(value, device=device) for name, value in progress.window_terms.items()}

    def count(self, updated: bool, loss: torch.Tensor, terms: dict) -> None:
        progress = self.progress
        if not updated:
            progress.skipped, progress.bad_streak = progress.skipped + 1, progress.bad_streak + 1
            return
        progress.steps, progress.window_steps, progress.bad_streak = progress.steps + 1, progress.window_steps + 1, 0
        self.loss += loss.detach()
        self.window += loss.detach()
        for name, value in terms.items():
            self.terms[name] = self.terms.get(name, 0) + value.float()

    def log_window(self, on_log, optimizer, step: int) -> dict[str, float]:
        """Hands the window's means to ``on_log`` and starts a new window; returns the scalars."""
        scalars = _window_scalars(self.window, self.terms, self.progress, optimizer)
        if on_log is not None:
            on_log(scalars, step)
        self.window.zero_()
        self.terms.clear()
        self.progress.window_steps = 0
        return scalars

    def store(self) -> None:
        progress = self.progress
        progress.loss_sum, progress.window_sum = float(self.loss), float(self.window)
        progress.window_terms = {name: float(value) for name, value in self.terms.items()}


def _bad_steps_message(step: int, loss: torch.Tensor, terms: dict, streak: int) -> str:
    values = ", ".join(f"{name}={float(value):.4g}" for name, value in terms.items())
    return (
        f"step {step}: {streak} optimizer steps in a row had a non-finite loss or gradient (loss={float(loss.detach()):.4g}"
        f"{'; terms: ' + values if values else ''}), so training stopped (trainer.max_bad_steps={streak}). Likely "
        "causes: a learning rate too high for this loss (lower optimizer.lr, or set trainer.grad_clip=1.0), fp16 "
        "overflow (use trainer.precision=bf16-mixed or 32), or non-finite values in the images or class weights. "
        "The skipped steps changed no weights, and the last checkpoint written before them (last.pt) is kept."
    )


def _window_scalars(window_sum: torch.Tensor, term_sums: dict, progress: EpochProgress, optimizer) -> dict[str, float]:
    """Mean loss and per-term losses over the window's updating steps (NaN if all were skipped), the current lr and
    the epoch's skipped steps (reads the device once)."""
    steps = progress.window_steps
    scalars = {"train/loss": float(window_sum) / steps if steps else math.nan,
               "train/lr": optimizer.param_groups[0]["lr"], "train/skipped_steps": float(progress.skipped)}
    scalars.update({f"train/loss/{name}": float(value) / steps for name, value in term_sums.items()})
    return scalars
