"""``python -m train_seg.cli.evaluate ckpt=<checkpoint file or run directory> [key=value ...]`` (``train-seg-evaluate``):
the per-class metrics of a trained model on a split of a dataset, at each image's original resolution (default) or
through the checkpoint's val pipeline, with the inference modes of ``train_seg.evaluation.inference``.

A Hydra app on ``configs/evaluate.yaml``. Model, classes, palette, normalisation, val pipeline and (unless the
command line names one) dataset come from the checkpoint; a dataset whose classes differ is an error. Training
pixel shares come from the run's metrics.json beside the checkpoint, else from the dataset's training split.
Prints the per-class table and writes, into a new output directory (one that holds an evaluation or a run is
refused): ``metrics.json`` (a ``RunRecord`` whose ``final`` is the evaluation entry, plus ``evaluation``: what was
evaluated and how), ``confusion.csv`` (pixels; rows = true class, columns = predicted) and ``confusion.png``
(row-normalised). Bad input exits with status 2 and one paragraph
(``train_seg.config.command_line.exit_with_user_error``). See docs/using-a-model.md.
"""
from __future__ import annotations

from functools import partial

import csv
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from train_seg.engine import builder as build

from train_seg.reporting import record
from train_seg.atomic import atomic_write
from train_seg.checkpoint import CALIBRATION_MODES, CheckpointError, CheckpointMeta, open_checkpoint
from train_seg.config.command_line import (CONFIG_DIR, USER_ERRORS, exit_with_user_error, hydra_quoted,
                                          report_hydra_errors)
from train_seg.config.validation import PRECISIONS, ConfigError, normalize_precision, resolve_device, resolve_precision
from train_seg.data.base import DatasetError, SegmentationDataset, SegmentationSource
from train_seg.data.class_stats import compute_class_stats
from train_seg.reporting.events import EvalResult
from train_seg.engine.loop import LoopSettings
from train_seg.evaluation.loop import evaluate
from train_seg.evaluation.objects import OBJECT_MODES, object_counter
from train_seg.evaluation.inference import InferenceSettings, infer_logits, to_model_input
from train_seg.cli.args import ACCUMULATE, check, choice, integer, optional
from train_seg.reporting.sinks.console import format_class_table, precision_name, starved_note

log = logging.getLogger("train_seg")

PROG = "train_seg.cli.evaluate"
SPLITS = ("val", "train", "test", "calib")
RESOLUTIONS = ("original", "pipeline")
CONFUSION_CSV, CONFUSION_PNG = "confusion.csv", "confusion.png"


@dataclass(frozen=True)
class Options:
    """The checked keys of configs/evaluate.yaml."""

    ckpt: str
    calibration: str
    split: str
    resolution: str
    infer: InferenceSettings
    accumulate: str
    batch_size: int | None
    num_workers: int
    device: str
    precision: str | None
    channels_last: bool | None
    progress: bool
    output_dir: Path
    metrics: dict  # metrics.objects, metrics.min_object_pixels; None = the checkpoint's


