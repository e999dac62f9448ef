"""train_seg.search.sweeper: the search space, recovery of interrupted trials, and real searches: real Optuna, real
processes, one JournalStorage file shared by two workers, SIGKILLed and started again."""
from __future__ import annotations

import csv
import signal
import socket
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

optuna = pytest.importorskip("optuna")

import forkserver  # noqa: E402
from conftest import cli_env  # noqa: E402
from train_seg.search.study import SearchError, open_storage  # noqa: E402
from train_seg.search.sweeper import NOT_COUNTED, OptunaSearch, _counted_before, search_space  # noqa: E402

TINY = ["model=tiny", "dataset.num_train=8", "dataset.num_val=4", "dataset.image_size=64", "trainer.batch_size=2",
        "trainer.num_workers=0", "trainer.progress=false", "logger.tensorboard.num_overlays=0", "dataset.seed=3",
        "rare_share=0.02", "trainer.num_threads=1", "optimized_metric=val/mIoU"]


def test_the_search_space_in_hydra_grammar():
    dists, fixed = search_space(["optimizer.lr=tag(log, interval(0.002, 0.1))", "weighting.power=interval(0, 1)",
                                 "loss=choice(ce, ce_dice)", "trainer.max_epochs=range(2, 8, 2)",
                                 "model.width=range(4, 17, 4)", "seed=3"])
    assert dists["optimizer.lr"] == optuna.distributions.FloatDistribution(0.002, 0.1, log=True)
    assert dists["weighting.power"] == optuna.distributions.FloatDistribution(0.0, 1.0)
    assert dists["loss"] == optuna.distributions.CategoricalDistribution(["ce", "ce_dice"])
    assert dists["trainer.max_epochs"] == optuna.distributions.IntDistribution(2, 6, step=2)  # range's end is open
    assert dists["model.width"] == optuna.distributions.IntDistribution(4, 16, step=4)
    assert fixed == {"seed": "3"}
    with pytest.raises(SearchError, match="grad_clip.*samples choice"):
        search_space(["trainer.grad_clip=glob(*)"])


def _sweeper(**kwargs) -> OptunaSearch:
    return OptunaSearch(**{"heartbeat_s": 1.0, "grace_s": 5.0, **kwargs})


def test_an_interrupted_trial_is_failed_uncounted_and_queued_to_continue(tmp_path):
    storage = open_storage(f"journal:{tmp_path / 's.journal'}")
    study = optuna.create_study(storage=storage, study_name="s", direction="maximize")
    dead = forkserver.popen([sys.executable, "-c", "pass"], env=cli_env())
    dead.wait(timeout=60)  # a process of this host that has ended (and been reaped)
    gone = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    gone.set_user_attr("worker", f"{socket.gethostname()}:{dead.pid}")
    gone.set_user_attr("run_dir", str(tmp_path / "3_x"))
    silent = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    silent.set_user_attr("worker", "elsewhere:1")
    silent.set_user_attr("heartbeat", time.time() - 60)  # another host's trial, no heartbeat for a minute
    alive = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    alive.set_user_attr("worker", "elsewhere:2")
    alive.set_user_attr("heartbeat", time.time())
    _sweeper()._recover_stale(study)
    trials = study.get_trials()
    assert [t.state.name for t in trials[:3]] == ["FAIL", "FAIL", "RUNNING"]
    assert [t.user_attrs.get(NOT_COUNTED) for t in trials[:3]] == ["interrupted", "interrupted", None]
    queued = [t for t in trials if t.state.name == "WAITING"]
    # queued with the same parameters (Optuna keeps a queued trial's parameters as its fixed_params)
    assert [(t.user_attrs["resumes"], t.system_attrs["fixed_params"]) for t in queued] == [(0, {"x": gone.params["x"]}),
                                                                    (1, {"x": silent.params["x"]})]
    assert queued[0].user_attrs["run_dir"] == str(tmp_path / "3_x")  # the continuation runs in the same directory
    _sweeper()._recover_stale(study)  # a second worker finds nothing more to recover
    assert len(study.get_trials()) == 5
    assert _counted_before(study, 5) == 3  # trial 2 (running) and the two queued ones; not the interrupted


def test_bad_sweeper_settings_are_refused():
    with pytest.raises(SearchError, match="direction='up'"):
        OptunaSearch(direction="up")
    with pytest.raises(SearchError, match="n_trials=0"):
        OptunaSearch(n_trials=0)
    with pytest.raises(SearchError, match="0 < heartbeat_s < grace_s"):
        OptunaSearch(heartbeat_s=30, grace_s=10)


# -- real searches ---------------------------------------------------------------------------------------------
# Six queued trials make the outcome independent of which worker runs which: 2 epochs and a valid lr complete;
# 4 epochs are pruned at epoch 2 (the threshold pruner with an unreachable bound); lr=-1 fails its config check.
QUEUE = ("[{trainer.max_epochs:2,optimizer.lr:0.05},{trainer.max_epochs:4,optimizer.lr:0.05},"
         "{trainer.max_epochs:2,optimizer.lr:-1.0},{trainer.max_epochs:4,optimizer.lr:0.02},"
         "{trainer.max_epochs:2,optimizer.lr:0.02},{trainer.max_epochs:2,optimizer.lr:0.01}]")


