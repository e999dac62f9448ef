"""The imbalance figures (train_seg.reporting.plots): drawn without raising for every awkward input (failed jobs, absent
classes, never-predicted classes, zero-share classes, a single job, no class at all), the data actually plotted,
readable text, and summary.png of a seeded sweep."""
import math

import numpy as np
import pytest
from matplotlib.text import Text

from train_seg.reporting.plots import figure_to_array, imbalance_figure, per_class_figure, plotted_shares, stack_figures

NAMES = ["background", "lake", "road", "car"]
SHARES = [0.8813, 0.0798, 0.0352, 0.0038]


def axis(figure, gid):
    return next(ax for ax in figure.axes if ax.get_gid() == gid)


def series(figure, g):
    """x and y of configuration g's markers on the IoU-vs-share axis."""
    line = next(line for line in axis(figure, "iou_vs_share").lines if line.get_gid() == f"iou:{g}")
    return np.asarray(line.get_xdata(), dtype=float), np.asarray(line.get_ydata(), dtype=float)


def bar_heights(figure, gid):
    return [patch.get_height() for patch in axis(figure, gid).patches]


def small_texts(figure, minimum=8.0):
    figure_to_array(figure)  # draw: tick labels exist only after a draw
    return [(t.get_text(), t.get_fontsize()) for t in figure.findobj(Text)
            if t.get_visible() and t.get_text().strip() and t.get_fontsize() < minimum]


def test_per_class_figure_plots_iou_at_the_class_shares():
    iou, precision, recall = [0.94, 0.77, 0.34, 0.0], [0.97, 0.80, 0.58, math.nan], [0.97, 0.94, 0.45, 0.0]
    figure = per_class_figure(NAMES, SHARES, iou, precision, recall, title="epoch 12")
    x, y = series(figure, 0)
    assert x.tolist() == SHARES and y.tolist() == iou  # the data plotted are the shares and the IoUs
    assert axis(figure, "iou_vs_share").get_xscale() == "log"
    # bars by decreasing share (here the given order); the never-predicted car has no precision bar but a note
    assert bar_heights(figure, "recall") == pytest.approx(recall)
    assert bar_heights(figure, "precision") == pytest.approx([0.97, 0.80, 0.58, 0.0])
    assert "no pred" in [t.get_text() for t in axis(figure, "precision").texts]
    assert figure_to_array(figure).shape[2] == 3
    assert small_texts(figure) == []  # every text >= 8 pt


def test_per_class_figure_sorts_bars_by_share_and_names_classes():
    figure = per_class_figure(["car", "background"], [0.004, 0.996], [0.1, 0.9], [0.2, 0.95], [0.3, 0.97])
    figure_to_array(figure)
    assert [t.get_text() for t in axis(figure, "precision").get_xticklabels()] == ["background", "car"]
    assert bar_heights(figure, "recall") == pytest.approx([0.97, 0.3])
    assert series(figure, 0)[0].tolist() == [0.004, 0.996]  # the scatter keeps the given order
    car = [t for t in axis(figure, "precision").get_xticklabels() if t.get_text() == "car"][0]
    assert car.get_color() == "tab:red"  # rare (share < 1%)


def test_zero_share_absent_class_and_never_predicted_class():
    names = [*NAMES, "boat", "kite"]
    shares = [*SHARES, 0.0, math.nan]  # boat: no training pixel; kite: share unknown
    iou = [0.9, 0.7, 0.3, math.nan, math.nan, 0.0]  # car absent from val and never predicted
    figure = per_class_figure(names, shares, iou, [0.9, 0.8, 0.5, math.nan, math.nan, math.nan],
                              [0.9, 0.8, 0.4, math.nan, math.nan, 0.0], title="edge cases")
    x, y = series(figure, 0)
    floor = 0.0038 / 3
    assert x.tolist() == pytest.approx([*SHARES, floor, floor])  # clipped onto the log axis, left of every share
    assert np.isnan(y[3]) and np.isnan(y[4]) and y[5] == 0.0
    assert plotted_shares(shares)[1].tolist() == [False] * 4 + [True, True]
    ax = axis(figure, "iou_vs_share")
    assert ax.get_xlim()[0] < floor
    figure_to_array(figure)
    top_labels = [t.get_text() for t in ax.child_axes[0].get_xticklabels()] if ax.child_axes else []
    assert top_labels == [*NAMES, "boat (0%), kite (share ?)"]  # one label per position
    assert "no training pixel" in [t.get_text() for t in ax.texts]
    assert small_texts(figure) == []


