"""Cross-run summary of a sweep (the command: ``python -m train_seg.cli.summary <sweep dir>``).

Writes ``summary.csv``, ``summary.md`` and ``summary.png`` into the sweep directory and prints a short table; the
sweep callback (``train_seg.reporting.sweep``) runs the same code at the end of every multirun. A job is any
directory under the sweep dir holding ``.hydra/overrides.yaml`` or ``metrics.json``; only those files are read
(never torch, never a checkpoint). Job status: ``completed``, ``pruned`` (an Optuna trial stopped by its pruner),
``failed``, ``interrupted``, ``running`` (metrics.json
says training is under way), ``incomplete`` (no metrics.json yet).

Rare classes: training pixel share below ``rare_share`` (default: the jobs' config value); ``*_rare_mIoU`` is
recomputed here so every row uses the same classes. Jobs whose overrides differ only in ``seed`` form one
configuration (``GroupResult``): n, mean and sample std (ddof=1) over its completed jobs only. A configuration beats
the baseline when ``mean - std > baseline mean + baseline std`` (needs n >= 2 on both sides, else undetermined).
Columns, rows and the baseline rule: docs/sweeps.md, "The summary: summary.md, summary.csv, summary.png".
"""
from __future__ import annotations

import csv
import io
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from train_seg.reporting import record
from train_seg.atomic import atomic_write
from train_seg.config.naming import SWEEPER_KEYS, override_key, swept_keys

FILES = ("summary.csv", "summary.md", "summary.png")
COMPLETED = "completed"
PRUNED = "pruned"  # an Optuna trial its pruner stopped: left out of the statistics, listed, and not a failure
# statuses that end a job without completing it (the sweep callback exits non-zero when one of them is present)
NOT_COMPLETED = ("failed", "interrupted", "running", "incomplete")
# not job directories: Hydra's, caches, and the MLflow sink's artifact store (its runs' copies of metrics.json)
_SKIP_DIRS = {".hydra", ".cache", "__pycache__", "mlartifacts"}


@dataclass
class JobResult:
    """What one job directory says about its job (NaN: no value)."""

    name: str
    path: Path
    num: int | None
    overrides: list[str]
    status: str
    error: str | None = None
    epochs: int | None = None
    best_metric: str | None = None
    best_value: float = math.nan
    best_epoch: int | None = None
    best_miou: float = math.nan
    final_miou: float = math.nan
    best_rare_miou: float = math.nan
    final_rare_miou: float = math.nan
    final_iou: dict[str, float] = field(default_factory=dict)
    final_recall: dict[str, float] = field(default_factory=dict)
    final_precision: dict[str, float] = field(default_factory=dict)
    final_object_recall: dict[str, float] = field(default_factory=dict)  # classes whose objects were counted
    final_object_precision: dict[str, float] = field(default_factory=dict)
    best_iou: dict[str, float] = field(default_factory=dict)
    class_names: list[str] = field(default_factory=list)
    pixel_share: dict[str, float] = field(default_factory=dict)
    rare_share: float | None = None
    has_metrics: bool = False


SEED_KEY = "seed"  # jobs whose overrides differ only in this key are one configuration
# Swept keys whose value makes a configuration the default baseline (the first group with one of them).
BASELINE_OVERRIDES = ("weighting=none", "loss=ce")
BEATS_MARK = "▲"


@dataclass
class GroupResult:
    """One configuration: the jobs whose overrides are equal once ``seed=...`` is left out. The statistics
    (``mean``, ``std``, ``count`` per metric: ``final_mIoU``, ``final_rare_mIoU``, ``IoU/<class>``,
    ``recall/<class>``, ``precision/<class>``) are over the completed jobs only; ``std`` is the sample standard
    deviation (ddof=1), NaN below two values."""

    index: int
    overrides: list[str]  # the jobs' overrides without seed, in the first job's order
    jobs: list[JobResult]
    mean: dict[str, float] = field(default_factory=dict)
    std: dict[str, float] = field(default_factory=dict)
    count: dict[str, int] = field(default_factory=dict)
    is_baseline: bool = False
    beats_baseline: bool | None = None  # on final_rare_mIoU; None = undetermined (no baseline, n < 2, NaN)
    beats: dict[str, bool | None] = field(default_factory=dict)  # per class IoU, same rule

    @property
    def completed(self) -> list[JobResult]:
        return [job for job in self.jobs if job.status == COMPLETED]

    @property
    def excluded(self) -> list[JobResult]:
        """Jobs listed with the configuration but left out of its statistics (not completed)."""
        return [job for job in self.jobs if job.status != COMPLETED]

    @property
    def n(self) -> int:
        return len(self.completed)

    @property
    def seeds(self) -> list[str]:
        """The seed overrides of its jobs (none when seed is not set on the command line)."""
        values = [_override_value(job.overrides, SEED_KEY) for job in self.jobs]
        return [value for value in values if value is not None]

    def status_text(self) -> str:
        """``3 completed`` or ``2 completed, 1 failed``."""
        counts: dict[str, int] = {}
        for job in self.jobs:
            counts[job.status] = counts.get(job.status, 0) + 1
        return ", ".join(f"{n} {status}" for status, n in counts.items())


