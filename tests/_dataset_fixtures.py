"""Tiny on-disk fixtures in the real layouts of VOC, Cityscapes, ADE20K and the folder dataset, with the expected
training-label masks written out by hand, plus an independent per-class pixel count (``hand_class_counts``) for
asserting class statistics against.

Every ``write_*`` returns a ``Fixture``: ``root`` (what goes to ``dataset.root``), ``items[split]`` (in the order
the loader must return them: ``(image_path, mask_path, expected_mask)``), ``class_names``. Images are 24x32 (HxW).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

H, W = 24, 32
IGNORE = 255

VOC_NAMES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
             "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor"]
FOLDER_CLASSES = ["background", "scratch", "dent"]
FOLDER_PALETTE = [[0, 0, 0], [255, 0, 0], [0, 0, 255]]
FOLDER_IGNORE_COLOR = [255, 255, 255]


@dataclass
class Fixture:
    root: Path
    class_names: list[str]
    items: dict[str, list[tuple[Path, Path, np.ndarray]]] = field(default_factory=dict)

    def expected(self, split: str) -> list[np.ndarray]:
        return [item[2] for item in self.items[split]]


def hand_class_counts(masks: list[np.ndarray], num_classes: int, ignore_index: int = IGNORE) -> np.ndarray:
    """Pixels per class over ``masks`` (training labels), ignore pixels excluded: a plain loop over classes,
    independent of ``train_seg.data.class_stats``."""
    counts = np.zeros(num_classes, dtype=np.int64)
    for mask in masks:
        for label in range(num_classes):
            counts[label] += int((mask == label).sum())
    assert all(int(((m != ignore_index) & (m >= num_classes)).sum()) == 0 for m in masks)
    return counts


def hand_image_counts(masks: list[np.ndarray], num_classes: int) -> np.ndarray:
    """Images containing each class (ignore excluded)."""
    return np.array([sum(bool((m == c).any()) for m in masks) for c in range(num_classes)], dtype=np.int64)


# ---------------------------------------------------------------------------------------------------- writers
def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(H, W, 3), dtype=np.uint8)


def write_rgb(path: Path, seed: int, size: tuple[int, int] = (H, W)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, **({"quality": 95} if path.suffix.lower() in (".jpg", ".jpeg") else {}))


def write_index_png(path: Path, mask: np.ndarray, palette: list[int] | None = None) -> None:
    """Index PNG: palette ("P") mode when ``palette`` (flat list of 768 ints) is given, else grayscale ("L")."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if palette is not None:
        img = Image.fromarray(mask.astype(np.uint8), mode="P")
        img.putpalette(palette)
    else:
        img = Image.fromarray(mask.astype(np.uint8), mode="L")
    img.save(path)


def touch_later(path: Path) -> None:
    """Move the mtime forward so content identities change even on coarse-mtime filesystems."""
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _rect(mask: np.ndarray, y0: int, y1: int, x0: int, x1: int, value: int, border: int | None = None) -> None:
    """Fill a rectangle with ``value``; with ``border`` also draw a 1-px frame around it (VOC outlines)."""
    if border is not None:
        mask[max(y0 - 1, 0):y1 + 1, max(x0 - 1, 0):x1 + 1] = border
    mask[y0:y1, x0:x1] = value


# ---------------------------------------------------------------------------------------------------- VOC
def _voc_palette_flat() -> list[int]:
    from train_seg.data.voc import voc_colormap

    return [v for colour in voc_colormap(256) for v in colour]


def voc_raw_masks() -> dict[str, np.ndarray]:
    """Raw VOC masks (values = stored indices, 255 = boundary) by image id."""
    a = np.zeros((H, W), np.uint8)
    _rect(a, 4, 12, 4, 14, 15, border=255)      # person with outline
    _rect(a, 16, 20, 20, 30, 1, border=255)     # aeroplane with outline
    b = np.zeros((H, W), np.uint8)
    _rect(b, 2, 22, 2, 12, 12, border=255)      # dog
    c = np.zeros((H, W), np.uint8)
    _rect(c, 6, 18, 10, 26, 20, border=255)     # tvmonitor
    c[0, :] = 255                               # a whole boundary row
    d = np.zeros((H, W), np.uint8)
    _rect(d, 5, 15, 5, 25, 7)                   # car, no outline (SBD style)
    return {"2007_000032": a, "2007_000039": b, "2007_000063": c, "2008_000002": d}


