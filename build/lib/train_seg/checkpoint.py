"""Self-contained checkpoints: written atomically, read back with ``torch.load(weights_only=True)``.

A checkpoint holds everything needed to continue or to evaluate without the original config files: model,
optimizer, scheduler and GradScaler states, epoch and step counters, RNG states (python, numpy, torch CPU and
CUDA), the resolved config, class names, palette, the class-weight vector, and the best metric so far.
Every value is a tensor, a number, a string or a container of those, so the safe loader accepts it.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from train_seg.atomic import atomic_write

CHECKPOINT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be found, read, or used with the current config."""


def capture_rng_state() -> dict[str, Any]:
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": _to_safe(random.getstate()),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np.asarray(np_state["state"]["key"]).astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_from_safe(state["python"]))
    np_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": np_state["bit_generator"],
            "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
            "has_gauss": np_state["has_gauss"],
            "gauss": np_state["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_safe(obj):
    """python's random state is nested tuples of ints: store as lists (the safe loader accepts both)."""
    return [_to_safe(x) for x in obj] if isinstance(obj, (tuple, list)) else obj


def _from_safe(obj):
    return tuple(_from_safe(x) for x in obj) if isinstance(obj, list) else obj


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Writes ``state`` (plus ``version``) to ``path`` atomically (``train_seg.atomic``): a crash mid-write leaves
    the previous file intact."""
    payload = {"version": CHECKPOINT_VERSION, **state}
    return atomic_write(path, lambda handle: torch.save(payload, handle), binary=True)


def resolve_checkpoint(spec: str | Path) -> Path:
    """``trainer.resume`` accepts a checkpoint file or a run directory (its ``last.pt`` is used)."""
    path = Path(str(spec)).expanduser()
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        raise CheckpointError(
            f"trainer.resume={spec}: no checkpoint at {path}. Pass a checkpoint file (last.pt / best.pt) or a run "
            "directory that contains last.pt."
        )
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot be read as a train_seg checkpoint ({exc}).") from exc
    if not isinstance(state, dict) or "model" not in state or "version" not in state:
        raise CheckpointError(f"{path}: not a train_seg checkpoint (no 'model'/'version' entries).")
    return state
