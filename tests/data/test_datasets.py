"""Real-dataset loaders (VOC, Cityscapes, ADE20K, folder) on tiny fixtures in their real layouts, their yaml
augmentation pipelines, ClassAwareRandomCrop, and every dataset error a user can hit before training."""
from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # before albumentations is imported anywhere

import shutil
from pathlib import Path

import albumentations as A
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from _dataset_fixtures import (
    FOLDER_CLASSES,
    FOLDER_IGNORE_COLOR,
    FOLDER_PALETTE,
    H,
    IGNORE,
    W,
    hand_class_counts,
    hand_image_counts,
    touch_later,
    truncate,
    write_ade20k,
    write_cityscapes,
    write_folder,
    write_index_png,
    write_rgb,
    write_voc,
)
from train_seg.data.ade20k import ADE20K_CLASSES, ADE20K_PALETTE, ADE20KSegmentation
from train_seg.data.base import DatasetError, SegmentationDataset
from train_seg.data.cityscapes import CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, CityscapesSegmentation
from train_seg.data.folder import FolderSegmentation, ratio_split
from train_seg.data.class_stats import compute_class_stats
from train_seg.data.transforms import ClassAwareRandomCrop, dominant_class_share
from train_seg.data.voc import VOC_CLASSES, VOC_PALETTE, VOCSegmentation
from train_seg.engine.builder import build_transform

ROOT = Path(__file__).resolve().parents[2]
DATASET_CONFIGS = ROOT / "src" / "train_seg" / "configs" / "dataset"


def folder_source(split, root, **options):
    options.setdefault("classes", FOLDER_CLASSES)
    return FolderSegmentation(split, str(root), **options)


def assert_items(source, fixture, split):
    items = fixture.items[split]
    assert len(source) == len(items)
    for index, (image_path, mask_path, expected) in enumerate(items):
        image, mask = source.load_image(index), source.load_mask(index)
        assert image.shape == (H, W, 3) and image.dtype == np.uint8
        assert mask.shape == (H, W) and np.issubdtype(mask.dtype, np.integer)
        np.testing.assert_array_equal(mask, expected, err_msg=str(mask_path))
        assert str(mask_path) in source.describe(index) and str(image_path) in source.describe(index)


# ------------------------------------------------------------------------------------------------------ VOC
@pytest.mark.parametrize("root_level", ["parent", "VOCdevkit", "VOC2012"])
def test_voc_reads_stored_indices_and_accepts_three_roots(tmp_path, root_level):
    fixture = write_voc(tmp_path)
    root = {"parent": tmp_path, "VOCdevkit": tmp_path / "VOCdevkit",
            "VOC2012": tmp_path / "VOCdevkit" / "VOC2012"}[root_level]
    for split in ("train", "val"):
        source = VOCSegmentation(split, str(root))
        assert_items(source, fixture, split)
        source.validate()
    assert source.class_names == VOC_CLASSES and len(VOC_CLASSES) == 21 and source.ignore_index == 255
    assert source.palette[:3] == [(0, 0, 0), (128, 0, 0), (0, 128, 0)] and source.palette[15] == (192, 128, 128)
    assert len(VOC_PALETTE) == 21


def test_voc_aug_layout_and_custom_ignore_index(tmp_path):
    fixture = write_voc(tmp_path, aug=True)
    train = VOCSegmentation("train", str(tmp_path), aug=True)
    assert_items(train, fixture, "train")  # grayscale SegmentationClassAug masks, train_aug.txt (3 ids)
    train.validate()
    assert_items(VOCSegmentation("val", str(tmp_path), aug=True), fixture, "val")  # val stays val.txt
    relabelled = VOCSegmentation("val", str(tmp_path), ignore_index=250)
    expected = fixture.expected("val")[0]
    np.testing.assert_array_equal(relabelled.load_mask(0), np.where(expected == 255, 250, expected))


