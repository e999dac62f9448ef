"""``python -m train_seg.cli.export --ckpt <file | run dir> --format onnx|exported_program|torchscript --output <file>
[options]`` (``train-seg-export``): a checkpoint's model as one self-describing file for deployment without train_seg.

The exported model is ``LogitsOnly(model)``: input ``input``, float32 ``(N, 3, H, W)`` normalised as the checkpoint's
val pipeline does; output ``logits``, float32 ``(N, K, H, W)`` at the input's size (K = 1 for a binary head); the
auxiliary head is dropped. Batch, height and width are dynamic, height and width from ``MIN_SIDE`` = 17 px (torch.export
takes no dynamic size to be 0 or 1, so the 1/16 feature map must be >= 2 px). Every format records the same metadata
(``export_metadata``; ``read_metadata`` reads it back).

- ``onnx``: ``--exporter dynamo`` (default), torch's torch.export-based exporter (``dynamo=True``, needs onnxscript,
  opset 18); ``--exporter legacy``, the TorchScript-based one (``dynamo=False``, opset 17). Where torch has no
  ``dynamo=`` or onnxscript is missing the command refuses (exit 2, naming ``--exporter legacy``), never falls back.
- ``exported_program``: a ``torch.export`` ExportedProgram (``.pt2``, ``torch.export.save``), metadata in its
  ``extra_files``.
- ``torchscript``: ``torch.jit.script`` (deprecated by torch), metadata as ``train_seg.json`` in ``_extra_files``.

Unless ``--no-verify`` the exported bytes are reloaded and run at another size and batch than the example, and must
match eager PyTorch to ``1e-4 * max(1, max |logit|)``; only then is the file written (atomically). Exit status: 0
written, 1 verification failed (nothing written), 2 bad arguments, checkpoint, missing extra, too old a torch or an
existing output (unless ``--overwrite``), before any export. Details: docs/using-a-model.md, "Export a model".
"""
from __future__ import annotations

import argparse
import inspect
import io
import json
import sys
import warnings
import zipfile
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
FORMATS = ("onnx", "exported_program", "torchscript")
EXPORTERS = ("dynamo", "legacy")  # --format onnx: torch.export-based (dynamo=True) | TorchScript-based
DEFAULT_OPSET = {"dynamo": 18, "legacy": 17}  # 18: the lowest opset torch's dynamo exporter writes without converting
METADATA_FILE = "train_seg.json"  # the extra file of an ExportedProgram or TorchScript export
SAMPLE_BATCH = 2  # torch.export makes a dimension of size 1 in the example static: the sample has 2 images
# torch.export's smallest height and width (and --sample-size): the models' coarsest feature map (1/16, the largest
# model.output_stride) must be >= 2 px, since torch.export assumes a dynamic size is never 0 or 1
MIN_SIDE = 17
INPUT_NAME, OUTPUT_NAME = "input", "logits"
DYNAMIC_AXES = {INPUT_NAME: {0: "batch", 2: "height", 3: "width"}, OUTPUT_NAME: {0: "batch", 2: "height", 3: "width"}}
METADATA_VERSION = 1
TOLERANCE = 1e-4  # of max(1, max |logit|)
EXTRA_HINT = "pip install 'train_seg[export]'"
PT2_MARKER = ("archive_format", b"pt2")  # the entry that tells a .pt2 archive from a TorchScript zip


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


# -- the formats ------------------------------------------------------------------------------------------------
def require_onnx(verify: bool, exporter: str):
    """``(onnx, onnxruntime or None)``; a missing package is a ``ConfigError`` naming the extra to install, and so
    is a torch without the torch.export-based exporter (``exporter="dynamo"``) or onnxscript, which it needs."""
    try:
        import onnx

        ort = None
        if verify:
            import onnxruntime as ort
    except ImportError as exc:
        raise ConfigError(f"--format onnx needs the optional packages onnx and onnxruntime ({exc}): {EXTRA_HINT}"
                          " (or --format exported_program, which needs neither).") from exc
    if exporter == "dynamo":
        if "dynamo" not in inspect.signature(torch.onnx.export).parameters:
            raise ConfigError(f"--exporter dynamo needs torch.onnx.export(dynamo=True), which torch "
                              f"{torch.__version__} lacks: pass --exporter legacy (the TorchScript-based exporter), "
                              "or upgrade torch. Nothing was written.")
        try:
            import onnxscript  # noqa: F401  (the dynamo exporter's ONNX builder)
        except ImportError as exc:
            raise ConfigError(f"--exporter dynamo needs the optional package onnxscript ({exc}): {EXTRA_HINT} (or "
                              "--exporter legacy, which does not).") from exc
    return onnx, ort


