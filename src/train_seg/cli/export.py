"""``python -m train_seg.cli.export --ckpt <file | run dir> --format onnx|torchscript --output <file> [options]``
(``train-seg-export``): a checkpoint's model as one self-describing file for deployment without train_seg.

The exported model is ``LogitsOnly(model)``: input ``input``, float32 ``(N, 3, H, W)`` normalised as the
checkpoint's val pipeline does; output ``logits``, float32 ``(N, K, H, W)`` at the input's size (K = 1 for a binary
head). Batch, height and width are dynamic; the auxiliary head is dropped. ``--format onnx``: the TorchScript-based
exporter (``dynamo=False``), traced at ``--sample-size``, opset ``--opset``, metadata as JSON strings in
``metadata_props`` (needs ``pip install 'train_seg[export]'``). ``--format torchscript``: ``torch.jit.script``,
metadata as ``train_seg.json`` in ``_extra_files``.

Unless ``--no-verify`` the exported bytes are reloaded and run at another size and batch than the trace, and must
match eager PyTorch to ``1e-4 * max(1, max |logit|)``; only then is the file written (atomically). Exit status: 0
written, 1 verification failed (nothing written), 2 bad arguments, checkpoint, missing extra or existing output
(unless ``--overwrite``), before any export. Details: README.md, "Export a model".
"""
from __future__ import annotations

import argparse
import inspect
import io
import json
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, Sequence

import torch
from torch import nn

from train_seg.config.command_line import USER_ERRORS, exit_with_user_error
from train_seg.config.validation import ConfigError
from train_seg.cli import args
from train_seg.cli.predict import write_file

PROG = "train_seg.cli.export"
FORMATS = ("onnx", "torchscript")
TORCHSCRIPT_METADATA = "train_seg.json"  # the _extra_files entry of a TorchScript export
INPUT_NAME, OUTPUT_NAME = "input", "logits"
DYNAMIC_AXES = {INPUT_NAME: {0: "batch", 2: "height", 3: "width"}, OUTPUT_NAME: {0: "batch", 2: "height", 3: "width"}}
METADATA_VERSION = 1
TOLERANCE = 1e-4  # of max(1, max |logit|)
EXTRA_HINT = "pip install 'train_seg[export]'"

class ExportVerificationError(RuntimeError):
    """The exported model does not give eager PyTorch's logits."""


