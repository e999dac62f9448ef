"""``python -m train_seg.cli.predict``: masks, overlays and probabilities of images of every mode and size, failures
reported by name (exit 1), refusals before any work (exit 2), output names, and the command line itself (one
subprocess).

The checkpoint is the tiny real run of tests/evaluation/test_inference.py (64 px MobileNet, 2 steps; trained once per session).
Most tests call ``train_seg.cli.predict.main`` in-process (it ends with ``SystemExit``)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import forkserver
from conftest import ROOT, cli_env
from evaluation.test_inference import ConvModel, loaded, run_dir  # noqa: F401  (module fixtures: the tiny trained run)
from train_seg import checkpoint
from train_seg.evaluation.inference import predict
from train_seg.cli.predict import main, output_stems
from train_seg.reporting.overlays import class_palette, default_palette

CLASSES = ["background", "lake", "road", "car"]


def env() -> dict:
    return {**cli_env(), "OMP_NUM_THREADS": "1"}


def run(*args: str) -> int:
    """``main([...])``'s exit status."""
    with pytest.raises(SystemExit) as info:
        main([*args, "--no-progress"])
    return info.value.code


def synthetic_rgb(index: int = 0, size: int = 64) -> np.ndarray:
    from train_seg.data.synthetic import SyntheticShapes

    return SyntheticShapes("val", num_val=4, image_size=size).load_image(index)


def write_modes(folder: Path) -> dict[str, np.ndarray]:
    """Images of every kind the command reads; returns {file name: the array predict() should see}."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = synthetic_rgb(0)
    grey = rgb.mean(-1).astype(np.uint8)
    rgba = np.concatenate([synthetic_rgb(1), np.full((64, 64, 1), 128, np.uint8)], -1)
    g16 = (grey.astype(np.uint16) * 257)
    odd = synthetic_rgb(2, size=64)[:37, :53]
    palette_image = Image.fromarray((grey // 64).astype(np.uint8))
    palette_image.putpalette([0, 0, 0, 90, 90, 200, 220, 120, 20, 200, 40, 40])
    images = {"rgb.png": rgb, "grey.png": grey, "rgba.png": rgba, "g16.png": g16, "odd.png": odd}
    for name, array in images.items():
        Image.fromarray(array).save(folder / name)
    palette_image.save(folder / "pal.png")
    images["pal.png"] = np.asarray(palette_image.convert("RGB"))
    Image.fromarray(odd).save(folder / "odd_jpeg.jpg", quality=95)
    with Image.open(folder / "odd_jpeg.jpg") as img:
        images["odd_jpeg.jpg"] = np.asarray(img.convert("RGB"))
    assert Image.open(folder / "g16.png").mode == "I;16" and Image.open(folder / "pal.png").mode == "P"
    return images


@pytest.mark.parametrize("model_kind", ["checkpoint", "stand-in"])
def test_masks_and_overlays_for_every_mode_and_size(run_dir, loaded, tmp_path, monkeypatch, model_kind):
    """The tiny checkpoint predicts one class everywhere (2 training steps), so the same run also goes through a
    stand-in model (a 1x1 conv, the checkpoint's meta) whose masks hold several classes: pixel-exact checks."""
    model, meta = loaded
    if model_kind == "stand-in":
        model = ConvModel(classes=len(CLASSES)).eval()
        monkeypatch.setattr(checkpoint, "load_checkpoint_model", lambda path, device, calibration="auto": (model, meta))
    images = write_modes(tmp_path / "in")
    out = tmp_path / "out"
    assert run(f"--ckpt={run_dir / 'last.pt'}", f"--input={tmp_path / 'in'}", f"--output={out}") == 0
    seen = set()
    for name, array in images.items():
        stem = Path(name).stem
        with Image.open(out / f"{stem}_mask.png") as img:
            assert img.mode == "P" and img.size == (array.shape[1], array.shape[0])
            assert img.getpalette()[:12] == [v for colour in meta.palette for v in colour]
            mask = np.asarray(img)
        assert set(np.unique(mask).tolist()) <= set(range(len(CLASSES)))
        expected, _ = predict(model, array, meta)
        np.testing.assert_array_equal(mask, expected)  # the notebook API, on the array the file holds
        seen.update(np.unique(mask).tolist())
        with Image.open(out / f"{stem}_overlay.png") as img:
            assert img.mode == "RGB" and img.size == (array.shape[1], array.shape[0])
        assert not (out / f"{stem}_probs.npy").exists()
    if model_kind == "stand-in":
        assert len(seen) > 1
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{Path(n).stem}_{kind}.png" for n in images for kind in ("mask", "overlay"))


def test_the_overlay_blends_the_image_with_the_class_colours(run_dir, tmp_path):
    image = synthetic_rgb(3)
    Image.fromarray(image).save(tmp_path / "a.png")
    assert run(f"--ckpt={run_dir}", f"--input={tmp_path / 'a.png'}", f"--output={tmp_path / 'o'}", "--alpha=0.25") == 0
    mask = np.asarray(Image.open(tmp_path / "o" / "a_mask.png"))
    colours = np.asarray(Image.open(tmp_path / "o" / "a_mask.png").convert("RGB"))
    overlay = np.asarray(Image.open(tmp_path / "o" / "a_overlay.png")).astype(np.float64)
    np.testing.assert_allclose(overlay, 0.75 * image + 0.25 * colours, atol=0.51)
    assert mask.shape == image.shape[:2]
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "o" / "a_mask.png").stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def test_save_probs_writes_float16_probabilities_that_sum_to_one(run_dir, loaded, tmp_path):
    model, meta = loaded
    image = synthetic_rgb(1)[:37, :53]
    Image.fromarray(image).save(tmp_path / "x.png")
    args = (f"--ckpt={run_dir / 'last.pt'}", f"--input={tmp_path / 'x.png'}", f"--output={tmp_path / 'o'}", "--save-probs")
    assert run(*args) == 0
    probs = np.load(tmp_path / "o" / "x_probs.npy")
    assert probs.dtype == np.float16 and probs.shape == (len(CLASSES), 37, 53)
    np.testing.assert_allclose(probs.astype(np.float32).sum(0), 1.0, atol=1e-2)
    _, expected = predict(model, image, meta)
    np.testing.assert_allclose(probs.astype(np.float32), expected, atol=1e-3)


