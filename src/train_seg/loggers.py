"""Where results go: the console (per-class table), TensorBoard event files and ``metrics.json`` in the run dir.

TensorBoard tags (class NAMES, not indices): ``train/loss``, ``train/loss/<term>``, ``train/lr``, ``val/mIoU``,
``val/rare_mIoU``, ``val/pixel_acc``, ``val/mean_acc``, ``val/fwIoU``, ``val/IoU/<class>``,
``val/precision/<class>``, ``val/recall/<class>``, ``val/dice/<class>``, ``best/<optimized_metric>`` and
``best/epoch`` (the best checkpoint so far). An absent class (NaN metric) is not written, so its curve shows a gap
instead of a fake 0.

Beyond scalars, ``TensorBoardLogger`` writes (see its methods): a custom-scalars layout (CUSTOM SCALARS tab: all
per-class IoU / recall / precision curves of a run on one chart each, and the rare classes on their own chart),
hparams (HPARAMS tab), the row-normalised confusion matrix ``val/confusion`` and the prediction overlays
``val/overlays`` (IMAGES tab) at every evaluation.
"""
from __future__ import annotations

import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

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


def describe_error(error: BaseException | str) -> str:
    """One line for metrics.json and the sweep summary: ``<ExceptionType>: <message>``."""
    if isinstance(error, BaseException):
        message = str(error).strip()
        return f"{type(error).__name__}: {message}" if message else type(error).__name__
    return str(error)


def mark_failed(run_dir: str | Path, error: BaseException | str, status: str = "failed") -> dict:
    """Records a failure in ``run_dir/metrics.json``: ``status`` becomes ``status`` (``failed``) and ``error``
    describes it.
    Everything already recorded (the last completed evaluation in ``final``, ``best``, ``history``) is kept; a run
    that failed before writing metrics.json gets a minimal file. An existing error message is not overwritten (the
    first, innermost description wins). Returns the payload written."""
    path = Path(run_dir) / "metrics.json"
    payload: dict = {}
    if path.is_file():
        try:
            payload = json.loads(path.read_text())
        except (OSError, ValueError):
            payload = {}
    if not payload:
        payload = {"status": status, "final": None, "best": None, "history": []}
    payload["status"] = status
    payload["error"] = payload.get("error") or describe_error(error)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, payload)
    return payload


# -- hparams ---------------------------------------------------------------------------------------------------
_MISSING = object()


def hparams_from_config(config: Mapping, keys: Sequence[str]) -> dict[str, Any]:
    """Values of the dotted ``keys`` of a plain (resolved) config dict, as TensorBoard hparams.

    Numbers, strings and booleans are kept; a config node becomes one compact string (``loss`` ->
    ``"FocalLoss(gamma=2.0, ignore_index=255)"``, the ``_target_``'s class name or a weighting's ``scheme`` first);
    lists and null become strings; a key missing from this config becomes ``"n/a"``. Every job of a sweep therefore
    logs the same hparam names, which the HPARAMS tab needs to line jobs up in one table."""
    out: dict[str, Any] = {}
    for key in keys:
        node: Any = config
        for part in str(key).split("."):
            node = node.get(part, _MISSING) if isinstance(node, Mapping) else _MISSING
        if node is _MISSING:
            out[key] = "n/a"
        elif isinstance(node, (bool, int, float, str)):
            out[key] = node
        else:
            out[key] = _compact(node)
    return out


def _compact(value: Any) -> str:
    if isinstance(value, Mapping):
        name = str(value.get("_target_") or value.get("scheme") or "").rsplit(".", 1)[-1]
        args = ", ".join(f"{k}={_compact(v)}" for k, v in value.items() if k not in ("_target_", "_partial_", "scheme"))
        return f"{name}({args})"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_compact(v) for v in value) + "]"
    return str(value)


def hparam_metric_tags(class_names: Sequence[str], optimized_metric: str) -> list[str]:
    """The scalar tags shown as metric columns of the HPARAMS tab (TensorBoard reads each tag's last value)."""
    tags = ["val/mIoU", "val/rare_mIoU", f"best/{optimized_metric}", "best/epoch"]
    return list(dict.fromkeys(tags + [f"val/IoU/{name}" for name in class_names]))


def custom_scalars_layout(class_names: Sequence[str], rare_names: Sequence[str] = ()) -> dict:
    """CUSTOM SCALARS layout: every class's IoU (recall, precision) of a run on one chart, the rare classes on their
    own chart, and the summary curves. Tags are regular expressions matched at the start of the tag."""
    per_class = {TAG_NAMES[key]: ["Multiline", [f"val/{TAG_NAMES[key]}/"]] for key in ("iou", "recall", "precision")}
    layout = {
        "per-class": per_class,
        "overview": {
            "mIoU and rare-class mIoU": ["Multiline", ["val/mIoU$", "val/rare_mIoU$", "best/val/"]],
            "train loss": ["Multiline", ["train/loss"]],
        },
    }
    if rare_names:
        escaped = "|".join(re.escape(name) for name in rare_names)
        layout["rare classes"] = {
            f"{TAG_NAMES[key]} of rare classes": ["Multiline", [f"val/{TAG_NAMES[key]}/({escaped})$"]]
            for key in ("iou", "recall", "precision")
        }
    return layout


class TensorBoardLogger:
    """Thin wrapper over ``SummaryWriter`` writing into the run directory; NaN scalars are skipped. Every method is a
    no-op when TensorBoard is disabled (callers check ``enabled`` before rendering anything expensive)."""

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

    def log_layout(self, class_names: Sequence[str], rare_names: Sequence[str] = ()) -> None:
        """The CUSTOM SCALARS layout (``custom_scalars_layout``); written once per run."""
        if self.writer is not None:
            self.writer.add_custom_scalars(custom_scalars_layout(class_names, rare_names))

    def log_hparams(self, hparams: dict[str, Any], metric_tags: Sequence[str]) -> None:
        """Registers this run in the HPARAMS tab: its hyperparameters and which scalar tags are its metrics.

        Written at the start of the run into the run's own event file. The HPARAMS tab takes each metric's value
        from the LAST point of that scalar tag in the run, so the columns fill in as training goes and a crashed
        job still shows its last evaluation. (``SummaryWriter.add_hparams`` is not used: it opens a second writer
        in a sub-directory, a new run in every run list, unless ``run_name="."``, and even then it re-writes each
        metric as one more scalar point, which would add a point to the ``val/*`` curves.)"""
        if self.writer is None:
            return
        from torch.utils.tensorboard.summary import hparams as hparams_summaries

        experiment, session_start, _ = hparams_summaries(hparams, {tag: 0.0 for tag in metric_tags})
        file_writer = self.writer._get_file_writer()
        file_writer.add_summary(experiment)
        file_writer.add_summary(session_start)

    def log_best(self, best: dict, step: int) -> None:
        """``best/<metric>`` and ``best/epoch`` of the best checkpoint so far (HPARAMS metric columns)."""
        if best:
            self.log_scalars({f"best/{best['metric']}": best["value"], "best/epoch": float(best["epoch"])}, step)

    def log_figure(self, tag: str, figure, step: int) -> None:
        """A matplotlib ``Figure`` as an image (rendered on the Agg canvas, see ``train_seg.visualize``)."""
        if self.writer is not None:
            from train_seg.visualize import figure_to_array

            self.writer.add_image(tag, figure_to_array(figure), step, dataformats="HWC")

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
