"""The dataset seam: every dataset is a ``SegmentationSource`` (one split, in its training label space,
before augmentation) wrapped by ``SegmentationDataset`` (augmentation + tensors) for the DataLoader.

Class statistics (``train_seg.data.class_stats``) read ``load_mask`` only, so they never decode images and never see
augmentation. Loaders raise ``DatasetError`` with a message naming the path and the fix.
"""
from __future__ import annotations

import abc
import logging
import random
from typing import Callable

import numpy as np
import torch

log = logging.getLogger(__name__)


class DatasetError(ValueError):
    """Bad dataset input: the message names the file or key and says how to fix it."""


def seed_pipeline(pipeline, seed: int) -> None:
    """Seeds an albumentations pipeline (a ``Compose``) so that all its transforms draw, in the order they run, from
    ONE numpy generator and ONE python ``random.Random``, both made from ``seed`` (taken modulo 2**32). The same seed
    gives the same augmentation, and the transforms' decisions (flip, scale, crop position) are independent of each
    other. (``Compose(seed=s)`` and ``set_random_seed(s)`` give every transform its own generator seeded with ``s``:
    their first draws are one number, flips and scales in lockstep.) None, or a callable without
    ``set_random_state`` (not an albumentations pipeline), is left alone."""
    if not hasattr(pipeline, "set_random_state"):
        return
    seed = int(seed) % 2**32
    pipeline.set_random_state(np.random.default_rng(seed), random.Random(seed))


class SegmentationSource(abc.ABC):
    """One split of a dataset.

    Contract:
      * ``class_names``: list of ``num_classes`` names, index = training label.
      * ``palette``: list of ``num_classes`` RGB tuples (0-255) for visualisation.
      * ``ignore_index``: label of pixels that count nowhere (losses, statistics, metrics).
      * ``load_image(i)``: ``(H, W, 3)`` uint8 RGB array.
      * ``load_mask(i)``: ``(H, W)`` integer array already mapped to training labels ``0..num_classes-1`` or
        ``ignore_index``.
      * ``identity()``: a string that changes whenever the split's content may have changed (used as the key of
        the class-statistics cache).
      * ``describe(i)``: where item ``i`` comes from (file path), for error messages.
      * ``validate()``: checks run before training (missing files, size mismatches...); raises ``DatasetError``.
    """

    class_names: list[str]
    palette: list[tuple[int, int, int]]
    ignore_index: int = 255

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def load_image(self, index: int) -> np.ndarray: ...

    @abc.abstractmethod
    def load_mask(self, index: int) -> np.ndarray: ...

    @abc.abstractmethod
    def identity(self) -> str: ...

    def describe(self, index: int) -> str:
        """Where item ``index`` comes from, for error messages (a file path for file-based datasets)."""
        return f"{type(self).__name__} item {index}"

    def validate(self) -> None:
        if len(self) == 0:
            raise DatasetError(f"{type(self).__name__}: the split is empty; check the dataset root and split files.")


#: The split that post-hoc calibration fits on (``train_seg.cli.calibrate``): carved from train by
#: ``dataset.holdout_fraction`` (any dataset), or the synthetic dataset's own third split.
CALIB_SPLIT = "calib"


class HeldOut(SegmentationSource):
    """A seeded share of a source's items, or the rest of them: ``HeldOut(train, fraction, seed, held=True)`` is
    the calibration split, ``held=False`` what training keeps; the two are disjoint and cover the source.

    The held items are the first ``max(1, round(fraction * n))`` of ``numpy.random.default_rng(seed).permutation(n)``
    (sorted). Raises ``DatasetError`` for a fraction outside (0, 1) or a source of fewer than 2 items."""

    def __init__(self, source: SegmentationSource, fraction: float, seed: int, held: bool):
        n = len(source)
        if not 0.0 < float(fraction) < 1.0 or n < 2:
            raise DatasetError(f"dataset.holdout_fraction={fraction!r} needs a number in (0, 1) and a training split "
                               f"of at least 2 items (it has {n}); e.g. dataset.holdout_fraction=0.1.")
        count = min(n - 1, max(1, round(float(fraction) * n)))
        chosen = np.sort(np.random.default_rng(int(seed)).permutation(n)[:count])
        self.indices = chosen if held else np.setdiff1d(np.arange(n), chosen)
        self.source, self.fraction, self.seed, self.held = source, float(fraction), int(seed), bool(held)
        self.class_names, self.palette, self.ignore_index = source.class_names, source.palette, source.ignore_index

    def __len__(self) -> int:
        return len(self.indices)

    def load_image(self, index: int) -> np.ndarray:
        return self.source.load_image(int(self.indices[index]))

    def load_mask(self, index: int) -> np.ndarray:
        return self.source.load_mask(int(self.indices[index]))

    def identity(self) -> str:
        part = CALIB_SPLIT if self.held else "rest"
        return f"{self.source.identity()}:holdout={self.fraction:g}@{self.seed}:{part}"

    def describe(self, index: int) -> str:
        return self.source.describe(int(self.indices[index]))

    def validate(self) -> None:
        self.source.validate()
        super().validate()


