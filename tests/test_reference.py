"""The docs' configuration reference (docs/configuration.md, and docs/losses.md for `loss` and `weighting`) is in
sync with the composed config.

For the top level, `trainer` and `paths` (typed: train_seg.config.schema), and for `model` and `weighting` as far as the
pages document them key by key: every key of the composed config is documented, no documented key is missing
from it, and the documented default equals the composed one (`null`, `true`, numbers and backticks normalised).
"""
from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from conftest import ROOT
from train_seg.config import schema
# the pages whose `## ` subsections make the reference (a subsection title is unique across them)
PAGES = [ROOT / "docs" / "configuration.md", ROOT / "docs" / "losses.md"]
CELL_SPLIT = re.compile(r"(?<!\\)\|")
# `key` = value, in the weighting table's parameters column and its "Common keys:" paragraph
ASSIGNMENT = re.compile(r"`(\w+)` = (`[^`]*`|\[[^\]]*\]|[^\s,;()]+)")
# keys that select the option rather than configure it (the option's name, its builder)
SELECTORS = {"model": {"_target_", "arch"}, "weighting": {"scheme"}}


# -- the pages ------------------------------------------------------------------------------------------------
def reference_sections() -> dict[str, str]:
    """Title of each `## ` subsection of the reference pages -> its text."""
    found = {}
    for page in PAGES:
        parts = page.read_text(encoding="utf-8").split("\n## ")[1:]
        for part in parts:
            found[part.split("\n", 1)[0].strip()] = part.split("\n", 1)[1] if "\n" in part else ""
    return found


def section(title_start: str) -> str:
    matches = [body for title, body in reference_sections().items() if title.startswith(title_start)]
    assert len(matches) == 1, f'docs, configuration reference: expected one "## {title_start}..." subsection'
    return matches[0]


def tables(body: str) -> list[list[dict[str, str]]]:
    """The Markdown tables of a subsection, each a list of rows {header: cell}."""
    found, block = [], []
    for line in body.splitlines() + [""]:
        if line.startswith("|"):
            block.append([cell.strip() for cell in CELL_SPLIT.split(line.strip().strip("|"))])
            continue
        if len(block) >= 2:
            found.append([dict(zip(block[0], row)) for row in block[2:]])
        block = []
    return found


def key_table(title_start: str) -> dict[str, str]:
    """{key: default cell} of the `| key | default | meaning |` table of a subsection."""
    matches = [t for t in tables(section(title_start)) if t and list(t[0])[:2] == ["key", "default"]]
    assert len(matches) == 1, f"docs, {title_start}: expected one `| key | default | meaning |` table"
    return {unquote(row["key"]): row["default"] for row in matches[0]}


def unquote(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] == "`" and text.count("`") == 2:
        return text[1:-1]
    return text


# -- comparing values -----------------------------------------------------------------------------------------
def normalized(value):
    """A comparable form of a docs cell or a config value: null/None, booleans, numbers (int == float), text."""
    if isinstance(value, str):
        text = unquote(value)
        lowered = text.lower()
        if text.startswith("[") and text.endswith("]"):  # a list written in YAML flow style
            import yaml

            return normalized(yaml.safe_load(text))
        if lowered in ("null", "none", "~"):
            return ("null",)
        if lowered in ("true", "false"):
            return ("bool", lowered == "true")
        try:
            return ("number", float(text))
        except ValueError:
            return ("text", text)
    if value is None:
        return ("null",)
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, (int, float)):
        return ("number", float(value))
    if isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig":
        return ("list", tuple(normalized(v) for v in value))
    return ("other", repr(value))


def readme_text(value) -> str:
    """How a default is written in the docs (for the suggested row of a failure message)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return f"{value:g}"
    return f"`{value}`"


def composed(*overrides: str) -> dict:
    """The composed config of `python -m train_seg <overrides>`, interpolations left unresolved."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(Path(ROOT / "src" / "train_seg" / "configs").resolve()), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides))
    GlobalHydra.instance().clear()
    return OmegaConf.to_container(cfg, resolve=False)


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (ROOT / "src" / "train_seg" / "configs" / group).glob("*.yaml"))


