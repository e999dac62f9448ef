"""``python -m train_seg.cli.predict --ckpt <file | run dir> --input <image | folder | glob> --output <dir>
[options]`` (``train-seg-predict``): label masks, colour overlays and optionally class probabilities of images,
with a trained checkpoint, through ``train_seg.evaluation.inference.predict``.

Options (``train_seg.cli.args``: evaluate's key names, ``--help`` lists them) take any file name as it is;
``--input`` may repeat; nothing but the requested files is written. Per input image, in ``--output``:
``<stem>_mask.png`` (class indices, palette PNG; 16-bit grey above 256 classes), ``<stem>_overlay.png``
(``(1 - alpha) * image + alpha * colour``) and, with ``--save-probs``, ``<stem>_probs.npy`` (float16 ``(K, H, W)``
softmax), all at the input's size. Output names, accepted inputs and image modes: docs/using-a-model.md, "Predict images".

Exit status: 0 every input predicted; 1 some could not be (each reported by name, the others still written, the
failures listed at the end); 2 bad arguments, missing inputs, existing outputs (unless ``--overwrite``) or
checkpoint errors, before any inference and before any file is written.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NoReturn, Sequence

import numpy as np

from train_seg.cli import args
from train_seg.config.command_line import USER_ERRORS, exit_with_user_error
from train_seg.config.validation import ConfigError

PROG = "train_seg.cli.predict"
MASK_SUFFIX, OVERLAY_SUFFIX, PROBS_SUFFIX = "_mask.png", "_overlay.png", "_probs.npy"
MAX_LISTED = 10  # files named in one error message before "... and N more"
GLOB_CHARS = "*?["
ARGUMENT_NAMES = {"window": "--inference-window", "stride": "--inference-stride", "overlap": "--inference-overlap"}


def parser() -> args.Parser:
    """The command line of ``python -m train_seg.cli.predict``."""
    p = args.make_parser(PROG, "Label masks, colour overlays and optionally class probabilities of images, with a "
                               "trained checkpoint.",
                         "Exit status: 0 every input predicted, 1 some inputs failed (the others written), 2 bad "
                         "input (nothing written).")
    args.add_checkpoint(p)
    p.add_argument("--input", type=args.text, action="append", required=True, metavar="PATH",
                   help="an image, a folder of images or a quoted glob ('data/*.png'); may repeat")
    p.add_argument("--output", type=args.text, required=True, metavar="DIR",
                   help="folder for <stem>_mask.png, <stem>_overlay.png, <stem>_probs.npy (created)")
    p.add_argument("--overwrite", action="store_true", help="replace output files that already exist (else: refused "
                                                            "before any work)")
    p.add_argument("--save-probs", action="store_true", help="also write <stem>_probs.npy: float16 class "
                                                             "probabilities (K, H, W)")
    p.add_argument("--alpha", type=args.number(0.0, 1.0), default=0.5,
                   help="overlay opacity of the class colours over the image, in [0, 1] (default: 0.5)")
    p.add_argument("--recursive", action="store_true", help="a folder input: also the images of its subfolders")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="tqdm progress bar on stderr (default: on)")
    args.add_inference(p)
    args.add_device(p)
    return p


@dataclass(frozen=True)
class Options:
    """The checked command line."""

    ckpt: str
    calibration: str
    inputs: tuple[str, ...]
    output: Path
    overwrite: bool
    save_probs: bool
    alpha: float
    recursive: bool
    infer: object  # train_seg.evaluation.inference.InferenceSettings
    accumulate: str
    batch_size: int | None
    device: str
    precision: str | None
    channels_last: bool | None
    progress: bool


def read_options(argv: Sequence[str] | None) -> Options:
    """The command line, checked (a bad one exits 2; ``ConfigError`` naming the option and the fix)."""
    from train_seg.evaluation.inference import InferenceSettings

    v = parser().parse_args(argv)
    infer = InferenceSettings.from_mapping(vars(v), names=ARGUMENT_NAMES)
    return Options(
        ckpt=v.ckpt, calibration=v.calibration, inputs=tuple(v.input), output=Path(v.output).expanduser(), overwrite=v.overwrite,
        save_probs=v.save_probs, alpha=v.alpha, recursive=v.recursive, infer=infer, accumulate=v.accumulate,
        batch_size=v.batch_size, device=v.device, precision=v.precision, channels_last=v.channels_last,
        progress=v.progress,
    )


# -- inputs and output names ------------------------------------------------------------------------------------
def earlier_output(path: Path, output: Path) -> bool:
    """A file inside ``output`` named as this command names its outputs (an earlier run's): not an input."""
    if not path.name.endswith((MASK_SUFFIX, OVERLAY_SUFFIX, PROBS_SUFFIX)):
        return False
    try:
        path.resolve().relative_to(output.resolve())
        return True
    except ValueError:
        return False


def _folder_files(folder: Path, recursive: bool) -> list[Path]:
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in candidates
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def expand_input(spec: str, recursive: bool, output: Path) -> list[Path]:
    """The files of one ``--input``: a file, a folder's files, or a glob's matches (``ConfigError`` if none)."""
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = [p for p in _folder_files(path, recursive) if not earlier_output(p, output)]
        if not files:
            hint = "" if recursive else " (--recursive also reads its subfolders)"
            raise ConfigError(f"--input {spec}: the folder {path} holds no files (but earlier outputs){hint}.")
        return files
    if any(char in spec for char in GLOB_CHARS):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True) if Path(p).is_file())
        files = [p for p in files if not earlier_output(p, output)]
        if not files:
            raise ConfigError(f"--input {spec}: the pattern matches no file (quote it so that the shell passes it "
                              "as it is; '**' matches subfolders).")
        return files
    raise ConfigError(f"--input {spec}: no such file or folder (looked at {path.absolute()}).")