@dataclass
class SweepSummary:
    sweep_dir: Path
    jobs: list[JobResult]
    classes: list[str]  # by decreasing training pixel share
    pixel_share: list[float]
    rare: list[bool]
    rare_share: float | None
    rare_share_note: str
    varying_keys: list[str]
    common_overrides: list[str]
    groups: list[GroupResult] = field(default_factory=list)  # jobs that differ only in seed, in job order
    baseline: GroupResult | None = None
    baseline_note: str = ""

    @property
    def has_repeats(self) -> bool:
        """Some configuration ran more than once (a seed sweep): the group tables are shown."""
        return any(len(group.jobs) > 1 for group in self.groups)

    @property
    def not_completed(self) -> list[JobResult]:
        return [job for job in self.jobs if job.status != COMPLETED]

    @property
    def object_classes(self) -> list[str]:
        """The classes some job counted objects for (``metrics.objects``), in the order of ``classes``."""
        return [n for n in self.classes if any(n in job.final_object_recall for job in self.jobs)]

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for job in self.jobs:
            counts[job.status] = counts.get(job.status, 0) + 1
        return counts


# -- reading ---------------------------------------------------------------------------------------------------
def find_job_dirs(sweep_dir: str | Path) -> list[Path]:
    """Job directories under ``sweep_dir`` (any depth, so an override value with a ``/`` that nested a job dir is
    still found), in job-number order. Nothing inside a job directory is another job (its ``calibrated_eval/``
    holds a metrics.json of its own)."""
    sweep_dir = Path(sweep_dir)
    found = []
    for root, dirs, files in os.walk(sweep_dir):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        here = Path(root)
        if record.FILENAME in files or (here / ".hydra" / "overrides.yaml").is_file():
            if here != sweep_dir or record.FILENAME in files:
                found.append(here)
                dirs[:] = []
    return sorted(found, key=lambda p: _sort_key(p.relative_to(sweep_dir).as_posix()))


def _job_num(name: str) -> int | None:
    match = re.match(r"^(\d+)(?:_|$)", name)
    return int(match.group(1)) if match else None


def _sort_key(name: str):
    num = _job_num(name)
    return (num is None, num if num is not None else 0, name)


def _read_overrides(job_dir: Path) -> list[str]:
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    import yaml

    try:
        data = yaml.safe_load(path.read_text()) or []
    except (OSError, yaml.YAMLError):
        return []
    if not isinstance(data, list):
        return []
    return [str(item) for item in data if override_key(str(item)) not in SWEEPER_KEYS]


def _float(value: Any) -> float:
    try:
        return math.nan if value is None else float(value)
    except (TypeError, ValueError):
        return math.nan


def _by_class(entry: dict | None, key: str = "iou") -> dict[str, float]:
    per_class = (entry or {}).get("per_class") or {}
    return {name: _float((values or {}).get(key)) for name, values in per_class.items()}


def _objects_by_class(entry: dict | None, key: str) -> dict[str, float]:
    """``per_class[<class>]["objects"][key]`` of the classes whose objects were counted."""
    per_class = (entry or {}).get("per_class") or {}
    return {name: _float(values["objects"].get(key)) for name, values in per_class.items()
            if isinstance((values or {}).get("objects"), dict)}


def read_job(job_dir: str | Path, sweep_dir: str | Path) -> JobResult:
    """One job's row from its ``metrics.json`` (read through ``train_seg.reporting.record``) and ``.hydra/overrides.yaml``
    (never raises on a bad file: the row then says ``incomplete`` and ``error`` names the problem)."""
    job_dir, sweep_dir = Path(job_dir), Path(sweep_dir)
    name = job_dir.relative_to(sweep_dir).as_posix() if job_dir != sweep_dir else job_dir.name
    job = JobResult(name=name, path=job_dir, num=_job_num(name), overrides=_read_overrides(job_dir), status="incomplete")
    if not (job_dir / record.FILENAME).is_file():
        return job
    try:
        run = record.read(job_dir)
    except (record.RecordError, TypeError, ValueError) as exc:  # TypeError, ValueError: e.g. a non-integer version
        job.error = f"{record.FILENAME} unreadable: {exc.__cause__ or exc}"
        return job
    job.has_metrics = True
    _fill_from_record(job, run)
    return job


