"""Builds a run in one pass: ``build_run(cfg, run_dir, settings, context)`` turns the validated config into every
object of a ``Run`` (data + class statistics, class weights, model, loss, loaders, optimizer, scheduler, sinks),
each stage's object from its config node through ``train_seg.config.instantiate`` (the model through
``train_seg.models.build_model``). Every other module receives plain objects and knows nothing of Hydra or
OmegaConf. Errors raised by a constructor come out unwrapped, so the user sees its own one-paragraph message."""
from __future__ import annotations

import multiprocessing
import random
import re
import sys


from pathlib import Path

import numpy as np
import torch
from hydra.utils import get_class
from omegaconf import OmegaConf
from torch import nn

from train_seg import distributed
from train_seg.config.instantiate import instantiate_node, plain_node
from train_seg.config.naming import RunContext
from train_seg.config.validation import ConfigError
from train_seg.data.base import (CALIB_SPLIT, HeldOut, SegmentationDataset, SegmentationSource, check_on_bad_sample,
                                 seed_pipeline, skip_bad_samples)
from train_seg.data.class_stats import compute_class_stats
from train_seg.data.order import EpochOrder, SeededSamples
from train_seg.engine import runtime
from train_seg.engine.loop import LoopSettings
from train_seg.engine.state import Run
from train_seg.losses.weighting import class_weights as compute_class_weights
from train_seg.models import build_model

# Keys of a dataset node that are not constructor arguments (``on_bad_sample`` goes to the SegmentationDataset).
RESERVED_DATASET_KEYS = ("transforms", "name", "on_bad_sample", "holdout_fraction", "holdout_seed")
# Key of a loss (term) node: false keeps that term unweighted even when a weighting scheme is selected.
CLASS_WEIGHTS_KEY = "class_weights"
WEIGHTED_SUM = "train_seg.losses.WeightedSum"


# -- the run ---------------------------------------------------------------------------------------------------
def build_run(cfg, run_dir: Path, settings: LoopSettings, context: RunContext) -> Run:
    """Every object of the run of the validated ``cfg``, on ``settings.device``: the sources are validated and their
    class statistics computed (rank 0 computes or reads the cache, then broadcasts) before the model is built."""
    seed = int(cfg.seed)
    # an Optuna trial records its run directory first: a search killed from here on continues in this directory
    trial = _trial_reporter(cfg.get("trial"), run_dir)
    sources = {split: build_source(cfg.dataset, split) for split in ("train", "val")}
    for source in sources.values():
        source.validate()
    progress = bool(cfg.trainer.progress)
    # the val pass reads every val mask once too: bad label values fail here, before training
    stats, val_stats = distributed.main_then_broadcast(lambda: tuple(
        compute_class_stats(sources[split], cache_dir=cfg.paths.cache_dir, progress=progress)
        for split in ("train", "val")))
    weights = compute_class_weights(stats, **OmegaConf.to_container(cfg.weighting, resolve=True))
    class_names = list(sources["train"].class_names)
    model, train_model = build_train_model(cfg, settings, len(class_names), seed)
    criterion = build_criterion(cfg.loss, weights, torch.as_tensor(stats.pixel_share)).to(settings.device)
    train_set = SegmentationDataset(sources["train"], build_transform(cfg.dataset, "train", seed))
    val_set = SegmentationDataset(sources["val"], build_transform(cfg.dataset, "val", seed))
    sampler = build_sampler(cfg.sampler, stats.presence, seed)
    generator = torch.Generator().manual_seed(seed)
    train_loader, val_loader = _data_loaders(cfg.trainer, train_set, val_set, sampler, settings.device, generator,
                                             seed)
    total_steps = total_training_steps(cfg.trainer, len(train_loader), len(train_set))
    optimizer = build_optimizer(cfg.optimizer, model)
    return Run(
        config=OmegaConf.to_container(cfg, resolve=True), run_dir=Path(run_dir), settings=settings, context=context,
        class_names=class_names, palette=[list(map(int, c)) for c in sources["train"].palette], stats=stats,
        val_stats=val_stats, weights=weights, rare=torch.as_tensor(stats.pixel_share < float(cfg.rare_share)),
        model=model, train_model=train_model, criterion=criterion,
        optimizer=optimizer, scheduler=build_scheduler(cfg.scheduler, optimizer, total_steps),
        scaler=torch.amp.GradScaler(settings.device.type, enabled=settings.amp_dtype == torch.float16),
        train_set=train_set, val_set=val_set, train_loader=train_loader, val_loader=val_loader, sampler=sampler,
        generator=generator, total_steps=total_steps,
        sinks=build_sinks(cfg.get("logger"), main_process=distributed.is_main()),
        trial=trial,
    )