def _search_command(tmp_path: Path) -> list[str]:
    return [sys.executable, "-m", "train_seg", "-m", "hparams_search=optuna", *TINY,
            "trainer.checkpoint_every_n_steps=1", f"paths.cache_dir={tmp_path / 'cache'}",
            f"hydra.sweep.dir={tmp_path / 'search'}", f"hydra.sweeper.storage={tmp_path / 'search.journal'}",
            "hydra.sweeper.n_trials=6", "hydra/sweeper/pruner=threshold", "hydra.sweeper.pruner.lower=2.0",
            "trainer.max_epochs=choice(2,4)", "optimizer.lr=choice(0.05,0.02,0.01,-1.0)",
            f"hydra.sweeper.enqueue={QUEUE}"]


def _load(tmp_path: Path):
    return optuna.load_study(study_name="train_seg", storage=open_storage(f"journal:{tmp_path / 'search.journal'}"))


def _interruptible(study) -> bool:
    """Two trials ended and one is running with a checkpoint: the moment to kill the search."""
    trials = study.get_trials(deepcopy=False)
    ended = sum(t.state.is_finished() for t in trials)
    return ended >= 2 and any(t.state.name == "RUNNING" and "run_dir" in t.user_attrs
                              and (Path(t.user_attrs["run_dir"]) / "last.pt").is_file() for t in trials)


@pytest.mark.slow
def test_two_workers_share_a_study_prune_survive_a_kill_and_finish_n_trials(tmp_path):
    command, env = _search_command(tmp_path), cli_env()
    workers = [forkserver.popen(command, cwd=tmp_path, env=env) for _ in range(2)]
    deadline = time.monotonic() + 240
    while not (tmp_path / "search.journal").is_file() or not _interruptible(_load(tmp_path)):
        assert time.monotonic() < deadline and all(w.poll() is None for w in workers), "the search ended too early"
        time.sleep(0.1)
    for worker in workers:  # the whole search, SIGKILLed
        worker.send_signal(signal.SIGKILL)
    assert [worker.wait(timeout=60) for worker in workers] == [-9, -9]
    killed = _load(tmp_path).get_trials()
    interrupted = {t.number: t.user_attrs.get("run_dir") for t in killed if t.state.name == "RUNNING"}
    assert any(run_dir and (Path(run_dir) / "last.pt").is_file() for run_dir in interrupted.values())
    assert len({t.user_attrs["worker"] for t in killed if "worker" in t.user_attrs}) == 2

    again = [forkserver.popen(command, cwd=tmp_path, env=env) for _ in range(2)]  # the same command, started again
    outputs = [worker.communicate(timeout=300) for worker in again]
    assert [worker.wait() for worker in again] == [1, 1], outputs[0][1][-3000:]  # 1: a trial failed (lr=-1)

    trials = _load(tmp_path).get_trials()
    counted = [t for t in trials if NOT_COUNTED not in t.user_attrs]
    assert sorted(t.state.name for t in counted) == ["COMPLETE"] * 3 + ["FAIL"] + ["PRUNED"] * 2
    # no trial ran twice: one run directory each (the failed one has none: its config check came first)
    assert len({t.user_attrs["run_dir"] for t in counted if "run_dir" in t.user_attrs}) == len(counted) - 1
    for number, run_dir in interrupted.items():  # failed as interrupted, then continued from its checkpoint
        assert trials[number].state.name == "FAIL" and trials[number].user_attrs[NOT_COUNTED] == "interrupted"
        (successor,) = [t for t in counted if t.user_attrs.get("resumes") == number]
        if run_dir and (Path(run_dir) / "last.pt").is_file():
            assert successor.user_attrs["run_dir"] == run_dir and successor.state.name in ("COMPLETE", "PRUNED")
            assert "continuing" in (Path(run_dir) / "train_seg.log").read_text()
    pruned = [t for t in counted if t.state.name == "PRUNED"]
    assert all(t.params["trainer.max_epochs"] == 4 and max(t.intermediate_values) == 2 for t in pruned)

    with open(tmp_path / "search" / "summary.csv", newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["kind"] == "job"]
    statuses = sorted(row["status"] for row in rows)
    assert [s for s in statuses if s != "incomplete"] == ["completed"] * 3 + ["failed"] + ["pruned"] * 2
    # a trial killed after Hydra made its directory but before the job recorded it (the job's first lines) leaves
    # that directory unfinished, listed as incomplete; its successor ran in a new one
    assert statuses.count("incomplete") <= sum(1 for run_dir in interrupted.values() if not run_dir)
    assert not any("trial=" in row["overrides"] for row in rows)
    results = OmegaConf.load(tmp_path / "search" / "optimization_results.yaml")
    assert (results.completed, results.pruned, results.failed, results.n_trials) == (3, 2, 1, 6)
    best = max((t for t in counted if t.state.name == "COMPLETE"), key=lambda t: t.value)
    assert results.best_trial == best.number and results.best_value == pytest.approx(best.value)


def test_a_bad_storage_is_one_paragraph_before_any_trial(tmp_path):
    result = forkserver.run([sys.executable, "-m", "train_seg", "-m", "hparams_search=optuna", *TINY,
                             "hydra.sweeper.storage=study.db", f"hydra.sweep.dir={tmp_path / 'search'}"],
                            cwd=tmp_path, env=cli_env(), timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "train_seg: error: hydra.sweeper.storage='study.db' is not a storage" in result.stderr
    assert not (tmp_path / "search").exists()
