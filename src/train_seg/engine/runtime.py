"""Machine-dependent speed settings: DataLoader workers and compute threads (``trainer.num_workers=auto``,
``trainer.num_threads=auto``), ``torch.compile`` with a clean fallback (``trainer.compile``), and the
``torch.backends`` switches (``trainer.cudnn_benchmark``).

Cores = the CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota, at least 1.
Workers (``auto``): 0 for in-memory data, else ``clamp(cores // 2, 1, 4)``. Threads (``auto``): ``OMP_NUM_THREADS``
if set, else ``max(1, cores - CORES_RESERVED_PER_WORKER * workers)``. The module constants are the whole rule
(docs/configuration.md, ``trainer``). One process cannot see its siblings: parallel sweep jobs on
one machine need ``trainer.num_threads=cores/jobs`` (``experiment=cpu_sweep``).
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger("train_seg")

#: ``num_workers=auto`` for a dataset held in memory (the synthetic one).
MEMORY_WORKERS = 0
#: ``num_workers=auto`` for a file dataset: ``clamp(cores // WORKER_CORE_DIVISOR, MIN_FILE_WORKERS, MAX_FILE_WORKERS)``.
WORKER_CORE_DIVISOR = 2
MIN_FILE_WORKERS = 1
MAX_FILE_WORKERS = 4
#: ``num_threads=auto``: compute threads = cores - this x workers (at least 1).
CORES_RESERVED_PER_WORKER = 0
#: ``dataset_kind`` values.
MEMORY, FILES = "memory", "files"

_CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


# -- cores, workers, threads ------------------------------------------------------------------------------------
def available_cores(cgroup_cpu_max: Path = _CGROUP_CPU_MAX) -> int:
    """CPUs this process may use: the affinity mask (``os.sched_getaffinity``, where the platform has it, else
    ``os.cpu_count()``), capped by a cgroup v2 quota (``cpu.max`` = ``"<quota> <period>"``, rounded up), >= 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        quota, period = cgroup_cpu_max.read_text().split()[:2]
        if quota != "max" and float(period) > 0:
            cores = min(cores, math.ceil(float(quota) / float(period)))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def dataset_kind(dataset: Any) -> str:
    """``"memory"`` for data whose items live in the training process (the source says so with ``in_memory =
    True``; the embedded synthetic dataset is such a source), else ``"files"``. ``dataset`` is a source or a
    dataset wrapping one (``SegmentationDataset.source``, ``.dataset`` of a Subset or another wrapper)."""
    source = dataset
    for _ in range(8):  # unwrap SegmentationDataset / Subset / SeededSamples ... down to the source
        attributes = getattr(source, "__dict__", {})
        inner = attributes.get("source", attributes.get("dataset"))
        if inner is None:
            break
        source = inner
    in_memory = getattr(source, "in_memory", None)
    if in_memory is None:
        from train_seg.data.synthetic import SyntheticShapes

        in_memory = isinstance(source, SyntheticShapes)
    return MEMORY if in_memory else FILES


