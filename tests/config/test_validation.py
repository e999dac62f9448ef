"""Every option of every config group composes, and the objects it describes build."""

import pytest
import torch

from conftest import ROOT
from train_seg.engine import builder as build
from train_seg.data.class_stats import compute_class_stats
from train_seg.losses.weighting import class_weights

GROUPS = ROOT / "src" / "train_seg" / "configs"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (GROUPS / group).glob("*.yaml"))


def test_every_group_has_options_and_default_composes(make_cfg):
    cfg = make_cfg()
    for group in ("dataset", "model", "loss", "weighting", "sampler", "optimizer", "scheduler", "trainer", "logger"):
        assert options(group), group
        assert group in cfg


@pytest.mark.parametrize("option", options("model"))
def test_model_options_build_and_run(make_cfg, option):
    cfg = make_cfg(f"model={option}")
    model = build.build_model(cfg.model, num_classes=4).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))["out"]
    assert out.shape == (1, 4, 64, 64) and cfg.model.arch == option


@pytest.mark.parametrize("option", options("weighting"))
def test_weighting_options(make_cfg, tmp_path, option):
    extra = ["weighting.values=[1,2,3,4]"] if option == "manual" else []
    cfg = make_cfg(f"weighting={option}", *extra)
    stats = compute_class_stats(build.build_source(cfg.dataset, "train"), cache_dir=tmp_path / "c", progress=False)
    from omegaconf import OmegaConf

    weights = class_weights(stats, **OmegaConf.to_container(cfg.weighting))
    assert weights.shape == (4,) and torch.isfinite(weights).all()
    assert weights.mean().item() == pytest.approx(1.0, rel=1e-5)  # every preset normalises to mean 1


@pytest.mark.parametrize("option", options("loss"))
def test_loss_options_build_and_give_finite_loss(make_cfg, option):
    cfg = make_cfg(f"loss={option}")
    binary = any(k in option for k in ("bce", "sigmoid", "binary"))
    channels = 1 if binary else 4
    weights = torch.tensor([0.5, 1.0]) if binary else torch.tensor([0.2, 1.0, 1.5, 3.0])
    criterion = build.build_criterion(cfg.loss, weights)
    logits = torch.randn(2, channels, 8, 8, requires_grad=True)
    target = torch.randint(0, 2 if binary else 4, (2, 8, 8))
    target[0, 0] = 255
    loss = criterion(logits, target)
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss) and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("option", options("optimizer"))
@pytest.mark.parametrize("scheduler", options("scheduler"))
def test_optimizer_and_scheduler_options(make_cfg, option, scheduler):
    cfg = make_cfg(f"optimizer={option}", f"scheduler={scheduler}")
    model = torch.nn.Linear(2, 2)
    opt = build.build_optimizer(cfg.optimizer, model)
    sched = build.build_scheduler(cfg.scheduler, opt, total_steps=10)
    assert opt.param_groups[0]["lr"] > 0 and opt.defaults["lr"] == cfg.optimizer.lr
    for _ in range(10):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] <= cfg.optimizer.lr


@pytest.mark.parametrize("option", options("sampler"))
def test_sampler_options(make_cfg, tmp_path, option):
    cfg = make_cfg(f"sampler={option}")
    stats = compute_class_stats(build.build_source(cfg.dataset, "train"), cache_dir=tmp_path / "c", progress=False)
    sampler = build.build_sampler(cfg.sampler, stats.presence, seed=0)
    if option == "none":
        assert sampler is None
    else:
        sampler.set_epoch(0)
        indices = list(sampler)
        assert len(indices) == len(sampler) >= stats.num_images and set(indices) <= set(range(stats.num_images))


@pytest.mark.parametrize("option", [o for o in options("dataset") if o != "synthetic"])
def test_file_datasets_require_a_root(make_cfg, option):
    cfg = make_cfg(f"dataset={option}", tiny=False)
    with pytest.raises(ValueError, match="dataset.root"):
        build.build_source(cfg.dataset, "train")


