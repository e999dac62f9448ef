"""``python -m train_seg.cli.export``: ONNX (run with onnxruntime), torch.export (.pt2) and TorchScript files give eager
PyTorch's logits on a size and batch not seen at export, record the class names and the normalisation, refuse to
overwrite, a model whose exported graph differs from eager is refused before writing, and a missing optional extra or
too old a torch is a clear error. onnx, onnxruntime and onnxscript (the ``export`` extra) must be installed: these
tests do not skip.

The checkpoints are real runs: the tiny run of tests/evaluation/test_inference.py (64 px MobileNet, 2 steps; trained
once per session; its dynamo ONNX export is this file's one slow export) and a 1-step ``model=tiny`` run.
"""
from __future__ import annotations

import json
import sys
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import forkserver
from conftest import ROOT, cli_env, compose_cfg
from evaluation.test_inference import trained_run
from train_seg.cli import export
from train_seg.cli.export import MIN_SIDE, METADATA_FILE, main, read_metadata
from train_seg.checkpoint import load_checkpoint_model

CLASSES = ["background", "lake", "road", "car"]
NORMALIZATION = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "max_pixel_value": 255.0}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return trained_run(tmp_path_factory)


@pytest.fixture(scope="module")
def eager(run_dir):
    """Eager logits of the checkpoint on a batch of 3 at 48 x 80 (the exports are traced at 64 x 64)."""
    return eager_logits(run_dir / "last.pt")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The run directory of a 1-step ``model=tiny`` training (same classes and normalisation)."""
    from train_seg.engine.trainer import train

    base = tmp_path_factory.mktemp("tiny")
    train(compose_cfg(base, "model=tiny", "trainer.max_steps=1", "logger=none", "trainer.precision=32"), base / "run")
    return base / "run"


@pytest.fixture(scope="module")
def tiny_eager(tiny_run):
    return eager_logits(tiny_run / "last.pt")


def eager_logits(ckpt, shape=(3, 3, 48, 80)):
    model, _ = load_checkpoint_model(ckpt)
    images = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        return images, model(images)["out"].numpy()


def torchscript_warnings(caught) -> list[str]:
    """The messages among ``caught`` of the warnings torch gives for TorchScript (FutureWarning: jit.script,
    jit.trace, jit.load; DeprecationWarning: the TorchScript-based ONNX exporter)."""
    return [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))
            and any(word in str(w.message) for word in ("jit", "TorchScript", "torchscript"))]


def run(*args: str) -> int:
    with pytest.raises(SystemExit) as info:
        main(list(args))
    return info.value.code


def export_without_torchscript(capsys, *args: str) -> None:
    """Runs the export with ``args``: exit 0, verified, and not one TorchScript warning on the way."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert run(*args) == 0
    assert torchscript_warnings(caught) == []
    assert "verified against PyTorch" in capsys.readouterr().out


def check_metadata(metadata: dict, fmt: str, arch: str = "deeplabv3_mobilenet_v3_large") -> None:
    assert metadata["class_names"] == CLASSES
    assert {k: metadata["normalization"][k] for k in NORMALIZATION} == NORMALIZATION
    assert metadata["input"]["name"] == "input" and metadata["output"]["shape"] == ["batch", 4, "height", "width"]
    assert metadata["binary_head"] is False and metadata["arch"] == arch
    assert len(metadata["palette"]) == 4 and fmt.split("_")[0] in metadata["exporter"]


def test_onnx_export_matches_eager_pytorch_on_a_new_size_and_batch(run_dir, eager, tmp_path, capsys):
    """The default exporter is torch's torch.export-based one (dynamo=True, opset 18), with no TorchScript warning;
    the MobileNet's padding-aware ASPP convs export as the plain conv."""
    images, expected = eager
    path = tmp_path / "model.onnx"
    export_without_torchscript(capsys, f"--ckpt={run_dir / 'last.pt'}", "--format=onnx", f"--output={path}",
                               "--sample-size=64")
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
    assert json.loads(props["exporter"]) == "torch.onnx.export (torch.export-based, dynamo=True), opset 18"
    assert [op.version for op in proto.opset_import if op.domain == ""] == [18]


@pytest.mark.filterwarnings("ignore::FutureWarning")  # the TorchScript-based exporter is deprecated by torch
def test_the_legacy_onnx_exporter_still_works(tiny_run, tiny_eager, tmp_path):
    images, expected = tiny_eager
    path = tmp_path / "legacy.onnx"
    assert run(f"--ckpt={tiny_run}", "--format=onnx", "--exporter=legacy", f"--output={path}", "--sample-size=32") == 0
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"input": images.numpy()})
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4 * max(1.0, float(np.abs(expected).max())))
    metadata = read_metadata(path)
    check_metadata(metadata, "torch.onnx", arch="tiny")
    assert metadata["exporter"] == "torch.onnx.export (TorchScript-based, dynamo=False), opset 17"