def collect_inputs(specs: Sequence[str], recursive: bool, output: Path) -> list[Path]:
    """Every input file once, in the order given (a folder's or a glob's files sorted)."""
    seen, files = set(), []
    for spec in specs:
        for path in expand_input(spec, recursive, output):
            key = path.resolve()
            if key not in seen:
                seen.add(key)
                files.append(path)
    return files


def output_stems(sources: Sequence[Path]) -> list[Path]:
    """Each input's output name without suffix, relative to ``output``: its folder below the deepest folder common
    to all inputs, then its stem, or its whole name (dots as ``_``) when another input of that folder has the same
    stem."""
    parents = [os.path.normpath(p.absolute().parent) for p in sources]
    root = os.path.commonpath(parents)
    stems = [Path(os.path.relpath(parent, root)) / p.stem for parent, p in zip(parents, sources)]
    counts = Counter(stems)
    return [Path(os.path.normpath(s.parent / p.name.replace(".", "_"))) if counts[s] > 1 else Path(os.path.normpath(s))
            for s, p in zip(stems, sources)]


@dataclass(frozen=True)
class Job:
    """One input and the files it gives."""

    source: Path
    mask: Path
    overlay: Path
    probs: Path | None

    @property
    def outputs(self) -> list[Path]:
        return [p for p in (self.mask, self.overlay, self.probs) if p is not None]


def _listed(paths: Sequence[Path]) -> str:
    names = ", ".join(str(p) for p in paths[:MAX_LISTED])
    return names + (f" ... and {len(paths) - MAX_LISTED} more" if len(paths) > MAX_LISTED else "")


def plan_jobs(options: Options) -> list[Job]:
    """The inputs and their output files; refuses (``ConfigError``) colliding names, an output that is an input,
    and outputs that already exist unless ``overwrite`` — before anything is read or written."""
    output = options.output
    if output.exists() and not output.is_dir():
        raise ConfigError(f"--output {output} is a file; give a folder (it is created if missing).")
    sources = collect_inputs(options.inputs, options.recursive, output)
    jobs = [Job(source, output / f"{stem}{MASK_SUFFIX}", output / f"{stem}{OVERLAY_SUFFIX}",
                output / f"{stem}{PROBS_SUFFIX}" if options.save_probs else None)
            for source, stem in zip(sources, output_stems(sources))]
    counts = Counter(p for job in jobs for p in job.outputs)
    clashes = [job.source for job in jobs if any(counts[p] > 1 for p in job.outputs)]
    if clashes:
        raise ConfigError(f"these inputs would write the same output files: {_listed(clashes)}; rename them or "
                          "predict them into different output folders.")
    inputs = {s.resolve() for s in sources}
    clobbered = [p for job in jobs for p in job.outputs if p.resolve() in inputs]
    if clobbered:
        raise ConfigError(f"outputs would replace input images: {_listed(clobbered)}; choose another --output.")
    taken = [p for job in jobs for p in job.outputs if p.exists() or p.is_symlink()]
    if taken and not options.overwrite:
        raise ConfigError(f"--output {output}: {len(taken)} of the files this run would write already exist: "
                          f"{_listed(taken)}. Nothing was written; pass --overwrite to replace them, or choose "
                          "another output folder.")
    return jobs


