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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from omegaconf import OmegaConf

MAX_NAME = 120
RESOLVER = "train_seg_job_dirname"


# overrides a sweeper adds for its own use, never a setting of the run: left out of names, summaries and groups
SWEEPER_KEYS = ("trial",)


def override_key(override: str) -> str:
    """``a.b`` of ``+a.b=1`` / ``~a.b`` / ``a.b=1``."""
    return override.split("=", 1)[0].lstrip("+~")


def swept_keys(sweep_dir: str | Path) -> list[str]:
    """The keys the sweep varies, from its ``multirun.yaml``: command-line sweep overrides (``weighting=a,b``,
    ``choice(...)``, ``range(...)``) and the keys of ``hydra.sweeper.params`` (presets, Optuna's search space).
    Empty when the file is missing or unreadable (the summary then compares the jobs' overrides instead)."""
    path = Path(sweep_dir) / "multirun.yaml"
    if not path.is_file():
        return []
    try:
        import yaml
        from hydra.core.override_parser.overrides_parser import OverridesParser

        hydra_cfg = (yaml.safe_load(path.read_text()) or {}).get("hydra") or {}
        task = [str(o) for o in ((hydra_cfg.get("overrides") or {}).get("task") or [])]
        keys = [o.key_or_group for o in OverridesParser.create().parse_overrides(task) if o.is_sweep_override()]
        keys += [str(k) for k in ((hydra_cfg.get("sweeper") or {}).get("params") or {})]
    except Exception:  # an unreadable multirun.yaml only costs the nicer labels
        return []
    return list(dict.fromkeys(keys))


def ordered_overrides(task: list[str], swept: list[str], exclude: set[str]) -> list[str]:
    kept = [o for o in task if override_key(o) not in exclude]
    first = sorted(o for o in kept if override_key(o) in swept)
    return first + sorted(o for o in kept if override_key(o) not in swept)


def shorten(name: str, limit: int = MAX_NAME) -> str:
    if len(name) <= limit:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:8]
    return f"{name[:limit - 9]}~{digest}"


def job_dirname(*, _root_) -> str:
    hydra = _root_.hydra
    params = OmegaConf.select(_root_, "hydra.sweeper.params", default=None) or {}
    swept = list(params) + swept_keys(str(hydra.sweep.dir))
    dirname = hydra.job.config.override_dirname
    overrides = ordered_overrides([str(o) for o in hydra.overrides.task], swept, set(dirname.exclude_keys))
    name = str(dirname.item_sep).join(o.replace("=", str(dirname.kv_sep), 1) for o in overrides)
    # an Optuna trial is numbered by the study (unique over all workers of one study), a grid job by its launch order
    num = OmegaConf.select(_root_, "trial.number", default=None)
    num = hydra.job.num if num is None else num
    return shorten(f"{num}_{name}" if name else str(num))


def register_resolvers() -> None:
    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, job_dirname)


@dataclass(frozen=True)
class RunContext:
    """What the Hydra job of a run says about it: a sweep job or not, the keys the sweep varies, and the option
    chosen for each config group (``{"loss": "focal"}``)."""

    multirun: bool = False
    swept: tuple[str, ...] = ()
    choices: Mapping[str, str] = field(default_factory=dict)


def job_context(hydra: Mapping | None, run_dir: str | Path) -> RunContext:
    """The ``RunContext`` of the job whose ``hydra`` node (the in-memory ``HydraConfig``, as a plain mapping) is
    given: ``hydra.mode``, the keys of ``hydra.sweeper.params`` plus the command-line sweep overrides of the
    sweep's ``multirun.yaml`` in a parent of ``run_dir`` (``swept_keys``); the choices are
    ``hydra.runtime.choices`` (``hydra/*`` groups left out) updated by the job's own overrides. Without a Hydra
    node (the Python API): a sweep job when a parent of ``run_dir`` holds a ``multirun.yaml``, no choices."""
    hydra = hydra or {}
    choices = {str(k): str(v) for k, v in ((hydra.get("runtime") or {}).get("choices") or {}).items()
               if v is not None and not str(k).startswith("hydra")}
    overrides = [str(o) for o in ((hydra.get("overrides") or {}).get("task") or [])]
    choices.update({override_key(o): o.split("=", 1)[1] for o in overrides if "=" in o})
    sweep_dir = next((d for d in Path(run_dir).resolve().parents if (d / "multirun.yaml").is_file()), None)
    multirun = str(hydra.get("mode", "")).upper().endswith("MULTIRUN") if hydra else sweep_dir is not None
    if not multirun:
        return RunContext(choices=choices)
    swept = [str(k) for k in ((hydra.get("sweeper") or {}).get("params") or {})]
    swept += swept_keys(sweep_dir) if sweep_dir is not None else []
    return RunContext(True, tuple(dict.fromkeys(swept)), choices)


def current_job_context(run_dir: str | Path) -> RunContext:
    """``job_context`` of the Hydra job running now (``HydraConfig``, in memory), or of none outside a Hydra app."""
    from hydra.core.hydra_config import HydraConfig

    hydra = HydraConfig.instance().cfg
    node = OmegaConf.to_container(hydra.hydra, resolve=False) if hydra is not None and "hydra" in hydra else None
    return job_context(node, run_dir)
