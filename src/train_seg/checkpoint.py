"""Self-contained checkpoints: written atomically, read back with ``torch.load(weights_only=True)``.

A checkpoint holds everything needed to continue or to evaluate without the original config files: model,
optimizer, scheduler and GradScaler states, epoch and step counters, RNG states (python, numpy, torch CPU and
CUDA), the resolved config, class names, palette, the class-weight vector, and the best metric so far.
Every value is a tensor, a number, a string or a container of those, so the safe loader accepts it.
"""
from __future__ import annotations

import random
import re
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
    """The checkpoint at ``path``, read with ``torch.load(weights_only=True)``: nothing in the file is executed.

    Raises ``CheckpointError`` (one paragraph naming the file and the fix) when the file is missing, truncated, not a
    PyTorch file, holds Python objects the safe loader refuses (with the conversion command when it looks like a
    train_seg checkpoint of an older version: ``python -m train_seg.cli.checkpoint convert OLD NEW``), is not a
    train_seg checkpoint, or was written by a newer train_seg (its ``version`` above ``CHECKPOINT_VERSION``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file. Pass a last.pt / best.pt written by training.")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(unreadable_message(path, exc)) from exc
    if not isinstance(state, dict) or "model" not in state or "version" not in state:
        held = ", ".join(sorted(map(str, state))[:6]) if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(
            f"{path} is a PyTorch file but not a train_seg checkpoint: it has no 'model'/'version' entries (it holds "
            f"{held or 'nothing'}). Pass a last.pt / best.pt written by train_seg training; a plain state dict of "
            "weights can only serve as model.weights=... of a training run."
        )
    version = state["version"]
    if not isinstance(version, int) or version > CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path} was written by a newer train_seg (checkpoint version {version!r}; this one reads versions up to "
            f"{CHECKPOINT_VERSION}). Upgrade train_seg (pip install -U train_seg, or git pull) to use it."
        )
    return state


_ZIP_MAGIC = b"PK\x03\x04"


def unreadable_message(path: Path, error: Exception) -> str:
    """Why ``torch.load(path, weights_only=True)`` failed, in one paragraph: truncated, Python objects the safe
    loader refuses (an older train_seg checkpoint: how to convert it), or not a PyTorch file at all."""
    import zipfile

    with open(path, "rb") as handle:
        head = handle.read(4)
    text = str(error).strip()
    first = text.splitlines()[0] if text else type(error).__name__
    if head == _ZIP_MAGIC and not zipfile.is_zipfile(path):
        return (f"{path} cannot be read: the file is truncated or corrupt ({first}). Checkpoints are written "
                "atomically, so this copy was cut short (an interrupted copy or download, a full disk): copy it again "
                "from the run directory.")
    if head == _ZIP_MAGIC:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        objects = f" ({found.group(1)})" if found else ""
        if _looks_like_ours(path):
            return (f"{path} holds Python objects{objects} that the safe loader (torch.load(weights_only=True)) "
                    "refuses: it looks like a train_seg checkpoint of an older version. If you trust the file, convert "
                    f"it once: python -m train_seg.cli.checkpoint convert {path} <new.pt>, and use the new file.")
        return (f"{path} is a PyTorch file that the safe loader (torch.load(weights_only=True)) refuses: it holds "
                f"Python objects{objects}, so it is not a train_seg checkpoint. Pass a last.pt / best.pt written by "
                "training.")
    return (f"{path} is not a train_seg checkpoint: it is not a PyTorch checkpoint file at all ({first}). Pass a "
            "last.pt / best.pt written by train_seg training, or its run directory.")


def _looks_like_ours(path: Path) -> bool:
    """Whether the pickle inside the zip names a 'model' and a 'config' entry, read opcode by opcode (nothing is
    unpickled, so nothing in the file runs)."""
    import pickletools
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            name = next(n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl")
            strings = {arg for op, arg, _ in pickletools.genops(archive.read(name)) if isinstance(arg, str)}
    except Exception:
        return False
    return {"model", "config"} <= strings


def _to_loadable(value, where: str):
    """``value`` with what the safe loader refuses replaced: numpy arrays -> tensors, numpy scalars and paths ->
    Python numbers and strings, tuples kept. Anything else is refused, naming the entry."""
    if isinstance(value, dict):
        return {key: _to_loadable(item, f"{where}[{key!r}]") for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_to_loadable(item, f"{where}[{i}]") for i, item in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy()) if value.dtype != object else _to_loadable(value.tolist(), where)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str, bytes, torch.Tensor, torch.dtype, torch.device)):
        return value
    raise CheckpointError(f"{where} is a {type(value).__module__}.{type(value).__name__}, which a checkpoint "
                          "cannot hold; remove that entry from the old file by hand.")


def convert(old: str | Path, new: str | Path) -> Path:
    """Rewrites an older train_seg checkpoint (``torch.load(weights_only=False)``: run it on files you trust only)
    as one the safe loader reads, at ``new``, and checks that ``load_checkpoint`` accepts it."""
    old, new = Path(old), Path(new)
    if new.exists():
        raise CheckpointError(f"{new} exists already; choose a new file name for the converted checkpoint.")
    try:
        state = torch.load(old, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"{old} cannot be read even with weights_only=False ({exc}).") from exc
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"{old} is not a train_seg checkpoint (no 'model' and 'config' entries): nothing to do.")
    state = _to_loadable(state, "checkpoint")
    state.setdefault("version", CHECKPOINT_VERSION)
    atomic_write(new, lambda handle: torch.save(state, handle), binary=True)
    load_checkpoint(new)
    return new
