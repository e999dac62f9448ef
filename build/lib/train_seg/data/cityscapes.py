"""Cityscapes fine annotations (``dataset=cityscapes``) in the 19-class training label space.

Layout (``leftImg8bit_trainvaltest.zip`` + ``gtFine_trainvaltest.zip`` extracted into one folder = ``root``)::

    leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png

The ``labelIds`` (0..33) are mapped to the 19 train IDs of the official table (cityscapesScripts ``labels.py``,
as shipped in ``torchvision.datasets.Cityscapes.classes``) with one 256-entry lookup table; every other id (void,
parking, rail track, guard rail, bridge, tunnel, polegroup, caravan, trailer, license plate, and any value above
33) becomes ``ignore_index``. The ``_gtFine_labelTrainIds.png`` files written by cityscapesScripts are not needed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from torchvision.datasets import Cityscapes as _TorchvisionCityscapes

from train_seg.data._io import (
    PairedFileSource,
    apply_lookup,
    check_split,
    label_dtype,
    lookup_table,
    read_index_mask,
    require_dir,
)
from train_seg.data.base import DatasetError

_OFFICIAL = [c for c in _TorchvisionCityscapes.classes if 0 <= c.train_id < 255]
#: The 19 evaluated classes, in train-ID order (road=0 ... bicycle=18).
CITYSCAPES_CLASSES = [c.name for c in sorted(_OFFICIAL, key=lambda c: c.train_id)]
CITYSCAPES_PALETTE = [tuple(c.color) for c in sorted(_OFFICIAL, key=lambda c: c.train_id)]
#: labelId -> train ID for the 19 evaluated classes (every other labelId is ignored).
LABEL_ID_TO_TRAIN_ID = {c.id: c.train_id for c in _OFFICIAL}

_IMAGE_SUFFIX = "_leftImg8bit.png"
_MASK_SUFFIX = "_gtFine_labelIds.png"
_LAYOUT = ("<root>/leftImg8bit/{train,val}/<city>/*_leftImg8bit.png and "
           "<root>/gtFine/{train,val}/<city>/*_gtFine_labelIds.png")


class CityscapesSegmentation(PairedFileSource):
    """One split of Cityscapes gtFine.

    Args:
        split: "train" or "val".
        root: the folder holding ``leftImg8bit/`` and ``gtFine/``.
        ignore_index: training label of every labelId outside the 19 evaluated classes.
        cities: optional list of city folder names to keep (e.g. ``[aachen]`` for a quick run); null = all.
    """

    dataset_name = "cityscapes"

    def __init__(self, split: str, root: str, ignore_index: int = 255, cities: Sequence[str] | None = None):
        check_split("cityscapes", split)
        self.split = split
        self.ignore_index = int(ignore_index)
        self.class_names = list(CITYSCAPES_CLASSES)
        self.palette = list(CITYSCAPES_PALETTE)
        given = Path(root).expanduser()
        if not given.is_dir():
            raise DatasetError(
                f"cityscapes: dataset.root {given} does not exist or is not a folder. Expected layout: {_LAYOUT}."
            )
        self.root = given.resolve()
        image_split = require_dir(self.root / "leftImg8bit" / split, "cityscapes", _LAYOUT,
                                  "Extract leftImg8bit_trainvaltest.zip into dataset.root.")
        mask_split = require_dir(self.root / "gtFine" / split, "cityscapes", _LAYOUT,
                                 "Extract gtFine_trainvaltest.zip into dataset.root.")
        city_dirs = sorted(p for p in image_split.iterdir() if p.is_dir())
        self.cities = None if cities is None else [str(c) for c in cities]
        if self.cities is not None:
            unknown = sorted(set(self.cities) - {p.name for p in city_dirs})
            if unknown:
                raise DatasetError(
                    f"cityscapes: dataset.cities lists {unknown}, which are not folders of {image_split} "
                    f"(available: {[p.name for p in city_dirs]})."
                )
            city_dirs = [p for p in city_dirs if p.name in self.cities]

        self.pairs = []
        missing = []
        for city_dir in city_dirs:
            mask_city = mask_split / city_dir.name
            mask_names = {p.name for p in mask_city.iterdir()} if mask_city.is_dir() else set()
            for image_path in sorted(city_dir.glob("*" + _IMAGE_SUFFIX)):
                mask_name = image_path.name[: -len(_IMAGE_SUFFIX)] + _MASK_SUFFIX
                if mask_name not in mask_names:
                    missing.append((image_path, mask_city / mask_name))
                self.pairs.append((image_path, mask_city / mask_name))
        if missing:
            examples = "; ".join(f"image {i} expects {m}" for i, m in missing[:5])
            raise DatasetError(
                f"cityscapes: {len(missing)} images of the {split} split have no mask ({examples}). Expected layout: "
                f"{_LAYOUT}. Extract gtFine_trainvaltest.zip completely into {self.root}."
            )
        if not self.pairs:
            raise DatasetError(
                f"cityscapes: no *{_IMAGE_SUFFIX} file in {image_split}/<city>/ (the {split} split is empty). "
                f"Expected layout: {_LAYOUT}."
            )
        dtype = label_dtype(len(self.class_names), self.ignore_index)
        self._lut = lookup_table(LABEL_ID_TO_TRAIN_ID, self.ignore_index, dtype)

    def _read_mask(self, path: Path) -> np.ndarray:
        return apply_lookup(read_index_mask(path), self._lut, path)

    def _identity_options(self) -> dict[str, object]:
        return {"cities": self.cities, "mapping": "labelIds->trainIds"}
