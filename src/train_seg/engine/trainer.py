"""``train(cfg)``: wires the stages (config -> data + class statistics -> class weights -> model -> loss ->
loop -> events -> sinks) and runs them. Everything that can fail on bad input is done in ``prepare`` before the
first training step, so a bad config or dataset never costs a training run. ``fit`` is the loop: it trains,
evaluates, keeps the loop state (step, best, history) and hands every result to the sinks (``train_seg.reporting.events``).
"""
from __future__ import annotations

import logging
import math
import random
import signal
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from train_seg import distributed

from train_seg.engine import builder as build

from train_seg.engine import runtime as perf

from train_seg.reporting import record
from train_seg.checkpoint import (CheckpointError, capture_rng_state, find_checkpoint, read_checkpoint,
                                  restore_rng_state)
from train_seg.config.naming import current_job_context
from train_seg.config.validation import resolve_device, resolve_precision, validate_config
from train_seg.engine.loop import EpochProgress, LoopSettings, train_one_epoch
from train_seg.evaluation.loop import evaluate
from train_seg.evaluation.objects import object_counter
from train_seg.reporting.events import Checkpoint, EpochEnd, EvalResult, Sink, TrainLog
from train_seg.engine.signals import RunInterrupted, StopRequest
from train_seg.engine.state import Run

log = logging.getLogger("train_seg")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def loop_settings(trainer, device: torch.device) -> LoopSettings:
    """The loop's settings from the ``trainer`` config node (validated by ``validate_config``) on ``device``: the
    one place where ``trainer.precision`` is resolved (``resolve_precision``)."""
    return LoopSettings(
        device=device, amp_dtype=resolve_precision(trainer.precision, device),
        channels_last=bool(trainer.channels_last), aux_weight=float(trainer.aux_weight),
        grad_clip=None if trainer.grad_clip is None else float(trainer.grad_clip),
        log_every=int(trainer.log_every), progress=bool(trainer.progress), max_bad_steps=int(trainer.max_bad_steps),
    )


def prepare(cfg, run_dir: str | Path, device: torch.device | None = None) -> Run:
    """Validates the config, resolves the device (``trainer.device``, unless the caller resolved it: ``device``)
    and precision once, and builds every object (``builder.build_run``); resumes when asked. Raises a ValueError
    subclass with a one-paragraph message on bad input; writes nothing but the class-statistics cache."""
    validate_config(cfg)
    trainer = cfg.trainer
    run_dir = Path(distributed.broadcast_object(str(run_dir)))  # rank 0's (other ranks' Hydra made none)
    in_place = distributed.broadcast_object(_resume_in_place(trainer, Path(run_dir)))  # rank 0 decides for all
    if in_place is None:
        record.refuse_existing(run_dir, ("last.pt", "best.pt", record.FILENAME), "an earlier run",
                               "Leave hydra.run.dir at its default (a new timestamped directory), choose a new one, or "
                               f"continue that run with trainer.resume={run_dir} (the resumed run writes into a new "
                               "directory).")
    settings = loop_settings(trainer, distributed.local_device(device or resolve_device(trainer.device)))
    perf.apply_backend_settings(settings.device, bool(trainer.cudnn_benchmark))
    seed_everything(int(cfg.seed))
    run = build.build_run(cfg, run_dir, settings, current_job_context(run_dir))
    if in_place is not None:
        _resume(run, in_place)
        run.completed = record.read(run.run_dir).status == "completed"
    elif trainer.resume is not None and trainer.resume != "auto":
        _resume(run, find_checkpoint(trainer.resume, prefer="last", option="trainer.resume"))
    _agree_on_step(run)
    return run


def _agree_on_step(run: Run) -> None:
    """Under torch.distributed: every rank starts from the same step (the same checkpoint), else CheckpointError."""
    steps = distributed.all_gather_object((run.global_step, run.progress.batches if run.progress else 0))
    if len(set(steps)) > 1:
        raise CheckpointError(
            f"the ranks would resume from different points (step, batches into the epoch, by rank: {steps}): they read "
            "different checkpoint files. Put the run directory on a file system every node sees, or resume every "
            "rank from one file with trainer.resume=<path>.")


