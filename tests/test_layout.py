"""The package layout is the architecture: every module belongs to one stage, and imports run one way (a stage never
imports a later one). Read from the AST of every module, function-level imports included."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "train_seg"

# low to high: a module may import its own stage and the stages before it, never one after it
STAGES = ["atomic", "config", "distributed", "data", "models", "losses", "checkpoint", "evaluation", "reporting",
          "search", "engine", "cli", "__main__"]
TOP_LEVEL = {"__init__.py", "__main__.py", "atomic.py", "checkpoint.py", "distributed.py", "py.typed", "configs",
             "config", "data", "models", "losses", "engine", "evaluation", "reporting", "search", "cli"}


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "configs" not in p.parts)


def _stage(dotted: str) -> str | None:
    """The stage of ``train_seg.<stage>...``; None for the package itself (``train_seg.__version__``)."""
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "train_seg" else None


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names += [f"{node.module}.{alias.name}" if node.module == "train_seg" else node.module
                      for alias in node.names]
    return [name for name in names if name.startswith("train_seg.")]


def _own_stage(path: Path) -> str:
    first = path.relative_to(PACKAGE).parts[0]
    return first[:-3] if first.endswith(".py") else first


def test_the_top_level_holds_only_the_stages():
    entries = {p.name for p in PACKAGE.iterdir() if p.name != "__pycache__"}
    assert entries <= TOP_LEVEL, sorted(entries - TOP_LEVEL)
    assert len(entries) <= 15


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_run_one_way(path):
    own = _own_stage(path)
    if own == "__init__":
        return  # the package's lazy exports (train_seg.load_checkpoint_model) may name any stage
    rank = STAGES.index(own)
    later = [name for name in _imports(path) if _stage(name) in STAGES and STAGES.index(_stage(name)) > rank]
    assert not later, f"{path.relative_to(PACKAGE)} ({own}) imports later stages: {later}"


def test_the_checker_sees_a_backward_import(tmp_path):
    bad = tmp_path / "x.py"
    bad.write_text("def f():\n    from train_seg.engine.trainer import prepare\nfrom train_seg import distributed\n")
    assert sorted(_imports(bad)) == ["train_seg.distributed", "train_seg.engine.trainer"]


# -- the shape of the code -------------------------------------------------------------------------------------
def _functions(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.end_lineno - node.lineno + 1


def test_no_function_in_src_is_over_60_lines_and_fit_is_short():
    long = [f"{path.relative_to(PACKAGE)}:{name} ({length} lines)" for path in PACKAGE.rglob("*.py")
            for name, length in _functions(path) if length > 60]
    assert long == []
    assert dict(_functions(PACKAGE / "engine" / "trainer.py"))["fit"] <= 50


def _imported_names(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_results_travel_one_way_nothing_imports_the_loop():
    """Only the command-line entry points import the loop's module; sinks, engine, record and state never do."""
    importers = sorted(str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py")
                       if "train_seg.engine.trainer" in _imported_names(path) and path.name != "trainer.py")
    assert importers == ["__main__.py", "cli/preflight.py"]  # the entry point and its pre-Hydra check
    for module in ("reporting/events.py", "reporting/record.py", "engine/state.py", "engine/loop.py",
                   "evaluation/loop.py", "evaluation/metrics.py"):  # the stages before the sinks
        assert not [name for name in _imported_names(PACKAGE / module) if name.startswith("train_seg.reporting.sinks")], module


def test_the_record_is_written_in_one_module():
    """metrics.json is named and written by train_seg.reporting.record only (and read by the summary through it)."""
    writers = sorted(str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py")
                     if '"metrics.json"' in path.read_text() and path.name != "record.py")
    assert writers == [] or all(name == "summary.py" for name in writers), writers


def test_every_module_docstring_is_a_contract_of_at_most_20_lines():
    long = []
    for path in _modules():
        doc = ast.get_docstring(ast.parse(path.read_text()), clean=False)
        if doc and len(doc.splitlines()) > 20:
            long.append(f"{path.relative_to(PACKAGE)} ({len(doc.splitlines())} lines)")
    assert long == []