def read_options(cfg) -> Options:
    """The config's keys, checked with the converters of ``train_seg.cli.args`` (``ConfigError`` naming the key)."""
    if OmegaConf.is_missing(cfg, "ckpt") or cfg.ckpt in (None, ""):
        raise ConfigError("ckpt is required: ckpt=<checkpoint file (best.pt / last.pt) or run directory>, e.g. "
                          "`python -m train_seg.cli.evaluate ckpt=outputs/2026-11-22/09-00-00`.")
    inference = OmegaConf.to_container(cfg.inference, resolve=True)
    tta = OmegaConf.to_container(cfg.tta, resolve=True)
    names = {"flip": "tta.flip", "scales": "tta.scales", **{k: f"inference.{k}" for k in inference}}
    metrics = OmegaConf.to_container(cfg.metrics, resolve=True) if cfg.get("metrics") is not None else {}
    return Options(
        ckpt=str(cfg.ckpt), calibration=check("calibration", cfg.get("calibration", "auto"), choice(*CALIBRATION_MODES)),
        split=check("split", cfg.split, choice(*SPLITS)),
        resolution=check("resolution", cfg.resolution, choice(*RESOLUTIONS)),
        infer=InferenceSettings.from_mapping({**inference, **tta}, names=names),
        accumulate=check("inference.accumulate", inference.get("accumulate", "device"), choice(*ACCUMULATE)),
        batch_size=check("batch_size", cfg.batch_size, optional(integer(1))),
        num_workers=check("num_workers", cfg.num_workers, integer(0)), device=str(cfg.device),
        precision=None if cfg.precision is None else str(cfg.precision),
        channels_last=None if cfg.channels_last is None else bool(cfg.channels_last),
        progress=bool(cfg.progress), output_dir=Path(str(cfg.output_dir)),
        metrics={"objects": check("metrics.objects", metrics.get("objects"), optional(choice(*OBJECT_MODES))),
                 "min_object_pixels": check("metrics.min_object_pixels", metrics.get("min_object_pixels"),
                                            optional(integer(1)))},
    )


# -- what to evaluate ------------------------------------------------------------------------------------------
def dataset_config(cfg, meta: CheckpointMeta):
    """The dataset node to read: a command-line option (``dataset=<option>``, a node with ``_target_``) as it is,
    else the checkpoint's own dataset config with any command-line ``dataset.<key>`` merged in."""
    own = meta.config.get("dataset")
    given = cfg.get("dataset")
    if given is not None and "_target_" in given:
        return given
    if not own:
        raise CheckpointError(f"{meta.path}: its config has no dataset node; name one: dataset=<option> "
                              "dataset.root=...")
    if given is None:
        return OmegaConf.create(own)
    try:
        keys = OmegaConf.to_container(given, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as exc:
        raise ConfigError(f"dataset.{exc.key} is required but not set.") from exc
    return OmegaConf.merge(OmegaConf.create(own), keys)


def check_classes(source: SegmentationSource, meta: CheckpointMeta, name: str, split: str) -> None:
    if list(source.class_names) != meta.class_names:
        raise CheckpointError(
            f"the dataset ({name}, {split} split) has the classes {list(source.class_names)}, but the checkpoint "
            f"{meta.path} was trained on {meta.class_names}. Evaluate on a dataset with the same classes in the same "
            "order (for a folder dataset: dataset.classes=[...])."
        )


def training_stats(meta: CheckpointMeta, dataset_cfg, cache_dir: str, progress: bool) -> dict:
    """Class statistics of the training split: the run's metrics.json beside the checkpoint when its classes match,
    else computed from the dataset config's training split (and cached, as training does)."""
    try:
        run = record.read(meta.path.parent)
        stats = (run.class_stats or {}).get("train") or {}
        if list(run.class_names) == meta.class_names and len(stats.get("pixel_share") or []) == meta.num_classes:
            return stats
    except record.RecordError:
        pass
    source = build.build_source(dataset_cfg, "train")
    source.validate()
    return compute_class_stats(source, cache_dir=cache_dir, progress=progress).to_dict(include_presence=False)


class OriginalImages(torch.utils.data.Dataset):
    """Each image of a source at its own size, only normalised (``train_seg.evaluation.inference.to_model_input``), with its
    mask: ``((3, H, W) float32, (H, W) int64)``."""

    def __init__(self, source: SegmentationSource, meta: CheckpointMeta):
        self.source, self.meta = source, meta

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        image = to_model_input(self.source.load_image(index), self.meta)[0]
        mask = torch.from_numpy(np.asarray(self.source.load_mask(index)).astype(np.int64))
        if tuple(mask.shape) != tuple(image.shape[-2:]):
            raise DatasetError(f"{self.source.describe(index)}: the image is {tuple(image.shape[-2:])} (HxW) but its "
                               f"mask {tuple(mask.shape)}; they must be the same size.")
        return image, mask


def make_loader(options: Options, meta: CheckpointMeta, source: SegmentationSource, batch_size: int):
    """``original``: one image at a time at its own size; ``pipeline``: batches through the checkpoint's val
    pipeline (``dataset.transforms.val`` of its config), as training evaluated."""
    if options.resolution == "pipeline":
        transform = build.build_transform(meta.config["dataset"], "val", int(meta.config.get("seed", 0)))
        dataset, batch = SegmentationDataset(source, transform), batch_size
    else:
        dataset, batch = OriginalImages(source, meta), 1
    return torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=False, drop_last=False,
                                       num_workers=options.num_workers)


