"""The sweep summary (``train_seg.reporting.summary``) on hand-made job directories: every status, class order, rare-class
mean, the CSV/Markdown/PNG files, and ``python -m train_seg.cli.summary`` on a partial sweep."""
import csv
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import cli_env
from train_seg.reporting.summary import (console_table, csv_rows, find_job_dirs, markdown, mean_std, parse_baseline,
                               summarize, swept_keys, write_summary)
from train_seg.cli.summary import main as summary_main

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


def test_evaluations_inside_a_job_dir_are_not_jobs(tmp_path):
    """scripts/calibrate_sweep.py leaves calibrated_eval/ and uncalibrated_eval/ (each with a metrics.json) in the
    job directories; an MLflow store keeps copies of metrics.json under mlartifacts/. Neither is a job."""
    fake_job(tmp_path, "0_a=1", ["a=1"], "completed", {"background": 1.0, "car": 0.0, "lake": 1.0, "road": 1.0})
    for inner in ("0_a=1/calibrated_eval", "0_a=1/uncalibrated_eval", "mlartifacts/1/abc/artifacts"):
        (tmp_path / inner).mkdir(parents=True)
        (tmp_path / inner / "metrics.json").write_text((tmp_path / "0_a=1" / "metrics.json").read_text())
    assert [p.relative_to(tmp_path).as_posix() for p in find_job_dirs(tmp_path)] == ["0_a=1"]


