"""The embedded default dataset (``dataset=synthetic``): synthetic aerial-style scenes with a strong class imbalance.

Every image is generated from ``(seed, split, index)`` alone: no files, identical on every machine, and
regenerable inside DataLoader workers. Classes: 0 background (smooth colour field + grain), 1 lake (1-2 large
ellipses with ripples), 2 road (one 8-12 px band with a dashed centre line), 3 car (the rare class: 1-2
checkered squares of ``car_size`` px in a ``car_probability`` share of the non-empty images). Colours are drawn
per object from overlapping ranges with per-pixel noise, so a model must use texture and shape.
``empty_fraction`` of the images have no foreground. Pixel shares: ``python -m train_seg.cli.stats``; the
default layout and its consequences: docs/datasets.md, "The embedded dataset".
"""
from __future__ import annotations

import numpy as np

from train_seg.data.base import DatasetError, SegmentationSource

CLASS_NAMES = ["background", "lake", "road", "car"]
PALETTE = [(0, 0, 0), (31, 119, 180), (255, 127, 14), (214, 39, 40)]
_SPLIT_CODES = {"train": 0, "val": 1, "calib": 2}
_VERSION = 1  # bump when the generator changes: it is part of identity(), so cached statistics are invalidated


class SyntheticShapes(SegmentationSource):
    """Deterministic synthetic imbalanced segmentation split.

    Args:
        split: "train", "val" or "calib" (the split post-hoc calibration fits on).
        num_train, num_val, num_calib: number of images in each split.
        image_size: side of the square images in pixels (object sizes scale with it; 128 is the reference).
        seed: dataset seed; images depend only on (seed, split, index).
        empty_fraction: share of images with no foreground at all.
        noise: standard deviation of the per-pixel Gaussian noise (image values in [0, 1]).
        ignore_index: label of ignored pixels (the generator emits none unless ``ignore_border`` > 0).
        ignore_border: width in pixels of an ignore band around every object boundary (0 = none), like VOC's
            255 outlines.
        binary: relabel to two classes, ``background`` and ``car`` (lakes and roads are still drawn but count as
            background): a foreground-vs-background task for ``model.binary_head=true`` with ``loss=bce``,
            ``sigmoid_focal`` or ``binary_dice``.
    """

    class_names = CLASS_NAMES
    palette = PALETTE

    def __init__(
        self,
        split: str,
        num_train: int = 450,
        num_val: int = 100,
        num_calib: int = 100,
        image_size: int = 128,
        seed: int = 0,
        empty_fraction: float = 0.15,
        noise: float = 0.08,
        ignore_index: int = 255,
        ignore_border: int = 0,
        binary: bool = False,
        car_size: tuple[float, float] = (18.0, 24.0),
        car_probability: float = 0.17,
    ):
        if split not in _SPLIT_CODES:
            raise DatasetError(f"dataset.split: expected one of {sorted(_SPLIT_CODES)}, got {split!r}.")
        for key, value, low in (("num_train", num_train, 1), ("num_val", num_val, 1), ("num_calib", num_calib, 1),
                                ("image_size", image_size, 32)):
            if int(value) < low:
                raise DatasetError(f"dataset.{key} must be >= {low}, got {value}.")
        if not 0.0 <= float(empty_fraction) <= 1.0:
            raise DatasetError(f"dataset.empty_fraction must be in [0, 1], got {empty_fraction}.")
        car_size = tuple(float(v) for v in car_size)
        if len(car_size) != 2 or not 2.0 <= car_size[0] <= car_size[1] <= 64.0:
            raise DatasetError(f"dataset.car_size must be [min, max] px with 2 <= min <= max <= 64, got {list(car_size)}.")
        if not 0.0 <= float(car_probability) <= 1.0:
            raise DatasetError(f"dataset.car_probability must be in [0, 1], got {car_probability}.")
        if 0 <= ignore_index < len(CLASS_NAMES):
            raise DatasetError(
                f"dataset.ignore_index={ignore_index} collides with a class label (0..{len(CLASS_NAMES) - 1}); "
                "use 255 or -100."
            )
        self.split = split
        self.length = int({"train": num_train, "val": num_val, "calib": num_calib}[split])
        self.image_size = int(image_size)
        self.seed = int(seed)
        self.empty_fraction = float(empty_fraction)
        self.noise = float(noise)
        self.ignore_index = int(ignore_index)
        self.ignore_border = int(ignore_border)
        self.binary = bool(binary)
        self.car_size = car_size
        self.car_probability = float(car_probability)
        if self.binary:
            self.class_names = [CLASS_NAMES[0], CLASS_NAMES[3]]
            self.palette = [PALETTE[0], PALETTE[3]]
        size = self.image_size
        self._yy, self._xx = np.mgrid[0:size, 0:size].astype(np.float32)
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return self.length

    def identity(self) -> str:
        return (
            f"synthetic-v{_VERSION}:{self.split}:n={self.length}:size={self.image_size}:seed={self.seed}:"
            f"empty={self.empty_fraction}:noise={self.noise}:ignore={self.ignore_index}:border={self.ignore_border}:"
            f"binary={self.binary}:car={self.car_size[0]:g}-{self.car_size[1]:g}@{self.car_probability:g}"
        )

    def describe(self, index: int) -> str:
        return f"synthetic {self.split} image #{index} (seed {self.seed})"

    def load_image(self, index: int) -> np.ndarray:
        return self._generate(index)[0]

    def load_mask(self, index: int) -> np.ndarray:
        return self._generate(index)[1]

    # -- generator ---------------------------------------------------------------------------------------------
    def _generate(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} images")
        cached = self._cache.get(index)
        if cached is not None:
            return cached
        rng = np.random.default_rng([self.seed, _SPLIT_CODES[self.split], index, _VERSION])
        size = self.image_size
        scale = size / 128.0
        image = self._background(rng)
        mask = np.zeros((size, size), dtype=np.uint8)

        if rng.random() >= self.empty_fraction:
            if rng.random() < 0.6:
                for _ in range(rng.integers(1, 3)):
                    self._paint_lake(rng, image, mask, scale)
            if rng.random() < 0.5:
                self._paint_road(rng, image, mask, scale)
            if rng.random() < self.car_probability:
                for _ in range(rng.integers(1, 3)):
                    self._paint_car(rng, image, mask, scale)

        image += rng.normal(0.0, self.noise, size=image.shape).astype(np.float32)
        image_u8 = (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        if self.binary:
            mask = (mask == 3).astype(np.uint8)
        if self.ignore_border > 0:
            mask = self._with_ignore_border(mask)
        result = (image_u8, mask)
        if len(self._cache) < 4096:  # small splits stay in memory (each item is ~65 kB at 128 px)
            self._cache[index] = result
        return result

    def _background(self, rng: np.random.Generator) -> np.ndarray:
        size = self.image_size
        base = rng.uniform(0.3, 0.6, size=3).astype(np.float32)
        field = np.zeros((size, size), dtype=np.float32)
        for _ in range(3):  # a few smooth waves: large-scale colour variation, not a flat colour
            fy, fx = rng.uniform(0.5, 2.5, size=2) * 2 * np.pi / size
            phase = rng.uniform(0, 2 * np.pi)
            field += np.sin(fy * self._yy + fx * self._xx + phase).astype(np.float32)
        tint = rng.uniform(-0.08, 0.08, size=3).astype(np.float32)
        return (base + field[..., None] * (tint + 0.04)).astype(np.float32)

    def _paint_lake(self, rng, image, mask, scale) -> None:
        size = self.image_size
        cy, cx = rng.uniform(0, size, size=2)
        ry, rx = rng.uniform(18, 38, size=2) * scale
        angle = rng.uniform(0, np.pi)
        cos, sin = np.cos(angle), np.sin(angle)
        dy, dx = self._yy - cy, self._xx - cx
        u, v = dx * cos + dy * sin, -dx * sin + dy * cos
        region = (u / rx) ** 2 + (v / ry) ** 2 <= 1.0
        colour = np.array([rng.uniform(0.15, 0.45), rng.uniform(0.3, 0.6), rng.uniform(0.45, 0.8)], np.float32)
        ripple = 0.07 * np.sin(self._yy * rng.uniform(0.9, 1.3) + rng.uniform(0, 2 * np.pi))
        image[region] = colour + ripple[region][:, None]
        mask[region] = 1

    def _paint_road(self, rng, image, mask, scale) -> None:
        size = self.image_size
        angle = rng.uniform(0, np.pi)
        width = rng.uniform(8, 12) * scale
        cy, cx = rng.uniform(0.25 * size, 0.75 * size, size=2)
        # signed distance to a line through (cx, cy) with direction `angle`
        dist = (self._xx - cx) * np.sin(angle) - (self._yy - cy) * np.cos(angle)
        along = (self._xx - cx) * np.cos(angle) + (self._yy - cy) * np.sin(angle)
        region = np.abs(dist) <= width / 2
        grey = rng.uniform(0.45, 0.75)
        colour = np.array([grey, grey, grey], np.float32) + rng.uniform(-0.05, 0.05, size=3).astype(np.float32)
        dashes = (np.abs(dist) <= 1.0) & (np.mod(along, 8 * scale) < 4 * scale)
        image[region] = colour
        image[region & dashes] = np.minimum(colour + 0.3, 1.0)
        mask[region] = 2

    def _paint_car(self, rng, image, mask, scale) -> None:
        size = self.image_size
        side = rng.uniform(*self.car_size) * scale
        y0, x0 = rng.uniform(0, size - side, size=2)
        region = (self._yy >= y0) & (self._yy < y0 + side) & (self._xx >= x0) & (self._xx < x0 + side)
        colour = np.array([rng.uniform(0.5, 0.9), rng.uniform(0.15, 0.5), rng.uniform(0.15, 0.5)], np.float32)
        checker = ((np.floor(self._yy / 2) + np.floor(self._xx / 2)) % 2 == 0)
        image[region] = colour
        image[region & checker] = colour * 0.45
        mask[region] = 3

    def _with_ignore_border(self, mask: np.ndarray) -> np.ndarray:
        """Marks pixels within ``ignore_border`` px of a label change as ignored (vectorised shifts)."""
        edge = np.zeros(mask.shape, dtype=bool)
        edge[:-1, :] |= mask[:-1, :] != mask[1:, :]
        edge[1:, :] |= mask[1:, :] != mask[:-1, :]
        edge[:, :-1] |= mask[:, :-1] != mask[:, 1:]
        edge[:, 1:] |= mask[:, 1:] != mask[:, :-1]
        grown = edge.copy()
        for _ in range(self.ignore_border - 1):  # dilation by one pixel per step (border is a few px at most)
            step = grown.copy()
            step[1:, :] |= grown[:-1, :]
            step[:-1, :] |= grown[1:, :]
            step[:, 1:] |= grown[:, :-1]
            step[:, :-1] |= grown[:, 1:]
            grown = step
        out = mask.astype(np.int64)
        out[grown] = self.ignore_index
        return out
