"""``python -m train_seg.cli.calibrate ckpt=<checkpoint file or run directory> [key=value ...]``
(``train-seg-calibrate``): per-class logit offsets for the arg-max, fitted after training on a held-out split.

A Hydra app on ``configs/calibrate.yaml`` (which extends evaluate.yaml: the same dataset, resolution, inference and
device keys). ``method=fit`` runs the split through the one evaluation loop, caches its logits
(``evaluation.calibration.LogitSample``, at most ``max_pixels``) and fits the offsets that maximise ``metric``
(``fit_offsets``); ``method=prior`` sets ``-tau * log(training pixel share)``. Writes ``calibration.json`` beside the
checkpoint (the split, metric, offsets, and the metric and per-class IoU before and after on the cached pixels),
which ``evaluate``, ``predict``, ``export`` and ``load_checkpoint_model`` apply by default. Refuses, with one
paragraph and exit status 2: ``split=val`` (what ``evaluate`` reports) unless ``allow_reported_split=true``, a
binary head, and an existing calibration.json unless ``overwrite=true``.
"""
from __future__ import annotations

import logging
import math

import torch

from train_seg.checkpoint import CALIBRATION_FILE, Calibration, CheckpointError
from train_seg.cli.args import check, choice, integer, number
from train_seg.cli.evaluate import open_evaluation, read_options, run_checkpoint_command
from train_seg.config.schema import OPTIMIZED_METRICS
from train_seg.config.validation import ConfigError
from train_seg.evaluation.calibration import METHODS, LogitSample, confusion_of, fit_offsets, prior_offsets, score
from train_seg.evaluation.loop import evaluate
from train_seg.evaluation.metrics import metrics_from_confusion

PROG = "train_seg.cli.calibrate"
REPORTED_SPLIT = "val"  # the split evaluate reports by default
log = logging.getLogger("train_seg")


def _refuse_reported_split(split: str, allowed: bool) -> None:
    if split == REPORTED_SPLIT and not allowed:
        raise ConfigError(
            f"split={split} is the split that evaluate reports: offsets fitted on it would be scored on the very "
            "pixels they were chosen for, and look better than they are. Fit on a held-out split instead: "
            "split=calib (the synthetic dataset's third split; for other datasets set dataset.holdout_fraction=0.1 "
            "when training, or name another split), or pass allow_reported_split=true if you mean it.")


def calibrate_checkpoint(cfg) -> Calibration:
    """The whole command on a composed configs/calibrate.yaml: returns the calibration written."""
    options = read_options(cfg)
    method = check("method", cfg.method, choice(*METHODS))
    metric = check("metric", cfg.metric, choice(*OPTIMIZED_METRICS))
    tau = check("tau", cfg.tau, number(0.0, 100.0))
    max_pixels = check("max_pixels", cfg.max_pixels, integer(1))
    _refuse_reported_split(options.split, bool(cfg.allow_reported_split))
    run = open_evaluation(cfg, options, calibration="none")
    meta = run.meta
    if meta.binary_head:
        raise CheckpointError(f"{meta.path} has a binary head (one sigmoid channel): calibrate moves the arg-max "
                              "between classes; for a binary head, choose the probability threshold instead.")
    target = meta.path.parent / CALIBRATION_FILE
    if target.exists() and not bool(cfg.overwrite):
        raise ConfigError(f"{target} already exists (an earlier calibration of this run); pass overwrite=true to "
                          "replace it. Nothing was written.")
    sample = LogitSample(max_pixels, meta.ignore_index, seed=int(meta.config.get("seed", 0)))
    evaluate(run.model, run.loader, meta.num_classes, run.settings, desc=f"calibrate {options.split}",
             infer=run.infer, confusion_device=run.accumulate, collect=sample.add)
    rare = run.rare
    if method == "prior":
        offsets = prior_offsets(run.share, tau)
        before = score(confusion_of(sample.logits, sample.labels, torch.zeros_like(offsets)), metric, rare)
        after = score(confusion_of(sample.logits, sample.labels, offsets), metric, rare)
    else:
        offsets, before, after = fit_offsets(sample.logits, sample.labels, metric, rare)
    found = Calibration(
        offsets=[float(v) for v in offsets], class_names=list(meta.class_names), method=method, split=options.split,
        metric=metric, before=before, after=after, checkpoint=str(meta.path.resolve()), step=meta.step,
        tau=tau if method == "prior" else None, pixels=int(sample.labels.numel()),
        iou_before=_ious(sample, torch.zeros(meta.num_classes), meta.class_names),
        iou_after=_ious(sample, offsets, meta.class_names))
    found.write(target)
    log.info("%s", report(found, sample.seen))
    log.info("wrote %s: evaluate, predict and export apply it (calibration=auto)", target)
    return found


def _ious(sample: LogitSample, offsets: torch.Tensor, names) -> dict[str, float | None]:
    iou = metrics_from_confusion(confusion_of(sample.logits, sample.labels, offsets))["iou"]
    return {name: None if math.isnan(v) else float(v) for name, v in zip(names, iou.tolist())}


def report(found: Calibration, seen: int) -> str:
    """The console table: per class its offset and IoU before/after on the cached pixels, then the metric."""
    width = max(12, *(len(n) for n in found.class_names))
    lines = [f"calibration ({found.method}) on the {found.split} split, {found.pixels} of {seen} pixels:",
             f"{'class':<{width}}  {'offset':>7}  {'IoU before':>10}  {'IoU after':>9}"]
    for name, offset in zip(found.class_names, found.offsets):
        cells = [found.iou_before[name], found.iou_after[name]]
        text = ["absent" if v is None else f"{v:.4f}" for v in cells]
        lines.append(f"{name:<{width}}  {offset:+7.3f}  {text[0]:>10}  {text[1]:>9}")
    lines.append(f"{found.metric}: {found.before:.4f} -> {found.after:.4f}")
    return "\n".join(lines)


def main() -> None:
    """``python -m train_seg.cli.calibrate`` / ``train-seg-calibrate``."""
    run_checkpoint_command(PROG, "calibrate", lambda cfg: calibrate_checkpoint(cfg).after)


if __name__ == "__main__":
    main()
