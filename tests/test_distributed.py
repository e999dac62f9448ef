"""train_seg.distributed: rank discovery from faked torchrun and SLURM environments, SLURM's compressed node lists,
the SyncBatchNorm-on-CPU error, rank-aware samplers (disjoint shares whose union is the epoch's list, per epoch),
the SLURM presets, and real 2-process gloo runs: collectives, and a failure on rank 1 ending both ranks non-zero."""
from __future__ import annotations

import os
import re
import socket
from pathlib import Path
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import forkserver
from train_seg import distributed
from train_seg.distributed import DistEnv, DistributedError, discover, expand_nodelist


# -- discovery ---------------------------------------------------------------------------------------------------
TORCHRUN = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "node1",
            "MASTER_PORT": "29400", "TORCHELASTIC_RUN_ID": "x"}
SLURM_ONE_NODE = {"SLURM_PROCID": "2", "SLURM_LOCALID": "2", "SLURM_NTASKS": "4", "SLURM_NTASKS_PER_NODE": "4",
                  "SLURM_JOB_NODELIST": "gpu07", "SLURM_JOB_ID": "123456", "SLURM_NODEID": "0"}
# 8 tasks on 2 nodes, this is the 6th (second node); SLURM_TASKS_PER_NODE compressed, no SLURM_NTASKS_PER_NODE
SLURM_TWO_NODES = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_TASKS_PER_NODE": "4(x2)",
                   "SLURM_JOB_NODELIST": "gpu[03-04]", "SLURM_JOB_ID": "77", "SLURM_NODEID": "1"}