# -- running it ------------------------------------------------------------------------------------------------
def run_settings(options: Options, meta: CheckpointMeta, device: torch.device) -> tuple:
    """``(amp_dtype, channels_last, batch_size)``: the keys, or the checkpoint's trainer settings where null."""
    trainer = meta.config.get("trainer") or {}
    precision = options.precision if options.precision is not None else str(trainer.get("precision", "32"))
    source = "precision" if options.precision is not None else "precision (the checkpoint's trainer.precision)"
    if normalize_precision(precision) not in PRECISIONS:
        raise ConfigError(f"{source}={precision!r} is not valid; choose one of {', '.join(PRECISIONS)}, or null.")
    try:
        amp_dtype = resolve_precision(precision, device)
    except (ConfigError, ValueError) as exc:
        raise ConfigError(str(exc).replace("trainer.precision", source) + " Set precision=32 or bf16-mixed.") from exc
    channels_last = options.channels_last if options.channels_last is not None else bool(
        trainer.get("channels_last", False))
    batch_size = options.batch_size or int(trainer.get("val_batch_size", 1))
    return amp_dtype, channels_last, batch_size


@dataclass
class Opened:
    """A checkpoint and a split ready to run through the evaluation loop (``open_evaluation``)."""

    model: torch.nn.Module
    meta: CheckpointMeta
    state: dict
    dataset_name: str
    source: SegmentationSource
    loader: torch.utils.data.DataLoader
    settings: LoopSettings
    infer: object
    accumulate: torch.device
    train_stats: dict
    share: list[float]
    rare: torch.Tensor
    batch_size: int


