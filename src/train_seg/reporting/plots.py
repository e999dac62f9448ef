"""Every chart train_seg draws: the canvas (``new_figure``, ``figure_to_array``, ``stack_figures``), one colour per
series (``series_colors``), ONE grouped-bar helper (``grouped_bars``) behind every bar chart, the row-normalised
confusion matrix, the class-imbalance figures (``imbalance_figure``: per-class IoU against training pixel share
beside recall and precision bars, and mIoU / rare mIoU; ``per_class_figure`` for one run, ``result_figure`` for one
``EvalResult``) and the sweep summary's per-class IoU bars (``summary_figure``).

Inputs are numpy-compatible arrays; NaN (failed job, absent class, never-predicted class) leaves a gap and never
raises. Drawn with matplotlib's object API on the Agg canvas (never ``pyplot``: no display, no global figure
registry, safe in Hydra jobs and DataLoader workers); no torch import. Text is at least ``FONT`` pt in the imbalance
figures. Image panels (palette, overlays) are in ``train_seg.reporting.overlays``.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
from matplotlib.transforms import blended_transform_factory, offset_copy

__all__ = ["new_figure", "figure_to_array", "stack_figures", "series_colors", "grouped_bars", "row_normalize",
           "confusion_figure", "imbalance_figure", "per_class_figure", "result_figure", "plotted_shares",
           "summary_figure"]

FONT = 8  # pt: the smallest text in the imbalance figures
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h", "*", "p")
# Class names on the IoU-vs-share axis and per-bar notes are dropped above these sizes (they would overlap).
MAX_NAMED_CLASSES = 40
MAX_BAR_NOTES = 64
# Above this many classes the confusion matrix gets no per-cell numbers (unreadable), above MAX_TICK_CLASSES no names.
MAX_ANNOTATED_CLASSES = 20
MAX_TICK_CLASSES = 60
ERROR_KW = {"elinewidth": 0.8, "capsize": 2}


# -- canvas and colours ----------------------------------------------------------------------------------------
def new_figure(width: float, height: float, dpi: int = 100, layout: str | None = None) -> Figure:
    """A ``width`` x ``height`` inch figure on its own Agg canvas (``layout``: matplotlib's, e.g. ``"constrained"``)."""
    figure = Figure(figsize=(width, height), dpi=dpi, layout=layout)
    FigureCanvasAgg(figure)
    return figure


def figure_to_array(figure: Figure) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB rendering of a figure."""
    canvas = figure.canvas if isinstance(figure.canvas, FigureCanvasAgg) else FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def stack_figures(figures: Sequence[Figure]) -> np.ndarray:
    """The figures rendered (at their own dpi) and stacked top to bottom into one ``(H, W, 3)`` uint8 image, each
    left-aligned on white."""
    arrays = [figure_to_array(figure) for figure in figures]
    width = max(array.shape[1] for array in arrays)
    padded = []
    for array in arrays:
        pad = np.full((array.shape[0], width - array.shape[1], 3), 255, dtype=np.uint8)
        padded.append(np.concatenate([array, pad], axis=1))
    return np.concatenate(padded, axis=0)


def series_colors(count: int) -> list:
    """``count`` RGBA colours, one per series (job, configuration): tab10, tab20 above ten (cycled beyond)."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if count <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(count)]


# -- grouped bars ----------------------------------------------------------------------------------------------
def grouped_bars(ax, values, colors: Sequence, *, std=None, labels: Sequence[str] | None = None,
                 notes: str | None = None, nan_text: str = "n/a") -> np.ndarray:
    """One bar per series side by side in each slot: ``values`` ``(S, N)`` (S series in ``colors``, N slots at
    x = 0..N-1; NaN: no bar). ``std`` ``(S, N)``: error bars where finite. ``labels``: the series' legend labels.
    ``notes``: ``"values"`` prints every value above its bar (``nan_text`` for NaN); ``"gaps"`` marks only the bars
    that cannot be seen (``nan_text`` for NaN, ``0``); None: no text. Returns the bars' x positions ``(S, N)``."""
    values = np.asarray(values, dtype=np.float64)
    num_series, num_slots = values.shape
    std = np.full(values.shape, np.nan) if std is None else np.asarray(std, dtype=np.float64).reshape(values.shape)
    bar = 0.8 / max(num_series, 1)
    positions = np.arange(num_slots) - 0.4 + bar * (np.arange(num_series)[:, None] + 0.5)
    for s in range(num_series):
        kwargs = {} if labels is None else {"label": labels[s]}
        err = std[s] if np.isfinite(std[s]).any() else None
        ax.bar(positions[s], np.nan_to_num(values[s], nan=0.0), width=bar, color=colors[s], yerr=err,
               error_kw=ERROR_KW, **kwargs)
        for pos, value in zip(positions[s], values[s]):
            if notes == "values":
                ax.text(pos, (0 if math.isnan(value) else value) + 0.01, nan_text if math.isnan(value) else
                        f"{value:.2f}", ha="center", va="bottom", fontsize=7, rotation=90)
            elif notes == "gaps" and (math.isnan(value) or value == 0):  # a bar nobody can see: say why
                ax.text(pos, 0.02, nan_text if math.isnan(value) else "0", ha="center", va="bottom", rotation=90,
                        fontsize=FONT, color="0.3")
    return positions


def _mark_rare_ticks(labels, rare: Sequence[bool]) -> None:
    """Tick labels of rare classes in red."""
    for tick, is_rare in zip(labels, rare):
        if is_rare:
            tick.set_color("tab:red")


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


# -- class imbalance figures ---------------------------------------------------------------------------------
def _array(values, shape: tuple[int, ...]) -> np.ndarray:
    if values is None:
        return np.full(shape, np.nan)
    return np.asarray(values, dtype=np.float64).reshape(shape)


def plotted_shares(pixel_share: Sequence[float]) -> tuple[np.ndarray, np.ndarray, float]:
    """Where each class sits on the log share axis: ``(x, clipped, floor)``. A positive finite share is its own x;
    a share of 0, negative or NaN (no training pixel, unknown) is put at ``floor`` (a third of the smallest positive
    share, 1e-4 when there is none) and flagged in ``clipped``."""
    share = np.asarray(pixel_share, dtype=np.float64).reshape(-1)
    ok = np.isfinite(share) & (share > 0)
    floor = float(share[ok].min() / 3.0) if ok.any() else 1e-4
    return np.where(ok, share, floor), ~ok, floor


def _percent(x: float, _pos=None) -> str:
    percent = 100.0 * x
    if percent >= 1:
        return f"{percent:g}%"
    return f"{percent:.2g}%"


def imbalance_figure(class_names: Sequence[str], pixel_share: Sequence[float], labels: Sequence[str], iou,
                     precision, recall, *, iou_std=None, precision_std=None, recall_std=None,
                     miou: Sequence[float] | None = None, miou_std: Sequence[float] | None = None,
                     rare_miou: Sequence[float] | None = None, rare_miou_std: Sequence[float] | None = None,
                     marks: Sequence[str] | None = None, rare: Sequence[bool] | None = None,
                     rare_share: float | None = None, title: str | None = None, legend: bool = True) -> Figure:
    """Per-class IoU against training pixel share (log x) for every configuration, beside per-class recall and
    precision bars, plus mIoU / rare mIoU when ``miou`` or ``rare_miou`` is given.

    ``iou``, ``precision``, ``recall`` (and their ``*_std``) are ``(G, K)``: G configurations (``labels``, legend
    text), K classes (``class_names``, ``pixel_share`` = share of the training pixels). NaN = no value. ``*_std``:
    error bars (NaN or None: none). ``miou``, ``rare_miou`` and their std: ``(G,)``; ``marks``: ``(G,)`` short texts
    drawn above each rare-mIoU bar (e.g. ``"▲"``). ``rare``: ``(K,)`` flags; by default ``share < rare_share``.
    """
    names = [str(n) for n in class_names]
    num_classes, num_groups = len(names), len(labels)
    shape = (num_groups, num_classes)
    iou, precision, recall = _array(iou, shape), _array(precision, shape), _array(recall, shape)
    iou_std, precision_std, recall_std = _array(iou_std, shape), _array(precision_std, shape), _array(recall_std, shape)
    share = _array(pixel_share, (num_classes,))
    rare = _rare_flags(share, rare, rare_share)
    with_means = miou is not None or rare_miou is not None
    ncol, legend_in = _legend_size(num_groups, legend)
    figure, grid = _imbalance_grid(num_classes, num_groups, with_means, legend_in, title)
    ax_iou = _panel(figure, grid[:, 0], "iou_vs_share")
    ax_recall, ax_precision = _panel(figure, grid[0, 1], "recall"), _panel(figure, grid[1, 1], "precision")
    colors = series_colors(num_groups)

    _draw_iou_vs_share(figure, ax_iou, names, share, rare, rare_share, iou, iou_std, colors)
    _draw_recall_precision(ax_recall, ax_precision, names, share, rare, recall, recall_std, precision, precision_std,
                           colors)
    if with_means:
        _draw_means(_panel(figure, grid[:, 2], "means"), colors, _array(miou, (num_groups,)),
                    _array(miou_std, (num_groups,)), _array(rare_miou, (num_groups,)),
                    _array(rare_miou_std, (num_groups,)), marks)
    if legend and num_groups:
        handles = [line for line in ax_iou.lines if (line.get_gid() or "").startswith("iou:")]
        figure.legend(handles=handles, labels=[str(label) for label in labels], loc="lower center", ncol=ncol,
                      fontsize=FONT, frameon=False, bbox_to_anchor=(0.5, 0.0))
    _title_and_layout(figure, title, legend_in)
    return figure


def per_class_figure(class_names: Sequence[str], pixel_share: Sequence[float], iou: Sequence[float],
                     precision: Sequence[float], recall: Sequence[float], title: str | None = None,
                     rare_share: float | None = 0.01) -> Figure:
    """One run's per-class picture: IoU against the class's training pixel share (log x) beside its recall and
    precision bars (e.g. the final evaluation of a training run). ``iou``, ``precision``, ``recall``: ``(K,)``,
    NaN = no value; ``pixel_share``: ``(K,)`` shares of the training pixels; rare = share below ``rare_share``."""
    k = len(class_names)
    return imbalance_figure(class_names, pixel_share, [title or "run"], _array(iou, (1, k)),
                            _array(precision, (1, k)), _array(recall, (1, k)), rare_share=rare_share,
                            title=title, legend=False)


def result_figure(result, rare_share: float) -> Figure:
    """``per_class_figure`` of one evaluation (a ``train_seg.reporting.events.EvalResult``: its class names,
    training pixel shares and metrics), titled with its epoch and step."""
    metrics = result.metrics
    return per_class_figure(result.class_names, result.pixel_share, metrics["iou"].tolist(),
                            metrics["precision"].tolist(), metrics["recall"].tolist(),
                            title=f"epoch {result.epoch}, step {result.step}", rare_share=rare_share)


# -- layout ----------------------------------------------------------------------------------------------------
def _rare_flags(share: np.ndarray, rare: Sequence[bool] | None, rare_share: float | None) -> list[bool]:
    """The given flags, else ``share < rare_share`` (never rare without a threshold or a finite share)."""
    if rare is None:
        rare = [rare_share is not None and math.isfinite(s) and s < rare_share for s in share]
    return [bool(r) for r in rare]


def _legend_size(num_groups: int, legend: bool) -> tuple[int, float]:
    """Columns of the figure legend (up to 3) and the height it needs below the panels, in inches (0: none)."""
    ncol = max(1, min(num_groups, 3))
    legend_rows = math.ceil(num_groups / ncol) if legend and num_groups else 0
    return ncol, 0.25 * legend_rows + (0.2 if legend_rows else 0.0)


def _imbalance_grid(num_classes: int, num_groups: int, with_means: bool, legend_in: float, title: str | None):
    """The figure, sized for its classes, configurations, legend and title, and its grid: IoU vs share (left, both
    rows), recall over precision (middle), the means (right, when drawn)."""
    bar_width_in = min(16.0, max(4.2, 1.2 + num_classes * max(0.55, 0.17 * num_groups)))
    widths = [5.6, bar_width_in] + ([0.9 + 0.45 * max(num_groups, 2)] if with_means else [])
    figure = new_figure(sum(widths) + 0.8, _figure_height(legend_in, title))
    return figure, figure.add_gridspec(2, len(widths), width_ratios=widths, height_ratios=(1, 1))


def _figure_height(legend_in: float, title: str | None) -> float:
    return 6.6 + legend_in + (0.3 if title else 0.0)


def _panel(figure: Figure, spec, gid: str):
    """A new axis on ``spec``, with ``gid`` naming it (tests find the panels by gid)."""
    ax = figure.add_subplot(spec)
    ax.set_gid(gid)
    return ax


def _title_and_layout(figure: Figure, title: str | None, legend_in: float) -> None:
    """The title on top and ``tight_layout`` in the space the legend (``legend_in`` inches) and title leave."""
    height = _figure_height(legend_in, title)
    if title:
        figure.suptitle(title, fontsize=FONT + 2)
    bottom = (legend_in + 0.05) / height if legend_in else 0.0
    top = 1.0 - (0.3 / height if title else 0.0)
    figure.tight_layout(rect=(0, bottom, 1, top))


# -- panels ----------------------------------------------------------------------------------------------------
def _draw_iou_vs_share(figure, ax, names, share, rare, rare_share, iou, iou_std, colors) -> None:
    """IoU against training pixel share (log x): the rare band, the floor of the classes without a share, the
    series, the class names on top."""
    x, clipped, floor = plotted_shares(share)
    ax.set_xscale("log")
    left = floor / 2.5
    ax.set_xlim(left, 1.6)
    ax.set_ylim(-0.03, 1.05)
    if rare_share is not None and rare_share > left:
        _shade_rare(ax, left, rare_share)
    if clipped.any():
        ax.axvline(floor, color="0.4", lw=0.8, ls=":")
        ax.text(floor, 0.5, "no training pixel", transform=blended_transform_factory(ax.transData, ax.transAxes),
                rotation=90, ha="right", va="center", fontsize=FONT, color="0.3")
    _draw_iou_series(figure, ax, x, iou, iou_std, colors)
    _style_share_axis(ax)
    if len(names) <= MAX_NAMED_CLASSES:
        left_out = _name_classes_on_top(ax, names, share, rare, x, clipped, left)
    else:
        left_out = len(names)
    title = "IoU against class rarity"
    if left_out:  # said in the title, where it covers no data
        title += f"\n({left_out} class names left out where shares crowd; the bars name every class)"
    ax.set_title(title, fontsize=FONT + 1, loc="left")


def _shade_rare(ax, left: float, rare_share: float) -> None:
    """A red band over the shares below ``rare_share``, its edge dashed and labelled."""
    ax.axvspan(left, rare_share, color="tab:red", alpha=0.07, lw=0)
    ax.axvline(rare_share, color="tab:red", lw=0.8, ls="--", alpha=0.6)
    ax.text(rare_share, 0.985, f" rare: < {_percent(rare_share)} ", transform=blended_transform_factory(
        ax.transData, ax.transAxes), ha="right", va="top", fontsize=FONT, color="tab:red")


def _draw_iou_series(figure, ax, x, iou, iou_std, colors) -> None:
    """One marker series per configuration (gid ``iou:<g>``), with std error bars when finite; a note where there
    is nothing to plot (no evaluation at all, a class without any IoU)."""
    num_groups, num_classes = iou.shape
    # configurations side by side around each class's share (an offset in points: the data stay the shares)
    spread = min(14.0, 4.0 * max(num_groups - 1, 0))
    for g in range(num_groups):
        dx = 0.0 if num_groups == 1 else -spread / 2 + spread * g / (num_groups - 1)
        transform = offset_copy(ax.transData, fig=figure, x=dx, y=0.0, units="points")
        std = iou_std[g]
        yerr = np.where(np.isfinite(std), std, 0.0) if np.isfinite(std).any() else None
        container = ax.errorbar(x, iou[g], yerr=yerr, fmt=MARKERS[g % len(MARKERS)], color=colors[g], ms=6,
                                capsize=3, elinewidth=1, lw=0, transform=transform, zorder=3,
                                markeredgecolor="white", markeredgewidth=0.5)
        container.lines[0].set_gid(f"iou:{g}")
    if np.isnan(iou).all():
        ax.text(0.5, 0.5, "no evaluation to plot", transform=ax.transAxes, ha="center", va="center",
                fontsize=FONT + 1, color="0.35")
    absent = np.isnan(iou).all(axis=0) if num_groups else np.ones(num_classes, dtype=bool)
    for c in np.flatnonzero(absent):
        ax.text(x[c], 0.0, "no IoU", ha="center", va="bottom", fontsize=FONT, color="0.35", rotation=90)


def _style_share_axis(ax) -> None:
    """Percent ticks on the log share axis, axis labels and grid."""
    ax.xaxis.set_major_locator(LogLocator(base=10))
    ax.xaxis.set_major_formatter(FuncFormatter(_percent))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.tick_params(labelsize=FONT)
    ax.set_xlabel("share of the training pixels (log scale)", fontsize=FONT + 1)
    ax.set_ylabel("IoU (final evaluation)", fontsize=FONT + 1)
    ax.grid(alpha=0.3, which="major")


def _name_classes_on_top(ax, names, share, rare, x, clipped, left: float) -> int:
    """Class names on a top axis at their shares (rare ones in red, ``(0%)`` / ``(share ?)`` after a clipped one),
    decluttered where shares crowd; returns how many names were left out."""
    # one tick per position: classes at the same x (e.g. several without training pixels) share a label
    ticks: dict[float, list[int]] = {}
    for c in range(len(names)):
        ticks.setdefault(float(x[c]), []).append(c)
    text = [f"{n} ({'0%' if math.isfinite(s) else 'share ?'})" if clip else n
            for n, s, clip in zip(names, share, clipped)]
    kept = _declutter(list(ticks), [any(rare[c] for c in members) for members in ticks.values()],
                      points_per_decade=_POINTS_PER_DECADE / math.log10(1.6 / left))
    positions = [pos for pos, keep in zip(ticks, kept) if keep]
    groups = [members for members, keep in zip(ticks.values(), kept) if keep]
    top = ax.secondary_xaxis("top")
    top.set_xticks(positions, labels=[", ".join(text[c] for c in members) for members in groups],
                   rotation=40, ha="left", rotation_mode="anchor", fontsize=FONT)
    top.tick_params(axis="x", which="minor", top=False)
    _mark_rare_ticks(top.get_xticklabels(), [any(rare[c] for c in members) for members in groups])
    return len(names) - sum(len(members) for members in groups)


# Width of the IoU-vs-share axis in points (5.6 in column minus margins), spread over its decades.
_POINTS_PER_DECADE = 0.82 * 5.6 * 72
_LABEL_GAP = 12.0  # points between two rotated 8 pt labels on the top axis


def _declutter(positions: Sequence[float], rare: Sequence[bool], points_per_decade: float) -> list[bool]:
    """Which top-axis labels to keep so that no two are closer than ``_LABEL_GAP`` points: rare classes first,
    then the others from the rarest up (greedy)."""
    order = sorted(range(len(positions)), key=lambda i: (not rare[i], positions[i]))
    kept: list[int] = []
    for i in order:
        where = math.log10(positions[i]) * points_per_decade
        if all(abs(where - math.log10(positions[j]) * points_per_decade) >= _LABEL_GAP for j in kept):
            kept.append(i)
    return [i in kept for i in range(len(positions))]


def _draw_recall_precision(ax_recall, ax_precision, names, share, rare, recall, recall_std, precision, precision_std,
                           colors) -> None:
    """The recall and precision bars, classes by decreasing share (unknown shares last)."""
    order = sorted(range(len(names)), key=lambda c: -share[c] if math.isfinite(share[c]) else math.inf)
    names, rare = [names[c] for c in order], [rare[c] for c in order]
    _draw_bars(ax_recall, names, rare, recall[:, order], recall_std[:, order], colors, "recall", "n/a",
               "recall = TP / (TP + FN): low = pixels of the class missed")
    _draw_bars(ax_precision, names, rare, precision[:, order], precision_std[:, order], colors, "precision",
               "no pred", "precision = TP / (TP + FP): low = false alarms")


def _draw_bars(ax, names, rare, values, std, colors, ylabel, nan_note, title) -> None:
    """One bar panel of the imbalance figure: ``values`` / ``std`` ``(G, K)``, classes named below (rare in red)."""
    num_groups, num_classes = values.shape
    grouped_bars(ax, values, colors, std=std, notes="gaps" if num_groups * num_classes <= MAX_BAR_NOTES else None,
                 nan_text=nan_note)
    ax.set_ylim(0, 1.05)
    ax.set_xlim(-0.5, max(num_classes, 1) - 0.5)
    ax.set_ylabel(ylabel, fontsize=FONT + 1)
    ax.set_title(title, fontsize=FONT + 1, loc="left")
    ax.grid(axis="y", alpha=0.3)
    ax.tick_params(labelsize=FONT)
    ax.set_xticks(np.arange(num_classes), labels=names, rotation=30 if num_classes > 6 else 0,
                  ha="right" if num_classes > 6 else "center", fontsize=FONT)
    _mark_rare_ticks(ax.get_xticklabels(), rare)


def _draw_means(ax, colors, miou, miou_std, rare_miou, rare_miou_std, marks) -> None:
    """mIoU and rare mIoU bars per configuration, ``marks`` (short texts) above the rare-mIoU bars."""
    positions = grouped_bars(ax, np.stack([miou, rare_miou], axis=1), colors,
                             std=np.stack([miou_std, rare_miou_std], axis=1), notes="gaps")
    for g, (pos, value, err) in enumerate(zip(positions[:, 1], rare_miou, rare_miou_std)):
        if marks is not None and marks[g] and not math.isnan(value):
            top = value + (0.0 if math.isnan(err) else err) + (0.05 if value == 0 else 0.0)
            ax.text(pos, top + 0.01, str(marks[g]), ha="center", va="bottom", fontsize=FONT + 1,
                    color=colors[g], rotation=90 if len(str(marks[g])) > 2 else 0)
    ax.set_xticks([0, 1], labels=["mIoU", "rare mIoU"], fontsize=FONT)
    ax.set_xlim(-0.5, 1.5)
    ax.set_ylim(0, 1.05)
    ax.grid(axis="y", alpha=0.3)
    ax.tick_params(labelsize=FONT)
    ax.set_title("means", fontsize=FONT + 1, loc="left")


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
    colors = series_colors(num_jobs)
    notes = "values" if num_jobs * num_classes <= 48 else None
    labels = [job if state == "completed" else f"{job} ({state})" for job, state in zip(jobs, status)]
    grouped_bars(ax, iou, colors, labels=labels, notes=notes)
    _label_classes(ax, class_names, pixel_share, rare)
    ax.set_title(title or "per-class IoU per job")
    grouped_bars(ax_mean, np.asarray([miou, rare_miou], dtype=np.float64).T.reshape(num_jobs, 2), colors, notes=notes)
    ax_mean.set_xticks(np.arange(2), labels=["mIoU", "rare mIoU"], fontsize=8)
    ax_mean.set_ylim(0, 1.08)
    ax_mean.grid(axis="y", alpha=0.3)
    ax_mean.set_title("means")
    if num_jobs:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=min(num_jobs, 3), fontsize=7, frameon=False)
    figure.tight_layout()
    return figure


def _label_classes(ax, class_names: Sequence[str], pixel_share: Sequence[float], rare: Sequence[bool]) -> None:
    """Class names with their training pixel share under the IoU bars (rare classes in red), axis labels, grid."""
    labels = [f"{name}\n{100 * share:.2f}%" + ("\n(rare)" if is_rare else "")
              for name, share, is_rare in zip(class_names, pixel_share, rare)]
    ax.set_xticks(np.arange(len(class_names)), labels=labels, fontsize=8)
    _mark_rare_ticks(ax.get_xticklabels(), rare)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("IoU (final evaluation)")
    ax.set_xlabel("class, training pixel share (decreasing)")
    ax.grid(axis="y", alpha=0.3)
