"""train_seg.search.study: storage strings, and a trial's reporter against a real Optuna study."""
from __future__ import annotations

import json
import math

import pytest

optuna = pytest.importorskip("optuna")

from train_seg.search import study as search_study  # noqa: E402
from train_seg.search.study import (MEMORY, SearchError, TrialPruned, TrialReporter, TrialSpec, open_storage,  # noqa: E402
                                    storage_url)


def test_storage_strings(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for in_process in (True, False):  # by default a journal in the sweep directory, whatever the launcher
        assert storage_url(None, "sweep", in_process) == f"journal:{tmp_path / 'sweep' / 'optuna.journal'}"
    assert storage_url("runs/search.journal", "sweep", False) == f"journal:{tmp_path / 'runs' / 'search.journal'}"
    assert storage_url(f"journal://{tmp_path}/a.log", "sweep", False) == f"journal:{tmp_path / 'a.log'}"
    assert storage_url("sqlite:///search.db", "sweep", False) == "sqlite:///search.db"
    assert storage_url("postgresql+psycopg2://u:p@host/db", "sweep", False) == "postgresql+psycopg2://u:p@host/db"
    assert storage_url("memory", "sweep", in_process=True) == MEMORY
    with pytest.raises(SearchError, match="other processes, which could not report"):
        storage_url("memory", "sweep", in_process=False)
    with pytest.raises(SearchError, match=r"storage='study\.db' is not a storage.*sqlite:///search\.db"):
        storage_url("study.db", "sweep", False)


def test_the_trial_spec_survives_the_hydra_override_grammar():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    pruner = json.dumps({"_target_": "optuna.pruners.MedianPruner", "n_startup_trials": 5})
    spec = TrialSpec("journal:/data/s p/search.journal", "my study", 7, pruner)
    (override,) = OverridesParser.create().parse_overrides([spec.override()])
    assert override.key_or_group == "trial" and TrialSpec.from_config(override.value()) == spec
    assert TrialSpec.from_config(None) is None


def _study(tmp_path, pruner=None):
    url = f"journal:{tmp_path / 'study.journal'}"
    study = optuna.create_study(storage=open_storage(url), study_name="s", direction="maximize", pruner=pruner)
    return url, study


def test_the_reporter_reports_and_the_pruner_stops_the_trial(tmp_path):
    url, study = _study(tmp_path)
    trial = study.ask()
    always = json.dumps({"_target_": "optuna.pruners.ThresholdPruner", "lower": 2.0, "n_warmup_steps": 2})
    reporter = TrialReporter(TrialSpec(url, "s", trial.number, always))
    reporter.start(tmp_path / "run")
    reporter.check(0.25, 1)  # epoch 1 < n_warmup_steps: reported, not pruned
    with pytest.raises(TrialPruned, match="trial 0 pruned after the evaluation of epoch 2") as caught:
        reporter.check(0.5, 2)
    assert caught.value.run_status == "pruned"
    frozen = optuna.load_study(study_name="s", storage=open_storage(url)).trials[0]
    assert frozen.intermediate_values == {1: 0.25, 2: 0.5}  # written to the storage another process reads
    assert frozen.user_attrs["run_dir"] == str((tmp_path / "run").resolve())


def test_no_pruner_never_stops_and_nan_is_not_reported(tmp_path):
    url, study = _study(tmp_path)
    trial = study.ask()
    reporter = TrialReporter(TrialSpec(url, "s", trial.number, json.dumps({"_target_": "optuna.pruners.NopPruner"})))
    reporter.check(math.nan, 1)
    reporter.check(0.1, 2)
    assert optuna.load_study(study_name="s", storage=open_storage(url)).trials[0].intermediate_values == {2: 0.1}


def test_memory_storage_is_one_per_process():
    assert open_storage(MEMORY) is open_storage(MEMORY)


def test_a_missing_or_old_optuna_is_one_paragraph(monkeypatch):
    monkeypatch.setattr(optuna, "__version__", "2.10.1")
    with pytest.raises(SearchError, match=r"needs Optuna >= 4, but 2\.10\.1 is installed .*pip uninstall hydra-optuna"):
        search_study.require_optuna()
    monkeypatch.setitem(__import__("sys").modules, "optuna", None)
    with pytest.raises(SearchError, match=r"pip install 'train_seg\[optuna\]'"):
        search_study.require_optuna()
