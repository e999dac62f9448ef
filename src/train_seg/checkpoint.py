"""The one checkpoint module: write (atomically), find, read and validate, build the model from, and convert.

A checkpoint holds everything needed to continue or to evaluate without the original config files: model,
optimizer, scheduler and GradScaler states, epoch and step counters, RNG states (python, numpy, torch CPU and
CUDA), the resolved config, class names, palette, the class-weight vector, and the best metric so far.
Every value is a tensor, a number, a string or a container of those, so ``torch.load(weights_only=True)`` reads it.

* ``find_checkpoint``: a file as given, or a run directory's ``best.pt``/``last.pt`` (``prefer`` picks which first).
* ``read_checkpoint``: the one safe read, with every validation; old ``_target_`` paths mapped (``config.legacy``).
* ``open_checkpoint`` / ``load_checkpoint_model``: the model rebuilt from the checkpoint's own config (its
  ``weights``/``weights_backbone`` ignored: the file holds every weight), weights loaded strictly, in eval mode,
  with a ``CheckpointMeta``.
* ``convert``: an older file holding Python objects -> one the safe reader accepts.
* ``calibration.json`` beside a checkpoint (``Calibration``, written by ``train_seg.cli.calibrate``): per-class
  logit offsets that ``open_checkpoint(calibration="auto")`` applies to the model (``Calibrated``) when they were
  fitted on that very file (same name and step).
"""
from __future__ import annotations

import random
import re
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from train_seg.atomic import atomic_write, write_json_atomic
from train_seg.config.legacy import current_targets

CHECKPOINT_VERSION = 1
REQUIRED = ("model", "config", "class_names", "version")  # the entries of every train_seg checkpoint
PREFER = ("best", "last")  # what a run directory may give: best.pt (best optimized_metric) or last.pt
# albumentations.Normalize's defaults (used when the val pipeline's Normalize does not set them)
_DEFAULT_MEAN, _DEFAULT_STD, _DEFAULT_MAX_PIXEL = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 255.0
CALIBRATION_FILE = "calibration.json"
CALIBRATION_MODES = ("auto", "none")  # auto: apply a calibration.json fitted on the checkpoint; none: never


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


def find_checkpoint(spec: str | Path, prefer: str = "best", option: str = "ckpt") -> Path:
    """The one run-directory rule: a checkpoint file as given; a directory gives its ``<prefer>.pt``, else the other
    one (``prefer``: ``best`` or ``last``). Raises ``CheckpointError`` naming ``option`` (``trainer.resume``,
    ``ckpt``) and the fix when there is no such file or the directory holds neither."""
    if prefer not in PREFER:
        raise ValueError(f"prefer={prefer!r}: choose one of {', '.join(PREFER)}.")
    path = Path(str(spec)).expanduser()
    if path.is_dir():
        names = [f"{prefer}.pt", *(f"{other}.pt" for other in PREFER if other != prefer)]
        for name in names:
            if (path / name).is_file():
                return path / name
        raise CheckpointError(
            f"{option}={spec}: the directory {path.resolve()} holds no checkpoint (looked for {path / names[0]} and "
            f"{path / names[1]}). Pass a checkpoint file, or the run directory of a training run that completed at "
            "least one epoch."
        )
    if not path.is_file():
        raise CheckpointError(
            f"{option}={spec}: no such checkpoint (looked at {path.resolve()}). Pass a checkpoint file (best.pt / "
            "last.pt) or a run directory that holds one (e.g. outputs/<date>/<time>)."
        )
    return path


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The checkpoint at ``path``, read with ``torch.load(weights_only=True)`` (nothing in the file is executed),
    its config's old ``_target_`` paths mapped to today's (``config.legacy``).

    Raises ``CheckpointError`` (one paragraph naming the file and the fix) when the file is missing, truncated, not a
    PyTorch file, holds Python objects the safe loader refuses (with the conversion command when it looks like an
    older train_seg checkpoint), lacks an entry of a train_seg checkpoint (``REQUIRED``), or was written by a newer
    train_seg (its ``version`` above ``CHECKPOINT_VERSION``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file. Pass a last.pt / best.pt written by training.")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(unreadable_message(path, exc)) from exc
    _check_entries(path, state)
    version = state["version"]
    if not isinstance(version, int) or version > CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path} was written by a newer train_seg (checkpoint version {version!r}; this one reads versions up to "
            f"{CHECKPOINT_VERSION}). Upgrade train_seg (pip install -U train_seg, or git pull) to use it."
        )
    return {**state, "config": current_targets(dict(state["config"] or {}))}


