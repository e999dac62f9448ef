"""The console (and Hydra's job log ``train_seg.log``): the class-weight table at the start, one line per epoch,
and the per-class table after every evaluation."""
from __future__ import annotations

import logging
import math
from typing import Sequence

from train_seg.reporting.events import EpochEnd, Sink
from train_seg.losses.weighting import format_weight_table

log = logging.getLogger("train_seg")


def format_class_table(metrics: dict, class_names: Sequence[str], pixel_share: Sequence[float], rare=None) -> str:
    """Per-class console table: class, pixel share in the training split, IoU, precision, recall, and with
    ``metrics["objects"]`` the objects found / in the ground truth, object recall and object precision of the
    classes counted (blank for the others). A NaN shows as ``absent`` (IoU: neither present nor predicted; recall:
    not in the target) or ``no pred`` (precision of a class that was never predicted), never as a fake 0 or 1."""
    width = max(12, *(len(n) for n in class_names))
    objects = metrics.get("objects")
    header = f"{'class':<{width}}  {'share %':>8}  {'IoU':>7}  {'prec':>7}  {'recall':>7}"
    if objects is not None:
        header += f"  {'objects':>9}  {'obj rec':>7}  {'obj prec':>8}"
    lines = [header, "-" * len(header)]

    def cell(value: float, nan_text: str = "absent", size: int = 7) -> str:
        return f"{nan_text:>{size}}" if math.isnan(value) else f"{value:{size}.4f}"

    for index, name in enumerate(class_names):
        tag = " (rare)" if rare is not None and bool(rare[index]) else ""
        row = (f"{name:<{width}}  {100 * pixel_share[index]:8.3f}  {cell(metrics['iou'][index].item())}  "
               f"{cell(metrics['precision'][index].item(), 'no pred')}  {cell(metrics['recall'][index].item())}")
        if objects is not None and not math.isnan(float(objects["objects"][index])):
            found = f"{int(objects['found'][index])}/{int(objects['objects'][index])}"
            row += (f"  {found:>9}  {cell(float(objects['recall'][index]))}  "
                    f"{cell(float(objects['precision'][index]), 'no pred', 8)}")
        lines.append(row + tag)
    lines.append("-" * len(header))
    summary = f"mIoU {_fmt(metrics['mIoU'])}  pixel acc {_fmt(metrics['pixel_acc'])}  mean acc {_fmt(metrics['mean_acc'])}"
    if "rare_mIoU" in metrics:
        summary += f"  rare mIoU {_fmt(metrics['rare_mIoU'])}"
    lines.append(summary)
    return "\n".join(lines)


# a rare class below this IoU is called starved under the table
STARVED_IOU = 0.05


def starved_note(metrics: dict, class_names: Sequence[str], pixel_share: Sequence[float], rare) -> str:
    """One line per rare class whose IoU is below ``STARVED_IOU`` (or that was never predicted), saying whether it
    is lost to misses or to false alarms, and what to try. Empty when no rare class is starved."""
    lines = []
    for index, name in enumerate(class_names):
        iou = float(metrics["iou"][index])
        if rare is None or not bool(rare[index]) or math.isnan(iou) or iou >= STARVED_IOU:
            continue
        recall, precision = float(metrics["recall"][index]), float(metrics["precision"][index])
        if math.isnan(precision):
            why = "never predicted"
        elif recall < 0.5:
            why = f"mostly missed (recall {recall:.2f})"
        else:
            why = f"found but drowned in false alarms (recall {recall:.2f}, precision {precision:.2f})"
        lines.append(f"{name} ({100 * pixel_share[index]:.2f}% of training pixels) is starved: IoU {iou:.3f}, {why}. "
                     "Class weights (weighting=sqrt_inverse, power) or a region loss (loss=ce_dice) target this.")
    return "\n".join(lines)


def _fmt(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.4f}"


def precision_name(amp_dtype) -> str:
    return "fp32" if amp_dtype is None else str(amp_dtype).replace("torch.", "")


class ConsoleSink(Sink):
    def on_train_start(self, run) -> None:
        config = run.config
        table = format_weight_table(run.class_names, run.stats, run.weights)
        log.info("class weights (weighting=%s):\n%s", config["weighting"]["scheme"], table)
        trainer = config["trainer"]
        log.info("training %s on %s (%s) for %d epochs / %d steps, %d train and %d val images",
                 config["model"]["arch"], run.settings.device, precision_name(run.settings.amp_dtype),
                 int(trainer["max_epochs"]), run.total_steps, len(run.train_set), len(run.val_set))
        self.rare = run.rare

    def on_epoch_end(self, end: EpochEnd) -> None:
        if end.evaluation is None:
            log.info("epoch %d, step %d, train loss %.4f", end.epoch, end.step, end.train_loss)
            return
        result = end.evaluation
        table = format_class_table(result.metrics, result.class_names, result.pixel_share, rare=result.rare)
        note = starved_note(result.metrics, result.class_names, result.pixel_share, result.rare)
        log.info("epoch %d, step %d, train loss %.4f\n%s%s", end.epoch, end.step, end.train_loss, table,
                 f"\n{note}" if note else "")