def test_synthetic_transforms_build(make_cfg):
    cfg = make_cfg()
    dataset_cls = build.build_source(cfg.dataset, "train")
    for split in ("train", "val"):
        transform = build.build_transform(cfg.dataset, split, seed=0)
        out = transform(image=dataset_cls.load_image(0), mask=dataset_cls.load_mask(0))
        assert tuple(out["image"].shape) == (3, 64, 64) and out["image"].dtype == torch.float32


# -- typed config: train_seg.config.schema ------------------------------------------------------------------------------
def test_import_train_seg_registers_the_schemas_without_importing_torch():
    import subprocess
    import sys

    code = ("import sys, train_seg; from hydra.core.config_store import ConfigStore; repo = ConfigStore.instance().repo; "
            "assert {'base_train.yaml'} <= set(repo), repo.keys(); "
            "assert 'base_trainer.yaml' in repo['trainer'] and 'base_paths.yaml' in repo['paths']; "
            "assert 'torch' not in sys.modules, 'import train_seg imported torch'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("override, key", [
    ("trainer.max_epochs=abc", "trainer.max_epochs"),
    ("trainer.max_steps=1.5", "trainer.max_steps"),
    ("trainer.progress=maybe", "trainer.progress"),
    ("trainer.aux_weight=heavy", "trainer.aux_weight"),
    ("seed=x", "seed"),
    ("rare_share=few", "rare_share"),
])
def test_a_wrong_type_fails_at_compose_time_naming_the_key(make_cfg, override, key):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as info:
        make_cfg(override)
    assert f"full_key: {key}\n" in f"{info.value.__cause__}\n"


def test_an_unknown_key_of_a_typed_group_is_refused(make_cfg):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="trainer.max_epoch"):
        make_cfg("trainer.max_epoch=3")


def test_the_yaml_does_not_repeat_the_schema_defaults():
    from dataclasses import fields

    import yaml

    from train_seg.config import schema
    for group in ("trainer", "paths"):
        node = yaml.safe_load((GROUPS / group / "default.yaml").read_text())
        assert set(node) == {"defaults"} and node["defaults"][-1] == "_self_", group
        assert node["defaults"][0] == f"base_{group}"
    top = yaml.safe_load((GROUPS / "train.yaml").read_text())
    assert top["defaults"][0] == "base_train"
    scalars = {f.name for f in fields(schema.TrainConfig) if not f.metadata.get("group")}
    assert not scalars & set(top), "configs/train.yaml repeats a default of train_seg.config.schema.TrainConfig"


def test_composed_defaults_are_the_schema_defaults(make_cfg):
    from omegaconf import OmegaConf

    from train_seg.config import schema
    cfg = OmegaConf.to_container(make_cfg(tiny=False), resolve=False)
    keys = list(schema.schema_fields())
    assert {"seed", "rare_share", "trainer.max_epochs", "trainer.aux_weight", "paths.cache_dir"} <= {k for k, _ in keys}
    for key, f in keys:
        node = cfg
        for part in key.split("."):
            node = node[part]
        assert node == schema.default_of(f) and type(node) is type(schema.default_of(f)), key


def test_every_schema_key_has_a_one_line_doc_and_a_default_that_passes_its_check():
    from train_seg.config import schema
    for key, f in schema.schema_fields():
        doc = f.metadata.get("doc", "")
        assert doc and "\n" not in doc, key
        check = f.metadata.get("check")
        assert check is None or check.error(key, schema.default_of(f)) is None, key
    checked = dict(schema.checks())
    assert {"trainer.batch_size", "trainer.grad_clip", "trainer.aux_weight", "rare_share", "optimized_metric",
            "trainer.precision", "trainer.pin_memory", "optimizer.lr"} <= set(checked)


def test_check_rule_texts():
    from train_seg.config.schema import Check

    assert Check(min=2).rule() == ">= 2" and Check(gt=0).rule() == "> 0"
    assert Check(gt=0, lt=1).rule() == "in (0, 1)" and Check(min=0, lt=1).rule() == "in [0, 1)"
    assert Check(max=1).rule() == "<= 1" and Check(min=0.5, max=1).rule() == "in [0.5, 1]"
    assert Check(min=1).error("k", "3") == "k='3': must be a number >= 1."
    assert Check(min=1).error("k", True) == "k=True: must be a number >= 1."
    assert Check(min=1).error("k", None) is None
    assert Check(choices=("auto", True, False)).error("k", 1) is not None  # 1 == True, but it is no choice