class LogitsOnly(nn.Module):
    """``model(x)["out"]``: normalised images ``(N, 3, H, W)`` -> logits ``(N, K, H, W)``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)["out"]


def logits_only(model):
    """The exported module: the model without its auxiliary head, returning ``model(x)["out"]`` (its calibration
    offsets included, ``checkpoint.Calibrated``), in eval mode."""
    from train_seg.checkpoint import Calibrated

    inner = model.model if isinstance(model, Calibrated) else model
    if getattr(inner, "aux_classifier", None) is not None:
        del inner.aux_classifier  # a plain None attribute, as in a model built without it (TorchScript: a constant)
        inner.aux_classifier = None
    return LogitsOnly(model).eval()


def export_metadata(meta, exporter: str) -> dict:
    """What the file records about its model: classes, colours, normalisation, input and output conventions."""
    binary = meta.binary_head
    channels = 1 if binary else meta.num_classes
    decode = ("one sigmoid channel: class 1 where the logit is > 0" if binary else "argmax over dim 1; softmax over "
              "dim 1 for probabilities")
    return {
        "train_seg_export": METADATA_VERSION,
        "class_names": list(meta.class_names),
        "palette": [list(c) for c in meta.palette],
        "normalization": {"mean": list(meta.mean), "std": list(meta.std), "max_pixel_value": meta.max_pixel_value,
                          "formula": "(x - mean * max_pixel_value) / (std * max_pixel_value), x: RGB, 0..255 scale"},
        "input": {"name": INPUT_NAME, "shape": ["batch", 3, "height", "width"], "dtype": "float32",
                  "layout": "NCHW, RGB, normalised"},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", channels, "height", "width"], "dtype": "float32",
                   "decode": decode},
        "binary_head": binary,
        "ignore_index": meta.ignore_index,
        "arch": meta.arch,
        "checkpoint": {"path": str(meta.path), "epoch": meta.epoch, "step": meta.step},
        "calibration": None if meta.calibration is None else {
            "offsets": list(meta.calibration.offsets), "method": meta.calibration.method,
            "split": meta.calibration.split, "metric": meta.calibration.metric,
            "note": "already added to the output logits by the graph"},
        "exporter": exporter,
        "torch_version": torch.__version__,
    }


# -- the two formats --------------------------------------------------------------------------------------------
def require_onnx(verify: bool):
    """``(onnx, onnxruntime or None)``; a missing package is a ``ConfigError`` naming the extra to install."""
    try:
        import onnx

        ort = None
        if verify:
            import onnxruntime as ort
    except ImportError as exc:
        raise ConfigError(f"--format onnx needs the optional packages onnx and onnxruntime ({exc}): {EXTRA_HINT}"
                          " (or --format torchscript, which needs neither).") from exc
    return onnx, ort


def onnx_bytes(module, sample, opset: int, metadata: dict) -> bytes:
    """The ONNX file: the legacy (TorchScript-based) exporter with dynamic axes, then ``metadata_props``."""
    import onnx

    kwargs = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "legacy TorchScript-based ONNX export"
        warnings.simplefilter("ignore", FutureWarning)
        torch.onnx.export(module, (sample,), buffer, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes=DYNAMIC_AXES, opset_version=opset, do_constant_folding=True, **kwargs)
    proto = onnx.load_from_string(buffer.getvalue())
    channels = proto.graph.output[0].type.tensor_type.shape.dim[1]
    channels.Clear()  # the exporter leaves it symbolic ("Resize..._dim_1"): it is the number of logit channels
    channels.dim_value = int(metadata["output"]["shape"][1])
    onnx.helper.set_model_props(proto, {key: json.dumps(value) for key, value in metadata.items()})
    proto.doc_string = f"train_seg export of {metadata['arch']}: classes {', '.join(metadata['class_names'])}"
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def torchscript_bytes(module, metadata: dict) -> bytes:
    """The TorchScript file: ``torch.jit.script`` of the wrapper, metadata in ``_extra_files``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch >= 2.10: "torch.jit.script is deprecated"
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(module)
        buffer = io.BytesIO()
        torch.jit.save(scripted, buffer, _extra_files={TORCHSCRIPT_METADATA: json.dumps(metadata, indent=1)})
    return buffer.getvalue()


def run_exported(data: bytes, fmt: str, images):
    """Logits of the exported bytes on ``images`` (a float32 tensor), as a numpy array."""
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        return session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        loaded = torch.jit.load(io.BytesIO(data), map_location="cpu")
    with torch.inference_mode():
        return loaded(images).numpy()


def read_metadata(path: str | Path) -> dict:
    """The metadata an exported file records (``.onnx``: ``metadata_props``; else TorchScript's train_seg.json)."""
    path = Path(path)
    with open(path, "rb") as handle:
        head = handle.read(2)
    if head != b"PK":  # TorchScript files are zip archives; ONNX files are protobuf
        import onnx

        proto = onnx.load(str(path), load_external_data=False)
        return {prop.key: json.loads(prop.value) for prop in proto.metadata_props}
    files = {TORCHSCRIPT_METADATA: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.load(str(path), map_location="cpu", _extra_files=files)
    return json.loads(files[TORCHSCRIPT_METADATA])


# -- the command ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Options:
    ckpt: str
    calibration: str
    format: str
    output: Path
    overwrite: bool
    opset: int
    sample_size: int
    verify: bool


def parser() -> args.Parser:
    """The command line of ``python -m train_seg.cli.export``."""
    p = args.make_parser(PROG, "A checkpoint's model as one self-describing ONNX or TorchScript file, verified "
                               "against eager PyTorch before it is written.",
                         "Exit status: 0 written, 1 verification failed (nothing written), 2 bad input (nothing "
                         "written).")
    args.add_checkpoint(p)
    p.add_argument("--format", type=args.choice(*FORMATS), required=True, help="onnx | torchscript")
    p.add_argument("--output", type=args.text, required=True, metavar="FILE",
                   help="the file to write (e.g. model.onnx, model.pt)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--opset", type=args.integer(11), default=17, help="onnx: ONNX opset version (default: 17)")
    p.add_argument("--sample-size", type=args.integer(16), default=256, metavar="PX",
                   help="side of the example input the ONNX exporter traces; sizes stay dynamic (default: 256)")
    p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                   help="run the exported file against eager PyTorch before writing it (default: on)")
    return p


