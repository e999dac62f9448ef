"""train_seg.evaluation.inference: loading checkpoints, sliding windows, TTA, the notebook ``predict``.

The checkpoint is a real one: a tiny run (64 px MobileNet, 2 steps) trained once per session with the real configs
(``conftest.compose_cfg``, the function behind the ``make_cfg`` fixture: a module-scoped fixture cannot take the
function-scoped one). The geometry tests use stand-in models (a 1x1 or a 3x3 conv returning ``{"out": ...}``).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from _dataset_fixtures import truncate
from conftest import compose_cfg
from train_seg.checkpoint import CheckpointError, CheckpointMeta, load_checkpoint_model
from train_seg.evaluation.inference import (infer_logits, predict, slide_logits, to_model_input, tta_logits,
                                            window_starts)

# a few steps with strong class weights: the model predicts more than one class, so comparisons mean something
TRAIN_OVERRIDES = ("trainer.max_steps=2", "logger=none", "weighting=inverse", "optimizer.lr=0.1",
                   "trainer.precision=32")


def trained_run(tmp_path_factory) -> Path:
    """The run directory of a tiny real training (best.pt, last.pt, metrics.json), trained once per session and
    shared with tests/cli/test_evaluate.py."""
    from train_seg.engine.trainer import train

    base = tmp_path_factory.getbasetemp() / "trained"
    run_dir = base / "run"
    if not (run_dir / "metrics.json").is_file():
        base.mkdir(parents=True, exist_ok=True)
        train(compose_cfg(base, *TRAIN_OVERRIDES), run_dir)
    return run_dir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return trained_run(tmp_path_factory)


@pytest.fixture(scope="module")
def loaded(run_dir):
    return load_checkpoint_model(run_dir / "last.pt")


class ConvModel(nn.Module):
    """A stand-in segmentation model: one conv, ``{"out": logits}``. kernel 1 = translation- and flip-equivariant;
    ``symmetric`` makes a wider kernel mirror-symmetric (flip-equivariant)."""

    def __init__(self, classes: int = 4, kernel: int = 1, symmetric: bool = False, seed: int = 0):
        super().__init__()
        self.conv = nn.Conv2d(3, classes, kernel, padding=kernel // 2)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            weight = torch.randn(self.conv.weight.shape, generator=g)
            self.conv.weight.copy_((weight + weight.flip(-1)) / 2 if symmetric else weight)
            self.conv.bias.copy_(torch.randn(classes, generator=g))

    def forward(self, x):
        return {"out": self.conv(x)}


def _image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randn((1, 3, h, w), generator=torch.Generator().manual_seed(seed))


def _meta(**changes) -> CheckpointMeta:
    fields = dict(class_names=["a", "b", "c", "d"], palette=[[0, 0, 0]] * 4, mean=(0.5, 0.5, 0.5), std=(0.25,) * 3,
                  max_pixel_value=255.0, ignore_index=255, binary_head=False, arch="stand-in", config={})
    return CheckpointMeta(**{**fields, **changes})


# -- the package -----------------------------------------------------------------------------------------------
def test_import_train_seg_stays_torch_free_and_exports_load_checkpoint_model():
    import train_seg
    import train_seg.checkpoint

    assert train_seg.load_checkpoint_model is train_seg.checkpoint.load_checkpoint_model
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        train_seg.nothing  # noqa: B018
    code = "import sys, train_seg; assert 'torch' not in sys.modules, 'torch imported'; print('ok')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


# -- loading ---------------------------------------------------------------------------------------------------
def test_load_checkpoint_model_rebuilds_the_model_and_reads_the_meta(run_dir, loaded, tmp_path):
    model, meta = loaded
    state = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)
    assert not model.training
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state["model"].items())
    assert meta.class_names == ["background", "lake", "road", "car"] == state["class_names"]
    assert meta.palette == state["palette"] and meta.path == run_dir / "last.pt"
    # the synthetic dataset's val Normalize
    assert (meta.mean, meta.std, meta.max_pixel_value) == ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 255.0)
    assert (meta.ignore_index, meta.binary_head, meta.arch) == (255, False, "deeplabv3_mobilenet_v3_large")
    assert meta.config == state["config"] and (meta.epoch, meta.step) == (state["epoch"], state["global_step"])

    # a run directory gives best.pt, else last.pt
    assert load_checkpoint_model(run_dir)[1].path == run_dir / "best.pt"
    only_last = tmp_path / "only_last"
    only_last.mkdir()
    shutil.copy(run_dir / "last.pt", only_last / "last.pt")
    assert load_checkpoint_model(only_last)[1].path == only_last / "last.pt"


def _error(path) -> str:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint_model(path)
    message = str(info.value)
    assert "\n" not in message  # one paragraph
    return message


def test_checkpoint_errors_are_one_clear_paragraph(run_dir, tmp_path):
    message = _error(tmp_path / "nowhere" / "best.pt")
    assert "no such checkpoint" in message and str((tmp_path / "nowhere" / "best.pt").resolve()) in message

    empty = tmp_path / "empty_run"
    empty.mkdir()
    message = _error(empty)
    assert "holds no checkpoint" in message and str(empty / "best.pt") in message and str(empty / "last.pt") in message

    cut = tmp_path / "cut.pt"
    shutil.copy(run_dir / "last.pt", cut)
    truncate(cut, keep=0.5)
    assert "truncated or corrupt" in _error(cut)

    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n")
    assert "not a PyTorch checkpoint file" in _error(text)

    plain = tmp_path / "weights.pt"
    torch.save(ConvModel().state_dict(), plain)
    message = _error(plain)
    assert "not a train_seg checkpoint" in message and "'model'" in message and "model.weights" in message

    pickled = tmp_path / "module.pt"
    torch.save(ConvModel(), pickled)
    assert "safe loader" in _error(pickled)

    state = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)
    state["class_names"] = state["class_names"] + ["boat"]
    misfit = tmp_path / "misfit.pt"
    torch.save(state, misfit)
    message = _error(misfit)
    assert "do not fit" in message and "deeplabv3_mobilenet_v3_large" in message and "5 classes" in message


# -- sliding windows -------------------------------------------------------------------------------------------
def test_window_starts_cover_the_axis_and_end_flush_with_the_border():
    assert window_starts(10, 4, 3) == [0, 3, 6]
    assert window_starts(11, 4, 3) == [0, 3, 6, 7]
    assert window_starts(4, 4, 2) == [0]
    for size, window, stride in ((37, 16, 6), (53, 16, 16), (100, 7, 5)):
        starts = window_starts(size, window, stride)
        covered = np.zeros(size, bool)
        for s in starts:
            covered[s:s + window] = True
        assert covered.all() and starts[-1] == size - window
        assert all(b - a <= stride for a, b in zip(starts, starts[1:]))


def test_one_window_covering_the_image_is_whole_image_inference(loaded):
    model, _ = loaded
    image = _image(64, 64, seed=1)
    whole = infer_logits(model, image)
    assert whole.dtype == torch.float32 and whole.shape == (1, 4, 64, 64)
    assert torch.equal(slide_logits(model, image, window=64, stride=32, blend="uniform"), whole)
    torch.testing.assert_close(slide_logits(model, image, window=64, stride=32, blend="gaussian"), whole,
                               rtol=1e-6, atol=1e-6)
    assert torch.equal(infer_logits(model, image, mode="slide", window=[64, 64], overlap=0.25), whole)


@pytest.mark.parametrize("blend", ["uniform", "gaussian"])
def test_overlapping_windows_equal_whole_image_on_a_translation_equivariant_model(blend):
    model = ConvModel(kernel=1).eval()
    image = _image(37, 53, seed=2)  # neither side a multiple of the stride
    whole = infer_logits(model, image)
    for window, stride, batch in ((16, 6, 1), (16, 6, 7), ([12, 20], [5, 9], 3), (64, 10, 2)):  # last: padded
        slid = slide_logits(model, image, window=window, stride=stride, blend=blend, batch_size=batch)
        assert slid.shape == whole.shape
        torch.testing.assert_close(slid, whole, rtol=1e-5, atol=1e-5)
    both = torch.cat([image, _image(37, 53, seed=3)])  # several images, windows of both in one batch
    torch.testing.assert_close(slide_logits(model, both, 16, 6, blend=blend, batch_size=5,
                                            accumulate_device="cpu"), infer_logits(model, both), rtol=1e-5, atol=1e-5)


def test_slide_refuses_gaps_and_bad_arguments():
    model = ConvModel()
    with pytest.raises(ValueError, match="larger than the window"):
        slide_logits(model, _image(20, 20), window=8, stride=9)
    with pytest.raises(ValueError, match="window"):
        slide_logits(model, _image(20, 20), window=0)
    with pytest.raises(ValueError, match="blend"):
        infer_logits(model, _image(20, 20), mode="slide", window=8, blend="cosine")
    with pytest.raises(ValueError, match="mode"):
        infer_logits(model, _image(20, 20), mode="tiles")
    with pytest.raises(ValueError, match="overlap"):
        infer_logits(model, _image(20, 20), mode="slide", window=8, overlap=1.0)


# -- test-time augmentation ------------------------------------------------------------------------------------
def test_flip_tta_of_a_flip_symmetric_input_on_a_flip_equivariant_model_is_no_tta():
    model = ConvModel(kernel=3, symmetric=True).eval()
    image = _image(24, 30, seed=4)
    image = (image + image.flip(-1)) / 2
    plain = infer_logits(model, image)
    torch.testing.assert_close(infer_logits(model, image, flip=True), plain, rtol=1e-6, atol=1e-6)
    # combined with sliding windows: the 3x3 kernel sees window borders, so compare with slide alone, on a width
    # whose tiling is its own mirror image (32 = 0, 8, 16 + 16)
    image = _image(24, 32, seed=4)
    image = (image + image.flip(-1)) / 2
    slid = infer_logits(model, image, mode="slide", window=16, stride=8)
    for blend in ("uniform", "gaussian"):
        torch.testing.assert_close(infer_logits(model, image, mode="slide", window=16, stride=8, blend=blend,
                                                flip=True),
                                   infer_logits(model, image, mode="slide", window=16, stride=8, blend=blend),
                                   rtol=1e-5, atol=1e-5)
    assert not torch.allclose(slid, infer_logits(model, image), atol=1e-3)  # the window borders do show


def test_tta_un_flips_and_resizes_back_before_averaging_logits():
    model = ConvModel(kernel=3, seed=5).eval()  # not flip-equivariant: a missing un-flip would show
    image = _image(20, 28, seed=6)
    f = lambda x: model(x)["out"]  # noqa: E731
    with torch.no_grad():
        flipped = (f(image) + f(image.flip(-1)).flip(-1)) / 2
        half = torch.nn.functional.interpolate(image, size=(10, 14), mode="bilinear", align_corners=False)
        back = torch.nn.functional.interpolate(f(half), size=(20, 28), mode="bilinear", align_corners=False)
        scaled = (f(image) + back) / 2
    torch.testing.assert_close(tta_logits(model, image, flip=True), flipped, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(infer_logits(model, image, scales=[1.0, 0.5]), scaled, rtol=1e-6, atol=1e-6)
    assert infer_logits(model, image, flip=True, scales=[0.75, 1.0, 1.25]).shape == (1, 4, 20, 28)
    with pytest.raises(ValueError, match="scales"):
        infer_logits(model, image, scales=[0.0])


# -- the notebook API ------------------------------------------------------------------------------------------
def test_predict_matches_the_val_pipeline_at_the_input_size(loaded):
    from train_seg.engine import builder as build
    from train_seg.data.base import SegmentationDataset

    model, meta = loaded
    source = build.build_source(meta.config["dataset"], "val")
    expected_input, _ = SegmentationDataset(source, build.build_transform(meta.config["dataset"], "val", 0))[0]
    image = source.load_image(0)
    assert torch.equal(to_model_input(image, meta)[0], expected_input)  # bit for bit as albumentations

    mask, probabilities = predict(model, image, meta)
    with torch.no_grad():
        logits = model(expected_input[None])["out"][0]
    assert mask.dtype == np.int64 and mask.shape == image.shape[:2]
    assert probabilities.dtype == np.float32 and probabilities.shape == (4, *image.shape[:2])
    np.testing.assert_allclose(probabilities, torch.softmax(logits, 0).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(mask, logits.argmax(0).numpy())
    flip_mask, flip_probabilities = predict(model, image, meta, tta=True)
    assert flip_mask.shape == mask.shape and flip_probabilities.shape == probabilities.shape


def test_image_conversions_grey_rgba_16_bit_and_float():
    meta = _meta()
    rgb = np.random.default_rng(0).integers(0, 256, size=(9, 11, 3), dtype=np.uint8)
    reference = to_model_input(rgb, meta)
    assert reference.shape == (1, 3, 9, 11) and reference.dtype == torch.float32
    rgba = np.concatenate([rgb, np.full((9, 11, 1), 7, np.uint8)], axis=-1)
    assert torch.equal(to_model_input(rgba, meta), reference)  # alpha dropped
    torch.testing.assert_close(to_model_input(rgb.astype(np.uint16) * 257, meta), reference, rtol=0, atol=1e-5)
    torch.testing.assert_close(to_model_input(rgb / 255.0, meta), reference, rtol=0, atol=1e-5)
    grey = rgb[..., 0]
    as_rgb = to_model_input(np.stack([grey] * 3, axis=-1), meta)
    for variant in (grey, grey[..., None], np.stack([grey, grey * 0], axis=-1)):
        assert torch.equal(to_model_input(variant, meta), as_rgb)
    with pytest.raises(ValueError, match="dtype"):
        to_model_input(rgb.astype(np.int32), meta)
    with pytest.raises(ValueError, match="shape"):
        to_model_input(np.zeros((4, 4, 5), np.uint8), meta)


def test_predict_with_a_binary_head_gives_two_class_probabilities():
    model = ConvModel(classes=1, seed=7)
    meta = _meta(class_names=["background", "defect"], binary_head=True)
    image = np.random.default_rng(1).integers(0, 256, size=(10, 12, 3), dtype=np.uint8)
    mask, probabilities = predict(model, image, meta)
    with torch.no_grad():
        logit = model(to_model_input(image, meta))["out"][0, 0]
    assert probabilities.shape == (2, 10, 12)
    np.testing.assert_allclose(probabilities[1], torch.sigmoid(logit).numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(probabilities.sum(0), 1.0, atol=1e-6)
    np.testing.assert_array_equal(mask, (logit > 0).numpy().astype(np.int64))
