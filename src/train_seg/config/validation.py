"""Checks of the composed config that Hydra cannot do itself. Hydra already refuses unknown keys (struct mode) and
values of the wrong type (the schemas of ``train_seg.config.schema``); ``validate_config`` checks the values. Each failure
is a ``ConfigError`` whose message names the key, the bad value and the fix; it is raised before any data is read or
any model built.
"""
from __future__ import annotations

import functools
import logging
import math

import torch
from omegaconf import OmegaConf

from train_seg.config.schema import OPTIMIZED_METRICS, PRECISIONS, checks, normalize_precision  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)
_ABSENT = object()


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and the fix."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate_config(cfg) -> None:
    """Every check of the composed config, in one place; raises the first failure as a ``ConfigError``.

    First the declarative ones of ``train_seg.config.schema`` (the ``Check`` of each schema field: ranges, choices,
    finiteness; then ``GROUP_CHECKS`` for the keys the selected group options have), then those that need code:
    the head must fit the loss. Whether the device and precision exist on this machine is checked where they are
    resolved, once (``resolve_device``, ``resolve_precision``: ``train_seg.engine.trainer.prepare``).
    """
    for key, check in checks():
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if value is not _ABSENT:
            message = check.error(key, value)
            _require(message is None, message)
    _check_head_and_loss(cfg)
    _check_eval_scales(cfg.trainer.eval_scales)


def _check_eval_scales(scales) -> None:
    values = list(scales) if scales is not None else []
    ok = bool(values) and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
                              for v in values)
    _require(ok, f"trainer.eval_scales={values}: must be a non-empty list of numbers > 0, e.g. [1.0] (no "
                 "test-time scaling) or [0.75,1.0,1.25].")


def _is_binary_loss(target: str) -> bool:
    """Whether the loss class at ``target`` declares ``binary = True`` (one-channel sigmoid losses do). A target
    that cannot be imported counts as not binary here: build.py reports it, naming the key."""
    from hydra.utils import get_class

    try:
        cls = get_class(target)
    except Exception:
        return False
    return getattr(cls, "binary", False) is True


def _loss_targets(node) -> list[str]:
    """``_target_`` of a loss node, or of every term of a WeightedSum node."""
    terms = node.get("terms") if hasattr(node, "get") else None
    if terms:
        return [target for term in terms.values() for target in _loss_targets(term)]
    return [str(node.get("_target_"))] if hasattr(node, "get") else []


def _check_head_and_loss(cfg) -> None:
    """A one-channel head needs binary losses and multi-class heads need multi-class losses (as each loss class
    declares by its ``binary`` attribute): caught here, with the fix, instead of as a shape error inside the first
    training step."""
    targets = _loss_targets(cfg.loss)
    binary = [_is_binary_loss(t) for t in targets]
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


def resolve_device(spec: str, key: str = "trainer.device") -> torch.device:
    """``auto`` picks CUDA when available, else CPU. An explicit ``cuda`` without a GPU, or a name that is not a
    device, is a ``ConfigError`` naming ``key`` (the command's name for the setting)."""
    spec = str(spec)
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise ConfigError(f"{key}={spec!r} is not a device; use auto, cpu, cuda or cuda:N.") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}={spec}: no CUDA device is available here; use {key}=auto or cpu.")
    return device


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX, as oneDNN reports it). Without it, bf16
    autocast on the CPU is emulated and many times slower than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``trainer.precision`` on ``device`` (None = fp32).

    ``auto``: on CUDA bf16-mixed with native bfloat16 (compute capability >= 8.0), else 16-mixed; on the CPU
    bf16-mixed where ``cpu_has_native_bf16``, else 32. ``16-mixed`` (fp16 autocast + GradScaler) runs on the CPU
    too, slowly, to test that path; it and ``bf16-mixed`` without native support log a warning there.
    Raises ``ConfigError`` for bf16-mixed on a GPU without bfloat16.
    """
    precision = normalize_precision(precision)
    if precision == "auto":
        if device.type == "cuda":
            precision = "bf16-mixed" if torch.cuda.get_device_capability(device) >= (8, 0) else "16-mixed"
        else:
            precision = "bf16-mixed" if cpu_has_native_bf16() else "32"
    if precision == "16-mixed":
        if device.type != "cuda":
            log.warning("trainer.precision=16-mixed on %s: fp16 autocast with loss scaling is emulated there, many "
                        "times slower than 32; it is meant for testing the fp16 path (use 32 to train).", device)
        return torch.float16
    if precision == "bf16-mixed":
        if device.type == "cuda":
            _require(torch.cuda.is_bf16_supported(),
                     "trainer.precision=bf16-mixed: this GPU does not support bfloat16; use 16-mixed.")
        elif not cpu_has_native_bf16():
            log.warning("trainer.precision=bf16-mixed on a CPU without native bfloat16: many times slower than 32 "
                        "(trainer.precision=auto picks 32 here).")
        return torch.bfloat16
    return None