#: ``dataset.on_bad_sample``: what a sample that cannot be read DURING training does (the checks before training
#: read every mask and every header; a file can still be cut short or vanish later): ``error`` stops the run with
#: the file named, ``skip`` drops the sample from its batch, logs it and counts it.
ON_BAD_SAMPLE = ("error", "skip")


def check_on_bad_sample(value) -> str:
    if value not in ON_BAD_SAMPLE:
        raise DatasetError(f"dataset.on_bad_sample={value!r} is not valid; choose one of {', '.join(ON_BAD_SAMPLE)} "
                           "(error: stop with the file named; skip: drop the sample from its batch, logged and "
                           "counted).")
    return value


class SegmentationDataset(torch.utils.data.Dataset):
    """Applies a paired image/mask transform (albumentations-style ``transform(image=..., mask=...)``) to a source
    and returns ``(image float32 (3, H, W), mask int64 (H, W))``.

    Without a transform the image is scaled to [0, 1]; with one, the transform is expected to normalise the image
    (albumentations ``Normalize``) and may or may not end in ``ToTensorV2``: both are accepted.

    A sample whose files cannot be read (``DatasetError`` from the source, or any ``OSError``) raises a
    ``DatasetError`` naming the file with ``on_bad_sample="error"``; with ``"skip"`` it is logged, counted in
    ``skipped`` (per process: each DataLoader worker counts its own) and returned as None, which
    ``collate_skipping_bad`` drops from the batch. The default is the source's ``on_bad_sample`` attribute (set by
    ``build.build_source`` from the dataset config), else ``"error"``.
    """

    def __init__(self, source: SegmentationSource, transform: Callable | None = None,
                 on_bad_sample: str | None = None):
        self.source = source
        self.transform = transform
        self.on_bad_sample = check_on_bad_sample(on_bad_sample or getattr(source, "on_bad_sample", "error"))
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.source)

    def reseed(self, seed: int) -> None:
        """Reseeds the augmentation pipeline with ``seed_pipeline`` (albumentations keeps its own generators,
        independent of the global ones)."""
        seed_pipeline(self.transform, seed)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        try:
            image = self.source.load_image(index)
            mask = self.source.load_mask(index)
        except (DatasetError, OSError) as exc:
            message = str(exc) if isinstance(exc, DatasetError) else f"{self.source.describe(index)}: {exc}"
            if self.on_bad_sample == "error":
                raise DatasetError(
                    f"{message} (met during training, after the checks before it passed: the file changed since). "
                    "Restore the file, or set dataset.on_bad_sample=skip to drop unreadable samples."
                ) from exc
            self.skipped += 1
            log.warning("skipped an unreadable sample (%d so far in this process; dataset.on_bad_sample=skip): %s",
                        self.skipped, message)
            return None
        if self.transform is not None:
            out = self.transform(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        image_t = torch.as_tensor(np.ascontiguousarray(image)) if isinstance(image, np.ndarray) else image
        if image_t.ndim == 3 and image_t.shape[-1] == 3 and image_t.shape[0] != 3:
            image_t = image_t.permute(2, 0, 1)
        if image_t.dtype == torch.uint8:
            image_t = image_t.float().div_(255.0)
        mask_t = torch.as_tensor(np.ascontiguousarray(mask)) if isinstance(mask, np.ndarray) else mask
        return image_t.contiguous().float(), mask_t.long()



def collate_skipping_bad(batch: list, min_size: int = 1):
    """``default_collate`` of the samples that are not None (``SegmentationDataset`` with ``on_bad_sample="skip"``
    returns None for an unreadable one). A training batch needs ``min_size`` = 2 (BatchNorm): a batch left with one
    sample repeats it. A batch with no readable sample left raises ``DatasetError``."""
    kept = [sample for sample in batch if sample is not None]
    if not kept:
        raise DatasetError(f"every sample of a batch of {len(batch)} was unreadable (dataset.on_bad_sample=skip "
                           "skipped them all; see the warnings above for the files): fix or remove those files.")
    while len(kept) < min_size:
        kept.append(kept[len(kept) % len(kept)])
    return torch.utils.data.default_collate(kept)


def skip_bad_samples(train_loader, val_loader) -> None:
    """With ``dataset.on_bad_sample=skip``: the loaders collate with ``collate_skipping_bad`` (training batches kept
    at >= 2 samples for BatchNorm; evaluation batches only drop, so no pixel is counted twice)."""
    from functools import partial

    for loader, min_size in ((train_loader, 2), (val_loader, 1)):
        if getattr(loader.dataset, "on_bad_sample", "error") == "skip":
            loader.collate_fn = partial(collate_skipping_bad, min_size=min_size)
