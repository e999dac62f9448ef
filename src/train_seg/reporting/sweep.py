"""The Hydra callback that closes every multirun (``SweepSummaryCallback``, registered in ``configs/hydra/default.yaml``).

``on_multirun_start`` refuses ``seeds`` < 1 (it would launch no job: exit status 2) and, with ``logger.mlflow`` set, creates the
sweep's MLflow parent run (``train_seg.reporting.sinks.mlflow.start_sweep_run``; the jobs become its children).
``on_multirun_end`` writes ``summary.csv``, ``summary.md`` and ``summary.png`` (``train_seg.reporting.summary``,
baseline from ``summary.baseline``), prints a short table, writes the sweep's one HPARAMS experiment at the sweep root
(``train_seg.reporting.sinks.tensorboard.write_sweep_experiment``), ends the MLflow parent with the sweep's status (a
driver stopped before, by Ctrl-C, ends it ``interrupted`` at exit), and exits with status 1 if any job is not
``completed``. It reads only the files of the sweep directory, so it works with any launcher.

A failing job reaches it as follows: the task function (``train_seg.__main__``) catches a job's exception, logs it,
records it in the job's ``metrics.json`` (``status: failed``, ``error``, last completed evaluation) and returns NaN
instead of raising, because Hydra's sweepers would re-raise only after the batch and skip ``on_multirun_end``.
"""
from __future__ import annotations

import atexit
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf


class SweepSummaryCallback(Callback):
    """``on_multirun_end``: summarise the sweep directory; exit 1 when a job did not complete.

    Args:
      rare_share: rare-class threshold for the summary's rare mIoU (None: the value the jobs ran with).
      exit_on_failure: exit with status 1 after writing the summary if any job failed or did not finish.
    """

    def __init__(self, rare_share: float | None = None, exit_on_failure: bool = True):
        self.rare_share = None if rare_share is None else float(rare_share)
        self.exit_on_failure = bool(exit_on_failure)
        self.mlflow_parent: Path | None = None  # the sweep directory whose MLflow parent run is open

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from train_seg.config.command_line import exit_with_user_error
        from train_seg.config.validation import ConfigError

        seeds = OmegaConf.select(config, "seeds", default=None)
        if seeds is not None and (isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1):
            # SystemExit, not an exception: Hydra turns a callback's exceptions into warnings and launches no job
            exit_with_user_error("train_seg", ConfigError(
                f"seeds={seeds!r}: must be an integer >= 1 (the number of seeds per configuration of a sweep preset: "
                "seed 0 .. seeds-1)."))
        self._start_mlflow_parent(config)

    def _start_mlflow_parent(self, config: DictConfig) -> None:
        """The MLflow parent run, when ``logger.mlflow`` is the MLflow sink. A missing extra stops the sweep before
        its first job with one paragraph and exit status 2 (SystemExit: Hydra turns a callback's exceptions into
        warnings)."""
        from train_seg.config.command_line import exit_with_user_error
        from train_seg.config.validation import ConfigError

        node = OmegaConf.select(config, "logger.mlflow", default=None)
        if not _is_mlflow_sink(node):
            return
        from train_seg.reporting.sinks.mlflow import default_run_name, start_sweep_run

        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            start_sweep_run(sweep_dir, default_run_name(sweep_dir, str(config.paths.output_root)),
                            OmegaConf.to_container(node, resolve=True))
        except ConfigError as exc:
            exit_with_user_error("train_seg", exc)
        self.mlflow_parent = sweep_dir
        atexit.register(self._end_mlflow_parent, "interrupted")  # unless on_multirun_end ends it first

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from train_seg.reporting.summary import FILES, PRUNED, console_table, write_summary

        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():
            return
        # print, not log: after the last job, the logging handlers still point at that job's log file
        try:
            baseline = OmegaConf.select(config, "summary.baseline", default=None)
            if OmegaConf.is_config(baseline):
                baseline = OmegaConf.to_container(baseline)
            summary = write_summary(sweep_dir, self.rare_share, baseline)
        except Exception as exc:  # a summary problem must not hide the jobs' own results
            print(f"train_seg: could not write the sweep summary in {sweep_dir}: {type(exc).__name__}: {exc}\n"
                  f"Retry with: python -m train_seg.cli.summary {sweep_dir}", file=sys.stderr, flush=True)
            self._end_mlflow_parent("failed")
            if self.exit_on_failure:
                sys.exit(1)
            return
        self._write_hparams_experiment(config, sweep_dir, summary)
        self._end_mlflow_parent(summary.jobs, [sweep_dir / name for name in FILES])
        print(f"\nsweep summary ({sweep_dir}):\n{console_table(summary)}", flush=True)
        print("wrote " + ", ".join(str(sweep_dir / name) for name in FILES), flush=True)
        bad = [job for job in summary.not_completed if job.status != PRUNED]
        if bad:
            lines = [f"  {job.name}: {job.status}" + (f": {job.error.splitlines()[0][:300]}" if job.error else "")
                     for job in bad]
            print(f"train_seg: {len(bad)} of {len(summary.jobs)} jobs did not complete:\n" + "\n".join(lines),
                  file=sys.stderr, flush=True)
            if self.exit_on_failure:
                sys.exit(1)

    def _end_mlflow_parent(self, outcome, files=()) -> None:
        """Ends the open MLflow parent run: ``outcome`` is a status, or the summary's jobs (then their sweep status,
        ``sinks.mlflow.sweep_status``); a tracking problem is reported and the sweep goes on."""
        sweep_dir, self.mlflow_parent = self.mlflow_parent, None
        if sweep_dir is None:
            return
        try:
            from train_seg.config.naming import swept_keys
            from train_seg.reporting.sinks.mlflow import end_sweep_run, sweep_status

            status = outcome if isinstance(outcome, str) else sweep_status([job.status for job in outcome])
            end_sweep_run(sweep_dir, status, files, swept_keys(sweep_dir))
        except Exception as exc:
            print(f"train_seg: could not end the sweep's MLflow parent run ({sweep_dir}): {type(exc).__name__}: "
                  f"{exc}", file=sys.stderr, flush=True)

    @staticmethod
    def _write_hparams_experiment(config: DictConfig, sweep_dir: Path, summary) -> None:
        """The sweep's HPARAMS experiment at the sweep root (module docstring); a failure only costs the
        ordering of the HPARAMS tab, so it is reported and the sweep goes on."""
        try:
            from train_seg.reporting.sinks.tensorboard import hparam_metric_tags, write_sweep_experiment
            from train_seg.config.naming import swept_keys

            params = OmegaConf.select(config, "hydra.sweeper.params", default=None) or {}
            swept = [str(k) for k in params] + swept_keys(sweep_dir)
            metric = next((job.best_metric for job in summary.jobs if job.best_metric),
                          OmegaConf.select(config, "optimized_metric", default="val/mIoU"))
            names, share, val_present = _class_info(summary)
            tags = hparam_metric_tags(names, str(metric), share, val_present)
            write_sweep_experiment(sweep_dir, [job.path for job in summary.jobs], tags, swept)
        except Exception as exc:
            print(f"train_seg: could not write the sweep's HPARAMS experiment in {sweep_dir}: "
                  f"{type(exc).__name__}: {exc}", file=sys.stderr, flush=True)


def _is_mlflow_sink(node) -> bool:
    """``node`` (``logger.mlflow``) builds ``MLflowSink`` or a subclass of it."""
    target = OmegaConf.select(node, "_target_", default=None) if OmegaConf.is_config(node) else None
    if not target:
        return False
    from hydra.utils import get_class

    from train_seg.config.legacy import current_target
    from train_seg.reporting.sinks.mlflow import MLflowSink

    try:
        return issubclass(get_class(current_target(str(target))), MLflowSink)
    except Exception:  # not importable: the job reports it, naming the key
        return False


def _class_info(summary) -> tuple[list[str], list[float], list[bool] | None]:
    """Class names, training pixel shares and which classes the val split holds, from the first job whose
    metrics.json has class statistics (the summary's classes and shares when none has)."""
    from train_seg.reporting import record
    for job in summary.jobs:
        try:
            run = record.read(job.path)
            train, val = (run.class_stats or {})["train"], (run.class_stats or {})["val"]
            return list(run.class_names), list(train["pixel_share"]), [int(c) > 0 for c in val["image_counts"]]
        except (record.RecordError, KeyError, TypeError):
            continue
    return list(summary.classes), list(summary.pixel_share), None