# -- reading images ---------------------------------------------------------------------------------------------
class ImageReadError(ValueError):
    """A file that is not an image, or one that cannot be decoded or converted."""


def image_array(img) -> np.ndarray:
    """A PIL image -> what ``train_seg.evaluation.inference.as_rgb`` takes (conversions: module docstring)."""
    mode = img.mode
    if mode in ("1", "L", "LA", "RGB", "RGBA", "I;16", "F"):
        return np.array(img)
    if mode in ("I;16B", "I;16L", "I;16N"):
        return np.array(img).astype(np.uint16)
    if mode == "I":
        array = np.array(img)
        if array.size and (array.min() < 0 or array.max() > 65535):
            raise ImageReadError(f"a 32-bit integer image with values {array.min()}..{array.max()}, outside the "
                                 "16-bit range 0..65535 that can be mapped to the model's input; convert it first")
        return array.astype(np.uint16)
    if mode in ("P", "PA"):
        transparent = mode == "PA" or "transparency" in img.info
        return np.array(img.convert("RGBA" if transparent else "RGB"))
    try:  # CMYK, YCbCr, LAB, HSV, RGBX, RGBa, La...
        return np.array(img.convert("RGB"))
    except ValueError as exc:
        raise ImageReadError(f"an image of mode {mode}, which cannot be converted to RGB ({exc})") from exc


def read_image(path: Path) -> np.ndarray:
    """The pixels of an image file (first frame, no EXIF rotation); ``ImageReadError`` with the reason."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return image_array(img)
    except UnidentifiedImageError as exc:
        raise ImageReadError("not an image (Pillow recognises no image format in it)") from exc
    except ImageReadError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        raise ImageReadError(f"cannot be decoded, truncated or corrupt ({type(exc).__name__}: {exc})") from exc


# -- outputs ----------------------------------------------------------------------------------------------------
def write_file(path: Path, write: Callable) -> Path:
    """``train_seg.atomic.atomic_write`` (binary; the file gets the mode a plain ``open`` would give)."""
    from train_seg.atomic import atomic_write

    return atomic_write(path, write, binary=True)


def write_outputs(job: Job, image: np.ndarray, mask: np.ndarray, probabilities: np.ndarray | None,
                  colours: np.ndarray, alpha: float) -> None:
    """The job's files, each written atomically (temp file + rename)."""
    from PIL import Image

    from train_seg.reporting.overlays import blend, palette_png

    write_file(job.mask, lambda f: palette_png(mask, colours).save(f, format="PNG"))
    picture = Image.fromarray(blend(image, mask, colours, alpha))
    write_file(job.overlay, lambda f: picture.save(f, format="PNG"))
    if job.probs is not None:
        write_file(job.probs, lambda f: np.save(f, probabilities.astype(np.float16)))


