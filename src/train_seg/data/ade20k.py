"""ADE20K SceneParsing / ADEChallengeData2016 (``dataset=ade20k``): 150 classes.

Layout: ``ADEChallengeData2016/images/{training,validation}/ADE_{train,val}_<n>.jpg`` and
``ADEChallengeData2016/annotations/{training,validation}/ADE_{train,val}_<n>.png`` (grayscale, 0 = other,
1..150); ``root`` may be ``ADEChallengeData2016`` or its parent. Split "train" reads ``training``, "val"
``validation``.

Labels: with ``reduce_zero_label: true`` (default) raw 0 becomes ``ignore_index`` and 1..150 become 0..149; with
``false`` the raw values are the labels (151 classes, "other" = 0). Raw values above 150 pass through unchanged, so
the class-statistics pass reports them as invalid with the file name. Class names: ``objectInfo150``'s short
names; palette: MMSegmentation's ADE20K palette (display only: it repeats a colour for "road" and "skyscraper").
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from train_seg.data._io import (
    PairedFileSource,
    apply_lookup,
    check_split,
    label_dtype,
    list_images,
    lookup_table,
    read_index_mask,
    require_dir,
)
from train_seg.data.base import DatasetError

ADE20K_CLASSES = [
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair",
    "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion",
    "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace",
    "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway",
    "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine",
    "hovel",
    "bus", "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet",
    "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool",
    "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball",
    "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher",
    "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan",
    "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
]

ADE20K_PALETTE = [
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3), (120, 120, 80), (140, 140, 140),
    (204, 5, 255), (230, 230, 230), (4, 250, 7), (224, 5, 255), (235, 255, 7), (150, 5, 61), (120, 120, 70),
    (8, 255, 51), (255, 6, 82), (143, 255, 140), (204, 255, 4), (255, 51, 7), (204, 70, 3), (0, 102, 200),
    (61, 230, 250), (255, 6, 51), (11, 102, 255), (255, 7, 71), (255, 9, 224), (9, 7, 230), (220, 220, 220),
    (255, 9, 92), (112, 9, 255), (8, 255, 214), (7, 255, 224), (255, 184, 6), (10, 255, 71), (255, 41, 10),
    (7, 255, 255), (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7), (255, 122, 8), (0, 255, 20),
    (255, 8, 41), (255, 5, 153), (6, 51, 255), (235, 12, 255), (160, 150, 20), (0, 163, 255), (140, 140, 140),
    (250, 10, 15), (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0), (153, 255, 0), (0, 0, 255),
    (255, 71, 0), (0, 235, 255), (0, 173, 255), (31, 0, 255), (11, 200, 200), (255, 82, 0), (0, 255, 245),
    (0, 61, 255), (0, 255, 112), (0, 255, 133), (255, 0, 0), (255, 163, 0), (255, 102, 0), (194, 255, 0),
    (0, 143, 255), (51, 255, 0), (0, 82, 255), (0, 255, 41), (0, 255, 173), (10, 0, 255), (173, 255, 0),
    (0, 255, 153), (255, 92, 0), (255, 0, 255), (255, 0, 245), (255, 0, 102), (255, 173, 0), (255, 0, 20),
    (255, 184, 184), (0, 31, 255), (0, 255, 61), (0, 71, 255), (255, 0, 204), (0, 255, 194), (0, 255, 82),
    (0, 10, 255), (0, 112, 255), (51, 0, 255), (0, 194, 255), (0, 122, 255), (0, 255, 163), (255, 153, 0),
    (0, 255, 10), (255, 112, 0), (143, 255, 0), (82, 0, 255), (163, 255, 0), (255, 235, 0), (8, 184, 170),
    (133, 0, 255), (0, 255, 92), (184, 0, 255), (255, 0, 31), (0, 184, 255), (0, 214, 255), (255, 0, 112),
    (92, 255, 0), (0, 224, 255), (112, 224, 255), (70, 184, 160), (163, 0, 255), (153, 0, 255), (71, 255, 0),
    (255, 0, 163), (255, 204, 0), (255, 0, 143), (0, 255, 235), (133, 255, 0), (255, 0, 235), (245, 0, 255),
    (255, 0, 122), (255, 245, 0), (10, 190, 212), (214, 255, 0), (0, 204, 255), (20, 0, 255), (255, 255, 0),
    (0, 153, 255), (0, 41, 255), (0, 255, 204), (41, 0, 255), (41, 255, 0), (173, 0, 255), (0, 245, 255),
    (71, 0, 255), (122, 0, 255), (0, 255, 184), (0, 92, 255), (184, 255, 0), (0, 133, 255), (255, 214, 0),
    (25, 194, 194), (102, 255, 0), (92, 0, 255),
]

#: Raw annotation value of "other objects" (not one of the 150 classes).
ADE20K_OTHER = 0

_SPLIT_FOLDERS = {"train": "training", "val": "validation"}
_LAYOUT = ("ADEChallengeData2016/images/{training,validation}/*.jpg and "
           "ADEChallengeData2016/annotations/{training,validation}/*.png")


def resolve_ade_root(root: str | Path) -> Path:
    """The ``ADEChallengeData2016`` folder for a root given as that folder or its parent."""
    given = Path(root).expanduser()
    if not given.is_dir():
        raise DatasetError(
            f"ade20k: dataset.root {given} does not exist or is not a folder. Expected layout: {_LAYOUT}."
        )
    nested = given / "ADEChallengeData2016"
    if nested.is_dir():
        return nested.resolve()
    if (given / "images").is_dir() or (given / "annotations").is_dir() or given.name == "ADEChallengeData2016":
        return given.resolve()
    raise DatasetError(
        f"ade20k: neither {nested} nor {given}/images exists. Point dataset.root at ADEChallengeData2016 or at the "
        f"folder that contains it. Expected layout: {_LAYOUT}."
    )


class ADE20KSegmentation(PairedFileSource):
    """One split of ADEChallengeData2016 (see the module docstring).

    Args:
        split: "train" (``training``) or "val" (``validation``).
        root: ``ADEChallengeData2016`` or its parent.
        ignore_index: training label of raw 0 ("other") when ``reduce_zero_label``.
        reduce_zero_label: 150 classes with "other" ignored (default, the benchmark); false = 151 classes with
            "other" as class 0.
    """

    dataset_name = "ade20k"

    def __init__(self, split: str, root: str, ignore_index: int = 255, reduce_zero_label: bool = True):
        check_split("ade20k", split)
        self.split = split
        self.ignore_index = int(ignore_index)
        self.reduce_zero_label = bool(reduce_zero_label)
        if self.reduce_zero_label:
            self.class_names = list(ADE20K_CLASSES)
            self.palette = list(ADE20K_PALETTE)
        else:
            self.class_names = ["other"] + list(ADE20K_CLASSES)
            self.palette = [(0, 0, 0)] + list(ADE20K_PALETTE)
        self.root = resolve_ade_root(root)
        folder = _SPLIT_FOLDERS[split]
        image_dir = require_dir(self.root / "images" / folder, "ade20k", _LAYOUT)
        mask_dir = require_dir(self.root / "annotations" / folder, "ade20k", _LAYOUT)
        images = list_images(image_dir, (".jpg", ".jpeg", ".png"))
        if not images:
            raise DatasetError(
                f"ade20k: no .jpg image in {image_dir} (the {split} split is empty). Expected layout: {_LAYOUT}."
            )
        mask_names = {p.name for p in mask_dir.iterdir()}
        missing = [p for p in images if p.stem + ".png" not in mask_names]
        if missing:
            examples = "; ".join(f"image {p} expects {mask_dir / (p.stem + '.png')}" for p in missing[:5])
            raise DatasetError(
                f"ade20k: {len(missing)} images of the {split} split have no annotation ({examples}). Every "
                f"images/{folder}/<name>.jpg needs annotations/{folder}/<name>.png; re-extract "
                f"ADEChallengeData2016.zip."
            )
        self.pairs = [(p, mask_dir / (p.stem + ".png")) for p in images]

        dtype = label_dtype(len(self.class_names), self.ignore_index)
        if self.reduce_zero_label:
            mapping = {ADE20K_OTHER: self.ignore_index, **{raw: raw - 1 for raw in range(1, len(ADE20K_CLASSES) + 1)}}
        else:
            mapping = {}
        self._lut = lookup_table(mapping, "identity", dtype)

    def _read_mask(self, path: Path) -> np.ndarray:
        return apply_lookup(read_index_mask(path), self._lut, path)

    def _identity_options(self) -> dict[str, object]:
        return {"reduce_zero_label": self.reduce_zero_label}