def test_voc_aug_list_sharing_val_images_is_refused(tmp_path):
    write_voc(tmp_path, aug=True)
    sets = tmp_path / "VOCdevkit/VOC2012/ImageSets/Segmentation"
    (sets / "train_aug.txt").write_text("2007_000032\n2007_000063\n")
    with pytest.raises(DatasetError, match="2007_000063.*evaluated on training images"):
        VOCSegmentation("train", str(tmp_path), aug=True).validate()


# ------------------------------------------------------------------------------------------------------ Cityscapes
def test_cityscapes_maps_label_ids_to_train_ids(tmp_path):
    fixture = write_cityscapes(tmp_path)
    for split in ("train", "val"):
        source = CityscapesSegmentation(split, str(tmp_path))
        assert_items(source, fixture, split)
        source.validate()
    assert CITYSCAPES_CLASSES[0] == "road" and CITYSCAPES_CLASSES[13] == "car" and len(CITYSCAPES_CLASSES) == 19
    assert CITYSCAPES_PALETTE[0] == (128, 64, 128) and CITYSCAPES_PALETTE[18] == (119, 11, 32)
    only_aachen = CityscapesSegmentation("train", str(tmp_path), cities=["aachen"])
    assert len(only_aachen) == 1 and "aachen" in only_aachen.describe(0)
    with pytest.raises(DatasetError, match="dataset.cities.*'berlin'"):
        CityscapesSegmentation("train", str(tmp_path), cities=["berlin"])


# ------------------------------------------------------------------------------------------------------ ADE20K
@pytest.mark.parametrize("nested", [True, False])
def test_ade20k_shifts_labels_and_ignores_other(tmp_path, nested):
    fixture = write_ade20k(tmp_path)
    root = tmp_path if nested else tmp_path / "ADEChallengeData2016"
    for split in ("train", "val"):
        source = ADE20KSegmentation(split, str(root))
        assert_items(source, fixture, split)
        source.validate()
    assert len(ADE20K_CLASSES) == len(set(ADE20K_CLASSES)) == len(ADE20K_PALETTE) == 150
    assert ADE20K_CLASSES[:5] == ["wall", "building", "sky", "floor", "tree"] and ADE20K_CLASSES[149] == "flag"
    with_other = ADE20KSegmentation("train", str(root), reduce_zero_label=False)
    assert with_other.num_classes == 151 and with_other.class_names[0] == "other"
    raw = np.asarray(Image.open(fixture.items["train"][0][1]))
    np.testing.assert_array_equal(with_other.load_mask(0), raw)


# ------------------------------------------------------------------------------------------------------ folder
@pytest.mark.parametrize("mask_mode", ["index", "rgb"])
def test_folder_split_files_in_listed_order(tmp_path, mask_mode):
    fixture = write_folder(tmp_path, "flat", mask_mode)
    options = dict(mask_mode=mask_mode, split_files={"train": "train.txt", "val": str(tmp_path / "val.txt")})
    if mask_mode == "rgb":
        options.update(palette=FOLDER_PALETTE, ignore_colors=[FOLDER_IGNORE_COLOR])
    for split in ("train", "val"):
        source = folder_source(split, tmp_path, **options)
        assert_items(source, fixture, split)
        source.validate()
    assert source.class_names == FOLDER_CLASSES


@pytest.mark.parametrize("mask_mode", ["index", "rgb"])
def test_folder_subfolders(tmp_path, mask_mode):
    fixture = write_folder(tmp_path, "subfolders", mask_mode)
    options = {"mask_mode": mask_mode}
    if mask_mode == "rgb":
        options.update(palette=FOLDER_PALETTE, ignore_colors=[FOLDER_IGNORE_COLOR])
    for split in ("train", "val"):
        assert_items(folder_source(split, tmp_path, val_ratio=0.5, **options), fixture, split)