def dynamic_shapes() -> tuple:
    """``torch.export`` dynamic shapes of ``LogitsOnly.forward``'s one input: batch >= 1, height and width
    >= ``MIN_SIDE``, no upper bound."""
    from torch.export import Dim

    return ({0: Dim("batch", min=1), 2: Dim("height", min=MIN_SIDE), 3: Dim("width", min=MIN_SIDE)},)


def exported_program(module, sample) -> torch.export.ExportedProgram:
    """``torch.export.export`` (non-strict) of ``module`` at ``sample`` ``(SAMPLE_BATCH, 3, S, S)``, with
    ``dynamic_shapes``; torch raises if the model's code ties a dynamic size to a constant."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch-internal deprecations met while tracing
        return torch.export.export(module, (sample,), dynamic_shapes=dynamic_shapes(), strict=False)


def onnx_graph(module, sample, opset: int, exporter: str):
    """``(ModelProto, what made it)``: torch.onnx.export of ``exported_program`` (``exporter="dynamo"``), its size
    symbols named, or the legacy TorchScript-based exporter with ``DYNAMIC_AXES``."""
    import onnx

    if exporter == "dynamo":
        program = exported_program(module, sample)
        onnx_program = torch.onnx.export(program, dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                         opset_version=opset, verbose=False)
        proto = onnx_program.model_proto
        name_dynamic_axes(proto)
        made_by = "torch.onnx.export (torch.export-based, dynamo=True)"
    else:
        kwargs = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
        buffer = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # "legacy TorchScript-based ONNX export"
            warnings.simplefilter("ignore", FutureWarning)
            torch.onnx.export(module, (sample,), buffer, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes=DYNAMIC_AXES, opset_version=opset, do_constant_folding=True, **kwargs)
        proto = onnx.load_from_string(buffer.getvalue())
        made_by = "torch.onnx.export (TorchScript-based, dynamo=False)"
    opset_written = next(entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx"))
    return proto, f"{made_by}, opset {opset_written}"


def onnx_file(proto, metadata: dict) -> bytes:
    """The ONNX file: ``proto`` with its logit channels fixed, ``metadata_props`` and a doc string, checked."""
    import onnx

    channels = proto.graph.output[0].type.tensor_type.shape.dim[1]
    channels.Clear()  # the legacy exporter leaves it symbolic ("Resize..._dim_1"): it is the number of logit channels
    channels.dim_value = int(metadata["output"]["shape"][1])
    onnx.helper.set_model_props(proto, {key: json.dumps(value) for key, value in metadata.items()})
    proto.doc_string = f"train_seg export of {metadata['arch']}: classes {', '.join(metadata['class_names'])}"
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def name_dynamic_axes(proto) -> None:
    """Renames the dynamo exporter's size symbols (``s0``, ``s41``, ...) of the input's batch, height and width
    to ``DYNAMIC_AXES``'s names wherever a graph input, output or value info has exactly that symbol."""
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    names = {dims[axis].dim_param: name for axis, name in DYNAMIC_AXES[INPUT_NAME].items() if dims[axis].dim_param}
    for value in (*proto.graph.input, *proto.graph.output, *proto.graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in names:
                dim.dim_param = names[dim.dim_param]


def exported_program_bytes(module, sample, metadata: dict) -> bytes:
    """The ``.pt2`` file: ``torch.export.save`` of ``exported_program``, metadata in ``extra_files``."""
    buffer = io.BytesIO()
    torch.export.save(exported_program(module, sample), buffer,
                      extra_files={METADATA_FILE: json.dumps(metadata, indent=1)})
    return buffer.getvalue()


def torchscript_bytes(module, metadata: dict) -> bytes:
    """The TorchScript file (deprecated by torch): ``torch.jit.script`` of the wrapper, metadata in
    ``_extra_files``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch >= 2.10: "torch.jit.script is deprecated"
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(module)
        buffer = io.BytesIO()
        torch.jit.save(scripted, buffer, _extra_files={METADATA_FILE: json.dumps(metadata, indent=1)})
    return buffer.getvalue()


def run_exported(data: bytes, fmt: str, images):
    """Logits of the exported bytes on ``images`` (a float32 tensor), as a numpy array."""
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        return session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})[0]
    if fmt == "exported_program":
        loaded = torch.export.load(io.BytesIO(data)).module()
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            loaded = torch.jit.load(io.BytesIO(data), map_location="cpu")
    with torch.inference_mode():
        return loaded(images).numpy()


def file_format(path: Path) -> str:
    """``onnx``, ``exported_program`` or ``torchscript``, from the file's content (a .pt2 archive and a TorchScript
    file are both zip files; ONNX files are protobuf)."""
    with open(path, "rb") as handle:
        if handle.read(2) != b"PK":  # a zip file's first bytes
            return "onnx"
    entry, value = PT2_MARKER
    with zipfile.ZipFile(path) as archive:
        markers = [name for name in archive.namelist() if name.rsplit("/", 1)[-1] == entry]
        return "exported_program" if any(archive.read(name) == value for name in markers) else "torchscript"


def read_metadata(path: str | Path) -> dict:
    """The metadata an exported file records (ONNX: ``metadata_props``; ExportedProgram and TorchScript: their
    train_seg.json extra file). Loads the whole file: read only files you trust (both loaders unpickle)."""
    path = Path(path)
    fmt = file_format(path)
    if fmt == "onnx":
        import onnx

        proto = onnx.load(str(path), load_external_data=False)
        return {prop.key: json.loads(prop.value) for prop in proto.metadata_props}
    files = {METADATA_FILE: ""}
    if fmt == "exported_program":
        torch.export.load(str(path), extra_files=files)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            torch.jit.load(str(path), map_location="cpu", _extra_files=files)
    return json.loads(files[METADATA_FILE])


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
    exporter: str | None = None  # --format onnx: dynamo | legacy; None for the other formats


def parser() -> args.Parser:
    """The command line of ``python -m train_seg.cli.export``."""
    p = args.make_parser(PROG, "A checkpoint's model as one self-describing ONNX, torch.export (.pt2) or "
                               "TorchScript file, verified against eager PyTorch before it is written.",
                         "Exit status: 0 written, 1 verification failed (nothing written), 2 bad input (nothing "
                         "written).")
    args.add_checkpoint(p)
    p.add_argument("--format", type=args.choice(*FORMATS), required=True,
                   help="onnx | exported_program (torch.export, .pt2) | torchscript (torch.jit.script, deprecated "
                        "by torch)")
    p.add_argument("--output", type=args.text, required=True, metavar="FILE",
                   help="the file to write (e.g. model.onnx, model.pt2, model.pt)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--exporter", type=args.choice(*EXPORTERS), default=None,
                   help="onnx: dynamo (torch.export-based, needs onnxscript) | legacy (TorchScript-based, for older "
                        "torch) (default: dynamo)")
    p.add_argument("--opset", type=args.integer(11), default=None,
                   help=f"onnx: ONNX opset version (default: {DEFAULT_OPSET['dynamo']} with --exporter dynamo, "
                        f"{DEFAULT_OPSET['legacy']} with legacy)")
    p.add_argument("--sample-size", type=args.integer(MIN_SIDE), default=256, metavar="PX",
                   help="side of the example input the exporters trace; sizes stay dynamic (torch.export: height "
                        f"and width >= {MIN_SIDE}) (default: 256)")
    p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                   help="run the exported file against eager PyTorch before writing it (default: on)")
    return p


def read_options(argv: Sequence[str] | None) -> Options:
    v = parser().parse_args(argv)
    output = Path(v.output).expanduser()
    if v.exporter is not None and v.format != "onnx":
        raise ConfigError(f"--exporter {v.exporter} applies to --format onnx only (exported_program is torch.export "
                          "itself, torchscript is torch.jit.script); drop --exporter. Nothing was written.")
    if output.is_dir():
        raise ConfigError(f"--output {output} is a folder; give a file name (e.g. {output / 'model.onnx'}).")
    if (output.exists() or output.is_symlink()) and not v.overwrite:
        raise ConfigError(f"--output {output} already exists; pass --overwrite to replace it, or choose another "
                          "file name. Nothing was written.")
    exporter = (v.exporter or "dynamo") if v.format == "onnx" else None
    opset = v.opset if v.opset is not None else DEFAULT_OPSET[exporter or "legacy"]
    return Options(ckpt=v.ckpt, calibration=v.calibration, format=v.format, output=output, overwrite=v.overwrite,
                   opset=opset, sample_size=v.sample_size, verify=v.verify, exporter=exporter)


def verification_input(sample_size: int) -> torch.Tensor:
    """The images verification runs: 1 image (the sample has ``SAMPLE_BATCH``) of about 0.75 x 1.25 its side."""
    size = (max(MIN_SIDE, round(0.75 * sample_size)), max(MIN_SIDE, round(1.25 * sample_size)))
    return torch.randn((1, 3, *size), generator=torch.Generator().manual_seed(0))


def verify_export(data: bytes, fmt: str, module, sample_size: int) -> float:
    """The largest |exported - eager| logit difference on a new size and batch; raises if above tolerance."""
    images = verification_input(sample_size)
    with torch.inference_mode():
        expected = module(images).numpy()
    got = run_exported(data, fmt, images)
    scale = max(1.0, float(abs(expected).max()))
    error = float(abs(got - expected).max()) if got.shape == expected.shape else float("inf")
    if not error <= TOLERANCE * scale:
        raise ExportVerificationError(
            f"the {fmt} export gives other logits than PyTorch on a {tuple(images.shape)} input: output shape "
            f"{got.shape} vs {expected.shape}, largest difference {error:.3g} (tolerance {TOLERANCE * scale:.3g}). "
            "Nothing was written; try another --format, or for onnx --exporter legacy or another --opset.")
    return error


def export_bytes(module, meta, options: Options) -> tuple[bytes, dict]:
    """``(the file's bytes, its metadata)`` in ``options.format``."""
    sample = torch.randn((SAMPLE_BATCH, 3, options.sample_size, options.sample_size))
    if options.format == "onnx":
        proto, made_by = onnx_graph(module, sample, options.opset, options.exporter)
        metadata = export_metadata(meta, made_by)
        return onnx_file(proto, metadata), metadata
    if options.format == "exported_program":
        metadata = export_metadata(meta, "torch.export.export (non-strict), saved by torch.export.save")
        return exported_program_bytes(module, sample, metadata), metadata
    metadata = export_metadata(meta, "torch.jit.script")
    return torchscript_bytes(module, metadata), metadata


def export_checkpoint(options: Options) -> tuple[dict, float | None]:
    """Exports, verifies and writes; returns ``(metadata, largest verification difference or None)``."""
    from train_seg.checkpoint import load_checkpoint_model

    if options.format == "onnx":
        require_onnx(options.verify, options.exporter)
    model, meta = load_checkpoint_model(options.ckpt, "cpu", calibration=options.calibration)
    module = logits_only(model)
    data, metadata = export_bytes(module, meta, options)
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
    print(f"{PROG}: wrote {options.output} ({options.format} by {metadata['exporter']}; classes "
          f"{', '.join(metadata['class_names'])}; input {INPUT_NAME} (N, 3, H, W) normalised, output {OUTPUT_NAME} "
          f"(N, {metadata['output']['shape'][1]}, H, W); {checked})")
    sys.exit(0)


if __name__ == "__main__":
    main()
