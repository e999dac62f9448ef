"""The sweep summary (``train_seg.summary``) on hand-made job directories: every status, class order, rare-class
mean, the CSV/Markdown/PNG files, and ``python -m train_seg.summary`` on a partial sweep."""
import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import cli_env
from train_seg.summary import find_job_dirs, markdown, summarize, swept_keys, write_summary

# class order in the dataset is NOT the order by pixel share: the summary must sort it
CLASSES = ["background", "car", "lake", "road"]
SHARES = [0.80, 0.005, 0.15, 0.045]


def fake_job(sweep: Path, name: str, overrides: list[str], status: str | None = None, iou: dict | None = None,
             epochs: int = 2, best_epoch: int = 1, error: str | None = None) -> Path:
    """A job directory as the trainer leaves it: .hydra/overrides.yaml, and metrics.json unless status is None."""
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if status is None:
        return job
    iou = iou or {}
    final = None
    if iou:
        values = [v for v in iou.values() if v is not None]
        final = {"epoch": epochs, "step": 10 * epochs, "val/mIoU": sum(values) / len(values),
                 "val/rare_mIoU": iou.get("car"),
                 **{f"val/IoU/{c}": v for c, v in iou.items()},
                 "per_class": {c: {"pixel_share": s, "iou": iou.get(c), "recall": iou.get(c)}
                               for c, s in zip(CLASSES, SHARES)}}
    best = {"metric": "val/mIoU", "value": final["val/mIoU"] + 0.01, **final, "epoch": best_epoch,
            "val/mIoU": final["val/mIoU"] + 0.01} if final else None
    payload = {"status": status, "error": error, "optimized_metric": "val/mIoU", "class_names": CLASSES,
               "class_stats": {"train": {"pixel_share": SHARES}}, "rare_share": 0.01, "rare_classes": ["car"],
               "final": final, "best": best, "history": [{"epoch": e} for e in range(1, epochs + 1)] if final else []}
    (job / "metrics.json").write_text(json.dumps(payload))
    return job


@pytest.fixture
def partial_sweep(tmp_path) -> Path:
    """Five jobs as a killed or still-running sweep leaves them."""
    sweep = tmp_path / "sweep"
    common = ["trainer.max_epochs=2"]
    fake_job(sweep, "0_trainer.max_epochs=2,weighting=none", ["weighting=none", *common], "completed",
             {"background": 0.9, "car": 0.0, "lake": 0.7, "road": 0.3})
    fake_job(sweep, "1_trainer.max_epochs=2,weighting=inverse", ["weighting=inverse", *common], "completed",
             {"background": 0.8, "car": 0.2, "lake": 0.6, "road": None})
    fake_job(sweep, "2_trainer.max_epochs=2,weighting=enet", ["weighting=enet", *common], "failed",
             {"background": 0.85, "car": 0.05, "lake": 0.5, "road": 0.2}, epochs=1,
             error="RuntimeError: simulated crash in epoch 2")
    fake_job(sweep, "3_trainer.max_epochs=2,weighting=median_freq", ["weighting=median_freq", *common], "running",
             {"background": 0.8, "car": 0.1, "lake": 0.4, "road": 0.2}, epochs=1)
    fake_job(sweep, "10_trainer.max_epochs=2,weighting=log", ["weighting=log", *common])  # no metrics.json yet
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    return sweep


def test_summarize_reads_every_job_in_order_with_its_status(partial_sweep):
    summary = summarize(partial_sweep)
    assert [job.num for job in summary.jobs] == [0, 1, 2, 3, 10]  # numeric order, not "10" < "2"
    assert [job.status for job in summary.jobs] == ["completed", "completed", "failed", "running", "incomplete"]
    assert summary.classes == ["background", "lake", "road", "car"]  # by decreasing training pixel share
    assert summary.rare == [False, False, False, True] and summary.rare_share == 0.01
    assert summary.varying_keys == ["weighting"] and summary.common_overrides == ["trainer.max_epochs=2"]
    none, inverse, enet, median, log = summary.jobs
    assert inverse.final_rare_miou == pytest.approx(0.2) and inverse.best_epoch == 1 and inverse.epochs == 2
    assert math.isnan(inverse.final_iou["road"])  # absent class stays NaN
    assert enet.error == "RuntimeError: simulated crash in epoch 2" and enet.final_iou["car"] == 0.05
    assert math.isnan(log.final_miou) and log.final_iou == {}


def test_rare_share_option_recomputes_the_rare_mean(partial_sweep):
    summary = summarize(partial_sweep, rare_share=0.05)  # road (4.5%) and car (0.5%) are now rare
    assert summary.rare == [False, False, True, True]
    none = summary.jobs[0]
    assert none.final_rare_miou == pytest.approx((0.3 + 0.0) / 2)
    assert summary.jobs[1].final_rare_miou == pytest.approx(0.2)  # road absent: NaN-excluded, not counted as 0