def _trial_reporter(node, run_dir: Path):
    """The job's ``search.study.TrialReporter`` when the Optuna sweeper launched it (config ``trial``), started at
    ``run_dir``; else None."""
    from train_seg.search.study import TrialReporter, TrialSpec

    spec = TrialSpec.from_config(node)
    if spec is None:
        return None
    reporter = TrialReporter(spec)
    reporter.start(run_dir)
    return reporter


def _data_loaders(trainer_cfg, train_set, val_set, sampler, device: torch.device, generator, seed: int):
    """The loaders over (index, augmentation seed) pairs of this rank's share of the epoch (``data.order``), with
    ``dataset.on_bad_sample=skip`` applied and the compute threads set for their worker count."""
    order = EpochOrder(len(train_set), seed, base=sampler, rank=distributed.rank(), world_size=distributed.world_size())
    train_loader, val_loader = build_loaders(trainer_cfg, SeededSamples(train_set), val_set, order, device, generator,
                                             val_sampler=distributed.eval_sampler(len(val_set)))
    skip_bad_samples(train_loader, val_loader)
    set_threads(trainer_cfg, device, train_loader.num_workers)
    return train_loader, val_loader


def build_train_model(cfg, settings: LoopSettings, num_classes: int, seed: int):
    """The model on its device (SyncBatchNorm, torch.compile when asked) and what the training step calls:
    ``DistributedDataParallel`` of it under torch.distributed, the model itself in one process."""
    model = build_model(cfg.model, num_classes=num_classes)
    model.to(settings.device, memory_format=settings.memory_format)
    if cfg.model.get("sync_batchnorm"):
        model = distributed.sync_batchnorm(model, settings.device)
    runtime.maybe_compile(model, bool(cfg.trainer.compile), device=settings.device)  # in place: same state_dict keys
    train_model = distributed.wrap_ddp(model, settings.device)
    if distributed.rank() > 0:  # every rank its own dropout masks (DDP copied rank 0's initial weights)
        torch.manual_seed(seed + 1_000_003 * distributed.rank())
    return model, train_model


