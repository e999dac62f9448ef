"""Names of sweep job directories (= TensorBoard run names): ``<job number>_<swept overrides first>,<the rest>``.

Hydra's own ``override_dirname`` sorts every override alphabetically, so in a sweep launched with a few shared
overrides the names differ only past the point where run lists and legends cut them off. ``job_dirname`` puts the
swept keys first: those of ``hydra.sweeper.params`` (presets, Optuna's search space) and the command-line sweep
overrides recorded in the sweep's ``multirun.yaml`` (``weighting=none,inverse``), then the other overrides. Keys in
``hydra.job.config.override_dirname.exclude_keys`` are left out, as Hydra does. A name longer than ``MAX_NAME``
characters is cut and ends in a short hash of the whole, so it stays unique and within file-system limits.
"""
from __future__ import annotations

import hashlib

from omegaconf import OmegaConf

MAX_NAME = 120
RESOLVER = "train_seg_job_dirname"


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def ordered_overrides(task: list[str], swept: list[str], exclude: set[str]) -> list[str]:
    kept = [o for o in task if _key(o) not in exclude]
    first = sorted(o for o in kept if _key(o) in swept)
    return first + sorted(o for o in kept if _key(o) not in swept)


def shorten(name: str, limit: int = MAX_NAME) -> str:
    if len(name) <= limit:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:8]
    return f"{name[:limit - 9]}~{digest}"


def job_dirname(*, _root_) -> str:
    from train_seg.summary import swept_keys

    hydra = _root_.hydra
    params = OmegaConf.select(_root_, "hydra.sweeper.params", default=None) or {}
    swept = list(params) + swept_keys(str(hydra.sweep.dir))
    dirname = hydra.job.config.override_dirname
    overrides = ordered_overrides([str(o) for o in hydra.overrides.task], swept, set(dirname.exclude_keys))
    name = str(dirname.item_sep).join(o.replace("=", str(dirname.kv_sep), 1) for o in overrides)
    return shorten(f"{hydra.job.num}_{name}" if name else str(hydra.job.num))


def register_resolvers() -> None:
    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, job_dirname)
