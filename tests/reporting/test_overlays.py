"""TensorBoard extras (custom scalars, hparams, confusion image, prediction overlays) and failure records in
metrics.json. Pictures are checked for their content (normalisation, colours, choice of images), not pixels."""
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from train_seg.reporting import overlays, plots
from train_seg.reporting.record import mark_failed
from train_seg.reporting.sinks.tensorboard import (
    TensorBoardLogger,
    custom_scalars_layout,
    hparam_metric_tags,
    hparams_from_config,
)

CLASSES = ["background", "lake", "road", "car"]


def _accumulator(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def _hparams_content(acc) -> dict:
    from tensorboard.plugins.hparams import metadata

    parsers = {metadata.SESSION_START_INFO_TAG: metadata.parse_session_start_info_plugin_data,
               metadata.SESSION_END_INFO_TAG: metadata.parse_session_end_info_plugin_data,
               metadata.EXPERIMENT_TAG: metadata.parse_experiment_plugin_data}
    return {tag: parsers[tag](content) for tag, content in acc.PluginTagToContent(metadata.PLUGIN_NAME).items()}


# -- confusion matrix ------------------------------------------------------------------------------------------
def test_row_normalize_rows_sum_to_one_and_absent_row_is_nan():
    confusion = np.array([[3, 1, 0], [0, 0, 0], [2, 2, 4]])
    matrix = plots.row_normalize(confusion)
    assert np.allclose(matrix[0], [0.75, 0.25, 0.0]) and np.allclose(matrix[2], [0.25, 0.25, 0.5])
    assert np.isnan(matrix[1]).all()  # class absent from the target: empty row, not zeros


def test_confusion_figure_has_class_names_values_and_absent_marker():
    figure = plots.confusion_figure(np.array([[3, 1, 0], [0, 0, 0], [2, 2, 4]]), ["sky", "cat", "dog"], "epoch 3")
    ax = figure.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["sky", "cat", "dog"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["sky", "cat (absent)", "dog"]
    cells = sorted(t.get_text() for t in ax.texts)
    assert cells == sorted(["0.75", "0.25", "0.00", "0.25", "0.25", "0.50"])  # no numbers in the absent row
    assert ax.get_title().startswith("epoch 3")
    image = plots.figure_to_array(figure)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3


# -- overlays --------------------------------------------------------------------------------------------------
def test_colorize_uses_palette_and_neutral_ignore():
    palette = [(0, 0, 0), (255, 0, 0)]
    rgb = overlays.colorize(np.array([[0, 1], [255, 7]]), palette, ignore_index=255)
    assert rgb[0, 1].tolist() == [255, 0, 0] and rgb[0, 0].tolist() == [0, 0, 0]
    assert rgb[1, 0].tolist() == list(overlays.IGNORE_COLOR) == rgb[1, 1].tolist()


def test_display_image_undoes_normalisation_up_to_contrast():
    raw = np.random.default_rng(0).uniform(0.2, 0.8, size=(3, 16, 16)).astype(np.float32)
    normalised = (raw - 0.5) / 0.25
    shown = overlays.display_image(torch.from_numpy(normalised))
    assert shown.shape == (16, 16, 3) and shown.dtype == np.uint8
    for channel in range(3):  # monotone per channel: brighter raw pixels are never shown darker
        order = np.argsort(raw[channel].ravel())
        assert (np.diff(shown[..., channel].ravel()[order].astype(int)) >= 0).all()
    assert shown.min() == 0 and shown.max() == 255  # stretched to the full range


@pytest.mark.parametrize("count", [1, 2, 4, 5, 7])
def test_overlay_choice_is_deterministic_and_at_least_half_rare(count):
    rng = np.random.default_rng(1)
    presence = np.zeros((20, 4), dtype=bool)
    presence[:, 0] = True
    presence[rng.choice(20, 8, replace=False), 1] = True
    presence[rng.choice(20, 6, replace=False), 2] = True
    presence[[3, 11, 17], 3] = True  # the rarest class is in three images
    share = [0.8, 0.15, 0.04, 0.01]
    picks = overlays.select_overlay_indices(presence, share, count)
    assert picks == overlays.select_overlay_indices(presence, share, count)
    assert len(picks) == len(set(picks)) == count
    with_rare = sum(presence[i, 3] for i in picks)
    assert with_rare >= min(3, math.ceil(count / 2))
    if count >= 3:
        assert presence[picks].any(axis=0).all()  # every present class is shown


def test_overlay_choice_edge_cases():
    presence = np.array([[True, False], [True, False]])
    assert overlays.select_overlay_indices(presence, [0.9, 0.1], 0) == []
    assert sorted(overlays.select_overlay_indices(presence, [0.9, 0.1], 5)) == [0, 1]  # class 1 absent from val
    assert overlays.select_overlay_indices(np.zeros((0, 2), dtype=bool), [0.5, 0.5], 3) == []


# -- hparams and layout ----------------------------------------------------------------------------------------
def test_hparams_from_config_flattens_to_scalars_and_compact_strings():
    config = {"loss": {"_target_": "train_seg.losses.FocalLoss", "gamma": 2.0, "alpha": None},
              "weighting": {"scheme": "inverse", "normalize": "mean"}, "optimizer": {"lr": 0.02}, "seed": 3}
    hparams = hparams_from_config(config, ["loss", "weighting.scheme", "weighting", "optimizer.lr", "seed", "nope.x"])
    assert hparams == {"loss": "FocalLoss(gamma=2.0, alpha=None)", "weighting.scheme": "inverse",
                       "weighting": "inverse(normalize=mean)", "optimizer.lr": 0.02, "seed": 3, "nope.x": "n/a"}


def test_custom_scalars_layout_regexes_match_the_right_tags():
    # one tag per chart (Multiline colours curves by run, not by tag), so the old all-classes chart is gone
    layout = custom_scalars_layout(CLASSES, ["car"], [0.8, 0.15, 0.046, 0.004])
    (iou_regex,) = layout["rare classes"]["car: IoU"][1]
    assert re.match(iou_regex, "val/IoU/car") and not re.match(iou_regex, "val/IoU/carpet")
    assert not re.match(iou_regex, "val/recall/car")
    per_class = layout["IoU per class, rarest first"]
    assert [title.split(" ")[0] for title in per_class] == ["road", "lake", "background"]  # rarest first
    assert all(re.match(regex, f"val/IoU/{name}") for name in ("road", "lake", "background")
               for chart in per_class.values() for regex in chart[1] if name in regex)
    assert "rare classes" not in custom_scalars_layout(CLASSES, [])


def test_tensorboard_logger_keeps_everything_in_the_run_folder(tmp_path):
    tb = TensorBoardLogger(tmp_path, flush_secs=1)
    tb.log_layout(CLASSES, ["car"])
    tb.log_hparams({"weighting.scheme": "inverse", "optimizer.lr": 0.02}, hparam_metric_tags(CLASSES, "val/mIoU"))
    tb.log_scalars({"val/mIoU": 0.5, "val/IoU/car": math.nan}, step=4)
    tb.log_best({"metric": "val/mIoU", "value": 0.5, "epoch": 2}, step=4)
    tb.log_figure("val/confusion", plots.confusion_figure(np.eye(4), CLASSES), step=4)
    tb.close()
    assert [p for p in tmp_path.iterdir() if p.is_dir()] == []  # no sub-run (add_hparams would make one)
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 1
    acc = _accumulator(tmp_path)
    tags = acc.Tags()
    assert "val/confusion" in tags["images"] and "custom_scalars__config__" in tags["tensors"]
    assert set(tags["scalars"]) == {"val/mIoU", "best/val/mIoU", "best/epoch"}  # NaN skipped
    content = _hparams_content(acc)
    experiment = content["_hparams_/experiment"]
    assert [m.name.tag for m in experiment.metric_infos][:4] == ["val/mIoU", "val/rare_mIoU", "best/val/mIoU",
                                                                 "best/epoch"]
    assert {h.name for h in experiment.hparam_infos} == {"weighting.scheme", "optimizer.lr"}
    session = content["_hparams_/session_start_info"]
    assert session.hparams["weighting.scheme"].string_value == "inverse"


def test_disabled_logger_is_a_no_op(tmp_path):
    tb = TensorBoardLogger(tmp_path / "off", enabled=False)
    tb.log_layout(CLASSES)
    tb.log_hparams({"a": 1}, ["val/mIoU"])
    tb.log_best({"metric": "val/mIoU", "value": 0.5, "epoch": 1}, 1)
    tb.close()
    assert not (tmp_path / "off").exists()


# -- failures in metrics.json ----------------------------------------------------------------------------------
def test_mark_failed_keeps_the_last_evaluation(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps({"status": "running", "final": {"epoch": 2}, "history": [1]}))
    payload = mark_failed(tmp_path, RuntimeError("boom"))
    assert payload == json.loads((tmp_path / "metrics.json").read_text())
    assert payload["status"] == "failed" and payload["error"] == "RuntimeError: boom"
    assert payload["final"] == {"epoch": 2} and payload["history"] == [1]
    fresh = mark_failed(tmp_path / "new", ValueError("bad key"))
    assert fresh["status"] == "failed" and fresh["final"] is None and fresh["error"] == "ValueError: bad key"


def test_crash_mid_training_leaves_failed_status_and_last_evaluation(make_cfg, tmp_path, monkeypatch):
    """fit: a crash in epoch 2 keeps epoch 1's evaluation in metrics.json, marked failed; TensorBoard got the
    layout, hparams, the confusion image and the overlays of epoch 1."""
    import train_seg.engine.trainer as train_module

    real_epoch = train_module.train_one_epoch
    calls = []

    def flaky_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated crash in epoch 2")
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_one_epoch", flaky_epoch)
    run_dir = tmp_path / "run"
    cfg = make_cfg("trainer.max_epochs=3", "trainer.eval_every=1", "logger.tensorboard.num_overlays=2", "dataset.num_val=6")
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_module.train(cfg, run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "failed" and metrics["error"] == "RuntimeError: simulated crash in epoch 2"
    assert metrics["final"]["epoch"] == 1 and set(metrics["final"]["per_class"]) == set(CLASSES)
    assert metrics["best"]["epoch"] == 1 and [h["epoch"] for h in metrics["history"]] == [1]

    acc = _accumulator(run_dir)
    assert {"val/confusion", "val/overlays"} <= set(acc.Tags()["images"])
    assert [event.step for event in acc.Images("val/overlays")] == [4]  # epoch 1's evaluation (4 steps)
    content = _hparams_content(acc)
    session = content["_hparams_/session_start_info"].hparams
    assert session["weighting.scheme"].string_value == "none" and session["optimizer.lr"].number_value == 0.02
    assert "val/IoU/car" in [m.name.tag for m in content["_hparams_/experiment"].metric_infos]
    assert "best/val/mIoU" in acc.Tags()["scalars"]
