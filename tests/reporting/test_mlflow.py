"""The MLflow sink, read back through MLflow's own client: real runs into real local stores (SQLite, as the sink
creates them) — a completed run (params, every per-class metric at its step equal to metrics.json, artifacts,
FINISHED), a run that fails in training (FAILED) and one interrupted (KILLED) that a resume continues, a 2-job sweep
through the command line (one parent, two children), and the missing extra (exit 2, one paragraph)."""
import inspect
import json
import math
import os
import sys
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra

import forkserver
from conftest import cli_env, crash_in_epoch
from train_seg.reporting.sinks import mlflow as sink
from train_seg.engine.trainer import train

os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"  # no usage reports from the tests (nor from their subprocesses)
mlflow = pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402

CLASSES = ["background", "lake", "road", "car"]
PER_CLASS = ("IoU", "precision", "recall")
RUN = ["model=tiny", "logger=mlflow", "logger.tensorboard=null", "trainer.max_epochs=2", "trainer.eval_every=1"]
# as tests/reporting/test_sweep.py, without TensorBoard (kept by logger=mlflow: see the config test) and with a
# training log every 2 steps (4 steps per job)
TINY = ["model=tiny", "dataset.num_train=8", "dataset.num_val=4", "dataset.image_size=64", "trainer.batch_size=2",
        "trainer.max_epochs=1", "trainer.num_workers=0", "trainer.progress=false", "logger.tensorboard=null",
        "dataset.seed=3", "dataset.car_probability=0.25", "rare_share=0.02", "trainer.log_every=2"]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """An output root whose default store (mlflow.db) the single-run tests share: one schema creation."""
    return tmp_path_factory.mktemp("mlflow_outputs")


def store_uri(root: Path) -> str:
    return f"sqlite:///{root / sink.DB_FILE}"


def mlflow_run(client: MlflowClient, run_dir: Path):
    """The MLflow run of ``run_dir`` (tag train_seg.run_dir), the only one."""
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              f"tags.`{sink.RUN_DIR_TAG}` = '{run_dir.resolve()}'")
    assert len(runs) == 1, runs
    return runs[0]


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def artifact(client: MlflowClient, run_id: str, name: str, tmp: Path) -> Path:
    return Path(client.download_artifacts(run_id, name, str(tmp)))


# -- a single run ----------------------------------------------------------------------------------------------
def test_a_completed_run_has_its_config_every_metric_at_its_step_artifacts_and_finished(make_cfg, tmp_path, store):
    run_dir = tmp_path / "run"
    payload = train(make_cfg(*RUN, f"paths.output_root={store}"), run_dir)
    client = MlflowClient(store_uri(store))  # the default store: <paths.output_root>/mlflow.db
    run = mlflow_run(client, run_dir)
    assert run.info.status == "FINISHED" and run.data.tags[sink.STATUS_TAG] == "completed"
    assert run.info.run_name == "run" and sink.PARENT_TAG not in run.data.tags  # outside output_root: its own name
    assert client.get_experiment(run.info.experiment_id).name == "train_seg"
    assert run.info.artifact_uri.startswith((store / sink.ARTIFACT_DIR).as_uri())

    params = run.data.params  # the resolved config, one dotted key per leaf
    assert params == sink.config_params(run_config(run_dir))
    assert params["optimizer.lr"] == "0.02" and params["trainer.max_epochs"] == "2" and params["model.arch"] == "tiny"
    assert params["weighting.scheme"] == "none" and params["trainer.max_steps"] == "null"

    evaluated = [(h["step"], h) for h in payload["history"]]  # 4 steps per epoch: evaluations at steps 4 and 8
    assert [step for step, _ in evaluated] == [4, 8]
    for name in CLASSES:
        for tag in PER_CLASS:
            key = f"val/{tag}/{name}"
            expected = [(step, h[key]) for step, h in evaluated if key in h]  # metrics.json keeps finite values only
            assert history(client, run.info.run_id, key) == expected, key
        assert run.data.metrics.get(f"val/IoU/{name}") == payload["final"][f"val/IoU/{name}"]  # NaN: none, None
    assert history(client, run.info.run_id, "val/mIoU") == [(step, h["val/mIoU"]) for step, h in evaluated]
    assert [s for s, _ in history(client, run.info.run_id, "train/loss")] == list(range(1, 9))  # trainer.log_every=1
    assert all(math.isfinite(v) for _, v in history(client, run.info.run_id, "train/loss"))
    assert [s for s, _ in history(client, run.info.run_id, "train/lr")] == list(range(1, 9))
    assert run.data.metrics["best/val/mIoU"] == payload["best"]["value"]

    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert names == {"metrics.json", "config.yaml", "per_class.png", "confusion.png"}
    assert json.loads(artifact(client, run.info.run_id, "metrics.json", tmp_path).read_text()) == payload
    for figure in ("per_class.png", "confusion.png"):
        data = artifact(client, run.info.run_id, figure, tmp_path).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 10_000
    assert (run_dir / "per_class.png").is_file()  # the run's own files are still written