def read_options(argv: Sequence[str] | None) -> Options:
    v = parser().parse_args(argv)
    output = Path(v.output).expanduser()
    if output.is_dir():
        raise ConfigError(f"--output {output} is a folder; give a file name (e.g. {output / 'model.onnx'}).")
    if (output.exists() or output.is_symlink()) and not v.overwrite:
        raise ConfigError(f"--output {output} already exists; pass --overwrite to replace it, or choose another "
                          "file name. Nothing was written.")
    return Options(ckpt=v.ckpt, calibration=v.calibration, format=v.format, output=output, overwrite=v.overwrite, opset=v.opset,
                   sample_size=v.sample_size, verify=v.verify)


def verify_export(data: bytes, fmt: str, module, sample_size: int) -> float:
    """The largest |exported - eager| logit difference on a new size and batch; raises if above tolerance."""
    size = (max(8, round(0.75 * sample_size)), max(8, round(1.25 * sample_size)))
    images = torch.randn((2, 3, *size), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = module(images).numpy()
    got = run_exported(data, fmt, images)
    scale = max(1.0, float(abs(expected).max()))
    error = float(abs(got - expected).max()) if got.shape == expected.shape else float("inf")
    if not error <= TOLERANCE * scale:
        raise ExportVerificationError(
            f"the {fmt} export gives other logits than PyTorch on a (2, 3, {size[0]}, {size[1]}) input: output shape "
            f"{got.shape} vs {expected.shape}, largest difference {error:.3g} (tolerance {TOLERANCE * scale:.3g}). "
            "Nothing was written; try another --opset, or --format torchscript.")
    return error


def export_checkpoint(options: Options) -> tuple[dict, float | None]:
    """Exports, verifies and writes; returns ``(metadata, largest verification difference or None)``."""
    from train_seg.checkpoint import load_checkpoint_model

    if options.format == "onnx":
        require_onnx(options.verify)
    model, meta = load_checkpoint_model(options.ckpt, "cpu", calibration=options.calibration)
    module = logits_only(model)
    if options.format == "onnx":
        exporter = f"torch.onnx.export (TorchScript-based, dynamo=False), opset {options.opset}"
        sample = torch.randn((1, 3, options.sample_size, options.sample_size))
        metadata = export_metadata(meta, exporter)
        data = onnx_bytes(module, sample, options.opset, metadata)
    else:
        metadata = export_metadata(meta, "torch.jit.script")
        data = torchscript_bytes(module, metadata)
    error = verify_export(data, options.format, module, options.sample_size) if options.verify else None
    write_file(options.output, lambda handle: handle.write(data))
    return metadata, error


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """``python -m train_seg.cli.export`` / ``train-seg-export``; exit status 0, 1 (verification failed) or 2."""
    try:
        options = read_options(argv)
        metadata, error = export_checkpoint(options)
    except ExportVerificationError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        sys.exit(1)
    except USER_ERRORS as exc:
        exit_with_user_error(PROG, exc)
    checked = "not verified" if error is None else f"verified against PyTorch: largest difference {error:.2g}"
    print(f"{PROG}: wrote {options.output} ({options.format}; classes {', '.join(metadata['class_names'])}; "
          f"input {INPUT_NAME} (N, 3, H, W) normalised, output {OUTPUT_NAME} (N, "
          f"{metadata['output']['shape'][1]}, H, W); {checked})")
    sys.exit(0)


if __name__ == "__main__":
    main()