@pytest.mark.slow
def test_summary_command_on_a_partial_sweep_without_torch(partial_sweep):
    """The real command, in a fresh interpreter: writes the three files, lists every job, never imports torch."""
    code = ("import sys, runpy; sys.argv = ['train_seg.cli.summary', sys.argv[1], '--rare-share', '0.05']\n"
            "try:\n    runpy.run_module('train_seg.cli.summary', run_name='__main__')\n"
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
    missing = subprocess.run([sys.executable, "-m", "train_seg.cli.summary", str(partial_sweep / "nope")], env=cli_env(),
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "not a directory" in missing.stderr


# ------------------------------------------------------------------------------------------ seeds, configurations
# car is the one rare class (0.5%); its IoU is the rare mIoU. Hand-made values and their statistics:
#   weighting=none     seeds 0 1 2  car 0.00 0.02 0.04   mean 0.02   std 0.02          (the default baseline)
#   weighting=inverse  seeds 0 1 2  car 0.20 0.30 0.25   mean 0.25   std 0.05          0.20 > 0.04: beats
#   weighting=enet     seeds 0 1 2  car 0.03 0.09, seed 2 FAILED (car 0.90, left out)
#                                                        mean 0.06   std 0.0424        0.0176 < 0.04: does not beat
#   weighting=log      seed 0       car 0.50             mean 0.50   std NaN (n = 1)   undetermined
SEEDED = {
    "none": [0.00, 0.02, 0.04],
    "inverse": [0.20, 0.30, 0.25],
    "enet": [0.03, 0.09, 0.90],
    "log": [0.50],
}


@pytest.fixture
def seeded_sweep(tmp_path) -> Path:
    sweep = tmp_path / "seeded"
    num = 0
    for scheme, cars in SEEDED.items():
        for seed, car in enumerate(cars):
            failed = scheme == "enet" and seed == 2
            fake_job(sweep, f"{num}_seed={seed},weighting={scheme}", [f"weighting={scheme}", f"seed={seed}"],
                     "failed" if failed else "completed",
                     {"background": 0.9 - car / 10, "car": car, "lake": 0.6 + seed / 10, "road": 0.3},
                     error="RuntimeError: simulated crash" if failed else None)
            num += 1
    (sweep / "multirun.yaml").write_text(
        "hydra:\n  overrides:\n    task:\n    - weighting=none,inverse,enet,log\n    - seed=0,1,2\n")
    return sweep


def test_mean_std():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0, 3)  # sample std, ddof = 1
    mean, std, n = mean_std([5.0, math.nan, None])
    assert (mean, n) == (5.0, 1) and math.isnan(std)  # one value: no std
    assert math.isnan(mean_std([])[0]) and mean_std([])[2] == 0


def test_parse_baseline():
    assert parse_baseline("weighting=none") == ["weighting=none"]
    assert parse_baseline("loss=ce weighting=none") == parse_baseline("loss=ce,weighting=none") == [
        "loss=ce", "weighting=none"]
    assert parse_baseline("weighting:none") == ["weighting=none"]  # no quoting needed on a Hydra command line
    assert parse_baseline("weighting.values=[1,2,3] loss=ce") == ["weighting.values=[1,2,3]", "loss=ce"]
    assert parse_baseline(["loss=ce"]) == ["loss=ce"] and parse_baseline(None) == []


def test_jobs_that_differ_only_in_seed_form_one_configuration(seeded_sweep):
    summary = summarize(seeded_sweep)
    assert summary.has_repeats and summary.varying_keys == ["weighting", "seed"]
    assert [group.overrides for group in summary.groups] == [[f"weighting={s}"] for s in SEEDED]
    assert [group.n for group in summary.groups] == [3, 3, 2, 1]
    assert [group.seeds for group in summary.groups] == [["0", "1", "2"]] * 3 + [["0"]]
    none, inverse, enet, log = summary.groups
    assert none.mean["IoU/car"] == pytest.approx(0.02) and none.std["IoU/car"] == pytest.approx(0.02)
    assert none.mean["final_rare_mIoU"] == pytest.approx(0.02)
    assert inverse.mean["IoU/car"] == pytest.approx(0.25) and inverse.std["IoU/car"] == pytest.approx(0.05)
    assert inverse.std["IoU/lake"] == pytest.approx(statistics.stdev([0.6, 0.7, 0.8]))
    assert inverse.mean["final_mIoU"] == pytest.approx(statistics.mean(
        [(0.9 - c / 10 + c + 0.6 + s / 10 + 0.3) / 4 for s, c in enumerate(SEEDED["inverse"])]))
    assert inverse.std["final_mIoU"] == pytest.approx(statistics.stdev(
        [(0.9 - c / 10 + c + 0.6 + s / 10 + 0.3) / 4 for s, c in enumerate(SEEDED["inverse"])]))
    assert log.mean["IoU/car"] == pytest.approx(0.5) and math.isnan(log.std["IoU/car"])  # n = 1: no std
    assert inverse.mean["recall/car"] == pytest.approx(0.25)  # recall and precision: means too
    assert math.isnan(inverse.mean["precision/car"])  # never recorded: NaN, not 0


def test_failed_jobs_are_left_out_of_the_statistics_but_listed(seeded_sweep):
    summary = summarize(seeded_sweep)
    enet = summary.groups[2]
    assert [job.status for job in enet.jobs] == ["completed", "completed", "failed"]
    assert enet.n == 2 and [job.num for job in enet.excluded] == [8]
    assert enet.mean["IoU/car"] == pytest.approx(0.06)  # not (0.03 + 0.09 + 0.90) / 3
    assert enet.std["IoU/car"] == pytest.approx(statistics.stdev([0.03, 0.09]))
    header, rows = csv_rows(summary)
    group_row = [r for r in rows if r["kind"] == "group"][2]
    assert group_row["n"] == 2 and group_row["status"] == "2 completed, 1 failed"
    assert "8_seed=2,weighting=enet (failed)" in group_row["error"]
    text = markdown(summary)
    assert "| 2 | `weighting=enet` | 2 of 3 |" in text
    assert "`weighting=enet seed=2` (failed): RuntimeError: simulated crash" in text  # the job table lists it


def test_beats_the_baseline_only_by_more_than_the_seed_spread(seeded_sweep):
    summary = summarize(seeded_sweep)
    none, inverse, enet, log = summary.groups
    assert summary.baseline is none and none.is_baseline  # first configuration with weighting=none
    assert inverse.beats_baseline is True  # 0.25 - 0.05 > 0.02 + 0.02
    assert enet.beats_baseline is False  # 0.06 - 0.042 < 0.04
    assert log.beats_baseline is None  # n = 1: no spread, no verdict (0.5 alone would look like a win)
    assert none.beats_baseline is None
    assert inverse.beats["car"] is True and inverse.beats["road"] is False  # road: identical values, std 0
    assert enet.beats["car"] is False


def test_a_named_baseline(seeded_sweep):
    summary = summarize(seeded_sweep, baseline="weighting:inverse")
    none, inverse, enet, log = summary.groups
    assert summary.baseline is inverse and not none.is_baseline
    assert none.beats_baseline is False and enet.beats_baseline is False and inverse.beats_baseline is None
    assert "named with summary.baseline" in summary.baseline_note
    missing = summarize(seeded_sweep, baseline="weighting=median_freq")
    assert missing.baseline is None and "no configuration has `weighting=median_freq`" in missing.baseline_note
    assert all(group.beats_baseline is None for group in missing.groups)


def test_csv_has_one_row_per_job_then_one_per_configuration(seeded_sweep):
    write_summary(seeded_sweep)
    with open(seeded_sweep / "summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    jobs = [r for r in rows if r["kind"] == "job"]
    groups = [r for r in rows if r["kind"] == "group"]
    assert len(jobs) == 10 and len(groups) == 4 and rows[:10] == jobs
    assert [r["group"] for r in jobs] == ["0"] * 3 + ["1"] * 3 + ["2"] * 3 + ["3"]
    assert jobs[0]["seed"] == "0" and jobs[0]["n"] == "" and jobs[0]["std/IoU/car"] == ""
    none, inverse, enet, log = groups
    assert none["seed"] == "0 1 2" and none["weighting"] == "none" and none["overrides"] == "weighting=none"
    assert none["n"] == "3" and float(none["IoU/car"]) == pytest.approx(0.02)
    assert float(none["std/IoU/car"]) == pytest.approx(0.02)
    assert float(inverse["std/final_rare_mIoU"]) == pytest.approx(0.05)
    assert log["n"] == "1" and log["std/IoU/car"] == "" and log["std/final_mIoU"] == ""
    assert [g["baseline"] for g in groups] == ["yes", "", "", ""]
    assert [g["beats_baseline"] for g in groups] == ["", "yes", "no", ""]
    assert inverse["beats/car"] == "yes" and enet["beats/car"] == "no" and log["beats/car"] == ""
    assert none["best_mIoU"] == "" and none["job"] == ""


def test_markdown_and_console_show_the_configurations(seeded_sweep):
    summary = summarize(seeded_sweep)
    text = markdown(summary)
    assert "## Configurations: mean ± std over seeds" in text and "## Jobs" in text
    assert "| 0 | `weighting=none` | 3 | 0 1 2 | " in text and "| 0.020 ± 0.020 | baseline |" in text
    assert "| 0.250 ± 0.050 | **▲ beats** |" in text and "0.250 ± 0.050 ▲ |" in text  # rare mIoU, car column
    assert "| 3 | `weighting=log` | 1 | 0 | " in text and "| 0.500 | – |" in text  # n = 1: no ±, no verdict
    assert text.count("\n| ") == 2 * (1 + 0) + (4 + 10)  # two header rows, 4 configurations, 10 jobs
    table = console_table(summary)
    assert "configuration" in table and "0.250 ± 0.050" in table and "▲ beats" in table and "baseline" in table
    assert table.splitlines()[2].split()[:3] == ["0", "weighting=none", "3"]


def test_without_repeats_the_tables_stay_one_row_per_job(partial_sweep):
    summary = summarize(partial_sweep)
    assert not summary.has_repeats and len(summary.groups) == 5
    assert "Configurations" not in markdown(summary) and "configuration" not in console_table(summary)
    header, rows = csv_rows(summary)
    assert [r["kind"] for r in rows] == ["job"] * 5 and "std/IoU/car" in header and "beats_baseline" in header


def test_summary_command_baseline_option(seeded_sweep, capsys):
    assert summary_main([str(seeded_sweep), "--baseline", "weighting=enet"]) == 0
    out = capsys.readouterr().out
    assert "baseline: configuration 2, `weighting=enet`: named with" in out
    with open(seeded_sweep / "summary.csv", newline="") as handle:
        groups = [r for r in csv.DictReader(handle) if r["kind"] == "group"]
    assert [g["baseline"] for g in groups] == ["", "", "yes", ""]


def test_sweep_callback_reads_summary_baseline_and_checks_seeds(seeded_sweep, capsys):
    from omegaconf import OmegaConf

    from train_seg.reporting.sweep import SweepSummaryCallback

    callback = SweepSummaryCallback(exit_on_failure=False)
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(seeded_sweep)}}, "seeds": 3,
                               "summary": {"baseline": "weighting=inverse"}})
    callback.on_multirun_start(config=config)
    callback.on_multirun_end(config=config)
    assert "Baseline: configuration 1, `weighting=inverse`: named" in (seeded_sweep / "summary.md").read_text()
    callback.on_multirun_start(config=OmegaConf.create({"hydra": {}}))  # no seeds key: nothing to check
    for bad in (0, -1, "3", 1.5):  # a user error (exit 2), which Hydra cannot turn into a warning
        with pytest.raises(SystemExit) as stopped:
            callback.on_multirun_start(config=OmegaConf.create({"seeds": bad}))
        assert stopped.value.code == 2
    assert "seeds=1.5: must be an integer >= 1" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ reading through the record