def _fill_from_record(job: JobResult, run: record.RunRecord) -> None:
    """The row's status, error and metrics from a run record."""
    job.status = str(run.status or "incomplete")
    job.error = run.error
    history = run.history or []
    job.epochs = history[-1].get("epoch") if history else None
    final, best = run.final or {}, run.best or {}
    job.final_miou = _float(final.get("val/mIoU"))
    job.final_iou = _by_class(final)
    job.final_recall = _by_class(final, "recall")
    job.final_precision = _by_class(final, "precision")
    job.final_object_recall = _objects_by_class(final, "recall")
    job.final_object_precision = _objects_by_class(final, "precision")
    job.best_metric = best.get("metric") or run.optimized_metric
    job.best_value = _float(best.get("value"))
    job.best_epoch = best.get("epoch")
    job.best_miou = _float(best.get("val/mIoU"))
    job.best_iou = _by_class(best)
    job.class_names = list(run.class_names or job.final_iou)
    shares = ((run.class_stats or {}).get("train") or {}).get("pixel_share") or []
    job.pixel_share = {n: _float(s) for n, s in zip(job.class_names, shares)}
    job.rare_share = _float(run.rare_share) if run.rare_share is not None else None


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (ddof=1) and count of the finite values; NaN std below two values, NaN mean
    without any."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    n = len(finite)
    if n == 0:
        return math.nan, math.nan, 0
    mean = sum(finite) / n
    if n < 2:
        return mean, math.nan, n
    return mean, math.sqrt(sum((v - mean) ** 2 for v in finite) / (n - 1)), n


def _override_value(overrides: Sequence[str], key: str) -> str | None:
    for override in overrides:
        if "=" in override and override_key(override) == key:
            return override.split("=", 1)[1]
    return None


CLASS_METRICS = ("IoU", "recall", "precision", "object_recall", "object_precision")


def _class_values(job: JobResult, kind: str) -> dict[str, float]:
    return {"IoU": job.final_iou, "recall": job.final_recall, "precision": job.final_precision,
            "object_recall": job.final_object_recall, "object_precision": job.final_object_precision}[kind]


def _group_metrics(job: JobResult, classes: Sequence[str]) -> dict[str, float]:
    """The metrics a configuration aggregates, from one job: final mIoU, rare mIoU, per-class IoU, recall,
    precision, object recall and object precision (the names of summary.csv's columns)."""
    return {"final_mIoU": job.final_miou, "final_rare_mIoU": job.final_rare_miou,
            **{f"{kind}/{n}": _class_values(job, kind).get(n, math.nan) for kind in CLASS_METRICS for n in classes}}


def _metric_names(classes: Sequence[str]) -> list[str]:
    return ["final_mIoU", "final_rare_mIoU", *(f"{kind}/{n}" for kind in CLASS_METRICS for n in classes)]


def group_jobs(jobs: Sequence[JobResult], classes: Sequence[str]) -> list[GroupResult]:
    """Configurations: jobs with the same overrides once ``seed=...`` is removed (order of overrides ignored),
    numbered in the order of their first job; statistics over each one's completed jobs."""
    groups: dict[frozenset, GroupResult] = {}
    for job in jobs:
        overrides = [o for o in job.overrides if override_key(o) != SEED_KEY]
        key = frozenset(overrides)
        if key not in groups:
            groups[key] = GroupResult(index=len(groups), overrides=overrides, jobs=[])
        groups[key].jobs.append(job)
    for group in groups.values():
        values = [_group_metrics(job, classes) for job in group.completed]
        for metric in _metric_names(classes):
            group.mean[metric], group.std[metric], group.count[metric] = mean_std([v[metric] for v in values])
    return list(groups.values())


def parse_baseline(spec: str | Sequence[str] | None) -> list[str]:
    """``"loss=ce weighting=none"``, ``"loss=ce,weighting=none"``, ``"weighting:none"`` or a list -> overrides
    (``key:value`` becomes ``key=value``, for a command line where ``=`` would need quoting)."""
    if spec is None:
        return []
    items = [spec] if isinstance(spec, str) else [str(item) for item in spec]
    tokens: list[str] = []
    for item in items:
        depth, current = 0, ""
        for char in item:  # split on whitespace and on commas outside brackets (weighting.values=[1,2,3])
            depth += char in "[({"
            depth -= char in "])}"
            if (char.isspace() or char == ",") and depth <= 0:
                tokens.append(current)
                current = ""
            else:
                current += char
        tokens.append(current)
    tokens = [t.strip() for t in tokens if t.strip()]
    return [t if "=" in t or ":" not in t else t.replace(":", "=", 1) for t in tokens]


def beats(mean: float, std: float, base_mean: float, base_std: float) -> bool | None:
    """``mean - std > base_mean + base_std``; None when a value is NaN (in particular a std from fewer than two
    runs: without a spread there is nothing to beat it by)."""
    if any(math.isnan(v) for v in (mean, std, base_mean, base_std)):
        return None
    return mean - std > base_mean + base_std