def set_threads(trainer_cfg, device: torch.device, workers: int) -> None:
    """``trainer.num_threads`` (``auto``: ``train_seg.engine.runtime.resolve_num_threads``); under torch.distributed
    on CPU, the cores are shared by the local ranks."""
    threads = runtime.resolve_num_threads(trainer_cfg.num_threads, workers=workers)
    shared = distributed.is_initialized() and device.type == "cpu" and trainer_cfg.num_threads in (None, "auto")
    if shared:
        threads = max(1, (threads or torch.get_num_threads()) // distributed.local_world_size())
    if threads is not None:
        torch.set_num_threads(int(threads))


def total_training_steps(trainer_cfg, epoch_steps: int, num_images: int) -> int:
    if epoch_steps == 0:
        raise ConfigError(
            f"trainer.batch_size={trainer_cfg.batch_size} is larger than the training split ({num_images} images), "
            "and incomplete batches are dropped: lower the batch size."
        )
    total = int(trainer_cfg.max_epochs) * epoch_steps
    return min(total, int(trainer_cfg.max_steps)) if trainer_cfg.max_steps is not None else total


# -- data ------------------------------------------------------------------------------------------------------
def build_source(dataset_cfg, split: str) -> SegmentationSource:
    """One split of the dataset; its ``on_bad_sample`` attribute is ``dataset.on_bad_sample`` (default error), which
    the SegmentationDataset wrapping it follows. With ``dataset.holdout_fraction`` set, ``calib`` is that seeded
    share of the training split (``holdout_seed``, default 0) and ``train`` the rest (``data.base.HeldOut``)."""
    plain = plain_node(dataset_cfg, "dataset")
    on_bad_sample = check_on_bad_sample(plain.get("on_bad_sample") or "error")
    fraction = plain.get("holdout_fraction")
    held = fraction is not None and split in ("train", CALIB_SPLIT)
    arguments = {k: v for k, v in plain.items() if k not in RESERVED_DATASET_KEYS}
    source = instantiate_node(arguments, "dataset", split="train" if held else split)
    if held:
        source = HeldOut(source, fraction, int(plain.get("holdout_seed") or 0), held=split == CALIB_SPLIT)
    source.on_bad_sample = on_bad_sample
    return source


def build_transform(dataset_cfg, split: str, seed: int):
    """``albumentations.Compose`` of the ``dataset.transforms.<split>`` list (None when the list is empty), seeded
    with ``seed`` by ``data.base.seed_pipeline`` (albumentations ignores the global RNGs; the trainer reseeds
    it per sample, see ``data.order``)."""
    import albumentations as A

    node = dataset_cfg.get("transforms")  # only this node is resolved: a pipeline needs no dataset.root
    transforms = plain_node(node, "dataset.transforms") if node is not None else {}
    specs = transforms.get(split) or []
    if not specs:
        return None
    steps = [instantiate_node(spec, f"dataset.transforms.{split}[{i}]") for i, spec in enumerate(specs)]
    pipeline = A.Compose(steps)
    seed_pipeline(pipeline, seed)
    return pipeline


def build_sampler(sampler_cfg, presence: np.ndarray, seed: int):
    spec = plain_node(sampler_cfg, "sampler")
    if spec.get("_target_") is None:
        return None
    return instantiate_node(spec, "sampler", presence=presence, seed=seed)


def seed_worker(worker_id: int) -> None:
    """Seeds python's and numpy's global generators from the worker's torch seed (which the DataLoader derives from
    its per-epoch reseeded generator), for custom transforms that draw from them. The albumentations pipeline is
    not seeded here: ``data.order.SeededSamples`` reseeds it for every sample from its epoch position."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def build_loaders(trainer_cfg, train_set: SegmentationDataset, val_set: SegmentationDataset, sampler, device,
                  generator: torch.Generator, val_sampler=None):
    """The training and validation DataLoaders; ``trainer.num_workers=auto`` is resolved by
    ``train_seg.engine.runtime.resolve_num_workers`` (0 for in-memory data, else a share of the usable cores)."""
    workers = runtime.resolve_num_workers(trainer_cfg.num_workers, dataset_kind=runtime.dataset_kind(train_set))
    pin = device.type == "cuda" if trainer_cfg.pin_memory == "auto" else bool(trainer_cfg.pin_memory)
    common = dict(num_workers=workers, pin_memory=pin, worker_init_fn=seed_worker,
                  persistent_workers=bool(trainer_cfg.persistent_workers) and workers > 0)
    if workers > 0 and sys.platform.startswith("linux"):
        # An explicit fork context: inside hydra-joblib-launcher's loky workers the default context cannot start
        # DataLoader workers ("'Process' object has no attribute 'env'"); fork is also torch's usual choice here.
        common["multiprocessing_context"] = multiprocessing.get_context("fork")
    train_loader = torch.utils.data.DataLoader(
        train_set, batch_size=int(trainer_cfg.batch_size), shuffle=sampler is None, sampler=sampler,
        drop_last=True,  # BatchNorm in the ASPP pooling branch cannot train on a batch of one
        generator=generator, **common,
    )
    val_loader = torch.utils.data.DataLoader(
        val_set, batch_size=int(trainer_cfg.val_batch_size), shuffle=False, drop_last=False, sampler=val_sampler,
        **common
    )
    return train_loader, val_loader


# -- loss ------------------------------------------------------------------------------------------------------
def build_criterion(loss_cfg, class_weights: torch.Tensor | None, prior: torch.Tensor | None = None) -> nn.Module:
    """Builds the loss; ``class_weights`` go as ``weight=`` to every term whose constructor takes ``weight``
    (unless the term sets ``class_weights: false`` or its own ``weight``), and the class ``prior`` (the training
    split's pixel shares) as ``prior=`` to every term that declares ``takes_class_prior`` (unless it sets its own).
    A ``WeightedSum`` node builds each of its ``terms`` the same way."""
    return _build_loss(plain_node(loss_cfg, "loss"), class_weights, "loss", prior)


def _build_loss(spec: dict, class_weights, key: str, prior=None) -> nn.Module:
    """Builds the loss node at ``key``. ``class_weights`` go as ``weight=`` to a loss class that declares
    ``takes_class_weights = True`` (every shipped loss whose constructor accepts ``weight``), unless the node sets
    ``class_weights: false`` or its own ``weight``. A class without that attribute (e.g. a user's own loss) gets
    no class weights, whatever its constructor accepts: declare ``takes_class_weights = True`` to receive them.
    A ``WeightedSum`` node builds each of its ``terms`` this way."""
    spec = dict(spec)
    target = spec.get("_target_")
    if not target:
        raise ConfigError(f"{key} has no _target_: pick a loss with `loss=<name>` (see configs/loss/).")
    if target == WEIGHTED_SUM:
        terms = spec.get("terms") or {}
        if not terms:
            raise ConfigError(f"{key}.terms is empty: a WeightedSum needs at least one term.")
        built = {name: _build_loss(term, class_weights, f"{key}.terms.{name}", prior) for name, term in terms.items()}
        return instantiate_node({"_target_": target, "weights": spec.get("weights") or {}}, key, terms=built)
    use_weights = spec.pop(CLASS_WEIGHTS_KEY, True)
    try:
        cls = get_class(target)
    except Exception as exc:
        raise ConfigError(f"{key}._target_={target!r} cannot be imported ({exc}).") from exc
    kwargs = {}
    if use_weights and class_weights is not None and spec.get("weight") is None:
        if getattr(cls, "takes_class_weights", False) is True:
            spec.pop("weight", None)
            kwargs["weight"] = class_weights.clone()
    if prior is not None and spec.get("prior") is None and getattr(cls, "takes_class_prior", False) is True:
        spec.pop("prior", None)
        kwargs["prior"] = prior.clone()
    try:
        return instantiate_node(spec, key, **kwargs)
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(_keyed_loss_message(exc, spec, key)) from exc


# "FocalLoss: gamma must be >= 0, got -1" (train_seg.losses.base): the argument is a key of the loss node
_LOSS_ARGUMENT = re.compile(r"^(\w+): (\w+) must ")


def _keyed_loss_message(error: ValueError, spec: dict, key: str) -> str:
    """A loss constructor's message with the config key in front (``loss.gamma=-1: FocalLoss: gamma must be >= 0``)
    and the fix."""
    text = str(error)
    found = _LOSS_ARGUMENT.match(text)
    if found and found.group(2) in spec:
        name = found.group(2)
        return (f"{key}.{name}={spec[name]!r}: {text}. Set {key}.{name} to an allowed value (the comments of "
                f"configs/loss/ say which).")
    return f"{key}: {text}. Check the keys of `{key}` (see the comments of configs/loss/)."


# -- reporting -------------------------------------------------------------------------------------------------
def build_sinks(logger_cfg, main_process: bool = True) -> list:
    """The sinks of ``logger`` (a mapping name -> ``{_target_: ...}``; null entries are off), in config order,
    then the run-files sink (checkpoints, metrics.json), which is always on and always last. Under
    torch.distributed only rank 0 (``main_process``) reports or writes anything: the other ranks get no sink at all
    (the one place where that is decided)."""
    from train_seg.reporting.sinks import RunFilesSink

    if not main_process:
        return []
    spec = plain_node(logger_cfg, "logger") if logger_cfg is not None else {}
    sinks = []
    for name, node in spec.items():
        if node is None or node is False:
            continue
        if not isinstance(node, dict) or not node.get("_target_"):
            raise ConfigError(
                f"logger.{name}={node!r} is not a sink: each logger entry is a mapping with a `_target_` class "
                f"(e.g. +logger.{name}._target_=my_module.MySink), or null to turn it off."
            )
        sinks.append(instantiate_node(node, f"logger.{name}"))
    return sinks + [RunFilesSink()]


# -- optimisation ----------------------------------------------------------------------------------------------
def build_optimizer(optimizer_cfg, model: nn.Module) -> torch.optim.Optimizer:
    spec = plain_node(optimizer_cfg, "optimizer")
    spec["_partial_"] = True
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        return instantiate_node(spec, "optimizer")(params)
    except ValueError as exc:  # torch's own checks: "Invalid momentum value: -1", "Invalid beta parameter at index 1"
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"optimizer ({spec.get('_target_')}): {exc}. Fix the optimizer.* key it names (lr, "
                          "momentum, weight_decay, betas, eps: see configs/optimizer/).") from exc


def build_scheduler(scheduler_cfg, optimizer: torch.optim.Optimizer, total_steps: int):
    spec = plain_node(scheduler_cfg, "scheduler")
    if spec.get("_target_") is None:
        return None
    spec["_partial_"] = True
    return instantiate_node(spec, "scheduler")(optimizer, total_steps=total_steps)