def test_folder_ratio_split_is_deterministic_disjoint_and_covering(tmp_path):
    write_folder(tmp_path, "flat", count=10)
    splits = {s: folder_source(s, tmp_path, val_ratio=0.3, split_seed=7) for s in ("train", "val")}
    stems = {s: [image.stem for image, _ in src.pairs] for s, src in splits.items()}
    assert len(stems["val"]) == 3 and len(stems["train"]) == 7
    assert set(stems["val"]).isdisjoint(stems["train"])
    assert set(stems["val"]) | set(stems["train"]) == {f"part_{k:02d}" for k in range(10)}
    for image, mask in splits["val"].pairs:
        assert mask.stem == image.stem
    again = folder_source("val", tmp_path, val_ratio=0.3, split_seed=7)
    assert again.pairs == splits["val"].pairs and again.identity() == splits["val"].identity()
    all_stems = [f"part_{k:02d}" for k in range(10)]
    assert ratio_split(all_stems, 0.3, seed=8)["val"] != stems["val"]  # the seed matters (checked: deterministic)
    assert [len(ratio_split(["a", "b"], r, 0)["val"]) for r in (0.0, 0.01, 0.99, 1.0)] == [0, 1, 1, 2]


def test_folder_label_map_for_binary_0_255_masks(tmp_path):
    mask = np.zeros((H, W), np.uint8)
    mask[5:9, 5:9] = 255
    mask[0, 0] = 7
    write_index_png(tmp_path / "masks" / "a.png", mask)
    write_rgb(tmp_path / "images" / "a.jpg", 0)
    source = folder_source("train", tmp_path, classes=["ok", "defect"], val_ratio=0.0,
                           label_map={255: 1, 7: IGNORE})
    expected = np.where(mask == 255, 1, 0)
    expected[0, 0] = IGNORE
    np.testing.assert_array_equal(source.load_mask(0), expected)


# ------------------------------------------------------------------------------------------------------ identity
def _every_fixture(tmp_path):
    yield "voc", write_voc(tmp_path / "voc"), lambda s: VOCSegmentation(s, str(tmp_path / "voc"))
    yield "cityscapes", write_cityscapes(tmp_path / "cs"), lambda s: CityscapesSegmentation(s, str(tmp_path / "cs"))
    yield "ade20k", write_ade20k(tmp_path / "ade"), lambda s: ADE20KSegmentation(s, str(tmp_path / "ade"))
    yield "folder", write_folder(tmp_path / "folder"), lambda s: folder_source(
        s, tmp_path / "folder", split_files={"train": "train.txt", "val": "val.txt"})


def test_identity_changes_with_content_split_and_options(tmp_path):
    for name, fixture, make in _every_fixture(tmp_path):
        source = make("train")
        before = source.identity()
        assert before == make("train").identity(), name
        assert before != make("val").identity(), name
        assert f"root={source.root}" in before and "split=train" in before, name
        mask_path = fixture.items["train"][-1][1]
        mask = np.asarray(Image.open(mask_path)).copy()
        mask[0, 0] = mask[0, 0] ^ 1
        write_index_png(mask_path, mask)
        touch_later(mask_path)
        assert make("train").identity() != before, f"{name}: a rewritten mask must change the identity"
    voc_root = str(tmp_path / "voc")
    assert VOCSegmentation("val", voc_root).identity() != VOCSegmentation("val", voc_root, ignore_index=0).identity()


# ------------------------------------------------------------------------------------------------------ stats
def test_class_statistics_match_hand_counts(tmp_path):
    """The stats pass over each fixture's train split equals a hand count of the expected masks."""
    for name, fixture, make in _every_fixture(tmp_path):
        source = make("train")
        stats = compute_class_stats(source, cache_dir=None, progress=False)
        expected = fixture.expected("train")
        np.testing.assert_array_equal(stats.pixel_counts, hand_class_counts(expected, source.num_classes), name)
        np.testing.assert_array_equal(stats.image_counts, hand_image_counts(expected, source.num_classes), name)
        assert stats.ignored_pixels == sum(int((m == IGNORE).sum()) for m in expected), name


