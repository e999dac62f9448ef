"""Every bad input of issue 11 item 6, table-driven: the real command line (``train_seg.__main__.main``, in-process)
stops before any training step with exit status 2 and one short paragraph on stderr that names the key or the file,
no traceback, and an earlier run's files in the same ``hydra.run.dir`` stay byte-identical (mtime and bytes).
Then the checkpoint commands (evaluate, predict, export) on bad checkpoints, a disk that fills during a checkpoint
write, a sample that becomes unreadable during training (``dataset.on_bad_sample``), and item 7: checkpoints load
with ``torch.load(weights_only=True)``, and an older one holding Python objects is refused with how to convert it.
"""
from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from PIL import Image

from _dataset_fixtures import FOLDER_CLASSES, truncate, write_folder, write_rgb
from train_seg.checkpoint import CHECKPOINT_VERSION, CheckpointError, read_checkpoint, save_checkpoint

SYNTHETIC_CLASSES = ["background", "lake", "road", "car"]
TINY = ["trainer.max_steps=1", "trainer.batch_size=2", "trainer.num_threads=1", "trainer.num_workers=0",
        "trainer.progress=false", "logger=none"]
SYNTHETIC = ["dataset.num_train=4", "dataset.num_val=2", "dataset.image_size=64"]


def folder(root: Path, *more: str) -> list[str]:
    return ["dataset=folder", f"dataset.root={root}", f"dataset.classes=[{','.join(FOLDER_CLASSES)}]",
            "dataset.val_ratio=0.4", *more]


def fake_checkpoint(path: Path, **entries) -> Path:
    state = {"model": {"weight": torch.zeros(2)}, "config": {"model": {"arch": "deeplabv3_resnet50"}},
             "class_names": SYNTHETIC_CLASSES, "epoch": 1, "global_step": 1, **entries}
    save_checkpoint(path, state)
    return path


# -- the table: id -> (tmp_path -> (overrides, strings the message must contain)) ------------------------------
def _weights_of_another_architecture(tmp: Path):
    torch.save({"classifier.weight": torch.zeros(3, 3)}, tmp / "other.pth")
    return [*SYNTHETIC, f"model.weights={tmp / 'other.pth'}"], [str(tmp / "other.pth"), "architecture"]


def _folder_case(edit):
    def case(tmp: Path):
        fixture = write_folder(tmp / "data")
        needle = edit(fixture.root)
        return folder(fixture.root), [str(needle)]
    return case


def _image_without_mask(root: Path):
    (root / "masks" / "part_03.png").unlink()
    return root / "images" / "part_03.jpg"


def _size_mismatch(root: Path):
    write_rgb(root / "images" / "part_02.jpg", 7, size=(20, 20))
    return root / "images" / "part_02.jpg"


def _label_out_of_range(root: Path):
    mask = np.full((24, 32), 7, np.uint8)
    Image.fromarray(mask, mode="L").save(root / "masks" / "part_01.png")
    return root / "masks" / "part_01.png"


def _not_an_image(root: Path):
    (root / "images" / "part_04.jpg").write_bytes(b"this is not a jpeg")
    return root / "images" / "part_04.jpg"


def _truncated_image(root: Path):  # the header is intact: only decoding the pixels finds it
    truncate(root / "images" / "part_00.jpg", keep=0.85)
    return root / "images" / "part_00.jpg"


def _truncated_mask(root: Path):
    truncate(root / "masks" / "part_00.png", keep=0.3)
    return root / "masks" / "part_00.png"


def _empty_split(root: Path):
    for path in (root / "images").iterdir():
        path.unlink()
    return root / "images"


def _resume(kind: str):
    def case(tmp: Path):
        path = tmp / f"{kind}.pt"
        if kind == "missing":
            needles = [str(path)]
        elif kind == "truncated":
            fake_checkpoint(path)
            truncate(path, keep=0.5)
            needles = [str(path), "truncated"]
        elif kind == "not_a_checkpoint":
            path.write_text("hello")
            needles = [str(path), "not a train_seg checkpoint"]
        elif kind == "other_classes":
            fake_checkpoint(path, class_names=["a", "b"])
            needles = [f"trainer.resume={path}", "classes"]
        elif kind == "other_model":
            fake_checkpoint(path)
            needles = [f"trainer.resume={path}", "do not fit"]
        elif kind == "newer":
            fake_checkpoint(path, version=CHECKPOINT_VERSION + 1)
            needles = [str(path), "newer train_seg"]
        else:  # an older checkpoint holding numpy objects the safe loader refuses
            torch.save({"model": {}, "config": {}, "rng": np.zeros(3)}, path)
            needles = [str(path), "python -m train_seg.cli.checkpoint convert"]
        return [*SYNTHETIC, f"trainer.resume={path}"], needles
    return case


