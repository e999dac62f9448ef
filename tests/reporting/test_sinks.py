"""The event flow: sinks chosen from config see every event in order, TensorBoard can be turned off, and the run
record (metrics.json) of a completed, a failed and an interrupted run reads back through the one schema."""
import csv
import json
from pathlib import Path

import pytest

from conftest import crash_in_epoch
from train_seg.reporting import record
from train_seg.reporting.events import Sink
from train_seg.engine.trainer import train



class CSVEventSink(Sink):
    """A user's own sink, written here and chosen from config: one CSV row per event."""

    def __init__(self, path: str):
        self.path = Path(path)
        self.rows: list[dict] = []

    def _row(self, event: str, epoch="", step="", value="") -> None:
        self.rows.append({"event": event, "epoch": epoch, "step": step, "value": value})
        with self.path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["event", "epoch", "step", "value"])
            writer.writeheader()
            writer.writerows(self.rows)

    def on_train_start(self, run):
        self._row("train_start", step=run.global_step)

    def on_train_log(self, log):
        self._row("train_log", log.epoch, log.step, log.scalars["train/loss"])

    def on_eval(self, result):
        self._row("eval", result.epoch, result.step, result.scalars["val/mIoU"])

    def on_epoch_end(self, end):
        self._row("epoch_end", end.epoch, end.step, int(end.improved))

    def on_train_end(self, run):
        self._row("train_end", step=run.global_step)

    def on_failure(self, error):
        self._row("failure", value=type(error).__name__)


def _events(path: Path) -> list[dict]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_a_sink_from_config_sees_every_event_in_order(make_cfg, tmp_path):
    events_file = tmp_path / "events.csv"
    cfg = make_cfg("model=tiny", "trainer.max_epochs=3", "trainer.eval_every=2", "trainer.log_every=2",
                   f"+logger.csv._target_={__name__}.CSVEventSink", f"+logger.csv.path={events_file}")
    payload = train(cfg, tmp_path / "run")
    rows = _events(events_file)
    # 8 images / batch 2 = 4 steps per epoch, a log every 2 steps; evaluations after epochs 2 and 3 (the last)
    expected = ["train_start"] + ["train_log", "train_log", "epoch_end"] + ["train_log", "train_log", "eval", "epoch_end"] \
        + ["train_log", "train_log", "eval", "epoch_end"] + ["train_end"]
    assert [r["event"] for r in rows] == expected
    assert [int(r["step"]) for r in rows if r["event"] == "train_log"] == [2, 4, 6, 8, 10, 12]
    assert [int(r["epoch"]) for r in rows if r["event"] == "epoch_end"] == [1, 2, 3]
    evals = [r for r in rows if r["event"] == "eval"]
    history = {h["epoch"]: h for h in payload["history"]}
    for row in evals:  # the sink saw the same numbers the run record holds
        assert float(row["value"]) == pytest.approx(history[int(row["epoch"])]["val/mIoU"], abs=1e-12)
    assert payload["final"]["epoch"] == 3
    assert (tmp_path / "run" / "per_class.png").stat().st_size > 10_000  # the end-of-run picture of imbalance


def test_tensorboard_off_writes_no_event_file(make_cfg, tmp_path):
    for name, override in (("null", "logger.tensorboard=null"), ("none", "logger=none")):
        run_dir = tmp_path / name
        payload = train(make_cfg("model=tiny", "trainer.max_steps=2", override, f"paths.output_dir={run_dir}"), run_dir)
        assert payload["status"] == "completed" and (run_dir / "last.pt").is_file()
        assert not list(run_dir.rglob("events.out.tfevents.*"))


def test_a_logger_entry_without_target_is_a_config_error(make_cfg, tmp_path):
    from train_seg.config.validation import ConfigError
    from train_seg.engine.trainer import prepare

    with pytest.raises(ConfigError, match=r"logger\.csv"):
        prepare(make_cfg("+logger.csv.path=x.csv"), tmp_path / "run")


@pytest.mark.parametrize("error, status", [(None, "completed"), (RuntimeError("boom in epoch 2"), "failed"),
                                           (KeyboardInterrupt(), "interrupted")])
def test_completed_failed_and_interrupted_runs_read_back_through_the_schema(make_cfg, tmp_path, monkeypatch,
                                                                            error, status):
    run_dir = tmp_path / "run"
    cfg = make_cfg("model=tiny", "trainer.max_epochs=2", "trainer.eval_every=1")
    if error is None:
        train(cfg, run_dir)
    else:
        crash_in_epoch(monkeypatch, error)
        with pytest.raises(type(error)):
            train(cfg, run_dir)
    rec = record.read(run_dir)
    assert isinstance(rec, record.RunRecord) and rec.version == record.VERSION and rec.status == status
    assert rec.class_names == ["background", "lake", "road", "car"] and rec.rare_classes == ["car"]
    assert [h["epoch"] for h in rec.history] == ([1, 2] if error is None else [1])
    assert rec.final["epoch"] == (2 if error is None else 1)
    assert set(rec.final["per_class"]["lake"]) == {"pixel_share", "iou", "precision", "recall", "dice", "support"}
    # the rare class also gets its object counts (metrics.objects=rare)
    assert set(rec.final["per_class"]["car"]) == set(rec.final["per_class"]["lake"]) | {"objects"}
    assert set(rec.final["per_class"]["car"]["objects"]) == {"objects", "found", "recall", "precision", "f1",
                                                             "matched_iou"}
    assert rec.error == (None if error is None else record.describe_error(error))
    assert rec.to_dict() == json.loads((run_dir / "metrics.json").read_text())  # nothing outside the schema