def run_config(run_dir: Path) -> dict:
    """The resolved config the run trained with (its checkpoint's)."""
    from train_seg.checkpoint import read_checkpoint

    return read_checkpoint(run_dir / "last.pt")["config"]


@pytest.mark.parametrize("error, status, mlflow_status", [(RuntimeError("boom in epoch 2"), "failed", "FAILED"),
                                                          (KeyboardInterrupt(), "interrupted", "KILLED")])
def test_a_run_that_stops_in_training_is_failed_or_killed(make_cfg, tmp_path, store, monkeypatch, error, status,
                                                          mlflow_status):
    """A user-set tracking URI wins over the default store (here: the shared one; nothing in the output root, nor in
    the current directory)."""
    run_dir = tmp_path / "run"
    cfg = make_cfg(*RUN, f"paths.output_root={tmp_path / 'outputs'}", f"logger.mlflow.tracking_uri={store_uri(store)}")
    crash_in_epoch(monkeypatch, error)
    with pytest.raises(type(error)):
        train(cfg, run_dir)
    client = MlflowClient(store_uri(store))
    run = mlflow_run(client, run_dir)
    assert run.info.status == mlflow_status and run.data.tags[sink.STATUS_TAG] == status
    assert run.data.tags["train_seg.error"] == ("KeyboardInterrupt" if status == "interrupted"
                                                else "RuntimeError: boom in epoch 2")
    assert [s for s, _ in history(client, run.info.run_id, "val/IoU/background")] == [4]  # epoch 1's evaluation
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"metrics.json", "config.yaml"}
    recorded = json.loads(artifact(client, run.info.run_id, "metrics.json", tmp_path).read_text())
    assert recorded == json.loads((run_dir / "metrics.json").read_text()) and recorded["status"] == status
    assert not (tmp_path / "outputs").exists() and not Path("mlruns").exists()
    assert run.info.artifact_uri.startswith((store / sink.ARTIFACT_DIR).as_uri())

    if status == "interrupted":  # resumed in its own directory: the same MLflow run goes on to the end
        monkeypatch.undo()
        payload = train(make_cfg(*RUN, f"paths.output_root={tmp_path / 'outputs'}",
                                 f"logger.mlflow.tracking_uri={store_uri(store)}", "trainer.resume=auto"), run_dir)
        resumed = mlflow_run(client, run_dir)
        assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
        assert [s for s, _ in history(client, run.info.run_id, "val/IoU/background")] == [4, 8]
        assert resumed.data.metrics["val/IoU/lake"] == payload["final"]["val/IoU/lake"]


# -- a sweep ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_two_job_sweep_is_one_parent_run_with_a_child_per_job(tmp_path):
    sweep = tmp_path / "sweep"
    result = forkserver.run(
        [sys.executable, "-m", "train_seg", "-m", "weighting=none,inverse", "logger=mlflow", *TINY,
         f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path, env=cli_env() | {"OMP_NUM_THREADS": "1"}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if (p / "metrics.json").is_file())
    assert [p.name.split(",")[0] for p in jobs] == ["0_weighting=none", "1_weighting=inverse"]
    assert len((sweep / "summary.csv").read_text().splitlines()) == 3  # the artifact store holds no job

    client = MlflowClient(store_uri(sweep))  # the default store of a sweep: <sweep dir>/mlflow.db
    runs = client.search_runs([client.get_experiment_by_name("train_seg").experiment_id])
    parents = [r for r in runs if sink.PARENT_TAG not in r.data.tags]
    assert len(parents) == 1 and len(runs) == 3
    parent = parents[0]
    assert json.loads((sweep / sink.PARENT_FILE).read_text())["run_id"] == parent.info.run_id
    assert parent.info.status == "FINISHED" and parent.data.tags[sink.STATUS_TAG] == "completed"
    assert parent.data.tags["train_seg.swept"] == "weighting"
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} == {"summary.csv", "summary.md", "summary.png"}

    children = sorted((r for r in runs if r is not parent), key=lambda r: r.info.run_name)
    assert [r.data.tags[sink.PARENT_TAG] for r in children] == [parent.info.run_id] * 2
    assert [r.info.run_name for r in children] == [p.name for p in jobs]
    assert [r.data.params["weighting.scheme"] for r in children] == ["none", "inverse"]
    for child, job in zip(children, jobs):
        record = json.loads((job / "metrics.json").read_text())
        assert child.info.status == "FINISHED" and record["class_names"] == CLASSES
        for name in CLASSES:  # per-class metrics by name, equal to the job's metrics.json
            for tag in PER_CLASS:
                value = record["final"]["per_class"][name][tag.lower() if tag != "IoU" else "iou"]
                if value is None:  # NaN (absent / never predicted): no point, as in TensorBoard
                    assert f"val/{tag}/{name}" not in child.data.metrics
                else:
                    assert history(client, child.info.run_id, f"val/{tag}/{name}") == [(4, value)]
        assert [s for s, _ in history(client, child.info.run_id, "train/loss")] == [2, 4]
        assert "metrics.json" in {a.path for a in client.list_artifacts(child.info.run_id)}