def _resume_in_place(trainer, run_dir: Path) -> Path | None:
    """``trainer.resume=auto``: the run directory's own last.pt, if it has one (None: start fresh)."""
    if trainer.resume != "auto":
        return None
    last = run_dir / "last.pt"
    if last.exists():
        log.info("trainer.resume=auto: continuing %s from its last.pt", run_dir)
        return last
    log.info("trainer.resume=auto: %s has no last.pt, starting a new run there", run_dir)
    return None




def _resume(run: Run, path: Path) -> None:
    state = read_checkpoint(path, map_location="cpu")
    if list(state.get("class_names", [])) != run.class_names:
        raise CheckpointError(
            f"trainer.resume={path}: the checkpoint was trained on classes {state.get('class_names')}, but this run's "
            f"dataset has {run.class_names}. Resume with the same dataset config."
        )
    try:
        run.model.load_state_dict(state["model"])
    except RuntimeError as exc:
        arch = state.get("config", {}).get("model", {}).get("arch")
        raise CheckpointError(
            f"trainer.resume={path}: its weights do not fit this model (checkpoint arch {arch}, this run "
            f"{run.config['model']['arch']}). Use the same model config.\n{str(exc).splitlines()[0]}"
        ) from exc
    run.optimizer.load_state_dict(state["optimizer"])
    if run.scheduler is not None and state.get("scheduler") is not None:
        run.scheduler.load_state_dict(state["scheduler"])
    if state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    run.start_epoch = int(state["epoch"])
    run.global_step = int(state["global_step"])
    run.bad_streak = int(state.get("bad_streak", 0))
    if state.get("progress") is not None:
        run.progress = EpochProgress.from_dict(state["progress"])
    run.best = dict(state.get("best") or {})
    run.history = list(state.get("history") or [])
    restore_rng_state(_own_rng_state(state, path))
    position = f", {run.progress.batches} batches into epoch {run.start_epoch + 1}" if run.progress else ""
    log.info("resumed from %s at epoch %d, step %d%s", path, run.start_epoch, run.global_step, position)


def _own_rng_state(state: dict, path: Path) -> dict:
    """This rank's random state in a checkpoint: ``rng_ranks[rank]`` when it was written by as many ranks as run
    now (a bit-exact resume), else rank 0's ``rng`` (with a warning when the number of ranks changed)."""
    ranks, world = state.get("rng_ranks"), distributed.world_size()
    if ranks is not None and len(ranks) == world:
        return ranks[distributed.rank()]
    if (len(ranks) if ranks is not None else 1) != world:
        log.warning("%s was written by %d rank(s) and this run has %d: every rank restores rank 0's random state, so "
                    "random draws (dropout) differ from an uninterrupted run", path,
                    len(ranks) if ranks is not None else 1, world)
    return state["rng"]


def _is_better(value: float, best: float | None) -> bool:
    return not math.isnan(value) and (best is None or value > best)


def _emit(sinks: Sequence[Sink], hook: str, event) -> None:
    for sink in sinks:
        getattr(sink, hook)(event)


def _emit_checkpoint(run: Run, sinks: Sequence[Sink], hook: str, event) -> None:
    """An event after which the sinks write a checkpoint: every rank's random state is gathered first (a
    collective: every rank emits it), so that each rank resumes its own (``Run.checkpoint_state``)."""
    run.rank_rng = distributed.all_gather_object(capture_rng_state())
    try:
        _emit(sinks, hook, event)
    finally:
        run.rank_rng = None


def _fail(sinks: Sequence[Sink], error: BaseException) -> None:
    """Every sink hears of the failure, even if another one fails while recording it."""
    for sink in sinks:
        try:
            sink.on_failure(error)
        except Exception:
            log.exception("a sink failed while recording the run's failure")