def _check_entries(path: Path, state) -> None:
    """Refuses a loaded file that lacks one of ``REQUIRED``: a foreign file, or an older train_seg one without a
    version (which ``convert`` rewrites)."""
    missing = [key for key in REQUIRED if not isinstance(state, dict) or key not in state]
    if not missing:
        return
    if missing == ["version"]:
        raise CheckpointError(
            f"{path} has no 'version' entry: it looks like a train_seg checkpoint of an older version. If you trust "
            f"the file, convert it once: python -m train_seg.cli.checkpoint convert {path} <new.pt>, and use the new file."
        )
    held = ", ".join(sorted(map(str, state))[:6]) if isinstance(state, dict) else type(state).__name__
    raise CheckpointError(
        f"{path} is a PyTorch file but not a train_seg checkpoint: it has no {', '.join(map(repr, missing))} "
        f"entries (it holds {held or 'nothing'}). Pass a last.pt / best.pt written by train_seg training; a plain "
        "state dict of weights can only serve as model.weights=... of a training run."
    )


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


# -- what a checkpoint says, and its model -----------------------------------------------------------------------
@dataclass(frozen=True)
class CheckpointMeta:
    """What a checkpoint says about its model: class names and palette, the val pipeline's normalisation (``mean``,
    ``std`` per RGB channel and ``max_pixel_value``, as albumentations ``Normalize``), ``ignore_index``, whether the
    head is binary (one sigmoid channel), the architecture, the resolved training config (a plain dict), and where
    and when it was saved."""

    class_names: list[str]
    palette: list[list[int]]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    max_pixel_value: float
    ignore_index: int
    binary_head: bool
    arch: str
    config: dict = field(repr=False)
    path: Path | None = None
    epoch: int | None = None
    step: int | None = None
    calibration: Any = None  # the Calibration applied to the model (open_checkpoint), else None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def val_normalization(dataset_cfg: Mapping, where: str = "the checkpoint") -> tuple[tuple, tuple, float]:
    """``(mean, std, max_pixel_value)`` of the ``Normalize`` in the dataset config's val pipeline (identity on the
    [0, 1] scale, i.e. x / 255, without one). Raises ``CheckpointError`` naming ``where`` for several or a
    non-standard ``Normalize``."""
    specs = ((dataset_cfg.get("transforms") or {}).get("val") or [])
    found = [s for s in specs
             if isinstance(s, Mapping) and str(s.get("_target_", "")).rsplit(".", 1)[-1] == "Normalize"]
    if not found:
        return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), 255.0
    spec = found[0]
    if len(found) > 1 or spec.get("normalization", "standard") != "standard":
        raise CheckpointError(
            f"{where}: its val pipeline normalises with {found} (dataset.transforms.val); inference reproduces one "
            "standard albumentations Normalize (mean, std, max_pixel_value) only. Use pipeline-free inference on "
            "images you normalise yourself, with train_seg.evaluation.inference.infer_logits."
        )
    mean, std = spec.get("mean", _DEFAULT_MEAN), spec.get("std", _DEFAULT_STD)
    mean, std = ([float(v)] * 3 if isinstance(v, (int, float)) else [float(x) for x in v] for v in (mean, std))
    return tuple(mean), tuple(std), float(spec.get("max_pixel_value", _DEFAULT_MAX_PIXEL))


