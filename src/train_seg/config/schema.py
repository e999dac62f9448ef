"""Typed schemas of the config: the one source of the defaults, types, one-line docs and allowed values of the
top level, ``trainer``, ``paths`` and ``metrics`` keys. Imports nothing heavy (it is imported by ``import train_seg``).

Each schema is a dataclass registered in Hydra's ConfigStore (``register_schemas``) that the YAML extends through
its defaults list (``- base_trainer`` before ``_self_``), so Hydra checks types and refuses unknown keys at compose
time; ``train_seg.config.validation.validate_config`` checks values from each field's ``Check``, before any data
is read. One field per key: ``name: type = setting(default, "one-line doc", Check(...))``. ``Check``: ``min`` (>=),
``gt`` (>), ``max`` (<=), ``lt`` (<) for numbers (a ranged number must also be finite), ``choices`` (exact values,
type included, after ``normalize``) with a ``message`` template; ``note`` is appended to the range rule of the
message; ``None`` passes. Groups without a schema (dataset, model, loss, ...) are checked from ``GROUP_CHECKS``
when the selected option has the key.

To add a key: add the field here, its row to docs/configuration.md (tests/test_reference.py checks
the default), and read it in the code; YAML files do not repeat the schema's defaults.
"""
import copy
import math
from dataclasses import MISSING as NO_DEFAULT
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Iterator, Optional

from omegaconf import MISSING

PRECISIONS = ("auto", "32", "16-mixed", "bf16-mixed")
OPTIMIZED_METRICS = ("val/mIoU", "val/rare_mIoU", "val/pixel_acc", "val/mean_acc", "val/fwIoU")


def normalize_precision(value) -> str:
    """Lightning-style aliases of ``trainer.precision`` (fp32, 32-true, bf16, 16, fp16) to the canonical names."""
    text = str(value).strip()
    return {"32-true": "32", "fp32": "32", "bf16": "bf16-mixed", "16": "16-mixed", "fp16": "16-mixed"}.get(text, text)


def _number(x: float) -> str:
    return f"{x:g}"


@dataclass(frozen=True)
class Check:
    """The allowed values of one key; ``error(key, value)`` is the one-paragraph message, or None when it is fine."""

    min: Optional[float] = None  # value >= min
    gt: Optional[float] = None  # value > gt
    max: Optional[float] = None  # value <= max
    lt: Optional[float] = None  # value < lt
    choices: tuple = ()  # the value (after normalize) must be one of these, type included (1 is not true)
    normalize: Optional[Callable[[Any], Any]] = None  # applied before comparing with choices (aliases)
    note: str = ""  # appended to the range rule: ", because ...", " (epochs)", " or null (no limit)"
    message: str = "{key}={value!r} is not valid; choose one of {choices}."  # when the value is not a choice

    def rule(self) -> str:
        """The range in words: ``>= 2``, ``> 0``, ``in (0, 1)``, ``in [0, 1)``."""
        low = ("[", self.min) if self.min is not None else ("(", self.gt) if self.gt is not None else None
        high = ("]", self.max) if self.max is not None else (")", self.lt) if self.lt is not None else None
        if low and high:
            return f"in {low[0]}{_number(low[1])}, {_number(high[1])}{high[0]}"
        if low:
            return f"{'>=' if low[0] == '[' else '>'} {_number(low[1])}"
        if high:
            return f"{'<=' if high[0] == ']' else '<'} {_number(high[1])}"
        return ""

    def error(self, key: str, value: Any) -> Optional[str]:
        if value is None:
            return None
        if self.choices:
            probe = self.normalize(value) if self.normalize else value
            if not any(probe == c and type(probe) is type(c) for c in self.choices):
                choices = ", ".join(str(c).lower() if isinstance(c, bool) else str(c) for c in self.choices)
                return self.message.format(key=key, value=value, choices=choices)
        rule = self.rule()
        if rule:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return f"{key}={value!r}: must be a number {rule}{self.note}."
            if not math.isfinite(value):
                return f"{key}={value}: must be a finite number {rule}{self.note}."
            if ((self.min is not None and value < self.min) or (self.gt is not None and value <= self.gt)
                    or (self.max is not None and value > self.max) or (self.lt is not None and value >= self.lt)):
                return f"{key}={value}: must be {rule}{self.note}."
        return None


