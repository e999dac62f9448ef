"""python -m train_seg.cli.calibrate on a tiny trained run: the fitted offsets, calibration.json, the refusals, and
evaluate / predict / export applying the offsets (the same masks everywhere, the exported graph included)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import compose_cfg
from train_seg.checkpoint import CALIBRATION_FILE, Calibration, CheckpointError, load_checkpoint_model
from train_seg.cli.calibrate import calibrate_checkpoint
from train_seg.cli.evaluate import command_line_overrides, evaluate_checkpoint
from train_seg.config.command_line import compose
from train_seg.config.validation import ConfigError
from train_seg.data.synthetic import SyntheticShapes
from train_seg.evaluation.inference import to_model_input


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny model trained long enough (48 steps) for its logits to tell the classes apart."""
    from train_seg.engine.trainer import train

    base = tmp_path_factory.mktemp("calibrated")
    train(compose_cfg(base, "model=tiny", "trainer.max_epochs=6", "dataset.num_train=16", "logger=none",
                      "optimizer.lr=0.05", "trainer.precision=32", "weighting=sqrt_inverse"), base / "run")
    return base / "run"


def calibrate_cfg(tmp_path, *overrides: str):
    base = ["progress=false", f"paths.cache_dir={tmp_path / 'cache'}", "dataset.num_calib=6",
            f"output_dir={tmp_path / 'out'}"]
    return compose(command_line_overrides([*base, *overrides]), config_name="calibrate")


def eval_cfg(tmp_path, *overrides: str):
    base = [f"output_dir={tmp_path / 'eval'}", "progress=false", f"paths.cache_dir={tmp_path / 'cache'}"]
    return compose(command_line_overrides([*base, *overrides]), config_name="evaluate")


@pytest.fixture(scope="module")
def fitted(run_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fit")
    found = calibrate_checkpoint(calibrate_cfg(tmp, f"ckpt={run_dir / 'last.pt'}", "metric=val/mIoU"))
    return found


def test_the_fit_is_written_beside_the_checkpoint_and_never_lowers_the_metric(run_dir, fitted):
    written = Calibration.read(run_dir / CALIBRATION_FILE)
    assert written == fitted and fitted.split == "calib" and fitted.method == "fit"
    assert fitted.after >= fitted.before and len(fitted.offsets) == 4 and fitted.offsets[0] == 0
    assert fitted.pixels == 6 * 64 * 64 and fitted.step == 48 and fitted.checkpoint.endswith("last.pt")
    assert set(fitted.iou_before) == set(fitted.iou_after) == {"background", "lake", "road", "car"}
    assert any(v != 0 for v in fitted.offsets) and fitted.after > fitted.before + 0.01  # a short training's
    # decision rule is far from its best


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.load / script: deprecated by torch 2.14
def test_evaluate_predict_and_export_apply_the_offsets(run_dir, fitted, tmp_path):
    model, meta = load_checkpoint_model(run_dir / "last.pt")
    plain, _ = load_checkpoint_model(run_dir / "last.pt", calibration="none")
    assert meta.calibration == fitted
    image = SyntheticShapes("val", num_val=4, image_size=64).load_image(0)
    x = to_model_input(image, meta)
    with torch.no_grad():
        calibrated, raw = model(x)["out"], plain(x)["out"]
    torch.testing.assert_close(calibrated, raw + torch.tensor(fitted.offsets).view(1, -1, 1, 1))
    expected = calibrated.argmax(1)[0].numpy()

    from train_seg.cli.predict import main as predict_main
    Image.fromarray(image).save(tmp_path / "a.png")
    with pytest.raises(SystemExit) as done:
        predict_main([f"--ckpt={run_dir / 'last.pt'}", f"--input={tmp_path / 'a.png'}", f"--output={tmp_path / 'p'}"])
    assert done.value.code == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "p" / "a_mask.png")), expected)

    onnxruntime = pytest.importorskip("onnxruntime")
    from train_seg.cli.export import main as export_main
    with pytest.raises(SystemExit) as done:
        export_main([f"--ckpt={run_dir / 'last.pt'}", "--format=onnx", f"--output={tmp_path / 'm.onnx'}"])
    assert done.value.code == 0
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"))
    logits = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(logits, calibrated.numpy(), atol=1e-4 * float(np.abs(logits).max()))
    assert np.array_equal(logits.argmax(1)[0], expected)  # the graph carries the offsets
    with pytest.raises(SystemExit) as done:
        export_main([f"--ckpt={run_dir / 'last.pt'}", "--format=torchscript", f"--output={tmp_path / 'm.pt'}"])
    assert done.value.code == 0
    scripted = torch.jit.load(str(tmp_path / "m.pt"))
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), calibrated, atol=1e-4 * float(calibrated.abs().max()), rtol=0)

    out = evaluate_checkpoint(eval_cfg(tmp_path, f"ckpt={run_dir / 'last.pt'}"))
    assert out["final"]["evaluation"]["calibration"]["offsets"]["car"] == pytest.approx(fitted.offsets[3])
    none = evaluate_checkpoint(eval_cfg(tmp_path / "n", f"ckpt={run_dir / 'last.pt'}", "calibration=none"))
    assert none["final"]["evaluation"]["calibration"] is None
    # best.pt is another file: the calibration of last.pt is not applied to it
    assert load_checkpoint_model(run_dir / "best.pt")[1].calibration is None


