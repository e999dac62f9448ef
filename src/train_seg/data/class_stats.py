"""Class statistics of one split: pixels per class, images containing each class, and which image contains which
class. Computed once per split from ``SegmentationSource.load_mask`` (no images decoded, no augmentation) and
cached on disk keyed by the split's ``identity()``.

Conventions:
  * ``ignore_index`` pixels count nowhere: they are excluded from every count and only reported as
    ``ignored_pixels``.
  * A mask value that is neither a training label ``0..K-1`` nor ``ignore_index`` is a dataset error
    (``DatasetError`` naming the file, the offending values and the fix), never silently dropped.
  * One pass per mask, vectorised with ``np.bincount``; no Python loop over pixels.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm  # not tqdm.auto: its asyncio class calls iter(loader) a second time (extra workers)

from train_seg.atomic import atomic_write
from train_seg.data.base import DatasetError, SegmentationSource

__all__ = ["ClassStats", "compute_class_stats", "cache_path", "CACHE_FORMAT_VERSION"]

log = logging.getLogger(__name__)

# Bump whenever the meaning or layout of the cached statistics changes: old cache files then miss.
CACHE_FORMAT_VERSION = 1

# How many offending mask values an error message lists.
_MAX_LISTED_VALUES = 10


@dataclass(frozen=True, eq=False)
class ClassStats:
    """Class statistics of one split (ignore pixels excluded everywhere).

    Fields:
      * ``pixel_counts``: ``(K,)`` int64, pixels of class ``c`` over the split.
      * ``image_counts``: ``(K,)`` int64, images containing at least one pixel of class ``c``.
      * ``presence``: ``(num_images, K)`` bool, class ``c`` present in image ``i`` (repeat-factor sampler, picking
        rare-class images).
      * ``ignored_pixels``: pixels equal to ``ignore_index`` over the split.
      * ``image_pixels``: ``(num_images,)`` int64, non-ignored pixels of each image (the denominator of median
        frequency balancing). Optional so that statistics built by hand without it stay valid; only
        ``median_freq`` weighting needs it.
    """

    pixel_counts: np.ndarray
    image_counts: np.ndarray
    presence: np.ndarray
    ignored_pixels: int
    image_pixels: np.ndarray | None = None

    def __post_init__(self) -> None:
        pixel_counts = np.asarray(self.pixel_counts, dtype=np.int64).reshape(-1)
        image_counts = np.asarray(self.image_counts, dtype=np.int64).reshape(-1)
        num_classes = pixel_counts.shape[0]
        presence = np.asarray(self.presence, dtype=bool)
        if presence.ndim != 2 and presence.size == 0:
            presence = presence.reshape(0, num_classes)
        if image_counts.shape != (num_classes,) or presence.ndim != 2 or presence.shape[1] != num_classes:
            raise ValueError(
                f"ClassStats: inconsistent shapes pixel_counts {pixel_counts.shape}, "
                f"image_counts {image_counts.shape}, "
                f"presence {presence.shape}; expected (K,), (K,), (num_images, K)."
            )
        image_pixels = self.image_pixels
        if image_pixels is not None:
            image_pixels = np.asarray(image_pixels, dtype=np.int64).reshape(-1)
            if image_pixels.shape != (presence.shape[0],):
                raise ValueError(
                    f"ClassStats: image_pixels has shape {image_pixels.shape}, expected ({presence.shape[0]},)."
                )
        # Frozen dataclass: normalise dtypes once here, through object.__setattr__.
        object.__setattr__(self, "pixel_counts", pixel_counts)
        object.__setattr__(self, "image_counts", image_counts)
        object.__setattr__(self, "presence", presence)
        object.__setattr__(self, "ignored_pixels", int(self.ignored_pixels))
        object.__setattr__(self, "image_pixels", image_pixels)

    @property
    def num_classes(self) -> int:
        return int(self.pixel_counts.shape[0])

    @property
    def num_images(self) -> int:
        return int(self.presence.shape[0])

    @property
    def total_pixels(self) -> int:
        """Non-ignored pixels of the split."""
        return int(self.pixel_counts.sum())

    @property
    def pixel_share(self) -> np.ndarray:
        """``(K,)`` float64, ``N_c / N`` (all zeros when the split has no labelled pixel)."""
        total = self.total_pixels
        if total == 0:
            return np.zeros(self.num_classes, dtype=np.float64)
        return self.pixel_counts.astype(np.float64) / total

    @property
    def pixels_of_images_containing(self) -> np.ndarray:
        """``(K,)`` int64, non-ignored pixels of the images that contain class ``c`` (median frequency)."""
        if self.image_pixels is None:
            raise ValueError(
                "ClassStats has no image_pixels (per-image pixel totals); build it with compute_class_stats "
                "or pass image_pixels=..."
            )
        return self.image_pixels @ self.presence.astype(np.int64)

    def to_dict(self, include_presence: bool = True) -> dict[str, Any]:
        """JSON-friendly dict. ``presence`` is stored sparsely as ``present_classes``: one list of class indices
        per image. ``include_presence=False`` gives the compact summary for metrics.json (not loadable by
        ``from_dict``)."""
        out: dict[str, Any] = {
            "num_classes": self.num_classes,
            "num_images": self.num_images,
            "pixel_counts": self.pixel_counts.tolist(),
            "image_counts": self.image_counts.tolist(),
            "ignored_pixels": self.ignored_pixels,
            "total_pixels": self.total_pixels,
            "pixel_share": self.pixel_share.tolist(),
        }
        if include_presence:
            out["present_classes"] = [np.flatnonzero(row).tolist() for row in self.presence]
            out["image_pixels"] = None if self.image_pixels is None else self.image_pixels.tolist()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ClassStats":
        """Inverse of ``to_dict()`` (with presence). Raises ``KeyError``/``ValueError``/``TypeError`` on bad input."""
        pixel_counts = np.asarray(data["pixel_counts"], dtype=np.int64)
        num_classes = pixel_counts.shape[0]
        present_classes = data["present_classes"]
        presence = np.zeros((len(present_classes), num_classes), dtype=bool)
        for row, classes in zip(presence, present_classes):
            row[np.asarray(classes, dtype=np.int64)] = True
        image_pixels = data.get("image_pixels")
        return cls(
            pixel_counts=pixel_counts,
            image_counts=np.asarray(data["image_counts"], dtype=np.int64),
            presence=presence,
            ignored_pixels=int(data["ignored_pixels"]),
            image_pixels=None if image_pixels is None else np.asarray(image_pixels, dtype=np.int64),
        )


def _count_mask(mask: np.ndarray, num_classes: int, ignore_index: int, where: str) -> tuple[np.ndarray, int]:
    """``(K,)`` pixel counts of one mask and its number of ignored pixels; bad values raise ``DatasetError``."""
    mask = np.asarray(mask)
    if mask.dtype.kind == "b":
        mask = mask.astype(np.uint8)
    if mask.dtype.kind not in "iu":
        raise DatasetError(
            f"{where}: mask has dtype {mask.dtype}, expected integer training labels; load masks as integer arrays "
            f"(e.g. PIL mode 'L'/'P', not RGB or float)."
        )
    flat = mask.reshape(-1)
    valid = flat != ignore_index
    labels = flat[valid]
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        values = np.unique(labels[bad])
        listed = ", ".join(str(v) for v in values[:_MAX_LISTED_VALUES].tolist())
        more = f" (and {len(values) - _MAX_LISTED_VALUES} more)" if len(values) > _MAX_LISTED_VALUES else ""
        raise DatasetError(
            f"{where}: mask contains values [{listed}]{more} that are neither a training label 0..{num_classes - 1} "
            f"nor ignore_index={ignore_index}. Map them to training labels in the dataset loader/config "
            f"(label mapping), or set dataset.ignore_index if they mark pixels to ignore."
        )
    counts = np.bincount(labels.astype(np.intp, copy=False), minlength=num_classes)
    return counts.astype(np.int64, copy=False), int(flat.size - labels.size)


def _compute(source: SegmentationSource, progress: bool) -> ClassStats:
    num_classes, ignore_index, num_images = source.num_classes, source.ignore_index, len(source)
    pixel_counts = np.zeros(num_classes, dtype=np.int64)
    presence = np.zeros((num_images, num_classes), dtype=bool)
    image_pixels = np.zeros(num_images, dtype=np.int64)
    ignored = 0
    # disable=None: tqdm hides the bar when stderr is not a terminal.
    for i in tqdm(range(num_images), desc="class statistics", unit="image", disable=None if progress else True):
        # every image is decoded once too (not only its header): a file cut short in its pixel data is named here,
        # before training, and not when a worker meets it (a cached split is not decoded again)
        source.load_image(i)
        counts, ignored_here = _count_mask(source.load_mask(i), num_classes, ignore_index, source.describe(i))
        pixel_counts += counts
        presence[i] = counts > 0
        image_pixels[i] = counts.sum()
        ignored += ignored_here
    return ClassStats(
        pixel_counts=pixel_counts,
        image_counts=presence.sum(axis=0, dtype=np.int64),
        presence=presence,
        ignored_pixels=ignored,
        image_pixels=image_pixels,
    )


def cache_path(source: SegmentationSource, cache_dir: str | os.PathLike, identity: str | None = None) -> Path:
    """File holding the cached statistics of ``source`` in ``cache_dir``: named by the sha256 of (cache format
    version, ``source.identity()``, ``num_classes``, ``ignore_index``, ``class_names``), so it changes with any of
    them (class names are included so that a reordered label space cannot reuse stale counts)."""
    identity = source.identity() if identity is None else identity
    payload = json.dumps(
        [CACHE_FORMAT_VERSION, identity, source.num_classes, source.ignore_index, list(source.class_names)],
        separators=(",", ":"),
    )
    return Path(cache_dir) / f"class_stats-{hashlib.sha256(payload.encode('utf-8')).hexdigest()}.json"


def _read_cache(path: Path, source: SegmentationSource) -> ClassStats | None:
    """Cached statistics, or None when absent. A corrupt or inconsistent file is ignored with a warning."""
    if not path.is_file():
        return None
    try:
        with open(path, encoding="utf-8") as f:
            stats = ClassStats.from_dict(json.load(f))
        if stats.num_classes != source.num_classes or stats.num_images != len(source):
            raise ValueError(
                f"{stats.num_images} images x {stats.num_classes} classes cached, "
                f"{len(source)} x {source.num_classes} in the dataset"
            )
        if stats.image_pixels is None:
            raise ValueError("image_pixels missing")
    except Exception as err:  # any unreadable cache is recomputed, never fatal
        log.warning("class statistics: ignoring unreadable cache file %s (%s: %s); recomputing", path,
                    type(err).__name__, err)
        return None
    return stats


def _write_cache(path: Path, stats: ClassStats, identity: str, ignore_index: int) -> None:
    """Atomic write (``train_seg.atomic``). A failure is a warning: the statistics are still valid, only the next
    run recomputes them. Identity and ignore_index are stored for humans only."""
    data = {"format_version": CACHE_FORMAT_VERSION, "identity": identity, "ignore_index": ignore_index,
            **stats.to_dict()}
    try:
        atomic_write(path, lambda handle: json.dump(data, handle, separators=(",", ":")))
        log.info("class statistics: cached to %s", path)
    except OSError as err:
        log.warning("class statistics: could not write cache %s (%s)", path, err)


def compute_class_stats(
    source: SegmentationSource, cache_dir: str | os.PathLike | None = None, progress: bool = True
) -> ClassStats:
    """Class statistics of ``source`` (one split), read from / written to ``cache_dir`` when given.

    The cache file name is the sha256 of ``(format version, source.identity(), num_classes, ignore_index,
    class_names)``, so any change of the split's content (as reported by ``identity()``) or of the label space
    misses the cache.
    A corrupt cache file is recomputed with a warning. ``progress`` shows a tqdm bar ("class statistics") when
    stderr is a terminal.

    Raises ``DatasetError`` naming the file when a mask holds values outside ``0..K-1`` and ``ignore_index``.
    """
    if cache_dir is None:
        stats = _compute(source, progress)
        log.info("class statistics: computed over %d images (no cache directory)", stats.num_images)
        return stats
    identity = source.identity()
    path = cache_path(source, cache_dir, identity)
    stats = _read_cache(path, source)
    if stats is not None:
        log.info("class statistics: cache hit %s", path)
        return stats
    log.info("class statistics: cache miss, computing over %d images", len(source))
    stats = _compute(source, progress)
    _write_cache(path, stats, identity, source.ignore_index)
    return stats