# -- running it ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Loaded:
    """A checkpoint's model on its device, with the run settings ``train_seg.evaluation.inference.predict`` takes."""

    model: object
    meta: object
    device: object
    amp_dtype: object
    channels_last: bool
    batch_size: int
    accumulate: object
    infer: object

    def predict(self, image: np.ndarray, with_probabilities: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """``inference.predict`` of one image with these settings."""
        from train_seg.evaluation.inference import predict

        return predict(self.model, image, self.meta, settings=self.infer, batch_size=self.batch_size,
                       device=self.device, amp_dtype=self.amp_dtype, channels_last=self.channels_last,
                       accumulate_device=self.accumulate, probabilities=with_probabilities)


def load_model(options: Options) -> Loaded:
    """The checkpoint's model on the device, with the run settings (``CheckpointError`` / ``ConfigError``)."""
    import torch

    from train_seg.config.validation import resolve_device
    from train_seg.cli.evaluate import run_settings
    from train_seg.checkpoint import load_checkpoint_model

    device = resolve_device(options.device, key="--device")
    model, meta = load_checkpoint_model(options.ckpt, device, calibration=options.calibration)
    amp_dtype, channels_last, batch_size = run_settings(options, meta, device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    accumulate = torch.device("cpu") if options.accumulate == "cpu" else device
    return Loaded(model, meta, device, amp_dtype, channels_last, batch_size, accumulate, options.infer)


def predict_one(job: Job, loaded: Loaded, colours: np.ndarray, alpha: float) -> str | None:
    """Reads, predicts and writes one input; returns None, or why it failed."""
    try:
        image = read_image(job.source)
    except ImageReadError as exc:
        return str(exc)
    try:
        mask, probabilities = loaded.predict(image, job.probs is not None)
    except (ValueError, RuntimeError, MemoryError) as exc:  # an unsupported array, out of memory...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "no message"
        return f"inference failed ({type(exc).__name__}: {first})"
    try:
        write_outputs(job, image, mask, probabilities, colours, alpha)
    except OSError as exc:
        return f"its outputs cannot be written ({type(exc).__name__}: {exc})"
    return None


def run_jobs(jobs: Sequence[Job], loaded: Loaded, options: Options) -> list[tuple[Path, str]]:
    """Every job, with a progress bar; failures are reported on stderr as they happen and returned."""
    from tqdm import tqdm  # not tqdm.auto (as evaluate.py)

    from train_seg.reporting.overlays import class_palette

    meta = loaded.meta
    colours = class_palette(meta.palette, meta.num_classes)
    options.output.mkdir(parents=True, exist_ok=True)
    failures = []
    bar = tqdm(jobs, desc="predict", unit="image", disable=not options.progress, dynamic_ncols=True)
    for job in bar:
        reason = predict_one(job, loaded, colours, options.alpha)
        if reason is not None:
            failures.append((job.source, reason))
            tqdm.write(f"{PROG}: {job.source}: {reason}", file=sys.stderr)
    bar.close()
    return failures


def describe(loaded: Loaded, count: int, options: Options) -> str:
    from train_seg.reporting.sinks.console import precision_name

    meta, infer = loaded.meta, options.infer
    tta = f", tta flip={infer.flip} scales={list(infer.scales)}" if infer.tta else ""
    mode = "whole" if infer.mode == "whole" else f"slide (window {infer.window}, blend {infer.blend})"
    return (f"{PROG}: {meta.path} ({meta.arch}, epoch {meta.epoch}, classes {', '.join(meta.class_names)}); "
            f"{count} input{'s' if count != 1 else ''}; {mode} inference{tta}; {loaded.device}, "
            f"{precision_name(loaded.amp_dtype)}")


def finish(failures: Sequence[tuple[Path, str]], total: int, output: Path) -> NoReturn:
    done = total - len(failures)
    print(f"{PROG}: wrote the outputs of {done} of {total} input{'s' if total != 1 else ''} to {output}")
    if failures:
        lines = "\n".join(f"  {path}: {reason}" for path, reason in failures)
        print(f"{PROG}: error: {len(failures)} of {total} inputs failed (nothing written for them):\n{lines}",
              file=sys.stderr)
        sys.exit(1)
    sys.exit(0)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """``python -m train_seg.cli.predict`` / ``train-seg-predict``; exit status 0, 1 (some inputs failed) or 2."""
    try:
        options = read_options(argv)
        jobs = plan_jobs(options)
        loaded = load_model(options)
    except USER_ERRORS as exc:
        exit_with_user_error(PROG, exc)
    print(describe(loaded, len(jobs), options), flush=True)
    failures = run_jobs(jobs, loaded, options)
    finish(failures, len(jobs), options.output)


if __name__ == "__main__":
    main()