def test_prior_offsets_and_the_refusals(run_dir, fitted, tmp_path):
    with pytest.raises(ConfigError, match="already exists .*overwrite=true"):
        calibrate_checkpoint(calibrate_cfg(tmp_path, f"ckpt={run_dir / 'last.pt'}"))
    with pytest.raises(ConfigError, match="split=val is the split that evaluate reports"):
        calibrate_checkpoint(calibrate_cfg(tmp_path, f"ckpt={run_dir / 'last.pt'}", "split=val", "overwrite=true"))
    found = calibrate_checkpoint(calibrate_cfg(tmp_path, f"ckpt={run_dir / 'last.pt'}", "method=prior", "tau=1",
                                               "overwrite=true"))
    share = json.loads((run_dir / "metrics.json").read_text())["class_stats"]["train"]["pixel_share"]
    expected = [-math.log(max(s, 1e-6)) + math.log(max(share[0], 1e-6)) for s in share]
    assert found.offsets == pytest.approx(expected, abs=1e-5) and found.method == "prior" and found.tau == 1.0
    reported = calibrate_checkpoint(calibrate_cfg(tmp_path, f"ckpt={run_dir / 'last.pt'}", "split=val",
                                                  "allow_reported_split=true", "overwrite=true"))
    assert reported.split == "val"
    # a checkpoint that changed after its calibration is refused, not silently mis-calibrated
    record = json.loads((run_dir / CALIBRATION_FILE).read_text())
    (run_dir / CALIBRATION_FILE).write_text(json.dumps({**record, "step": 99}))
    with pytest.raises(CheckpointError, match="at step 99 .* now at step 48"):
        load_checkpoint_model(run_dir / "last.pt")
    assert load_checkpoint_model(run_dir / "last.pt", calibration="none")[1].calibration is None
    fitted.write(run_dir / CALIBRATION_FILE)


def test_the_command_line_refuses_the_reported_split_with_exit_status_2(run_dir, fitted, tmp_path):
    import sys

    import forkserver
    from conftest import cli_env

    before = (run_dir / CALIBRATION_FILE).read_bytes()
    result = forkserver.run([sys.executable, "-m", "train_seg.cli.calibrate", f"ckpt={run_dir}", "split=val",
                             f"hydra.run.dir={tmp_path / 'c'}", "progress=false"], cwd=tmp_path, env=cli_env(),
                            timeout=300)
    assert result.returncode == 2 and "split=val is the split that evaluate reports" in result.stderr
    assert "Traceback" not in result.stderr and (run_dir / CALIBRATION_FILE).read_bytes() == before