def _values(*overrides: str, needles: tuple[str, ...]):
    return lambda tmp: ([*SYNTHETIC, *overrides], list(needles))


CASES = {
    # config values (the schema, the group checks, the constructors) and Hydra's own errors
    "gamma_negative": _values("loss=focal", "loss.gamma=-1", needles=("loss.gamma=-1",)),
    "gamma_nan": _values("loss=focal", "loss.gamma=nan", needles=("loss.gamma",)),
    "gamma_not_a_number": _values("loss=focal", "loss.gamma=abc", needles=("loss.gamma",)),
    "smoothing_negative": _values("loss.label_smoothing=-0.1", needles=("loss.label_smoothing",)),
    "dice_smooth_nan": _values("loss=dice", "loss.smooth=nan", needles=("loss.smooth",)),
    "combo_term_gamma": _values("loss=focal_dice", "loss.terms.focal.gamma=-2", needles=("loss.terms.focal.gamma",)),
    "lr_nan": _values("optimizer.lr=nan", needles=("optimizer.lr=nan",)),
    "lr_negative": _values("optimizer.lr=-0.1", needles=("optimizer.lr=-0.1",)),
    "weight_decay_negative": _values("optimizer.weight_decay=-1", needles=("optimizer.weight_decay",)),
    "momentum_nan": _values("optimizer.momentum=nan", needles=("optimizer.momentum",)),
    "momentum_negative": _values("optimizer.momentum=-0.5", needles=("optimizer.momentum",)),
    "adamw_beta": _values("optimizer=adamw", "optimizer.betas=[0.9,2]", needles=("optimizer.betas",)),
    "adamw_eps": _values("optimizer=adamw", "optimizer.eps=-1", needles=("optimizer.eps",)),
    "manual_weights_length": _values("weighting=manual", "weighting.values=[1,2]", needles=("weighting.values",)),
    "manual_weights_negative": _values("weighting=manual", "weighting.values=[1,-2,1,1]",
                                       needles=("weighting.values",)),
    "max_ratio_below_1": _values("weighting=inverse", "weighting.max_ratio=0.5", needles=("weighting.max_ratio",)),
    "unknown_scheme": _values("weighting.scheme=foo", needles=("weighting.scheme", "inverse")),
    "unknown_loss": _values("loss=foo", needles=("loss/foo", "focal")),
    "unknown_model": _values("model=foo", needles=("model/foo", "deeplabv3_resnet50")),
    "unknown_dataset": _values("dataset=foo", needles=("dataset/foo", "cityscapes")),
    "wrong_type": _values("trainer.max_epochs=abc", needles=("trainer.max_epochs",)),
    "unknown_key": _values("trainer.max_epoch=3", needles=("trainer.max_epoch",)),
    "batch_size_1": _values("trainer.batch_size=1", needles=("trainer.batch_size",)),
    "output_stride": _values("model.output_stride=5", needles=("model.output_stride",)),
    "on_bad_sample": _values("dataset.on_bad_sample=maybe", needles=("dataset.on_bad_sample",)),
    # weights files
    "weights_missing": lambda tmp: ([*SYNTHETIC, f"model.weights={tmp / 'nope.pth'}"], [str(tmp / "nope.pth")]),
    "weights_other_architecture": _weights_of_another_architecture,
    # the dataset
    "root_missing": lambda tmp: (folder(tmp / "nowhere"), [str(tmp / "nowhere")]),
    "empty_split": _folder_case(_empty_split),
    "image_without_mask": _folder_case(_image_without_mask),
    "size_mismatch": _folder_case(_size_mismatch),
    "label_out_of_range": _folder_case(_label_out_of_range),
    "not_an_image": _folder_case(_not_an_image),
    "truncated_mask": _folder_case(_truncated_mask),
    "truncated_image": _folder_case(_truncated_image),
    # trainer.resume
    **{f"resume_{kind}": _resume(kind) for kind in ("missing", "truncated", "not_a_checkpoint", "other_classes",
                                                    "other_model", "newer", "python_objects")},
}


def snapshot(folder_: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(folder_)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder_.rglob("*")) if p.is_file()}


