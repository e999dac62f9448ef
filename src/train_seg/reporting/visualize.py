"""Pictures for TensorBoard and the sweep summary: the row-normalised confusion matrix, prediction overlays of a
fixed set of validation images, and the per-class IoU chart of a sweep. Nothing here runs a model: callers pass
predicted label maps (``train_seg.evaluation.loop.predict_batch`` makes them).

Drawn with matplotlib's object API on the Agg canvas (``Figure`` + ``FigureCanvasAgg``, never ``pyplot``): no
display needed, no global figure registry to leak, safe inside Hydra jobs and DataLoader workers. The module never
imports torch, so ``python -m train_seg.reporting.summary`` stays fast.
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
    """A float image (e.g. a normalised ``(3, H, W)`` tensor after the val transform) -> ``(H, W, 3)`` uint8.

    The last resort of ``source_view`` (an image that is not uint8, or a pipeline it cannot replay): one stretch
    from the 0.5th to the 99.5th percentile over ALL channels, which undoes any affine normalisation that treats the
    channels alike and keeps the colours' balance (stretching each channel on its own turns a flat background with
    mild noise into coloured noise)."""
    array = np.asarray(image, dtype=np.float32)
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
        array = array.transpose(1, 2, 0)
    if array.ndim == 2:
        array = array[..., None]
    low, high = np.percentile(array, [0.5, 99.5])
    scaled = np.clip((array - low) / max(float(high - low), 1e-6), 0.0, 1.0)
    if scaled.shape[-1] == 1:
        scaled = np.repeat(scaled, 3, axis=-1)
    return (scaled * 255).round().astype(np.uint8)


def _as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        return display_image(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return np.ascontiguousarray(image[..., :3])


def _resize_nearest(image: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    rows = (np.arange(shape[0]) * image.shape[0] / shape[0]).astype(int)
    cols = (np.arange(shape[1]) * image.shape[1] / shape[1]).astype(int)
    return image[rows][:, cols]


def geometric_steps(transform) -> list | None:
    """The steps of an albumentations ``Compose`` that move pixels (resize, pad, crop, flip), i.e. all but the
    image-only ones (``Normalize``, colour jitter...) and ``ToTensorV2``; None when ``transform`` is not a Compose."""
    steps = getattr(transform, "transforms", None)
    if steps is None:
        return None
    from albumentations.core.transforms_interface import ImageOnlyTransform

    return [t for t in steps if not isinstance(t, ImageOnlyTransform) and type(t).__name__ != "ToTensorV2"]


def source_view(dataset, index: int, shape: Sequence[int]) -> np.ndarray:
    """Item ``index`` of a ``SegmentationDataset`` as the dataset holds it: ``source.load_image(index)`` (uint8
    RGB, before any normalisation), put through the geometric steps of the dataset's (val) transform, so it lines up
    pixel for pixel with the item's mask of ``shape`` (H, W) that metrics and predictions use. When the pipeline
    cannot be replayed (not albumentations) or gives another size, the source image is resized (nearest) to
    ``shape``."""
    image = _as_rgb_uint8(dataset.source.load_image(index))
    steps = geometric_steps(dataset.transform) if dataset.transform is not None else []
    if steps:
        try:
            import albumentations as A

            image = _as_rgb_uint8(A.Compose(steps)(image=image, mask=dataset.source.load_mask(index))["image"])
        except Exception:  # a view of the image must never stop training
            pass
    if tuple(image.shape[:2]) != tuple(shape[:2]):
        image = _resize_nearest(image, shape)
    return image


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
    first, so every present class appears when ``count`` allows; then evenly spread images that show a class other
    than the most frequent one (the background), and only when those run out, any image.
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
    if len(by_rarity) > 1:  # images that show more than the background
        take(np.flatnonzero(presence[:, by_rarity[:-1]].any(axis=1)).tolist(), count - len(chosen))
    take(list(range(num_images)), count - len(chosen))
    return chosen


class OverlaySet:
    """A fixed set of validation images, loaded once through the val transform, drawn as
    image | ground truth | prediction at every evaluation. The image column shows the source image as the dataset
    holds it (``source_view``: uint8, the val pipeline's geometry, no normalisation)."""

    def __init__(self, dataset, indices: Sequence[int], class_names: Sequence[str],
                 palette: Sequence[Sequence[int]], ignore_index: int = 255):
        self.indices = [int(i) for i in indices]
        self.class_names = list(class_names)
        self.palette = [tuple(int(v) for v in color) for color in palette]
        self.ignore_index = int(ignore_index)
        self.items = [dataset[i] for i in self.indices]  # (image (3, H, W) float, mask (H, W) int64)
        self.views = [source_view(dataset, i, mask.shape) for i, (_, mask) in zip(self.indices, self.items)]

    def __len__(self) -> int:
        return len(self.indices)

    def figure(self, predicted: Sequence[np.ndarray], title: str | None = None) -> Figure:
        return overlay_figure(
            self.views, [mask.numpy() for _, mask in self.items], predicted, self.palette, self.class_names,
            self.ignore_index, captions=[f"val #{i}" for i in self.indices], title=title,
        )


# Overlays are sized for TensorBoard's image cards, which scale an image down to about 350 px wide unless "Show
# actual image size" is ticked: OVERLAY_PANEL-inch panels at OVERLAY_DPI make a figure about 500 px wide, so
# OVERLAY_FONT-point text (17 px) still shows at about 12 px in a card, and at 17 px at actual size. A row heading
# holds about HEADING_CHARS characters.
OVERLAY_DPI = 100
OVERLAY_PANEL = 1.6
OVERLAY_FONT = 12
HEADING_CHARS = 46


def _class_list(mask: np.ndarray, class_names: Sequence[str], ignore_index: int) -> list[str]:
    labels = [int(c) for c in np.unique(mask) if 0 <= c < len(class_names) and c != ignore_index]
    return [class_names[c] for c in labels]


def _titled_list(prefix: str, names: Sequence[str], limit: int = HEADING_CHARS) -> str:
    """``"truth: road, car"``; names that do not fit in ``limit`` characters are counted (``"+2"``)."""
    if not names:
        return f"{prefix}nothing"
    text = prefix + names[0]
    for k, name in enumerate(names[1:], start=1):
        rest = len(names) - k
        if len(text) + 2 + len(name) + (len(f" +{rest - 1}") if rest > 1 else 0) > limit:
            return f"{text} +{rest}"
        text += f", {name}"
    return text


def overlay_heading(caption: str, truth: Sequence[str], predicted: Sequence[str]) -> str:
    """The two-line heading of an overlay row: the image and the classes of its ground truth, then the classes
    predicted and those of the ground truth not predicted at all (``missed``: a starved rare class shows here)."""
    missed = [name for name in truth if name not in predicted]
    second = _titled_list("predicted: ", predicted)
    if missed:
        second = _titled_list("predicted: ", predicted, HEADING_CHARS - 9 - len(", ".join(missed[:2])))
        second += f" · {_titled_list('missed: ', missed, HEADING_CHARS - len(second) - 3)}"
    return f"{_titled_list(caption + ' · truth: ', truth)}\n{second}"


def overlay_figure(images: Sequence[np.ndarray], targets: Sequence[np.ndarray], predicted: Sequence[np.ndarray],
                   palette: Sequence[Sequence[int]], class_names: Sequence[str], ignore_index: int = 255,
                   captions: Sequence[str] | None = None, title: str | None = None) -> Figure:
    """One row per image: the image, its ground truth and the prediction in the dataset palette (ignore pixels in
    ``IGNORE_COLOR``), under a horizontal heading (``overlay_heading``: the classes of the ground truth, those
    predicted, those missed). On top, the column names (after ``title``, e.g. ``"epoch 3"``) and a legend of the
    colours of the classes shown. Text is ``OVERLAY_FONT`` pt (see ``OVERLAY_DPI``)."""
    rows = len(images)
    row_height = OVERLAY_PANEL + 0.5
    figure = Figure(figsize=(3 * OVERLAY_PANEL + 0.2, rows * row_height + 0.75), dpi=OVERLAY_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    top, *row_figures = figure.subfigures(rows + 1, 1, height_ratios=[0.75] + [row_height] * rows, hspace=0.0)
    shown: set[int] = set()
    has_ignore = False
    for r, row in enumerate(row_figures):
        target, guess = np.asarray(targets[r]), np.asarray(predicted[r])
        truth_names, pred_names = (_class_list(m, class_names, ignore_index) for m in (target, guess))
        shown.update(class_names.index(n) for n in truth_names + pred_names)
        has_ignore = has_ignore or bool((target == ignore_index).any())
        axes = row.subplots(1, 3)
        for ax, picture in zip(axes, (images[r], colorize(target, palette, ignore_index),
                                      colorize(guess, palette, ignore_index))):
            ax.imshow(picture, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        heading = overlay_heading(captions[r] if captions else f"#{r}", truth_names, pred_names)
        row.suptitle(heading, x=0.01, ha="left", fontsize=OVERLAY_FONT, linespacing=1.1)
    handles = [Patch(color=np.asarray(palette[c]) / 255, label=class_names[c]) for c in sorted(shown)]
    if has_ignore:
        handles.append(Patch(color=np.asarray(IGNORE_COLOR) / 255, label="ignore"))
    heading = f"{title}: image | truth | prediction" if title else "image | truth | prediction"
    top.legend(handles=handles, loc="center", ncol=min(max(len(handles), 1), 4), fontsize=OVERLAY_FONT,
               frameon=False, handlelength=1.0, handletextpad=0.4, columnspacing=0.9, title=heading,
               title_fontsize=OVERLAY_FONT, borderaxespad=0.0)
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
