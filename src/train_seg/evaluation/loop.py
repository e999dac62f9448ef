"""The one evaluation loop and the one inference step it is built on. ``predict_batch`` is every forward pass of
inference (training's evaluation, overlays, ``evaluate``, ``predict``, export checks); ``evaluate`` accumulates one
confusion matrix (and, when asked, the object counts) over a loader, reduced across processes once. Evaluation steps
carry ``torch.profiler`` labels ``train_seg.eval_forward``, ``train_seg.eval_confusion`` and ``train_seg.eval_objects``."""
from __future__ import annotations

import time
from contextlib import AbstractContextManager
from typing import Callable

import torch
from torch import nn
from torch.profiler import record_function
from tqdm import tqdm  # not tqdm.auto: its asyncio class calls iter(loader) a second time (extra workers)

from train_seg.evaluation.metrics import ConfusionMatrix, predictions
from train_seg.evaluation.objects import ObjectCounts


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager:
    """Mixed-precision context for ``dtype`` on ``device`` (a disabled autocast, i.e. fp32, when dtype is None)."""
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def memory_format(channels_last: bool) -> torch.memory_format:
    """The memory format of models and batches: ``channels_last`` or the default contiguous one."""
    return torch.channels_last if channels_last else torch.contiguous_format


def to_device(images: torch.Tensor, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """A batch of images on ``device`` in the memory format of the model (``memory_format``)."""
    return images.to(device, non_blocking=True).contiguous(memory_format=memory_format(channels_last))


def predict_batch(model: nn.Module, images: torch.Tensor, device: torch.device, amp_dtype: torch.dtype | None = None,
                  channels_last: bool = False) -> torch.Tensor:
    """The one inference step: images ``(N, C, H, W)`` to the device, autocast, ``model(x)["out"]``.

    Returns the logits ``(N, K, H, W)`` on the device, in the autocast dtype (bf16 logits are exact in float32, so
    an arg-max needs no copy). The caller puts the model in eval mode and disables autograd."""
    images = to_device(images, device, channels_last)
    with autocast(device, amp_dtype):
        return model(images)["out"]


@torch.inference_mode()
def evaluate(model: nn.Module, loader, num_classes: int, settings, desc: str = "eval",
             infer: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
             stop: Callable[[], bool] | None = None, confusion_device: torch.device | None = None,
             objects: ObjectCounts | None = None,
             collect: Callable[[torch.Tensor, torch.Tensor], None] | None = None) -> ConfusionMatrix:
    """One confusion matrix over the whole loader, reduced across processes once; ``objects`` (if given) counts
    the objects of the same predictions (``train_seg.evaluation.objects``) and is reduced with it; ``collect``
    (if given) receives every batch's ``(logits, targets)`` (post-hoc calibration caches them).

    ``settings`` gives ``device``, ``amp_dtype``, ``channels_last`` and ``progress`` (a ``LoopSettings``).
    ``infer(model, images) -> logits`` replaces the plain ``predict_batch`` (sliding windows, test-time augmentation:
    ``train_seg.evaluation.inference.infer_logits``). ``stop()`` true (a stop signal) ends the pass early. The matrix
    lives on ``confusion_device`` (default: ``settings.device``)."""
    model.eval()
    confusion_device = settings.device if confusion_device is None else confusion_device
    confusion = ConfusionMatrix(num_classes, device=confusion_device)
    tic = time.perf_counter()
    seen = 0
    bar = tqdm(loader, desc=desc, disable=not settings.progress, dynamic_ncols=True, leave=False)
    for images, targets in bar:
        if stop is not None and stop():
            break
        with record_function("train_seg.eval_forward"):
            logits = (predict_batch(model, images, settings.device, settings.amp_dtype, settings.channels_last)
                      if infer is None else infer(model, images))
        with record_function("train_seg.eval_confusion"):
            labels = predictions(logits)
            confusion.update(labels.to(confusion_device), targets.to(confusion_device, non_blocking=True))
        if objects is not None:
            with record_function("train_seg.eval_objects"):
                objects.update(labels, targets)
        if collect is not None:
            collect(logits, targets)
        seen += images.shape[0]
        bar.set_postfix(img_s=f"{seen / max(time.perf_counter() - tic, 1e-9):.1f}", refresh=False)
    bar.close()
    confusion.reduce()
    if objects is not None:
        objects.reduce()
    return confusion
