"""``Run``: everything ``train_seg.engine.trainer.prepare`` builds and the loop's own state (epoch, step, best, history).

The loop reads and advances it; sinks read it (``on_train_start`` receives it) but never change it. It is also
what a checkpoint holds: ``checkpoint_state`` is the one definition of a checkpoint's content, ``record`` the one
way to turn the run into its metrics.json record.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from train_seg.checkpoint import capture_rng_state
from train_seg.config.naming import RunContext
from train_seg.data.base import SegmentationDataset
from train_seg.data.class_stats import ClassStats
from train_seg.engine.loop import LoopSettings
from train_seg.reporting.record import RunRecord


@dataclass
class Run:
    config: dict  # the resolved config as a plain dict (what checkpoints, TensorBoard and metrics.json record)
    run_dir: Path
    settings: LoopSettings
    context: RunContext  # the Hydra job it runs in: sweep job or not, swept keys, config-group choices
    class_names: list[str]
    palette: list
    stats: ClassStats
    val_stats: ClassStats
    weights: torch.Tensor
    rare: torch.Tensor
    model: torch.nn.Module  # the model itself: evaluation, sinks and checkpoints use it
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
    sinks: list = field(default_factory=list)
    train_model: Any = None  # what the training step calls: DistributedDataParallel(model) under torchrun, else model
    start_epoch: int = 0
    progress: Any = None  # engine.EpochProgress of a resumed, partly done epoch (None: start_epoch from its start)
    completed: bool = False
    bad_streak: int = 0  # consecutive non-finite steps at the end of the last complete epoch  # resumed in place (trainer.resume=auto) a run that had already finished
    global_step: int = 0
    best: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    trial: Any = None  # search.study.TrialReporter of an Optuna trial (reports evaluations, may prune), else None
    rank_rng: list | None = None  # every rank's random state, gathered for the checkpoint being written (else None)

    def __post_init__(self) -> None:
        if self.train_model is None:
            self.train_model = self.model

    @property
    def pixel_share(self) -> list[float]:
        return self.stats.pixel_share.tolist()

    @property
    def rare_names(self) -> list[str]:
        return [name for name, rare in zip(self.class_names, self.rare.tolist()) if rare]

    def checkpoint_state(self, epoch: int, progress=None) -> dict:
        """A self-contained checkpoint after ``epoch`` complete epochs (see ``train_seg.checkpoint``); mid-epoch,
        ``progress`` (``engine.EpochProgress``) and the epoch's sample order say where the next epoch stands."""
        rng = self.rank_rng or [capture_rng_state()]
        mid_epoch = {} if progress is None else {
            "progress": progress.to_dict(),
            "epoch_order": torch.as_tensor(self.train_loader.sampler.epoch_order()),
        }
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "epoch": epoch,
            "global_step": self.global_step,
            "bad_streak": self.bad_streak,
            "rng": rng[0],  # rank 0's (the process's own in one process)
            **({"rng_ranks": rng} if len(rng) > 1 else {}),  # under torch.distributed: rank r restores rng_ranks[r]
            "config": self.config,
            "class_names": self.class_names,
            "palette": self.palette,
            "class_weights": self.weights.cpu(),
            "best": self.best,
            "history": self.history,
            **mid_epoch,
        }

    def record(self, status: str, final: dict | None, error: str | None = None) -> RunRecord:
        """The metrics.json record of this run now (``train_seg.reporting.record``)."""
        return RunRecord(
            status=status, error=error, optimized_metric=self.config["optimized_metric"],
            class_names=self.class_names,
            class_stats={"train": self.stats.to_dict(include_presence=False),
                         "val": self.val_stats.to_dict(include_presence=False)},
            class_weights={name: float(w) for name, w in zip(self.class_names, self.weights.tolist())},
            weighting=self.config["weighting"], rare_share=float(self.config["rare_share"]),
            rare_classes=self.rare_names, final=final, best=self.best or None, history=self.history,
        )