@pytest.mark.parametrize("environ, expected", [
    ({}, DistEnv()),
    (TORCHRUN, DistEnv(3, 1, 4, 2, "node1", 29400, "torchrun")),
    (SLURM_ONE_NODE, DistEnv(2, 2, 4, 4, "gpu07", 10000 + 123456 % 20000, "slurm")),
    (SLURM_TWO_NODES, DistEnv(5, 1, 8, 4, "gpu03", 10077, "slurm")),
    # compressed list of several groups: the master is the first host; MASTER_PORT wins over the job id
    ({**SLURM_TWO_NODES, "SLURM_JOB_NODELIST": "gpu[01-03,07],cpu5", "MASTER_PORT": "4242"},
     DistEnv(5, 1, 8, 4, "gpu01", 4242, "slurm")),
    # the step's node list is where srun put rank 0 (a step may run on a subset of the allocation)
    ({**SLURM_TWO_NODES, "SLURM_STEP_NODELIST": "gpu04,gpu03"}, DistEnv(5, 1, 8, 4, "gpu04", 10077, "slurm")),
    ({**SLURM_ONE_NODE, "SLURM_JOB_NODELIST": "", "SLURM_NODELIST": "a-[1-2]-b"},
     DistEnv(2, 2, 4, 4, "a-1-b", 13456, "slurm")),
    # uneven tasks per node: node 1 of "3,1" runs one task
    ({**SLURM_TWO_NODES, "SLURM_NTASKS": "4", "SLURM_TASKS_PER_NODE": "3,1", "SLURM_PROCID": "3", "SLURM_LOCALID": "0"},
     DistEnv(3, 0, 4, 1, "gpu03", 10077, "slurm")),
    # a 2-task step inside a 4-task-per-node allocation: the step's own counts
    ({**SLURM_ONE_NODE, "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_TASKS_PER_NODE": "2", "SLURM_PROCID": "1",
      "SLURM_LOCALID": "1"}, DistEnv(1, 1, 2, 2, "gpu07", 13456, "slurm")),
    # torchrun inside a SLURM allocation: torchrun's variables win
    ({**SLURM_TWO_NODES, **TORCHRUN}, DistEnv(3, 1, 4, 2, "node1", 29400, "torchrun")),
    # a SLURM job of one task, or a one-task srun step inside a bigger allocation: one process
    ({**SLURM_ONE_NODE, "SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}, DistEnv()),
    ({**SLURM_ONE_NODE, "SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}, DistEnv()),
    # an allocation's shell (salloc) has SLURM_NTASKS but no SLURM_PROCID: not a rank of anything
    ({k: v for k, v in SLURM_ONE_NODE.items() if k not in ("SLURM_PROCID", "SLURM_LOCALID")}, DistEnv()),
    # torchrun --nproc_per_node=1: a world of one, no process group needed
    ({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}, DistEnv(0, 0, 1, 1, None, None, "torchrun")),
])
def test_discover(environ, expected):
    env = discover(environ)
    assert env == expected
    assert env.distributed == (expected.world_size > 1) and env.is_main == (expected.rank == 0)


@pytest.mark.parametrize("environ, words", [
    ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"}, "rank 2 of world size 2"),
    ({"RANK": "0", "WORLD_SIZE": "2"}, "MASTER_ADDR/MASTER_PORT"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
    ({**SLURM_ONE_NODE, "SLURM_JOB_NODELIST": "gpu[1-"}, "SLURM_JOB_NODELIST='gpu[1-'"),
    ({k: v for k, v in SLURM_ONE_NODE.items() if k != "SLURM_JOB_NODELIST"}, "no SLURM_STEP_NODELIST"),
])
def test_discover_refuses_an_impossible_environment(environ, words):
    with pytest.raises(DistributedError, match=re.escape(words)):
        discover(environ)


@pytest.mark.parametrize("nodelist, hosts", [
    ("node1", ["node1"]),
    ("node1,node2", ["node1", "node2"]),
    ("gpu[01-03,07],cpu5", ["gpu01", "gpu02", "gpu03", "gpu07", "cpu5"]),
    ("a-[1-2]-b", ["a-1-b", "a-2-b"]),
    ("node[8-10]", ["node8", "node9", "node10"]),
    ("node[08-10]", ["node08", "node09", "node10"]),  # padding of the lower bound
    ("r[1-2]n[1,3]", ["r1n1", "r1n3", "r2n1", "r2n3"]),  # several groups: their product, in order
    ("x[3],y[1-2]", ["x3", "y1", "y2"]),
    ("n1.cluster.org,n2.cluster.org", ["n1.cluster.org", "n2.cluster.org"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("nodelist", ["", "gpu[01-03", "gpu]1", "gpu[a-b]", "gpu[3-1]", "a[[1]]", ","])
def test_expand_nodelist_refuses_malformed_lists(nodelist):
    with pytest.raises(DistributedError, match="SLURM_JOB_NODELIST"):
        expand_nodelist(nodelist)


def test_expand_tasks_per_node():
    assert distributed.expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert distributed.expand_tasks_per_node("4") == [4]
    with pytest.raises(DistributedError, match="2\\(x3\\),1"):
        distributed.expand_tasks_per_node("two")


# -- model -------------------------------------------------------------------------------------------------------
def test_sync_batchnorm_on_cpu_is_a_clear_error():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    with pytest.raises(ValueError) as info:
        distributed.sync_batchnorm(model, torch.device("cpu"))
    message = str(info.value)
    assert isinstance(info.value, distributed.SyncBatchNormError)
    assert "model.sync_batchnorm=true" in message and "no CPU kernel" in message
    assert "model.sync_batchnorm=false" in message and "\n" not in message
    assert isinstance(model[1], nn.BatchNorm2d)  # untouched


def test_helpers_are_no_ops_in_one_process():
    assert not distributed.is_initialized()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    assert distributed.main_then_broadcast(lambda: 5) == 5
    assert distributed.all_reduce_sum_(torch.ones(2)).tolist() == [1.0, 1.0]
    distributed.barrier()
    model = nn.Linear(2, 2)
    assert distributed.wrap_ddp(model, torch.device("cpu")) is model and distributed.unwrap(model) is model
    with distributed.session(DistEnv(), "cpu", timeout_s=5) as device:
        assert device == torch.device("cpu") and not distributed.is_initialized()
    distributed.teardown()
    distributed.teardown()  # twice is fine


# -- samplers ----------------------------------------------------------------------------------------------------
def ranks(world: int) -> list[DistEnv]:
    return [DistEnv(rank=r, local_rank=r, world_size=world, local_world_size=world, master_addr="127.0.0.1",
                    master_port=1, source="torchrun") for r in range(world)]


def test_eval_shards_cover_every_image_once_without_padding():
    shares = [list(distributed.shard_eval_sampler(5, env)) for env in ranks(2)]
    assert shares == [[0, 2, 4], [1, 3]]
    shares = [list(distributed.shard_eval_sampler(7, env)) for env in ranks(3)]
    assert sorted(sum(shares, [])) == list(range(7))


# -- SLURM presets -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset, nodes", [("slurm_1node", 1), ("slurm_multinode", 2)])
def test_slurm_presets_compose(preset, nodes):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="the `slurm` extra is not installed")
    from reporting.test_sweep import compose_with_hydra

    cfg = compose_with_hydra(f"experiment={preset}", "hydra.launcher.gpus_per_node=8")
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert launcher.nodes == nodes and launcher.gpus_per_node == 8
    assert launcher.tasks_per_node == 8  # one task (rank) per GPU follows gpus_per_node
    assert launcher.partition is None and "export SLURM_KILL_BAD_EXIT=1" in launcher.setup
    assert cfg.trainer.device == "cuda"


def test_hydra_overrides_keep_other_ranks_from_writing(tmp_path):
    from reporting.test_sweep import compose_with_hydra

    assert distributed.hydra_overrides(DistEnv()) == [] == distributed.hydra_overrides(ranks(2)[0])
    overrides = distributed.hydra_overrides(ranks(2)[1])
    cfg = compose_with_hydra(f"hydra.run.dir={tmp_path}", *overrides)  # the last hydra.run.dir wins
    assert cfg.hydra.output_subdir is None and cfg.hydra.run.dir == "."
    assert "FileHandler" not in str(cfg.hydra.job_logging)


class _Unpicklable(Exception):
    def __reduce__(self):
        raise TypeError("cannot pickle this")


# -- real processes (gloo on CPU) ------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _collectives_worker(rank: int, port: int) -> None:
    torch.set_num_threads(1)
    env = DistEnv(rank=rank, local_rank=rank, world_size=2, local_world_size=2, master_addr="127.0.0.1",
                  master_port=port, source="torchrun")
    with distributed.session(env, "cpu", timeout_s=20) as device:
        assert device == torch.device("cpu") and distributed.is_initialized()
        assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (rank, 2, rank == 0)
        summed = distributed.all_reduce_sum_(torch.tensor([rank + 1.0, 10.0]))
        assert summed.tolist() == [3.0, 20.0]
        assert distributed.broadcast_object({"from": rank, "dir": f"/run/{rank}"}) == {"from": 0, "dir": "/run/0"}
        calls = []
        assert distributed.main_then_broadcast(lambda: calls.append(rank) or "stats") == "stats"
        assert calls == ([0] if rank == 0 else [])  # computed once, on rank 0
        with pytest.raises(ValueError, match="bad dataset on rank 0"):
            distributed.main_then_broadcast(lambda: (_ for _ in ()).throw(ValueError("bad dataset on rank 0")))
        with pytest.raises(_Unpicklable if rank == 0 else distributed.RankFailure, match="no pickle|rank 0 failed"):
            distributed.main_then_broadcast(lambda: (_ for _ in ()).throw(_Unpicklable("no pickle")))
        torch.manual_seed(rank)  # different initial weights: DDP broadcasts rank 0's at construction
        model = distributed.wrap_ddp(nn.Linear(3, 1), device)
        model(torch.full((2, 3), float(rank + 1))).sum().backward()
        grad = distributed.unwrap(model).weight.grad.clone()
        assert torch.allclose(grad, torch.full((1, 3), 3.0))  # mean of 2*1 and 2*2
        assert list(distributed.unwrap(model).state_dict()) == ["weight", "bias"]
        weights = distributed.unwrap(model).weight.detach().clone()
        assert torch.equal(distributed.all_reduce_sum_(weights.clone()), 2 * weights)  # same on both ranks
        distributed.barrier()
    assert not distributed.is_initialized()
    distributed.teardown()


def test_two_gloo_processes_reduce_broadcast_and_wrap_ddp():
    mp.spawn(_collectives_worker, args=(free_port(),), nprocs=2, join=True)


FAILING_WORKER = textwrap.dedent("""
    import pathlib, sys, time, torch
    from train_seg import distributed
    rank, port, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    # both imports done before the 3 s rendezvous starts, however loaded the machine
    here = pathlib.Path(__file__).parent
    (here / f"ready{rank}").touch()
    while not all((here / f"ready{r}").exists() for r in range(2)):
        time.sleep(0.05)
    env = distributed.DistEnv(rank=rank, local_rank=rank, world_size=2, local_world_size=2,
                              master_addr="127.0.0.1", master_port=port, source="torchrun")
    with distributed.session(env, "cpu", timeout_s=3):
        distributed.all_reduce_sum_(torch.ones(2))  # both ranks are up
        print("up", flush=True)
        if rank == 1 and mode == "raise":
            raise RuntimeError("boom on rank 1")
        if rank == 1 and mode == "hang":
            time.sleep(60)  # stuck outside any collective: rank 0 must not wait for it forever
        distributed.all_reduce_sum_(torch.ones(2))  # the gradient all-reduce rank 1 never joins
    print("finished", flush=True)
""")


def start_pair(tmp_path, mode: str):
    script = tmp_path / "worker.py"
    script.write_text(FAILING_WORKER)
    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")},
           "OMP_NUM_THREADS": "1"}
    return [forkserver.popen([sys.executable, str(script), str(rank), str(port), mode], env=env) for rank in range(2)]


def wait_all(processes, timeout: float) -> list[tuple[int | None, str, str]]:
    deadline = time.monotonic() + timeout
    out = []
    for process in processes:
        try:
            stdout, stderr = process.communicate(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
            out.append((None, stdout, stderr))
            continue
        out.append((process.returncode, stdout, stderr))
    return out


def test_an_exception_on_rank_1_ends_both_ranks_non_zero(tmp_path):
    """No launcher agent to kill rank 0: it must end by itself (gloo sees the closed connection) with a
    readable RankFailure, while rank 1 ends with its own error."""
    (code0, out0, err0), (code1, out1, err1) = wait_all(start_pair(tmp_path, "raise"), timeout=25)
    assert code1 not in (0, None) and "boom on rank 1" in err1, err1[-2000:]
    assert code0 not in (0, None), (code0, err0[-2000:])
    assert "RankFailure" in err0 and "because rank 1 crashed" in err0 and "finished" not in out0


def test_a_rank_stuck_outside_collectives_is_ended_by_the_timeout(tmp_path):
    processes = start_pair(tmp_path, "hang")
    tic = time.monotonic()
    code0, out0, err0 = wait_all(processes[:1], timeout=25)[0]
    waited = time.monotonic() - tic
    wait_all(processes[1:], timeout=0.1)  # rank 1 (ours) is still sleeping: killed here
    assert code0 not in (0, None) and "up" in out0, (code0, err0[-2000:])
    assert "RankFailure" in err0 and "within the timeout (3 s)" in err0
    assert waited < 20


# -- the trainer under torchrun (CPU, gloo, 2 processes) --------------------------------------------------------
DDP_TINY = ["model=tiny", "model.dropout=0.2", "dataset.num_train=8", "dataset.num_val=5", "dataset.image_size=64", "trainer.batch_size=2",
            "trainer.val_batch_size=2", "trainer.max_epochs=2", "trainer.progress=false", "trainer.log_every=1",
            "trainer.device=cpu", "scheduler.warmup_steps=1", "logger.tensorboard.num_overlays=0",
            "trainer.dist_timeout_s=60"]


# torchrun's entry for the fixture run: the real `python -m train_seg`, with every training sample a rank loads
# appended to INDEX_LOG.<rank> (the test's own record of which images each rank saw)
_INDEX_DRIVER = textwrap.dedent('''
    import os, sys
    from train_seg.data import order
    load = order.SeededSamples.__getitem__
    def logged(self, key):
        if isinstance(key, tuple):
            with open(os.environ["INDEX_LOG"] + "." + os.environ["RANK"], "a") as handle:
                handle.write(f"{key[0]}\\n")
        return load(self, key)
    order.SeededSamples.__getitem__ = logged
    from train_seg.__main__ import main
    main()
''')


# torchrun's entry for the kill test: rank 1 of the first attempt SIGKILLs itself right after step KILL_STEP (and
# its mid-epoch checkpoint); torchrun (--max-restarts) then restarts both ranks, which resume from last.pt
_KILL_DRIVER = textwrap.dedent('''
    import os, signal
    from train_seg.engine import trainer
    after_step = trainer._StepHook.__call__
    def killing(self, epoch, progress, step):
        after_step(self, epoch, progress, step)
        if os.environ["RANK"] == "1" and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0" \\
                and step == int(os.environ["KILL_STEP"]):
            os.kill(os.getpid(), signal.SIGKILL)
    trainer._StepHook.__call__ = killing
    from train_seg.__main__ import main
    main()
''')
# the fixture run and the kill test's run differ only in the kill: mid-epoch checkpoints after every step
RESUMABLE = ["trainer.resume=auto", "trainer.checkpoint_every_n_steps=1"]


def _torchrun(cwd: Path, run_dir: Path, cache: Path, *overrides: str, nproc: int = 2, index_log: Path | None = None,
              kill_step: int | None = None):
    env = dict(os.environ, OMP_NUM_THREADS="1", NO_ALBUMENTATIONS_UPDATE="1")
    env.pop("HYDRA_FULL_ERROR", None)
    entry, restarts = ["-m", "train_seg"], []
    if index_log is not None:
        driver = index_log.parent / "index_driver.py"
        driver.write_text(_INDEX_DRIVER)
        entry, env["INDEX_LOG"] = [str(driver)], str(index_log)
    if kill_step is not None:
        driver = run_dir.parent / "kill_driver.py"
        driver.write_text(_KILL_DRIVER)
        entry, env["KILL_STEP"], restarts = [str(driver)], str(kill_step), ["--max-restarts=1"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *restarts,
               *entry, *DDP_TINY, f"hydra.run.dir={run_dir}", f"paths.cache_dir={cache}", *overrides]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _single(cwd: Path, run_dir: Path, cache: Path, *overrides: str):
    env = dict(os.environ, OMP_NUM_THREADS="1", NO_ALBUMENTATIONS_UPDATE="1")
    env.pop("HYDRA_FULL_ERROR", None)
    command = [sys.executable, "-m", "train_seg", *DDP_TINY, "trainer.num_threads=1", f"hydra.run.dir={run_dir}",
               f"paths.cache_dir={cache}", *overrides]
    return forkserver.run(command, cwd=cwd, env=env, timeout=300)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """A 2-epoch torchrun run of 2 CPU processes, started from an empty working directory."""
    base = tmp_path_factory.mktemp("ddp")
    cwd = base / "cwd"
    cwd.mkdir()
    result = _torchrun(cwd, base / "run", base / "cache", *RESUMABLE, index_log=base / "indices")
    assert result.returncode == 0, result.stderr[-3000:]
    return base


@pytest.mark.slow
def test_torchrun_restarts_after_a_rank_is_killed_mid_epoch_and_ends_bit_exact(ddp_run, tmp_path):
    """Rank 1 SIGKILLed after step 3 (epoch 2's first step, a mid-epoch checkpoint): torchrun restarts both ranks,
    each restores its own random state (the model's dropout draws differ by rank) and the same position, and the
    final weights equal those of the uninterrupted fixture run to the bit."""
    from train_seg.reporting import record

    run_dir = tmp_path / "run"
    result = _torchrun(tmp_path, run_dir, tmp_path / "cache", *RESUMABLE, kill_step=3)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "at epoch 1, step 3, 1 batches into epoch 2" in output  # resumed from the mid-epoch checkpoint
    assert "failed (exitcode: -9) local_rank: 1" in output, output[-3000:]  # torchrun saw the kill, restarted
    reference = torch.load(ddp_run / "run" / "last.pt", weights_only=True)
    resumed = torch.load(run_dir / "last.pt", weights_only=True)
    assert resumed["global_step"] == reference["global_step"] == 4
    for key, value in reference["model"].items():
        assert torch.equal(resumed["model"][key], value), key
    # each rank's random state is in the checkpoint, and they differ (restoring rank 0's on rank 1 would not do)
    assert len(resumed["rng_ranks"]) == 2 and not torch.equal(resumed["rng_ranks"][0]["torch"],
                                                               resumed["rng_ranks"][1]["torch"])
    # and so is the history: losses (the resumed epoch's sums came from the checkpoint) and every metric
    untimed = [[{k: v for k, v in e.items() if k != "train/seconds"} for e in record.read(d).history]
               for d in (run_dir, ddp_run / "run")]
    assert untimed[0] == untimed[1] and [e["step"] for e in untimed[0]] == [2, 4]


@pytest.mark.slow
def test_the_two_ranks_saw_disjoint_shares_whose_union_is_each_epochs_list(ddp_run):
    from train_seg.data.order import EpochOrder

    seen = [[int(line) for line in (ddp_run / f"indices.{rank}").read_text().split()] for rank in range(2)]
    assert [len(indices) for indices in seen] == [8, 8]  # 2 epochs x 2 batches x 2 images per rank
    for epoch in range(2):
        order = EpochOrder(8, seed=42)
        order.set_epoch(epoch)
        expected = order.full_order().tolist()
        shares = [indices[4 * epoch:4 * epoch + 4] for indices in seen]
        assert shares == [expected[0::2], expected[1::2]]
        assert not set(shares[0]) & set(shares[1]) and sorted(shares[0] + shares[1]) == list(range(8))


@pytest.mark.slow
def test_torchrun_trains_on_two_ranks_rank_0_alone_writes_and_its_iou_is_the_checkpoints(ddp_run, tmp_path):
    from train_seg.reporting import record
    from train_seg.config.command_line import compose
    from train_seg.cli.evaluate import command_line_overrides, evaluate_checkpoint

    cwd, run_dir = ddp_run / "cwd", ddp_run / "run"
    assert sorted(p.name for p in cwd.iterdir()) == []  # rank 1 wrote nothing (its Hydra run dir is the cwd)
    assert {"last.pt", "best.pt", "metrics.json", "per_class.png"} <= {p.name for p in run_dir.iterdir()}
    trained = record.read(run_dir)
    assert trained.status == "completed" and [e["step"] for e in trained.history] == [2, 4]  # 4 images per rank
    state = torch.load(run_dir / "last.pt", weights_only=True)
    assert not any(key.startswith("module.") for key in state["model"])  # the unwrapped model's state
    # the all-reduced confusion matrix of 2 ranks' shares = one process evaluating the whole split
    cfg = compose(command_line_overrides([f"ckpt={run_dir / 'last.pt'}", "resolution=pipeline", "progress=false",
                                          f"output_dir={tmp_path / 'eval'}", f"paths.cache_dir={tmp_path / 'cache'}"]),
                  config_name="evaluate")
    alone = evaluate_checkpoint(cfg)["final"]
    for name in trained.class_names:
        assert alone["per_class"][name]["support"] == trained.final["per_class"][name]["support"]
        assert alone["per_class"][name]["iou"] == pytest.approx(trained.final["per_class"][name]["iou"], abs=1e-9,
                                                                nan_ok=True)


@pytest.mark.slow
def test_a_distributed_checkpoint_resumes_in_one_process_and_vice_versa(ddp_run, tmp_path):
    from train_seg.reporting import record
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    alone = _single(cwd, tmp_path / "alone", tmp_path / "cache", f"trainer.resume={ddp_run / 'run'}",
                    "trainer.max_epochs=3")
    assert alone.returncode == 0, alone.stderr[-3000:]
    resumed_alone = record.read(tmp_path / "alone")
    assert [e["epoch"] for e in resumed_alone.history] == [1, 2, 3]
    assert [e["step"] for e in resumed_alone.history] == [2, 4, 8]  # 2 per rank, then 4 in one process

    single = _single(cwd, tmp_path / "single", tmp_path / "cache", "trainer.max_epochs=1")
    assert single.returncode == 0, single.stderr[-3000:]
    again = _torchrun(cwd, tmp_path / "again", tmp_path / "cache", f"trainer.resume={tmp_path / 'single'}")
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = record.read(tmp_path / "again")
    assert [e["epoch"] for e in resumed.history] == [1, 2]
    assert [e["step"] for e in resumed.history] == [4, 6]  # 4 single-process steps, then 2 per rank


class _TinySegmenter(nn.Module):
    """No BatchNorm, no dropout: DDP on two halves of a batch is then the same computation as one process on all
    of it (CE's mean over equally many pixels per rank, gradients averaged by DDP)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 1))

    def forward(self, x):
        return {"out": self.body(x)}


def _batches(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    return torch.randn(4, 3, 8, 8, generator=generator), torch.randint(0, 3, (4, 8, 8), generator=generator)


def _equivalence_worker(rank: int, port: int, out: str) -> None:
    from train_seg.engine.loop import LoopSettings, train_one_epoch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    model = _TinySegmenter()
    ddp = distributed.wrap_ddp(model, torch.device("cpu"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loader = [tuple(t[2 * rank:2 * rank + 2] for t in _batches(step)) for step in range(3)]
    train_one_epoch(ddp, nn.CrossEntropyLoss(), optimizer, None, torch.amp.GradScaler("cpu", enabled=False), loader,
                    LoopSettings(device=torch.device("cpu"), progress=False), epoch=0, global_step=0)
    if rank == 0:
        torch.save(model.state_dict(), out)
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_ddp_after_n_steps_equals_one_process_on_the_concatenated_batches(tmp_path):
    from train_seg.engine.loop import LoopSettings, train_one_epoch

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_equivalence_worker, args=(port, str(tmp_path / "ddp.pt")), nprocs=2, join=True)
    model = _TinySegmenter()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train_one_epoch(model, nn.CrossEntropyLoss(), optimizer, None, torch.amp.GradScaler("cpu", enabled=False),
                    [_batches(step) for step in range(3)], LoopSettings(device=torch.device("cpu"), progress=False),
                    epoch=0, global_step=0)
    ddp_state = torch.load(tmp_path / "ddp.pt", weights_only=True)
    moved = 0.0
    for key, value in model.state_dict().items():
        torch.testing.assert_close(ddp_state[key], value, rtol=0, atol=1e-5)
        moved = max(moved, float((value - _TinySegmenter().state_dict()[key]).abs().max()))
    assert moved > 1e-3  # the weights did change: the comparison is not of two untrained models
