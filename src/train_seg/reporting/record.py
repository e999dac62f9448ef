"""The run record: the schema of ``metrics.json``, owned here and nowhere else.

Every writer and reader goes through this module (the run-files sink after every epoch and at the end,
``mark_failed`` for a job that failed before training, ``read`` for the sweep summary). JSON, written atomically,
versioned by ``version`` (2; a file without it is version 1, same keys). Keys: ``status`` (``running`` |
``completed`` | ``failed`` | ``interrupted``), ``error`` (``"<ExceptionType>: <message>"`` or null),
``optimized_metric``, ``class_names``, ``class_stats`` (``{"train", "val"}``, ``ClassStats.to_dict``),
``class_weights``, ``weighting``, ``rare_share``, ``rare_classes``, ``final`` (last evaluation entry), ``best``
(best entry plus ``metric`` and ``value``; both null before the first evaluation), ``history`` (per completed
epoch: ``epoch``, ``step``, ``train/loss``, ``train/seconds``, finite ``val/*`` scalars on evaluated epochs).
An evaluation entry is ``{"epoch", "step", "val/<metric>", "val/IoU/<class>", ..., "per_class": {class:
{"pixel_share", "iou", "precision", "recall", "dice", "support"[, "objects"]}}}`` (``objects``: object-level
counts of the classes ``metrics.objects`` selects, ``train_seg.evaluation.objects``); NaN is written as null.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

from train_seg.atomic import write_json_atomic

VERSION = 2
FILENAME = "metrics.json"
STATUSES = ("running", "completed", "failed", "interrupted", "pruned")  # pruned: stopped by an Optuna pruner
PER_CLASS_KEYS = ("iou", "precision", "recall", "dice")


class RecordError(ValueError):
    """A metrics.json that cannot be read with this schema."""


@dataclass
class RunRecord:
    status: str = "running"
    error: str | None = None
    optimized_metric: str | None = None
    class_names: list[str] = field(default_factory=list)
    class_stats: dict | None = None
    class_weights: dict[str, float] | None = None
    weighting: dict | None = None
    rare_share: float | None = None
    rare_classes: list[str] = field(default_factory=list)
    final: dict | None = None
    best: dict | None = None
    history: list[dict] = field(default_factory=list)
    version: int = VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "metrics.json") -> "RunRecord":
        """Accepts version 1 and 2 files; unknown keys are ignored, missing keys take their defaults."""
        if not isinstance(data, Mapping):
            raise RecordError(f"{source}: not a train_seg run record (expected a JSON object).")
        try:
            version = int(data.get("version", 1))
        except (TypeError, ValueError):
            raise RecordError(f"{source}: 'version' is {data.get('version')!r}, not a record version.") from None
        if version > VERSION:
            raise RecordError(f"{source}: written by a newer train_seg (record version {version}, this one reads "
                              f"<= {VERSION}); upgrade train_seg to read it.")
        known = {f.name for f in fields(cls)}
        record = cls(**{k: v for k, v in data.items() if k in known})
        record.version = VERSION
        return record


def path_of(run_dir_or_file: str | Path) -> Path:
    path = Path(run_dir_or_file)
    return path if path.suffix == ".json" else path / FILENAME


def write(run_dir: str | Path, record: RunRecord) -> Path:
    return write_json_atomic(path_of(run_dir), record.to_dict())


def read(run_dir_or_file: str | Path) -> RunRecord:
    """The record of a run directory (or of a metrics.json path). Raises ``RecordError`` when missing or unreadable."""
    path = path_of(run_dir_or_file)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RecordError(f"{path}: cannot be read ({exc}).") from exc
    return RunRecord.from_dict(data, str(path))


def refuse_existing(directory: Path, names: Sequence[str], holds: str, fix: str) -> None:
    """A directory that already holds any of ``names`` (an earlier run's results) is never written into: raises
    ``ConfigError`` "<directory> already holds <what> (<names found>), which this would overwrite. <fix>"."""
    from train_seg.config.validation import ConfigError

    taken = [name for name in names if (Path(directory) / name).exists()]
    if taken:
        raise ConfigError(f"{directory} already holds {holds} ({', '.join(taken)}), which this would overwrite. {fix}")


def describe_error(error: BaseException | str) -> str:
    """One line for metrics.json and the sweep summary: ``<ExceptionType>: <message>``."""
    if isinstance(error, BaseException):
        message = str(error).strip()
        return f"{type(error).__name__}: {message}" if message else type(error).__name__
    return str(error)


def status_of(error: BaseException) -> str:
    """The status of a run that stopped on ``error``: the error's own ``run_status`` if it names one
    (``search.study.TrialPruned``: ``pruned``), ``interrupted`` for a stop signal or Ctrl-C (a KeyboardInterrupt),
    else ``failed``."""
    return getattr(error, "run_status", None) or ("interrupted" if isinstance(error, KeyboardInterrupt) else "failed")


def mark_failed(run_dir: str | Path, error: BaseException | str, status: str = "failed") -> dict:
    """Records a failure in ``run_dir/metrics.json``: ``status`` (``failed`` or ``interrupted``) and ``error``.

    Everything already recorded (the last completed evaluation in ``final``, ``best``, ``history``) is kept; a run
    that failed before writing metrics.json (or whose file is unreadable) gets a fresh record. An existing error
    message is not overwritten (the first, innermost description wins). Returns the payload written, as a dict."""
    try:
        record = read(run_dir)
    except RecordError:
        record = RunRecord()
    record.status = status
    record.error = record.error or describe_error(error)
    write(run_dir, record)
    return record.to_dict()


# -- evaluation entries ----------------------------------------------------------------------------------------
def json_float(value) -> float | None:
    value = float(value)
    return None if math.isnan(value) or math.isinf(value) else value


def per_class_entries(metrics: Mapping, class_names: Sequence[str], pixel_share: Sequence[float]) -> dict[str, dict]:
    """``{class: {pixel_share, iou, precision, recall, dice, support}}`` from ``metrics_from_confusion`` output,
    NaN as None; a class whose objects were counted (``metrics["objects"]``) also gets ``objects``: ``{objects,
    found, recall, precision, f1, matched_iou}``."""
    entries = {}
    objects = metrics.get("objects")
    for index, name in enumerate(class_names):
        entry: dict[str, Any] = {"pixel_share": float(pixel_share[index])}
        for key in PER_CLASS_KEYS:
            entry[key] = json_float(metrics[key][index])
        entry["support"] = int(metrics["support"][index])
        if objects is not None and not math.isnan(float(objects["objects"][index])):
            entry["objects"] = {key: json_float(values[index]) for key, values in objects.items()}
            entry["objects"].update(objects=int(objects["objects"][index]), found=int(objects["found"][index]))
        entries[name] = entry
    return entries


def evaluation_entry(epoch: int, step: int, scalars: Mapping[str, float], per_class: dict) -> dict:
    """The ``final`` / ``best`` entry of one evaluation (see module docstring)."""
    return {"epoch": epoch, "step": step, **{k: json_float(v) for k, v in scalars.items()}, "per_class": per_class}
