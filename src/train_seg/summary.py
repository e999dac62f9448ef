"""Cross-run summary of a sweep: ``python -m train_seg.summary <sweep dir> [--rare-share 0.01]``.

Writes ``summary.csv``, ``summary.md`` and ``summary.png`` into the sweep directory, one row per job. The sweep
callback (``train_seg.sweep``) runs the same code at the end of every multirun; this command does it for a finished
or partial sweep (jobs still running, killed, or failed).

A job is any directory under the sweep dir holding ``.hydra/overrides.yaml`` or ``metrics.json``. Per job it reads
``metrics.json`` (written by the trainer after every epoch) and ``.hydra/overrides.yaml``; it never imports torch or
loads a checkpoint, so it takes about a second. Status of a job:

* ``completed``: training finished.
* ``failed``: the job raised (bad config, dataset error, crash in training); ``error`` says why and the metrics are
  those of its last completed evaluation, if any.
* ``interrupted``: stopped by Ctrl-C, metrics of its last completed evaluation.
* ``running``: metrics.json says training is under way: the job is still running, or was killed hard.
* ``incomplete``: no metrics.json yet: the job is in its first epoch, or was killed before finishing it.

Columns (CSV; the Markdown table shows the main ones): ``job`` (directory name = TensorBoard run name), ``num``,
``overrides`` (all of the job's command-line overrides), one column per override key that differs between jobs,
``status``, ``epochs`` (completed), ``best_epoch``, ``best_metric``/``best_value`` (the ``optimized_metric`` that
chose best.pt), ``best_mIoU``, ``final_mIoU``, ``best_rare_mIoU``, ``final_rare_mIoU``, ``IoU/<class>``, ``recall/<class>``,
``precision/<class>`` (final evaluation, classes by decreasing training pixel share), ``error``. A metric that does not exist (absent class,
job without evaluation) is an empty cell.

Rare classes: pixel share in the TRAINING split below ``rare_share`` (``--rare-share``; by default the value the
jobs ran with, i.e. the top-level config key ``rare_share``). ``*_rare_mIoU`` is the mean IoU over the rare classes
present (NaN-excluded), recomputed here from the per-class IoU so that every row uses the same rare classes.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

FILES = ("summary.csv", "summary.md", "summary.png")
COMPLETED = "completed"
# statuses that end a job without completing it (the sweep callback exits non-zero when one of them is present)
NOT_COMPLETED = ("failed", "interrupted", "running", "incomplete")
_SKIP_DIRS = {".hydra", ".cache", "__pycache__"}


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
    best_iou: dict[str, float] = field(default_factory=dict)
    class_names: list[str] = field(default_factory=list)
    pixel_share: dict[str, float] = field(default_factory=dict)
    rare_share: float | None = None
    has_metrics: bool = False


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

    @property
    def not_completed(self) -> list[JobResult]:
        return [job for job in self.jobs if job.status != COMPLETED]

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for job in self.jobs:
            counts[job.status] = counts.get(job.status, 0) + 1
        return counts


# -- reading ---------------------------------------------------------------------------------------------------
def find_job_dirs(sweep_dir: str | Path) -> list[Path]:
    """Job directories under ``sweep_dir`` (any depth, so an override value with a ``/`` that nested a job dir is
    still found), in job-number order."""
    sweep_dir = Path(sweep_dir)
    found = []
    for root, dirs, files in os.walk(sweep_dir):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        here = Path(root)
        if "metrics.json" in files or (here / ".hydra" / "overrides.yaml").is_file():
            if here != sweep_dir or "metrics.json" in files:
                found.append(here)
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
    return [str(item) for item in data] if isinstance(data, list) else []


def _float(value: Any) -> float:
    try:
        return math.nan if value is None else float(value)
    except (TypeError, ValueError):
        return math.nan


def _by_class(record: dict | None, key: str = "iou") -> dict[str, float]:
    per_class = (record or {}).get("per_class") or {}
    return {name: _float((values or {}).get(key)) for name, values in per_class.items()}


def read_job(job_dir: str | Path, sweep_dir: str | Path) -> JobResult:
    """One job's row from its ``metrics.json`` and ``.hydra/overrides.yaml`` (never raises on a bad file: the row
    then says ``incomplete`` and ``error`` names the problem)."""
    job_dir, sweep_dir = Path(job_dir), Path(sweep_dir)
    name = job_dir.relative_to(sweep_dir).as_posix() if job_dir != sweep_dir else job_dir.name
    job = JobResult(name=name, path=job_dir, num=_job_num(name), overrides=_read_overrides(job_dir), status="incomplete")
    path = job_dir / "metrics.json"
    if not path.is_file():
        return job
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        job.error = f"metrics.json unreadable: {exc}"
        return job
    job.has_metrics = True
    job.status = str(metrics.get("status") or "incomplete")
    job.error = metrics.get("error")
    history = metrics.get("history") or []
    job.epochs = history[-1].get("epoch") if history else None
    final, best = metrics.get("final") or {}, metrics.get("best") or {}
    job.final_miou = _float(final.get("val/mIoU"))
    job.final_iou = _by_class(final)
    job.final_recall = _by_class(final, "recall")
    job.final_precision = _by_class(final, "precision")
    job.best_metric = best.get("metric") or metrics.get("optimized_metric")
    job.best_value = _float(best.get("value"))
    job.best_epoch = best.get("epoch")
    job.best_miou = _float(best.get("val/mIoU"))
    job.best_iou = _by_class(best)
    job.class_names = list(metrics.get("class_names") or job.final_iou)
    shares = ((metrics.get("class_stats") or {}).get("train") or {}).get("pixel_share") or []
    job.pixel_share = {n: _float(s) for n, s in zip(job.class_names, shares)}
    job.rare_share = _float(metrics["rare_share"]) if metrics.get("rare_share") is not None else None
    return job


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def swept_keys(sweep_dir: str | Path) -> list[str]:
    """The keys the sweep varies, from its ``multirun.yaml``: command-line sweep overrides (``weighting=a,b``,
    ``choice(...)``, ``range(...)``) and the keys of ``hydra.sweeper.params`` (presets, Optuna's search space).
    Empty when the file is missing or unreadable (the summary then compares the jobs' overrides instead)."""
    path = Path(sweep_dir) / "multirun.yaml"
    if not path.is_file():
        return []
    try:
        import yaml
        from hydra.core.override_parser.overrides_parser import OverridesParser

        hydra_cfg = (yaml.safe_load(path.read_text()) or {}).get("hydra") or {}
        task = [str(o) for o in ((hydra_cfg.get("overrides") or {}).get("task") or [])]
        keys = [o.key_or_group for o in OverridesParser.create().parse_overrides(task) if o.is_sweep_override()]
        keys += [str(k) for k in ((hydra_cfg.get("sweeper") or {}).get("params") or {})]
    except Exception:  # an unreadable multirun.yaml only costs the nicer labels
        return []
    return list(dict.fromkeys(keys))


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def summarize(sweep_dir: str | Path, rare_share: float | None = None) -> SweepSummary:
    """Reads every job of a sweep directory. ``rare_share`` overrides the jobs' own ``rare_share``."""
    sweep_dir = Path(sweep_dir)
    jobs = [read_job(d, sweep_dir) for d in find_job_dirs(sweep_dir)]

    classes: list[str] = []
    shares: dict[str, float] = {}
    for job in jobs:
        for name in job.class_names:
            if name not in shares:
                classes.append(name)
                shares[name] = job.pixel_share.get(name, math.nan)
    # by decreasing training pixel share; classes without a known share last
    classes.sort(key=lambda n: (math.isnan(shares[n]), -shares[n] if not math.isnan(shares[n]) else 0.0))

    recorded = sorted({job.rare_share for job in jobs if job.rare_share is not None})
    if rare_share is not None:
        note = f"--rare-share {rare_share:g}"
    elif len(recorded) == 1:
        rare_share, note = recorded[0], f"rare_share={recorded[0]:g}, as the jobs ran"
    elif recorded:
        rare_share = recorded[0]
        note = (f"rare_share={rare_share:g}; the jobs ran with different values ({', '.join(f'{r:g}' for r in recorded)}): "
                "pass --rare-share to choose")
    else:
        note = "no job recorded rare_share"
    rare = [rare_share is not None and not math.isnan(shares[n]) and shares[n] < rare_share for n in classes]
    rare_names = [n for n, r in zip(classes, rare) if r]
    for job in jobs:
        if job.has_metrics and job.final_iou:
            job.final_rare_miou = _nanmean([job.final_iou.get(n, math.nan) for n in rare_names])
        if job.has_metrics and job.best_iou:
            job.best_rare_miou = _nanmean([job.best_iou.get(n, math.nan) for n in rare_names])

    all_overrides = [job.overrides for job in jobs]
    swept = swept_keys(sweep_dir)
    if swept:  # the keys the sweep varies, even if only one job has started yet
        common = [o for o in (all_overrides[0] if jobs else []) if _override_key(o) not in swept
                  and all(o in other for other in all_overrides)]
    else:  # no multirun.yaml: what differs between the jobs found (nothing is common to a single job)
        common = [o for o in all_overrides[0] if all(o in other for other in all_overrides)] if len(jobs) > 1 else []
    varying: list[str] = []
    for overrides in all_overrides:
        for override in overrides:
            key = _override_key(override)
            if override not in common and key not in varying:
                varying.append(key)
    return SweepSummary(sweep_dir=sweep_dir, jobs=jobs, classes=classes, pixel_share=[shares[n] for n in classes],
                        rare=rare, rare_share=rare_share, rare_share_note=note, varying_keys=varying,
                        common_overrides=common)


# -- writing ---------------------------------------------------------------------------------------------------
def job_label(job: JobResult, summary: SweepSummary) -> str:
    """The overrides that tell this job apart from the others (``weighting=inverse``)."""
    own = [o for o in job.overrides if o not in summary.common_overrides]
    return " ".join(own) if own else "(no overrides)"


def csv_rows(summary: SweepSummary) -> tuple[list[str], list[dict[str, Any]]]:
    """Header and rows of summary.csv (NaN and missing values as empty cells)."""
    reserved = {"job", "num", "overrides", "status", "error"}
    keys = [k for k in summary.varying_keys if k not in reserved]
    header = ["job", "num", "overrides", *keys, "status", "epochs", "best_epoch", "best_metric", "best_value",
              "best_mIoU", "final_mIoU", "best_rare_mIoU", "final_rare_mIoU",
              *(f"IoU/{name}" for name in summary.classes), *(f"recall/{name}" for name in summary.classes),
              *(f"precision/{name}" for name in summary.classes), "error"]
    rows = []
    for job in summary.jobs:
        values = {_override_key(o): o.split("=", 1)[1] if "=" in o else "" for o in job.overrides}
        row: dict[str, Any] = {
            "job": job.name, "num": job.num, "overrides": " ".join(job.overrides),
            **{k: values.get(k, "") for k in keys},
            "status": job.status, "epochs": job.epochs, "best_epoch": job.best_epoch, "best_metric": job.best_metric,
            "best_value": job.best_value, "best_mIoU": job.best_miou, "final_mIoU": job.final_miou,
            "best_rare_mIoU": job.best_rare_miou, "final_rare_mIoU": job.final_rare_miou,
            **{f"IoU/{n}": job.final_iou.get(n, math.nan) for n in summary.classes},
            **{f"recall/{n}": job.final_recall.get(n, math.nan) for n in summary.classes},
            **{f"precision/{n}": job.final_precision.get(n, math.nan) for n in summary.classes},
            "error": job.error or "",
        }
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
    lines.append("")
    class_headers = [f"{n} {_share_text(s)}{' (rare)' if r else ''}"
                     for n, s, r in zip(summary.classes, summary.pixel_share, summary.rare)]
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
                 *(_md(job.final_iou.get(n, math.nan), job) for n in summary.classes)]
        lines.append("| " + " | ".join(cells) + " |")
    problems = [job for job in summary.jobs if job.status != COMPLETED]
    if problems:
        lines += ["", "Jobs that did not complete:", ""]
        for job in problems:
            reason = job.error or {"running": "no final status: still running, or killed",
                                   "incomplete": "no metrics.json: in its first epoch, or killed before its end"}.get(
                job.status, job.status)
            first_line = reason.strip().splitlines()[0] if reason.strip() else reason
            num = "" if job.num is None else f"{job.num} "
            lines.append(f"- {num}`{_md_text(job_label(job, summary))}` ({job.status}): {_md_text(first_line[:400])}")
    lines += ["", "Files: `summary.csv` (every column, per-override columns), `summary.png` (per-class IoU per job). "
              "Job directories are TensorBoard run names: `tensorboard --logdir " + str(summary.sweep_dir) + "`.", ""]
    return "\n".join(lines)


def summary_png(summary: SweepSummary, path: Path) -> None:
    import numpy as np

    from train_seg.visualize import summary_figure

    labels = [f"{job.num if job.num is not None else job.name}: {job_label(job, summary)}" for job in summary.jobs]
    iou = np.array([[job.final_iou.get(n, math.nan) for n in summary.classes] for job in summary.jobs],
                   dtype=np.float64).reshape(len(summary.jobs), len(summary.classes))
    figure = summary_figure(labels, summary.classes, summary.pixel_share, iou, summary.rare,
                            [job.final_miou for job in summary.jobs], [job.final_rare_miou for job in summary.jobs],
                            [job.status for job in summary.jobs], title=f"per-class IoU per job: {summary.sweep_dir.name}")
    _atomic_write(path, lambda handle: figure.savefig(handle, format="png", dpi=100), binary=True)


def _atomic_write(path: Path, write, binary: bool = False) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"newline": ""})) as handle:
            write(handle)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_summary(sweep_dir: str | Path, rare_share: float | None = None) -> SweepSummary:
    """Writes summary.csv, summary.md and summary.png into ``sweep_dir``; returns what it summarised."""
    summary = summarize(sweep_dir, rare_share)
    header, rows = csv_rows(summary)

    def write_csv(handle) -> None:
        writer = csv.DictWriter(handle, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)

    _atomic_write(summary.sweep_dir / "summary.csv", write_csv)
    _atomic_write(summary.sweep_dir / "summary.md", lambda handle: handle.write(markdown(summary)))
    summary_png(summary, summary.sweep_dir / "summary.png")
    return summary