@pytest.fixture
def earlier_run(tmp_path) -> Path:
    """A run directory holding an earlier attempt's files (no checkpoint: that would be refused first)."""
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text("seed: 1\n")
    (run_dir / "train_seg.log").write_text("an earlier attempt\n")
    (run_dir / "notes.txt").write_text("keep me\n")
    for path in run_dir.rglob("*"):
        os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    return run_dir


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """``python -m train_seg <args>`` in-process: (exit status, stderr)."""
    from train_seg.__main__ import main

    GlobalHydra.instance().clear()
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.setattr(sys, "argv", ["train_seg", *args])
    with pytest.raises(SystemExit) as info:
        main()
    GlobalHydra.instance().clear()
    return info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_bad_input_stops_before_training_with_one_paragraph(case, tmp_path, earlier_run, monkeypatch, capsys):
    overrides, needles = CASES[case](tmp_path)
    before = snapshot(earlier_run)
    code, err = run_cli(monkeypatch, capsys, *TINY, *overrides, f"paths.cache_dir={tmp_path / 'cache'}",
                        f"hydra.run.dir={earlier_run}")
    assert code == 2, err
    assert err.startswith("train_seg: error: ") and "Traceback" not in err, err
    assert len(err.strip().splitlines()) <= 10, err
    for needle in needles:
        assert needle in err, (needle, err)
    assert snapshot(earlier_run) == before, "the earlier run's files changed"


@pytest.mark.parametrize("where", ["under_a_file", "read_only"])
def test_a_run_directory_that_cannot_be_written(where, tmp_path, monkeypatch, capsys):
    if where == "under_a_file":
        (tmp_path / "file").write_text("x")
        run_dir = tmp_path / "file" / "run"
    else:
        if os.geteuid() == 0:
            run_dir = Path("/proc/train_seg_run")  # root writes through chmod; /proc takes no new files
        else:
            (tmp_path / "ro").mkdir()
            os.chmod(tmp_path / "ro", 0o555)
            run_dir = tmp_path / "ro" / "run"
    code, err = run_cli(monkeypatch, capsys, *TINY, *SYNTHETIC, f"paths.cache_dir={tmp_path / 'cache'}",
                        f"hydra.run.dir={run_dir}")
    assert code == 2 and f"hydra.run.dir={run_dir}" in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) <= 10 and not run_dir.exists()


def test_hydra_full_error_shows_the_traceback(tmp_path, monkeypatch, capsys):
    from train_seg.__main__ import main

    GlobalHydra.instance().clear()
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    monkeypatch.setattr(sys, "argv", ["train_seg", *TINY, *SYNTHETIC, "optimizer.lr=nan",
                                      f"hydra.run.dir={tmp_path / 'run'}"])
    with pytest.raises(ValueError, match="optimizer.lr=nan"):
        main()
    GlobalHydra.instance().clear()


# -- the commands that read a checkpoint -----------------------------------------------------------------------
def _bad_checkpoints(tmp: Path) -> dict[str, tuple[Path, str]]:
    (tmp / "text.pt").write_text("hello")
    truncated = fake_checkpoint(tmp / "truncated.pt")
    truncate(truncated)
    torch.save({"model": {}, "config": {}, "rng": np.zeros(3)}, tmp / "old.pt")
    return {"missing": (tmp / "missing.pt", "no such checkpoint"), "not_a_checkpoint": (tmp / "text.pt", "not a"),
            "truncated": (truncated, "truncated"),
            "newer": (fake_checkpoint(tmp / "newer.pt", version=CHECKPOINT_VERSION + 1), "newer train_seg"),
            "python_objects": (tmp / "old.pt", "train_seg.cli.checkpoint convert")}


@pytest.mark.parametrize("command", ["evaluate", "predict", "export"])
def test_evaluate_predict_export_refuse_bad_checkpoints(command, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "a.png")
    for kind, (ckpt, needle) in _bad_checkpoints(tmp_path).items():
        if command == "evaluate":
            from train_seg.cli.evaluate import main as evaluate_main

            GlobalHydra.instance().clear()
            monkeypatch.setattr(sys, "argv", ["train_seg.cli.evaluate", f"ckpt={ckpt}", f"output_dir={tmp_path / 'e'}"])
            call = evaluate_main
        elif command == "predict":
            from train_seg.cli.predict import main as predict_main

            call = lambda: predict_main(["--ckpt", str(ckpt), "--input", str(tmp_path / "a.png"),  # noqa: E731
                                         "--output", str(tmp_path / "o"), "--no-progress"])
        else:
            from train_seg.cli.export import main as export_main

            call = lambda: export_main(["--ckpt", str(ckpt), "--format", "torchscript",  # noqa: E731
                                        "--output", str(tmp_path / "m.pt")])
        with pytest.raises(SystemExit) as info:
            call()
        err = capsys.readouterr().err
        assert info.value.code == 2, (kind, err)
        assert str(ckpt) in err and needle in err and "Traceback" not in err, (kind, err)
        assert len(err.strip().splitlines()) <= 10, (kind, err)
    assert not (tmp_path / "o").exists() and not (tmp_path / "m.pt").exists()


