"""The Hydra sweeper of ``hparams_search=optuna``: Optuna's ask-and-tell loop around any Hydra launcher.

Each round asks the study for up to ``n_jobs`` trials, turns their parameters into overrides, launches them (the
basic launcher in this process, joblib side by side, submitit on SLURM) and tells each result: ``COMPLETE`` with the
job's best ``optimized_metric``, ``PRUNED`` when the job's pruner stopped it (metrics.json ``status: pruned``),
``FAIL`` otherwise. Several workers (the same command started N times, on one machine or as SLURM tasks) share one
study through its storage: a trial is asked once, so no two workers run the same one, and they stop when
``n_trials`` trials have ended. While a worker runs trials it writes a heartbeat into each (user attribute
``heartbeat``); a worker that finds a RUNNING trial whose worker process is gone (same host) or whose heartbeat is
older than ``grace_s`` marks it failed (``not_counted: interrupted``) and queues a trial with the same parameters
that continues the interrupted run from its ``last.pt`` in the same directory. So a killed search started again
with the same command keeps its finished trials and goes on to ``n_trials``.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Sequence

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep, Transformer
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from train_seg.config.command_line import hydra_quoted
from train_seg.search.study import (SearchError, TrialSpec, instantiate_component, open_storage, require_optuna,
                                    storage_url)

log = logging.getLogger(__name__)
RESULTS_FILE = "optimization_results.yaml"
NOT_COUNTED = "not_counted"  # user attribute of a FAIL trial that does not count toward n_trials: surplus, interrupted


def search_space(arguments: Sequence[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """``(distributions, fixed)`` from overrides in Hydra's grammar: ``choice(a, b)`` is categorical,
    ``interval(lo, hi)`` a float, uniform (``tag(log, interval(...))`` log-uniform), ``range(lo, hi[, step])`` an
    integer (or stepped float) range, end excluded; a plain ``key=value`` is fixed for every trial.
    Raises SearchError for a sweep Optuna cannot sample."""
    optuna = require_optuna()
    dists = optuna.distributions
    distributions, fixed = {}, {}
    for override in OverridesParser.create().parse_overrides(list(arguments)):
        key = override.get_key_element()
        if not override.is_sweep_override():
            fixed[key] = override.get_value_element_as_str()
            continue
        value = override.value()
        if isinstance(value, ChoiceSweep) or (isinstance(value, RangeSweep) and value.shuffle):
            distributions[key] = dists.CategoricalDistribution(
                list(override.sweep_iterator(transformer=Transformer.encode)))
        elif isinstance(value, RangeSweep):
            last = max(override.sweep_iterator())  # the range's last value (its end is excluded)
            if any(isinstance(v, float) for v in (value.start, value.stop, value.step)):
                distributions[key] = dists.FloatDistribution(value.start, last, step=value.step)
            else:
                distributions[key] = dists.IntDistribution(int(value.start), int(last), step=int(value.step))
        elif isinstance(value, IntervalSweep):  # Hydra parses interval bounds as floats
            distributions[key] = dists.FloatDistribution(float(value.start), float(value.end), log="log" in value.tags)
        else:
            raise SearchError(f"hydra.sweeper.params.{key}={override.get_value_element_as_str()}: Optuna samples "
                              "choice(...), interval(...), tag(log, interval(...)) and range(...) only.")
    return distributions, fixed


def suggest(trial, distributions: dict) -> dict[str, Any]:
    """Draws (or, for a queued trial, takes) every parameter through Optuna's public ``suggest_*`` calls."""
    optuna = require_optuna()
    dists = optuna.distributions
    params = {}
    for key, dist in distributions.items():
        if isinstance(dist, dists.CategoricalDistribution):
            params[key] = trial.suggest_categorical(key, dist.choices)
        elif isinstance(dist, dists.IntDistribution):
            params[key] = trial.suggest_int(key, dist.low, dist.high, step=dist.step, log=dist.log)
        else:
            params[key] = trial.suggest_float(key, dist.low, dist.high, step=dist.step, log=dist.log)
    return params


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Heartbeat(threading.Thread):
    """Writes ``heartbeat`` (a unix time) into the trials this worker is running, every ``interval`` seconds."""

    def __init__(self, storage, interval: float):
        super().__init__(daemon=True, name="train_seg-optuna-heartbeat")
        self.storage, self.interval = storage, float(interval)
        self.trial_ids: set[int] = set()
        self.lock, self.stopped = threading.Lock(), threading.Event()

    def beat(self, trial_ids) -> None:
        for trial_id in trial_ids:
            try:
                self.storage.set_trial_user_attr(trial_id, "heartbeat", time.time())
            except Exception:  # a trial that just finished refuses writes: nothing to keep alive
                log.debug("heartbeat of trial %s not written", trial_id, exc_info=True)

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            with self.lock:
                ids = list(self.trial_ids)
            self.beat(ids)

    def track(self, trial_ids, on: bool) -> None:
        with self.lock:
            (self.trial_ids.update if on else self.trial_ids.difference_update)(trial_ids)


