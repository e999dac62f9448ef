"""``train(cfg)``: wires the stages (config -> data + class statistics -> class weights -> model -> loss ->
loop -> confusion matrix -> metrics -> loggers) and runs them. Everything that can fail on bad input is done in
``prepare`` before the first training step, so a bad config or dataset never costs a training run.
"""
from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from train_seg import build
from train_seg.checkpoint import (
    CheckpointError,
    capture_rng_state,
    load_checkpoint,
    resolve_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from train_seg.config import ConfigError, resolve_device, resolve_precision, validate_config
from train_seg.data.base import SegmentationDataset
from train_seg.data.stats import ClassStats, compute_class_stats
from train_seg.engine import evaluate, train_one_epoch
from train_seg.loggers import (
    TensorBoardLogger,
    describe_error,
    eval_scalars,
    format_class_table,
    hparam_metric_tags,
    hparams_from_config,
    per_class_records,
    write_json_atomic,
)
from train_seg.visualize import OverlaySet, confusion_figure, select_overlay_indices
from train_seg.weighting import class_weights as compute_class_weights
from train_seg.weighting import format_weight_table

log = logging.getLogger("train_seg")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class Run:
    """Everything ``prepare`` builds; ``fit`` consumes it."""

    cfg: Any
    run_dir: Path
    device: torch.device
    amp_dtype: torch.dtype | None
    class_names: list[str]
    palette: list
    stats: ClassStats
    val_stats: ClassStats
    weights: torch.Tensor
    rare: torch.Tensor
    model: torch.nn.Module
    criterion: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    train_set: SegmentationDataset
    val_set: SegmentationDataset
    train_loader: Any
    val_loader: Any
    sampler: Any
    generator: torch.Generator
    total_steps: int
    start_epoch: int = 0
    global_step: int = 0
    best: dict = field(default_factory=dict)
    history: list = field(default_factory=list)


def prepare(cfg, run_dir: str | Path) -> Run:
    """Validates the config and builds every object. Raises a ValueError subclass with a one-paragraph message
    on bad input; writes nothing but the class-statistics cache."""
    validate_config(cfg)
    _refuse_existing_run(Path(run_dir))
    trainer = cfg.trainer
    if trainer.num_threads is not None:
        torch.set_num_threads(int(trainer.num_threads))
    device = resolve_device(trainer.device)
    amp_dtype = resolve_precision(trainer.precision, device)
    seed_everything(int(cfg.seed))

    sources = {split: build.build_source(cfg.dataset, split) for split in ("train", "val")}
    for source in sources.values():
        source.validate()
    train_source = sources["train"]
    class_names = list(train_source.class_names)
    progress = bool(trainer.progress)
    stats = compute_class_stats(train_source, cache_dir=cfg.paths.cache_dir, progress=progress)
    # the val pass reads every val mask once too: bad label values fail here, before training
    val_stats = compute_class_stats(sources["val"], cache_dir=cfg.paths.cache_dir, progress=progress)
    weights = compute_class_weights(stats, **OmegaConf.to_container(cfg.weighting, resolve=True))
    rare = torch.as_tensor(stats.pixel_share < float(cfg.rare_share))

    model = build.build_model(cfg.model, num_classes=len(class_names))
    channels_last = bool(cfg.model.channels_last)
    model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    criterion = build.build_criterion(cfg.loss, weights).to(device)

    seed = int(cfg.seed)
    train_set = SegmentationDataset(train_source, build.build_transform(cfg.dataset, "train", seed))
    val_set = SegmentationDataset(sources["val"], build.build_transform(cfg.dataset, "val", seed))
    sampler = build.build_sampler(cfg.sampler, stats.presence, seed)
    generator = torch.Generator().manual_seed(seed)
    train_loader, val_loader = build.build_loaders(trainer, train_set, val_set, sampler, device, generator)
    if len(train_loader) == 0:
        raise ConfigError(
            f"trainer.batch_size={trainer.batch_size} is larger than the training split ({len(train_set)} images), "
            "and incomplete batches are dropped: lower the batch size."
        )
    epoch_steps = len(train_loader)
    total_steps = int(trainer.max_epochs) * epoch_steps
    if trainer.max_steps is not None:
        total_steps = min(total_steps, int(trainer.max_steps))

    optimizer = build.build_optimizer(cfg.optimizer, model)
    scheduler = build.build_scheduler(cfg.scheduler, optimizer, total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    run = Run(
        cfg=cfg, run_dir=Path(run_dir), device=device, amp_dtype=amp_dtype, class_names=class_names,
        palette=[list(map(int, c)) for c in train_source.palette], stats=stats, val_stats=val_stats,
        weights=weights, rare=rare, model=model, criterion=criterion, optimizer=optimizer, scheduler=scheduler,
        scaler=scaler, train_set=train_set, val_set=val_set, train_loader=train_loader, val_loader=val_loader,
        sampler=sampler, generator=generator, total_steps=total_steps,
    )
    if trainer.resume is not None:
        _resume(run, resolve_checkpoint(trainer.resume))
    return run


def _refuse_existing_run(run_dir: Path) -> None:
    """A run directory that already holds a run's results is never written into (its checkpoints would be lost)."""
    taken = [name for name in ("last.pt", "best.pt", "metrics.json") if (run_dir / name).exists()]
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
            f"{run.cfg.model.arch}). Use the same model config.\n{str(exc).splitlines()[0]}"
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


def _checkpoint_state(run: Run, epoch: int) -> dict:
    return {
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict() if run.scheduler is not None else None,
        "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else None,
        "epoch": epoch,
        "global_step": run.global_step,
        "rng": capture_rng_state(),
        "config": OmegaConf.to_container(run.cfg, resolve=True),
        "class_names": run.class_names,
        "palette": run.palette,
        "class_weights": run.weights.cpu(),
        "best": run.best,
        "history": run.history,
    }


def _is_better(value: float, best: float | None) -> bool:
    return not math.isnan(value) and (best is None or value > best)


def _metrics_payload(run: Run, status: str, final: dict | None, error: str | None = None) -> dict:
    cfg = run.cfg
    return {
        "status": status,  # running (written after every epoch) | completed | failed | interrupted
        "error": error,  # "<ExceptionType>: <message>" when failed
        "optimized_metric": cfg.optimized_metric,
        "class_names": run.class_names,
        "class_stats": {"train": run.stats.to_dict(include_presence=False),
                        "val": run.val_stats.to_dict(include_presence=False)},
        "class_weights": {name: float(w) for name, w in zip(run.class_names, run.weights.tolist())},
        "weighting": OmegaConf.to_container(cfg.weighting, resolve=True),
        "rare_share": float(cfg.rare_share),
        "rare_classes": [n for n, r in zip(run.class_names, run.rare.tolist()) if r],
        "final": final,
        "best": run.best or None,
        "history": run.history,
    }


def fit(run: Run, tb: TensorBoardLogger | None = None) -> dict:
    """Runs the training loop; returns the metrics.json payload."""
    cfg, trainer = run.cfg, run.cfg.trainer
    run.run_dir.mkdir(parents=True, exist_ok=True)
    tb = tb or TensorBoardLogger(run.run_dir, enabled=bool(cfg.logger.tensorboard), flush_secs=int(cfg.logger.flush_secs))
    share = run.stats.pixel_share.tolist()
    weight_table = format_weight_table(run.class_names, run.stats, run.weights)
    log.info("class weights (weighting=%s):\n%s", cfg.weighting.scheme, weight_table)
    tb.log_text("class_weights", weight_table, run.global_step)
    tb.log_text("config", OmegaConf.to_yaml(cfg, resolve=True), run.global_step)
    rare_names = [n for n, r in zip(run.class_names, run.rare.tolist()) if r]
    tb.log_layout(run.class_names, rare_names)
    tb.log_hparams(hparams_from_config(OmegaConf.to_container(cfg, resolve=True), list(cfg.logger.hparams)),
                   hparam_metric_tags(run.class_names, cfg.optimized_metric))
    overlays = None
    if tb.enabled and int(cfg.logger.num_overlays) > 0:
        picks = select_overlay_indices(run.val_stats.presence, share, int(cfg.logger.num_overlays))
        overlays = OverlaySet(run.val_set, picks, run.class_names, run.palette, run.val_set.source.ignore_index)

    max_epochs = int(trainer.max_epochs)
    max_steps = int(trainer.max_steps) if trainer.max_steps is not None else None
    seed = int(cfg.seed)
    final = None
    epoch = run.start_epoch
    log.info(
        "training %s on %s (%s) for %d epochs / %d steps, %d train and %d val images",
        cfg.model.arch, run.device, {None: "fp32"}.get(run.amp_dtype, str(run.amp_dtype).replace("torch.", "")),
        max_epochs, run.total_steps,
        len(run.train_set), len(run.val_set),
    )
    try:
        while epoch < max_epochs and (max_steps is None or run.global_step < max_steps):
            # per-epoch reseeding: shuffling, worker seeds, the repeat-factor sampler and the in-process augmentation
            # all depend on (seed, epoch) only, so a resumed run replays exactly the epochs it had not done
            run.generator.manual_seed(seed * 100_003 + epoch)
            if run.sampler is not None and hasattr(run.sampler, "set_epoch"):
                run.sampler.set_epoch(epoch)
            run.train_set.reseed(seed * 100_003 + epoch)
            tic = time.perf_counter()
            run.global_step, mean_loss = train_one_epoch(
                run.model, run.criterion, run.optimizer, run.scheduler, run.scaler, run.train_loader, run.device,
                epoch=epoch, global_step=run.global_step, amp_dtype=run.amp_dtype, aux_weight=float(cfg.model.aux_weight),
                grad_clip=trainer.grad_clip, max_steps=max_steps, channels_last=bool(cfg.model.channels_last),
                log_every=int(trainer.log_every), log_scalars=tb.log_scalars, progress=bool(trainer.progress),
            )
            epoch += 1
            if not math.isfinite(mean_loss):
                raise FloatingPointError(
                    f"epoch {epoch}: the mean training loss is {mean_loss}; lower optimizer.lr, set trainer.grad_clip, "
                    "or use trainer.precision=32. The last good checkpoint is untouched."
                )
            improved = False
            record = {"epoch": epoch, "step": run.global_step, "train/loss": mean_loss,
                      "train/seconds": time.perf_counter() - tic}
            last_epoch = epoch >= max_epochs or (max_steps is not None and run.global_step >= max_steps)
            if epoch % int(trainer.eval_every) == 0 or last_epoch:
                confusion = evaluate(
                    run.model, run.val_loader, run.device, len(run.class_names), amp_dtype=run.amp_dtype,
                    channels_last=bool(cfg.model.channels_last), progress=bool(trainer.progress), desc=f"eval {epoch}",
                )
                metrics = confusion.compute(rare=run.rare)
                scalars = eval_scalars(metrics, run.class_names)
                tb.log_scalars(scalars, run.global_step)
                table = format_class_table(metrics, run.class_names, share, rare=run.rare)
                log.info("epoch %d, step %d, train loss %.4f\n%s", epoch, run.global_step, mean_loss, table)
                record.update({k: v for k, v in scalars.items() if not math.isnan(v)})
                final = {"epoch": epoch, "step": run.global_step,
                         **{k: (None if math.isnan(v) else v) for k, v in scalars.items()},
                         "per_class": per_class_records(metrics, run.class_names, share)}
                value = scalars.get(cfg.optimized_metric, math.nan)
                run.history.append(record)
                improved = _is_better(value, run.best.get("value"))
                if improved:
                    run.best = {"metric": cfg.optimized_metric, "value": value, **final}
                tb.log_best(run.best, run.global_step)
                if tb.enabled and cfg.logger.confusion_image:
                    figure = confusion_figure(confusion.matrix.cpu(), run.class_names, f"epoch {epoch}")
                    tb.log_figure("val/confusion", figure, run.global_step)
                if overlays is not None:
                    predicted = overlays.predict(run.model, run.device, run.amp_dtype, bool(cfg.model.channels_last))
                    tb.log_figure("val/overlays", overlays.figure(predicted, f"epoch {epoch}"), run.global_step)
            else:
                log.info("epoch %d, step %d, train loss %.4f", epoch, run.global_step, mean_loss)
                run.history.append(record)
            state = _checkpoint_state(run, epoch)  # captured once: best.pt of this epoch is the same state
            if improved:
                save_checkpoint(run.run_dir / "best.pt", state)
            save_checkpoint(run.run_dir / "last.pt", state)
            write_json_atomic(run.run_dir / "metrics.json", _metrics_payload(run, "running", final))
            tb.flush()
    except BaseException as exc:
        # the run dir keeps its last completed evaluation, marked failed (or interrupted): sweeps list it as such
        status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        write_json_atomic(run.run_dir / "metrics.json", _metrics_payload(run, status, final, describe_error(exc)))
        tb.close()
        raise
    payload = _metrics_payload(run, "completed", final)
    write_json_atomic(run.run_dir / "metrics.json", payload)
    tb.close()
    return payload


def train(cfg, run_dir: str | Path) -> dict:
    """prepare + fit: the whole application on a composed config; returns the metrics.json payload."""
    return fit(prepare(cfg, run_dir))
