"""What the training loop emits, and the interface of those who receive it.

The loop (``train_seg.engine.trainer.fit``) knows nothing of reporting. It hands plain results to a list of sinks, in this
order, every call on every sink:

1. ``on_train_start(run)`` once, before the first step (``run``: the ``train_seg.engine.state.Run`` with every built
   object, the class statistics and weights, the resolved config as a plain dict);
2. per epoch: ``on_train_log(TrainLog)`` every ``trainer.log_every`` steps, ``on_checkpoint(Checkpoint)`` when a
   mid-epoch checkpoint is due (``trainer.checkpoint_every_*`` or a stop signal), ``on_eval(EvalResult)`` on
   evaluated epochs, then ``on_epoch_end(EpochEnd)`` (which also writes a checkpoint);
3. ``on_train_end(run)`` once after the last epoch, or ``on_failure(error)`` once if the loop raised (then the
   error propagates).

A sink never calls back into the loop and never changes the training state; sinks that need the model (prediction
overlays) run inference through ``train_seg.evaluation.loop.predict_batch``, which consumes no random numbers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from train_seg.reporting import record
from train_seg.evaluation.metrics import metrics_from_confusion
from train_seg.evaluation.objects import OBJECT_KEYS, object_metrics

# per-class metric -> TensorBoard tag segment; scalar metrics logged as val/<key>
TAG_NAMES = {"iou": "IoU", "precision": "precision", "recall": "recall", "dice": "dice"}
SCALAR_KEYS = ("mIoU", "rare_mIoU", "pixel_acc", "mean_acc", "fwIoU")
# val/pred_share/<class>: share of the evaluated pixels predicted as the class (0 = never predicted, where
# val/precision/<class> is NaN and so has no point at all)
PRED_SHARE = "pred_share"
OBJECTS = "objects"  # val/objects/<recall|precision|f1|matched_iou|objects>/<class> (train_seg.evaluation.objects)


def eval_scalars(metrics: dict, class_names: Sequence[str], confusion: torch.Tensor | None = None) -> dict[str, float]:
    """Flattens ``metrics_from_confusion`` output into ``{"val/mIoU": ..., "val/IoU/<class>": ...}``; with the
    confusion matrix (rows target, columns prediction) also ``val/pred_share/<class>`` = column sum / total (NaN
    when no pixel was evaluated); with ``metrics["objects"]`` (``object_metrics``) ``val/objects/<key>/<class>``
    for the classes whose objects were counted."""
    out = {f"val/{key}": float(metrics[key]) for key in SCALAR_KEYS if key in metrics}
    for key, tag in TAG_NAMES.items():
        for name, value in zip(class_names, metrics[key].tolist()):
            out[f"val/{tag}/{name}"] = float(value)
    objects = metrics.get("objects")
    if objects is not None:
        for index, name in enumerate(class_names):
            if not math.isnan(float(objects["objects"][index])):
                for key in OBJECT_KEYS:
                    out[f"val/{OBJECTS}/{key}/{name}"] = float(objects[key][index])
    if confusion is not None:
        predicted = confusion.detach().to("cpu", torch.float64).sum(0)
        total = float(predicted.sum())
        for name, count in zip(class_names, predicted.tolist()):
            out[f"val/{PRED_SHARE}/{name}"] = count / total if total > 0 else float("nan")
    return out


@dataclass(frozen=True)
class TrainLog:
    """Mean ``train/loss`` (and ``train/loss/<term>``) over the last window of steps, and ``train/lr``."""

    epoch: int
    step: int
    scalars: dict[str, float]


@dataclass
class EvalResult:
    """One evaluation: the confusion matrix (rows target, columns prediction, on the CPU) and what follows from it.
    ``pixel_share`` is the training split's class share (what "rare" means), ``rare`` the rare-class mask;
    ``objects`` the ``ObjectCounts`` of the same pass (None: not counted), added to ``metrics`` as ``objects``."""

    epoch: int
    step: int
    confusion: torch.Tensor
    class_names: list[str]
    pixel_share: list[float]
    rare: torch.Tensor
    objects: Any = None
    metrics: dict = field(init=False)
    scalars: dict[str, float] = field(init=False)

    def __post_init__(self) -> None:
        self.metrics = metrics_from_confusion(self.confusion, self.rare)
        if self.objects is not None:
            self.metrics["objects"] = object_metrics(self.objects.counts, self.objects.classes)
        self.scalars = eval_scalars(self.metrics, self.class_names, self.confusion)

    def entry(self) -> dict[str, Any]:
        """The run record's evaluation entry (``final`` / ``best`` in metrics.json)."""
        per_class = record.per_class_entries(self.metrics, self.class_names, self.pixel_share)
        return record.evaluation_entry(self.epoch, self.step, self.scalars, per_class)


@dataclass(frozen=True)
class EpochEnd:
    """The end of an epoch: its history entry (as in metrics.json), its evaluation if one ran, whether it improved
    the optimized metric (then best.pt is this epoch's state), and the best entry so far."""

    epoch: int
    step: int
    train_loss: float
    history_entry: dict
    evaluation: EvalResult | None
    improved: bool
    best: dict


@dataclass(frozen=True)
class Checkpoint:
    """A mid-epoch checkpoint is due: ``epoch`` epochs are complete and ``progress`` (``engine.EpochProgress``) says
    how far the next one got; ``reason`` is ``steps``, ``minutes`` or ``signal``. Sinks that buffer (TensorBoard)
    flush, so that nothing they reported up to ``step`` is lost if the process dies after the checkpoint."""

    epoch: int
    step: int
    progress: Any
    reason: str


class Sink:
    """Base class of every sink: each hook is a no-op, override what you need (see the module docstring).

    A sink is built from a config node ``logger.<name>: {_target_: ..., key: value}``; a user's own sink is any
    importable class with these methods."""

    def on_train_start(self, run) -> None:
        pass

    def on_train_log(self, log: TrainLog) -> None:
        pass

    def on_checkpoint(self, checkpoint: Checkpoint) -> None:
        pass

    def on_eval(self, result: EvalResult) -> None:
        pass

    def on_epoch_end(self, end: EpochEnd) -> None:
        pass

    def on_train_end(self, run) -> None:
        pass

    def on_failure(self, error: BaseException) -> None:
        pass
