"""Shared file helpers of the real-dataset loaders: image/mask reading with errors that name the file, cheap
header-only size checks, label lookup tables and content identities.

Nothing here knows a dataset layout; ``voc.py``, ``cityscapes.py``, ``ade20k.py`` and ``folder.py`` do.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from train_seg.data.base import DatasetError, SegmentationSource

#: File name endings accepted as images (and as masks by the folder loader), lower case.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

#: How many offending files a validation error lists before "... and N more".
MAX_LISTED = 5

# PIL raises OSError for truncated files ("image file is truncated"), SyntaxError for some broken PNG chunks,
# ValueError/struct errors for a few corrupt headers: all mean "this file cannot be read".
_READ_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def _unreadable(path: Path | str, what: str, error: BaseException) -> DatasetError:
    return DatasetError(
        f"Cannot read {what} {path}: {type(error).__name__}: {error}. The file is missing, truncated or not an "
        f"image; re-extract or re-download it, or remove it (and its pair) from the split."
    )


def read_rgb(path: Path | str) -> np.ndarray:
    """Decode an image file to an ``(H, W, 3)`` uint8 RGB array (grayscale, palette, CMYK and alpha images are
    converted). Raises ``DatasetError`` naming the file if it cannot be decoded (truncated, not an image)."""
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except _READ_ERRORS as error:  # UnidentifiedImageError is an OSError
        raise _unreadable(path, "image", error) from error


def read_index_mask(path: Path | str) -> np.ndarray:
    """Decode an index mask (one label value per pixel) to an ``(H, W)`` integer array, WITHOUT colour conversion.

    Accepts palette PNGs (mode "P": the stored indices are the labels, the palette is only for display), 8-bit
    grayscale ("L") and 16/32-bit integer images ("I;16", "I"). An RGB/RGBA mask is refused with a hint, because its
    colours are not labels.
    """
    try:
        with Image.open(path) as img:
            mode = img.mode
            if mode in ("P", "L", "I;16", "I;16B", "I;16L", "I", "1"):
                mask = np.asarray(img)
            elif mode == "LA":
                mask = np.asarray(img.getchannel(0))
            else:
                raise DatasetError(
                    f"Mask {path} is a {mode} image, but an index mask (one class index per pixel: palette 'P' or "
                    f"grayscale 'L' PNG) was expected. If the mask stores classes as colours, use the folder dataset "
                    f"with `mask_mode: rgb` and a `palette`; otherwise re-save it as an index PNG."
                )
    except DatasetError:
        raise
    except _READ_ERRORS as error:
        raise _unreadable(path, "mask", error) from error
    if mask.dtype == bool:
        mask = mask.astype(np.uint8)
    return mask


def read_rgb_mask(path: Path | str) -> np.ndarray:
    """Decode a colour-coded mask to ``(H, W, 3)`` uint8 RGB (palette PNGs are expanded through their palette)."""
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except _READ_ERRORS as error:
        raise _unreadable(path, "mask", error) from error


def header_size(path: Path | str, what: str) -> tuple[int, int]:
    """``(width, height)`` from the file header only (PIL opens lazily: no pixel data is decoded)."""
    try:
        with Image.open(path) as img:
            return img.size
    except (UnidentifiedImageError, *_READ_ERRORS) as error:
        raise _unreadable(path, what, error) from error


def check_pairs(dataset: str, pairs: Sequence[tuple[Path, Path]]) -> None:
    """Header-only check of every (image, mask) pair: both readable and of the same size. Collects every problem
    and raises ONE ``DatasetError`` listing the first few (file names, sizes) and how many there are."""
    problems: list[str] = []
    for image_path, mask_path in pairs:
        try:
            image_size = header_size(image_path, "image")
            mask_size = header_size(mask_path, "mask")
        except DatasetError as error:
            problems.append(str(error))
            continue
        if image_size != mask_size:
            problems.append(
                f"image {image_path} is {image_size[0]}x{image_size[1]} (WxH) but its mask {mask_path} is "
                f"{mask_size[0]}x{mask_size[1]}"
            )
    if problems:
        listed = "; ".join(problem.rstrip(".") for problem in problems[:MAX_LISTED])
        more = f" ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise DatasetError(
            f"{dataset}: {len(problems)} of {len(pairs)} image/mask pairs are unreadable or of different sizes: "
            f"{listed}{more}. An image and its mask must be readable and have the same width and height; fix or "
            f"remove these pairs."
        )


def require_dir(path: Path, dataset: str, layout: str, hint: str = "") -> Path:
    """``path`` if it is a directory, else a ``DatasetError`` naming it and the expected layout."""
    if not path.is_dir():
        raise DatasetError(
            f"{dataset}: folder {path} not found. Expected layout: {layout}.{(' ' + hint) if hint else ''}"
        )
    return path


def read_list_file(path: Path, dataset: str, key: str | None = None) -> list[str]:
    """Entries of a split list file: one per line, blank lines and ``#`` comments skipped, surrounding whitespace
    stripped. Missing or empty file -> ``DatasetError`` naming the file (and the config key that points to it)."""
    source = f" (set by {key})" if key else ""
    if not path.is_file():
        raise DatasetError(f"{dataset}: split file {path} not found{source}; create it with one entry per line.")
    entries = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
    entries = [entry for entry in entries if entry]
    if not entries:
        raise DatasetError(f"{dataset}: split file {path} is empty{source}; it must list one entry per line.")
    return entries


def list_images(folder: Path, extensions: Iterable[str] = IMAGE_EXTENSIONS) -> list[Path]:
    """Files directly inside ``folder`` whose suffix (case-insensitive) is in ``extensions``, sorted by name."""
    allowed = {ext.lower() for ext in extensions}
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in allowed)


def label_dtype(num_classes: int, ignore_index: int) -> np.dtype:
    """Smallest integer dtype holding labels ``0..num_classes-1`` and ``ignore_index`` that OpenCV (hence
    albumentations) can resize: uint8 when possible (the common case), else int16, else int32."""
    low, high = min(0, ignore_index), max(num_classes - 1, ignore_index)
    for dtype in (np.uint8, np.int16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= low and high <= info.max:
            return np.dtype(dtype)
    raise DatasetError(f"ignore_index={ignore_index} does not fit a 32-bit label; use 255 or -1.")


def lookup_table(mapping: Mapping[int, int], default: str | int, dtype: np.dtype, size: int = 256) -> np.ndarray:
    """A ``size``-entry table ``lut`` with ``lut[raw] = mapping[raw]``; raw values not in ``mapping`` map to
    themselves (``default="identity"``) or to the integer ``default`` (e.g. ``ignore_index``)."""
    if default == "identity":
        lut = np.arange(size, dtype=np.int64)
    else:
        lut = np.full(size, int(default), dtype=np.int64)
    for raw, label in mapping.items():
        lut[int(raw)] = int(label)
    info = np.iinfo(dtype)
    return np.clip(lut, info.min, info.max).astype(dtype)


def apply_lookup(mask: np.ndarray, lut: np.ndarray, path: Path | str) -> np.ndarray:
    """``lut[mask]`` (one vectorised gather). Raw values outside the table (16-bit masks) -> ``DatasetError``."""
    if mask.dtype != np.uint8 or len(lut) < 256:
        low, high = int(mask.min(initial=0)), int(mask.max(initial=0))
        if low < 0 or high >= len(lut):
            raise DatasetError(
                f"Mask {path} holds raw value {high if high >= len(lut) else low}, outside the {len(lut)}-entry "
                f"label table of this dataset (raw values 0..{len(lut) - 1}); the file is probably not a mask of "
                f"this dataset."
            )
    return lut[mask]


def files_digest(paths: Iterable[Path]) -> str:
    """sha256 over (path, size, mtime_ns) of each file: changes when a file is added, removed, renamed or rewritten,
    without reading any content (one ``os.stat`` per file)."""
    digest = hashlib.sha256()
    for path in paths:
        try:
            stat = os.stat(path)
            digest.update(f"{path}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{path}\tmissing\n".encode())
    return digest.hexdigest()


def identity_string(dataset: str, root: Path, split: str, options: Mapping[str, object],
                    pairs: Sequence[tuple[Path, Path]]) -> str:
    """Readable prefix (dataset, resolved root, split, mapping options, item count) + digest of every file."""
    opts = ",".join(f"{key}={options[key]!r}" for key in sorted(options))
    files = [path for pair in pairs for path in pair]
    return f"{dataset}(root={root},split={split},{opts})#{len(pairs)}:{files_digest(files)}"


def check_split(dataset: str, split: str, allowed: Sequence[str] = ("train", "val")) -> None:
    if split not in allowed:
        raise DatasetError(f"{dataset}: split must be one of {list(allowed)}, got {split!r}.")


def check_palette(dataset: str, palette: Sequence[Sequence[int]], num_classes: int,
                  key: str) -> list[tuple[int, int, int]]:
    """Validate a configured palette (``num_classes`` entries of [r, g, b], 0..255) and return it as tuples."""
    if len(palette) != num_classes:
        raise DatasetError(
            f"{dataset}: {key} has {len(palette)} colours but there are {num_classes} classes; give one [r, g, b] "
            f"per class, in class order."
        )
    colours = []
    for index, colour in enumerate(palette):
        values = list(colour)
        if len(values) != 3 or not all(isinstance(v, (int, np.integer)) and 0 <= v <= 255 for v in values):
            raise DatasetError(f"{dataset}: {key}[{index}] = {values} is not an [r, g, b] list of integers 0..255.")
        colours.append((int(values[0]), int(values[1]), int(values[2])))
    return colours


class PairedFileSource(SegmentationSource):
    """A split made of (image file, mask file) pairs; subclasses set ``pairs``, ``root``, ``split``,
    ``class_names``, ``palette``, ``ignore_index`` and implement ``_read_mask`` (file -> training labels) and
    ``_identity_options`` (the options that change the label mapping or the file list)."""

    dataset_name = "dataset"
    pairs: list[tuple[Path, Path]]
    root: Path
    split: str

    def __len__(self) -> int:
        return len(self.pairs)

    def load_image(self, index: int) -> np.ndarray:
        return read_rgb(self.pairs[index][0])

    def load_mask(self, index: int) -> np.ndarray:
        return self._read_mask(self.pairs[index][1])

    def _read_mask(self, path: Path) -> np.ndarray:
        raise NotImplementedError

    def _identity_options(self) -> dict[str, object]:
        return {}

    def identity(self) -> str:
        options = {"ignore_index": self.ignore_index, "classes": len(self.class_names), **self._identity_options()}
        return identity_string(type(self).__name__, self.root, self.split, options, self.pairs)

    def describe(self, index: int) -> str:
        image_path, mask_path = self.pairs[index]
        return f"{self.dataset_name} {self.split} item {index}: image {image_path}, mask {mask_path}"

    def validate(self) -> None:
        """Non-empty split; every image and mask readable (header) and of the same size. No pixel is decoded."""
        if not self.pairs:
            raise DatasetError(f"{self.dataset_name}: the {self.split} split under {self.root} is empty.")
        check_pairs(f"{self.dataset_name} {self.split} split under {self.root}", self.pairs)