def setting(default: Any, doc: str, check: Optional[Check] = None) -> Any:
    """A schema field: its default, its one-line doc (``metadata["doc"]``) and its ``Check`` (``metadata["check"]``)."""
    metadata = {"doc": doc} if check is None else {"doc": doc, "check": check}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def group(doc: str, default: Any = MISSING) -> Any:
    """A group node of the top level (one option of ``configs/<group>/``; typed by its own schema if it has one)."""
    return field(default=default, metadata={"doc": doc, "group": True})


@dataclass
class TrainerConfig:
    """``trainer``: the training loop (configs/trainer/default.yaml extends this). Training stops at max_epochs or
    max_steps, whichever comes first."""

    max_epochs: int = setting(8, "epochs (8: the schedule of the embedded demo and its sweeps)", Check(min=1))
    max_steps: Optional[int] = setting(None, "optimisation steps; null = no step limit",
                                       Check(min=1, note=" or null (no step limit)"))
    batch_size: int = setting(
        8, ">= 2 (BatchNorm in DeepLabV3's ASPP pooling branch); the last incomplete batch is dropped",
        Check(min=2, note=", because DeepLabV3's ASPP pooling branch has BatchNorm on a 1x1 map, which cannot be "
                          "trained on a single image"))
    val_batch_size: int = setting(16, "batch size of the evaluation", Check(min=1))
    num_workers: Any = setting(
        "auto", "DataLoader worker processes (0 = load in the main process), or auto: 0 for in-memory data (the "
                "synthetic dataset), else clamp(cores // 2, 1, 4) (train_seg.engine.runtime.resolve_num_workers)",
        Check(choices=("auto",), normalize=lambda v: "auto" if type(v) is int and v >= 0 else v,
              message="{key}={value!r}: must be >= 0."))
    pin_memory: Any = setting("auto", "auto | true | false; auto = true on CUDA",
                              Check(choices=("auto", True, False), message="{key}={value!r}: use auto, true or false."))
    persistent_workers: bool = setting(
        False, "true keeps workers alive across epochs (faster on big data; augmentation is seeded per sample, so "
               "results and resume are the same either way)")
    num_threads: Any = setting(
        None, "CPU threads of this process (torch.set_num_threads); null = torch's default (all cores); auto = "
              "OMP_NUM_THREADS if set, else the usable cores (affinity, cgroup quota; train_seg.engine.runtime."
              "resolve_num_threads); for parallel sweep jobs on one machine: cores / jobs",
        Check(choices=("auto",), normalize=lambda v: "auto" if type(v) is int and v >= 1 else v,
              message="{key}={value!r}: must be >= 1 or null (torch's default)."))
    device: str = setting("auto", "auto | cpu | cuda | cuda:N; auto = CUDA when available")
    precision: str = setting(
        "auto", "auto | 32 | 16-mixed (fp16 autocast + GradScaler; on CPU slow, for testing) | bf16-mixed; auto = "
                "bf16-mixed where bf16 is native (GPUs from Ampere, CPUs with AVX512-BF16/AMX), else 16-mixed on "
                "GPUs and 32 on CPUs",
        Check(choices=PRECISIONS, normalize=normalize_precision))
    grad_clip: Optional[float] = setting(None, "max global gradient norm; null = no clipping",
                                         Check(gt=0, note=" (max gradient norm) or null"))
    aux_weight: float = setting(
        0.5, "weight of the auxiliary head's loss (model.aux_loss=true adds torchvision's FCN head; same criterion); "
             "torchvision: 0.5", Check(min=0))
    channels_last: bool = setting(
        False, "store the model and batches channels_last (faster convolutions on recent CPUs and on CUDA)")
    compile: bool = setting(
        False, "torch.compile the model (train_seg.engine.runtime.maybe_compile); falls back to eager with one warning line "
               "where the platform cannot compile")
    cudnn_benchmark: bool = setting(
        True, "CUDA only: torch.backends.cudnn.benchmark (fastest convolution algorithms for the input shape; not "
              "bit-reproducible across runs)")
    eval_every: int = setting(1, "validate every N epochs (and always after the last one); every epoch by default, so curves have a point per epoch",
                              Check(min=1, note=" (epochs)"))
    eval_mode: str = setting(
        "whole", "inference of training's evaluation: whole (one forward pass per batch) or slide (sliding windows, "
                 "train_seg.evaluation.inference)", Check(choices=("whole", "slide")))
    eval_window: int = setting(512, "eval_mode=slide: side of the square windows, px", Check(min=8))
    eval_overlap: float = setting(0.5, "eval_mode=slide: overlap of neighbouring windows (stride = window x (1 - "
                                       "overlap))", Check(min=0, lt=1))
    eval_blend: str = setting("uniform", "eval_mode=slide: how overlapping window logits are averaged",
                              Check(choices=("uniform", "gaussian")))
    eval_flip: bool = setting(False, "test-time augmentation in training's evaluation: average with the "
                                     "horizontally flipped image's logits")
    eval_scales: list = setting([1.0], "test-time augmentation in training's evaluation: input scales whose "
                                       "logits are averaged, e.g. [0.75,1.0,1.25]")
    log_every: int = setting(10, "log train/loss and train/lr every N steps (the only host syncs of the hot loop)",
                             Check(min=1, note=" (steps)"))
    progress: bool = setting(True, "tqdm progress bars (loss, lr, images/s)")
    resume: Optional[str] = setting(
        None, "continue a run: auto = continue THIS run directory (hydra.run.dir) from its last.pt, or start fresh "
              "when it has none (the same command for the first start and a requeue); a checkpoint (last.pt / "
              "best.pt) or a run directory (its last.pt) = continue that run in a new run directory")
    checkpoint_every_n_steps: Optional[int] = setting(
        None, "also write last.pt every N optimizer steps, mid-epoch (with the epoch's position, so a resume "
              "continues at that step); null = only at epoch ends and on a stop signal",
        Check(min=1, note=" (steps) or null"))
    checkpoint_every_minutes: Optional[float] = setting(
        10.0, "also write last.pt mid-epoch when this many minutes passed since the last checkpoint; null = never",
        Check(gt=0, note=" (minutes) or null"))
    max_bad_steps: int = setting(
        25, "a step with a non-finite loss or gradient is skipped (no weight update, counted in "
            "train/skipped_steps); this many in a row stop the run with an error", Check(min=1, note=" (steps)"))
    dist_timeout_s: float = setting(
        1800.0, "torchrun / SLURM: seconds a rank waits in a collective (rendezvous, gradient all-reduce, class "
                "statistics broadcast) before the run stops with an error; a crashed rank ends the others sooner",
        Check(gt=0, note=" (seconds)"))
    requeue_on_signal: bool = setting(
        False, "under SLURM (SLURM_JOB_ID set): after SIGTERM/SIGINT and the checkpoint, `scontrol requeue` the job "
               "(use with resume=auto and a fixed hydra.run.dir)")


