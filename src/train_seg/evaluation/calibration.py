"""Post-hoc calibration of the decision rule: per-class offsets added to the logits before the arg-max.

``fit_offsets`` searches the offsets that maximise a metric of ``metrics_from_confusion`` on cached logits by
coordinate ascent: class by class (class 0 stays at 0: a common shift changes nothing), every candidate offset of
that class is scored on the confusion matrix it gives, the best is kept, and rounds repeat until none improves.
The candidates are data-adaptive: the offsets at which some pixel's decision between this class and its best
other class flips (quantiles of ``max_other - logit_c`` over the pixels of the class or predicted as it), so the
grid follows each class's logit scale. Only improvements are kept, so the fitted metric never drops below the
uncalibrated one. ``prior_offsets`` is the closed form ``-tau * log(prior)`` (post-hoc logit adjustment, Menon
et al. 2021). ``LogitSample`` caches the logits and labels of the valid pixels of a split, subsampled uniformly to
at most ``max_pixels`` (a seeded random priority per pixel keeps the lowest). The offsets are stored in
``calibration.json`` beside the checkpoint and applied by ``train_seg.checkpoint`` (``Calibration``, ``Calibrated``).
"""
from __future__ import annotations

import torch

from train_seg.checkpoint import CALIBRATION_FILE, Calibrated, Calibration  # noqa: F401  (their home: the run's files)
from train_seg.evaluation.metrics import confusion_counts, metrics_from_confusion

METHODS = ("fit", "prior")
QUANTILE_POOL = 1_000_000


def prior_offsets(prior, tau: float, floor: float = 1e-6) -> torch.Tensor:
    """``-tau * log(max(prior, floor))``, shifted so that class 0's offset is 0."""
    from train_seg.losses.cross_entropy import log_prior

    offsets = -float(tau) * log_prior(prior, floor).double()
    return (offsets - offsets[0]).float()


class LogitSample:
    """Float32 logits ``(P, K)`` and labels ``(P,)`` of the valid pixels seen by ``add``, at most ``max_pixels``
    of them: a uniform subsample (seeded) once more pixels were seen. ``seen`` counts every valid pixel.

    Each pixel draws a random key; the sample is the ``max_pixels`` smallest keys, in arrival order. Batches are
    kept as chunks (only pixels below the current cut-off key once the sample is full) and merged when they hold
    twice the budget, so a long split costs no copy of the whole sample per batch."""

    def __init__(self, max_pixels: int, ignore_index: int, seed: int = 0):
        if max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1, got {max_pixels}")
        self.max_pixels = int(max_pixels)
        self.ignore_index = int(ignore_index)
        self.generator = torch.Generator().manual_seed(seed)
        self._chunks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._held = 0
        self._cutoff = float("inf")  # keys at or above it can no longer enter the sample
        self.seen = 0

    def add(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        """``logits`` ``(N, K, H, W)`` and ``target`` ``(N, H, W)`` of one batch (moved to the CPU)."""
        logits = logits.detach().float().cpu().permute(0, 2, 3, 1).reshape(-1, logits.shape[1])
        target = target.detach().cpu().reshape(-1).long()
        valid = (target != self.ignore_index) & (target >= 0) & (target < logits.shape[1])
        logits, target = logits[valid], target[valid]
        self.seen += int(target.numel())
        keys = torch.rand(target.numel(), generator=self.generator)
        below = keys < self._cutoff
        self._chunks.append((logits[below], target[below], keys[below]))
        self._held += int(below.sum())
        if self._held > 2 * self.max_pixels:
            self._merge()

    def _merge(self) -> None:
        logits, labels, keys = (torch.cat(part) for part in zip(*self._chunks))
        if keys.numel() > self.max_pixels:
            keep = torch.topk(keys, self.max_pixels, largest=False).indices.sort().values
            logits, labels, keys = logits[keep], labels[keep], keys[keep]
            self._cutoff = float(keys.max())
        self._chunks, self._held = [(logits, labels, keys)], int(keys.numel())

    def _sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._chunks:
            return torch.empty(0, 0), torch.empty(0, dtype=torch.int64)
        if len(self._chunks) > 1 or self._held > self.max_pixels:
            self._merge()
        return self._chunks[0][0], self._chunks[0][1]

    @property
    def logits(self) -> torch.Tensor:
        return self._sample()[0]

    @property
    def labels(self) -> torch.Tensor:
        return self._sample()[1]


def confusion_of(logits: torch.Tensor, labels: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """The ``(K, K)`` confusion matrix (rows truth) of ``argmax(logits + offsets)``."""
    return confusion_counts((logits + offsets).max(1).indices, labels, logits.shape[1])


def score(confusion: torch.Tensor, metric: str, rare=None) -> float:
    """``metric`` (``val/mIoU``, ``val/rare_mIoU``, ...) of a confusion matrix; NaN counts as -inf."""
    value = metrics_from_confusion(confusion, rare)[metric.removeprefix("val/")]
    return float("-inf") if value != value else float(value)


def fit_offsets(logits: torch.Tensor, labels: torch.Tensor, metric: str, rare=None, rounds: int = 4,
                candidates: int = 64) -> tuple[torch.Tensor, float, float]:
    """``(offsets, before, after)``: the coordinate ascent of the module docstring on cached ``logits`` ``(P, K)``
    and ``labels`` ``(P,)``, the scores those of the real arg-max; ``after >= before`` always."""
    k = logits.shape[1]
    offsets = torch.zeros(k)
    before = best = score(confusion_of(logits, labels, offsets), metric, rare)
    quantiles = torch.linspace(0.005, 0.995, candidates, dtype=torch.float64)
    for _ in range(rounds):
        improved = False
        for c in range(1, k):
            others = logits + offsets
            others[:, c] = float("-inf")
            best_other, other_class = others.max(1)
            margin = best_other - logits[:, c]  # the pixel goes to c when offsets[c] > margin
            near = (labels == c) | (margin < offsets[c])
            pool = margin[near]
            if pool.numel() == 0:
                continue
            pool = pool[:: pool.numel() // QUANTILE_POOL + 1]  # torch.quantile's input limit; ample for 64 values
            for value in (torch.quantile(pool.double(), quantiles).float().unique() + 1e-4).tolist():
                predicted = torch.where(margin < value, c, other_class)
                result = score(confusion_counts(predicted, labels, k), metric, rare)
                if result > best + 1e-12:
                    best, improved = result, True
                    offsets = offsets.clone()
                    offsets[c] = value
        if not improved:
            break
    after = score(confusion_of(logits, labels, offsets), metric, rare)
    if after < before:  # an exact tie decided differently by the arg-max: keep the model's own rule
        return torch.zeros(k), before, before
    return offsets, before, after
