"""``train(cfg)``: wires the stages (config -> data + class statistics -> class weights -> model -> loss ->
loop -> events -> sinks) and runs them. Everything that can fail on bad input is done in ``prepare`` before the
first training step, so a bad config or dataset never costs a training run. ``fit`` is the loop: it trains,
evaluates, keeps the loop state (step, best, history) and hands every result to the sinks (``train_seg.events``).
"""
from __future__ import annotations

import logging
import math
import random
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from omegaconf import OmegaConf

from train_seg import build, record
from train_seg.checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint, restore_rng_state
from train_seg.config import ConfigError, resolve_device, resolve_precision, validate_config
from train_seg.data.base import SegmentationDataset
from train_seg.data.class_stats import compute_class_stats
from train_seg.engine import LoopSettings, evaluate, train_one_epoch
from train_seg.events import EpochEnd, EvalResult, Sink, TrainLog
from train_seg.state import Run
from train_seg.weighting import class_weights as compute_class_weights

log = logging.getLogger("train_seg")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def loop_settings(trainer, device: torch.device) -> LoopSettings:
    """The loop's settings from the ``trainer`` config node (validated by ``validate_config``)."""
    return LoopSettings(
        device=device, amp_dtype=resolve_precision(trainer.precision, device),
        channels_last=bool(trainer.channels_last), aux_weight=float(trainer.aux_weight),
        grad_clip=None if trainer.grad_clip is None else float(trainer.grad_clip),
        log_every=int(trainer.log_every), progress=bool(trainer.progress),
    )


def prepare(cfg, run_dir: str | Path) -> Run:
    """Validates the config and builds every object. Raises a ValueError subclass with a one-paragraph message
    on bad input; writes nothing but the class-statistics cache."""
    validate_config(cfg)
    _refuse_existing_run(Path(run_dir))
    trainer = cfg.trainer
    if trainer.num_threads is not None:
        torch.set_num_threads(int(trainer.num_threads))
    settings = loop_settings(trainer, resolve_device(trainer.device))
    seed = int(cfg.seed)
    seed_everything(seed)

    sources = {split: build.build_source(cfg.dataset, split) for split in ("train", "val")}
    for source in sources.values():
        source.validate()
    progress = bool(trainer.progress)
    stats = compute_class_stats(sources["train"], cache_dir=cfg.paths.cache_dir, progress=progress)
    # the val pass reads every val mask once too: bad label values fail here, before training
    val_stats = compute_class_stats(sources["val"], cache_dir=cfg.paths.cache_dir, progress=progress)
    weights = compute_class_weights(stats, **OmegaConf.to_container(cfg.weighting, resolve=True))
    class_names = list(sources["train"].class_names)

    model = build.build_model(cfg.model, num_classes=len(class_names))
    model.to(settings.device, memory_format=settings.memory_format)
    criterion = build.build_criterion(cfg.loss, weights).to(settings.device)
    train_set = SegmentationDataset(sources["train"], build.build_transform(cfg.dataset, "train", seed))
    val_set = SegmentationDataset(sources["val"], build.build_transform(cfg.dataset, "val", seed))
    sampler = build.build_sampler(cfg.sampler, stats.presence, seed)
    generator = torch.Generator().manual_seed(seed)
    train_loader, val_loader = build.build_loaders(trainer, train_set, val_set, sampler, settings.device, generator)
    total_steps = _total_steps(trainer, len(train_loader), len(train_set))
    optimizer = build.build_optimizer(cfg.optimizer, model)
    run = Run(
        config=OmegaConf.to_container(cfg, resolve=True), run_dir=Path(run_dir), settings=settings,
        class_names=class_names, palette=[list(map(int, c)) for c in sources["train"].palette], stats=stats,
        val_stats=val_stats, weights=weights, rare=torch.as_tensor(stats.pixel_share < float(cfg.rare_share)),
        model=model, criterion=criterion, optimizer=optimizer,
        scheduler=build.build_scheduler(cfg.scheduler, optimizer, total_steps),
        scaler=torch.amp.GradScaler(settings.device.type, enabled=settings.amp_dtype == torch.float16),
        train_set=train_set, val_set=val_set, train_loader=train_loader, val_loader=val_loader, sampler=sampler,
        generator=generator, total_steps=total_steps, sinks=build.build_sinks(cfg.get("logger")),
    )
    if trainer.resume is not None:
        _resume(run, resolve_checkpoint(trainer.resume))
    return run


def _total_steps(trainer, epoch_steps: int, num_images: int) -> int:
    if epoch_steps == 0:
        raise ConfigError(
            f"trainer.batch_size={trainer.batch_size} is larger than the training split ({num_images} images), "
            "and incomplete batches are dropped: lower the batch size."
        )
    total = int(trainer.max_epochs) * epoch_steps
    return min(total, int(trainer.max_steps)) if trainer.max_steps is not None else total


def _refuse_existing_run(run_dir: Path) -> None:
    """A run directory that already holds a run's results is never written into (its checkpoints would be lost)."""
    taken = [name for name in ("last.pt", "best.pt", record.FILENAME) if (run_dir / name).exists()]
    if taken:
        raise ConfigError(
            f"the run directory {run_dir} already holds an earlier run ({', '.join(taken)}), which this run would "
            "overwrite. Leave hydra.run.dir at its default (a new timestamped directory), choose a new one, or continue "
            f"that run with trainer.resume={run_dir} (the resumed run writes into a new directory)."
        )


