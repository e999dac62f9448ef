"""Post-hoc calibration of every job of a sweep, and what it changes on a split it never saw.

    python scripts/calibrate_sweep.py SWEEP_DIR [--metric val/mIoU] [--method fit] [--overwrite]

For each completed job (a run directory with last.pt): ``train_seg.cli.calibrate`` on the calib split (the
checkpoint ``last.pt``, i.e. the final epoch the sweep summary reports; ``calibration.json`` written beside it),
then ``train_seg.cli.evaluate`` on the val split twice, with and without the offsets (pipeline resolution, as
training evaluated). Prints one row per job (the fitted offsets, mIoU and the IoU of each class without -> with)
and, per configuration (jobs that differ only in seed), the mean change of each. The evaluations go to
``<job>/calibrated_eval`` and ``<job>/uncalibrated_eval``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path


def _compose(config: str, overrides: list[str]):
    """The config of the command, from overrides whose paths may hold ``=`` and ``,`` (sweep job names)."""
    from train_seg.cli.evaluate import command_line_overrides, quote_path
    from train_seg.config.command_line import compose

    quoted = [quote_path(arg, key=arg.split("=", 1)[0]) if arg.startswith(("output_dir=", "paths.")) else arg
              for arg in overrides]
    return compose(command_line_overrides(quoted), config_name=config)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--metric", default="val/mIoU")
    parser.add_argument("--method", default="fit", choices=("fit", "prior"))
    parser.add_argument("--overwrite", action="store_true", help="replace earlier calibrations and evaluations")
    args = parser.parse_args(argv)

    import shutil

    from train_seg.cli.calibrate import calibrate_checkpoint
    from train_seg.cli.evaluate import evaluate_checkpoint
    from train_seg.reporting.summary import summarize

    summary = summarize(args.sweep_dir)
    rows = []
    for job in summary.jobs:
        if job.status != "completed" or not (job.path / "last.pt").is_file():
            continue
        ckpt = job.path / "last.pt"
        common = ["progress=false", f"paths.cache_dir={args.sweep_dir / '.cache'}"]
        for name in ("calibrated_eval", "uncalibrated_eval"):
            if args.overwrite and (job.path / name).exists():
                shutil.rmtree(job.path / name)
        found = calibrate_checkpoint(_compose("calibrate", [f"ckpt={ckpt}", f"metric={args.metric}",
                                                            f"method={args.method}", f"overwrite={args.overwrite}",
                                                            f"output_dir={job.path / 'calibrate_log'}", *common]))
        results = {}
        for name, mode in (("uncalibrated_eval", "none"), ("calibrated_eval", "auto")):
            record = evaluate_checkpoint(_compose("evaluate", [f"ckpt={ckpt}", "resolution=pipeline",
                                                               f"calibration={mode}", f"output_dir={job.path / name}",
                                                               *common]))
            final = record["final"]
            results[mode] = {"mIoU": final["val/mIoU"],
                             **{c: final["per_class"][c]["iou"] for c in summary.classes}}
        rows.append((job, found, results))

    width = max(len(" ".join(job.overrides)) for job, _, _ in rows)
    keys = ["mIoU", *summary.classes]
    print(f"calibration ({args.method}, {args.metric}) fitted on calib, evaluated on val; cells: without -> with")
    print(f"{'job':<{width}}  {'offsets':<28}  " + "  ".join(f"{k:>15}" for k in keys))
    changes: dict[str, dict[str, list[float]]] = {}
    for job, found, results in rows:
        offsets = " ".join(f"{v:+.2f}" for v in found.offsets)
        cells = [f"{_f(results['none'][k])} -> {_f(results['auto'][k])}" for k in keys]
        print(f"{' '.join(job.overrides):<{width}}  {offsets:<28}  " + "  ".join(f"{c:>15}" for c in cells))
        group = " ".join(o for o in job.overrides if not o.startswith("seed="))
        for k in keys:
            if results["none"][k] is not None and results["auto"][k] is not None:
                changes.setdefault(group, {}).setdefault(k, []).append(results["auto"][k] - results["none"][k])
    print("\nmean change over seeds (with - without):")
    for group, values in changes.items():
        print(f"{group:<{width}}  " + "  ".join(f"{k} {statistics.mean(v):+.3f} (n={len(v)})"
                                               for k, v in values.items()))


def _f(value) -> str:
    return "absent" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    sys.exit(main())
