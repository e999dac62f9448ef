"""MLflow output of a run: ``MLflowSink`` (``logger.mlflow``, the optional extra ``train_seg[mlflow]``) makes each run
an MLflow run; for a sweep, ``start_sweep_run`` / ``end_sweep_run`` (the sweep callback, in the driver process) make
the parent run whose children are the jobs.

A run logs the resolved config as params (``config_params``), every scalar the TensorBoard sink writes at the same
step under the same name (``train/loss``, ``train/lr``, ``val/IoU/<class>``, ``best/<metric>``; NaN left out, names
through ``metric_key``), batched (``log_batch``) at every evaluation, checkpoint and ``flush_secs``; at the end (or
failure) metrics.json, config.yaml, per_class.png and confusion.png of the last evaluation as artifacts, the tag
``train_seg.status`` and the MLflow status of ``MLFLOW_STATUS``. A run resumed in its own directory continues its
MLflow run (tag ``train_seg.run_dir``).

Store (``resolve_store``): ``tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else a local SQLite store
``<dir>/mlflow.db`` with artifacts in ``<dir>/mlartifacts`` (MLflow's own names; MLflow 3 refuses a plain file
store), ``<dir>`` being ``paths.output_root`` for a single run and the sweep directory for a sweep. The sweep's parent
run is named in ``<sweep dir>/mlflow_parent.json`` (store, experiment, run id), which a job finds in a parent of its
run directory, whichever process or machine it runs on. Tracking problems after the start are logged as warnings, never
fatal to training.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from train_seg.atomic import write_json_atomic
from train_seg.reporting import record
from train_seg.reporting.events import EpochEnd, EvalResult, Sink, TrainLog

log = logging.getLogger("train_seg")

EXTRA_HINT = "pip install 'train_seg[mlflow]'"
DB_FILE, ARTIFACT_DIR = "mlflow.db", "mlartifacts"  # the default store, inside the output directory
SQLITE = "sqlite:///"
PARENT_FILE = "mlflow_parent.json"
# our run statuses (train_seg.reporting.record) -> MLflow's RunStatus
MLFLOW_STATUS = {"completed": "FINISHED", "failed": "FAILED", "interrupted": "KILLED", "pruned": "KILLED"}
STATUS_TAG, RUN_DIR_TAG, SWEEP_DIR_TAG, PARENT_TAG = ("train_seg.status", "train_seg.run_dir", "train_seg.sweep_dir",
                                                      "mlflow.parentRunId")
MAX_METRICS, MAX_PARAMS = 1000, 100  # per log_batch call (MLflow's limits)
MAX_PARAM_CHARS, MAX_TAG_CHARS = 6000, 5000
MIN_MLFLOW = (3, 0)
_INVALID_KEY_CHARS = re.compile(r"[^\w/.\- ]")


def require_mlflow(local_store: bool = False):
    """The ``mlflow`` module, or ConfigError naming the extra to install; ``local_store``: also what the default
    SQLite store needs (SQLAlchemy, Alembic)."""
    from train_seg.config.validation import ConfigError

    try:
        import mlflow

        if local_store:
            import alembic  # noqa: F401
            import sqlalchemy  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"logger.mlflow (logger=mlflow) needs MLflow >= 3 and, for its local store, SQLAlchemy and "
                          f"Alembic, but {exc.name or exc} is not installed: {EXTRA_HINT} (or pip install -e "
                          "'.[mlflow]' in a clone), or run without MLflow: logger=default.") from exc
    version = tuple(int(part) for part in mlflow.__version__.split(".")[:2] if part.isdigit())
    if version < MIN_MLFLOW:
        raise ConfigError(f"logger.mlflow (logger=mlflow) needs MLflow >= 3, but {mlflow.__version__} is installed: "
                          f"pip install -U {EXTRA_HINT.split(' ', 2)[2]}.")
    return mlflow


def _local(tracking_uri: str | None) -> bool:
    return not (tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))


@dataclass(frozen=True)
class Store:
    """Where runs go: the tracking URI, and the artifact location of a new experiment (None: the server's)."""

    tracking_uri: str
    artifact_location: str | None = None


def resolve_store(tracking_uri: str | None, default_dir: str | Path) -> Store:
    """``tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else the SQLite store in ``default_dir`` (module docstring).
    A SQLite file keeps the artifacts of the experiments it creates beside it (``<its folder>/mlartifacts``, not
    MLflow's ``./mlruns`` of the current directory); other stores choose their own."""
    if _local(tracking_uri):
        directory = Path(default_dir).resolve()
        return Store(f"sqlite:///{directory / DB_FILE}", (directory / ARTIFACT_DIR).as_uri())
    uri = str(tracking_uri or os.environ["MLFLOW_TRACKING_URI"])
    database = uri[len(SQLITE):].split("?", 1)[0] if uri.startswith(SQLITE) else ""
    if not database or database == ":memory:":
        return Store(uri)
    return Store(uri, (Path(database).resolve().parent / ARTIFACT_DIR).as_uri())


def metric_key(name: str) -> str:
    """A TensorBoard tag as an MLflow metric or param key: characters MLflow refuses (outside letters, digits, ``_``,
    ``-``, ``.``, ``/`` and space) become ``_`` (class ``a;b`` -> ``val/IoU/a_b``)."""
    return _INVALID_KEY_CHARS.sub("_", name)


def config_params(config: Mapping, prefix: str = "") -> dict[str, str]:
    """The resolved config as MLflow params: one dotted key per leaf (``optimizer.lr``), the value as typed on the
    command line (strings as they are, others as JSON: ``null``, ``true``, ``[0.5, 1.0]``), cut to MLflow's 6000
    characters; an empty mapping is ``{}``."""
    params: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            params.update(config_params(value, f"{name}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            params[metric_key(name)] = text[:MAX_PARAM_CHARS]
    return params


def _client(uri: str):
    return require_mlflow().MlflowClient(tracking_uri=uri)


def experiment_id(client, name: str, artifact_location: str | None) -> str:
    """The id of experiment ``name``, created when missing (another process may create it at the same time)."""
    found = client.get_experiment_by_name(name)
    if found is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location)
        except Exception:
            found = client.get_experiment_by_name(name)
            if found is None:
                raise
    return found.experiment_id


def find_parent(directory: str | Path) -> dict | None:
    """The sweep's parent run named in ``PARENT_FILE`` of ``directory`` or of a folder above it (a job's run
    directory): ``{"tracking_uri", "experiment_id", "run_id"}``; None when there is none."""
    here = Path(directory).resolve()
    for folder in (here, *here.parents):
        path = folder / PARENT_FILE
        if path.is_file():
            return json.loads(path.read_text())
    return None


def _log_artifacts(client, run_id: str, files: Mapping[str, Any]) -> None:
    """Uploads ``{name: writer(path)}`` in one call: each writer writes its file into a temporary directory."""
    with tempfile.TemporaryDirectory(prefix="train_seg-mlflow-") as tmp:
        for name, write in files.items():
            write(Path(tmp) / name)
        client.log_artifacts(run_id, tmp)


def _end(client, run_id: str, status: str, error: str | None = None) -> None:
    """Tags the run with our ``status`` (and the error) and ends it with the matching MLflow status."""
    from mlflow.entities import RunTag

    tags = [RunTag(STATUS_TAG, status)] + ([RunTag("train_seg.error", error[:MAX_TAG_CHARS])] if error else [])
    client.log_batch(run_id, tags=tags)
    client.set_terminated(run_id, MLFLOW_STATUS.get(status, "FAILED"))


# -- a sweep's parent run ---------------------------------------------------------------------------------------
def start_sweep_run(sweep_dir: str | Path, name: str, options: Mapping) -> dict:
    """Creates the parent run of the sweep in ``sweep_dir`` (``options``: the ``logger.mlflow`` node) and names it in
    ``<sweep_dir>/PARENT_FILE``; a sweep continued in the same directory (an Optuna search) continues its parent.
    Returns the file's content. Raises ConfigError when MLflow is not installed."""
    require_mlflow(_local(options.get("tracking_uri")))
    sweep_dir = Path(sweep_dir).resolve()
    sweep_dir.mkdir(parents=True, exist_ok=True)
    store = resolve_store(options.get("tracking_uri"), sweep_dir)
    client = _client(store.tracking_uri)
    parent = find_parent(sweep_dir)
    if parent is not None and parent.get("tracking_uri") == store.tracking_uri:
        try:
            client.update_run(parent["run_id"], status="RUNNING")
            return parent
        except Exception:  # deleted meanwhile: a new parent
            log.warning("MLflow: the parent run %s of %s is gone; starting a new one", parent["run_id"], sweep_dir)
    tags = {**{str(k): str(v) for k, v in (options.get("tags") or {}).items()}, SWEEP_DIR_TAG: str(sweep_dir)}
    experiment = experiment_id(client, str(options.get("experiment_name") or "train_seg"), store.artifact_location)
    run = client.create_run(experiment, run_name=name, tags=tags)
    parent = {"tracking_uri": store.tracking_uri, "experiment_id": experiment, "run_id": run.info.run_id}
    write_json_atomic(sweep_dir / PARENT_FILE, parent)
    return parent


def end_sweep_run(sweep_dir: str | Path, status: str, files: Sequence[str | Path] = (),
                  swept: Sequence[str] = ()) -> None:
    """Ends the parent run of ``sweep_dir`` (if it has one) with ``status`` (``completed``, ``failed``,
    ``interrupted``), after uploading ``files`` (the sweep summary) as its artifacts and tagging the ``swept`` keys
    (``train_seg.swept``)."""
    parent = find_parent(sweep_dir)
    if parent is None:
        return
    client = _client(parent["tracking_uri"])
    if swept:
        client.set_tag(parent["run_id"], "train_seg.swept", ",".join(swept))
    for path in files:
        if Path(path).is_file():
            client.log_artifact(parent["run_id"], str(path))
    _end(client, parent["run_id"], status)


def sweep_status(statuses: Sequence[str]) -> str:
    """A sweep's status from its jobs': ``failed`` if one failed (or none ran), else ``interrupted`` if one was,
    else ``completed`` (pruned trials count as done)."""
    if not statuses or any(s not in ("completed", "pruned", "interrupted") for s in statuses):
        return "failed"
    return "interrupted" if "interrupted" in statuses else "completed"


# -- the sink ---------------------------------------------------------------------------------------------------
class MLflowSink(Sink):
    """Logs the run to MLflow (module docstring).

    Args (``logger.mlflow`` in configs/logger/mlflow.yaml, whose values these defaults repeat for
    ``+logger.mlflow._target_=...``; tests/reporting/test_mlflow.py keeps them equal):
      tracking_uri: the MLflow tracking URI; None: ``$MLFLOW_TRACKING_URI``, else the local store (``resolve_store``).
      experiment_name: the experiment of the runs, created when missing.
      run_name: None: the job directory's name in a sweep, else the run directory relative to ``paths.output_root``.
      tags: extra tags of the run.
      flush_secs: the longest time a training-log metric waits before it is sent.
    Raises ConfigError when MLflow is not installed (before training: sinks are built in ``prepare``).
    """

    def __init__(self, tracking_uri: str | None = None, experiment_name: str = "train_seg", run_name: str | None = None,
                 tags: Mapping[str, Any] | None = None, flush_secs: float = 30):
        require_mlflow(_local(tracking_uri))
        self.tracking_uri, self.experiment_name, self.run_name = tracking_uri, str(experiment_name), run_name
        self.tags = {str(k): str(v) for k, v in (tags or {}).items()}
        self.flush_secs = float(flush_secs)
        self.client = self.run_id = self.run = None
        self.pending: list = []
        self.last_flush = time.monotonic()
        self.last_result: EvalResult | None = None
        self.final: dict | None = None

    def on_train_start(self, run) -> None:
        """Opens the MLflow run (a child of the sweep's parent in a sweep job); a tracking error here stops the run
        before its first step."""
        self.run = run
        parent = find_parent(run.run_dir) if run.context.multirun else None
        output_root = Path(run.config["paths"]["output_root"])
        if parent is not None:
            store, experiment = Store(parent["tracking_uri"]), parent["experiment_id"]
            self.client = _client(store.tracking_uri)
        else:
            store = resolve_store(self.tracking_uri, output_root)
            self.client = _client(store.tracking_uri)
            experiment = experiment_id(self.client, self.experiment_name, store.artifact_location)
        run_dir = Path(run.run_dir).resolve()
        self.run_id = self._continued(experiment, run_dir) if run.global_step else None
        if self.run_id is not None:
            self.client.update_run(self.run_id, status="RUNNING")
            return
        tags = {**self.tags, RUN_DIR_TAG: str(run_dir), **({PARENT_TAG: parent["run_id"]} if parent else {})}
        name = self.run_name or (run_dir.name if parent else default_run_name(run_dir, output_root))
        created = self.client.create_run(experiment, run_name=name, tags=tags)
        self.run_id = created.info.run_id
        params = [_param(k, v) for k, v in config_params(run.config).items()]
        for start in range(0, len(params), MAX_PARAMS):
            self.client.log_batch(self.run_id, params=params[start:start + MAX_PARAMS])

    def _continued(self, experiment: str, run_dir: Path) -> str | None:
        """The MLflow run of this run directory, when a resumed run continues it in place."""
        text = str(run_dir)
        if "'" in text:
            return None
        found = self.client.search_runs([experiment], f"tags.`{RUN_DIR_TAG}` = '{text}'", max_results=1)
        return found[0].info.run_id if found else None

    def _add(self, scalars: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending += [Metric(metric_key(tag), float(value), now, int(step)) for tag, value in scalars.items()
                         if value is not None and not math.isnan(value)]

    def flush(self) -> None:
        """Sends the pending metrics; on a tracking error they stay pending (a warning says so)."""
        try:
            while self.pending:
                self.client.log_batch(self.run_id, metrics=self.pending[:MAX_METRICS])
                del self.pending[:MAX_METRICS]
        except Exception as exc:
            log.warning("MLflow: could not send %d metrics to %s (%s: %s); retrying at the next flush",
                        len(self.pending), self.client.tracking_uri, type(exc).__name__, exc)
        self.last_flush = time.monotonic()

    def on_train_log(self, log: TrainLog) -> None:
        self._add(log.scalars, log.step)
        if time.monotonic() - self.last_flush >= self.flush_secs:
            self.flush()

    def on_checkpoint(self, checkpoint) -> None:
        self.flush()

    def on_eval(self, result: EvalResult) -> None:
        self.last_result, self.final = result, result.entry()
        self._add(result.scalars, result.step)

    def on_epoch_end(self, end: EpochEnd) -> None:
        if end.evaluation is not None and end.best:
            self._add({f"best/{end.best['metric']}": end.best["value"], "best/epoch": float(end.best["epoch"])},
                      end.step)
        self.flush()

    def on_train_end(self, run) -> None:
        self._finish("completed")

    def on_failure(self, error: BaseException) -> None:
        if self.run_id is not None:
            self._finish(record.status_of(error), record.describe_error(error))

    def _finish(self, status: str, error: str | None = None) -> None:
        """Last metrics, the artifacts (metrics.json as the run-files sink writes it, built from the same
        ``Run.record``, since that sink runs last) and the status."""
        self.flush()
        try:
            _log_artifacts(self.client, self.run_id, self._artifacts(status, error))
            _end(self.client, self.run_id, status, error)
        except Exception as exc:
            log.warning("MLflow: could not record the end of run %s in %s (%s: %s)", self.run_id,
                        self.client.tracking_uri, type(exc).__name__, exc)

    def _artifacts(self, status: str, error: str | None) -> dict:
        import yaml

        from train_seg.reporting.plots import confusion_figure, result_figure
        from train_seg.reporting.sinks.run_files import PER_CLASS_PNG

        run, result = self.run, self.last_result
        files = {record.FILENAME: lambda path: record.write(path, run.record(status, self.final, error)),
                 "config.yaml": lambda path: path.write_text(yaml.safe_dump(run.config, sort_keys=False))}
        if result is not None and status == "completed":  # the figures of the run's files: at the end only
            files[PER_CLASS_PNG] = lambda path: result_figure(result, float(run.config["rare_share"])).savefig(path)
            files["confusion.png"] = lambda path: confusion_figure(result.confusion, result.class_names,
                                                                   f"epoch {result.epoch}").savefig(path)
        return files


def _param(key: str, value: str):
    from mlflow.entities import Param

    return Param(key, value)


def default_run_name(directory: str | Path, output_root: str | Path) -> str:
    """A run's (or sweep's) MLflow name: its directory relative to ``output_root`` (``2026-12-04/10-00-00``,
    ``multirun/2026-12-04/10-00-00``), or the directory's own name when it lies elsewhere."""
    directory = Path(directory).resolve()
    try:
        return directory.relative_to(Path(output_root).resolve()).as_posix()
    except ValueError:
        return directory.name