def write_voc(base: Path, aug: bool = False) -> Fixture:
    """``base/VOCdevkit/VOC2012`` with train = [a, b], val = [c]; with ``aug`` also SegmentationClassAug (grayscale)
    and train_aug.txt = [a, b, d] (d only in the aug set). Returns the fixture of the non-aug layout unless ``aug``."""
    voc = base / "VOCdevkit" / "VOC2012"
    raw = voc_raw_masks()
    splits = {"train": ["2007_000032", "2007_000039"], "val": ["2007_000063"]}
    palette = _voc_palette_flat()
    for seed, image_id in enumerate(raw):
        write_rgb(voc / "JPEGImages" / f"{image_id}.jpg", seed)
        if image_id != "2008_000002":
            write_index_png(voc / "SegmentationClass" / f"{image_id}.png", raw[image_id], palette)
    sets = voc / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True, exist_ok=True)
    for split, ids in splits.items():
        (sets / f"{split}.txt").write_text("\n".join(ids) + "\n")
    fixture = Fixture(base, list(VOC_NAMES))
    if aug:
        aug_ids = ["2007_000032", "2007_000039", "2008_000002"]
        for image_id in aug_ids + splits["val"]:
            write_index_png(voc / "SegmentationClassAug" / f"{image_id}.png", raw[image_id])
        (sets / "train_aug.txt").write_text("\n".join(aug_ids) + "\n")
        splits = {**splits, "train": aug_ids}
    for split, ids in splits.items():
        mask_dir = "SegmentationClassAug" if aug and split == "train" else "SegmentationClass"
        # VOC labels are the stored indices; the 255 outline stays 255 (= ignore_index)
        fixture.items[split] = [(voc / "JPEGImages" / f"{i}.jpg", voc / mask_dir / f"{i}.png", raw[i].copy())
                                for i in ids]
    return fixture


# ---------------------------------------------------------------------------------------------------- Cityscapes
#: labelIds used by the fixture -> train IDs, written out by hand from the official table.
CITYSCAPES_HAND_MAP = {7: 0, 26: 13, 0: IGNORE, 11: 2, 23: 10, 4: IGNORE, 33: 18, 9: IGNORE, 24: 11, 1: IGNORE}


def _cityscapes_raw() -> dict[tuple[str, str, str], np.ndarray]:
    a = np.full((H, W), 7, np.uint8)            # road
    a[:8] = 11                                  # building
    _rect(a, 12, 18, 4, 12, 26)                 # car
    a[-2:] = 0                                  # unlabeled (ego-vehicle strip)
    b = np.full((H, W), 23, np.uint8)           # sky
    b[12:] = 9                                  # parking (not evaluated)
    _rect(b, 14, 20, 20, 28, 33)                # bicycle
    b[:, :2] = 4                                # static
    c = np.full((H, W), 7, np.uint8)            # road
    _rect(c, 4, 16, 8, 14, 24)                  # person
    c[-3:] = 1                                  # ego vehicle
    return {("train", "aachen", "aachen_000000_000019"): a, ("train", "bochum", "bochum_000000_000313"): b,
            ("val", "frankfurt", "frankfurt_000000_000294"): c}


def write_cityscapes(root: Path) -> Fixture:
    fixture = Fixture(root, [])
    for seed, ((split, city, stem), raw) in enumerate(sorted(_cityscapes_raw().items())):
        image = root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png"
        mask = root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png"
        write_rgb(image, seed)
        write_index_png(mask, raw)
        expected = np.vectorize(CITYSCAPES_HAND_MAP.__getitem__)(raw).astype(np.uint8)
        fixture.items.setdefault(split, []).append((image, mask, expected))
    return fixture


# ---------------------------------------------------------------------------------------------------- ADE20K
def _ade_raw() -> dict[tuple[str, str], np.ndarray]:
    a = np.ones((H, W), np.uint8)               # wall (1 -> 0)
    a[:6] = 3                                   # sky (3 -> 2)
    _rect(a, 10, 20, 4, 10, 150)                # flag (150 -> 149)
    a[:, -3:] = 0                               # other (ignored)
    b = np.full((H, W), 4, np.uint8)            # floor (4 -> 3)
    _rect(b, 2, 8, 2, 8, 13)                    # person (13 -> 12)
    c = np.zeros((H, W), np.uint8)              # all "other"
    _rect(c, 8, 16, 8, 24, 2)                   # building (2 -> 1)
    return {("training", "ADE_train_00000001"): a, ("training", "ADE_train_00000002"): b,
            ("validation", "ADE_val_00000001"): c}