# ------------------------------------------------------------------------------------------------------ yaml transforms
def load_dataset_yaml(name: str, **overrides):
    """The dataset yaml composed under a ``dataset`` key so its own ``${dataset...}`` interpolations resolve."""
    cfg = OmegaConf.create({"dataset": OmegaConf.load(DATASET_CONFIGS / f"{name}.yaml")})
    for key, value in overrides.items():
        OmegaConf.update(cfg, f"dataset.{key}", value)
    return cfg


def compose_pipeline(cfg, split: str, seed: int = 0) -> A.Compose:
    """The pipeline the trainer builds for ``split``."""
    return build_transform(cfg.dataset, split, seed)


def _fixture_source(name, tmp_path, split):
    if name == "voc":
        write_voc(tmp_path)
        return VOCSegmentation(split, str(tmp_path))
    if name == "cityscapes":
        write_cityscapes(tmp_path)
        return CityscapesSegmentation(split, str(tmp_path))
    if name == "ade20k":
        write_ade20k(tmp_path)
        return ADE20KSegmentation(split, str(tmp_path))
    write_folder(tmp_path)
    return folder_source(split, tmp_path, split_files={"train": "train.txt", "val": "val.txt"})


YAMLS = ["voc", "cityscapes", "ade20k", "folder"]


@pytest.mark.parametrize("name", YAMLS)
def test_yaml_layout_and_comments(name):
    text = (DATASET_CONFIGS / f"{name}.yaml").read_text()
    cfg = OmegaConf.load(DATASET_CONFIGS / f"{name}.yaml")
    assert cfg.name == name and OmegaConf.is_missing(cfg, "root") and cfg.ignore_index == 255
    assert cfg._target_.startswith("train_seg.data.")
    assert set(cfg.transforms) >= {"train", "val", "crop_size", "val_height", "val_width"}
    lines = text.splitlines()
    for index, line in enumerate(lines):  # every top-level key is preceded by a comment line
        if line and not line.startswith((" ", "#")):
            assert lines[index - 1].startswith("#"), f"{name}.yaml: key {line.split(':')[0]} has no comment"


@pytest.mark.parametrize("name", YAMLS)
@pytest.mark.parametrize("sizes", ["default", "small"])
def test_yaml_pipelines_give_fixed_shapes_and_no_new_labels(tmp_path, name, sizes):
    small = {"transforms.crop_size": 16, "transforms.val_height": 16, "transforms.val_width": 24}
    cfg = load_dataset_yaml(name, **(small if sizes == "small" else {}))
    if sizes == "small" and "base_size" in cfg.dataset.transforms:
        OmegaConf.update(cfg, "dataset.transforms.base_size", 32)
    crop = cfg.dataset.transforms.crop_size
    val_hw = (cfg.dataset.transforms.val_height, cfg.dataset.transforms.val_width)
    for split, shape in (("train", (crop, crop)), ("val", val_hw)):
        source = _fixture_source(name, tmp_path / split, split)
        dataset = SegmentationDataset(source, compose_pipeline(cfg, split))
        allowed = set(range(source.num_classes)) | {IGNORE}
        for repeat in range(3 if split == "train" else 1):
            for index in range(len(dataset)):
                image, mask = dataset[index]
                assert image.dtype == torch.float32 and image.shape == (3, *shape), (name, split)
                assert mask.dtype == torch.int64 and mask.shape == shape, (name, split)
                values = set(mask.unique().tolist())
                assert values <= allowed and values - {IGNORE} <= set(np.unique(source.load_mask(index)).tolist())
                assert float(image.abs().max()) < 3  # ImageNet-normalised, not 0..255


def test_val_policy_pads_with_ignore_and_keeps_the_whole_image():
    cfg = load_dataset_yaml("voc", **{"transforms.val_height": 64, "transforms.val_width": 64})
    pipeline = compose_pipeline(cfg, "val")
    for h, w in ((24, 32), (40, 17), (200, 333), (64, 64)):
        mask = np.full((h, w), 3, np.uint8)
        out = pipeline(image=np.zeros((h, w, 3), np.uint8), mask=mask)
        assert tuple(out["image"].shape) == (3, 64, 64) and tuple(out["mask"].shape) == (64, 64)
        kept = int((out["mask"] == 3).sum())
        scale = min(64 / h, 64 / w)
        assert abs(kept - round(h * scale) * round(w * scale)) <= 64 + 64  # the whole image survives, rescaled
        assert set(out["mask"].unique().tolist()) <= {3, IGNORE}