def test_read_job_reads_metrics_json_through_the_run_record(tmp_path):
    from train_seg.reporting import record
    from train_seg.reporting.summary import read_job

    sweep = tmp_path / "sweep"
    job_dir = fake_job(sweep, "0_weighting=none", ["weighting=none"])
    entry = {"epoch": 3, "step": 30, "val/mIoU": 0.5, "per_class": {"a": {"iou": 0.5, "recall": 0.6, "precision": None},
                                                                     "b": {"iou": None}}}
    record.write(job_dir, record.RunRecord(
        status="completed", optimized_metric="val/rare_mIoU", class_names=["a", "b"],
        class_stats={"train": {"pixel_share": [0.99, 0.01]}}, rare_share=0.05, final=entry,
        best={**entry, "epoch": 2, "metric": "val/rare_mIoU", "value": 0.25}, history=[{"epoch": 1}, {"epoch": 3}]))
    job = read_job(job_dir, sweep)
    assert (job.name, job.num, job.overrides, job.status, job.error) == ("0_weighting=none", 0, ["weighting=none"],
                                                                         "completed", None)
    assert job.has_metrics and job.epochs == 3 and job.best_epoch == 2 and job.best_metric == "val/rare_mIoU"
    assert job.final_miou == 0.5 and job.best_value == 0.25 and job.rare_share == 0.05
    assert job.final_iou["a"] == 0.5 and math.isnan(job.final_iou["b"]) and job.final_recall["a"] == 0.6
    assert math.isnan(job.final_precision["a"]) and job.pixel_share == {"a": 0.99, "b": 0.01}


