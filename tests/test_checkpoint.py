"""train_seg.checkpoint (find, read, build the model) and train_seg.config.legacy, with a checkpoint written by the
code before the package-per-stage layout (tests/fixtures/legacy_run: see tests/fixtures/make_legacy_checkpoint.py)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from hydra.utils import get_object

from conftest import compose_cfg
from train_seg.checkpoint import CheckpointError, find_checkpoint, open_checkpoint, read_checkpoint
from train_seg.config.instantiate import instantiate_node
from train_seg.config.legacy import current_target, current_targets

FIXTURES = Path(__file__).resolve().parent / "fixtures"
LEGACY = FIXTURES / "legacy_run"
CONFIGS = Path(__file__).resolve().parents[1] / "src" / "train_seg" / "configs"

# every train_seg `_target_` of the old configs/ (git show 2fb968c:src/train_seg/configs) whose module moved
OLD_TARGETS = ["train_seg.optim.warmup_schedule", "train_seg.preflight.PreflightCallback",
               "train_seg.sinks.ConsoleSink", "train_seg.sinks.TensorBoardSink", "train_seg.sweep.SweepSummaryCallback"]
# the same configs' train_seg targets whose path did not change
KEPT_TARGETS = ["train_seg.data.ade20k.ADE20KSegmentation", "train_seg.data.cityscapes.CityscapesSegmentation",
                "train_seg.data.folder.FolderSegmentation", "train_seg.data.sampler.RepeatFactorSampler",
                "train_seg.data.synthetic.SyntheticShapes", "train_seg.data.transforms.ClassAwareRandomCrop",
                "train_seg.data.voc.VOCSegmentation", "train_seg.losses.CrossEntropyLoss", "train_seg.losses.DiceLoss",
                "train_seg.losses.WeightedSum", "train_seg.models.build_deeplabv3"]
LEGACY_OVERRIDES = ["model._target_=tiny_segmenter.TinySegmenter", "dataset.num_train=4", "dataset.num_val=2",
                    "dataset.image_size=32", "trainer.batch_size=2", "trainer.val_batch_size=2",
                    "trainer.num_workers=0", "trainer.progress=false", "scheduler.warmup_steps=1",
                    "logger.tensorboard=null"]


@pytest.fixture
def fixture_models(monkeypatch):
    """The legacy run's model (``tiny_segmenter.TinySegmenter``) importable."""
    monkeypatch.syspath_prepend(str(FIXTURES))


def _targets(node) -> list[str]:
    if isinstance(node, dict):
        own = [v for k, v in node.items() if k == "_target_" and isinstance(v, str)]
        return own + [t for v in node.values() for t in _targets(v)]
    return [t for v in node for t in _targets(v)] if isinstance(node, list) else []


# -- the legacy checkpoint -------------------------------------------------------------------------------------
def test_a_checkpoint_of_the_flat_layout_rebuilds_the_same_model(fixture_models):
    model, meta, state = open_checkpoint(LEGACY / "last.pt")
    io = torch.load(LEGACY / "io.pt", weights_only=True)
    with torch.no_grad():
        assert torch.equal(model(io["input"])["out"], io["logits"])
    assert not model.training and meta.path == LEGACY / "last.pt" and meta.num_classes == len(state["class_names"])


def test_the_legacy_configs_old_targets_map_to_importable_ones():
    raw = torch.load(LEGACY / "last.pt", map_location="cpu", weights_only=True)["config"]
    assert {"train_seg.sinks.ConsoleSink", "train_seg.optim.warmup_schedule"} <= set(_targets(raw))
    config = read_checkpoint(LEGACY / "last.pt")["config"]
    assert config["logger"]["console"]["_target_"] == "train_seg.reporting.sinks.ConsoleSink"
    assert config["scheduler"]["_target_"] == "train_seg.engine.optim.warmup_schedule"
    for target in _targets(config):
        if target.startswith("train_seg."):
            get_object(target)


@pytest.mark.parametrize("old", OLD_TARGETS + KEPT_TARGETS)
def test_every_old_config_target_resolves(old):
    new = current_target(old)
    assert (new == old) == (old in KEPT_TARGETS)
    get_object(new)


