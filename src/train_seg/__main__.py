"""``python -m train_seg`` / ``train-seg``: the Hydra entry point.

Returns the best value of ``optimized_metric`` (so Hydra sweepers can optimise it). Bad input (config, dataset,
weights file, checkpoint) is reported as one paragraph on stderr and exits with status 2 before training starts.
In a multirun, any failure of a job marks that job failed (metrics.json ``status: failed``, NaN returned) and the
other jobs go on; the sweep summary lists it and the process exits with status 1 (see ``train_seg.sweep``).
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

from train_seg.cli import CONFIG_DIR, USER_ERRORS, exit_with_user_error

log = logging.getLogger("train_seg")


def _is_multirun() -> bool:
    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:
        return False


def run_task(cfg: DictConfig) -> float:
    from train_seg.train import fit, prepare

    run_dir = Path(cfg.paths.output_dir)
    if _is_multirun():
        return _run_sweep_job(cfg, run_dir)
    try:
        run = prepare(cfg, run_dir)
    except USER_ERRORS as exc:
        log.debug("traceback of the error above", exc_info=True)
        exit_with_user_error("train_seg", exc)
    return _best_value(fit(run).best)


def _best_value(best: dict | None) -> float:
    value = (best or {}).get("value")
    return float(value) if value is not None else math.nan


def _run_sweep_job(cfg: DictConfig, run_dir: Path) -> float:
    """One job of a multirun. A failure (bad input or a crash in training) is logged into the job's log, recorded
    in its metrics.json as ``status: failed`` with the error (keeping the last completed evaluation) and returned as
    NaN, so the sweeper launches the other jobs and the sweep callback writes the summary, lists this job as failed
    and exits non-zero (see train_seg.sweep)."""
    from train_seg.record import mark_failed
    from train_seg.train import fit, prepare

    try:
        return _best_value(fit(prepare(cfg, run_dir)).best)
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
    return hydra_main()


if __name__ == "__main__":
    main()