def test_read_job_never_raises_on_a_bad_record(tmp_path):
    from train_seg.reporting import record
    from train_seg.reporting.summary import read_job

    sweep = tmp_path / "sweep"
    bad = {"0_a=1": "{not json", "1_a=2": "[1, 2]", "2_a=3": json.dumps({"version": record.VERSION + 1}),
           "3_a=4": json.dumps({"version": "x"})}
    for name, text in bad.items():
        (fake_job(sweep, name, [name.split("_", 1)[1]]) / record.FILENAME).write_text(text)
    jobs = [read_job(d, sweep) for d in find_job_dirs(sweep)]
    assert [job.status for job in jobs] == ["incomplete"] * 4 and not any(job.has_metrics for job in jobs)
    assert all(job.error.startswith(f"{record.FILENAME} unreadable: ") for job in jobs)
    assert "Expecting property name" in jobs[0].error and "not a train_seg run record" in jobs[1].error
    assert "newer train_seg" in jobs[2].error
    summary = write_summary(sweep)  # and the whole summary still gets written
    assert [job.status for job in summary.jobs] == ["incomplete"] * 4 and (sweep / "summary.png").is_file()


def test_summary_names_the_record_file_only_through_train_seg_record():
    import ast

    import train_seg.reporting.summary

    tree = ast.parse(Path(train_seg.reporting.summary.__file__).read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and ast.get_docstring(node)}
    literals = [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and id(node) not in docstrings
                and isinstance(node.value, str) and "metrics.json" in node.value]
    assert literals == []


def test_object_metrics_of_the_counted_classes_become_columns(tmp_path):
    sweep = tmp_path / "sweep"
    objects = {0: [(0.5, 0.25), (0.7, 0.45)], 1: [(0.9, 0.8), (1.0, 0.6)]}  # (object recall, precision) per seed
    for config, (weighting, pairs) in enumerate(zip(("none", "inverse"), objects.values())):
        for seed, (recall, precision) in enumerate(pairs):
            job = fake_job(sweep, f"{2 * config + seed}_weighting={weighting},seed={seed}",
                           [f"weighting={weighting}", f"seed={seed}"], "completed",
                           {"background": 0.9, "car": 0.3, "lake": 0.7, "road": 0.3})
            record = json.loads((job / "metrics.json").read_text())
            record["final"]["per_class"]["car"]["objects"] = {"objects": 10, "found": int(10 * recall),
                                                              "recall": recall, "precision": precision}
            (job / "metrics.json").write_text(json.dumps(record))
    summary = summarize(sweep)
    assert summary.object_classes == ["car"]
    header, rows = csv_rows(summary)
    assert "object_recall/car" in header and "std/object_precision/car" in header
    assert "object_recall/lake" in header  # every class has the columns; only counted ones have values
    jobs = [r for r in rows if r["kind"] == "job"]
    groups = [r for r in rows if r["kind"] == "group"]
    assert [r["object_recall/car"] for r in jobs] == ["0.5", "0.7", "0.9", "1"] and jobs[0]["object_recall/lake"] == ""
    assert float(groups[1]["object_precision/car"]) == pytest.approx(0.7)
    assert float(groups[1]["std/object_precision/car"]) == pytest.approx(statistics.stdev([0.8, 0.6]), rel=1e-5)
    text = markdown(summary)
    assert "car objects R / P" in text and "lake objects" not in text
    assert "| 0.600 ± 0.141 / 0.350 ± 0.141 |" in text  # configuration 0: recall, precision over two seeds
    assert "| 0.900 / 0.800 |" in text  # job 2
