"""Every option of every config group composes, and the objects it describes build."""
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from train_seg import build
from train_seg.data.stats import compute_class_stats
from train_seg.weighting import class_weights

GROUPS = ROOT / "configs"


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