def fit(run: Run, sinks: Sequence[Sink] | None = None) -> Run:
    """The training loop: trains epoch by epoch, evaluates every ``trainer.eval_every`` epochs (and after the
    last), keeps the best ``optimized_metric`` and the history, and hands every event to the sinks (``run.sinks``
    unless given). Mid-epoch checkpoints (``trainer.checkpoint_every_*``) and SIGTERM / SIGINT go through
    ``_StepHook``; a resumed run continues its partly done epoch. An Optuna trial (``run.trial``) reports each
    evaluation but the last and stops with ``search.study.TrialPruned`` when its pruner says so (after the epoch's
    checkpoint). Returns the run (``best``, ``history`` final)."""
    sinks = list(run.sinks if sinks is None else sinks)
    trainer, metric = run.config["trainer"], run.config["optimized_metric"]
    max_epochs, max_steps = int(trainer["max_epochs"]), trainer["max_steps"]
    epoch = run.start_epoch
    if run.completed:
        log.info("%s holds a completed run: nothing to do", run.run_dir)
        return run
    with StopRequest() as stop:
        hook = _StepHook(run, sinks, stop)
        try:
            _emit(sinks, "on_train_start", run)
            while epoch < max_epochs and (max_steps is None or run.global_step < max_steps):
                progress, tic = _start_epoch(run, epoch), time.perf_counter()
                run.global_step, loss = train_one_epoch(
                    run.train_model, run.criterion, run.optimizer, run.scheduler, run.scaler, run.train_loader,
                    run.settings, epoch=epoch, global_step=run.global_step, max_steps=max_steps, progress=progress,
                    on_log=lambda scalars, step: _emit(sinks, "on_train_log", TrainLog(epoch, step, scalars)),
                    on_step=lambda done, step: hook(epoch, done, step))
                entry = {"epoch": epoch + 1, "step": run.global_step, "train/loss": loss,
                         "train/skipped_steps": progress.skipped, "train/seconds": time.perf_counter() - tic}
                last = epoch + 1 >= max_epochs or (max_steps is not None and run.global_step >= max_steps)
                result, improved = None, False
                if (epoch + 1) % int(trainer["eval_every"]) == 0 or last:
                    result = _evaluate(run, epoch + 1, stop)
                    hook.stop_if_asked(epoch, progress, run.global_step)  # evaluation cut short: redone on resume
                    _emit(sinks, "on_eval", result)
                    entry.update({k: v for k, v in result.scalars.items() if not math.isnan(v)})
                    improved = _is_better(result.scalars.get(metric, math.nan), run.best.get("value"))
                    if improved:
                        run.best = {"metric": metric, "value": result.scalars[metric], **result.entry()}
                epoch, run.bad_streak = epoch + 1, progress.bad_streak
                run.history.append(entry)
                _emit_checkpoint(run, sinks, "on_epoch_end",
                                 EpochEnd(epoch, run.global_step, loss, entry, result, improved, run.best))
                hook.epoch_ended(epoch, result, last)
        except BaseException as exc:
            _fail(sinks, exc)
            raise
    _emit(sinks, "on_train_end", run)
    return run


def _start_epoch(run: Run, epoch: int) -> EpochProgress:
    """Per-epoch reseeding: the epoch's sample order and every sample's augmentation seed depend on (seed, epoch)
    only (``train_seg.data.order``); a resumed, partly done epoch starts after its consumed batches."""
    seed = int(run.config["seed"])
    run.generator.manual_seed(seed * 100_003 + epoch)  # the DataLoader's worker base seed
    run.train_loader.sampler.set_epoch(epoch)
    progress, run.progress = run.progress or EpochProgress(bad_streak=run.bad_streak), None
    run.train_loader.sampler.start_at(progress.batches * int(run.config["trainer"]["batch_size"]))
    return progress


