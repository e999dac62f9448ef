"""Where results go: the console (per-class table), TensorBoard event files and ``metrics.json`` in the run dir.

TensorBoard tags (class NAMES, not indices): ``train/loss``, ``train/loss/<term>``, ``train/lr``, ``val/mIoU``,
``val/rare_mIoU``, ``val/pixel_acc``, ``val/mean_acc``, ``val/fwIoU``, ``val/IoU/<class>``,
``val/precision/<class>``, ``val/recall/<class>``, ``val/dice/<class>``. An absent class (NaN metric) is not
written, so its curve shows a gap instead of a fake 0.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch

PER_CLASS_KEYS = ("iou", "precision", "recall", "dice")
TAG_NAMES = {"iou": "IoU", "precision": "precision", "recall": "recall", "dice": "dice"}
SCALAR_KEYS = ("mIoU", "rare_mIoU", "pixel_acc", "mean_acc", "fwIoU")


def eval_scalars(metrics: dict, class_names: Sequence[str]) -> dict[str, float]:
    """Flattens ``metrics_from_confusion`` output into ``{"val/mIoU": ..., "val/IoU/<class>": ...}``."""
    out = {f"val/{key}": float(metrics[key]) for key in SCALAR_KEYS if key in metrics}
    for key in PER_CLASS_KEYS:
        for name, value in zip(class_names, metrics[key].tolist()):
            out[f"val/{TAG_NAMES[key]}/{name}"] = float(value)
    return out


def per_class_records(metrics: dict, class_names: Sequence[str], pixel_share: Sequence[float]) -> dict[str, dict]:
    """``{class: {pixel_share, iou, precision, recall, dice, support}}`` with NaN turned into None (JSON null)."""
    records = {}
    for index, name in enumerate(class_names):
        record = {"pixel_share": float(pixel_share[index])}
        for key in PER_CLASS_KEYS:
            record[key] = _json_float(metrics[key][index].item())
        record["support"] = int(metrics["support"][index])
        records[name] = record
    return records


def format_class_table(metrics: dict, class_names: Sequence[str], pixel_share: Sequence[float], rare=None) -> str:
    """Per-class console table: class, pixel share in the training split, IoU, precision, recall.
    A NaN shows as ``absent`` (IoU: neither present nor predicted; recall: not in the target) or ``no pred``
    (precision of a class that was never predicted), never as a fake 0 or 1."""
    width = max(12, *(len(n) for n in class_names))
    header = f"{'class':<{width}}  {'share %':>8}  {'IoU':>7}  {'prec':>7}  {'recall':>7}"
    lines = [header, "-" * len(header)]

    def cell(value: float, nan_text: str = "absent") -> str:
        return f"{nan_text:>7}" if math.isnan(value) else f"{value:7.4f}"

    for index, name in enumerate(class_names):
        tag = " (rare)" if rare is not None and bool(rare[index]) else ""
        lines.append(
            f"{name:<{width}}  {100 * pixel_share[index]:8.3f}  {cell(metrics['iou'][index].item())}  "
            f"{cell(metrics['precision'][index].item(), 'no pred')}  {cell(metrics['recall'][index].item())}{tag}"
        )
    lines.append("-" * len(header))
    summary = f"mIoU {_fmt(metrics['mIoU'])}  pixel acc {_fmt(metrics['pixel_acc'])}  mean acc {_fmt(metrics['mean_acc'])}"
    if "rare_mIoU" in metrics:
        summary += f"  rare mIoU {_fmt(metrics['rare_mIoU'])}"
    lines.append(summary)
    return "\n".join(lines)


def _fmt(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.4f}"


def _json_float(value) -> float | None:
    value = float(value)
    return None if math.isnan(value) or math.isinf(value) else value


def write_json_atomic(path: str | Path, data: Any) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=False, default=_json_default)
    os.replace(tmp, path)


def _json_default(obj):
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj)}")


class TensorBoardLogger:
    """Thin wrapper over ``SummaryWriter`` writing into the run directory; NaN scalars are skipped."""

    def __init__(self, log_dir: str | Path, enabled: bool = True, flush_secs: int = 30):
        self.enabled = enabled
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(log_dir), flush_secs=flush_secs)

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        if self.writer is None:
            return
        for tag, value in scalars.items():
            if value is not None and not math.isnan(value):
                self.writer.add_scalar(tag, value, step)

    def log_text(self, tag: str, text: str, step: int = 0) -> None:
        if self.writer is not None:
            # TensorBoard renders text as markdown: indent by 4 spaces to keep a fixed-width table.
            self.writer.add_text(tag, "\n".join("    " + line for line in text.splitlines()), step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
