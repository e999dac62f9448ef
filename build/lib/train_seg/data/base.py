"""The dataset seam: every dataset is a ``SegmentationSource`` (one split, in its training label space,
before augmentation) wrapped by ``SegmentationDataset`` (augmentation + tensors) for the DataLoader.

Class statistics (``train_seg.data.class_stats``) read ``load_mask`` only, so they never decode images and never see
augmentation. Loaders raise ``DatasetError`` with a message naming the path and the fix.
"""
from __future__ import annotations

import abc
from typing import Callable

import numpy as np
import torch


class DatasetError(ValueError):
    """Bad dataset input: the message names the file or key and says how to fix it."""


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


class SegmentationDataset(torch.utils.data.Dataset):
    """Applies a paired image/mask transform (albumentations-style ``transform(image=..., mask=...)``) to a source
    and returns ``(image float32 (3, H, W), mask int64 (H, W))``.

    Without a transform the image is scaled to [0, 1]; with one, the transform is expected to normalise the image
    (albumentations ``Normalize``) and may or may not end in ``ToTensorV2``: both are accepted.
    """

    def __init__(self, source: SegmentationSource, transform: Callable | None = None):
        self.source = source
        self.transform = transform

    def __len__(self) -> int:
        return len(self.source)

    def reseed(self, seed: int) -> None:
        """Reseeds the augmentation pipeline (albumentations keeps its own RNG, independent of the global ones)."""
        if self.transform is not None and hasattr(self.transform, "set_random_seed"):
            self.transform.set_random_seed(int(seed) % 2**32)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.source.load_image(index)
        mask = self.source.load_mask(index)
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

