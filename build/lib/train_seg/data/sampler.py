"""Image-level repeat-factor sampling for rare classes (LVIS, Gupta et al. 2019; detectron2's
``RepeatFactorTrainingSampler``), applied to semantic segmentation through the class presence matrix of
``ClassStats``.

Per class ``f_c`` = fraction of training images containing ``c`` and ``r_c = max(1, sqrt(t / f_c))``; per image
``r_i = max_{c in image} r_c`` (1 for an image with no labelled class). Each epoch image ``i`` appears
``floor(r_i) + Bernoulli(r_i - floor(r_i))`` times (stochastic rounding, so the expected count is exactly ``r_i``),
then the list is shuffled.

Unlike detectron2's infinite stream, an epoch here is a finite list that is a pure function of
``(presence, threshold, ignore_classes, seed, epoch)``: the trainer calls ``set_epoch(epoch)`` before each epoch,
``len()`` is the exact length of that epoch's list (progress bars and schedulers see the true number of
batches), iterating twice gives the same order, and resuming at epoch ``e`` only needs ``set_epoch(e)``.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch

__all__ = ["RepeatFactorSampler", "compute_repeat_factors"]


def compute_repeat_factors(
    presence: np.ndarray, threshold: float, ignore_classes: Sequence[int] = ()
) -> np.ndarray:
    """``(num_images,)`` float64 repeat factors ``r_i = max(1, max_{c present in i} sqrt(t / f_c))``.

    ``presence``: ``(num_images, K)`` bool. Classes in ``ignore_classes`` are not considered (an image containing
    only them gets 1). A class present in every image has ``r_c = 1`` so background never changes anything.
    """
    presence = np.asarray(presence, dtype=bool)
    if presence.ndim != 2:
        raise ValueError(f"presence must be a (num_images, K) bool array, got shape {presence.shape}.")
    num_images, num_classes = presence.shape
    if num_images == 0:
        return np.ones(0, dtype=np.float64)
    ignored = [int(c) for c in ignore_classes]
    bad = [c for c in ignored if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"sampler.ignore_classes {bad} are not class indices 0..{num_classes - 1}.")
    if ignored:
        presence = presence.copy()
        presence[:, ignored] = False
    image_fraction = presence.mean(axis=0)  # f_c
    with np.errstate(divide="ignore", invalid="ignore"):
        # A class in no image (f_c = 0) never reaches an image's max; give it 1 to stay finite.
        class_factors = np.where(image_fraction > 0, np.maximum(1.0, np.sqrt(threshold / image_fraction)), 1.0)
    return np.where(presence, class_factors, 1.0).max(axis=1, initial=1.0)


class RepeatFactorSampler(torch.utils.data.Sampler[int]):
    """Oversamples the images containing rare classes; one finite, reproducible index list per epoch.

    Args:
      presence: ``(num_images, K)`` bool, ``ClassStats.presence`` of the training split.
      threshold: ``t``; classes in fewer than a fraction ``t`` of the images are oversampled (``t = 0``: plain
        sampling, each image once per epoch).
      seed: base seed; epoch ``e`` uses ``numpy.random.default_rng([seed, e])``.
      shuffle: shuffle the epoch's list (False keeps index order, repeats adjacent; for debugging).
      ignore_classes: class indices left out of the repeat factors (e.g. a catch-all class you do not want to drive
        oversampling).
    """

    def __init__(
        self,
        presence: np.ndarray,
        threshold: float = 0.1,
        seed: int = 0,
        shuffle: bool = True,
        ignore_classes: Sequence[int] = (),
    ):
        super().__init__()
        threshold = float(threshold)
        if not (threshold >= 0 and np.isfinite(threshold)):
            raise ValueError(f"sampler.threshold={threshold} must be a finite number >= 0 (LVIS uses 0.001, 0.1 here).")
        if int(seed) < 0:
            raise ValueError(f"sampler seed={seed} must be >= 0.")
        self.threshold = threshold
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.repeat_factors = compute_repeat_factors(presence, threshold, ignore_classes)
        self.repeat_factors.setflags(write=False)
        self.epoch = 0
        self._indices: np.ndarray | None = None

    @property
    def expected_length(self) -> float:
        """Expected number of samples per epoch, ``sum_i r_i``."""
        return float(self.repeat_factors.sum())

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose list ``__iter__``/``__len__`` use. Call it before every epoch."""
        epoch = int(epoch)
        if epoch < 0:
            raise ValueError(f"epoch={epoch} must be >= 0.")
        if epoch != self.epoch:
            self.epoch = epoch
            self._indices = None

    def epoch_indices(self) -> np.ndarray:
        """The current epoch's index list (computed once per epoch, then cached)."""
        if self._indices is None:
            rng = np.random.default_rng([self.seed, self.epoch])
            whole = np.floor(self.repeat_factors)
            repeats = whole.astype(np.int64) + (rng.random(len(whole)) < self.repeat_factors - whole)
            indices = np.repeat(np.arange(len(whole), dtype=np.int64), repeats)
            self._indices = rng.permutation(indices) if self.shuffle else indices
            self._indices.setflags(write=False)
        return self._indices

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices().tolist())

    def __len__(self) -> int:
        return int(self.epoch_indices().shape[0])
