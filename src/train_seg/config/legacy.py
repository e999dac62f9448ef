"""``_target_`` paths of the flat layout (train_seg before its package-per-stage layout) mapped to today's.

Saved configs inside checkpoints and users' own yaml files may still name the old modules; ``current_targets``
rewrites every ``_target_`` of a config tree (``train_seg.checkpoint.read_checkpoint`` and
``train_seg.config.instantiate.instantiate_node`` apply it), so both keep working.
"""
from __future__ import annotations

from typing import Any

# old module -> the module that holds its public objects now (modules not listed kept their path)
MOVED_MODULES = {
    "train_seg.sinks": "train_seg.reporting.sinks",
    "train_seg.optim": "train_seg.engine.optim",
    "train_seg.preflight": "train_seg.cli.preflight",
    "train_seg.sweep": "train_seg.reporting.sweep",
    "train_seg.weighting": "train_seg.losses.weighting",
    "train_seg.metrics": "train_seg.evaluation.metrics",
}


def current_target(target: str) -> str:
    """``target`` with an old module prefix replaced by its new module; any other string unchanged."""
    for old, new in MOVED_MODULES.items():
        if target == old or target.startswith(old + "."):
            return new + target[len(old):]
    return target


def current_targets(node: Any) -> Any:
    """A copy of a plain config tree (dicts, lists) whose every string ``_target_`` went through ``current_target``;
    other values are returned as they are."""
    if isinstance(node, dict):
        return {key: current_target(value) if key == "_target_" and isinstance(value, str) else current_targets(value)
                for key, value in node.items()}
    if isinstance(node, (list, tuple)):
        return type(node)(current_targets(item) for item in node)
    return node