def choose_baseline(groups: Sequence[GroupResult], varying_keys: Sequence[str],
                    spec: str | Sequence[str] | None = None) -> tuple[GroupResult | None, str]:
    """The baseline configuration and a sentence saying how it was chosen. A named ``spec``: the first group whose
    overrides contain all of it. Otherwise the first group holding one of ``BASELINE_OVERRIDES`` with its key among
    ``varying_keys`` (the swept keys)."""
    wanted = parse_baseline(spec)
    if wanted:
        shown = " ".join(wanted)
        for group in groups:
            if all(o in group.overrides for o in wanted):
                return group, f"named with summary.baseline / --baseline (`{shown}`)"
        return None, f"no configuration has `{shown}` (summary.baseline / --baseline)"
    candidates = [o for o in BASELINE_OVERRIDES if override_key(o) in varying_keys]
    for group in groups:
        if any(o in group.overrides for o in candidates):
            return group, ("the first configuration with " + " or ".join(f"`{o}`" for o in BASELINE_OVERRIDES)
                           + " among the swept keys (choose another with summary.baseline / --baseline)")
    return None, ("no configuration has " + " or ".join(f"`{o}`" for o in BASELINE_OVERRIDES)
                  + " among the swept keys; name one with summary.baseline / --baseline")


def summarize(sweep_dir: str | Path, rare_share: float | None = None,
              baseline: str | Sequence[str] | None = None) -> SweepSummary:
    """Reads every job of a sweep directory. ``rare_share`` overrides the jobs' own ``rare_share``; ``baseline``
    names the baseline configuration (overrides, see ``parse_baseline``; None = the default rule)."""
    sweep_dir = Path(sweep_dir)
    jobs = [read_job(d, sweep_dir) for d in find_job_dirs(sweep_dir)]
    classes, shares = _classes_by_share(jobs)
    rare_share, note = _choose_rare_share(jobs, rare_share)
    rare = [rare_share is not None and not math.isnan(shares[n]) and shares[n] < rare_share for n in classes]
    _set_rare_mious(jobs, [n for n, r in zip(classes, rare) if r])
    common, varying = _common_and_varying(jobs, swept_keys(sweep_dir))
    groups = group_jobs(jobs, classes)
    base, base_note = choose_baseline(groups, varying, baseline)
    if base is not None:
        _compare_with_baseline(groups, base, classes)
    return SweepSummary(sweep_dir=sweep_dir, jobs=jobs, classes=classes, pixel_share=[shares[n] for n in classes],
                        rare=rare, rare_share=rare_share, rare_share_note=note, varying_keys=varying,
                        common_overrides=common, groups=groups, baseline=base, baseline_note=base_note)


def _classes_by_share(jobs: Sequence[JobResult]) -> tuple[list[str], dict[str, float]]:
    """Every class of the jobs (a class's share from the first job naming it), by decreasing training pixel share;
    classes without a known share last."""
    classes: list[str] = []
    shares: dict[str, float] = {}
    for job in jobs:
        for name in job.class_names:
            if name not in shares:
                classes.append(name)
                shares[name] = job.pixel_share.get(name, math.nan)
    classes.sort(key=lambda n: (math.isnan(shares[n]), -shares[n] if not math.isnan(shares[n]) else 0.0))
    return classes, shares


def _choose_rare_share(jobs: Sequence[JobResult], rare_share: float | None) -> tuple[float | None, str]:
    """The rare-class threshold (the one given, else the jobs' own, the smallest when they differ) and a note
    saying where it comes from."""
    recorded = sorted({job.rare_share for job in jobs if job.rare_share is not None})
    if rare_share is not None:
        return rare_share, f"--rare-share {rare_share:g}"
    if len(recorded) == 1:
        return recorded[0], f"rare_share={recorded[0]:g}, as the jobs ran"
    if recorded:
        return recorded[0], (f"rare_share={recorded[0]:g}; the jobs ran with different values "
                             f"({', '.join(f'{r:g}' for r in recorded)}): pass --rare-share to choose")
    return None, "no job recorded rare_share"


def _set_rare_mious(jobs: Sequence[JobResult], rare_names: Sequence[str]) -> None:
    """Each job's final and best rare mIoU: the NaN-excluded mean IoU over ``rare_names``."""
    for job in jobs:
        if job.has_metrics and job.final_iou:
            job.final_rare_miou = _nanmean([job.final_iou.get(n, math.nan) for n in rare_names])
        if job.has_metrics and job.best_iou:
            job.best_rare_miou = _nanmean([job.best_iou.get(n, math.nan) for n in rare_names])


def _common_and_varying(jobs: Sequence[JobResult], swept: Sequence[str]) -> tuple[list[str], list[str]]:
    """The overrides common to every job and the keys of the others, in order of first appearance. With the swept
    keys (``swept_keys``) known, those are never common, even if only one job has started yet; without them, what
    differs between the jobs found (nothing is common to a single job)."""
    all_overrides = [job.overrides for job in jobs]
    if swept:
        common = [o for o in (all_overrides[0] if jobs else []) if override_key(o) not in swept
                  and all(o in other for other in all_overrides)]
    else:
        common = [o for o in all_overrides[0] if all(o in other for other in all_overrides)] if len(jobs) > 1 else []
    varying: list[str] = []
    for overrides in all_overrides:
        for override in overrides:
            key = override_key(override)
            if override not in common and key not in varying:
                varying.append(key)
    return common, varying