def test_exported_program_loads_with_torch_export_and_matches_eager(tiny_run, tiny_eager, tmp_path, capsys):
    """``--format exported_program``: a .pt2 that ``torch.export.load`` reads with its metadata, dynamic in batch,
    height and width from MIN_SIDE up (below it the program refuses the input), with no TorchScript warning."""
    images, expected = tiny_eager
    path = tmp_path / "model.pt2"
    export_without_torchscript(capsys, f"--ckpt={tiny_run}", "--format=exported_program", f"--output={path}",
                               "--sample-size=32")
    files = {METADATA_FILE: ""}
    program = torch.export.load(str(path), extra_files=files)
    assert isinstance(program, torch.export.ExportedProgram)
    metadata = json.loads(files[METADATA_FILE])
    check_metadata(metadata, "torch.export", arch="tiny")
    assert read_metadata(path) == metadata
    with torch.inference_mode():
        got = program.module()(images).numpy()
    assert got.shape == (3, 4, 48, 80)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4 * max(1.0, float(np.abs(expected).max())))

    smallest, eager_smallest = eager_logits(tiny_run / "last.pt", (1, 3, MIN_SIDE, MIN_SIDE + 1))
    with torch.inference_mode():
        np.testing.assert_allclose(program.module()(smallest).numpy(), eager_smallest, rtol=0, atol=1e-4)
        with pytest.raises(Exception, match="height|width|range|constraint|>="):
            program.module()(torch.zeros(1, 3, MIN_SIDE - 1, MIN_SIDE))


class DriftsWhenExported(nn.Module):
    """A mutant: eager adds 1 to the logits, while every exported graph (scripted, traced, or traced with symbolic
    sizes by torch.export) does not."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.module(x)
        if torch.jit.is_scripting() or torch.jit.is_tracing():
            return out
        if not isinstance(x.shape[-1], int):
            return out
        return out + 1.0


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torchscript and --exporter legacy are deprecated by torch
@pytest.mark.parametrize("fmt", [["--format=onnx"], ["--format=onnx", "--exporter=legacy"],
                                 ["--format=exported_program"], ["--format=torchscript"]], ids=" ".join)
def test_an_export_that_differs_from_eager_exits_1_and_writes_nothing(tiny_run, tmp_path, monkeypatch, capsys, fmt):
    original = export.logits_only
    monkeypatch.setattr(export, "logits_only", lambda model: DriftsWhenExported(original(model)).eval())
    assert run(f"--ckpt={tiny_run}", *fmt, f"--output={tmp_path / 'm'}", "--sample-size=32") == 1
    err = capsys.readouterr().err
    assert "gives other logits than PyTorch" in err and "(1, 3, 24, 40) input" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch >= 2.10: torch.jit.load is deprecated
def test_torchscript_export_matches_eager_pytorch_on_a_new_size_and_batch(run_dir, eager, tmp_path):
    images, expected = eager
    path = tmp_path / "model.pt"
    assert run(f"--ckpt={run_dir}", "--format=torchscript", f"--output={path}") == 0
    files = {METADATA_FILE: ""}
    loaded = torch.jit.load(str(path), _extra_files=files)
    with torch.inference_mode():
        got = loaded(images).numpy()
    assert got.shape == (3, 4, 48, 80)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
    check_metadata(json.loads(files[METADATA_FILE]), "torch.jit")
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


def legacy_only_onnx_export(model, args=(), f=None, *, input_names=None, output_names=None, opset_version=None,
                            dynamic_axes=None, do_constant_folding=True):
    """The signature of a torch.onnx.export without ``dynamo`` (torch < 2.5)."""
    raise AssertionError("not called: the command refuses first")


@pytest.mark.parametrize("missing, match", [
    ("onnxscript", ["pip install 'train_seg[export]'", "onnxscript", "--exporter legacy"]),
    ("dynamo", ["torch.onnx.export(dynamo=True)", "--exporter legacy", torch.__version__]),
])
def test_the_dynamo_exporter_without_its_parts_names_the_way_out(tiny_run, tmp_path, monkeypatch, capsys, missing,
                                                                  match):
    if missing == "onnxscript":
        monkeypatch.setitem(sys.modules, "onnxscript", None)
    else:
        monkeypatch.setattr(torch.onnx, "export", legacy_only_onnx_export)
    assert run(f"--ckpt={tiny_run}", "--format=onnx", f"--output={tmp_path / 'm.onnx'}") == 2
    err = capsys.readouterr().err
    assert all(needle in err for needle in match) and err.startswith("train_seg.cli.export: error: ")
    assert "Traceback" not in err and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, match", [
    (["--format", "onnx", "--output", "m.onnx"], "required: --ckpt"),
    (["--ckpt", "c", "--output", "m.onnx"], "required: --format"),
    (["--ckpt", "c", "--format", "tflite", "--output", "m"], "--format: 'tflite'"),
    (["--ckpt", "c", "--format", "onnx", "--output", "m.onnx", "--opset", "3"], "--opset: '3'"),
    (["--ckpt", "/no/such/run", "--format", "torchscript", "--output", "m.pt"], "no such checkpoint"),
    (["--ckpt", "c", "--format", "onnx", "--exporter", "jit", "--output", "m.onnx"], "--exporter: 'jit'"),
    (["--ckpt", "c", "--format", "torchscript", "--exporter", "legacy", "--output", "m.pt"],
     "--exporter legacy applies to --format onnx only"),
    (["--ckpt", "c", "--format", "exported_program", "--output", "m.pt2", "--sample-size", "8"],
     f"--sample-size: '8': must be an integer >= {MIN_SIDE}"),
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
