"""``python -m train_seg.cli.evaluate``: pipeline resolution reproduces training's numbers, original resolution those of
an independent computation, the output files, the errors, and the command line itself (two subprocesses).

The checkpoint is the tiny real run of tests/evaluation/test_inference.py (trained once per session)."""
from __future__ import annotations

import csv
import math
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import forkserver
from _dataset_fixtures import write_folder
from evaluation.test_inference import trained_run
from evaluation.test_objects import reference
from train_seg.reporting import record
from train_seg.checkpoint import CheckpointError
from train_seg.config.command_line import compose
from train_seg.config.validation import ConfigError
from train_seg.cli.evaluate import command_line_overrides, evaluate_checkpoint, read_options, run_settings

CLASSES = ["background", "lake", "road", "car"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return trained_run(tmp_path_factory)


def eval_cfg(tmp_path: Path, *overrides: str):
    """configs/evaluate.yaml composed as the command line would (``dataset.<key>`` rewritten as by ``main``)."""
    base = [f"output_dir={tmp_path / 'eval'}", "progress=false", f"paths.cache_dir={tmp_path / 'cache'}"]
    return compose(command_line_overrides([*base, *overrides]), config_name="evaluate")


def _per_class(entry: dict, key: str = "iou") -> list[float]:
    return [math.nan if entry["per_class"][n][key] is None else entry["per_class"][n][key] for n in CLASSES]


def test_pipeline_resolution_reproduces_the_runs_last_evaluation(run_dir, tmp_path):
    trained = record.read(run_dir)
    out = evaluate_checkpoint(eval_cfg(tmp_path, f"ckpt={run_dir / 'last.pt'}", "resolution=pipeline"))
    final, expected = out["final"], trained.final
    assert out["status"] == "completed" and final["evaluation"]["resolution"] == "pipeline"
    assert len({v for v in _per_class(expected) if not math.isnan(v)}) > 1  # not a trivial all-background model
    np.testing.assert_allclose(_per_class(final), _per_class(expected), rtol=0, atol=1e-6)
    for key in ("precision", "recall", "support"):
        np.testing.assert_allclose(_per_class(final, key), _per_class(expected, key), rtol=0, atol=1e-6)
    for key in ("val/mIoU", "val/pixel_acc", "val/mean_acc", "val/fwIoU"):
        assert final[key] == pytest.approx(expected[key], abs=1e-6)
    # the checkpoint's metrics.objects (rare): the same object counts as training's last evaluation
    counted = [n for n in CLASSES if "objects" in expected["per_class"][n]]
    assert counted == trained.rare_classes
    assert [final["per_class"][n]["objects"] for n in counted] == [expected["per_class"][n]["objects"] for n in counted]
    assert (final["epoch"], final["step"]) == (expected["epoch"], expected["step"])
    assert out["class_stats"]["train"]["pixel_share"] == trained.class_stats["train"]["pixel_share"]
    assert out["rare_classes"] == trained.rare_classes and out["class_weights"] == trained.class_weights

    # the files: metrics.json (through record), confusion.csv, confusion.png
    written = tmp_path / "eval"
    assert record.read(written).to_dict() == out
    rows = list(csv.reader((written / "confusion.csv").read_text().splitlines()))
    assert rows[0] == ["true \\ predicted", *CLASSES] and [r[0] for r in rows[1:]] == CLASSES
    matrix = np.array([[int(v) for v in r[1:]] for r in rows[1:]])
    assert matrix.sum(1).tolist() == [final["per_class"][n]["support"] for n in CLASSES]
    assert (written / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- original resolution on images of several sizes ------------------------------------------------------------
SIZES = {"a_small": (40, 56), "b_square": (64, 64), "c_tall": (72, 48)}


def _write_mixed_folder(root: Path) -> dict[str, np.ndarray]:
    """A folder dataset (images/{train,val}, masks/{train,val}, PNG) with val images of three sizes."""
    rng = np.random.default_rng(0)
    masks = {}
    for split, sizes in (("train", {"t": (32, 32)}), ("val", SIZES)):
        for stem, (h, w) in sizes.items():
            mask = np.zeros((h, w), np.uint8)
            mask[h // 4:h // 2, :] = 1                     # lake band
            mask[:, w // 3:w // 3 + 6] = 2                 # road
            mask[h - 14:h - 4, w - 14:w - 4] = 3           # car
            mask[0, :] = 255                               # an unlabelled row
            image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            image[mask == 3] = (220, 40, 40)
            for folder, array in (("images", image), ("masks", mask)):
                path = root / folder / split / f"{stem}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(array).save(path)
            masks[f"{split}/{stem}"] = mask
    return masks


def _independent_confusion(run_dir: Path, root: Path) -> np.ndarray:
    """Per image at its own size: albumentations' Normalize of the checkpoint's val pipeline, the model, F.interpolate
    of the logits to the mask's size, arg-max, then a numpy confusion matrix (torchmetrics if installed, too)."""
    import albumentations as A
    from omegaconf import OmegaConf

    from train_seg.engine import builder as build
    state = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)
    model = build.build_model(OmegaConf.create(state["config"]["model"]), num_classes=len(CLASSES)).eval()
    model.load_state_dict(state["model"])
    spec = next(s for s in state["config"]["dataset"]["transforms"]["val"] if s["_target_"].endswith("Normalize"))
    normalize = A.Normalize(**{k: v for k, v in spec.items() if k != "_target_"})
    confusion = np.zeros((4, 4), np.int64)
    predicted, targets, images = [], [], []
    for stem in sorted(SIZES):
        image = np.asarray(Image.open(root / "images" / "val" / f"{stem}.png").convert("RGB"))
        mask = np.asarray(Image.open(root / "masks" / "val" / f"{stem}.png")).astype(np.int64)
        x = torch.from_numpy(normalize(image=image)["image"]).permute(2, 0, 1)[None]
        with torch.no_grad():
            logits = torch.nn.functional.interpolate(model(x)["out"], size=mask.shape, mode="bilinear",
                                                     align_corners=False)
        pred = logits.argmax(1)[0].numpy()
        valid = mask != 255
        confusion += np.bincount(mask[valid] * 4 + pred[valid], minlength=16).reshape(4, 4)
        predicted.append(pred.ravel())
        targets.append(mask.ravel())
        images.append((pred, mask))
    return confusion, np.concatenate(predicted), np.concatenate(targets), images


def _iou(confusion: np.ndarray) -> np.ndarray:
    tp = np.diag(confusion).astype(float)
    union = confusion.sum(0) + confusion.sum(1) - tp
    return np.where(union > 0, tp / np.maximum(union, 1), np.nan)


def test_original_resolution_on_mixed_sizes_matches_an_independent_computation(run_dir, tmp_path):
    root = tmp_path / "mixed"
    masks = _write_mixed_folder(root)
    out = evaluate_checkpoint(eval_cfg(
        tmp_path, f"ckpt={run_dir / 'last.pt'}", "dataset=folder", f"dataset.root={root}",
        f"dataset.classes=[{','.join(CLASSES)}]", "precision=32", "metrics.objects=all",
        "metrics.min_object_pixels=3"))
    final = out["final"]
    assert final["evaluation"]["resolution"] == "original" and final["evaluation"]["images"] == 3
    # every labelled pixel of every image at its own size, nothing else
    hand = [sum(int((m == c).sum()) for k, m in masks.items() if k.startswith("val/")) for c in range(4)]
    assert [final["per_class"][n]["support"] for n in CLASSES] == hand

    confusion, predicted, targets, images = _independent_confusion(run_dir, root)
    rows = list(csv.reader((tmp_path / "eval" / "confusion.csv").read_text().splitlines()))
    np.testing.assert_array_equal(np.array([[int(v) for v in r[1:]] for r in rows[1:]]), confusion)
    expected = _iou(confusion)
    try:
        from torchmetrics.classification import MulticlassJaccardIndex
    except ImportError:
        pass
    else:
        metric = MulticlassJaccardIndex(num_classes=4, average="none", ignore_index=255)
        by_torchmetrics = metric(torch.from_numpy(predicted), torch.from_numpy(targets)).numpy()
        np.testing.assert_allclose(by_torchmetrics[~np.isnan(expected)], expected[~np.isnan(expected)], atol=1e-6)
    np.testing.assert_allclose(_per_class(final), expected, rtol=0, atol=1e-6)
    # metrics.objects=all: every class's objects, as scipy labels and matches them image by image
    for c, name in enumerate(CLASSES):
        gt, pred, matched, iou_sum = np.sum([reference(p == c, m == c, m != 255, 3) for p, m in images], axis=0)
        got = final["per_class"][name]["objects"]
        assert (got["objects"], got["found"]) == (gt, matched), name
        assert got["precision"] == (pytest.approx(matched / pred) if pred else None), name
    assert sum(final["per_class"][n]["objects"]["objects"] for n in CLASSES) >= 3  # something to count


# -- options and errors ----------------------------------------------------------------------------------------
def test_dataset_keys_alone_change_the_checkpoints_own_dataset():
    assert command_line_overrides(["ckpt=x", "dataset.root=/d", "+dataset.a=1", "tta.flip=true"]) == [
        "ckpt=x", "++dataset.root=/d", "+dataset.a=1", "tta.flip=true"]
    with_option = ["dataset=voc", "dataset.root=/d"]
    assert command_line_overrides(with_option) == with_option


def test_sliding_windows_and_tta_through_the_command_config(run_dir, tmp_path):
    out = evaluate_checkpoint(eval_cfg(
        tmp_path, f"ckpt={run_dir}", "dataset.num_val=1", "inference.mode=slide", "inference.window=64",
        "inference.blend=gaussian", "inference.accumulate=cpu", "tta.flip=true", "tta.scales=[0.75,1.0]",
        "batch_size=3"))
    info = out["final"]["evaluation"]
    assert info["checkpoint"] == str((run_dir / "best.pt").resolve()) and info["images"] == 1
    assert (info["mode"], info["window"], info["blend"], info["flip"], info["scales"], info["batch_size"]) == (
        "slide", 64, "gaussian", True, [0.75, 1.0], 3)
    assert sum(out["final"]["per_class"][n]["support"] for n in CLASSES) == 64 * 64


def test_a_checkpoint_without_its_run_record_gets_the_shares_from_the_training_split(run_dir, tmp_path):
    alone = tmp_path / "copied"
    alone.mkdir()
    shutil.copy(run_dir / "last.pt", alone / "model.pt")
    out = evaluate_checkpoint(eval_cfg(tmp_path, f"ckpt={alone / 'model.pt'}", "dataset.num_val=1"))
    np.testing.assert_allclose(out["class_stats"]["train"]["pixel_share"],
                               record.read(run_dir).class_stats["train"]["pixel_share"], rtol=0, atol=1e-12)
    assert out["rare_classes"] == record.read(run_dir).rare_classes


def test_settings_default_to_the_checkpoints_trainer():
    import types

    options = types.SimpleNamespace(precision=None, channels_last=None, batch_size=None)
    meta = types.SimpleNamespace(config={"trainer": {"precision": "bf16-mixed", "channels_last": True,
                                                     "val_batch_size": 5}})
    assert run_settings(options, meta, torch.device("cpu")) == (torch.bfloat16, True, 5)
    options = types.SimpleNamespace(precision="32", channels_last=False, batch_size=2)
    assert run_settings(options, meta, torch.device("cpu")) == (None, False, 2)
    meta.config["trainer"]["precision"] = "16-mixed"  # trained on a GPU, evaluated on the CPU: fp16 there too
    assert run_settings(types.SimpleNamespace(precision=None, channels_last=None, batch_size=None), meta,
                        torch.device("cpu"))[0] is torch.float16
    with pytest.raises(ConfigError, match="precision='fp64' is not valid"):
        run_settings(types.SimpleNamespace(precision="fp64", channels_last=None, batch_size=None), meta,
                     torch.device("cpu"))


@pytest.mark.parametrize("override, match", [
    ("resolution=native", "resolution='native'"),
    ("split=holdout", "split='holdout'"),
    ("inference.mode=tiles", "inference.mode='tiles'"),
    ("inference.blend=cosine", "inference.blend='cosine'"),
    ("tta.scales=[0]", "tta.scales="),
    ("batch_size=0", "batch_size=0"),
    ("inference.overlap=1.0", "inference.overlap=1.0"),
])
def test_bad_values_are_config_errors_naming_the_key(tmp_path, override, match):
    with pytest.raises(ConfigError, match=match):
        read_options(eval_cfg(tmp_path, "ckpt=x.pt", "inference.mode=slide", override))


def test_errors_missing_checkpoint_classes_that_differ_and_an_existing_output(run_dir, tmp_path):
    with pytest.raises(ConfigError, match="ckpt is required"):
        read_options(eval_cfg(tmp_path))
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        evaluate_checkpoint(eval_cfg(tmp_path, f"ckpt={tmp_path / 'missing.pt'}"))
    fixture = write_folder(tmp_path / "defects")
    with pytest.raises(CheckpointError) as info:
        evaluate_checkpoint(eval_cfg(tmp_path, f"ckpt={run_dir}", "dataset=folder", f"dataset.root={fixture.root}",
                                     "dataset.classes=[background,scratch,dent]"))
    message = str(info.value)
    assert str(fixture.class_names) in message and str(CLASSES) in message and "\n" not in message
    with pytest.raises(ConfigError, match="already holds"):  # never into the training run's directory
        evaluate_checkpoint(eval_cfg(tmp_path, f"ckpt={run_dir}", f"output_dir={run_dir}"))
    assert record.read(run_dir).final["epoch"] == 1  # untouched


# -- the command line ------------------------------------------------------------------------------------------
def _cli(*args, cwd: Path):
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return forkserver.run([sys.executable, "-m", "train_seg.cli.evaluate", *args], cwd=cwd, env=env, timeout=300)


def test_cli_prints_the_table_and_writes_a_new_output_directory(run_dir, tmp_path):
    result = _cli(f"ckpt={run_dir}", "dataset.num_val=1", f"hydra.run.dir={tmp_path / 'e'}", "progress=false",
                  f"paths.cache_dir={tmp_path / 'cache'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    for text in ("share %", "IoU", "recall", "mIoU", *CLASSES):
        assert text in log
    out = tmp_path / "e"
    assert record.read(out).final["evaluation"]["images"] == 1  # dataset.num_val reached the checkpoint's dataset
    assert {"confusion.csv", "confusion.png", "evaluate.log", ".hydra"} <= {p.name for p in out.iterdir()}


def test_cli_bad_input_exits_2_with_one_paragraph(tmp_path):
    result = _cli(f"ckpt={tmp_path / 'nothing'}", f"hydra.run.dir={tmp_path / 'e'}", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("train_seg.cli.evaluate: error: ") and "no such checkpoint" in result.stderr
    assert "Traceback" not in result.stderr and result.stderr.strip().count("\n") == 0


def test_a_sweep_job_directory_is_a_valid_ckpt_argument():
    """Sweep job directories hold `=` and `,` (`3_seed=0,weighting=sqrt_inverse`): ckpt= is quoted for Hydra."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from train_seg.cli.evaluate import command_line_overrides

    path = "/runs/3_seed=0,weighting=sqrt_inverse/best.pt"
    (override,) = OverridesParser.create().parse_overrides(command_line_overrides([f"ckpt={path}"]))
    assert override.key_or_group == "ckpt" and override.value() == path and not override.is_sweep_override()
    assert command_line_overrides(["ckpt='/a b'"]) == ["ckpt='/a b'"]  # already quoted: left alone