def test_imbalance_figure_with_seeds_failed_configuration_and_marks():
    labels = ["0: weighting=none (n=3)", "1: weighting=inverse (n=3)", "2: weighting=enet (n=0, 3 not completed)"]
    iou = [[0.94, 0.74, 0.04, 0.0], [0.70, 0.62, 0.29, 0.2], [math.nan] * 4]
    std = [[0.01, 0.02, 0.03, 0.0], [0.03, 0.02, 0.04, 0.05], [math.nan] * 4]
    figure = imbalance_figure(NAMES, SHARES, labels, iou, iou, iou, iou_std=std, recall_std=std,
                              miou=[0.43, 0.46, math.nan], miou_std=[0.01, 0.02, math.nan],
                              rare_miou=[0.0, 0.2, math.nan], rare_miou_std=[0.0, 0.05, math.nan],
                              marks=["baseline", "▲", ""], rare_share=0.01, title="sweep")
    for g in range(3):
        x, y = series(figure, g)
        assert x.tolist() == SHARES
        assert np.array_equal(y, np.asarray(iou[g]), equal_nan=True)
    means = axis(figure, "means")
    assert "▲" in [t.get_text() for t in means.texts] and "n/a" in [t.get_text() for t in means.texts]
    legend = figure.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == labels
    assert small_texts(figure) == []


@pytest.mark.parametrize("num_groups, num_classes", [(1, 4), (0, 4), (2, 0), (0, 0)])
def test_degenerate_shapes_draw(num_groups, num_classes):
    names, shares = NAMES[:num_classes], SHARES[:num_classes]
    values = np.full((num_groups, num_classes), 0.5)
    figure = imbalance_figure(names, shares, [f"job {g}" for g in range(num_groups)], values, values, values,
                              miou=[0.5] * num_groups, rare_miou=[math.nan] * num_groups, rare_share=0.01)
    assert figure_to_array(figure).size > 0


def test_grouped_bars_one_bar_per_series_and_error_bars_only_where_std_is_known():
    from train_seg.reporting.plots import grouped_bars, new_figure, series_colors

    ax = new_figure(4, 3).add_subplot()
    values = np.array([[0.5, math.nan, 0.0], [0.2, 0.4, 0.6]])
    std = np.array([[0.1, 0.1, math.nan], [math.nan, math.nan, math.nan]])
    positions = grouped_bars(ax, values, series_colors(2), std=std, notes="gaps", nan_text="n/a")
    np.testing.assert_allclose(positions, [[-0.2, 0.8, 1.8], [0.2, 1.2, 2.2]])
    assert [p.get_height() for p in ax.patches] == [0.5, 0.0, 0.0, 0.2, 0.4, 0.6]
    assert [t.get_text() for t in ax.texts] == ["n/a", "0"]  # only the bars nobody can see
    segments = [s for c in ax.collections for s in c.get_segments() if len(s)]
    assert [s[0, 0] for s in segments] == pytest.approx([-0.2, 0.8])  # a NaN std, or none in a series: no error bar


def test_stack_figures_pads_to_the_widest():
    wide = per_class_figure(NAMES, SHARES, [0.5] * 4, [0.5] * 4, [0.5] * 4)
    narrow = per_class_figure(NAMES[:1], SHARES[:1], [0.5], [0.5], [0.5])
    image = stack_figures([wide, narrow])
    a, b = figure_to_array(wide), figure_to_array(narrow)
    assert image.shape == (a.shape[0] + b.shape[0], max(a.shape[1], b.shape[1]), 3)
    assert (image[a.shape[0]:, b.shape[1]:] == 255).all()


def test_summary_png_of_a_seeded_sweep(tmp_path):
    from reporting.test_summary import SEEDED, fake_job  # the hand-made job directories of tests/reporting/test_summary.py

    from train_seg.reporting.summary import summary_figures, summarize, write_summary

    sweep = tmp_path / "sweep"
    num = 0
    for scheme, cars in SEEDED.items():
        for seed, car in enumerate(cars):
            fake_job(sweep, f"{num}_seed={seed},weighting={scheme}", [f"weighting={scheme}", f"seed={seed}"],
                     "failed" if (scheme, seed) == ("enet", 2) else "completed",
                     {"background": 0.9, "car": car, "lake": 0.6, "road": 0.3})
            num += 1
    summary = summarize(sweep)
    top, bottom = summary_figures(summary)
    x, y = series(top, 1)  # weighting=inverse: the mean car IoU at the car's share
    classes = summary.classes
    assert x.tolist() == summary.pixel_share and y[classes.index("car")] == pytest.approx(0.25)
    assert series(top, 2)[1][classes.index("car")] == pytest.approx(0.06)  # the failed seed left out
    assert small_texts(top) == []
    write_summary(sweep)
    assert (sweep / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
