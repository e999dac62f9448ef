"""The real command line, as a user types it (subprocesses; marked slow, still run by `make test`)."""
import json
import sys

import pytest

import forkserver
from conftest import ROOT, cli_env

pytestmark = pytest.mark.slow


def run_cli(*args, cwd):
    return forkserver.run([sys.executable, "-m", "train_seg", *args], cwd=cwd, env=cli_env(), timeout=300)


def tiny_cli(tmp_path):
    return ["model=tiny", "dataset.num_train=8", "dataset.num_val=4", "dataset.image_size=64", "trainer.batch_size=2",
            "trainer.max_epochs=1", "trainer.num_workers=0", "trainer.progress=false",
            f"paths.cache_dir={tmp_path / 'cache'}"]


def test_cli_trains_with_inverse_weighting_and_prints_the_class_table(tmp_path):
    result = run_cli(*tiny_cli(tmp_path), "weighting=inverse", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    for name in ("background", "lake", "road", "car", "share %", "IoU", "recall", "mIoU"):
        assert name in log
    assert "class weights (weighting=inverse)" in log
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["weighting"]["scheme"] == "inverse"
    weights = metrics["class_weights"]
    assert weights["car"] > weights["road"] > weights["lake"] > weights["background"]
    assert (tmp_path / "run" / ".hydra" / "config.yaml").is_file()


def test_cli_bad_value_exits_2_with_one_paragraph_and_no_traceback(tmp_path):
    result = run_cli(*tiny_cli(tmp_path), "optimizer.lr=-1", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 2
    assert "optimizer.lr=-1" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "last.pt").exists()


def test_cli_unknown_key_is_refused_by_hydra(tmp_path):
    result = run_cli("trainer.max_epoch=3", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode != 0 and "max_epoch" in result.stderr


def test_cli_help_and_cfg_job(tmp_path):
    result = run_cli("--help", cwd=tmp_path)
    assert result.returncode == 0 and "weighting" in result.stdout and "loss" in result.stdout
    result = run_cli("--cfg", "job", "loss=focal", "loss.gamma=3", cwd=tmp_path)
    assert result.returncode == 0 and "gamma: 3" in result.stdout and "FocalLoss" in result.stdout


def test_stats_cli_prints_every_scheme_side_by_side(tmp_path):
    from train_seg.data.class_stats import compute_class_stats
    from train_seg.data.synthetic import SyntheticShapes
    from train_seg.losses.weighting import class_weights

    result = forkserver.run(
        [sys.executable, "-m", "train_seg.cli.stats", "dataset.num_train=20", "weighting=inverse", "trainer.progress=false",
         f"paths.cache_dir={tmp_path / 'cache'}"],
        cwd=tmp_path, env=cli_env(), timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("class"))
    columns = header.split()
    for scheme in ("none", "inverse", "sqrt_inverse", "median_freq", "enet", "effective_num", "log"):
        assert scheme in columns
    car = next(line for line in lines if line.startswith("car")).split()
    stats = compute_class_stats(SyntheticShapes("train", num_train=20), progress=False)
    expected = class_weights(stats, "inverse")[3].item()
    # the header's "pixels %" is two words, the rows' share is one: row field = header word index - 1
    assert float(car[columns.index("inverse") - 1]) == pytest.approx(expected, rel=1e-3)
    assert "rare classes" in result.stdout and not list(tmp_path.glob("outputs"))