@dataclass
class PathsConfig:
    """``paths``: every path in one place (configs/paths/default.yaml extends this)."""

    root_dir: str = setting("${oc.env:PROJECT_ROOT,.}", "the project root (where you launched from)")
    output_root: str = setting("outputs", "parent of the run and sweep directories (see configs/hydra/default.yaml)")
    cache_dir: str = setting("${oc.env:TRAIN_SEG_CACHE,${paths.output_root}/.cache}",
                             "class-statistics cache (pixel counts per class), keyed by the dataset's identity; safe "
                             "to delete")
    output_dir: str = setting("${hydra:runtime.output_dir}", "the run directory (Hydra's run dir)")


@dataclass
class MetricsConfig:
    """``metrics``: what each evaluation measures beyond the confusion matrix (configs/metrics/default.yaml)."""

    objects: str = setting(
        "rare", "object-level metrics (connected components matched at IoU > 0.5) for the rare classes, every class, "
                "or none", Check(choices=("rare", "all", "none")))
    min_object_pixels: int = setting(
        16, "connected components smaller than this (pixels, in the evaluated resolution) are not objects, on either "
            "side", Check(min=1))


@dataclass
class TrainConfig:
    """The top level of ``configs/train.yaml`` (which extends this): the scalar keys, then one node per group."""

    seed: int = setting(42, "seed of every RNG (python, numpy, torch, DataLoader workers, augmentations)")
    optimized_metric: str = setting(
        "val/mIoU", "metric returned by the Hydra main (for sweepers) and used to pick best.pt",
        Check(choices=OPTIMIZED_METRICS, message="{key}={value!r} is not a logged metric; choose one of {choices}."))
    rare_share: float = setting(
        0.01, "a class whose pixel share in the training split is below this value counts as rare (val/rare_mIoU)",
        Check(gt=0, lt=1, note=", e.g. 0.01"))
    seeds: int = setting(
        1, "sweep presets (sweep=...) repeat every configuration with seed 0 .. seeds-1; the summary reports mean ± std",
        Check(min=1))
    paths: Any = group("configs/paths/ (PathsConfig)")
    dataset: Any = group("configs/dataset/")
    model: Any = group("configs/model/")
    loss: Any = group("configs/loss/")
    weighting: Any = group("configs/weighting/")
    sampler: Any = group("configs/sampler/")
    optimizer: Any = group("configs/optimizer/")
    scheduler: Any = group("configs/scheduler/")
    trainer: Any = group("configs/trainer/ (TrainerConfig)")
    metrics: Any = group("configs/metrics/ (MetricsConfig)")
    logger: Any = group("configs/logger/: one node per sink")
    summary: Any = group("the top-level `summary:` node of configs/train.yaml, if any (train_seg.reporting.summary)", None)
    trial: Any = group("set by the Optuna sweeper for each trial of hparams_search=optuna (storage, study_name, number, "
                       "pruner: train_seg.search.study.TrialSpec); null otherwise", None)


