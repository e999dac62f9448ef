"""Pictures for TensorBoard and the sweep summary: the row-normalised confusion matrix, prediction overlays of a
fixed set of validation images, and the per-class IoU chart of a sweep. Nothing here runs a model: callers pass
predicted label maps (``train_seg.engine.predict_batch`` makes them).

Drawn with matplotlib's object API on the Agg canvas (``Figure`` + ``FigureCanvasAgg``, never ``pyplot``): no
display needed, no global figure registry to leak, safe inside Hydra jobs and DataLoader workers. The module never
imports torch, so ``python -m train_seg.summary`` stays fast.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

# Colour of ignore_index pixels in ground-truth and prediction panels: a neutral light grey.
IGNORE_COLOR = (200, 200, 200)
# Above this many classes the confusion matrix gets no per-cell numbers (unreadable), above MAX_TICK_CLASSES no names.
MAX_ANNOTATED_CLASSES = 20
MAX_TICK_CLASSES = 60


def new_figure(width: float, height: float, dpi: int = 100) -> Figure:
    figure = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(figure)
    return figure


def figure_to_array(figure: Figure) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB rendering of a figure."""
    canvas = figure.canvas if isinstance(figure.canvas, FigureCanvasAgg) else FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


# -- confusion matrix ------------------------------------------------------------------------------------------
def row_normalize(confusion) -> np.ndarray:
    """``(K, K)`` float64: each true-class row divided by its sum, so row ``t`` holds where pixels of class ``t``
    went (the diagonal is the recall). A row with no pixels (class absent from the target) is all NaN."""
    counts = np.asarray(confusion, dtype=np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, counts / np.where(totals > 0, totals, 1), np.nan)


