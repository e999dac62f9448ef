"""Kill it at any moment and lose nothing: mid-epoch checkpoints, bit-exact resume (SIGKILL at chosen and random
moments, with and without DataLoader workers), resume=auto in place with TensorBoard steps that never repeat,
SIGTERM / SIGINT, SLURM requeue, and the non-finite guard.

The killed runs are real processes (forked by tests/forkserver.py, without the interpreter's start-up): a small
driver (``_DRIVER``) installs one fault (SIGKILL of its own process at a training step, at an evaluation batch, or
half-way through writing a checkpoint) and then runs the real ``python -m train_seg`` entry point."""
from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import forkserver
from conftest import ROOT, cli_env

# 8 training images of 64 px in batches of 2: 4 steps per epoch, 2 epochs; one thread (bit-exact and no contention);
# the tiny model (configs/model/tiny.yaml): what is checked is the loop's resume, not DeepLabV3 (KB checkpoints)
TINY = ["model=tiny", "dataset.num_train=8", "dataset.num_val=4", "dataset.image_size=64", "trainer.batch_size=2",
        "trainer.val_batch_size=2", "trainer.max_epochs=2", "trainer.progress=false", "trainer.log_every=1",
        "trainer.num_threads=1", "scheduler.warmup_steps=1", "logger.tensorboard.num_overlays=0"]

_DRIVER = textwrap.dedent('''
    import os, signal, sys
    kind, at = sys.argv[1], int(sys.argv[2])
    sys.argv = [sys.argv[0]] + sys.argv[3:]
    import torch
    from train_seg import checkpoint, __main__ as entry
    from train_seg.engine import loop as engine
    from train_seg.evaluation import loop as evaluation
    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    calls = {"n": 0}
    if kind in ("step", "term"):  # SIGKILL / SIGTERM inside training step `at` (1-based, over the whole run)
        forward = engine.forward_loss
        def forward_loss(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == at:
                die() if kind == "step" else os.kill(os.getpid(), signal.SIGTERM)
            return forward(*args, **kwargs)
        engine.forward_loss = forward_loss
    elif kind == "eval":  # dies at evaluation batch `at` (counted over the whole run)
        predictions = evaluation.predictions
        def counted(logits):
            calls["n"] += 1
            if calls["n"] == at:
                die()
            return predictions(logits)
        evaluation.predictions = counted
    elif kind == "save":  # dies half-way through writing checkpoint number `at`
        save = torch.save
        def torch_save(obj, handle, *args, **kwargs):
            if isinstance(obj, dict) and "model" in obj:
                calls["n"] += 1
                if calls["n"] == at:
                    handle.write(b"x" * 4096)
                    handle.flush()
                    die()
            return save(obj, handle, *args, **kwargs)
        checkpoint.torch.save = torch_save
    entry.main()
''')


def _env(**extra) -> dict:
    env = cli_env()
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def _train(run_dir: Path, cache: Path, *overrides: str, fault: tuple[str, int] | None = None, env=None,
           wait: bool = True):
    args = [*TINY, f"hydra.run.dir={run_dir}", f"paths.cache_dir={cache}", *overrides]
    command = ([sys.executable, "-c", _DRIVER, fault[0], str(fault[1]), *args] if fault
               else [sys.executable, "-m", "train_seg", *args])
    if not wait:
        return forkserver.popen(command, cwd=ROOT, env=env or _env())
    return forkserver.run(command, cwd=ROOT, env=env or _env(), timeout=300)


def _final_state(run_dir: Path) -> tuple[dict, list, dict]:
    state = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)
    record = json.loads((run_dir / "metrics.json").read_text())
    history = [{k: v for k, v in entry.items() if k != "train/seconds"} for entry in record["history"]]
    return state["model"], history, record["final"]


