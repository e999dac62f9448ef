"""Checks of the composed config that Hydra cannot do itself (unknown keys are already refused by Hydra's struct
mode). Each failure is a ``ConfigError`` whose message names the key, the bad value and the fix; it is raised
before any data is read or any model built.
"""
from __future__ import annotations

import math

import torch

PRECISIONS = ("auto", "32", "16-mixed", "bf16-mixed")
OPTIMIZED_METRICS = ("val/mIoU", "val/rare_mIoU", "val/pixel_acc", "val/mean_acc", "val/fwIoU")


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and the fix."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def normalize_precision(value) -> str:
    text = str(value).strip()
    return {"32-true": "32", "fp32": "32", "bf16": "bf16-mixed", "16": "16-mixed", "fp16": "16-mixed"}.get(text, text)


def validate_config(cfg) -> None:
    trainer = cfg.trainer
    precision = normalize_precision(trainer.precision)
    _require(precision in PRECISIONS,
             f"trainer.precision={trainer.precision!r} is not valid; choose one of {', '.join(PRECISIONS)}.")
    _require(int(trainer.batch_size) >= 2,
             f"trainer.batch_size={trainer.batch_size}: must be >= 2, because DeepLabV3's ASPP pooling branch has "
             "BatchNorm on a 1x1 map, which cannot be trained on a single image.")
    _require(int(trainer.val_batch_size) >= 1, f"trainer.val_batch_size={trainer.val_batch_size}: must be >= 1.")
    _require(int(trainer.max_epochs) >= 1, f"trainer.max_epochs={trainer.max_epochs}: must be >= 1.")
    _require(trainer.max_steps is None or int(trainer.max_steps) >= 1,
             f"trainer.max_steps={trainer.max_steps}: must be >= 1 or null (no step limit).")
    _require(int(trainer.eval_every) >= 1, f"trainer.eval_every={trainer.eval_every}: must be >= 1 (epochs).")
    _require(int(trainer.log_every) >= 1, f"trainer.log_every={trainer.log_every}: must be >= 1 (steps).")
    _require(int(trainer.num_workers) >= 0, f"trainer.num_workers={trainer.num_workers}: must be >= 0.")
    _require(trainer.num_threads is None or int(trainer.num_threads) >= 1,
             f"trainer.num_threads={trainer.num_threads}: must be >= 1 or null (torch's default).")
    _require(trainer.grad_clip is None or float(trainer.grad_clip) > 0,
             f"trainer.grad_clip={trainer.grad_clip}: must be > 0 (max gradient norm) or null.")
    _require(trainer.pin_memory in ("auto", True, False),
             f"trainer.pin_memory={trainer.pin_memory!r}: use auto, true or false.")
    _require(cfg.optimized_metric in OPTIMIZED_METRICS,
             f"optimized_metric={cfg.optimized_metric!r} is not a logged metric; choose one of {', '.join(OPTIMIZED_METRICS)}.")
    _require(0.0 < float(cfg.rare_share) < 1.0, f"rare_share={cfg.rare_share}: must be in (0, 1), e.g. 0.01.")
    _check_head_and_loss(cfg)
    aux_weight = float(cfg.model.aux_weight)
    _require(math.isfinite(aux_weight) and aux_weight >= 0, f"model.aux_weight={aux_weight}: must be >= 0.")


BINARY_LOSSES = ("train_seg.losses.BCEWithLogitsLoss", "train_seg.losses.SigmoidFocalLoss",
                 "train_seg.losses.BinaryDiceLoss")


def _loss_targets(node) -> list[str]:
    """``_target_`` of a loss node, or of every term of a WeightedSum node."""
    terms = node.get("terms") if hasattr(node, "get") else None
    if terms:
        return [target for term in terms.values() for target in _loss_targets(term)]
    return [str(node.get("_target_"))] if hasattr(node, "get") else []


def _check_head_and_loss(cfg) -> None:
    """A one-channel head needs binary losses and multi-class heads need multi-class losses: caught here, with the
    fix, instead of as a shape error inside the first training step."""
    targets = _loss_targets(cfg.loss)
    binary = [t in BINARY_LOSSES for t in targets]
    head = bool(cfg.model.binary_head)
    if head and not all(binary):
        raise ConfigError(
            "model.binary_head=true gives a one-channel sigmoid head, but the loss "
            f"({', '.join(t.rsplit('.', 1)[-1] for t, b in zip(targets, binary) if not b)}) is multi-class: use "
            "loss=bce, sigmoid_focal, binary_dice or bce_dice, or set model.binary_head=false."
        )
    if not head and any(binary):
        raise ConfigError(
            f"the loss ({', '.join(t.rsplit('.', 1)[-1] for t, b in zip(targets, binary) if b)}) is for a one-channel "
            "head: set model.binary_head=true on a 2-class dataset (e.g. dataset.binary=true for the embedded one), or "
            "pick a multi-class loss such as loss=ce."
        )


def resolve_device(spec: str) -> torch.device:
    """``auto`` picks CUDA when available, else CPU. An explicit ``cuda`` without a GPU is an error."""
    spec = str(spec)
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise ConfigError(f"trainer.device={spec!r} is not a device; use auto, cpu, cuda or cuda:N.") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device={spec}: no CUDA device is available here; use trainer.device=auto or cpu.")
    return device


def resolve_precision(precision, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``trainer.precision`` on ``device`` (None = fp32).

    ``auto``: bf16-mixed on CPU and on GPUs with native bfloat16 (compute capability >= 8.0), else 16-mixed.
    """
    precision = normalize_precision(precision)
    if precision == "auto":
        native_bf16 = device.type != "cuda" or torch.cuda.get_device_capability(device) >= (8, 0)
        precision = "bf16-mixed" if native_bf16 else "16-mixed"
    if precision == "16-mixed":
        _require(device.type == "cuda",
                 f"trainer.precision=16-mixed (fp16 with GradScaler) runs on CUDA only, and this run uses {device}. "
                 "Use trainer.precision=bf16-mixed on CPU, or 32.")
        return torch.float16
    if precision == "bf16-mixed":
        if device.type == "cuda":
            _require(torch.cuda.is_bf16_supported(),
                     "trainer.precision=bf16-mixed: this GPU does not support bfloat16; use 16-mixed.")
        return torch.bfloat16
    return None
