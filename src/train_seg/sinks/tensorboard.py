"""TensorBoard: everything a run shows in TensorBoard is written by ``TensorBoardSink``, into the run directory.

Tags (class NAMES, not indices): ``train/loss``, ``train/loss/<term>``, ``train/lr``, ``val/mIoU``,
``val/rare_mIoU``, ``val/pixel_acc``, ``val/mean_acc``, ``val/fwIoU``, ``val/IoU/<class>``,
``val/precision/<class>``, ``val/recall/<class>``, ``val/dice/<class>``, ``best/<optimized_metric>`` and
``best/epoch`` (the best checkpoint so far). An absent class (NaN metric) is not written, so its curve shows a gap
instead of a fake 0.

Beyond scalars: a custom-scalars layout (CUSTOM SCALARS tab: all per-class IoU / recall / precision curves of a run
on one chart each, and the rare classes on their own chart), hparams (HPARAMS tab), the class-weight table and the
config (TEXT tab), the row-normalised confusion matrix ``val/confusion`` and the prediction overlays
``val/overlays`` (IMAGES tab) at every evaluation, and ``val/per_class`` (IoU against training pixel share, recall and
precision bars) at the end of training.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from train_seg.events import TAG_NAMES, EpochEnd, EvalResult, Sink, TrainLog

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


class TensorBoardSink(Sink):
    """Writes the run's TensorBoard events (module docstring) into the run directory.

    Args (``logger.tensorboard`` in the config, where every default lives):
      flush_secs: how often the event file is flushed to disk.
      confusion_image: draw the row-normalised confusion matrix at every evaluation.
      num_overlays: this many fixed validation images drawn as image | ground truth | prediction at every
        evaluation (at least half contain the rarest class present in the val split); 0 = off.
      hparams: config keys logged as hyperparameters in the HPARAMS tab.
    """

    def __init__(self, flush_secs: int, confusion_image: bool, num_overlays: int, hparams: Sequence[str]):
        self.flush_secs = int(flush_secs)
        self.confusion_image = bool(confusion_image)
        self.num_overlays = int(num_overlays)
        self.hparams = list(hparams)
        self.tb: TensorBoardLogger | None = None
        self.overlays = None
        self.run = None
        self.last_result: EvalResult | None = None

    def on_train_start(self, run) -> None:
        import yaml

        from train_seg.visualize import OverlaySet, select_overlay_indices
        from train_seg.weighting import format_weight_table

        self.run = run
        self.tb = TensorBoardLogger(run.run_dir, flush_secs=self.flush_secs)
        step = run.global_step
        self.tb.log_text("class_weights", format_weight_table(run.class_names, run.stats, run.weights), step)
        self.tb.log_text("config", yaml.safe_dump(run.config, sort_keys=False), step)
        self.tb.log_layout(run.class_names, run.rare_names)
        self.tb.log_hparams(hparams_from_config(run.config, self.hparams),
                            hparam_metric_tags(run.class_names, run.config["optimized_metric"]))
        if self.num_overlays > 0:
            picks = select_overlay_indices(run.val_stats.presence, run.pixel_share, self.num_overlays)
            self.overlays = OverlaySet(run.val_set, picks, run.class_names, run.palette,
                                       run.val_set.source.ignore_index)

    def on_train_log(self, log: TrainLog) -> None:
        self.tb.log_scalars(log.scalars, log.step)

    def on_eval(self, result: EvalResult) -> None:
        from train_seg.visualize import confusion_figure

        self.last_result = result
        self.tb.log_scalars(result.scalars, result.step)
        if self.confusion_image:
            figure = confusion_figure(result.confusion, result.class_names, f"epoch {result.epoch}")
            self.tb.log_figure("val/confusion", figure, result.step)
        if self.overlays is not None:
            figure = self.overlays.figure(self._overlay_predictions(), f"epoch {result.epoch}")
            self.tb.log_figure("val/overlays", figure, result.step)

    def _overlay_predictions(self) -> list:
        from train_seg.engine import predict_batch
        from train_seg.metrics import predictions

        model, settings = self.run.model, self.run.settings
        model.eval()
        with torch.inference_mode():  # val images may differ in size: one at a time
            return [predictions(predict_batch(model, image.unsqueeze(0), settings.device, settings.amp_dtype,
                                              settings.channels_last))[0].cpu().numpy()
                    for image, _ in self.overlays.items]

    def on_epoch_end(self, end: EpochEnd) -> None:
        if end.evaluation is not None:
            self.tb.log_best(end.best, end.step)
        self.tb.flush()

    def on_train_end(self, run) -> None:
        if self.last_result is not None:
            from train_seg.sinks._figures import per_class_figure

            figure = per_class_figure(self.last_result, float(run.config["rare_share"]))
            self.tb.log_figure("val/per_class", figure, self.last_result.step)
        self.tb.close()

    def on_failure(self, error: BaseException) -> None:
        if self.tb is not None:
            self.tb.close()