def test_train_random_scale_covers_half_to_double():
    cfg = load_dataset_yaml("voc")
    scale = instantiate(cfg.dataset.transforms.train[0])
    assert isinstance(scale, A.RandomScale) and scale.mask_interpolation == 0  # nearest for masks
    scale.set_random_seed(0)
    factors = [scale.get_params()["scale"] for _ in range(2000)]  # scale_limit is biased by +1 when sampled
    assert 0.5 <= min(factors) < 0.52 and 1.98 < max(factors) <= 2.0


# ------------------------------------------------------------------------------------------------ class-aware crop
def _crafted_mask(size: int = 64) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)           # background dominates
    mask[40:56, 8:24] = 1                             # one rare square
    mask[4:10, 44:60] = 2                             # a rare band
    mask[:, :2] = IGNORE
    return mask


def test_class_aware_crop_reduces_the_dominant_class_share():
    mask, image = _crafted_mask(), np.zeros((64, 64, 3), np.uint8)
    shares = {}
    for name, crop in (("plain", A.RandomCrop(16, 16)),
                       ("aware", ClassAwareRandomCrop(16, 16, cat_max_ratio=0.75, ignore_index=IGNORE))):
        pipeline = A.Compose([crop], seed=123)
        shares[name] = np.mean([dominant_class_share(pipeline(image=image, mask=mask)["mask"], IGNORE)[0]
                                for _ in range(200)])
    assert shares["aware"] < shares["plain"] - 0.15, shares


def test_class_aware_crop_semantics():
    image = np.arange(32 * 32 * 3, dtype=np.uint8).reshape(32, 32, 3)
    mask = np.zeros((32, 32), np.uint8)
    mask[:, 16:] = IGNORE                          # right half ignored
    mask[:, 14:16] = 1                             # two columns of class 1 next to it
    crop = A.Compose([ClassAwareRandomCrop(8, 8, cat_max_ratio=0.75, ignore_index=IGNORE, max_tries=50)], seed=0)
    for _ in range(20):
        out = crop(image=image, mask=mask)
        share, present = dominant_class_share(out["mask"], IGNORE)
        assert out["image"].shape == (8, 8, 3) and out["mask"].shape == (8, 8)
        assert present > 1 and share < 0.75        # ignore pixels do not count in the share
        y, x = np.argwhere(np.all(image == out["image"][0, 0], axis=-1))[0]
        np.testing.assert_array_equal(out["mask"], mask[y:y + 8, x:x + 8])  # image and mask cropped alike
    assert dominant_class_share(np.full((4, 4), IGNORE), IGNORE) == (1.0, 0)
    with pytest.raises(ValueError, match="PadIfNeeded"):
        A.Compose([ClassAwareRandomCrop(64, 64)])(image=image, mask=mask)
    runs = [A.Compose([ClassAwareRandomCrop(8, 8)], seed=5)(image=image, mask=mask)["mask"] for _ in range(2)]
    np.testing.assert_array_equal(*runs)            # reproducible from the Compose seed


# ------------------------------------------------------------------------------------------------------ errors
def test_error_missing_root_names_the_path_and_layout(tmp_path):
    missing = tmp_path / "nowhere"
    for make in (lambda: VOCSegmentation("train", str(missing)), lambda: CityscapesSegmentation("train", str(missing)),
                 lambda: ADE20KSegmentation("train", str(missing)), lambda: folder_source("train", missing)):
        with pytest.raises(DatasetError, match="nowhere.*(does not exist|Expected layout)"):
            make()
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"no VOC2012 folder.*VOCdevkit"):
        VOCSegmentation("train", str(tmp_path / "empty"))


