"""Pascal VOC 2012 segmentation (``dataset=voc``), optionally with the SBD-augmented training set (``aug: true``).

Layout under ``VOCdevkit/VOC2012``: ``JPEGImages/<id>.jpg``, ``SegmentationClass/<id>.png`` (palette PNGs, stored
index = class), ``SegmentationClassAug/<id>.png`` (aug: grayscale index PNGs), ``ImageSets/Segmentation/
{train,val,train_aug}.txt`` (one id per line). ``root`` may be the parent of ``VOCdevkit``, ``VOCdevkit`` or
``VOC2012``: the first of ``root/VOCdevkit/VOC2012``, ``root/VOC2012``, ``root`` that exists is used.

Labels: 21 classes (0 = background), 255 ("boundary/difficult") is ``ignore_index``; masks are read as stored
indices, never through the palette colours. Other values pass through unchanged, so the class-statistics pass
reports them with the file name. A missing folder raises ``DatasetError`` naming it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from train_seg.data._io import (
    PairedFileSource,
    apply_lookup,
    check_split,
    label_dtype,
    lookup_table,
    read_index_mask,
    read_list_file,
    require_dir,
)
from train_seg.data.base import DatasetError

VOC_CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]

#: Raw mask value of object boundaries and "difficult" regions in VOC (and SBD-aug) masks.
VOC_BOUNDARY = 255


def voc_colormap(size: int = 256) -> list[tuple[int, int, int]]:
    """The official VOC colour map (VOCdevkit ``VOClabelcolormap.m``): the bits of the index spread over the high
    bits of r, g, b. Entry 0 is black, 1 is (128, 0, 0), ..., 255 (boundary) is (224, 224, 192)."""
    colours = []
    for index in range(size):
        r = g = b = 0
        value = index
        for shift in range(7, -1, -1):
            r |= ((value >> 0) & 1) << shift
            g |= ((value >> 1) & 1) << shift
            b |= ((value >> 2) & 1) << shift
            value >>= 3
        colours.append((r, g, b))
    return colours


VOC_PALETTE = voc_colormap(len(VOC_CLASSES))

_LAYOUT = ("VOCdevkit/VOC2012/{JPEGImages/*.jpg, SegmentationClass/*.png, ImageSets/Segmentation/{train,val}.txt} "
           "(and SegmentationClassAug/*.png, ImageSets/Segmentation/train_aug.txt with aug: true)")


def resolve_voc_root(root: str | Path) -> Path:
    """The ``VOC2012`` folder for a root given as the parent of ``VOCdevkit``, ``VOCdevkit`` or ``VOC2012``."""
    given = Path(root).expanduser()
    if not given.is_dir():
        raise DatasetError(f"voc: dataset.root {given} does not exist or is not a folder. Expected layout: {_LAYOUT}.")
    candidates = [given / "VOCdevkit" / "VOC2012", given / "VOC2012", given]
    for candidate in candidates[:2]:
        if candidate.is_dir():
            return candidate.resolve()
    if (given / "JPEGImages").is_dir() or (given / "ImageSets").is_dir() or given.name == "VOC2012":
        return given.resolve()
    raise DatasetError(
        f"voc: no VOC2012 folder under dataset.root {given}: tried {candidates[0]}, {candidates[1]} and {given} "
        f"itself (which has no JPEGImages/). Point dataset.root at the folder that contains VOCdevkit, at VOCdevkit or "
        f"at VOC2012. Expected layout: {_LAYOUT}."
    )


class VOCSegmentation(PairedFileSource):
    """One split of Pascal VOC 2012 (see the module docstring for the layout and root rules).

    Args:
        split: "train" or "val".
        root: parent of ``VOCdevkit``, ``VOCdevkit`` or ``VOC2012``.
        ignore_index: training label of the 255 boundary pixels.
        aug: train on SBD-augmented ``train_aug.txt`` (10,582 images) with masks from ``SegmentationClassAug``;
            the val split stays the official ``val.txt`` with ``SegmentationClass`` masks.
    """

    dataset_name = "voc"

    def __init__(self, split: str, root: str, ignore_index: int = 255, aug: bool = False):
        check_split("voc", split)
        self.split = split
        self.aug = bool(aug)
        self.ignore_index = int(ignore_index)
        self.class_names = list(VOC_CLASSES)
        self.palette = list(VOC_PALETTE)
        self.root = resolve_voc_root(root)

        use_aug = self.aug and split == "train"
        list_name = "train_aug.txt" if use_aug else f"{split}.txt"
        mask_folder = "SegmentationClassAug" if use_aug else "SegmentationClass"
        hint = ("SegmentationClassAug and train_aug.txt come from the SBD-augmented set (e.g. the "
                "'SegmentationClassAug' archive used by DeepLab); set aug: false to train on the 1,464 official images."
                if use_aug else "")
        image_dir = require_dir(self.root / "JPEGImages", "voc", _LAYOUT)
        mask_dir = require_dir(self.root / mask_folder, "voc", _LAYOUT, hint)
        sets_dir = require_dir(self.root / "ImageSets" / "Segmentation", "voc", _LAYOUT)
        self.list_file = sets_dir / list_name
        if not self.list_file.is_file():
            raise DatasetError(
                f"voc: split file {self.list_file} not found for the {split} split. Expected layout: {_LAYOUT}. {hint}"
            )
        ids = read_list_file(self.list_file, "voc")
        self.pairs = _pair_by_id(ids, image_dir, ".jpg", mask_dir, ".png", self.list_file)

        dtype = label_dtype(len(VOC_CLASSES), self.ignore_index)
        self._lut = lookup_table({VOC_BOUNDARY: self.ignore_index}, "identity", dtype)

    def _read_mask(self, path: Path) -> np.ndarray:
        return apply_lookup(read_index_mask(path), self._lut, path)

    def _identity_options(self) -> dict[str, object]:
        return {"aug": self.aug, "list": str(self.list_file)}

    def validate(self) -> None:
        """Sizes/readability of every pair, and (aug) that train_aug.txt shares no image with val.txt."""
        super().validate()
        val_file = self.list_file.with_name("val.txt")
        if self.aug and self.split == "train" and val_file.is_file():
            val_ids = set(read_list_file(val_file, "voc"))
            leaked = sorted(val_ids.intersection(p[0].stem for p in self.pairs))
            if leaked:
                raise DatasetError(
                    f"voc: {len(leaked)} images of {self.list_file} are also in {val_file} (e.g. {leaked[:5]}): the "
                    f"model would be evaluated on training images. Use a train_aug.txt that excludes the VOC 2012 "
                    f"val set (the usual one has 10,582 ids)."
                )


def _pair_by_id(ids: list[str], image_dir: Path, image_ext: str, mask_dir: Path, mask_ext: str,
                list_file: Path) -> list[tuple[Path, Path]]:
    """(image, mask) paths of each id; every missing file is reported at once (first few listed)."""
    image_names = {p.name for p in image_dir.iterdir()}
    mask_names = {p.name for p in mask_dir.iterdir()}
    no_image = [i for i in ids if i + image_ext not in image_names]
    no_mask = [i for i in ids if i + image_ext in image_names and i + mask_ext not in mask_names]
    if no_image:
        raise DatasetError(
            f"voc: {len(no_image)} ids of {list_file} have no image {image_dir}/<id>{image_ext} "
            f"(first: {image_dir / (no_image[0] + image_ext)}; ids {no_image[:5]}). Check that JPEGImages is complete "
            f"and that the split file belongs to this dataset."
        )
    if no_mask:
        raise DatasetError(
            f"voc: {len(no_mask)} images listed in {list_file} have no mask in {mask_dir} (first: image "
            f"{image_dir / (no_mask[0] + image_ext)} expects {mask_dir / (no_mask[0] + mask_ext)}; ids {no_mask[:5]}). "
            f"Restore the masks or remove these ids from the split file."
        )
    return [(image_dir / (i + image_ext), mask_dir / (i + mask_ext)) for i in ids]
