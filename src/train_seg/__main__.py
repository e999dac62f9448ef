"""``python -m train_seg`` / ``train-seg``: the Hydra entry point.

Returns the best value of ``optimized_metric`` (so Hydra sweepers can optimise it). Bad input (config, dataset,
weights file, checkpoint) is reported as one paragraph on stderr and exits with status 2 before training starts;
in a multirun the job is marked failed instead and the other jobs go on.
"""
from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "configs")
log = logging.getLogger("train_seg")


def _is_multirun() -> bool:
    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:
        return False


def run_task(cfg: DictConfig) -> float:
    from train_seg.train import fit, prepare

    run_dir = Path(cfg.paths.output_dir)
    try:
        run = prepare(cfg, run_dir)
    except (ValueError, FileNotFoundError) as exc:
        message = f"train_seg: error: {exc}"
        log.debug("traceback of the error above", exc_info=True)
        if _is_multirun():
            log.error(message)
            raise
        print(message, file=sys.stderr)
        sys.exit(2)
    payload = fit(run)
    best = (payload.get("best") or {}).get("value")
    return float(best) if best is not None else math.nan


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float:
    return run_task(cfg)


if __name__ == "__main__":
    main()