def test_files_rows_and_columns(partial_sweep):
    summary = write_summary(partial_sweep)
    with open(partial_sweep / "summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(summary.jobs) == 5
    assert list(rows[0])[:4] == ["job", "num", "overrides", "weighting"]
    for column in ("status", "best_epoch", "best_mIoU", "final_mIoU", "final_rare_mIoU", "best_rare_mIoU",
                   "IoU/background", "IoU/lake", "IoU/road", "IoU/car", "error"):
        assert column in rows[0]
    assert [r["weighting"] for r in rows] == ["none", "inverse", "enet", "median_freq", "log"]
    assert rows[1]["IoU/car"] == "0.2" and rows[1]["IoU/road"] == "" and rows[4]["final_mIoU"] == ""
    assert rows[1]["recall/car"] == "0.2" and rows[1]["precision/car"] == ""  # not recorded: empty, never 0
    assert rows[2]["status"] == "failed" and "simulated crash" in rows[2]["error"]
    text = (partial_sweep / "summary.md").read_text()
    assert "| car 0.50% (rare) |" in text and "absent" in text
    assert "`weighting=enet` (failed): RuntimeError: simulated crash in epoch 2" in text
    assert text.count("\n| ") == 1 + 5  # header + one row per job
    assert (partial_sweep / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_sweep_where_every_job_failed_early_still_summarises(tmp_path):
    sweep = tmp_path / "sweep"
    fake_job(sweep, "0_trainer.precision=16-mixed", ["trainer.precision=16-mixed"])
    job = sweep / "0_trainer.precision=16-mixed"
    (job / "metrics.json").write_text(json.dumps({"status": "failed", "error": "ConfigError: no CUDA", "final": None,
                                                  "best": None, "history": []}))
    summary = write_summary(sweep)
    assert summary.classes == [] and [j.status for j in summary.jobs] == ["failed"]
    assert "ConfigError: no CUDA" in markdown(summary)


def test_swept_keys_come_from_multirun_yaml_so_a_lone_started_job_is_labelled(tmp_path):
    """A sweep killed during its first job: multirun.yaml still says what the sweep varies."""
    sweep = tmp_path / "sweep"
    fake_job(sweep, "0_trainer.max_epochs=2,weighting=none", ["weighting=none", "trainer.max_epochs=2"], "running",
             {"background": 0.9, "car": 0.0, "lake": 0.7, "road": 0.3})
    (sweep / "multirun.yaml").write_text(
        "hydra:\n  overrides:\n    task:\n    - weighting=none,inverse\n    - trainer.max_epochs=2\n"
        "    - sweep=losses\n  sweeper:\n    params:\n      loss: ce,focal\n")
    assert swept_keys(sweep) == ["weighting", "loss"]
    summary = summarize(sweep)
    assert summary.common_overrides == ["trainer.max_epochs=2"] and summary.varying_keys == ["weighting"]
    assert "`weighting=none` | **running** |" in markdown(summary)


def test_job_dirs_are_found_even_when_nested(tmp_path):
    fake_job(tmp_path, "0_a=1", ["a=1"], "completed", {"background": 1.0, "car": 0.0, "lake": 1.0, "road": 1.0})
    fake_job(tmp_path, "1_dataset.root=/data/x", ["dataset.root=/data/x"])  # a `/` in a value nests the dir
    assert [p.relative_to(tmp_path).as_posix() for p in find_job_dirs(tmp_path)] == ["0_a=1",
                                                                                     "1_dataset.root=/data/x"]


@pytest.mark.slow
def test_summary_command_on_a_partial_sweep_without_torch(partial_sweep):
    """The real command, in a fresh interpreter: writes the three files, lists every job, never imports torch."""
    code = ("import sys, runpy; sys.argv = ['train_seg.summary', sys.argv[1], '--rare-share', '0.05']\n"
            "try:\n    runpy.run_module('train_seg.summary', run_name='__main__')\n"
            "except SystemExit as exc:\n    assert not exc.code, exc.code\n"
            "assert 'torch' not in sys.modules, 'the summary imported torch'\n")
    result = subprocess.run([sys.executable, "-c", code, str(partial_sweep)], env=cli_env(), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("summary.csv", "summary.md", "summary.png"):
        assert (partial_sweep / name).is_file()
    for status in ("completed", "failed", "running", "incomplete"):
        assert status in result.stdout
    assert "--rare-share 0.05" in (partial_sweep / "summary.md").read_text()
    missing = subprocess.run([sys.executable, "-m", "train_seg.summary", str(partial_sweep / "nope")], env=cli_env(),
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "not a directory" in missing.stderr
