"""End-to-end training through the real configs: tiny images, a few steps, real code paths."""
import json
import logging
import math
from pathlib import Path

import pytest
import torch

from train_seg.checkpoint import read_checkpoint
from train_seg.config.validation import ConfigError
from train_seg.engine.trainer import prepare, train

CLASSES = ["background", "lake", "road", "car"]


def _event_tags(run_dir: Path) -> dict[str, int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: len(acc.Scalars(tag)) for tag in acc.Tags()["scalars"]}


def test_trains_a_few_steps_and_writes_everything(make_cfg, tmp_path):
    cfg = make_cfg("trainer.max_epochs=3", "trainer.eval_every=1")
    payload = train(cfg, tmp_path / "run")
    run = tmp_path / "run"
    history = payload["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3] and [h["step"] for h in history] == [4, 8, 12]
    assert all(math.isfinite(h["train/loss"]) and h["train/loss"] > 0 for h in history)
    assert (run / "last.pt").is_file() and (run / "best.pt").is_file()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["class_names"] == CLASSES
    assert set(metrics["final"]["per_class"]) == set(CLASSES)
    assert metrics["best"]["metric"] == "val/mIoU"
    assert metrics["best"]["value"] == max(h["val/mIoU"] for h in history)
    assert metrics["class_weights"] == {c: 1.0 for c in CLASSES}
    tags = _event_tags(run)
    for name in CLASSES:
        assert tags.get(f"val/IoU/{name}", 0) + (metrics["final"]["per_class"][name]["iou"] is None) >= 1
    assert tags["val/mIoU"] == 3 and tags["train/loss"] == 12 and tags["train/lr"] == 12
    state = read_checkpoint(run / "last.pt")
    assert state["epoch"] == 3 and state["global_step"] == 12 and state["class_names"] == CLASSES
    assert state["config"]["loss"]["_target_"] == "train_seg.losses.CrossEntropyLoss"


def test_inverse_weighting_reaches_the_loss(make_cfg, tmp_path):
    run = prepare(make_cfg("weighting=inverse"), tmp_path / "run")
    counts = torch.as_tensor(run.stats.pixel_counts, dtype=torch.float64)
    expected = counts.sum() / (len(counts) * counts)
    expected = expected / expected.mean()  # normalize: mean
    assert torch.allclose(run.weights.double(), expected, rtol=1e-5)
    assert torch.allclose(run.criterion.weight.double(), expected, rtol=1e-5)


def test_logit_adjusted_loss_gets_the_training_pixel_shares_and_trains(make_cfg, tmp_path):
    cfg = make_cfg("loss=logit_adjusted", "loss.tau=0.5", "trainer.max_steps=2", "model=tiny")
    run = prepare(cfg, tmp_path / "run")
    share = torch.as_tensor(run.stats.pixel_counts, dtype=torch.float64)
    share = share / share.sum()
    torch.testing.assert_close(run.criterion.log_prior.double(), share.clamp_min(1e-6).log(), rtol=1e-6, atol=1e-6)
    assert run.criterion.tau == 0.5 and torch.equal(run.criterion.weight, torch.ones(4))  # weighting=none
    record = train(cfg, tmp_path / "run2")
    assert record["status"] == "completed" and math.isfinite(record["history"][-1]["train/loss"])


def test_resume_continues_exactly(make_cfg, tmp_path, monkeypatch):
    import train_seg.engine.trainer as train_module

    straight = train(make_cfg("trainer.max_epochs=2", f"paths.output_dir={tmp_path / 'a'}"), tmp_path / "a")

    # the same run, interrupted after its first epoch (as a crash or Ctrl-C would)
    real_epoch, calls = train_module.train_one_epoch, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_one_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(make_cfg("trainer.max_epochs=2", f"paths.output_dir={tmp_path / 'b'}"), tmp_path / "b")
    monkeypatch.setattr(train_module, "train_one_epoch", real_epoch)
    before = (tmp_path / "b" / "last.pt").read_bytes()

    resumed_cfg = make_cfg("trainer.max_epochs=2", f"trainer.resume={tmp_path / 'b'}",
                           f"paths.output_dir={tmp_path / 'c'}")
    run = prepare(resumed_cfg, tmp_path / "c")
    assert (run.start_epoch, run.global_step) == (1, 4)
    assert run.scheduler.last_epoch == 4
    assert run.optimizer.param_groups[0]["lr"] == pytest.approx(0.02 * (1 - 3 / 7) ** 0.9)  # warmup 1, 8 steps
    resumed = train(resumed_cfg, tmp_path / "c")
    assert (tmp_path / "b" / "last.pt").read_bytes() == before  # the old run is never modified
    assert [h["step"] for h in resumed["history"]] == [4, 8]
    a = read_checkpoint(tmp_path / "a" / "last.pt")
    c = read_checkpoint(tmp_path / "c" / "last.pt")
    assert all(torch.equal(a["model"][k], c["model"][k]) for k in a["model"])  # bit for bit the uninterrupted run
    assert resumed["history"][-1]["train/loss"] == straight["history"][-1]["train/loss"]
    assert resumed["final"]["val/mIoU"] == straight["final"]["val/mIoU"]


def test_bf16_mixed_on_cpu_trains(make_cfg, tmp_path):
    payload = train(make_cfg("model=tiny", "trainer.precision=bf16-mixed", "trainer.max_steps=2"), tmp_path / "run")
    assert payload["history"][-1]["step"] == 2 and math.isfinite(payload["history"][-1]["train/loss"])


def test_aux_head_adds_a_logged_term(make_cfg, tmp_path):
    payload = train(make_cfg("model.aux_loss=true", "trainer.max_steps=2"), tmp_path / "run")
    tags = _event_tags(tmp_path / "run")
    assert "train/loss/aux" in tags and math.isfinite(payload["history"][-1]["train/loss"])


@pytest.mark.parametrize(
    "override, key",
    [
        ("trainer.precision=fp8", "trainer.precision"),
        ("trainer.batch_size=1", "trainer.batch_size"),
        ("trainer.device=cuda", "trainer.device"),
        ("optimized_metric=val/foo", "optimized_metric"),
        ("model.arch=unet", "model.arch"),
        ("trainer.resume=/nonexistent/run", "trainer.resume"),
        ("dataset.num_train=1", "trainer.batch_size"),
    ],
)
def test_bad_config_fails_before_training(make_cfg, tmp_path, override, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        prepare(make_cfg(override), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_config_error_type(make_cfg, tmp_path):
    with pytest.raises(ConfigError):
        prepare(make_cfg("trainer.eval_every=0"), tmp_path / "run")


@pytest.mark.parametrize("native_bf16", [True, False], ids=["native-bf16-cpu", "avx2-cpu"])
@pytest.mark.parametrize("value, dtype", [("auto", "auto"), ("bf16-mixed", torch.bfloat16), ("32", None), (32, None),
                                          ("bf16", torch.bfloat16), ("16-mixed", torch.float16),
                                          ("fp16", torch.float16)])
def test_precision_on_cpu(monkeypatch, caplog, native_bf16, value, dtype):
    """auto is bf16 only where the CPU has it natively (emulated bf16 is many times slower than fp32); 16-mixed
    runs on the CPU (to test the fp16 path) with a warning, as bf16 does where it is emulated."""
    from train_seg.config import validation

    monkeypatch.setattr(validation, "cpu_has_native_bf16", lambda: native_bf16)
    expected = (torch.bfloat16 if native_bf16 else None) if dtype == "auto" else dtype
    with caplog.at_level(logging.WARNING, logger="train_seg"):
        assert validation.resolve_precision(value, torch.device("cpu")) is expected
    slow = expected is torch.float16 or (expected is torch.bfloat16 and not native_bf16)
    assert bool([r for r in caplog.records if "many times slower" in r.getMessage()]) == slow


@pytest.mark.parametrize("loss", ["bce", "sigmoid_focal", "binary_dice"])
def test_binary_head_trains_with_binary_losses(make_cfg, tmp_path, loss):
    payload = train(make_cfg("model=tiny", "dataset.binary=true", "model.binary_head=true", f"loss={loss}",
                             "weighting=inverse", "trainer.max_steps=2"), tmp_path / "run")
    assert payload["class_names"] == ["background", "car"]
    assert math.isfinite(payload["history"][-1]["train/loss"])
    per_class = payload["final"]["per_class"]
    assert set(per_class) == {"background", "car"}
    # the metrics threshold the sigmoid: the 2x2 confusion matrix covers every valid pixel
    assert per_class["background"]["support"] + per_class["car"]["support"] == 4 * 64 * 64


def test_repeat_factor_sampler_drives_the_epoch_length(make_cfg, tmp_path):
    from train_seg.engine.trainer import prepare

    overrides = ("model=tiny", "sampler=repeat_factor", "sampler.threshold=0.9", "dataset.num_train=12")
    run = prepare(make_cfg(*overrides), tmp_path / "r")
    run.sampler.set_epoch(0)
    expected_steps = len(run.sampler) // 2
    assert len(run.sampler) > 12  # rare-class images are repeated
    payload = train(make_cfg(*overrides), tmp_path / "t")
    assert payload["history"][-1]["step"] == expected_steps


def test_an_existing_run_directory_is_never_overwritten(make_cfg, tmp_path):
    run_dir = tmp_path / "run"
    train(make_cfg("model=tiny", "trainer.max_steps=1"), run_dir)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    with pytest.raises(ConfigError, match="already holds an earlier run"):
        train(make_cfg("model=tiny", "trainer.max_steps=1"), run_dir)
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before


@pytest.mark.parametrize("overrides, message", [
    (["loss=bce"], "model.binary_head=true"),
    (["loss=bce_dice"], "one-channel"),
    (["model.binary_head=true", "dataset.binary=true", "loss=ce_dice"], "loss=bce"),
    (["model.binary_head=true", "loss=bce"], "2-class dataset"),  # head and loss agree, the 4-class data does not
])
def test_head_loss_and_dataset_must_agree(make_cfg, tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        prepare(make_cfg(*overrides), tmp_path / "run")


def test_sliding_window_and_tta_in_training_evaluation(make_cfg, tmp_path):
    """trainer.eval_mode=slide with one 64-px window over the 64-px images is the whole-image evaluation exactly;
    flip TTA changes the evaluation only (the same training, finite metrics); bad scales fail before training."""
    whole = train(make_cfg("model=tiny", "trainer.max_steps=3", f"paths.output_dir={tmp_path / 'w'}"), tmp_path / "w")
    slide = train(make_cfg("model=tiny", "trainer.max_steps=3", "trainer.eval_mode=slide", "trainer.eval_window=64",
                           f"paths.output_dir={tmp_path / 's'}"), tmp_path / "s")
    assert slide["final"]["per_class"] == whole["final"]["per_class"]
    flip = train(make_cfg("model=tiny", "trainer.max_steps=3", "trainer.eval_flip=true",
                          "trainer.eval_scales=[0.5,1.0]", f"paths.output_dir={tmp_path / 'f'}"), tmp_path / "f")
    assert flip["history"][-1]["train/loss"] == whole["history"][-1]["train/loss"]
    assert all(0.0 <= v["recall"] <= 1.0 for v in flip["final"]["per_class"].values() if v["recall"] is not None)
    with pytest.raises(ConfigError, match=r"trainer\.eval_scales"):
        prepare(make_cfg("trainer.eval_scales=[0]"), tmp_path / "bad")
    with pytest.raises(ConfigError, match=r"trainer\.eval_mode"):
        prepare(make_cfg("trainer.eval_mode=tiles"), tmp_path / "bad")


def test_fp16_run_on_cpu_resumes_mid_epoch_bit_exactly_with_the_scalers_state(make_cfg, tmp_path, monkeypatch):
    """trainer.precision=16-mixed on the CPU: the GradScaler's state is in every checkpoint and restored on resume;
    a run interrupted mid-epoch (after its step-5 checkpoint) and resumed ends bit for bit as the straight run."""
    import train_seg.engine.loop as loop_module

    overrides = ("model=tiny", "trainer.precision=16-mixed", "trainer.max_epochs=2",
                 "trainer.checkpoint_every_n_steps=1")
    straight = train(make_cfg(*overrides, f"paths.output_dir={tmp_path / 'a'}"), tmp_path / "a")
    assert straight["status"] == "completed" and math.isfinite(straight["history"][-1]["train/loss"])

    real_step, calls = loop_module._optimizer_step, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 6:  # epoch 2, step 6 of 8: last.pt holds step 5
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop_module, "_optimizer_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(make_cfg(*overrides, f"paths.output_dir={tmp_path / 'b'}"), tmp_path / "b")
    monkeypatch.setattr(loop_module, "_optimizer_step", real_step)
    saved = read_checkpoint(tmp_path / "b" / "last.pt")
    assert saved["global_step"] == 5 and saved["scaler"]["scale"] > 0

    resumed_cfg = make_cfg(*overrides, f"trainer.resume={tmp_path / 'b'}", f"paths.output_dir={tmp_path / 'c'}")
    run = prepare(resumed_cfg, tmp_path / "c")
    assert run.scaler.is_enabled() and run.scaler.state_dict() == saved["scaler"]
    resumed = train(resumed_cfg, tmp_path / "c")
    a, c = read_checkpoint(tmp_path / "a" / "last.pt"), read_checkpoint(tmp_path / "c" / "last.pt")
    assert a["scaler"] == c["scaler"]
    assert all(torch.equal(a["model"][k], c["model"][k]) for k in a["model"])
    assert resumed["history"][-1]["train/loss"] == straight["history"][-1]["train/loss"]


def test_each_rank_restores_its_own_random_state_and_a_changed_world_warns(monkeypatch, caplog):
    from train_seg import distributed
    from train_seg.engine import trainer

    state = {"rng": "rank0", "rng_ranks": ["rank0", "rank1"]}
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    assert trainer._own_rng_state(state, Path("last.pt")) == "rank1"
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    with caplog.at_level(logging.WARNING, logger="train_seg"):
        assert trainer._own_rng_state(state, Path("last.pt")) == "rank0"
    assert "written by 2 rank(s) and this run has 3" in caplog.text
    caplog.clear()
    monkeypatch.setattr(distributed, "world_size", lambda: 1)
    assert trainer._own_rng_state({"rng": "only"}, Path("last.pt")) == "only" and not caplog.text


def test_ranks_that_would_resume_from_different_steps_are_refused(monkeypatch):
    from train_seg import distributed
    from train_seg.checkpoint import CheckpointError
    from train_seg.engine import trainer

    class _Run:
        global_step, progress = 6, None

    monkeypatch.setattr(distributed, "all_gather_object", lambda obj: [obj, (4, 2)])
    with pytest.raises(CheckpointError, match=r"different points .*\[\(6, 0\), \(4, 2\)\]"):
        trainer._agree_on_step(_Run())
    monkeypatch.setattr(distributed, "all_gather_object", lambda obj: [obj, obj])
    trainer._agree_on_step(_Run())  # the same step everywhere: nothing to say