@pytest.mark.parametrize("overrides, message", [
    # the messages of the hand-written checks, unchanged
    (["trainer.precision=fp8"], "trainer.precision='fp8' is not valid; choose one of auto, 32, 16-mixed, bf16-mixed."),
    (["trainer.batch_size=1"], "trainer.batch_size=1: must be >= 2, because DeepLabV3's ASPP pooling branch has "
                               "BatchNorm on a 1x1 map, which cannot be trained on a single image."),
    (["trainer.val_batch_size=0"], "trainer.val_batch_size=0: must be >= 1."),
    (["trainer.max_epochs=0"], "trainer.max_epochs=0: must be >= 1."),
    (["trainer.max_steps=0"], "trainer.max_steps=0: must be >= 1 or null (no step limit)."),
    (["trainer.eval_every=0"], "trainer.eval_every=0: must be >= 1 (epochs)."),
    (["trainer.log_every=0"], "trainer.log_every=0: must be >= 1 (steps)."),
    (["trainer.num_workers=-1"], "trainer.num_workers=-1: must be >= 0."),
    (["trainer.num_threads=0"], "trainer.num_threads=0: must be >= 1 or null (torch's default)."),
    (["trainer.grad_clip=0"], "trainer.grad_clip=0.0: must be > 0 (max gradient norm) or null."),
    (["trainer.pin_memory=yes"], "trainer.pin_memory='yes': use auto, true or false."),
    (["optimized_metric=val/foo"], "optimized_metric='val/foo' is not a logged metric; choose one of val/mIoU, "
                                   "val/rare_mIoU, val/pixel_acc, val/mean_acc, val/fwIoU."),
    (["rare_share=0"], "rare_share=0.0: must be in (0, 1), e.g. 0.01."),
    (["rare_share=1"], "rare_share=1.0: must be in (0, 1), e.g. 0.01."),
    (["trainer.aux_weight=-1"], "trainer.aux_weight=-1.0: must be >= 0."),  # was model.aux_weight
    # accepted silently before
    (["trainer.grad_clip=nan"], "trainer.grad_clip=nan: must be a finite number > 0 (max gradient norm) or null."),
    (["trainer.grad_clip=inf"], "trainer.grad_clip=inf: must be a finite number > 0 (max gradient norm) or null."),
    (["trainer.aux_weight=nan"], "trainer.aux_weight=nan: must be a finite number >= 0."),
    (["trainer.aux_weight=inf"], "trainer.aux_weight=inf: must be a finite number >= 0."),
    (["rare_share=nan"], "rare_share=nan: must be a finite number in (0, 1), e.g. 0.01."),
    (["trainer.pin_memory=1"], "trainer.pin_memory=1: use auto, true or false."),
    (["optimizer.lr=-0.1"], "optimizer.lr=-0.1: must be > 0 (the initial learning rate)."),
    (["optimizer=adamw", "optimizer.lr=nan"], "optimizer.lr=nan: must be a finite number > 0 (the initial learning rate)."),
    (["optimizer.weight_decay=-1e-4"], "optimizer.weight_decay=-0.0001: must be >= 0."),
])
def test_bad_values_fail_validation_with_the_message(make_cfg, overrides, message):
    from train_seg.config.validation import ConfigError, validate_config

    with pytest.raises(ConfigError) as info:
        validate_config(make_cfg(*overrides))
    assert str(info.value) == message


@pytest.mark.parametrize("overrides", [
    [], ["trainer.precision=32"], ["trainer.precision=bf16"], ["trainer.pin_memory=true"], ["trainer.grad_clip=1"],
    ["trainer.max_steps=3", "trainer.num_threads=1"], ["trainer.aux_weight=0"], ["rare_share=0.5"],
    ["optimizer=adamw"], ["trainer.device=cpu"],
])
def test_good_values_pass_validation(make_cfg, overrides):
    from train_seg.config.validation import validate_config

    validate_config(make_cfg(*overrides))