def _compare_with_baseline(groups: Sequence[GroupResult], base: GroupResult, classes: Sequence[str]) -> None:
    """Marks ``base`` as the baseline and sets every other group's ``beats_baseline`` (rare mIoU) and ``beats``
    (per class IoU)."""
    base.is_baseline = True
    for group in groups:
        if group is base:
            continue
        group.beats_baseline = beats(group.mean["final_rare_mIoU"], group.std["final_rare_mIoU"],
                                     base.mean["final_rare_mIoU"], base.std["final_rare_mIoU"])
        group.beats = {n: beats(group.mean[f"IoU/{n}"], group.std[f"IoU/{n}"], base.mean[f"IoU/{n}"],
                                base.std[f"IoU/{n}"]) for n in classes}


# -- writing ---------------------------------------------------------------------------------------------------
def job_label(job: JobResult, summary: SweepSummary) -> str:
    """The overrides that tell this job apart from the others (``weighting=inverse``)."""
    own = [o for o in job.overrides if o not in summary.common_overrides]
    return " ".join(own) if own else "(no overrides)"


def group_label(group: GroupResult, summary: SweepSummary) -> str:
    """The overrides that tell this configuration apart from the others, seed left out (``weighting=inverse``)."""
    own = [o for o in group.overrides if o not in summary.common_overrides]
    return " ".join(own) if own else "(no overrides)"


def _yes_no(value: bool | None) -> str:
    return "" if value is None else "yes" if value else "no"


def csv_rows(summary: SweepSummary) -> tuple[list[str], list[dict[str, Any]]]:
    """Header and rows of summary.csv (NaN and missing values as empty cells): one row per job (``kind=job``),
    then, when some configuration ran more than once, one per configuration (``kind=group``, see the module
    docstring). The columns are the same either way."""
    reserved = {"job", "num", "overrides", "status", "error", "kind", "group", "n", "baseline", "beats_baseline"}
    keys = [k for k in summary.varying_keys if k not in reserved]
    classes = summary.classes
    header = ["job", "num", "overrides", *keys, "kind", "group", "status", "n", "epochs", "best_epoch", "best_metric",
              "best_value", "best_mIoU", "final_mIoU", "best_rare_mIoU", "final_rare_mIoU",
              *(f"{kind}/{name}" for kind in CLASS_METRICS for name in classes),
              "std/final_mIoU", "std/final_rare_mIoU",
              *(f"std/{kind}/{name}" for kind in CLASS_METRICS for name in classes),
              "baseline", "beats_baseline", *(f"beats/{name}" for name in classes), "error"]
    group_of = {id(job): group.index for group in summary.groups for job in group.jobs}
    rows = []
    for job in summary.jobs:
        values = {override_key(o): o.split("=", 1)[1] if "=" in o else "" for o in job.overrides}
        row: dict[str, Any] = {
            "job": job.name, "num": job.num, "overrides": " ".join(job.overrides),
            **{k: values.get(k, "") for k in keys}, "kind": "job", "group": group_of.get(id(job)),
            "status": job.status, "epochs": job.epochs, "best_epoch": job.best_epoch, "best_metric": job.best_metric,
            "best_value": job.best_value, "best_mIoU": job.best_miou, "final_mIoU": job.final_miou,
            "best_rare_mIoU": job.best_rare_miou, "final_rare_mIoU": job.final_rare_miou,
            **{f"{kind}/{n}": _class_values(job, kind).get(n, math.nan) for kind in CLASS_METRICS
               for n in summary.classes},
            "error": job.error or "",
        }
        rows.append({k: _csv_cell(v) for k, v in row.items()})
    for group in summary.groups if summary.has_repeats else []:  # one job per configuration: its row says it all
        values = {override_key(o): o.split("=", 1)[1] if "=" in o else "" for o in group.overrides}
        values[SEED_KEY] = " ".join(group.seeds)
        excluded = ", ".join(f"{job.name} ({job.status})" for job in group.excluded)
        row = {"job": "", "num": None, "overrides": " ".join(group.overrides), **{k: values.get(k, "") for k in keys},
               "kind": "group", "group": group.index, "status": group.status_text(), "n": group.n,
               **{metric: group.mean[metric] for metric in _metric_names(classes)},
               **{f"std/{metric}": group.std[metric] for metric in _metric_names(classes)},
               "baseline": "yes" if group.is_baseline else "", "beats_baseline": _yes_no(group.beats_baseline),
               **{f"beats/{n}": _yes_no(group.beats.get(n)) for n in classes},
               "error": f"not in the statistics: {excluded}" if excluded else ""}
        rows.append({k: _csv_cell(v) for k, v in row.items()})
    return header, rows


def _csv_cell(value: Any) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def _md(value: float, job: JobResult | None = None, absent: str = "absent") -> str:
    if math.isnan(value):
        return absent if job is not None and job.has_metrics and job.final_iou else "–"
    return f"{value:.3f}"


def _md_text(text: str) -> str:
    return text.replace("|", "\\|")