class OptunaSearch(Sweeper):
    """See the module docstring; the keys are those of ``configs/hydra/sweeper/train_seg_optuna.yaml``."""

    def __init__(self, direction: str = "maximize", study_name: str = "train_seg", storage: str | None = None,
                 load_if_exists: bool = True, n_trials: int = 20, n_jobs: int = 1, sampler: Any = None,
                 pruner: Any = None, params: Any = None, enqueue: Any = None, heartbeat_s: float = 30.0,
                 grace_s: float = 120.0) -> None:
        if str(direction) not in ("maximize", "minimize"):
            raise SearchError(f"hydra.sweeper.direction={direction!r}: maximize or minimize.")
        for key, value, low in (("n_trials", n_trials, 1), ("n_jobs", n_jobs, 1)):
            if not isinstance(value, int) or value < low:
                raise SearchError(f"hydra.sweeper.{key}={value!r}: an integer >= {low}.")
        if not float(heartbeat_s) > 0 or not float(grace_s) > float(heartbeat_s):
            raise SearchError(f"hydra.sweeper.heartbeat_s={heartbeat_s} and grace_s={grace_s}: need 0 < heartbeat_s "
                              "< grace_s (a trial is given up after grace_s seconds without a heartbeat).")
        self.direction, self.study_name, self.storage = str(direction), str(study_name), storage
        self.load_if_exists, self.n_trials, self.n_jobs = bool(load_if_exists), n_trials, n_jobs
        self.sampler_cfg, self.pruner_cfg = _plain(sampler), _plain(pruner)
        self.params = _plain(params) or {}
        self.enqueue = _plain(enqueue) or []
        self.heartbeat_s, self.grace_s = float(heartbeat_s), float(grace_s)
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.config: DictConfig | None = None
        self.launcher = None
        self.job_idx = 0

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(config=config, hydra_context=hydra_context,
                                                                task_function=task_function)
        self.sweep_dir = Path(str(config.hydra.sweep.dir))

    # -- the loop -------------------------------------------------------------------------------------------------
    def sweep(self, arguments: list[str]) -> None:
        optuna = require_optuna()
        distributions, fixed = search_space([f"{k}={v}" for k, v in self.params.items()] + list(arguments))
        for key in fixed:
            distributions.pop(key, None)
        in_process = "BasicLauncher" in str(OmegaConf.select(self.config, "hydra.launcher._target_", default=""))
        self.url = storage_url(self.storage, self.sweep_dir, in_process)
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        study = optuna.create_study(storage=open_storage(self.url), sampler=instantiate_component(self.sampler_cfg),
                                    pruner=instantiate_component(self.pruner_cfg), study_name=self.study_name,
                                    direction=self.direction, load_if_exists=self.load_if_exists)
        for params in self.enqueue:
            study.enqueue_trial(dict(params), skip_if_exists=True)
        log.info("Optuna %s: study %r in %s, %d trials, %s", optuna.__version__, self.study_name, self.url,
                 self.n_trials, type(study.sampler).__name__)
        heartbeat = _Heartbeat(study._storage, self.heartbeat_s)
        heartbeat.start()
        try:
            while self._round(study, distributions, fixed, heartbeat):
                pass
        finally:
            heartbeat.stopped.set()
        self._write_results(study)

    def _round(self, study, distributions: dict, fixed: dict, heartbeat: _Heartbeat) -> bool:
        """One batch of trials; False when the study has ``n_trials`` ended trials."""
        optuna = require_optuna()
        self._recover_stale(study)
        ended, running = _counts(study)
        if ended >= self.n_trials:
            return False
        free = self.n_trials - ended - running
        if free <= 0:  # the rest is running in other workers: wait for them (or for their heartbeats to stop)
            time.sleep(min(self.heartbeat_s, 5.0))
            return True
        batch = []
        for _ in range(min(self.n_jobs, free)):
            trial = study.ask()
            if _counted_before(study, trial.number) >= self.n_trials:  # another worker took the last ones
                trial.set_user_attr(NOT_COUNTED, "surplus")
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                break
            trial.set_user_attr("worker", self.worker)
            trial.set_user_attr("heartbeat", time.time())
            batch.append(trial)
        if not batch:
            return True
        overrides = [self._overrides(trial, distributions, fixed) for trial in batch]
        ids = [trial._trial_id for trial in batch]
        heartbeat.track(ids, True)
        try:
            returns = self.launcher.launch(overrides, initial_job_idx=self.job_idx)
        finally:
            heartbeat.track(ids, False)
        self.job_idx += len(returns)
        for trial, ret in zip(batch, returns):
            self._tell(study, trial, ret)
        return True

    def _overrides(self, trial, distributions: dict, fixed: dict) -> list[str]:
        params = suggest(trial, distributions)
        spec = TrialSpec(self.url, self.study_name, trial.number, json.dumps(self.pruner_cfg))
        overrides = [f"{key}={value}" for key, value in {**params, **fixed}.items()] + [spec.override()]
        resumes = trial.user_attrs.get("resumes")
        run_dir = trial.user_attrs.get("run_dir")
        if resumes is not None and run_dir:  # continue the interrupted trial's run from its last.pt, in its directory
            path = Path(run_dir)
            overrides += [f"hydra.sweep.dir={hydra_quoted(path.parent)}", f"hydra.sweep.subdir={hydra_quoted(path.name)}",
                          "trainer.resume=auto"]
            log.info("trial %d continues interrupted trial %d in %s", trial.number, resumes, path)
        return overrides

    def _tell(self, study, trial, ret) -> None:
        optuna = require_optuna()
        from train_seg.reporting import record

        state, value = optuna.trial.TrialState.FAIL, None
        try:
            run = record.read(str(ret.hydra_cfg.hydra.runtime.output_dir))
            status = run.status
            best = (run.best or {}).get("value")
        except Exception:
            status, best = "failed", None
        if status == "completed" and best is not None:
            state, value = optuna.trial.TrialState.COMPLETE, float(best)
        elif status == "pruned":
            state = optuna.trial.TrialState.PRUNED
        study.tell(trial, values=value, state=state, skip_if_finished=True)
        log.info("trial %d: %s%s", trial.number, state.name.lower(), "" if value is None else f", {value:.4f}")

    def _recover_stale(self, study) -> None:
        """Fails every RUNNING trial whose worker is gone and queues its continuation (module docstring)."""
        optuna = require_optuna()
        host, now = socket.gethostname(), time.time()
        for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            worker = str(trial.user_attrs.get("worker", ""))
            worker_host, _, pid = worker.rpartition(":")
            started = trial.datetime_start.timestamp() if trial.datetime_start else now
            beat = float(trial.user_attrs.get("heartbeat", started))
            gone = (worker_host == host and pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)))
            if not gone and now - beat <= self.grace_s:
                continue
            try:
                study._storage.set_trial_user_attr(trial._trial_id, NOT_COUNTED, "interrupted")
                study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
            except Exception:  # another worker recovered it first
                continue
            attrs = {"resumes": trial.number, **({"run_dir": trial.user_attrs["run_dir"]}
                                                 if "run_dir" in trial.user_attrs else {})}
            study.enqueue_trial(dict(trial.params), user_attrs=attrs)
            log.warning("trial %d was interrupted (worker %s %s): queued to continue from its checkpoint",
                        trial.number, worker or "unknown", "is gone" if gone else "stopped its heartbeat")

    def _write_results(self, study) -> None:
        optuna = require_optuna()
        states = optuna.trial.TrialState
        trials = [t for t in study.get_trials(deepcopy=False) if NOT_COUNTED not in t.user_attrs]
        counts = {name: sum(t.state.name.lower() == name for t in trials) for name in ("complete", "pruned", "fail")}
        results: dict[str, Any] = {"name": "optuna", "study_name": self.study_name, "storage": self.url,
                                   "direction": self.direction, "n_trials": len(trials),
                                   "completed": counts["complete"], "pruned": counts["pruned"],
                                   "failed": counts["fail"]}
        if any(t.state == states.COMPLETE for t in trials):
            best = study.best_trial
            results.update(best_trial=best.number, best_value=best.value, best_params=best.params)
            log.info("best trial %d: %.4f %s", best.number, best.value, best.params)
        OmegaConf.save(OmegaConf.create(results), self.sweep_dir / RESULTS_FILE)


def _counts(study) -> tuple[int, int]:
    """``(ended, running)``: trials that count toward n_trials and ended; trials running (in any worker). Queued
    (WAITING) trials are neither: ``ask`` hands them out first."""
    ended = running = 0
    for trial in study.get_trials(deepcopy=False):
        if trial.state.is_finished():
            ended += NOT_COUNTED not in trial.user_attrs
        elif trial.state.name == "RUNNING":
            running += 1
    return ended, running


def _counted_before(study, number: int) -> int:
    """Trials numbered below ``number`` that count (ended, running or queued; not surplus or interrupted)."""
    return sum(1 for t in study.get_trials(deepcopy=False) if t.number < number and NOT_COUNTED not in t.user_attrs)


def _plain(node):
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