def test_error_missing_subfolder_is_named(tmp_path):
    write_voc(tmp_path / "voc")
    shutil.rmtree(tmp_path / "voc/VOCdevkit/VOC2012/SegmentationClass")
    with pytest.raises(DatasetError, match=r"SegmentationClass not found. Expected layout"):
        VOCSegmentation("train", str(tmp_path / "voc"))
    write_voc(tmp_path / "voc_noaug")
    with pytest.raises(DatasetError, match=r"SegmentationClassAug not found.*SBD"):
        VOCSegmentation("train", str(tmp_path / "voc_noaug"), aug=True)
    write_cityscapes(tmp_path / "cs")
    shutil.rmtree(tmp_path / "cs/gtFine/val")
    with pytest.raises(DatasetError, match=r"gtFine/val not found.*gtFine_trainvaltest"):
        CityscapesSegmentation("val", str(tmp_path / "cs"))
    write_ade20k(tmp_path / "ade")
    shutil.rmtree(tmp_path / "ade/ADEChallengeData2016/annotations/validation")
    with pytest.raises(DatasetError, match=r"annotations/validation not found"):
        ADE20KSegmentation("val", str(tmp_path / "ade"))
    write_folder(tmp_path / "folder", "subfolders")
    shutil.rmtree(tmp_path / "folder/masks/val")
    with pytest.raises(DatasetError, match=r"masks/val not found"):
        folder_source("val", tmp_path / "folder")


def test_error_missing_or_empty_split_file(tmp_path):
    write_voc(tmp_path)
    sets = tmp_path / "VOCdevkit/VOC2012/ImageSets/Segmentation"
    (sets / "val.txt").unlink()
    with pytest.raises(DatasetError, match=r"split file .*val\.txt not found"):
        VOCSegmentation("val", str(tmp_path))
    (sets / "train.txt").write_text("\n# nothing\n")
    with pytest.raises(DatasetError, match=r"train\.txt is empty"):
        VOCSegmentation("train", str(tmp_path))
    with pytest.raises(DatasetError, match=r"train_aug\.txt not found"):
        (tmp_path / "VOCdevkit/VOC2012/SegmentationClassAug").mkdir()
        VOCSegmentation("train", str(tmp_path), aug=True)

    write_folder(tmp_path / "f")
    with pytest.raises(DatasetError, match=r"nope\.txt not found \(set by dataset\.split_files\.val\)"):
        folder_source("val", tmp_path / "f", split_files={"train": "train.txt", "val": "nope.txt"})
    with pytest.raises(DatasetError, match=r"split_files has no entry for the val split"):
        folder_source("val", tmp_path / "f", split_files={"train": "train.txt"})
    (tmp_path / "f" / "val.txt").write_text("part_00\nghost\n")
    with pytest.raises(DatasetError, match=r"val\.txt \(dataset\.split_files\.val\) have no image.*ghost"):
        folder_source("val", tmp_path / "f", split_files={"train": "train.txt", "val": "val.txt"})


def test_error_empty_split(tmp_path):
    write_folder(tmp_path / "f")
    with pytest.raises(DatasetError, match=r"val split is empty.*val_ratio=0\.0"):
        folder_source("val", tmp_path / "f", val_ratio=0.0)
    write_cityscapes(tmp_path / "cs")
    for city in (tmp_path / "cs/leftImg8bit/val").iterdir():
        shutil.rmtree(city)
    with pytest.raises(DatasetError, match=r"val split is empty"):
        CityscapesSegmentation("val", str(tmp_path / "cs"))
    write_ade20k(tmp_path / "ade")
    for f in (tmp_path / "ade/ADEChallengeData2016/images/validation").iterdir():
        f.unlink()
    with pytest.raises(DatasetError, match=r"images/validation.*val split is empty"):
        ADE20KSegmentation("val", str(tmp_path / "ade"))