def suggested_row(key: str, value) -> str:
    """The docs row of a key: for a schema key from its default and one-line doc in train_seg.config.schema."""
    docs = {dotted: f for dotted, f in schema.schema_fields()}
    name = key.rsplit(".", 1)[-1]
    if key not in docs:
        return f"`{name}` (default {readme_text(value)})"
    return f"| `{name}` | {readme_text(schema.default_of(docs[key]))} | {docs[key].metadata['doc']} |"


def assert_in_sync(where: str, documented: dict[str, str], config: dict, prefix: str = "") -> None:
    undocumented = [k for k in config if k not in documented]
    assert not undocumented, (
        f"docs, {where}: keys of the composed config that are not documented: {undocumented}. Add:\n"
        + "\n".join(suggested_row(prefix + k, config[k]) for k in undocumented))
    stale = [k for k in documented if k not in config]
    assert not stale, f"docs, {where}: documented keys that the composed config does not have: {stale}"
    wrong = {k: (documented[k], config[k]) for k in config if normalized(documented[k]) != normalized(config[k])}
    assert not wrong, (
        f"docs, {where}: documented default != composed default (docs, config): {wrong}")


# -- the typed levels: top level, trainer, paths ----------------------------------------------------------------
def test_top_level_keys_and_defaults_match_the_readme():
    cfg = composed()
    group_nodes = {f.name for f in fields(schema.TrainConfig) if f.metadata.get("group")}
    assert all(k in group_nodes for k, v in cfg.items() if isinstance(v, dict)), "a top-level node that is no group"
    scalars = {k: v for k, v in cfg.items() if k not in group_nodes}
    assert scalars, "the composed config has no top-level key"
    assert_in_sync("Top level", key_table("Top level"), scalars)


@pytest.mark.parametrize("group", ["trainer", "paths", "metrics"])
def test_typed_group_keys_and_defaults_match_the_readme(group):
    assert_in_sync(f"`{group}`", key_table(f"`{group}`"), composed()[group], prefix=f"{group}.")


def test_readme_defaults_are_the_schema_defaults():
    """The documented defaults of the typed keys are the schema's (a YAML overriding one would also fail above)."""
    documented = {"": key_table("Top level"), "trainer.": key_table("`trainer`"), "paths.": key_table("`paths`"),
                  "metrics.": key_table("`metrics`")}
    for key, f in schema.schema_fields():
        prefix = key.rsplit(".", 1)[0] + "." if "." in key else ""
        name = key.rsplit(".", 1)[-1]
        assert name in documented[prefix], f"docs/configuration.md lacks {key}:\n{suggested_row(key, schema.default_of(f))}"
        assert normalized(documented[prefix][name]) == normalized(schema.default_of(f)), key


# -- model: one table for every option ---------------------------------------------------------------------------
PER_OPTION = re.compile(r"\s*[^,()]+?\s*\([^)]+\)(\s*,\s*[^,()]+?\s*\([^)]+\))*\s*")


def option_default(cell: str, option: str) -> str:
    """The default of one option: a cell is either one value, or `value (qualifier), value (qualifier)` where the
    qualifier names the options it applies to (`0.1 (MobileNet), null (ResNets)`)."""
    if not PER_OPTION.fullmatch(cell):
        return cell
    for value, qualifier in re.findall(r"([^,()]+?)\s*\(([^)]+)\)", cell):
        word = qualifier.strip().lower().replace("-", "").rstrip("s")
        if word in option.replace("-", "").lower():
            return value.strip()
    raise AssertionError(f"docs, `model`: default {cell!r} names no qualifier that applies to {option}")


TEST_MODELS = ("tiny",)  # documented in one sentence of the `model` section, not in the DeepLabV3 key table


@pytest.mark.parametrize("option", [o for o in options("model") if o not in TEST_MODELS])
def test_model_keys_and_defaults_match_the_readme(option):
    cfg = {k: v for k, v in composed(f"model={option}")["model"].items() if k not in SELECTORS["model"]}
    documented = {k: option_default(cell, option) for k, cell in key_table("`model`").items()}
    assert_in_sync(f"`model` (model={option})", documented, cfg, prefix="model.")