def confusion_figure(confusion, class_names: Sequence[str], title: str | None = None) -> Figure:
    """Row-normalised confusion matrix (rows: ground truth, columns: prediction) with class names on both axes and
    the fraction printed in each cell (up to ``MAX_ANNOTATED_CLASSES`` classes). An absent class's row is left
    empty and its name marked ``(absent)``. ``title`` (e.g. ``"epoch 3"``) prefixes the figure's title."""
    matrix = row_normalize(confusion)
    k = len(class_names)
    side = min(24.0, max(4.5, 0.55 * k + 2.5))
    figure = new_figure(side + 1.0, side)
    ax = figure.add_subplot(1, 1, 1)
    image = ax.imshow(np.ma.masked_invalid(matrix), cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class's pixels")
    absent = np.isnan(matrix).all(axis=1)
    if k <= MAX_TICK_CLASSES:
        ax.set_xticks(range(k), labels=list(class_names), rotation=45, ha="right", rotation_mode="anchor")
        ax.set_yticks(range(k), labels=[f"{n} (absent)" if a else n for n, a in zip(class_names, absent)])
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if k <= MAX_ANNOTATED_CLASSES:
        for t in range(k):
            for p in range(k):
                value = matrix[t, p]
                if not math.isnan(value):
                    ax.text(p, t, f"{value:.2f}", ha="center", va="center", fontsize=8,
                            color="white" if value > 0.55 else "black")
    ax.set_title(f"{title + ': ' if title else ''}rows normalised (diagonal = recall)")
    figure.tight_layout()
    return figure


# -- prediction overlays ---------------------------------------------------------------------------------------
def colorize(mask: np.ndarray, palette: Sequence[Sequence[int]], ignore_index: int = 255) -> np.ndarray:
    """``(H, W)`` labels -> ``(H, W, 3)`` uint8 RGB with the dataset palette; ``ignore_index`` and any label outside
    the palette are drawn in ``IGNORE_COLOR``."""
    lut = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    mask = np.asarray(mask).astype(np.int64)
    valid = (mask >= 0) & (mask < len(lut)) & (mask != ignore_index)
    out = np.empty(mask.shape + (3,), dtype=np.uint8)
    out[...] = IGNORE_COLOR
    out[valid] = lut[mask[valid]]
    return out


def display_image(image) -> np.ndarray:
    """A normalised ``(3, H, W)`` float image (after the val transform) -> ``(H, W, 3)`` uint8 for display.

    Each channel is stretched from its 1st to its 99th percentile: this undoes any per-channel affine
    normalisation (albumentations ``Normalize``) up to contrast, without needing the transform's mean and std."""
    array = np.asarray(image, dtype=np.float32)
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
        array = array.transpose(1, 2, 0)
    if array.ndim == 2:
        array = array[..., None]
    low = np.percentile(array, 1, axis=(0, 1), keepdims=True)
    high = np.percentile(array, 99, axis=(0, 1), keepdims=True)
    scaled = np.clip((array - low) / np.maximum(high - low, 1e-6), 0.0, 1.0)
    if scaled.shape[-1] == 1:
        scaled = np.repeat(scaled, 3, axis=-1)
    return (scaled * 255).round().astype(np.uint8)


def _spread(candidates: Sequence[int], count: int) -> list[int]:
    """``count`` entries of ``candidates`` spread evenly over it (deterministic, first and last included)."""
    if count <= 0 or not candidates:
        return []
    if count >= len(candidates):
        return list(candidates)
    positions = np.linspace(0, len(candidates) - 1, count).round().astype(int)
    return [candidates[p] for p in dict.fromkeys(positions.tolist())]


def select_overlay_indices(presence: np.ndarray, pixel_share: Sequence[float], count: int) -> list[int]:
    """Deterministic choice of ``count`` validation images to draw at every evaluation.

    ``presence`` is the val split's ``(num_images, K)`` class-presence matrix, ``pixel_share`` the training split's
    class shares (which define rarity). At least half the images (rounded up) contain the rarest class present in
    the val split, spread evenly over the images that contain it; then one image per remaining class, rarest
    first, so every present class appears when ``count`` allows; then evenly spread images fill the rest.
    Returns image indices, rare-class images first."""
    presence = np.asarray(presence, dtype=bool)
    num_images = presence.shape[0]
    count = min(int(count), num_images)
    if count <= 0:
        return []
    share = np.asarray(pixel_share, dtype=np.float64)
    present = np.flatnonzero(presence.any(axis=0))
    by_rarity = present[np.argsort(share[present], kind="stable")].tolist()
    chosen: list[int] = []

    def take(candidates: Sequence[int], k: int) -> None:
        free = [i for i in candidates if i not in chosen]
        chosen.extend(_spread(free, min(k, count - len(chosen))))

    if by_rarity:
        take(np.flatnonzero(presence[:, by_rarity[0]]).tolist(), math.ceil(count / 2))
    for c in by_rarity[1:]:
        if len(chosen) >= count:
            break
        if not presence[chosen, c].any():
            take(np.flatnonzero(presence[:, c]).tolist(), 1)
    take(list(range(num_images)), count - len(chosen))
    return chosen


class OverlaySet:
    """A fixed set of validation images, loaded once through the val transform, drawn as
    image | ground truth | prediction at every evaluation."""

    def __init__(self, dataset, indices: Sequence[int], class_names: Sequence[str],
                 palette: Sequence[Sequence[int]], ignore_index: int = 255):
        self.indices = [int(i) for i in indices]
        self.class_names = list(class_names)
        self.palette = [tuple(int(v) for v in color) for color in palette]
        self.ignore_index = int(ignore_index)
        self.items = [dataset[i] for i in self.indices]  # (image (3, H, W) float, mask (H, W) int64)

    def __len__(self) -> int:
        return len(self.indices)

    def figure(self, predicted: Sequence[np.ndarray], title: str | None = None) -> Figure:
        return overlay_figure(
            [display_image(image.numpy()) for image, _ in self.items], [mask.numpy() for _, mask in self.items],
            predicted, self.palette, self.class_names, self.ignore_index,
            captions=[f"val #{i}" for i in self.indices], title=title,
        )


def overlay_figure(images: Sequence[np.ndarray], targets: Sequence[np.ndarray], predicted: Sequence[np.ndarray],
                   palette: Sequence[Sequence[int]], class_names: Sequence[str], ignore_index: int = 255,
                   captions: Sequence[str] | None = None, title: str | None = None) -> Figure:
    """One row per image: the image, its ground truth and the prediction in the dataset palette (ignore pixels in
    ``IGNORE_COLOR``); each row names the classes present in its ground truth; a legend maps colours to classes."""
    rows = len(images)
    panel = 2.2
    figure = new_figure(3 * panel, rows * panel + 0.9, dpi=80)
    axes = figure.subplots(rows, 3, squeeze=False)
    for r in range(rows):
        target = np.asarray(targets[r])
        present = [class_names[c] for c in np.unique(target) if 0 <= c < len(class_names) and c != ignore_index]
        panels = (images[r], colorize(target, palette, ignore_index), colorize(predicted[r], palette, ignore_index))
        for col, picture in enumerate(panels):
            ax = axes[r][col]
            ax.imshow(picture, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(("image", "ground truth", "prediction")[col], fontsize=9)
        caption = captions[r] if captions else f"#{r}"
        axes[r][0].set_ylabel(f"{caption}\n{', '.join(present) or 'no labelled pixel'}", fontsize=7)
    handles = [Patch(color=np.asarray(color) / 255, label=name) for name, color in zip(class_names, palette)]
    handles.append(Patch(color=np.asarray(IGNORE_COLOR) / 255, label="ignore"))
    figure.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=7, frameon=False)
    if title:
        figure.suptitle(title, fontsize=9)
    figure.tight_layout(rect=(0, 0.3 / (rows * panel + 0.9), 1, 1))
    return figure


# -- sweep summary chart ---------------------------------------------------------------------------------------
def summary_figure(jobs: Sequence[str], class_names: Sequence[str], pixel_share: Sequence[float], iou: np.ndarray,
                   rare: Sequence[bool], miou: Sequence[float], rare_miou: Sequence[float],
                   status: Sequence[str], title: str | None = None) -> Figure:
    """Per-class IoU of every job of a sweep, classes in the given order (callers pass them by decreasing pixel
    share, so rare classes sit on the right), plus mIoU and rare-class mIoU per job.

    ``iou`` is ``(jobs, classes)`` with NaN for an absent class or a job without results (no bar; such jobs are
    labelled with their status in the legend)."""
    iou = np.asarray(iou, dtype=np.float64).reshape(len(jobs), len(class_names))
    num_jobs, num_classes = iou.shape
    width = min(28.0, 4.0 + num_classes * max(0.9, 0.28 * num_jobs))
    figure = new_figure(width + 4.5, 5.2)
    grid = figure.add_gridspec(1, 2, width_ratios=(width, 3.2))
    ax = figure.add_subplot(grid[0, 0])
    ax_mean = figure.add_subplot(grid[0, 1])
    colors = _job_colors(num_jobs)
    annotate = num_jobs * num_classes <= 48
    labels = [job if state == "completed" else f"{job} ({state})" for job, state in zip(jobs, status)]
    _grouped_bars(ax, iou, colors, annotate, labels)
    _label_classes(ax, class_names, pixel_share, rare)
    ax.set_title(title or "per-class IoU per job")
    _grouped_bars(ax_mean, np.asarray([miou, rare_miou], dtype=np.float64).T.reshape(num_jobs, 2), colors, annotate)
    ax_mean.set_xticks(np.arange(2), labels=["mIoU", "rare mIoU"], fontsize=8)
    ax_mean.set_ylim(0, 1.08)
    ax_mean.grid(axis="y", alpha=0.3)
    ax_mean.set_title("means")
    if num_jobs:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=min(num_jobs, 3), fontsize=7, frameon=False)
    figure.tight_layout()
    return figure