def test_record_versions(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps({"status": "completed", "final": None, "history": [],
                                                       "some_old_key": 1}))
    old = record.read(tmp_path)  # version 1 (no version key): read, unknown keys dropped
    assert old.status == "completed" and old.version == record.VERSION
    (tmp_path / "metrics.json").write_text(json.dumps({"version": record.VERSION + 1, "status": "completed"}))
    with pytest.raises(record.RecordError, match="newer train_seg"):
        record.read(tmp_path)
    with pytest.raises(record.RecordError, match="cannot be read"):
        record.read(tmp_path / "nowhere")


def test_atomic_write_keeps_the_old_file_and_no_temp_on_error(tmp_path):
    from train_seg.atomic import atomic_write

    target = tmp_path / "file.txt"
    atomic_write(target, lambda handle: handle.write("old"))

    def failing(handle):
        handle.write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, failing)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["file.txt"]


def test_the_console_says_when_a_rare_class_is_starved():
    import torch

    from train_seg.evaluation.metrics import metrics_from_confusion
    from train_seg.reporting.sinks.console import starved_note

    names, share, rare = ["background", "car"], [0.995, 0.005], torch.tensor([False, True])
    never = metrics_from_confusion(torch.tensor([[990, 0], [10, 0]]))
    assert "car (0.50% of training pixels) is starved: IoU 0.000, never predicted" in starved_note(never, names, share, rare)
    alarms = metrics_from_confusion(torch.tensor([[800, 190], [1, 9]]))  # recall 0.9, precision 9/199
    note = starved_note(alarms, names, share, rare)
    assert "IoU 0.045" in note and "false alarms (recall 0.90, precision 0.05)" in note
    missed = metrics_from_confusion(torch.tensor([[990, 0], [29, 1]]))  # recall 1/30, precision 1
    assert "IoU 0.033, mostly missed (recall 0.03)" in starved_note(missed, names, share, rare)
    fine = metrics_from_confusion(torch.tensor([[985, 5], [2, 8]]))
    assert starved_note(fine, names, share, rare) == ""
    assert starved_note(never, names, share, torch.tensor([False, False])) == ""  # only rare classes


def test_the_console_table_shows_objects_found_of_the_counted_classes():
    import torch

    from train_seg.reporting.events import EvalResult
    from train_seg.evaluation.objects import ObjectCounts
    from train_seg.reporting.sinks.console import format_class_table

    objects = ObjectCounts(3, classes=[2], min_pixels=1, ignore_index=255)
    objects.counts[2] = torch.tensor([8.0, 10.0, 6.0, 4.5])  # 8 objects, 10 predicted, 6 matched
    result = EvalResult(1, 4, torch.tensor([[90, 2, 1], [3, 20, 0], [1, 0, 5]]), ["background", "lake", "car"],
                        [0.9, 0.09, 0.01], torch.tensor([False, False, True]), objects)
    lines = format_class_table(result.metrics, result.class_names, result.pixel_share, rare=result.rare).splitlines()
    assert lines[0].split()[-5:] == ["objects", "obj", "rec", "obj", "prec"]
    car = next(line for line in lines if line.startswith("car")).split()
    assert car[-4:] == ["6/8", "0.7500", "0.6000", "(rare)"]
    assert len(next(line for line in lines if line.startswith("lake")).split()) == 5  # no object columns
    assert result.scalars["val/objects/recall/car"] == 0.75 and result.scalars["val/objects/matched_iou/car"] == 0.75
    assert "val/objects/recall/lake" not in result.scalars
    entry = result.entry()["per_class"]
    assert entry["car"]["objects"] == {"objects": 8, "found": 6, "recall": 0.75, "precision": 0.6,
                                       "f1": 2 * 6 / 18, "matched_iou": 0.75} and "objects" not in entry["lake"]
    plain = EvalResult(1, 4, result.confusion, result.class_names, result.pixel_share, result.rare)
    assert "objects" not in format_class_table(plain.metrics, plain.class_names, plain.pixel_share)


def test_atomic_write_gives_the_usual_file_mode(tmp_path):
    import os

    from train_seg.atomic import atomic_write

    path = atomic_write(tmp_path / "f.json", lambda handle: handle.write("{}"))
    mask = os.umask(0)
    os.umask(mask)
    assert (path.stat().st_mode & 0o777) == 0o666 & ~mask


def test_link_or_copy_keeps_the_target_when_the_source_is_replaced(tmp_path):
    from train_seg.atomic import atomic_write, link_or_copy

    last, best = tmp_path / "last.pt", tmp_path / "best.pt"
    atomic_write(last, lambda handle: handle.write(b"epoch 1"), binary=True)
    link_or_copy(last, best)
    atomic_write(last, lambda handle: handle.write(b"epoch 2"), binary=True)  # the next epoch's last.pt
    assert best.read_bytes() == b"epoch 1" and last.read_bytes() == b"epoch 2"
    link_or_copy(last, best)
    assert best.read_bytes() == b"epoch 2" and sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]
