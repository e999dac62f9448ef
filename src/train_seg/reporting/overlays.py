"""The image side of the pictures: class colours (``colorize``, ``default_palette``, ``class_palette``,
``palette_png``), an image made displayable (``display_rgb`` for raw image pixels, ``display_image`` for a
normalised tensor), the prediction overlay blend that ``train_seg.cli.predict`` writes (``blend``), and the
TensorBoard overlay panels of a fixed set of validation images (``select_overlay_indices``, ``OverlaySet``,
``overlay_figure``). Nothing here runs a model: callers pass predicted label maps. Figures are made on the Agg canvas
of ``train_seg.reporting.plots``; torch and albumentations are imported only where needed.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from train_seg.reporting.plots import new_figure

# Colour of ignore_index pixels in ground-truth and prediction panels: a neutral light grey.
IGNORE_COLOR = (200, 200, 200)


# -- class colours ---------------------------------------------------------------------------------------------
def colorize(mask: np.ndarray, palette: Sequence[Sequence[int]], ignore_index: int | None = 255) -> np.ndarray:
    """``(H, W)`` labels -> ``(H, W, 3)`` uint8 RGB with the dataset palette; ``ignore_index`` and any label outside
    the palette are drawn in ``IGNORE_COLOR`` (``ignore_index=None``: no label is ignored)."""
    lut = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    mask = np.asarray(mask).astype(np.int64)
    valid = (mask >= 0) & (mask < len(lut))
    if ignore_index is not None:
        valid &= mask != ignore_index
    out = np.empty(mask.shape + (3,), dtype=np.uint8)
    out[...] = IGNORE_COLOR
    out[valid] = lut[mask[valid]]
    return out


def default_palette(count: int) -> list[list[int]]:
    """The PASCAL VOC colour map (bits of the index spread over R, G, B): distinct colours for any class count."""
    from train_seg.data.voc import voc_colormap

    return [list(colour) for colour in voc_colormap(count)]


def class_palette(palette: Sequence[Sequence[int]], num_classes: int) -> np.ndarray:
    """``(K, 3)`` uint8: the given colours (e.g. a checkpoint's), the default colour map for classes without one."""
    colours = [list(c)[:3] for c in palette][:num_classes]
    colours += default_palette(num_classes)[len(colours):]
    return np.asarray(colours, dtype=np.uint8).reshape(num_classes, 3)


def palette_png(mask: np.ndarray, colours: np.ndarray):
    """A PIL palette image (mode ``P``, the class colours) of the class indices; 16-bit grey above 256 classes."""
    from PIL import Image

    if len(colours) > 256:
        return Image.fromarray(mask.astype(np.uint16))
    image = Image.fromarray(mask.astype(np.uint8))  # mode L; putpalette makes it P with exactly these colours
    image.putpalette(colours.reshape(-1).tolist())
    return image


# -- displayable images ----------------------------------------------------------------------------------------
def display_rgb(image: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` uint8: raw image pixels as the model sees them before normalisation (through
    ``train_seg.evaluation.inference.as_rgb``: grey repeated, alpha dropped, 16-bit scaled to 8, float [0, 1] to
    255). ``ValueError`` for a shape or dtype ``as_rgb`` refuses."""
    from train_seg.evaluation.inference import as_rgb

    rgb = as_rgb(image)
    return rgb if rgb.dtype == np.uint8 else np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


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
    """uint8 pixels through ``display_rgb``, anything else (a normalised float image) through ``display_image``."""
    image = np.asarray(image)
    return np.ascontiguousarray(display_rgb(image)) if image.dtype == np.uint8 else display_image(image)


def blend(image: np.ndarray, mask: np.ndarray, colours: np.ndarray, alpha: float) -> np.ndarray:
    """``(1 - alpha) * display_rgb(image) + alpha * colour of the pixel's class``, rounded, uint8 ``(H, W, 3)``;
    ``mask`` holds class indices into ``colours``."""
    blended = display_rgb(image).astype(np.float32)
    blended *= np.float32(1.0 - alpha)
    blended += np.float32(alpha) * colorize(mask, colours, None).astype(np.float32)
    return np.rint(blended, out=blended).astype(np.uint8)


# -- overlay panels --------------------------------------------------------------------------------------------
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
    figure = new_figure(3 * OVERLAY_PANEL + 0.2, rows * row_height + 0.75, dpi=OVERLAY_DPI, layout="constrained")
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