def write_ade20k(base: Path) -> Fixture:
    """``base/ADEChallengeData2016/...``; expected labels: raw 0 -> 255, raw v -> v - 1."""
    ade = base / "ADEChallengeData2016"
    fixture = Fixture(base, [])
    for seed, ((folder, stem), raw) in enumerate(sorted(_ade_raw().items())):
        image, mask = ade / "images" / folder / f"{stem}.jpg", ade / "annotations" / folder / f"{stem}.png"
        write_rgb(image, seed)
        write_index_png(mask, raw)
        expected = np.where(raw == 0, IGNORE, raw.astype(np.int64) - 1).astype(np.uint8)
        fixture.items.setdefault("train" if folder == "training" else "val", []).append((image, mask, expected))
    return fixture


# ---------------------------------------------------------------------------------------------------- folder
def folder_label_masks(count: int = 5) -> dict[str, np.ndarray]:
    """Training-label masks (0 background, 1 scratch, 2 dent, 255 ignore) by stem."""
    masks = {}
    for k in range(count):
        m = np.zeros((H, W), np.uint8)
        _rect(m, 2 + k, 6 + k, 3, 3 + 2 * (k + 1), 1)        # scratch: a thin band
        if k % 2 == 0:
            _rect(m, 14, 20, 20 + k, 26 + k, 2)               # dent: a square in every other image
        if k == 1:
            m[-1, :] = IGNORE                                 # an unlabelled row
        masks[f"part_{k:02d}"] = m
    return masks


def _write_folder_mask(path: Path, labels: np.ndarray, mask_mode: str, palette_png: bool = False) -> None:
    if mask_mode == "index":
        write_index_png(path, labels, _voc_palette_flat() if palette_png else None)
        return
    colours = np.zeros((*labels.shape, 3), np.uint8)
    for label, colour in enumerate(FOLDER_PALETTE):
        colours[labels == label] = colour
    colours[labels == IGNORE] = FOLDER_IGNORE_COLOR
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(colours, mode="RGB").save(path)


def write_folder(root: Path, layout: str = "flat", mask_mode: str = "index", count: int = 5) -> Fixture:
    """``layout``: "flat" (images/, masks/, plus train.txt = first three stems reversed, val.txt = the rest),
    or "subfolders" (images/{train,val}, masks/{train,val}; val = the last two stems). Images are .jpg, masks .png
    (the second index mask is a palette "P" PNG: its stored indices are the labels)."""
    masks = folder_label_masks(count)
    stems = sorted(masks)
    fixture = Fixture(root, list(FOLDER_CLASSES))
    if layout == "flat":
        for seed, stem in enumerate(stems):
            _write_folder_mask(root / "masks" / f"{stem}.png", masks[stem], mask_mode, palette_png=seed == 1)
            write_rgb(root / "images" / f"{stem}.jpg", seed)
        train, val = stems[:3][::-1], stems[3:]
        (root / "train.txt").write_text("# training stems\n" + "\n".join(train) + "\n\n")
        (root / "val.txt").write_text("\n".join(val) + "\n")
        for split, split_stems in (("train", train), ("val", val)):
            fixture.items[split] = [(root / "images" / f"{s}.jpg", root / "masks" / f"{s}.png", masks[s])
                                    for s in split_stems]
    elif layout == "subfolders":
        for seed, stem in enumerate(stems):
            split = "val" if seed >= count - 2 else "train"
            _write_folder_mask(root / "masks" / split / f"{stem}.png", masks[stem], mask_mode, palette_png=seed == 1)
            write_rgb(root / "images" / split / f"{stem}.jpg", seed)
            fixture.items.setdefault(split, []).append(
                (root / "images" / split / f"{stem}.jpg", root / "masks" / split / f"{stem}.png", masks[stem]))
    else:
        raise ValueError(layout)
    return fixture