# -- a disk that fills during a checkpoint write ---------------------------------------------------------------
def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so(tmp_path, monkeypatch):
    from train_seg import atomic

    path = fake_checkpoint(tmp_path / "last.pt")
    before = path.read_bytes()
    real_save = torch.save

    def save_until_full(obj, handle, *args, **kwargs):
        handle.write(b"x" * 1000)  # some bytes reach the temp file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", save_until_full)
    with pytest.raises(atomic.DiskFullError) as info:
        save_checkpoint(path, {"model": {}, "config": {}})
    monkeypatch.setattr(torch, "save", real_save)
    message = str(info.value)
    assert f"the previous {path} is intact" in message and "Free space" in message and "trainer.resume=" in message
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    assert read_checkpoint(path)["epoch"] == 1


# -- a sample that becomes unreadable during training ----------------------------------------------------------
def _folder_dataset(tmp: Path, on_bad_sample: str):
    from train_seg.data.base import SegmentationDataset
    from train_seg.data.folder import FolderSegmentation

    fixture = write_folder(tmp / "data")
    source = FolderSegmentation("train", str(fixture.root), classes=FOLDER_CLASSES, val_ratio=0.4)
    source.validate()
    bad = source.pairs[1][0]
    bad.write_bytes(bad.read_bytes()[:40])  # the file is cut short after the checks passed
    return SegmentationDataset(source, on_bad_sample=on_bad_sample), bad


def test_an_unreadable_sample_during_training_stops_naming_the_file(tmp_path):
    from train_seg.data.base import DatasetError

    dataset, bad = _folder_dataset(tmp_path, "error")
    loader = torch.utils.data.DataLoader(dataset, batch_size=3)
    with pytest.raises(DatasetError, match="dataset.on_bad_sample=skip") as info:
        next(iter(loader))
    assert str(bad) in str(info.value)


def test_an_unreadable_sample_is_skipped_counted_and_logged(tmp_path, caplog):
    from train_seg.data.base import skip_bad_samples

    dataset, bad = _folder_dataset(tmp_path, "skip")
    train_loader = torch.utils.data.DataLoader(dataset, batch_size=2, drop_last=True)
    val_loader = torch.utils.data.DataLoader(dataset, batch_size=3)
    skip_bad_samples(train_loader, val_loader)
    with caplog.at_level("WARNING"):
        images, masks = next(iter(train_loader))  # item 1 is unreadable: its place is taken, the batch stays at 2
        assert images.shape[0] == masks.shape[0] == 2
        images, masks = next(iter(val_loader))  # evaluation drops it: no pixel counted twice
        assert images.shape[0] == 2
    assert dataset.skipped == 2 and str(bad) in caplog.text and "on_bad_sample=skip" in caplog.text


def test_a_worker_error_is_reported_as_its_own_message():
    from train_seg.config.command_line import user_message
    from train_seg.data.base import DatasetError

    wrapped = DatasetError("Caught DatasetError in DataLoader worker process 0.\nOriginal Traceback (most recent "
                           "call last):\n  File \"x.py\", line 1\ntrain_seg.data.base.DatasetError: Cannot read image "
                           "/d/a.jpg: broken. Restore it.")
    assert user_message(wrapped) == "Cannot read image /d/a.jpg: broken. Restore it."


# -- item 7: weights_only checkpoints ----------------------------------------------------------------------------
def test_a_saved_checkpoint_loads_with_weights_only(tmp_path):
    from train_seg.checkpoint import capture_rng_state

    path = fake_checkpoint(tmp_path / "c.pt", rng=capture_rng_state(), palette=[[0, 0, 0]], best={"value": 0.5})
    state = torch.load(path, weights_only=True)
    assert state["version"] == CHECKPOINT_VERSION and read_checkpoint(path)["class_names"] == SYNTHETIC_CLASSES


def test_an_older_checkpoint_with_python_objects_is_refused_then_converted(tmp_path, capsys):
    from train_seg.cli.checkpoint import main as checkpoint_main

    old = tmp_path / "old.pt"
    torch.save({"model": {"w": torch.ones(2)}, "config": {"seed": np.int64(3)}, "class_names": ("a", "b"),
                "stats": np.arange(3), "where": Path("/x")}, old)
    with pytest.raises(CheckpointError, match="python -m train_seg.cli.checkpoint convert"):
        read_checkpoint(old)
    checkpoint_main(["convert", str(old), str(tmp_path / "new.pt")])
    assert "converted" in capsys.readouterr().out
    state = torch.load(tmp_path / "new.pt", weights_only=True)
    assert state["config"]["seed"] == 3 and state["stats"].tolist() == [0, 1, 2] and state["where"] == "/x"
    assert state["version"] == CHECKPOINT_VERSION
    torch.save({"weights": np.zeros(2)}, tmp_path / "foreign.pt")  # not ours: no conversion offered
    with pytest.raises(CheckpointError, match="not a train_seg checkpoint") as refused:
        read_checkpoint(tmp_path / "foreign.pt")
    assert "convert" not in str(refused.value)