def test_error_image_without_mask_names_both_files(tmp_path):
    fixture = write_voc(tmp_path / "voc")
    image, mask, _ = fixture.items["train"][1]
    mask.unlink()
    with pytest.raises(DatasetError, match=rf"no mask .*{image.name} expects .*{mask.name}"):
        VOCSegmentation("train", str(tmp_path / "voc"))
    fixture = write_cityscapes(tmp_path / "cs")
    image, mask, _ = fixture.items["val"][0]
    mask.unlink()
    with pytest.raises(DatasetError, match=rf"have no mask \(image .*{image.name} expects .*{mask.name}"):
        CityscapesSegmentation("val", str(tmp_path / "cs"))
    fixture = write_ade20k(tmp_path / "ade")
    image, mask, _ = fixture.items["train"][0]
    mask.unlink()
    with pytest.raises(DatasetError, match=rf"no annotation \(image .*{image.name} expects .*{mask.name}"):
        ADE20KSegmentation("train", str(tmp_path / "ade"))
    fixture = write_folder(tmp_path / "f")
    image, mask, _ = fixture.items["val"][0]
    mask.unlink()
    with pytest.raises(DatasetError, match=rf"no mask in .*masks with the same stem \(e\.g\. .*{image.name}"):
        folder_source("val", tmp_path / "f", split_files={"train": "train.txt", "val": "val.txt"})
    write_rgb(tmp_path / "f" / "images" / "part_01.png", 0)
    with pytest.raises(DatasetError, match=r"two image files share the stem 'part_01'"):
        folder_source("train", tmp_path / "f")


def test_error_size_mismatch_found_by_validate(tmp_path):
    fixture = write_ade20k(tmp_path)
    image, mask, _ = fixture.items["train"][1]
    write_index_png(mask, np.ones((H + 2, W), np.uint8))
    source = ADE20KSegmentation("train", str(tmp_path))
    message = rf"image .*{image.name} is 32x24 \(WxH\) but its mask .*{mask.name} is 32x26"
    with pytest.raises(DatasetError, match=message):
        source.validate()


def test_error_unreadable_and_truncated_images(tmp_path):
    fixture = write_voc(tmp_path)
    image, _, _ = fixture.items["train"][0]
    write_rgb(image, 0, size=(240, 320))  # big enough for truncation to cut into the pixel data ...
    write_index_png(fixture.items["train"][0][1], np.zeros((240, 320), np.uint8))
    truncate(image, 0.5)
    source = VOCSegmentation("train", str(tmp_path))
    source.validate()  # ... while its header is intact: validate reads headers only
    with pytest.raises(DatasetError, match=rf"Cannot read image .*{image.name}: .*truncated"):
        source.load_image(0)
    not_an_image = fixture.items["train"][1][0]
    not_an_image.write_bytes(b"this is not a jpeg")
    with pytest.raises(DatasetError, match=rf"1 of 2 image/mask pairs.*Cannot read image .*{not_an_image.name}"):
        source.validate()
    with pytest.raises(DatasetError, match=rf"Cannot read image .*{not_an_image.name}"):
        source.load_image(1)
    fixture.items["val"][0][1].write_bytes(b"\x89PNG garbage")
    with pytest.raises(DatasetError, match=rf"Cannot read mask .*{fixture.items['val'][0][1].name}"):
        VOCSegmentation("val", str(tmp_path)).load_mask(0)


def test_error_colour_not_in_palette(tmp_path):
    fixture = write_folder(tmp_path, "flat", "rgb")
    source = folder_source("train", tmp_path, mask_mode="rgb", palette=FOLDER_PALETTE, val_ratio=0.4)
    bad = next(i for i in range(len(source)) if "part_01" in source.describe(i))  # the mask with a white row
    with pytest.raises(DatasetError, match=r"part_01\.png has 1 colours that are not in dataset\.palette: "
                                           r"\[255, 255, 255\] \(32 px\).*ignore_colors"):
        source.load_mask(bad)
    with_ignore = folder_source("train", tmp_path, mask_mode="rgb", palette=FOLDER_PALETTE, val_ratio=0.4,
                                ignore_colors=[FOLDER_IGNORE_COLOR])
    assert (with_ignore.load_mask(bad) == IGNORE).sum() == W
    np.testing.assert_array_equal(with_ignore.load_mask(bad), dict(
        (m.name, e) for _, m, e in fixture.items["train"] + fixture.items["val"])["part_01.png"])


