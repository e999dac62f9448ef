"""Custom albumentations transforms used by the dataset yamls (``configs/dataset/*.yaml``, key ``transforms``).

``ClassAwareRandomCrop``: a random crop that avoids crops dominated by one class, as MMSegmentation's
``RandomCrop(cat_max_ratio=0.75)``. On imbalanced data a plain random crop is often all background (sky, road,
wall); those crops carry no signal about rare classes.
"""
from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from albumentations.augmentations.crops import functional as fcrops
from albumentations.augmentations.crops.transforms import BaseCrop
from pydantic import Field

__all__ = ["ClassAwareRandomCrop", "dominant_class_share"]


def dominant_class_share(mask: np.ndarray, ignore_index: int) -> tuple[float, int]:
    """``(largest class pixel count / valid pixel count, number of classes present)`` of a label crop, ignore
    pixels excluded. An all-ignored crop gives ``(1.0, 0)``."""
    valid = mask[mask != ignore_index]
    if valid.size == 0:
        return 1.0, 0
    counts = np.bincount(valid.ravel().astype(np.int64))
    return float(counts.max()) / float(valid.size), int(np.count_nonzero(counts))


class ClassAwareRandomCrop(BaseCrop):
    """Random ``height x width`` crop that retries crops in which one class covers too much of the valid pixels.

    Up to ``max_tries`` uniformly random crop positions are drawn; the first whose mask has more than one class and a
    dominant class share (largest class pixels / non-ignored pixels) below ``cat_max_ratio`` is taken. If none
    qualifies, the try with the smallest dominant share is taken (MMSegmentation takes the last one; taking the best
    costs nothing and helps more). ``cat_max_ratio >= 1`` or ``max_tries == 1`` is a plain ``RandomCrop``.

    The input must be at least ``height x width`` (put ``PadIfNeeded`` with ``fill_mask=ignore_index`` before it);
    its randomness is the pipeline's python generator (``self.py_random``, see ``data.base.seed_pipeline``).
    Without a ``mask`` target it behaves as ``RandomCrop``.

    Targets: image, mask, masks, bboxes, keypoints (all cropped alike).
    """

    class InitSchema(BaseCrop.InitSchema):
        height: Annotated[int, Field(ge=1)]
        width: Annotated[int, Field(ge=1)]
        cat_max_ratio: Annotated[float, Field(gt=0)]
        ignore_index: int
        max_tries: Annotated[int, Field(ge=1)]

    def __init__(
        self,
        height: int,
        width: int,
        cat_max_ratio: float = 0.75,
        ignore_index: int = 255,
        max_tries: int = 10,
        p: float = 1.0,
    ):
        super().__init__(p=p)
        self.height = height
        self.width = width
        self.cat_max_ratio = cat_max_ratio
        self.ignore_index = ignore_index
        self.max_tries = max_tries

    def _random_coords(self, image_shape: tuple[int, int]) -> tuple[int, int, int, int]:
        return fcrops.get_crop_coords(image_shape, (self.height, self.width), self.py_random.random(),
                                      self.py_random.random())

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        image_shape = params["shape"][:2]
        if self.height > image_shape[0] or self.width > image_shape[1]:
            raise ValueError(
                f"ClassAwareRandomCrop: crop {self.height}x{self.width} (HxW) is larger than the input "
                f"{image_shape[0]}x{image_shape[1]}; put PadIfNeeded(min_height={self.height}, min_width={self.width}, "
                f"fill_mask=ignore_index) before it."
            )
        mask = data.get("mask")
        if mask is None and data.get("masks") is not None and len(data["masks"]):
            mask = data["masks"][0]
        coords = self._random_coords(image_shape)
        if mask is None or self.cat_max_ratio >= 1.0:
            return {"crop_coords": coords}
        best_coords, best_share = coords, float("inf")
        for attempt in range(self.max_tries):
            if attempt:
                coords = self._random_coords(image_shape)
            x_min, y_min, x_max, y_max = coords
            share, present = dominant_class_share(np.asarray(mask)[y_min:y_max, x_min:x_max], self.ignore_index)
            if present > 1 and share < self.cat_max_ratio:
                return {"crop_coords": coords}
            if share < best_share:
                best_coords, best_share = coords, share
        return {"crop_coords": best_coords}

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("height", "width", "cat_max_ratio", "ignore_index", "max_tries")