# -- config and the missing extra ------------------------------------------------------------------------------
def test_logger_mlflow_is_the_default_sinks_plus_mlflow_with_the_constructor_defaults(make_cfg):
    from train_seg.engine.builder import build_sinks

    cfg = make_cfg("logger=mlflow")
    assert list(cfg.logger) == ["console", "tensorboard", "mlflow"]
    node = {k: v for k, v in dict(cfg.logger.mlflow).items() if k != "_target_"}
    defaults = {name: p.default for name, p in inspect.signature(sink.MLflowSink).parameters.items()}
    assert {k: (dict(v) or None) if k == "tags" else v for k, v in node.items()} == defaults
    # added to another logger choice by its target alone: the same defaults
    added = build_sinks(make_cfg("logger=none", f"+logger.mlflow._target_={cfg.logger.mlflow._target_}").logger)
    assert [type(s).__name__ for s in added] == ["ConsoleSink", "MLflowSink", "RunFilesSink"]
    assert (added[1].experiment_name, added[1].tracking_uri, added[1].flush_secs) == ("train_seg", None, 30)


@pytest.mark.parametrize("multirun", [False, True], ids=["run", "sweep"])
def test_a_missing_extra_stops_before_training_with_one_paragraph(tmp_path, monkeypatch, capsys, multirun):
    from train_seg.__main__ import main

    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` raises ImportError
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.setattr(sys, "argv", ["train_seg", *(["-m"] if multirun else []), "logger=mlflow", *TINY,
                                      f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}",
                                      f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    GlobalHydra.instance().clear()
    with pytest.raises(SystemExit) as info:
        main()
    GlobalHydra.instance().clear()
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert err.startswith("train_seg: error: logger.mlflow") and len(err.strip().splitlines()) == 1, err
    assert "pip install 'train_seg[mlflow]'" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "sweep").exists()  # nothing ran, nothing written


def test_store_names_and_statuses(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    local = sink.resolve_store(None, tmp_path)
    assert local == sink.Store(f"sqlite:///{tmp_path / 'mlflow.db'}", (tmp_path / "mlartifacts").as_uri())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracker:5000")
    assert sink.resolve_store(None, tmp_path) == sink.Store("http://tracker:5000")
    # the config wins; a SQLite file keeps its artifacts beside it
    assert sink.resolve_store("sqlite:////x/m.db", tmp_path) == sink.Store("sqlite:////x/m.db", "file:///x/mlartifacts")
    monkeypatch.chdir(tmp_path)
    assert sink.resolve_store("sqlite:///db/m.db?timeout=9", "") == sink.Store(
        "sqlite:///db/m.db?timeout=9", (tmp_path / "db" / "mlartifacts").as_uri())

    assert sink.metric_key("val/IoU/person;individual") == "val/IoU/person_individual"
    assert sink.metric_key("val/IoU/traffic light") == "val/IoU/traffic light"
    assert sink.config_params({"a": {"b": 1, "c": [0.5, 1], "d": None, "e": {}}, "f": "x", "g": True}) == {
        "a.b": "1", "a.c": "[0.5, 1]", "a.d": "null", "a.e": "{}", "f": "x", "g": "true"}
    assert sink.default_run_name(tmp_path / "multirun" / "d" / "t", tmp_path) == "multirun/d/t"
    assert sink.default_run_name("/elsewhere/run", tmp_path) == "run"

    assert sink.sweep_status(["completed", "pruned"]) == "completed"
    assert sink.sweep_status(["completed", "interrupted"]) == "interrupted"
    assert sink.sweep_status(["interrupted", "failed"]) == sink.sweep_status([]) == "failed"
    assert [sink.MLFLOW_STATUS[s] for s in ("completed", "failed", "interrupted", "pruned")] == [
        "FINISHED", "FAILED", "KILLED", "KILLED"]
