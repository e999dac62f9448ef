"""Any dataset stored as a folder of images and a folder of masks (``dataset=folder``).

Layout: ``root/images/<stem>.<ext>`` and ``root/masks/<stem>.<ext>``, paired by stem; images .jpg .jpeg .png .bmp
.tif .tiff .webp; masks should be PNG. ``mask_mode=index``: each pixel is a class index (``label_map`` remaps raw
values first, ``ignore_index`` is ignored); ``mask_mode=rgb``: each pixel is a class colour from ``palette``,
``ignore_colors`` map to ``ignore_index``, any other colour is a ``DatasetError`` naming the file and colours.

Splits, first match wins: ``split_files`` (one stem per line, ``#`` comments), ``root/images/{train,val}``
subfolders, else a deterministic ratio over the flat folder (``val_ratio``, images ordered by
``sha256(f"{split_seed}:{stem}")``, at least one per split when there are two or more images).
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from train_seg.data._io import (
    MAX_LISTED,
    PairedFileSource,
    apply_lookup,
    check_palette,
    check_split,
    label_dtype,
    list_images,
    lookup_table,
    read_index_mask,
    read_list_file,
    read_rgb_mask,
)
from train_seg.data.base import DatasetError
from train_seg.data.voc import voc_colormap

MASK_MODES = ("index", "rgb")
_LAYOUT = "<root>/images/<stem>.<ext> and <root>/masks/<stem>.png (optionally in train/ and val/ subfolders)"


def pack_rgb(colours: np.ndarray) -> np.ndarray:
    """``(..., 3)`` uint8 rgb -> ``(...)`` int32 ``r << 16 | g << 8 | b``."""
    colours = colours.astype(np.int32, copy=False)
    return (colours[..., 0] << 16) | (colours[..., 1] << 8) | colours[..., 2]


def ratio_split(stems: Sequence[str], val_ratio: float, seed: int) -> dict[str, list[str]]:
    """Deterministic, disjoint, covering train/val split of ``stems`` (see the module docstring)."""
    ordered = sorted(stems, key=lambda stem: hashlib.sha256(f"{seed}:{stem}".encode()).hexdigest())
    n_val = int(round(len(ordered) * val_ratio))
    if 0 < val_ratio < 1 and len(ordered) >= 2:
        n_val = min(max(n_val, 1), len(ordered) - 1)
    return {"val": sorted(ordered[:n_val]), "train": sorted(ordered[n_val:])}


def _by_stem(folder: Path, what: str) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for path in list_images(folder):
        if path.stem in files:
            raise DatasetError(
                f"folder: two {what} files share the stem {path.stem!r}: {files[path.stem]} and {path}. Files are "
                f"paired by stem, so each stem must appear once; rename or remove one."
            )
        files[path.stem] = path
    return files


class FolderSegmentation(PairedFileSource):
    """One split of a folder dataset (layout, mask modes and split precedence in the module docstring).

    Args:
        split: "train" or "val".
        root: the folder holding ``images/`` and ``masks/``.
        ignore_index: label of pixels that count nowhere.
        classes: class names in label order (required).
        mask_mode: "index" or "rgb".
        palette: one [r, g, b] per class; required for ``rgb``, optional for ``index`` (display only; default: the
            VOC colour map).
        ignore_colors: (rgb) colours mapped to ``ignore_index``.
        label_map: (index) raw value -> label (or ``ignore_index``) applied before anything else, for raw 0..255.
        split_files: ``{train: <file>, val: <file>}`` relative to ``root``.
        val_ratio, split_seed: the ratio split used when there are neither split files nor subfolders.
    """

    dataset_name = "folder"

    def __init__(
        self,
        split: str,
        root: str,
        ignore_index: int = 255,
        classes: Sequence[str] | None = None,
        mask_mode: str = "index",
        palette: Sequence[Sequence[int]] | None = None,
        ignore_colors: Sequence[Sequence[int]] | None = None,
        label_map: Mapping[int, int] | None = None,
        split_files: Mapping[str, str] | None = None,
        val_ratio: float = 0.2,
        split_seed: int = 0,
    ):
        check_split("folder", split)
        self.split = split
        self.ignore_index = int(ignore_index)
        if not classes:
            raise DatasetError(
                "folder: dataset.classes is required: list the class names in label order, e.g. "
                "`dataset.classes=[background,defect]` (index masks store these indices, rgb masks their palette "
                "colours)."
            )
        self.class_names = [str(c) for c in classes]
        if mask_mode not in MASK_MODES:
            raise DatasetError(f"folder: dataset.mask_mode must be one of {list(MASK_MODES)}, got {mask_mode!r}.")
        self.mask_mode = mask_mode
        self._dtype = label_dtype(len(self.class_names), self.ignore_index)
        self._configure_labels(palette, ignore_colors, label_map)

        given = Path(root).expanduser()
        if not given.is_dir():
            raise DatasetError(
                f"folder: dataset.root {given} does not exist or is not a folder. Expected layout: {_LAYOUT}."
            )
        self.root = given.resolve()
        self.val_ratio = float(val_ratio)
        self.split_seed = int(split_seed)
        self.split_source, self.pairs = self._find_pairs(split_files)

    # ----------------------------------------------------------------------------------------------- labels
    def _configure_labels(self, palette, ignore_colors, label_map) -> None:
        num_classes = len(self.class_names)
        if self.mask_mode == "rgb":
            if palette is None:
                raise DatasetError(
                    "folder: mask_mode is rgb, so dataset.palette is required: one [r, g, b] per class in class order "
                    f"({num_classes} classes: {self.class_names})."
                )
            self.palette = check_palette("folder", list(palette), num_classes, "dataset.palette")
            ignore_colors = list(ignore_colors or [])
            self.ignore_colors = check_palette("folder", ignore_colors, len(ignore_colors), "dataset.ignore_colors")
            packed_classes = pack_rgb(np.asarray(self.palette, dtype=np.uint8).reshape(-1, 3))
            if len(set(packed_classes.tolist())) != num_classes:
                raise DatasetError(f"folder: dataset.palette {self.palette} gives the same colour to two classes.")
            packed_ignore = np.unique(pack_rgb(np.asarray(self.ignore_colors, dtype=np.uint8).reshape(-1, 3)))
            both = set(packed_classes.tolist()) & set(packed_ignore.tolist())
            if both:
                raise DatasetError(
                    f"folder: colours {[_unpack(c) for c in sorted(both)]} are in both dataset.palette and "
                    f"dataset.ignore_colors; keep each colour in one of them."
                )
            # sorted packed colours -> label: one searchsorted per mask maps every pixel
            keys = np.concatenate([packed_classes, packed_ignore])
            labels = np.concatenate([np.arange(num_classes), np.full(len(packed_ignore), self.ignore_index)])
            order = np.argsort(keys)
            self._colour_keys = keys[order]
            self._colour_labels = labels[order].astype(self._dtype)
            if label_map:
                raise DatasetError("folder: dataset.label_map applies to index masks only; with mask_mode rgb use "
                                   "dataset.palette and dataset.ignore_colors.")
            self.label_map = None
        else:
            if ignore_colors:
                raise DatasetError("folder: dataset.ignore_colors applies to rgb masks only (mask_mode: rgb).")
            self.palette = (check_palette("folder", list(palette), num_classes, "dataset.palette")
                            if palette is not None else voc_colormap(num_classes))
            self.ignore_colors = []
            self.label_map = {int(k): int(v) for k, v in (label_map or {}).items()}
            for raw, label in self.label_map.items():
                if not 0 <= raw <= 255 or not (0 <= label < num_classes or label == self.ignore_index):
                    raise DatasetError(
                        f"folder: dataset.label_map entry {raw}: {label} is invalid: keys are raw mask values 0..255, "
                        f"values are class indices 0..{num_classes - 1} or ignore_index {self.ignore_index}."
                    )
            self._lut = lookup_table(self.label_map, "identity", self._dtype)

    def _read_mask(self, path: Path) -> np.ndarray:
        if self.mask_mode == "index":
            return apply_lookup(read_index_mask(path), self._lut, path)
        packed = pack_rgb(read_rgb_mask(path))
        position = np.searchsorted(self._colour_keys, packed)
        position = np.minimum(position, len(self._colour_keys) - 1)
        found = self._colour_keys[position] == packed
        if not found.all():
            colours, counts = np.unique(packed[~found], return_counts=True)
            listed = ", ".join(f"{_unpack(c)} ({n} px)" for c, n in zip(colours[:10].tolist(), counts[:10].tolist()))
            more = f" and {len(colours) - 10} more" if len(colours) > 10 else ""
            raise DatasetError(
                f"folder: mask {path} has {len(colours)} colours that are not in dataset.palette: {listed}{more}. "
                f"Add each to dataset.palette (as a class) or to dataset.ignore_colors; if the mask was saved as JPEG "
                f"or resized with interpolation, re-export it as a lossless PNG with nearest-neighbour resizing."
            )
        return self._colour_labels[position]

    def _identity_options(self) -> dict[str, object]:
        return {
            "mask_mode": self.mask_mode,
            "palette": self.palette if self.mask_mode == "rgb" else None,
            "ignore_colors": self.ignore_colors,
            "label_map": sorted(self.label_map.items()) if self.label_map else None,
            "split_source": self.split_source,
        }

    # ----------------------------------------------------------------------------------------------- splits
    def _find_pairs(self, split_files: Mapping[str, str] | None) -> tuple[str, list[tuple[Path, Path]]]:
        images_root, masks_root = self.root / "images", self.root / "masks"
        for folder in (images_root, masks_root):
            if not folder.is_dir():
                raise DatasetError(
                    f"folder: {folder} not found under dataset.root {self.root}. Expected layout: {_LAYOUT}."
                )
        if split_files:
            if self.split not in split_files or not split_files[self.split]:
                raise DatasetError(
                    f"folder: dataset.split_files has no entry for the {self.split} split (keys: {list(split_files)}); "
                    f"add `{self.split}: <file>` (a file under {self.root} with one image stem per line)."
                )
            list_path = Path(str(split_files[self.split])).expanduser()
            list_path = list_path if list_path.is_absolute() else self.root / list_path
            stems = read_list_file(list_path, "folder", f"dataset.split_files.{self.split}")
            stems = [Path(s).stem if Path(s).suffix.lower() in {".jpg", ".jpeg", ".png"} else s for s in stems]
            images = _by_stem(images_root, "image")
            unknown = [s for s in stems if s not in images]
            if unknown:
                raise DatasetError(
                    f"folder: {len(unknown)} stems of {list_path} (dataset.split_files.{self.split}) have no image in "
                    f"{images_root} (first: {unknown[:5]}). Entries are file names without extension."
                )
            masks = _by_stem(masks_root, "mask")
            return f"split_files:{list_path}", self._pair(stems, images, masks, images_root, masks_root)

        if (images_root / "train").is_dir() or (images_root / "val").is_dir():
            image_dir, mask_dir = images_root / self.split, masks_root / self.split
            for folder in (image_dir, mask_dir):
                if not folder.is_dir():
                    raise DatasetError(
                        f"folder: {folder} not found: {images_root} has train/val subfolders, so the {self.split} "
                        f"split reads {image_dir} and {mask_dir}. Create it, or use dataset.split_files / "
                        f"dataset.val_ratio with a flat images/ folder."
                    )
            images, masks = _by_stem(image_dir, "image"), _by_stem(mask_dir, "mask")
            if not images:
                raise DatasetError(f"folder: the {self.split} split is empty: no image file in {image_dir}.")
            return f"subfolder:{self.split}", self._pair(sorted(images), images, masks, image_dir, mask_dir)

        images, masks = _by_stem(images_root, "image"), _by_stem(masks_root, "mask")
        if not images:
            raise DatasetError(f"folder: no image file in {images_root} (expected layout: {_LAYOUT}).")
        if not 0 <= self.val_ratio <= 1:
            raise DatasetError(f"folder: dataset.val_ratio must be in [0, 1], got {self.val_ratio}.")
        stems = ratio_split(sorted(images), self.val_ratio, self.split_seed)[self.split]
        if not stems:
            raise DatasetError(
                f"folder: the {self.split} split is empty: {len(images)} images in {images_root} split with "
                f"dataset.val_ratio={self.val_ratio}. Change val_ratio, add images, or give dataset.split_files."
            )
        return (f"ratio:{self.val_ratio}:seed{self.split_seed}",
                self._pair(stems, images, masks, images_root, masks_root))

    def _pair(self, stems: Sequence[str], images: Mapping[str, Path], masks: Mapping[str, Path],
              image_dir: Path, mask_dir: Path) -> list[tuple[Path, Path]]:
        missing = [s for s in stems if s not in masks]
        if missing:
            examples = ", ".join(str(images[s]) for s in missing[:MAX_LISTED])
            raise DatasetError(
                f"folder: {len(missing)} images of the {self.split} split have no mask in {mask_dir} with the same "
                f"stem (e.g. {examples}). Each image <stem>.<ext> needs a mask <stem>.png in {mask_dir}."
            )
        return [(images[s], masks[s]) for s in stems]


def _unpack(packed: int) -> list[int]:
    return [(packed >> 16) & 255, (packed >> 8) & 255, packed & 255]