def checkpoint_meta(state: Mapping[str, Any], path: Path | None = None) -> CheckpointMeta:
    """The ``CheckpointMeta`` of a checkpoint's content (as ``read_checkpoint`` returns it) found at ``path``."""
    config = dict(state.get("config") or {})
    dataset, model_cfg = config.get("dataset") or {}, config.get("model") or {}
    mean, std, max_pixel = val_normalization(dataset, str(path or "the checkpoint"))
    return CheckpointMeta(
        class_names=[str(n) for n in state["class_names"]],
        palette=[[int(c) for c in colour] for colour in state.get("palette") or []],
        mean=mean, std=std, max_pixel_value=max_pixel, ignore_index=int(dataset.get("ignore_index", 255)),
        binary_head=bool(model_cfg.get("binary_head", False)), arch=str(model_cfg.get("arch", "unknown")),
        config=config, path=path, epoch=_int_or_none(state.get("epoch")), step=_int_or_none(state.get("global_step")),
    )


def _int_or_none(value) -> int | None:
    return None if value is None else int(value)


def build_checkpoint_model(state: Mapping[str, Any], meta: CheckpointMeta) -> nn.Module:
    """The model of the checkpoint's config with the checkpoint's weights (strict), on the CPU, in eval mode.
    Raises ``CheckpointError`` when the config's model cannot be built or the weights do not fit it."""
    from train_seg.models import build_model

    spec = dict(meta.config.get("model") or {})
    spec.setdefault("_target_", "train_seg.models.build_deeplabv3")
    spec.update({key: None for key in ("weights", "weights_backbone") if key in spec})  # all weights are in the file
    try:
        model = build_model(spec, num_classes=meta.num_classes)
    except ValueError as exc:
        raise CheckpointError(f"{meta.path}: the model its config describes cannot be built: {exc}") from exc
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, TypeError, AttributeError) as exc:
        head = "a binary head" if meta.binary_head else f"{meta.num_classes} classes"
        raise CheckpointError(
            f"{meta.path}: its weights do not fit the model its config describes (arch {meta.arch}, {head}): the "
            "file was edited, or written by another version of the model code. "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}"
        ) from exc
    return model.eval()


def open_checkpoint(spec: str | Path, device: str | torch.device = "cpu", option: str = "ckpt",
                    calibration: str = "auto") -> tuple[nn.Module, CheckpointMeta, dict]:
    """``load_checkpoint_model`` that also returns the checkpoint's full content (class weights, history...)."""
    path = find_checkpoint(spec, prefer="best", option=option)
    state = read_checkpoint(path)
    meta = checkpoint_meta(state, path)
    model = build_checkpoint_model(state, meta)
    found = calibration_of(meta, calibration)
    if found is not None:
        model = Calibrated(model, found.offsets).eval()
        meta = replace(meta, calibration=found)
    return model.to(torch.device(device)), meta, state


def load_checkpoint_model(path: str | Path, device: str | torch.device = "cpu",
                          calibration: str = "auto") -> tuple[nn.Module, CheckpointMeta]:
    """``(model in eval mode on device, CheckpointMeta)`` from a checkpoint file or a run directory (its best.pt,
    else its last.pt), with the offsets of its ``calibration.json`` applied when ``calibration="auto"`` (see
    ``calibration_of``; ``meta.calibration`` says which). Raises ``CheckpointError`` (one paragraph) for a missing
    path, a file that is truncated or not a checkpoint, weights that do not fit the model, and a calibration
    that no longer fits the file."""
    model, meta, _ = open_checkpoint(path, device, calibration=calibration)
    return model, meta


