"""Sweeps through the real command line (`python -m train_seg -m ...` into a temporary directory) and the sweep
presets of configs/sweep, configs/experiment and configs/hparams_search."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

import forkserver
from conftest import CONFIG_DIR, cli_env

TINY = ["model=tiny", "dataset.num_train=8", "dataset.num_val=4", "dataset.image_size=64", "trainer.batch_size=2",
        "trainer.max_epochs=1", "trainer.num_workers=0", "trainer.progress=false", "logger.tensorboard.num_overlays=1",
        # dataset seed 3 and car probability 0.25: the 4 val images hold every class; on its 8 training images car
        # has 1.6% of the pixels (road 2.4%), so rare_share=0.02 keeps car the one rare class
        "dataset.seed=3", "dataset.car_probability=0.25", "rare_share=0.02"]


def run_sweep(tmp_path: Path, *overrides: str) -> tuple[subprocess.CompletedProcess, Path]:
    sweep = tmp_path / "sweep"
    result = forkserver.run(
        [sys.executable, "-m", "train_seg", "-m", *overrides, *TINY, f"paths.cache_dir={tmp_path / 'cache'}",
         f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path, env=cli_env(), timeout=600)
    return result, sweep


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def compose_with_hydra(*overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


@pytest.mark.slow
def test_two_job_multirun_writes_the_summary_and_names_runs_by_override(tmp_path):
    result, sweep = run_sweep(tmp_path, "weighting=none,inverse")
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    # job dir = TensorBoard run name; the path-valued paths.cache_dir is left out (a `/` would nest directories)
    # the swept key comes first, where run lists and legends cannot cut it off
    assert len(jobs) == 2 and jobs[0].startswith("0_weighting=none,")
    assert jobs[1].startswith("1_weighting=inverse,") and "cache" not in jobs[1]
    for job in jobs:
        assert list((sweep / job).glob("events.out.tfevents.*")) and (sweep / job / "metrics.json").is_file()

    rows = read_csv(sweep / "summary.csv")
    assert [(r["num"], r["weighting"], r["status"]) for r in rows] == [("0", "none", "completed"),
                                                                       ("1", "inverse", "completed")]
    assert [r["job"] for r in rows] == jobs
    classes = ["background", "lake", "road", "car"]  # by decreasing pixel share
    assert [c for c in rows[0] if c.startswith("IoU/")] == [f"IoU/{c}" for c in classes]
    for row in rows:
        assert row["best_epoch"] == "1" and 0.0 <= float(row["final_mIoU"]) <= 1.0
        assert row["final_rare_mIoU"] == row["IoU/car"] != ""  # car is the one rare class (< 1% of pixels)
        assert float(row["best_mIoU"]) == pytest.approx(float(row["final_mIoU"]))  # one epoch: best = final
        metrics = json.loads((sweep / row["job"] / "metrics.json").read_text())
        assert float(row["IoU/road"]) == pytest.approx(metrics["final"]["val/IoU/road"], abs=1e-5)
    text = (sweep / "summary.md").read_text()
    assert "| 0 | `weighting=none` | completed |" in text and "car 1.59%" in text and "(rare)" in text  # header: class, training share
    assert (sweep / "summary.png").stat().st_size > 10_000
    assert "sweep summary" in result.stdout and "weighting=inverse" in result.stdout


@pytest.mark.slow
def test_a_failing_job_is_a_failed_row_and_the_sweep_exits_1(tmp_path):
    """The first job fails (a negative learning rate); the second still runs; the summary lists both; exit 1."""
    result, sweep = run_sweep(tmp_path, "optimizer.lr=-1,0.01")
    assert result.returncode == 1, result.stderr[-3000:]
    rows = read_csv(sweep / "summary.csv")
    assert [(r["optimizer.lr"], r["status"]) for r in rows] == [("-1", "failed"), ("0.01", "completed")]
    assert "optimizer.lr=-1" in rows[0]["error"] and rows[0]["final_mIoU"] == ""
    assert rows[1]["final_mIoU"] != "" and rows[1]["error"] == ""
    failed = json.loads((sweep / rows[0]["job"] / "metrics.json").read_text())
    assert failed["status"] == "failed" and failed["error"].startswith("ConfigError: optimizer.lr=-1")
    assert "(failed)" in (sweep / "summary.md").read_text()
    assert "1 of 2 jobs did not complete" in result.stderr


SEEDS = "range(0,1)"  # the default seeds=1; `seeds=N` repeats every configuration with seeds 0..N-1


@pytest.mark.parametrize("preset, expected", [
    ("weighting", {"weighting": "none,inverse,sqrt_inverse,median_freq,enet,effective_num", "seed": SEEDS}),
    ("losses", {"loss": "ce,focal,dice,ce_dice,logit_adjusted", "seed": SEEDS}),
    ("loss_x_weighting", {"loss": "ce,focal,dice,ce_dice", "weighting": "none,inverse,median_freq", "seed": SEEDS}),
])
def test_sweep_presets_set_the_sweeper_params_and_their_options_exist(preset, expected):
    cfg = compose_with_hydra(f"sweep={preset}", "experiment=quick")
    assert dict(cfg.hydra.sweeper.params) == expected
    for group, options in expected.items():
        for option in options.split(",") if group != "seed" else ():
            assert (Path(CONFIG_DIR) / group / f"{option}.yaml").is_file(), f"{group}={option}"
    assert cfg.trainer.max_epochs == 8 and cfg.trainer.num_workers == 0  # experiment=quick composes with it
    assert cfg.hydra.callbacks.sweep_summary._target_ == "train_seg.reporting.sweep.SweepSummaryCallback"
    assert "sweep" in cfg.hydra.job.config.override_dirname.exclude_keys
    assert compose_with_hydra(f"sweep={preset}", "seeds=3").hydra.sweeper.params.seed == "range(0,3)"


def test_main_config_composes_without_the_optional_plugins():
    cfg = compose_with_hydra()
    assert cfg.hydra.sweeper._target_ == "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
    subdir = OmegaConf.to_container(cfg.hydra.sweep, resolve=False)["subdir"]
    assert cfg.optimized_metric == "val/mIoU" and subdir == "${train_seg_job_dirname:}"


def test_optuna_search_preset_composes():
    cfg = compose_with_hydra("hparams_search=optuna")
    sweeper = cfg.hydra.sweeper
    assert "OptunaSweeper" in sweeper._target_ and sweeper.direction == "maximize" and sweeper.n_trials == 20
    assert set(sweeper.params) == {"optimizer.lr", "weighting.power", "loss"}
    assert cfg.optimized_metric == "val/rare_mIoU"


def test_joblib_launcher_composes():
    cfg = compose_with_hydra("hydra/launcher=joblib", "hydra.launcher.n_jobs=2")
    assert "JoblibLauncher" in cfg.hydra.launcher._target_ and cfg.hydra.launcher.n_jobs == 2


@pytest.mark.slow
def test_joblib_launcher_runs_jobs_in_parallel_with_dataloader_workers(tmp_path):
    """Two 1-thread jobs side by side, each with a DataLoader worker process (needs the explicit fork context)."""
    result, sweep = run_sweep(tmp_path, "weighting=none,median_freq", "hydra/launcher=joblib",
                              "hydra.launcher.n_jobs=2", "trainer.num_workers=1", "trainer.num_threads=1")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_csv(sweep / "summary.csv")
    assert [(r["weighting"], r["status"]) for r in rows] == [("none", "completed"), ("median_freq", "completed")]


@pytest.mark.slow
def test_optuna_search_runs_trials_and_reports_the_best(tmp_path):
    result, sweep = run_sweep(tmp_path, "hparams_search=optuna", "hydra.sweeper.n_trials=2")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_csv(sweep / "summary.csv")
    assert len(rows) == 2 and all(r["status"] == "completed" for r in rows)
    best = OmegaConf.load(sweep / "optimization_results.yaml")
    # optuna maximised what the main returned: the best val/rare_mIoU of each trial
    values = [json.loads((sweep / r["job"] / "metrics.json").read_text())["best"]["value"] for r in rows]
    assert best.best_value == pytest.approx(max(values))
    assert set(best.best_params) == {"optimizer.lr", "weighting.power", "loss"}


def test_cpu_sweep_experiment_runs_two_one_thread_jobs():
    cfg = compose_with_hydra("experiment=cpu_sweep", "sweep=weighting", "seeds=3")
    assert "JoblibLauncher" in cfg.hydra.launcher._target_ and cfg.hydra.launcher.n_jobs == 2
    assert cfg.trainer.num_threads == 1 and cfg.trainer.max_epochs == 8  # experiment=quick underneath
    assert cfg.hydra.sweeper.params.seed == "range(0,3)"