def test_sliding_windows_and_tta_are_those_of_predict(run_dir, loaded, tmp_path):
    model, meta = loaded
    image = synthetic_rgb(0)[:50, :61]
    Image.fromarray(image).save(tmp_path / "s.png")
    assert run(f"--ckpt={run_dir / 'last.pt'}", f"--input={tmp_path / 's.png'}", f"--output={tmp_path / 'o'}",
               "--inference-mode=slide", "--inference-window=32", "--inference-blend=gaussian", "--tta-flip",
               "--tta-scales=0.75,1.0", "--batch-size=3") == 0
    expected, _ = predict(model, image, meta, mode="slide", window=32, blend="gaussian", batch_size=3,
                          tta={"flip": True, "scales": [0.75, 1.0]})
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "o" / "s_mask.png")), expected)


def test_a_corrupt_file_and_a_text_file_are_reported_by_name_the_others_are_written(run_dir, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    for index in range(2):
        Image.fromarray(synthetic_rgb(index)).save(folder / f"good{index}.png")
    (folder / "broken.png").write_bytes(np.random.default_rng(0).bytes(500))
    (folder / "notes.txt").write_text("not an image\n")
    Image.fromarray(synthetic_rgb(2)).save(folder / "cut.png")
    (folder / "cut.png").write_bytes((folder / "cut.png").read_bytes()[:300])  # truncated in the pixel data
    out = tmp_path / "out"
    assert run(f"--ckpt={run_dir / 'last.pt'}", f"--input={folder}", f"--output={out}") == 1
    err = capsys.readouterr().err
    for name in ("broken.png", "notes.txt", "cut.png"):
        assert str(folder / name) in err.split("inputs failed")[1], err  # listed at the end
        assert f"{folder / name}:" in err.split("inputs failed")[0]      # and reported as it happened
    assert "3 of 5 inputs failed" in err and "not an image" in err
    assert sorted(p.name for p in out.iterdir()) == ["good0_mask.png", "good0_overlay.png", "good1_mask.png",
                                                     "good1_overlay.png"]


def test_existing_outputs_are_refused_before_any_work_unless_overwrite(run_dir, tmp_path, capsys):
    Image.fromarray(synthetic_rgb(0)).save(tmp_path / "a.png")
    Image.fromarray(synthetic_rgb(1)).save(tmp_path / "b.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "b_mask.png").write_bytes(b"an earlier result")
    args = (f"--ckpt={run_dir / 'last.pt'}", f"--input={tmp_path / '*.png'}", f"--output={out}")
    assert run(*args) == 2
    err = capsys.readouterr().err
    assert str(out / "b_mask.png") in err and "--overwrite" in err and "\n" not in err.strip()
    assert sorted(p.name for p in out.iterdir()) == ["b_mask.png"]  # nothing else written: refused up front
    assert (out / "b_mask.png").read_bytes() == b"an earlier result"
    assert run(*args, "--overwrite") == 0
    assert Image.open(out / "b_mask.png").mode == "P"
    assert run(*args) == 2  # the run's own outputs are protected as well
    assert not list(out.glob(".*.tmp"))  # atomic writes left no temp file


def test_same_stems_do_not_collide(run_dir, tmp_path):
    for sub in ("a", "b/deep"):
        (tmp_path / "in" / sub).mkdir(parents=True)
        Image.fromarray(synthetic_rgb(0)).save(tmp_path / "in" / sub / "x.png")
    Image.fromarray(synthetic_rgb(1)).save(tmp_path / "in" / "a" / "x.jpg")
    out = tmp_path / "out"
    assert run(f"--ckpt={run_dir / 'last.pt'}", f"--input={tmp_path / 'in'}", "--recursive", f"--output={out}") == 0
    masks = sorted(str(p.relative_to(out)) for p in out.rglob("*_mask.png"))
    assert masks == ["a/x_jpg_mask.png", "a/x_png_mask.png", "b/deep/x_mask.png"]
    # one folder: flat; a file alone: flat
    paths = [Path("/d/one/p.png"), Path("/d/one/q.png")]
    assert output_stems(paths) == [Path("p"), Path("q")]
    assert output_stems([Path("/d/two/x.png"), Path("/d/one/x.png")]) == [Path("two/x"), Path("one/x")]


def test_earlier_outputs_in_the_input_folder_are_not_inputs(run_dir, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(synthetic_rgb(0)).save(folder / "a.png")
    for output in (folder / "pred", folder):  # a subfolder, and the input folder itself
        args = (f"--ckpt={run_dir / 'last.pt'}", f"--input={folder}", f"--output={output}", "--recursive")
        assert run(*args) == 0
        assert run(*args, "--overwrite") == 0  # a_mask.png, a_overlay.png are not read as inputs
        assert sorted(p.name for p in output.glob("a_*.png")) == ["a_mask.png", "a_overlay.png"]
    assert sorted(p.name for p in folder.iterdir()) == ["a.png", "a_mask.png", "a_overlay.png", "pred"]


@pytest.mark.parametrize("args, match", [
    (["--input", "x.png", "--output", "o"], "required: --ckpt"),
    (["--ckpt", "c", "--output", "o"], "required: --input"),
    (["--ckpt", "c", "--input", "x", "--output", "o", "--colour", "red"], "unrecognized arguments: --colour"),
    (["--ckpt", "c", "--input", "x", "--output", "o", "--inference-mode", "tiles"], "--inference-mode: 'tiles'"),
    (["--ckpt", "c", "--input", "x", "--output", "o", "--tta-flip=maybe"], "--tta-flip"),
    (["--ckpt", "c", "--input", "x", "--output", "o", "--alpha", "2"], "--alpha: '2'"),
    (["--ckpt", "c", "--input", "x", "--output", "o", "--inference-mode", "slide", "--inference-overlap", "1"],
     "--inference-overlap"),
    (["--ckpt", "c", "--input", "x", "--output", "o", "--tta-scales", "0,1"], "--tta-scales"),
    (["--ckpt", "c", "--input", "/no/such/image.png", "--output", "o"], "no such file or folder"),
    (["--ckpt", "c", "--input", "/no/such/*.png", "--output", "o"], "matches no file"),
])
def test_bad_arguments_exit_2_naming_the_key(tmp_path, capsys, monkeypatch, args, match):
    monkeypatch.chdir(tmp_path)
    assert run(*args) == 2
    err = capsys.readouterr().err
    assert match in err and err.startswith("train_seg.cli.predict: error: ")
    assert not (tmp_path / "o").exists()


def test_checkpoint_errors_exit_2_before_any_output(tmp_path, capsys):
    Image.fromarray(synthetic_rgb(0)).save(tmp_path / "a.png")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    for ckpt in (tmp_path / "missing.pt", tmp_path / "bad.pt"):
        assert run(f"--ckpt={ckpt}", f"--input={tmp_path / 'a.png'}", f"--output={tmp_path / 'o'}") == 2
        assert str(ckpt) in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_palettes():
    colours = class_palette([[1, 2, 3]], 3)  # a checkpoint palette shorter than its classes
    assert colours.tolist() == [[1, 2, 3], *default_palette(3)[1:]]
    assert len({tuple(c) for c in default_palette(256)}) == 256


def test_cli_subprocess_reports_failures_and_exits_1(run_dir, tmp_path):
    Image.fromarray(synthetic_rgb(0)).save(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"\x00" * 64)
    out = tmp_path / "out"
    result = forkserver.run([sys.executable, "-m", "train_seg.cli.predict", f"--ckpt={run_dir}", f"--input={tmp_path}/*.png",
                             f"--output={out}"], cwd=ROOT, env=env(), timeout=300)
    assert result.returncode == 1, result.stderr[-2000:]
    assert f"{tmp_path / 'b.png'}: not an image" in result.stderr
    assert "wrote the outputs of 1 of 2 inputs" in result.stdout and (out / "a_mask.png").is_file()
    help_text = forkserver.run([sys.executable, "-m", "train_seg.cli.predict", "--help"], cwd=ROOT, env=env(), timeout=300)
    assert help_text.returncode == 0 and "--inference-mode" in help_text.stdout and "--save-probs" in help_text.stdout