class _StepHook:
    """Runs after every training step: writes a mid-epoch checkpoint when one is due (every N steps, every M
    minutes, or a stop signal), and after a signal's checkpoint raises ``RunInterrupted``."""

    def __init__(self, run: Run, sinks: Sequence[Sink], stop: StopRequest):
        trainer = run.config["trainer"]
        self.run, self.sinks, self.stop = run, sinks, stop
        self.every_steps = trainer["checkpoint_every_n_steps"]
        minutes = trainer["checkpoint_every_minutes"]
        self.every_seconds = None if minutes is None else 60.0 * float(minutes)
        self.last_save = time.monotonic()

    def __call__(self, epoch: int, progress: EpochProgress, step: int) -> None:
        self.run.global_step = step
        if self.asked():
            self.stop_if_asked(epoch, progress, step)
        elif progress.bad_streak:
            return  # no checkpoint in a run of non-finite steps: the last one before it is the good one
        elif self.every_steps is not None and step % int(self.every_steps) == 0:
            self._save(epoch, progress, step, "steps")
        elif self.every_seconds is not None and time.monotonic() - self.last_save >= self.every_seconds:
            self._save(epoch, progress, step, "minutes")

    def _save(self, epoch: int, progress: EpochProgress, step: int, reason: str) -> None:
        _emit_checkpoint(self.run, self.sinks, "on_checkpoint", Checkpoint(epoch, step, progress, reason))
        self.saved()

    def saved(self) -> None:
        self.last_save = time.monotonic()

    def epoch_ended(self, epoch: int, result: EvalResult | None, last: bool) -> None:
        """After an epoch's checkpoint: a stop signal ends the run here (``RunInterrupted``); an Optuna trial reports
        the evaluation (all but the last) and its pruner may stop it (``search.study.TrialPruned``)."""
        self.saved()
        self.stop_if_asked(epoch, None, self.run.global_step)
        trial = self.run.trial
        if trial is not None and result is not None and not last:
            trial.check(result.scalars.get(self.run.config["optimized_metric"], math.nan), epoch)

    def stop_if_asked(self, epoch: int, progress: EpochProgress | None, step: int) -> None:
        """After a stop signal: checkpoint (mid-epoch, unless ``progress`` is None: the epoch end just wrote one)
        and raise ``RunInterrupted``."""
        if not self.asked():
            return
        if progress is not None:
            self._save(epoch, progress, step, "signal")
        signum = self.stop.signum or signal.SIGTERM  # under torchrun: the signal another rank received
        raise RunInterrupted(signum, epoch + (progress is None), step, self.run.run_dir / "last.pt")

    def asked(self) -> bool:
        """A stop signal reached this process, or (under torch.distributed) any rank: all stop at the same step."""
        return distributed.any_rank(self.stop())


def eval_inference(trainer: dict, settings: LoopSettings):
    """``infer(model, images)`` for ``engine.evaluate`` from the ``trainer.eval_*`` keys; None = the plain forward
    pass (the default: whole image, no test-time augmentation)."""
    from train_seg.evaluation.inference import InferenceSettings

    inference = InferenceSettings.from_mapping(trainer, prefix="eval_")
    if inference.plain:
        return None
    from functools import partial

    from train_seg.evaluation.inference import infer_logits

    return partial(infer_logits, device=settings.device, amp_dtype=settings.amp_dtype,
                   channels_last=settings.channels_last, batch_size=int(trainer["val_batch_size"]),
                   **inference.kwargs())


def _evaluate(run: Run, epoch: int, stop=None) -> EvalResult:
    distributed.broadcast_buffers_(run.model)  # every rank evaluates the checkpoint's BatchNorm statistics
    objects = object_counter(run.config.get("metrics"), run.rare, int(run.config["dataset"]["ignore_index"]))
    confusion = evaluate(run.model, run.val_loader, len(run.class_names), run.settings, desc=f"eval {epoch}",
                         infer=eval_inference(run.config["trainer"], run.settings), stop=stop, objects=objects)
    return EvalResult(epoch, run.global_step, confusion.matrix.cpu(), run.class_names, run.pixel_share, run.rare,
                      objects)


def train(cfg, run_dir: str | Path) -> dict:
    """prepare + fit: the whole application on a composed config; returns the run's metrics.json record."""
    fit(prepare(cfg, run_dir))
    return record.read(run_dir).to_dict()