def open_evaluation(cfg, options: Options, calibration: str) -> Opened:
    """The checkpoint's model on the device (offsets of its calibration.json per ``calibration``), the split's
    source and loader, the run settings and the training split's class shares. ``ConfigError`` /
    ``CheckpointError`` / ``DatasetError`` for bad input, before any image is inferred."""
    device = resolve_device(options.device, key="device")
    model, meta, state = open_checkpoint(options.ckpt, device, calibration=calibration)
    amp_dtype, channels_last, batch_size = run_settings(options, meta, device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    dataset_cfg = dataset_config(cfg, meta)
    name = str(dataset_cfg.get("name") or dataset_cfg.get("_target_"))
    source = build.build_source(dataset_cfg, options.split)
    source.validate()
    check_classes(source, meta, name, options.split)
    train_stats = training_stats(meta, dataset_cfg, str(cfg.paths.cache_dir), options.progress)
    share = [float(s) for s in train_stats["pixel_share"]]
    rare = torch.as_tensor(np.asarray(share) < float(meta.config.get("rare_share", 0.01)))
    accumulate = torch.device("cpu") if options.accumulate == "cpu" else device
    infer = partial(infer_logits, device=device, amp_dtype=amp_dtype, channels_last=channels_last,
                    accumulate_device=accumulate, **options.infer.kwargs())
    settings = LoopSettings(device=device, amp_dtype=amp_dtype, channels_last=channels_last, progress=options.progress)
    return Opened(model, meta, state, name, source, make_loader(options, meta, source, batch_size), settings, infer,
                  accumulate, train_stats, share, rare, batch_size)


def evaluate_checkpoint(cfg) -> dict:
    """The whole command on a composed configs/evaluate.yaml: returns the metrics.json record written (a dict)."""
    options = read_options(cfg)
    record.refuse_existing(options.output_dir, (record.FILENAME, CONFUSION_CSV, CONFUSION_PNG, "last.pt"),
                           "an earlier evaluation or a training run", "Leave output_dir at its default (a new "
                           "timestamped directory under outputs/evaluate/) or choose a new one.")
    run = open_evaluation(cfg, options, options.calibration)
    meta = run.meta
    if meta.calibration is not None and meta.calibration.split == options.split:
        log.warning("the calibration of %s was fitted on this very split (%s): these numbers are not held-out; "
                    "evaluate another split, or pass calibration=none", meta.path, options.split)
    metrics_cfg = {**(meta.config.get("metrics") or {}), **{k: v for k, v in options.metrics.items() if v is not None}}
    objects = object_counter(metrics_cfg, run.rare, meta.ignore_index)
    confusion = evaluate(run.model, run.loader, meta.num_classes, run.settings, desc=f"evaluate {options.split}",
                         infer=run.infer, confusion_device=run.accumulate, objects=objects).matrix.cpu()
    result = EvalResult(meta.epoch or 0, meta.step or 0, confusion, meta.class_names, run.share, run.rare, objects)
    info = {"checkpoint": str(meta.path.resolve()), "dataset": run.dataset_name, "split": options.split,
            "resolution": options.resolution, "images": len(run.source), **options.infer.kwargs(),
            "batch_size": run.batch_size if options.resolution == "pipeline" or options.infer.mode == "slide" else 1,
            "device": str(run.settings.device), "precision": precision_name(run.settings.amp_dtype),
            "channels_last": run.settings.channels_last, "calibration": calibration_info(meta)}
    _report(result, meta, info)
    payload = evaluation_record(result, meta, run.state, run.train_stats, info)
    write_outputs(options.output_dir, payload, result, f"{run.dataset_name} {options.split}, {options.resolution} "
                                                       "resolution")
    return payload.to_dict()


def calibration_info(meta: CheckpointMeta) -> dict | None:
    """What metrics.json's ``evaluation.calibration`` says of the offsets applied (None: the model as trained)."""
    found = meta.calibration
    if found is None:
        return None
    return {"offsets": dict(zip(meta.class_names, found.offsets)), "method": found.method, "split": found.split,
            "metric": found.metric}


def _report(result: EvalResult, meta: CheckpointMeta, info: dict) -> None:
    table = format_class_table(result.metrics, result.class_names, result.pixel_share, rare=result.rare)
    note = starved_note(result.metrics, result.class_names, result.pixel_share, result.rare)
    calibrated = info.get("calibration")
    log.info("%s (epoch %s) on %s, %s split (%d images), %s resolution, %s inference%s%s:\n%s%s", meta.path,
             meta.epoch, info["dataset"], info["split"], info["images"], info["resolution"], info["mode"],
             ", flip + scales " + str(info["scales"]) if info["flip"] or info["scales"] != [1.0] else "",
             "" if calibrated is None else f", calibrated on {calibrated['split']} ({calibrated['method']}, "
             f"{calibrated['metric']})", table, f"\n{note}" if note else "")


def evaluation_record(result: EvalResult, meta: CheckpointMeta, state: dict, train_stats: dict,
                      info: dict) -> record.RunRecord:
    """The metrics.json of an evaluation: the checkpoint's training context, ``final`` = this evaluation."""
    config, weights, names = meta.config, state.get("class_weights"), meta.class_names
    weights = None if weights is None else torch.as_tensor(weights).tolist()
    return record.RunRecord(
        status="completed", optimized_metric=config.get("optimized_metric"), class_names=names,
        class_stats={"train": train_stats},
        class_weights=None if weights is None else {n: float(w) for n, w in zip(names, weights)},
        weighting=config.get("weighting"), rare_share=config.get("rare_share"),
        rare_classes=[n for n, r in zip(names, result.rare.tolist()) if r],
        final={**result.entry(), "evaluation": info},
    )


def write_confusion_csv(handle, confusion, class_names: Sequence[str]) -> None:
    writer = csv.writer(handle)
    writer.writerow(["true \\ predicted", *class_names])
    for name, row in zip(class_names, torch.as_tensor(confusion).tolist()):
        writer.writerow([name, *row])


def write_outputs(output_dir: Path, payload: record.RunRecord, result: EvalResult, title: str) -> None:
    """confusion.csv, confusion.png, then metrics.json (last: its presence means the evaluation is complete)."""
    from train_seg.reporting.plots import confusion_figure

    atomic_write(output_dir / CONFUSION_CSV, lambda handle: write_confusion_csv(handle, result.confusion,
                                                                                result.class_names))
    figure = confusion_figure(result.confusion, result.class_names, title)
    atomic_write(output_dir / CONFUSION_PNG, lambda handle: figure.savefig(handle, format="png"), binary=True)
    record.write(output_dir, payload)
    log.info("wrote %s, %s and %s in %s", record.FILENAME, CONFUSION_CSV, CONFUSION_PNG, output_dir)


# -- the command line ------------------------------------------------------------------------------------------
def quote_path(arg: str, key: str = "ckpt") -> str:
    """``ckpt=<path>`` quoted for Hydra's override grammar: sweep job directories are named like
    ``3_seed=0,weighting=sqrt_inverse``, and an unquoted ``=`` or ``,`` would be a syntax error or a sweep."""
    prefix = f"{key}="
    if not arg.startswith(prefix) or arg[len(prefix):][:1] in ("'", '"'):
        return arg
    if re.fullmatch(r"[\w./~:@%+-]*", arg[len(prefix):]):  # nothing Hydra's grammar would read as syntax
        return arg
    return prefix + hydra_quoted(arg[len(prefix):])


def command_line_overrides(args: Sequence[str]) -> list[str]:
    """``ckpt=<path>`` is quoted (``quote_path``). Without a dataset option on the command line,
    ``dataset.<key>=value`` sets a key of the checkpoint's own dataset config: it goes to Hydra as
    ``++dataset.<key>=value`` (the node is empty until the checkpoint is read)."""
    args = [quote_path(arg) for arg in args]
    if any(re.match(r"^\+{0,2}dataset=", arg) for arg in args):
        return args
    return ["++" + arg if arg.startswith("dataset.") and "=" in arg else arg for arg in args]


def run_checkpoint_command(prog: str, config_name: str, command: Callable[[DictConfig], float]) -> None:
    """The Hydra app of a command on a checkpoint (evaluate, calibrate): ``sys.argv`` rewritten by
    ``command_line_overrides``, ``configs/<config_name>.yaml`` composed, ``command(cfg)`` run; bad input (a bad
    override too) is one paragraph on stderr with exit status 2. Returns what Hydra returns."""
    sys.argv[1:] = command_line_overrides(sys.argv[1:])
    report_hydra_errors(prog)

    @hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name=config_name)
    def app(cfg: DictConfig) -> float:
        try:
            return command(cfg)
        except USER_ERRORS as exc:
            log.debug("traceback of the error above", exc_info=True)
            exit_with_user_error(prog, exc)

    app()


def _evaluated_miou(cfg: DictConfig) -> float:
    value = evaluate_checkpoint(cfg)["final"].get("val/mIoU")
    return float("nan") if value is None else float(value)


def main() -> None:
    """``python -m train_seg.cli.evaluate`` / ``train-seg-evaluate``."""
    run_checkpoint_command(PROG, "evaluate", _evaluated_miou)


if __name__ == "__main__":
    main()
