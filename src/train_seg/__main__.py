"""``python -m train_seg`` / ``train-seg``: the Hydra entry point.

Returns the best value of ``optimized_metric`` (so Hydra sweepers can optimise it). Bad input (an override, a
config value, the dataset, a weights file, a checkpoint, a run directory that cannot be written) is reported as one
paragraph on stderr and exits with status 2 before training starts and before Hydra writes anything
(``train_seg.cli.preflight``); so do a sample that becomes unreadable during training and a disk that fills.
In a multirun, any failure of a job marks that job failed (metrics.json ``status: failed``, NaN returned) and the
other jobs go on; the sweep summary lists it and the process exits with status 1 (see ``train_seg.reporting.sweep``).
"""
from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from train_seg.cli import preflight
from train_seg.atomic import DiskFullError
from train_seg.config.command_line import CONFIG_DIR, USER_ERRORS, exit_with_user_error, report_hydra_errors
from train_seg.data.base import DatasetError

log = logging.getLogger("train_seg")


def _is_multirun() -> bool:
    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:
        return False


def run_task(cfg: DictConfig) -> float:
    """One run (or one sweep job). Under torchrun or a multi-task SLURM step it runs inside a process group
    (``train_seg.distributed.session``: gloo on CPU, NCCL on CUDA, destroyed on every exit path)."""
    from train_seg import distributed
    from train_seg.config.validation import resolve_device

    env = distributed.discover()
    if not env.distributed:
        return _run(cfg)
    if _is_multirun() and env.source == "torchrun":
        exit_with_user_error("train_seg", ValueError(
            "-m (a sweep) under torchrun would run every job on every rank in lockstep: run the sweep without "
            "torchrun, or launch each job with its own torchrun (or on SLURM: experiment=slurm_1node)."))
    if env.rank > 0:
        logging.getLogger("train_seg").setLevel(logging.WARNING)  # rank 0 reports; the others only warn
    try:
        device = resolve_device(cfg.trainer.device)  # the process group's backend needs it: prepare reuses it
    except USER_ERRORS as exc:
        exit_with_user_error("train_seg", exc)
    with distributed.session(env, device.type, float(cfg.trainer.dist_timeout_s)):
        log.info("distributed: %s", distributed.describe(env))
        return _run(cfg, device)


def _run(cfg: DictConfig, device=None) -> float:
    from train_seg.engine.loop import NonFiniteLossError
    from train_seg.engine.signals import RunInterrupted
    from train_seg.engine.trainer import fit, prepare

    run_dir = Path(cfg.paths.output_dir)
    if _is_multirun():
        return _run_sweep_job(cfg, run_dir)
    try:
        run = preflight.take(run_dir)  # prepared before Hydra wrote anything (a single run from the command line)
        if run is None:
            run = prepare(cfg, run_dir, device)
    except USER_ERRORS as exc:
        log.debug("traceback of the error above", exc_info=True)
        exit_with_user_error("train_seg", exc)
    try:
        return _best_value(fit(run).best)
    except (DatasetError, DiskFullError) as exc:
        # a sample that became unreadable during training (dataset.on_bad_sample=error), a disk that filled: the
        # message names the file and the fix; metrics.json says failed
        log.debug("traceback of the error above", exc_info=True)
        exit_with_user_error("train_seg", exc)
    except NonFiniteLossError as exc:
        log.debug("traceback of the error above", exc_info=True)
        print(f"train_seg: error: {exc}", file=sys.stderr)
        sys.exit(1)
    except RunInterrupted as exc:
        _exit_interrupted(exc, cfg, run_dir)


def _exit_interrupted(exc, cfg: DictConfig, run_dir: Path):
    """A stop signal: the run saved its state; one line says how to continue it, then exit 128 + the signal.
    Under SLURM with ``trainer.requeue_on_signal=true`` the job is requeued first."""
    from train_seg.engine.signals import requeue_slurm_job

    overrides = [o for o in HydraConfig.get().overrides.task
                 if not o.startswith(("trainer.resume=", "hydra.run.dir="))]
    command = " ".join(["python -m train_seg", *overrides, "trainer.resume=auto", f"hydra.run.dir={run_dir}"])
    requeued = requeue_slurm_job() if cfg.trainer.requeue_on_signal else None
    print(f"train_seg: {exc}. {requeued + '. ' if requeued else ''}Continue with: {command}", file=sys.stderr)
    sys.exit(exc.exit_code)


def _best_value(best: dict | None) -> float:
    value = (best or {}).get("value")
    return float(value) if value is not None else math.nan


def _run_sweep_job(cfg: DictConfig, run_dir: Path) -> float:
    """One job of a multirun. A failure (bad input or a crash in training) is logged into the job's log, recorded
    in its metrics.json as ``status: failed`` with the error (keeping the last completed evaluation) and returned as
    NaN, so the sweeper launches the other jobs and the sweep callback writes the summary, lists this job as failed
    and exits non-zero (see train_seg.reporting.sweep)."""
    from train_seg.reporting.record import mark_failed
    from train_seg.engine.trainer import fit, prepare

    from train_seg.search.study import TrialPruned

    try:
        return _best_value(fit(prepare(cfg, run_dir)).best)
    except TrialPruned as exc:  # metrics.json says pruned (with its best so far); the sweeper tells Optuna
        log.info("train_seg: %s", exc)
        return math.nan
    except Exception as exc:
        if isinstance(exc, USER_ERRORS):
            log.error("train_seg: error: %s", exc)  # bad input: the one-paragraph message says it all
            log.debug("traceback of the error above", exc_info=True)
        else:
            log.exception("train_seg: the job crashed")
        mark_failed(run_dir, exc)
        return math.nan


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def hydra_main(cfg: DictConfig) -> float:
    return run_task(cfg)


def main():
    """``train-seg`` / ``python -m train_seg``: ``--version`` prints the version; anything else goes to Hydra."""
    if "--version" in sys.argv[1:]:
        from train_seg import __version__

        print(f"train_seg {__version__}")
        return None
    report_hydra_errors("train_seg")  # a bad override: one paragraph and exit status 2, like every bad input
    from train_seg.distributed import discover, hydra_overrides

    sys.argv += hydra_overrides(discover())  # ranks > 0 of torchrun: no run directory, .hydra/ or log file
    return hydra_main()


if __name__ == "__main__":
    main()