def _resume(run: Run, path: Path) -> None:
    state = load_checkpoint(path, map_location="cpu")
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
    run.best = dict(state.get("best") or {})
    run.history = list(state.get("history") or [])
    restore_rng_state(state["rng"])
    log.info("resumed from %s at epoch %d, step %d", path, run.start_epoch, run.global_step)


def _is_better(value: float, best: float | None) -> bool:
    return not math.isnan(value) and (best is None or value > best)


def _emit(sinks: Sequence[Sink], hook: str, event) -> None:
    for sink in sinks:
        getattr(sink, hook)(event)


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
    unless given). Returns the run, whose ``best`` and ``history`` are final."""
    sinks = list(run.sinks if sinks is None else sinks)
    trainer, seed, metric = run.config["trainer"], int(run.config["seed"]), run.config["optimized_metric"]
    max_epochs, max_steps = int(trainer["max_epochs"]), trainer["max_steps"]
    epoch = run.start_epoch
    try:
        _emit(sinks, "on_train_start", run)
        while epoch < max_epochs and (max_steps is None or run.global_step < max_steps):
            _reseed_epoch(run, seed, epoch)
            tic = time.perf_counter()
            run.global_step, loss = train_one_epoch(
                run.model, run.criterion, run.optimizer, run.scheduler, run.scaler, run.train_loader, run.settings,
                epoch=epoch, global_step=run.global_step, max_steps=max_steps,
                on_log=lambda scalars, step: _emit(sinks, "on_train_log", TrainLog(epoch, step, scalars)))
            epoch += 1
            _check_finite(loss, epoch)
            entry = {"epoch": epoch, "step": run.global_step, "train/loss": loss, "train/seconds": time.perf_counter() - tic}
            last = epoch >= max_epochs or (max_steps is not None and run.global_step >= max_steps)
            result, improved = None, False
            if epoch % int(trainer["eval_every"]) == 0 or last:
                result = _evaluate(run, epoch)
                _emit(sinks, "on_eval", result)
                entry.update({k: v for k, v in result.scalars.items() if not math.isnan(v)})
                improved = _is_better(result.scalars.get(metric, math.nan), run.best.get("value"))
                if improved:
                    run.best = {"metric": metric, "value": result.scalars[metric], **result.entry()}
            run.history.append(entry)
            _emit(sinks, "on_epoch_end", EpochEnd(epoch, run.global_step, loss, entry, result, improved, run.best))
    except BaseException as exc:
        _fail(sinks, exc)
        raise
    _emit(sinks, "on_train_end", run)
    return run


def _reseed_epoch(run: Run, seed: int, epoch: int) -> None:
    """Per-epoch reseeding: shuffling, worker seeds, the repeat-factor sampler and the in-process augmentation all
    depend on (seed, epoch) only, so a resumed run replays exactly the epochs it had not done."""
    run.generator.manual_seed(seed * 100_003 + epoch)
    if run.sampler is not None and hasattr(run.sampler, "set_epoch"):
        run.sampler.set_epoch(epoch)
    run.train_set.reseed(seed * 100_003 + epoch)


def _check_finite(mean_loss: float, epoch: int) -> None:
    if not math.isfinite(mean_loss):
        raise FloatingPointError(
            f"epoch {epoch}: the mean training loss is {mean_loss}; lower optimizer.lr, set trainer.grad_clip, "
            "or use trainer.precision=32. The last good checkpoint is untouched."
        )


def eval_inference(trainer: dict, settings: LoopSettings):
    """``infer(model, images)`` for ``engine.evaluate`` from the ``trainer.eval_*`` keys; None = the plain forward
    pass (the default: whole image, no test-time augmentation)."""
    scales = tuple(float(s) for s in trainer["eval_scales"])
    if trainer["eval_mode"] == "whole" and not trainer["eval_flip"] and scales == (1.0,):
        return None
    from functools import partial

    from train_seg.inference import infer_logits

    return partial(infer_logits, device=settings.device, amp_dtype=settings.amp_dtype,
                   channels_last=settings.channels_last, mode=trainer["eval_mode"], window=int(trainer["eval_window"]),
                   overlap=float(trainer["eval_overlap"]), blend=trainer["eval_blend"], flip=bool(trainer["eval_flip"]),
                   scales=scales, batch_size=int(trainer["val_batch_size"]))


def _evaluate(run: Run, epoch: int) -> EvalResult:
    confusion = evaluate(run.model, run.val_loader, len(run.class_names), run.settings, desc=f"eval {epoch}",
                         infer=eval_inference(run.config["trainer"], run.settings))
    return EvalResult(epoch, run.global_step, confusion.matrix.cpu(), run.class_names, run.pixel_share, run.rare)


def train(cfg, run_dir: str | Path) -> dict:
    """prepare + fit: the whole application on a composed config; returns the run's metrics.json record."""
    fit(prepare(cfg, run_dir))
    return record.read(run_dir).to_dict()