def _grouped_bars(ax, values: np.ndarray, colors: Sequence, annotate: bool,
                  labels: Sequence[str] | None = None) -> None:
    """``values`` ``(jobs, slots)``: one bar per job side by side in each slot (NaN: no bar), the value printed on
    top when ``annotate`` (``n/a`` for NaN); ``labels``: the jobs' legend labels."""
    num_jobs, num_slots = values.shape
    bar = 0.8 / max(num_jobs, 1)
    for j in range(num_jobs):
        positions = np.arange(num_slots) - 0.4 + bar * (j + 0.5)
        kwargs = {} if labels is None else {"label": labels[j]}
        ax.bar(positions, np.nan_to_num(values[j], nan=0.0), width=bar, color=colors[j], **kwargs)
        if annotate:
            for pos, value in zip(positions, values[j]):
                text = "n/a" if math.isnan(value) else f"{value:.2f}"
                ax.text(pos, (0 if math.isnan(value) else value) + 0.01, text, ha="center", va="bottom",
                        fontsize=7, rotation=90)


def _label_classes(ax, class_names: Sequence[str], pixel_share: Sequence[float], rare: Sequence[bool]) -> None:
    """Class names with their training pixel share under the IoU bars (rare classes in red), axis labels, grid."""
    labels = [f"{name}\n{100 * share:.2f}%" + ("\n(rare)" if is_rare else "")
              for name, share, is_rare in zip(class_names, pixel_share, rare)]
    ax.set_xticks(np.arange(len(class_names)), labels=labels, fontsize=8)
    for tick, is_rare in zip(ax.get_xticklabels(), rare):
        if is_rare:
            tick.set_color("tab:red")
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("IoU (final evaluation)")
    ax.set_xlabel("class, training pixel share (decreasing)")
    ax.grid(axis="y", alpha=0.3)


def _job_colors(count: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if count <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(count)]
