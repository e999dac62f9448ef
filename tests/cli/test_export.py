"""``python -m train_seg.cli.export``: ONNX (run with onnxruntime) and TorchScript files give eager PyTorch's logits on a
size and batch not seen at export, record the class names and the normalisation, refuse to overwrite, and a
missing optional extra is a clear error. onnx and onnxruntime are in the ``dev`` extra: these tests do not skip.

The checkpoint is the tiny real run of tests/evaluation/test_inference.py (64 px MobileNet, 2 steps; trained once per session).
"""
from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import forkserver
from conftest import ROOT, cli_env
from evaluation.test_inference import trained_run
from train_seg.cli import export
from train_seg.cli.export import TORCHSCRIPT_METADATA, main, read_metadata
from train_seg.checkpoint import load_checkpoint_model

CLASSES = ["background", "lake", "road", "car"]
NORMALIZATION = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "max_pixel_value": 255.0}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return trained_run(tmp_path_factory)


@pytest.fixture(scope="module")
def eager(run_dir):
    """Eager logits of the checkpoint on a batch of 3 at 48 x 80 (the exports are traced at 64 x 64)."""
    model, _ = load_checkpoint_model(run_dir / "last.pt")
    images = torch.randn((3, 3, 48, 80), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        return images, model(images)["out"].numpy()


def run(*args: str) -> int:
    with pytest.raises(SystemExit) as info:
        main(list(args))
    return info.value.code


def check_metadata(metadata: dict, fmt: str) -> None:
    assert metadata["class_names"] == CLASSES
    assert {k: metadata["normalization"][k] for k in NORMALIZATION} == NORMALIZATION
    assert metadata["input"]["name"] == "input" and metadata["output"]["shape"] == ["batch", 4, "height", "width"]
    assert metadata["binary_head"] is False and metadata["arch"] == "deeplabv3_mobilenet_v3_large"
    assert len(metadata["palette"]) == 4 and fmt.split("_")[0] in metadata["exporter"]


def test_onnx_export_matches_eager_pytorch_on_a_new_size_and_batch(run_dir, eager, tmp_path, capsys):
    images, expected = eager
    path = tmp_path / "model.onnx"
    assert run(f"--ckpt={run_dir / 'last.pt'}", "--format=onnx", f"--output={path}", "--sample-size=64") == 0
    assert "verified against PyTorch" in capsys.readouterr().out
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"input": images.numpy()})
    assert got.shape == (3, 4, 48, 80)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)

    # dynamic axes, and the metadata as JSON strings in metadata_props
    proto = onnx.load(str(path))
    dims = [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in (proto.graph.input[0],
                                                                                         proto.graph.output[0])]
    assert dims == [["batch", 3, "height", "width"], ["batch", 4, "height", "width"]]
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props["class_names"]) == CLASSES
    check_metadata({key: json.loads(value) for key, value in props.items()}, "torch.onnx")
    assert read_metadata(path)["class_names"] == CLASSES


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch >= 2.10: torch.jit.load is deprecated
def test_torchscript_export_matches_eager_pytorch_on_a_new_size_and_batch(run_dir, eager, tmp_path):
    images, expected = eager
    path = tmp_path / "model.pt"
    assert run(f"--ckpt={run_dir}", "--format=torchscript", f"--output={path}") == 0
    files = {TORCHSCRIPT_METADATA: ""}
    loaded = torch.jit.load(str(path), _extra_files=files)
    with torch.inference_mode():
        got = loaded(images).numpy()
    assert got.shape == (3, 4, 48, 80)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
    check_metadata(json.loads(files[TORCHSCRIPT_METADATA]), "torch.jit")
    assert read_metadata(path)["class_names"] == CLASSES


def test_an_existing_file_is_refused_unless_overwrite(run_dir, tmp_path, capsys):
    path = tmp_path / "model.pt"
    path.write_bytes(b"keep me")
    assert run(f"--ckpt={run_dir}", "--format=torchscript", f"--output={path}") == 2
    err = capsys.readouterr().err
    assert str(path) in err and "--overwrite" in err
    assert path.read_bytes() == b"keep me"
    assert run(f"--ckpt={run_dir}", "--format=torchscript", f"--output={path}", "--overwrite", "--no-verify") == 0
    assert read_metadata(path)["class_names"] == CLASSES


def test_a_failed_verification_exits_1_and_writes_nothing(run_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(export, "run_exported", lambda data, fmt, images: np.zeros((2, 4, 1, 1), np.float32))
    assert run(f"--ckpt={run_dir}", "--format=torchscript", f"--output={tmp_path / 'm.pt'}", "--sample-size=32") == 1
    assert "gives other logits than PyTorch" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_missing_extra_names_the_install_command(run_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` raises ImportError
    assert run(f"--ckpt={run_dir}", "--format=onnx", f"--output={tmp_path / 'm.onnx'}") == 2
    err = capsys.readouterr().err
    assert "pip install 'train_seg[export]'" in err and "onnx" in err
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("args, match", [
    (["--format", "onnx", "--output", "m.onnx"], "required: --ckpt"),
    (["--ckpt", "c", "--output", "m.onnx"], "required: --format"),
    (["--ckpt", "c", "--format", "tflite", "--output", "m"], "--format: 'tflite'"),
    (["--ckpt", "c", "--format", "onnx", "--output", "m.onnx", "--opset", "3"], "--opset: '3'"),
    (["--ckpt", "/no/such/run", "--format", "torchscript", "--output", "m.pt"], "no such checkpoint"),
])
def test_bad_arguments_exit_2(tmp_path, monkeypatch, capsys, args, match):
    monkeypatch.chdir(tmp_path)
    assert run(*args) == 2
    err = capsys.readouterr().err
    assert match in err and err.startswith("train_seg.cli.export: error: ")
    assert list(tmp_path.iterdir()) == []


def test_cli_subprocess(run_dir, tmp_path):
    path = tmp_path / "m.pt"
    env = {**cli_env(), "OMP_NUM_THREADS": "1"}
    result = forkserver.run([sys.executable, "-m", "train_seg.cli.export", f"--ckpt={run_dir}", "--format=torchscript",
                             f"--output={path}", "--no-verify"], cwd=ROOT, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"wrote {path}" in result.stdout and path.is_file()


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_a_model_with_an_auxiliary_head_exports_without_it(run_dir, tmp_path):
    """The aux head (model.aux_loss=true) is dropped: torch.jit.script refused a submodule set to None."""
    from train_seg.engine import builder as build
    from train_seg.checkpoint import checkpoint_meta

    state = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)
    state["config"] = {**state["config"], "model": {**state["config"]["model"], "aux_loss": True}}
    spec = {**state["config"]["model"], "weights": None, "weights_backbone": None}
    state["model"] = build.build_model(spec, num_classes=len(CLASSES)).state_dict()
    assert any(key.startswith("aux_classifier.") for key in state["model"])
    assert checkpoint_meta(state).num_classes == len(CLASSES)
    torch.save(state, tmp_path / "aux.pt")
    path = tmp_path / "aux_scripted.pt"
    assert run(f"--ckpt={tmp_path / 'aux.pt'}", "--format=torchscript", f"--output={path}", "--sample-size=32") == 0
    assert not any("aux_classifier" in name for name, _ in torch.jit.load(str(path)).named_modules())