def _assert_same_run(run_dir: Path, reference: Path) -> None:
    weights, history, final = _final_state(run_dir)
    ref_weights, ref_history, ref_final = _final_state(reference)
    assert weights.keys() == ref_weights.keys()
    different = [k for k in weights if not torch.equal(weights[k], ref_weights[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    assert history == ref_history
    assert final == ref_final


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run every resumed run must reproduce exactly (module-scoped: trained once)."""
    base = tmp_path_factory.mktemp("reference")
    runs = {}
    for workers in (0, 2):
        run_dir = base / f"workers{workers}"
        result = _train(run_dir, base / "cache", f"trainer.num_workers={workers}")
        assert result.returncode == 0, result.stderr[-2000:]
        runs[workers] = run_dir
    return runs


# -- bit-exact resume after SIGKILL --------------------------------------------------------------------------------
# one run killed three times, each resumed with resume=auto: the counts are per process
KILLS = [
    ("step", 3),   # SIGKILL in training step 3 (mid-epoch 1, after the checkpoints of steps 1 and 2)
    ("eval", 1),   # resumed at step 2: SIGKILL at the first batch of epoch 1's evaluation
    ("save", 2),   # resumed at step 3: SIGKILL half-way through its 2nd checkpoint (step 5, after epoch 1's)
]


@pytest.mark.slow
def test_sigkill_mid_epoch_mid_evaluation_and_mid_checkpoint_then_resume_ends_exactly_like_no_kill(tmp_path,
                                                                                                      reference):
    run_dir = tmp_path / "run"
    args = ("trainer.num_workers=0", "trainer.checkpoint_every_n_steps=1", "trainer.resume=auto")
    steps = []
    for kind, at in KILLS:
        killed = _train(run_dir, tmp_path / "cache", *args, fault=(kind, at))
        assert killed.returncode == -signal.SIGKILL, (kind, killed.stderr[-2000:])
        steps.append(torch.load(run_dir / "last.pt", weights_only=True)["global_step"])
    assert steps == [2, 3, 4]  # the checkpoint each kill left behind (the cut write left step 4's intact)
    assert list(run_dir.glob(".last.pt.*.tmp"))  # the write cut short left its temp file, never a bad last.pt
    resumed = _train(run_dir, tmp_path / "cache", *args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "continuing" in resumed.stdout + resumed.stderr
    _assert_same_run(run_dir, reference[0])


@pytest.mark.slow
def test_sigkill_at_a_random_moment_with_two_workers_resumes_exactly(tmp_path, reference):
    run_dir = tmp_path / "run"
    args = ("trainer.num_workers=2", "trainer.checkpoint_every_n_steps=1", "trainer.resume=auto")
    process = _train(run_dir, tmp_path / "cache", *args, wait=False)
    deadline = time.monotonic() + 120
    while not (run_dir / "last.pt").exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    # somewhere in the rest of the run (the tiny model's run lasts about a second after its first checkpoint)
    time.sleep(random.Random(os.getpid()).uniform(0.0, 0.4))
    process.kill()
    process.communicate()
    resumed = _train(run_dir, tmp_path / "cache", *args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _assert_same_run(run_dir, reference[2])


@pytest.mark.slow
def test_results_do_not_depend_on_the_number_of_workers(reference):
    _assert_same_run(reference[2], reference[0])  # augmentation is seeded per sample position


# -- signals -------------------------------------------------------------------------------------------------------
def _tensorboard_steps(run_dir: Path) -> dict[str, list[int]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: [event.step for event in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


@pytest.mark.slow
def test_sigterm_saves_marks_interrupted_and_resume_auto_continues_the_curves(tmp_path, reference):
    run_dir = tmp_path / "run"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'requeued'}\n")
    scontrol.chmod(0o755)
    env = _env(SLURM_JOB_ID="4242", PATH=f"{bin_dir}:{os.environ['PATH']}")
    args = ("trainer.num_workers=0", "trainer.resume=auto", "trainer.requeue_on_signal=true")
    stopped = _train(run_dir, tmp_path / "cache", *args, env=env, fault=("term", 6))  # SIGTERM in step 6
    stderr = stopped.stderr
    assert stopped.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    lines = [line for line in stderr.splitlines() if line.startswith("train_seg:")]
    assert len(lines) == 1 and "interrupted by SIGTERM" in lines[0] and "SLURM job 4242 requeued" in lines[0]
    assert f"trainer.resume=auto hydra.run.dir={run_dir}" in lines[0]
    assert (tmp_path / "requeued").read_text().split() == ["requeue", "4242"]
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["status"] == "interrupted"
    state = torch.load(run_dir / "last.pt", weights_only=True)
    assert state["global_step"] == 6 and state["progress"]["batches"] == 2  # step 6 finished, then saved
    assert "Traceback" not in stderr

    resumed = _train(run_dir, tmp_path / "cache", *args, env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _assert_same_run(run_dir, reference[0])
    steps = _tensorboard_steps(run_dir)
    assert steps["train/loss"] == list(range(1, 9))  # one point per step, none twice, none rewound
    for tag, values in steps.items():
        assert values == sorted(set(values)), (tag, values)
    assert steps["val/mIoU"] == [4, 8]


def test_a_second_signal_stops_at_once():
    from train_seg.engine.signals import StopRequest

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert stop() and stop.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt, match="second signal"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before  # handlers restored


def test_requeue_outside_slurm_does_nothing():
    from train_seg.engine.signals import requeue_slurm_job

    assert requeue_slurm_job({}) is None


# -- the non-finite guard --------------------------------------------------------------------------------------
class NaNAtSteps(torch.nn.Module):
    """The run's criterion, with a NaN loss at the given (1-based) steps."""

    def __init__(self, criterion, steps):
        super().__init__()
        self.criterion, self.steps, self.calls = criterion, set(steps), 0

    @property
    def last_terms(self):
        return getattr(self.criterion, "last_terms", None)

    def forward(self, logits, target):
        self.calls += 1
        loss = self.criterion(logits, target)
        return loss * math.nan if self.calls in self.steps else loss


def _prepared(make_cfg, tmp_path, *overrides):
    from train_seg.engine.trainer import prepare

    cfg = make_cfg("model=tiny", "trainer.max_epochs=2", "trainer.checkpoint_every_n_steps=1", "trainer.num_threads=1",
                   "logger.tensorboard=null", *overrides)
    return prepare(cfg, tmp_path / "run")


def test_non_finite_steps_are_skipped_counted_and_change_no_weight(make_cfg, tmp_path):
    from train_seg.engine.trainer import fit

    run = _prepared(make_cfg, tmp_path, "trainer.max_bad_steps=3")
    run.criterion = NaNAtSteps(run.criterion, {2, 3})
    snapshots = []
    original = run.optimizer.step

    def step(*args, **kwargs):
        snapshots.append(run.criterion.calls)
        return original(*args, **kwargs)

    run.optimizer.step = step
    fit(run)
    assert snapshots == [1, 4, 5, 6, 7, 8]  # steps 2 and 3 never reached the optimizer
    assert [entry["train/skipped_steps"] for entry in run.history] == [2, 0]
    assert all(math.isfinite(entry["train/loss"]) for entry in run.history)


def test_max_bad_steps_in_a_row_stop_with_the_step_and_the_terms_and_keep_the_checkpoint(make_cfg, tmp_path):
    from train_seg.engine.loop import NonFiniteLossError
    from train_seg.engine.trainer import fit

    run = _prepared(make_cfg, tmp_path, "trainer.max_bad_steps=3", "loss=ce_dice")
    run.criterion = NaNAtSteps(run.criterion, {6, 7, 8})  # epoch 2's steps 2-4
    with pytest.raises(NonFiniteLossError) as info:
        fit(run)
    message = str(info.value)
    assert message.startswith("step 8: 3 optimizer steps in a row") and "ce=" in message and "dice=" in message
    assert "lower optimizer.lr" in message
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    # the last checkpoint before the bad steps (step 5, one batch into epoch 2), none written during them
    assert state["global_step"] == 5 and state["progress"]["batches"] == 1
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "failed"


@pytest.mark.slow
def test_cli_non_finite_stop_is_one_paragraph_exit_1(tmp_path):
    result = _train(tmp_path / "run", tmp_path / "cache", "optimizer.lr=1e30", "trainer.max_bad_steps=2",
                    "trainer.precision=32")
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert "in a row had a non-finite loss or gradient" in result.stderr


class _Checkpoints:
    """A sink that records the mid-epoch checkpoints it is told of: (epoch, step, reason, batches)."""

    def __init__(self):
        self.seen = []

    def __getattr__(self, name):
        if name.startswith("on_"):
            return lambda event: None
        raise AttributeError(name)

    def on_checkpoint(self, checkpoint):
        self.seen.append((checkpoint.epoch, checkpoint.step, checkpoint.reason, checkpoint.progress.batches))


@pytest.mark.parametrize("overrides, expected", [
    (["trainer.checkpoint_every_n_steps=3", "trainer.checkpoint_every_minutes=null"],
     [(0, 3, "steps", 3), (1, 6, "steps", 2)]),
    (["trainer.checkpoint_every_minutes=1e-9"],  # due after every step but each epoch's last
     [(0, 1, "minutes", 1), (0, 2, "minutes", 2), (0, 3, "minutes", 3),
      (1, 5, "minutes", 1), (1, 6, "minutes", 2), (1, 7, "minutes", 3)]),
    (["trainer.checkpoint_every_minutes=null"], []),
], ids=["every_3_steps", "every_minute", "epoch_ends_only"])
def test_mid_epoch_checkpoints_come_when_due_and_never_at_an_epochs_last_step(make_cfg, tmp_path, overrides, expected):
    from train_seg.engine.trainer import fit, prepare

    run = prepare(make_cfg("model=tiny", "trainer.max_epochs=2", "trainer.num_threads=1", "logger.tensorboard=null", *overrides),
                  tmp_path / "run")
    probe = _Checkpoints()
    fit(run, [probe, *run.sinks])
    assert probe.seen == expected