# name in the ConfigStore -> (group, schema); the YAML names it first in its defaults list
SCHEMAS = {
    "base_train": (None, TrainConfig),
    "base_trainer": ("trainer", TrainerConfig),
    "base_paths": ("paths", PathsConfig),
    "base_metrics": ("metrics", MetricsConfig),
}

# Keys of groups without a schema, checked when the selected option has them (before any data is read).
GROUP_CHECKS = {
    "optimizer.lr": Check(gt=0, note=" (the initial learning rate)"),
    "optimizer.weight_decay": Check(min=0),
    "optimizer.momentum": Check(min=0, note=" (SGD momentum, usually 0.9)"),
    "optimizer.eps": Check(min=0, note=" (AdamW's term added to the denominator, usually 1e-8)"),
    "optimizer.betas[0]": Check(min=0, lt=1, note=" (AdamW's first-moment decay, usually 0.9)"),
    "optimizer.betas[1]": Check(min=0, lt=1, note=" (AdamW's second-moment decay, usually 0.999)"),
}


def register_schemas() -> None:
    """Stores the schemas in Hydra's ConfigStore (idempotent); ``import train_seg`` calls it."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for name, (group_name, node) in SCHEMAS.items():
        store.store(name=name, node=node, group=group_name)


def schema_fields(schema: type = TrainConfig, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(dotted key, dataclasses.Field)`` of every scalar key of ``schema`` and of the group schemas it nests
    (trainer, paths), in declaration order; group nodes themselves are skipped."""
    nested = {group_name: node for group_name, node in SCHEMAS.values() if group_name}
    for f in fields(schema):
        if f.metadata.get("group"):
            if not prefix and f.name in nested:
                yield from schema_fields(nested[f.name], f"{f.name}.")
            continue
        yield prefix + f.name, f


def default_of(f) -> Any:
    """The default of a schema field (``MISSING`` = mandatory)."""
    if f.default is not NO_DEFAULT:
        return f.default
    if f.default_factory is not NO_DEFAULT:
        return f.default_factory()
    return MISSING


def checks() -> Iterator[tuple[str, Check]]:
    """Every declarative check: the schema fields' ``Check`` (trainer, paths, then the top level), then
    ``GROUP_CHECKS``."""
    ordered = sorted(schema_fields(), key=lambda item: "." not in item[0])  # stable: group schemas first
    for key, f in ordered:
        if "check" in f.metadata:
            yield key, f.metadata["check"]
    yield from GROUP_CHECKS.items()