# -- post-hoc calibration ----------------------------------------------------------------------------------------
@dataclass
class Calibration:
    """The content of ``calibration.json``: ``offsets`` (one per class, added to the logits), how they were found
    (``method``, ``metric``, ``split``, ``tau``, ``pixels`` used), the metric ``before`` and ``after`` on that
    split, per-class IoU before and after, and the checkpoint it belongs to (``checkpoint``, ``step``)."""

    offsets: list[float]
    class_names: list[str]
    method: str
    split: str
    metric: str
    before: float
    after: float
    checkpoint: str
    step: int | None = None
    tau: float | None = None
    pixels: int = 0
    iou_before: dict[str, float | None] = field(default_factory=dict)
    iou_after: dict[str, float | None] = field(default_factory=dict)

    def write(self, path: str | Path) -> Path:
        return write_json_atomic(Path(path), asdict(self))

    @classmethod
    def read(cls, path: str | Path) -> "Calibration":
        """Raises ValueError naming the file when it is not a calibration of this version."""
        try:
            data = json.loads(Path(path).read_text())
            return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"{path}: not a readable train_seg calibration ({exc}); delete it or run "
                             "train_seg.cli.calibrate again.") from exc


class Calibrated(nn.Module):
    """``model`` whose ``out`` logits get ``offsets`` ``(K,)`` added (``aux`` untouched); the offsets are a buffer,
    so exported graphs carry them."""

    def __init__(self, model: nn.Module, offsets):
        super().__init__()
        self.model = model
        self.register_buffer("offsets", torch.as_tensor(offsets, dtype=torch.float32).reshape(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.model(x)
        result: dict[str, torch.Tensor] = {}
        for key, value in out.items():
            result[key] = value
        result["out"] = out["out"] + self.offsets.to(out["out"].dtype)
        return result


def calibration_of(meta: CheckpointMeta, mode: str = "auto") -> Calibration | None:
    """The calibration to apply to the checkpoint of ``meta``: with ``mode="auto"``, the ``calibration.json``
    beside it when it was fitted on a file of that name (None otherwise, and always with ``"none"``). Raises
    ``CheckpointError`` for an unknown mode, an unreadable file, or one fitted on the same name at another step or
    with other classes (the checkpoint changed since: calibrate again, or calibration=none)."""
    if mode not in CALIBRATION_MODES:
        raise CheckpointError(f"calibration={mode!r} is not valid; choose auto (apply the run's calibration.json "
                              "when it was fitted on this checkpoint) or none.")
    if mode == "none" or meta.path is None or not (meta.path.parent / CALIBRATION_FILE).is_file():
        return None
    where = meta.path.parent / CALIBRATION_FILE
    try:
        found = Calibration.read(where)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from exc
    if Path(found.checkpoint).name != meta.path.name:
        return None
    if found.step != meta.step or found.class_names != meta.class_names or len(found.offsets) != meta.num_classes:
        raise CheckpointError(
            f"{where} was fitted on {found.checkpoint} at step {found.step} with classes {found.class_names}, but "
            f"{meta.path} is now at step {meta.step} with classes {meta.class_names}: run train_seg.cli.calibrate "
            "again, or pass calibration=none to use the checkpoint as trained.")
    return found



# -- older files -------------------------------------------------------------------------------------------------
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
    """Rewrites an older train_seg checkpoint as one the safe loader reads, at ``new``, and checks that
    ``read_checkpoint`` accepts it. Reading the old file needs the one unsafe ``torch.load(weights_only=False)`` of the
    package (it unpickles Python objects): run it on files you trust only. ``CheckpointError`` when ``new`` exists,
    ``old`` cannot be read or is not a train_seg checkpoint."""
    old, new = Path(old), Path(new)
    if new.exists():
        raise CheckpointError(f"{new} exists already; choose a new file name for the converted checkpoint.")
    try:
        state = torch.load(old, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"{old} cannot be read even with weights_only=False ({exc}).") from exc
    missing = [key for key in REQUIRED if key != "version" and not (isinstance(state, dict) and key in state)]
    if missing:
        raise CheckpointError(f"{old} is not a train_seg checkpoint (no {', '.join(map(repr, missing))} entries): "
                              "nothing to do.")
    state = _to_loadable(state, "checkpoint")
    state.setdefault("version", CHECKPOINT_VERSION)
    atomic_write(new, lambda handle: torch.save(state, handle), binary=True)
    read_checkpoint(new)
    return new
