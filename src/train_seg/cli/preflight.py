"""Every check of a run before anything is written: ``PreflightCallback`` (registered in configs/hydra/default.yaml)
runs ``train.prepare`` in Hydra's ``on_run_start``, i.e. before Hydra creates the run directory and writes its
``.hydra/`` files and ``train_seg.log``. A bad input (a config value, the dataset, a weights file, a checkpoint, a
run directory that cannot be written or already holds a run) therefore stops the run with one paragraph and exit
status 2 and leaves every file as it was: an earlier run's files in the same ``hydra.run.dir`` stay byte-identical.

The prepared run is handed to the task (``take``), which does not prepare it again; the log lines of ``prepare``
are held back and replayed into the run's log once Hydra has set up logging. Single runs only: the jobs of a
multirun get new directories and record their own failures (``train_seg.__main__``).
"""
from __future__ import annotations

import copy
import logging
import os
import tempfile
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, open_dict, read_write

from train_seg.config.command_line import USER_ERRORS, exit_with_user_error

log = logging.getLogger("train_seg")

_PREPARED: dict[str, tuple[object, list[logging.LogRecord]]] = {}


class OutputDirError(ValueError):
    """A run directory that cannot be created or written."""


def check_writable(run_dir: Path, key: str = "hydra.run.dir") -> None:
    """``run_dir`` can be created and written: its nearest existing ancestor is a writable folder. Probed with an
    anonymous temporary file (O_TMPFILE: no name ever appears in the folder), so root's permissions and read-only
    mounts are judged as they are."""
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    problem = None
    if not existing.is_dir():
        problem = f"{existing} is not a folder"
    else:
        try:
            with tempfile.TemporaryFile(dir=existing):
                pass
        except OSError as exc:
            problem = f"{existing} cannot be written ({exc.strerror or exc})"
    if problem:
        raise OutputDirError(
            f"{key}={run_dir}: the run directory cannot be created or written: {problem}. Choose a writable place, "
            "e.g. paths.output_root=<a folder of yours> (run directories go under it) or hydra.run.dir=<new folder>."
        )


def _task_config(config: DictConfig, run_dir: str) -> DictConfig:
    """The config the task will receive (no ``hydra`` node), with ``paths.output_dir`` (``${hydra:runtime.
    output_dir}``) resolving to ``run_dir``, as Hydra's ``run_job`` will set it."""
    hydra_cfg = copy.deepcopy(config)
    with read_write(hydra_cfg.hydra.runtime), open_dict(hydra_cfg.hydra.runtime):
        hydra_cfg.hydra.runtime.output_dir = run_dir
    HydraConfig.instance().set_config(hydra_cfg)  # run_job sets it again, with the same output_dir
    task = copy.deepcopy(hydra_cfg)
    with read_write(task), open_dict(task):
        del task["hydra"]
    return task


class _Held(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def replay(records: list[logging.LogRecord]) -> None:
    """Hands held-back log records to the handlers configured now (the run's console and train_seg.log)."""
    for record in records:
        logging.getLogger(record.name).handle(record)


class PreflightCallback(Callback):
    """``on_run_start``: ``prepare`` the run before Hydra writes anything (see the module docstring)."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        if "trainer" not in config or "dataset" not in config:  # not the training app
            return
        from train_seg.distributed import discover

        if discover().distributed:  # prepare needs the process group, which the task opens (train_seg.__main__)
            return
        from train_seg.engine.trainer import prepare

        run_dir = os.path.abspath(str(config.hydra.run.dir))  # as run_job computes it (${now:} is cached)
        held, propagate = _Held(), log.propagate
        log.addHandler(held)
        log.propagate = False
        try:
            check_writable(Path(run_dir))
            run = prepare(_task_config(config, run_dir), run_dir)
        except USER_ERRORS as exc:
            log.removeHandler(held)
            log.propagate = propagate
            replay(held.records)
            exit_with_user_error("train_seg", exc)
        finally:
            log.removeHandler(held)
            log.propagate = propagate
        _PREPARED[run_dir] = (run, held.records)


def take(run_dir: str | Path):
    """The run prepared for ``run_dir`` by ``PreflightCallback`` (its held-back log lines replayed now), or None."""
    prepared = _PREPARED.pop(os.path.abspath(str(run_dir)), None)
    if prepared is None:
        return None
    run, records = prepared
    replay(records)
    return run