def test_todays_targets_are_left_alone():
    import yaml

    targets = {t for path in CONFIGS.rglob("*.yaml") for t in _targets(yaml.safe_load(path.read_text()) or {})}
    assert len(targets) > 20 and all(current_target(t) == t for t in targets)
    assert current_targets({"a": [{"_target_": "train_seg.sinks.ConsoleSink", "x": "train_seg.sinks"}], "b": 1}) == {
        "a": [{"_target_": "train_seg.reporting.sinks.ConsoleSink", "x": "train_seg.sinks"}], "b": 1}


def test_a_users_old_yaml_node_still_instantiates():
    from train_seg.engine.optim import warmup_schedule

    built = instantiate_node({"_target_": "train_seg.optim.warmup_schedule", "_partial_": True, "warmup_steps": 1},
                             "scheduler")
    assert built.func is warmup_schedule and built.keywords["warmup_steps"] == 1


def test_resume_from_a_directory_holding_only_best_pt(fixture_models, tmp_path):
    """prefer=last falls back to best.pt; the legacy checkpoint resumes with today's trainer."""
    from train_seg.engine.trainer import prepare

    run = tmp_path / "old_run"
    run.mkdir()
    shutil.copy(LEGACY / "last.pt", run / "best.pt")
    assert find_checkpoint(run, prefer="last", option="trainer.resume") == run / "best.pt"
    cfg = compose_cfg(tmp_path, *LEGACY_OVERRIDES, "trainer.max_epochs=2", f"trainer.resume={run}",
                      f"paths.output_dir={tmp_path / 'new'}", f"paths.cache_dir={tmp_path / 'cache'}", tiny=False)
    resumed = prepare(cfg, tmp_path / "new")
    assert (resumed.start_epoch, resumed.global_step) == (1, 2)


# -- finding and reading ---------------------------------------------------------------------------------------
def test_find_checkpoint_prefers_as_asked_and_falls_back(tmp_path):
    for name in ("best.pt", "last.pt"):
        (tmp_path / name).write_bytes(b"x")
    assert find_checkpoint(tmp_path) == tmp_path / "best.pt"
    assert find_checkpoint(tmp_path, prefer="last") == tmp_path / "last.pt"
    (tmp_path / "last.pt").unlink()
    assert find_checkpoint(tmp_path, prefer="last") == tmp_path / "best.pt"
    assert find_checkpoint(tmp_path / "best.pt", prefer="last") == tmp_path / "best.pt"  # a file as given
    with pytest.raises(ValueError, match="prefer='first'"):
        find_checkpoint(tmp_path, prefer="first")


@pytest.mark.parametrize("option", ["trainer.resume", "ckpt"])
def test_find_checkpoint_errors_name_the_option_and_the_fix(tmp_path, option):
    with pytest.raises(CheckpointError) as missing:
        find_checkpoint(tmp_path / "nowhere", option=option)
    message = str(missing.value)
    assert message.startswith(f"{option}={tmp_path / 'nowhere'}: no such checkpoint") and "Pass a checkpoint" in message
    with pytest.raises(CheckpointError) as empty:
        find_checkpoint(tmp_path, prefer="last", option=option)
    message = str(empty.value)
    assert message.startswith(f"{option}=") and "holds no checkpoint" in message and "\n" not in message
    assert message.index(str(tmp_path / "last.pt")) < message.index(str(tmp_path / "best.pt"))


def test_read_checkpoint_refuses_what_is_not_a_current_train_seg_checkpoint(tmp_path):
    state = torch.load(LEGACY / "last.pt", map_location="cpu", weights_only=True)
    no_version = {k: v for k, v in state.items() if k != "version"}
    torch.save(no_version, tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match="no 'version' entry.*train_seg.cli.checkpoint convert"):
        read_checkpoint(tmp_path / "old.pt")
    torch.save({k: v for k, v in state.items() if k != "class_names"}, tmp_path / "nameless.pt")
    with pytest.raises(CheckpointError, match="not a train_seg checkpoint: it has no 'class_names'"):
        read_checkpoint(tmp_path / "nameless.pt")
    torch.save({**state, "version": "1"}, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match="newer train_seg"):
        read_checkpoint(tmp_path / "odd.pt")