@pytest.mark.parametrize("option", TEST_MODELS)
def test_the_test_models_keys_are_named_in_the_readme(option):
    body = section("`model`")
    line = next((ln for ln in body.splitlines() if ln.startswith(f"`model={option}`")), None)
    assert line, f"docs, `model`: no line starting with `model={option}`"
    cfg = {k: v for k, v in composed(f"model={option}")["model"].items() if k not in SELECTORS["model"]}
    named = set(re.findall(r"`(\w+)` \(default ([^)]*)\)", line))
    assert named == {(k, str(v).lower()) for k, v in cfg.items()}, (line, cfg)


def test_model_arch_is_the_option_name():
    for option in options("model"):
        assert composed(f"model={option}")["model"]["arch"] == option


# -- weighting: a parameters column per option and the common keys -----------------------------------------------
def weighting_reference() -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    body = section("`weighting`")
    table = [t for t in tables(body) if t and list(t[0])[0] == "option"]
    assert len(table) == 1, "docs, `weighting`: expected one `| option | formula | parameters |` table"
    per_option = {unquote(row["option"]): dict(ASSIGNMENT.findall(row["parameters"])) for row in table[0]}
    common_text = re.search(r"^Common keys:(.*?)(?:\n\n|\Z)", body, re.S | re.M)
    assert common_text, 'docs, `weighting`: the "Common keys:" paragraph is missing'
    return per_option, dict(ASSIGNMENT.findall(common_text.group(1)))


def test_weighting_options_are_the_documented_ones():
    per_option, _ = weighting_reference()
    assert sorted(per_option) == options("weighting")


@pytest.mark.parametrize("option", options("weighting"))
def test_weighting_keys_and_defaults_match_the_readme(option):
    per_option, common = weighting_reference()
    node = composed(f"weighting={option}")["weighting"]
    assert node["scheme"] == option
    documented = {**common, **per_option.get(option, {})}
    cfg = {k: v for k, v in node.items() if k not in SELECTORS["weighting"]}
    # a mandatory value (`???`, e.g. manual's `values`) has no default to compare: only its presence is checked
    mandatory = [k for k, v in cfg.items() if v == "???"]
    assert_in_sync(f"`weighting` (weighting={option})", {k: v for k, v in documented.items() if k not in mandatory},
                   {k: v for k, v in cfg.items() if k not in mandatory}, prefix="weighting.")
    assert all(k in documented for k in mandatory), (option, mandatory)


# -- the parser itself -----------------------------------------------------------------------------------------
def test_normalisation():
    assert normalized("`null`") == normalized(None) == normalized("null")
    assert normalized("true") == normalized(True) != normalized(1)
    assert normalized("0.5") == normalized(0.5) and normalized("12") == normalized(12) == normalized(12.0)
    assert normalized("1e-4") == normalized(0.0001)
    assert normalized("`auto`") == normalized("auto") != normalized("`32`")
    assert option_default("0.1 (MobileNet), null (ResNets)", "deeplabv3_resnet50") == "null"
    assert option_default("0.1 (MobileNet), null (ResNets)", "deeplabv3_mobilenet_v3_large") == "0.1"
    assert option_default("null", "deeplabv3_resnet50") == "null"


def test_a_wrong_default_or_a_missing_row_is_caught(tmp_path, monkeypatch):
    text = PAGES[0].read_text(encoding="utf-8")
    wrong = text.replace("| `max_epochs` | 8 |", "| `max_epochs` | 13 |", 1)
    missing = re.sub(r"\n\| `log_every` \|[^\n]*", "", text, count=1)
    assert wrong != text and missing != text
    trainer = composed()["trainer"]
    for variant, complaint in ((wrong, "default != composed default"), (missing, "not documented: ['log_every']")):
        (tmp_path / "configuration.md").write_text(variant, encoding="utf-8")
        monkeypatch.setitem(globals(), "PAGES", [tmp_path / "configuration.md", *PAGES[1:]])
        with pytest.raises(AssertionError, match=re.escape(complaint)):
            assert_in_sync("`trainer`", key_table("`trainer`"), trainer, prefix="trainer.")