def console_table(summary: SweepSummary) -> str:
    """A short fixed-width table for the terminal: job, status, final mIoU, rare mIoU, IoU of the rare classes."""
    rare_names = [n for n, r in zip(summary.classes, summary.rare) if r]
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train_seg.summary",
        description="Summarise a sweep (a Hydra multirun directory, finished or not): writes summary.csv, summary.md "
                    "and summary.png into it, one row per job, failed and unfinished jobs included.")
    parser.add_argument("sweep_dir", type=Path, help="the multirun directory, e.g. outputs/multirun/2024-01-01/12-00-00")
    parser.add_argument("--rare-share", type=float, default=None,
                        help="a class is rare when its training pixel share is below this (default: the jobs' rare_share)")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        print(f"train_seg.summary: error: {args.sweep_dir} is not a directory.", file=sys.stderr)
        return 2
    if args.rare_share is not None and not 0.0 < args.rare_share < 1.0:
        print(f"train_seg.summary: error: --rare-share {args.rare_share}: must be in (0, 1), e.g. 0.01.", file=sys.stderr)
        return 2
    if not find_job_dirs(args.sweep_dir):
        print(f"train_seg.summary: error: no job directory (with .hydra/overrides.yaml or metrics.json) under "
              f"{args.sweep_dir}.", file=sys.stderr)
        return 2
    summary = write_summary(args.sweep_dir, args.rare_share)
    print(console_table(summary))
    print("wrote " + ", ".join(str(summary.sweep_dir / name) for name in FILES))
    return 0


if __name__ == "__main__":
    sys.exit(main())