def test_error_folder_config_keys(tmp_path):
    write_folder(tmp_path, "flat", "rgb")
    with pytest.raises(DatasetError, match=r"dataset\.classes is required"):
        FolderSegmentation("train", str(tmp_path))
    with pytest.raises(DatasetError, match=r"dataset\.palette is required"):
        folder_source("train", tmp_path, mask_mode="rgb")
    with pytest.raises(DatasetError, match=r"dataset\.palette has 2 colours but there are 3 classes"):
        folder_source("train", tmp_path, mask_mode="rgb", palette=FOLDER_PALETTE[:2])
    with pytest.raises(DatasetError, match=r"dataset\.mask_mode must be one of"):
        folder_source("train", tmp_path, mask_mode="colour")
    with pytest.raises(DatasetError, match=r"in both dataset\.palette and dataset\.ignore_colors"):
        folder_source("train", tmp_path, mask_mode="rgb", palette=FOLDER_PALETTE, ignore_colors=[[0, 0, 0]])
    with pytest.raises(DatasetError, match=r"mask_mode: rgb"):  # rgb masks read as index masks
        folder_source("train", tmp_path).load_mask(0)
    with pytest.raises(DatasetError, match=r"split must be one of"):
        VOCSegmentation("test", str(tmp_path))


# ------------------------------------------------------------------------------------------------------ training
TRAIN_OVERRIDES = [
    "dataset.transforms.crop_size=32", "dataset.transforms.val_height=32", "dataset.transforms.val_width=32",
    "trainer.batch_size=2", "trainer.val_batch_size=2", "trainer.max_epochs=2", "trainer.max_steps=2",
    "trainer.num_workers=0", "trainer.progress=false", "trainer.log_every=1", "scheduler.warmup_steps=1",
    "model.weights=null", "model.weights_backbone=null", "logger.tensorboard=null",
]


@pytest.mark.parametrize("case", [*YAMLS, "folder-index"])
def test_two_training_steps_through_the_real_config(make_cfg, tmp_path, case):
    """`python -m train_seg dataset=<name> dataset.root=<fixture>` shrunk to 32 px crops and two steps."""
    from train_seg.engine.trainer import train

    name = case.split("-")[0]
    data = tmp_path / "data"
    overrides = [f"dataset={name}", f"dataset.root={data}"]
    if name == "voc":
        fixture = write_voc(data)
    elif name == "cityscapes":
        fixture = write_cityscapes(data)
        overrides.append("dataset.transforms.base_size=32")
    elif name == "ade20k":
        fixture = write_ade20k(data)
        overrides.append("dataset.transforms.base_size=32")
    elif case == "folder-index":
        fixture = write_folder(data, "subfolders", "index")
        overrides.append(f"dataset.classes=[{','.join(FOLDER_CLASSES)}]")
    else:
        fixture = write_folder(data, "subfolders", "rgb")
        overrides += [f"dataset.classes=[{','.join(FOLDER_CLASSES)}]", "dataset.mask_mode=rgb",
                      f"dataset.palette={FOLDER_PALETTE}", f"dataset.ignore_colors=[{FOLDER_IGNORE_COLOR}]"]
    cfg = make_cfg(*overrides, *TRAIN_OVERRIDES, f"paths.output_dir={tmp_path / 'run'}",
                   f"paths.cache_dir={tmp_path / 'cache'}", tiny=False)
    payload = train(cfg, tmp_path / "run")
    assert payload["status"] == "completed" and payload["history"][-1]["step"] == 2
    names = payload["class_names"]
    counts = hand_class_counts(fixture.expected("train"), len(names))
    assert payload["class_stats"]["train"]["pixel_counts"] == counts.tolist()