def resolve_num_workers(value: Any, cores: int | None = None, dataset_kind: str = FILES) -> int:
    """``trainer.num_workers``: an int >= 0 as given, or ``"auto"``: ``MEMORY_WORKERS`` (0) for in-memory data,
    else ``clamp(cores // 2, 1, 4)`` (module docstring). ``cores`` defaults to ``available_cores()``."""
    if value != "auto":
        return int(value)
    if dataset_kind == MEMORY:
        return MEMORY_WORKERS
    cores = available_cores() if cores is None else int(cores)
    return max(MIN_FILE_WORKERS, min(cores // WORKER_CORE_DIVISOR, MAX_FILE_WORKERS))


def resolve_num_threads(value: Any, workers: int, cores: int | None = None,
                        environ: dict | None = None) -> int | None:
    """``trainer.num_threads``: an int >= 1 as given, None (torch's default: leave it alone), or ``"auto"``:
    ``OMP_NUM_THREADS`` when set, else ``max(1, cores - CORES_RESERVED_PER_WORKER * workers)`` (module docstring).
    The caller applies it with ``torch.set_num_threads`` when it is not None."""
    if value is None:
        return None
    if value != "auto":
        return int(value)
    env = os.environ if environ is None else environ
    explicit = str(env.get("OMP_NUM_THREADS", "")).strip()
    if explicit.isdigit() and int(explicit) >= 1:
        return int(explicit)
    cores = available_cores() if cores is None else int(cores)
    return max(1, cores - CORES_RESERVED_PER_WORKER * int(workers))


# -- torch.compile ----------------------------------------------------------------------------------------------
def _fallback(reason: str) -> None:
    log.warning("trainer.compile=true: torch.compile is unavailable here (%s); training continues uncompiled (eager).",
                " ".join(str(reason).split())[:300])


def compile_blocker(device: torch.device | str = "cpu") -> str | None:
    """Why ``torch.compile`` cannot work on this platform, found without compiling (None = worth trying):
    an old torch, or no C++ compiler for inductor's CPU kernels."""
    if not hasattr(nn.Module, "compile"):
        return f"torch {torch.__version__} has no nn.Module.compile (needs torch >= 2.2)"
    if torch.device(device).type == "cpu" and sys.platform != "win32":
        compilers = [os.environ.get("CXX"), "c++", "g++", "clang++"]
        if not any(c and shutil.which(c) for c in compilers):
            return "no C++ compiler on PATH (inductor builds CPU kernels with g++ or clang++; set CXX)"
    return None


def maybe_compile(model: nn.Module, enabled: bool, mode: str | None = None,
                  device: torch.device | str = "cpu") -> nn.Module:
    """``trainer.compile``: compile ``model`` in place (``nn.Module.compile``) and return the same module, so
    ``state_dict`` keys, ``train()``/``eval()`` and ``model(images)["out"]`` are unchanged.

    Falls back to eager, with one warning naming ``trainer.compile=true`` and the reason, when compilation cannot
    work (``compile_blocker``, or ``nn.Module.compile`` raising), when the first training call fails (forward +
    backward probed on that batch, RNG, buffers and gradients restored afterwards), or when any later compiled call
    raises (that call is re-run eagerly; an error that is not the compiler's raises again from it).
    """
    if not enabled:
        return model
    reason = compile_blocker(device)
    if reason is None:
        try:
            model.compile(mode=mode)
        except Exception as exc:  # noqa: BLE001 - any failure to set up compilation means: run eagerly
            reason = f"{type(exc).__name__}: {exc}"
    if reason is not None:
        _fallback(reason)
        return model
    compiled = model._compiled_call_impl  # set by nn.Module.compile; __call__ uses it when not None
    model._compiled_call_impl = _FirstCallGuard(model, compiled)
    return model


def is_compiled(model: nn.Module) -> bool:
    """Whether ``model``'s calls still go through ``torch.compile`` (False after a fallback)."""
    return getattr(model, "_compiled_call_impl", None) is not None


class _FirstCallGuard:
    """Stands in for the compiled ``__call__`` of a module: probes forward + backward on the first training call
    and falls back to eager, for good, when the compiled path raises."""

    def __init__(self, module: nn.Module, compiled):
        self.module, self.compiled, self.probed = module, compiled, False

    def __call__(self, *args, **kwargs):
        try:
            if not self.probed and self.module.training and torch.is_grad_enabled():
                self._probe(*args, **kwargs)
                self.probed = True
            return self.compiled(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - the eager call below re-raises real errors
            self.module._compiled_call_impl = None
            _fallback(f"{type(exc).__name__} in the first compiled call: {exc}")
            return self.module._call_impl(*args, **kwargs)

    def _probe(self, *args, **kwargs) -> None:
        module = self.module
        buffers = {name: b.detach().clone() for name, b in module.named_buffers()}
        grads = {p: p.grad for p in module.parameters()}
        try:
            with torch.random.fork_rng(devices=_cuda_devices(module)):
                outputs = self.compiled(*args, **kwargs)
                tensors = [t for t in (outputs.values() if isinstance(outputs, dict) else [outputs])
                           if isinstance(t, torch.Tensor) and t.requires_grad]
                if tensors:
                    sum(t.float().mean() for t in tensors).backward()
        finally:
            with torch.no_grad():
                for name, b in module.named_buffers():
                    b.copy_(buffers[name])
            for p, g in grads.items():
                p.grad = g


def _cuda_devices(module: nn.Module) -> list[int]:
    return sorted({p.device.index or 0 for p in module.parameters() if p.device.type == "cuda"})


# -- torch.backends ---------------------------------------------------------------------------------------------
def apply_backend_settings(device: torch.device | str, cudnn_benchmark: bool = True) -> dict[str, Any]:
    """Process-wide backend switches for ``device``; returns what it set (for the log).

    CUDA only: ``torch.backends.cudnn.benchmark = cudnn_benchmark`` (``trainer.cudnn_benchmark``; CUDA results are
    then not bit-reproducible) and ``torch.set_float32_matmul_precision("high")`` (TF32 matmuls). On any other
    device nothing is changed and ``{}`` is returned.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return {}
    torch.backends.cudnn.benchmark = bool(cudnn_benchmark)
    torch.set_float32_matmul_precision("high")
    return {"cudnn.benchmark": bool(cudnn_benchmark), "float32_matmul_precision": "high"}