def _pm(mean: float, std: float, absent: str = "–") -> str:
    """``0.512 ± 0.020``; the mean alone when there is no std (one value); ``absent`` without a mean."""
    if math.isnan(mean):
        return absent
    return f"{mean:.3f}" if math.isnan(std) else f"{mean:.3f} ± {std:.3f}"


def _versus(group: GroupResult) -> str:
    if group.is_baseline:
        return "baseline"
    return {True: f"{BEATS_MARK} beats", False: "no", None: "–"}[group.beats_baseline]


def _group_class_cell(group: GroupResult, name: str) -> str:
    has_values = any(job.final_iou for job in group.completed)
    text = _pm(group.mean[f"IoU/{name}"], group.std[f"IoU/{name}"], "absent" if has_values else "–")
    return text + (f" {BEATS_MARK}" if group.beats.get(name) else "")


def _n_text(group: GroupResult) -> str:
    return str(group.n) if not group.excluded else f"{group.n} of {len(group.jobs)}"


def _baseline_text(summary: SweepSummary) -> str:
    base = summary.baseline
    if base is None:
        return f"none: {summary.baseline_note}"
    return f"configuration {base.index}, `{_md_text(group_label(base, summary))}`: {summary.baseline_note}"


def _groups_markdown(summary: SweepSummary, class_headers: list[str]) -> list[str]:
    lines = ["## Configurations: mean ± std over seeds", "",
             "- A configuration is the set of jobs whose overrides differ only in `seed`. Statistics over its "
             "completed jobs (`n`; failed or unfinished jobs are left out and listed below); ± is the sample standard "
             "deviation (n - 1), left out when n = 1.",
             f"- Baseline: {_baseline_text(summary)}.",
             f"- {BEATS_MARK}: better than the baseline by more than the seed spread, `mean - std > baseline mean + "
             "baseline std` (rare mIoU in `vs baseline`, the class's IoU in the class columns); it needs n >= 2 on "
             "both sides (`–`: undetermined).", ""]
    header = ["config", "overrides", "n", "seeds", "final mIoU", "rare mIoU", "vs baseline", *class_headers]
    lines.append("| " + " | ".join(_md_text(h) for h in header) + " |")
    lines.append("|" + "|".join(["---:", "---", "---:", "---", "---:", "---:", "---"] + ["---:"] * len(class_headers))
                 + "|")
    for group in summary.groups:
        versus = _versus(group)
        cells = [str(group.index), f"`{_md_text(group_label(group, summary))}`", _n_text(group),
                 " ".join(group.seeds) or "–", _pm(group.mean["final_mIoU"], group.std["final_mIoU"]),
                 _pm(group.mean["final_rare_mIoU"], group.std["final_rare_mIoU"],
                     "n/a" if group.n else "–"), f"**{versus}**" if group.beats_baseline else versus,
                 *(_group_class_cell(group, n) for n in summary.classes),
                 *(" / ".join(_pm(group.mean[f"{kind}/{n}"], group.std[f"{kind}/{n}"])
                              for kind in ("object_recall", "object_precision")) for n in summary.object_classes)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + ["", "## Jobs", ""]


def _share_text(share: float) -> str:
    if math.isnan(share):
        return "share ?"
    percent = 100 * share
    return f"{percent:.2f}%" if percent < 10 else f"{percent:.1f}%"


def markdown(summary: SweepSummary) -> str:
    """summary.md: a short header (counts, common overrides, rare classes) and one table row per job."""
    counts = summary.counts()
    total = len(summary.jobs)
    lines = ["# Sweep summary", "",
             f"`{summary.sweep_dir}`: {total} job{'s' if total != 1 else ''}, "
             + ", ".join(f"{n} {status}" for status, n in counts.items()) + ".", ""]
    if summary.common_overrides:
        lines.append(f"- Common to all jobs: `{' '.join(summary.common_overrides)}`")
    rare_names = [f"{n} ({_share_text(s)})" for n, s, r in zip(summary.classes, summary.pixel_share, summary.rare) if r]
    threshold = f"< {100 * summary.rare_share:g}%" if summary.rare_share is not None else "(threshold unknown)"
    lines.append(f"- Rare classes (training pixel share {threshold}; {summary.rare_share_note}): "
                 f"{', '.join(rare_names) or 'none'}. `rare mIoU` is their mean IoU.")
    metric = next((j.best_metric for j in summary.jobs if j.best_metric), "val/mIoU")
    lines.append(f"- Class columns: IoU at the final evaluation, classes by decreasing training pixel share. "
                 f"`best`: the evaluation kept as best.pt (highest `{metric}`). `absent`: the class is neither in "
                 "the val split nor predicted; `–`: no evaluation.")
    if summary.object_classes:
        lines.append("- `<class> objects R / P`: object recall / object precision at the final evaluation (connected "
                     "components matched at IoU > 0.5, `metrics.objects`); `–`: no object in the truth / none "
                     "predicted.")
    lines.append("")
    class_headers = [f"{n} {_share_text(s)}{' (rare)' if r else ''}"
                     for n, s, r in zip(summary.classes, summary.pixel_share, summary.rare)]
    class_headers += [f"{n} objects R / P" for n in summary.object_classes]
    if summary.has_repeats:
        lines += _groups_markdown(summary, class_headers)
    header = ["job", "overrides", "status", "epochs", "best epoch", "best mIoU", "final mIoU", "rare mIoU",
              *class_headers]
    lines.append("| " + " | ".join(_md_text(h) for h in header) + " |")
    lines.append("|" + "|".join(["---:", "---", "---", "---:", "---:", "---:", "---:", "---:"]
                                + ["---:"] * len(class_headers)) + "|")
    for job in summary.jobs:
        cells = [str(job.num) if job.num is not None else job.name, f"`{_md_text(job_label(job, summary))}`",
                 f"**{job.status}**" if job.status != COMPLETED else job.status,
                 "–" if job.epochs is None else str(job.epochs),
                 "–" if job.best_epoch is None else str(job.best_epoch),
                 _md(job.best_miou), _md(job.final_miou), _md(job.final_rare_miou, job, "n/a"),
                 *(_md(job.final_iou.get(n, math.nan), job) for n in summary.classes),
                 *(f"{_md(job.final_object_recall.get(n, math.nan))} / "
                   f"{_md(job.final_object_precision.get(n, math.nan))}" for n in summary.object_classes)]
        lines.append("| " + " | ".join(cells) + " |")
    problems = [job for job in summary.jobs if job.status != COMPLETED]
    if problems:
        lines += ["", "Jobs that did not complete:", ""]
        for job in problems:
            reason = job.error or {"running": "no final status: still running, or killed",
                                   "incomplete": f"no {record.FILENAME}: in its first epoch, or killed before its "
                                                 "end"}.get(job.status, job.status)
            first_line = reason.strip().splitlines()[0] if reason.strip() else reason
            num = "" if job.num is None else f"{job.num} "
            lines.append(f"- {num}`{_md_text(job_label(job, summary))}` ({job.status}): {_md_text(first_line[:400])}")
    lines += ["", "Files: `summary.csv` (every column, per-override columns, one row per job and per configuration), "
              "`summary.png` (IoU against training pixel share, recall and precision per configuration; per-class IoU "
              "per job). "
              "Job directories are TensorBoard run names: `tensorboard --logdir " + str(summary.sweep_dir) + "`.", ""]
    return "\n".join(lines)


def _group_legend(group: GroupResult, summary: SweepSummary) -> str:
    if not summary.has_repeats:  # one job per configuration: label it like the job
        job = group.jobs[0]
        num = job.num if job.num is not None else job.name
        return f"{num}: {group_label(group, summary)}" + ("" if job.status == COMPLETED else f" ({job.status})")
    extra = f", {len(group.excluded)} not completed" if group.excluded else ""
    return f"{group.index}: {group_label(group, summary)} (n={group.n}{extra})"


def summary_figures(summary: SweepSummary) -> list:
    """The two figures of summary.png, in the same colours.

    1. per configuration, IoU against training pixel share beside recall and precision
       (``train_seg.reporting.plots.imbalance_figure``: mean ± std over the completed jobs, marks against the baseline);
    2. the per-class IoU bars (``train_seg.reporting.plots.summary_figure``): the values printed, classes evenly spaced
       however close their shares are (the log-share axis of 1. crowds them). One bar per job when no configuration
       repeats (a failed job shows its last evaluation), else one per configuration (the means: per-job bars would
       not match the colours above, and the per-job values are in summary.md and summary.csv)."""
    import numpy as np

    from train_seg.reporting.plots import imbalance_figure, summary_figure

    classes, groups = summary.classes, summary.groups

    def table(source: str, kind: str) -> np.ndarray:  # (groups, classes) of group.mean or group.std
        return np.array([[getattr(g, source)[f"{kind}/{n}"] for n in classes] for g in groups],
                        dtype=np.float64).reshape(len(groups), len(classes))

    def column(source: str, metric: str) -> list[float]:
        return [getattr(g, source)[metric] for g in groups]

    marks = ["baseline" if g.is_baseline else BEATS_MARK if g.beats_baseline else "" for g in groups]
    what = "mean ± std over seeds, completed jobs" if summary.has_repeats else "final evaluation"
    top = imbalance_figure(
        classes, summary.pixel_share, [_group_legend(g, summary) for g in groups], table("mean", "IoU"),
        table("mean", "precision"), table("mean", "recall"), iou_std=table("std", "IoU"),
        precision_std=table("std", "precision"), recall_std=table("std", "recall"),
        miou=column("mean", "final_mIoU"), miou_std=column("std", "final_mIoU"),
        rare_miou=column("mean", "final_rare_mIoU"), rare_miou_std=column("std", "final_rare_mIoU"),
        marks=marks if summary.has_repeats else None, rare=summary.rare, rare_share=summary.rare_share,
        title=f"{summary.sweep_dir.name}: per configuration ({what})")

    if summary.has_repeats:
        bottom = summary_figure(
            [_group_legend(g, summary) for g in groups], classes, summary.pixel_share, table("mean", "IoU"),
            summary.rare, column("mean", "final_mIoU"), column("mean", "final_rare_mIoU"),
            [COMPLETED] * len(groups),  # the legend labels already say n and what did not complete
            title=f"per-class IoU per configuration, mean over seeds: {summary.sweep_dir.name}")
        return [top, bottom]
    labels = [f"{job.num if job.num is not None else job.name}: {job_label(job, summary)}" for job in summary.jobs]
    iou = np.array([[job.final_iou.get(n, math.nan) for n in classes] for job in summary.jobs],
                   dtype=np.float64).reshape(len(summary.jobs), len(classes))
    bottom = summary_figure(labels, classes, summary.pixel_share, iou, summary.rare,
                            [job.final_miou for job in summary.jobs], [job.final_rare_miou for job in summary.jobs],
                            [job.status for job in summary.jobs], title=f"per-class IoU per job: {summary.sweep_dir.name}")
    return [top, bottom]


def summary_png(summary: SweepSummary, path: Path) -> None:
    """summary.png: the two ``summary_figures`` one above the other."""
    from matplotlib.image import imsave

    from train_seg.reporting.plots import stack_figures

    image = stack_figures(summary_figures(summary))
    atomic_write(path, lambda handle: imsave(handle, image, format="png"), binary=True)


def write_summary(sweep_dir: str | Path, rare_share: float | None = None,
                  baseline: str | Sequence[str] | None = None) -> SweepSummary:
    """Writes summary.csv, summary.md and summary.png into ``sweep_dir``; returns what it summarised. ``baseline``:
    the baseline configuration's overrides (None: the default rule, see the module docstring)."""
    summary = summarize(sweep_dir, rare_share, baseline)
    header, rows = csv_rows(summary)

    def write_csv(handle) -> None:
        writer = csv.DictWriter(handle, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)

    atomic_write(summary.sweep_dir / "summary.csv", write_csv)
    atomic_write(summary.sweep_dir / "summary.md", lambda handle: handle.write(markdown(summary)))
    summary_png(summary, summary.sweep_dir / "summary.png")
    return summary


def console_table(summary: SweepSummary) -> str:
    """A short fixed-width table for the terminal: job, status, final mIoU, rare mIoU, IoU of the rare classes; per
    configuration (n, mean ± std, vs baseline) when some configuration ran more than once."""
    rare_names = [n for n, r in zip(summary.classes, summary.rare) if r]
    if summary.has_repeats:
        return _console_groups(summary, rare_names)
    labels = [job_label(job, summary) for job in summary.jobs]
    width = max([len("overrides"), *(len(label) for label in labels)])
    out = io.StringIO()
    head = f"{'#':>3}  {'overrides':<{width}}  {'status':<11}  {'mIoU':>6}  {'rare':>6}" + "".join(
        f"  {name[:10]:>10}" for name in rare_names)
    out.write(head + "\n" + "-" * len(head) + "\n")
    for job, label in zip(summary.jobs, labels):
        num = "" if job.num is None else str(job.num)
        row = f"{num:>3}  {label:<{width}}  {job.status:<11}  {_md(job.final_miou):>6}  {_md(job.final_rare_miou):>6}"
        row += "".join(f"  {_md(job.final_iou.get(n, math.nan), job):>10}" for n in rare_names)
        out.write(row + "\n")
    return out.getvalue().rstrip("\n")


def _console_groups(summary: SweepSummary, rare_names: list[str]) -> str:
    labels = [group_label(group, summary) for group in summary.groups]
    width = max([len("configuration"), *(len(label) for label in labels)])
    cells = [[_n_text(g), _pm(g.mean["final_mIoU"], g.std["final_mIoU"]),
              _pm(g.mean["final_rare_mIoU"], g.std["final_rare_mIoU"]), _versus(g),
              *(_group_class_cell(g, n) for n in rare_names)] for g in summary.groups]
    titles = ["n", "mIoU", "rare mIoU", "vs baseline", *(n[:14] for n in rare_names)]
    widths = [max([len(t), *(len(row[i]) for row in cells)]) for i, t in enumerate(titles)]
    out = io.StringIO()
    head = f"{'#':>3}  {'configuration':<{width}}" + "".join(f"  {t:>{w}}" for t, w in zip(titles, widths))
    out.write(head + "\n" + "-" * len(head) + "\n")
    for group, label, row in zip(summary.groups, labels, cells):
        out.write(f"{group.index:>3}  {label:<{width}}" + "".join(f"  {c:>{w}}" for c, w in zip(row, widths)) + "\n")
    out.write(f"baseline: {_baseline_text(summary)}. {BEATS_MARK} = mean - std > "
              "baseline mean + baseline std (needs n >= 2 on both sides); mean ± sample std over completed jobs.")
    return out.getvalue()
