"""What TensorBoard shows without clicking: read back through TensorBoard's own code (the hparams plugin's backend,
which orders the experiment as the HPARAMS tab receives it, the custom-scalars plugin's merged layout, and
EventAccumulator), for a real 2-job sweep run through the command line and for hand-written runs."""
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import forkserver
from conftest import cli_env
from train_seg.reporting import overlays, plots
from train_seg.reporting.events import eval_scalars
from train_seg.evaluation.metrics import metrics_from_confusion
from train_seg.reporting.sinks.tensorboard import (
    MAX_CLASS_CHARTS,
    SWEEP_EXPERIMENT_SUFFIX,
    TensorBoardLogger,
    custom_scalars_layout,
    hparam_keys,
    hparam_metric_tags,
    hparams_from_config,
    rarest_class,
    weighting_heading,
    write_sweep_experiment,
)

CLASSES = ["background", "lake", "road", "car"]
SHARE = [0.8, 0.15, 0.046, 0.004]
SHOWN = 5  # the HPARAMS tab shows the first five hyperparameters and the first five metrics
TINY = ["model=tiny", "trainer.max_steps=2", "dataset.num_train=8", "dataset.num_val=4", "dataset.image_size=64",
        "trainer.batch_size=2", "trainer.num_workers=0", "trainer.progress=false"]
# dataset seed 1 at this size: car is rare (0.6% of the 8 training images) and in the val split, road is not
SWEEP_DATA = ["dataset.seed=1"]


# -- TensorBoard's own view of a logdir ------------------------------------------------------------------------
def _multiplexer(logdir: Path):
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin

    mux = plugin_event_multiplexer.EventMultiplexer()
    mux.AddRunsFromDirectory(str(logdir))
    mux.Reload()
    provider = data_provider.MultiplexerDataProvider(mux, str(logdir))
    return mux, base_plugin.TBContext(data_provider=provider, logdir=str(logdir), multiplexer=mux)


def hparams_view(logdir: Path):
    """``(experiment, session groups)`` as the HPARAMS tab receives them (hparams sorted by the backend)."""
    from tensorboard import context
    from tensorboard.data import provider
    from tensorboard.plugins.hparams import api_pb2, backend_context, list_session_groups

    _, tb_context = _multiplexer(logdir)
    backend = backend_context.Context(tb_context)
    request_context = context.RequestContext()
    content = backend.hparams_metadata(request_context, "")
    experiment = backend.experiment_from_metadata(
        request_context, "", True, content, provider.ListHyperparametersResult(hyperparameters=[], session_groups=[]),
        hparams_limit=1000)  # the limit the frontend asks for
    request = api_pb2.ListSessionGroupsRequest(allowed_statuses=[0, 1, 2, 3], slice_size=100)
    groups = list_session_groups.Handler(request_context, backend, "", request).run().session_groups
    return experiment, list(groups)


def custom_scalars_view(logdir: Path):
    """``(merged layout as JSON, {run: scalar tags})``: what the CUSTOM SCALARS tab draws."""
    from tensorboard import context
    from tensorboard.plugins.custom_scalar.custom_scalars_plugin import CustomScalarsPlugin

    _, tb_context = _multiplexer(logdir)
    tb_context.plugin_name_to_instance = {}
    request_context = context.RequestContext()
    layout = json.loads(CustomScalarsPlugin(tb_context).layout_impl(request_context, ""))
    scalars = tb_context.data_provider.list_scalars(request_context, experiment_id="", plugin_name="scalars")
    return layout, {run: set(tags) for run, tags in scalars.items() if tags}


def _value(value):
    kind = value.WhichOneof("kind")
    return value.number_value if kind == "number_value" else value.string_value


# -- a real 2-job sweep ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tb_sweep")
    result = forkserver.run(
        [sys.executable, "-m", "train_seg", "-m", "weighting=none,inverse", *TINY, *SWEEP_DATA,
         f"paths.cache_dir={root / 'cache'}", f"hydra.sweep.dir={root / 'sweep'}"],
        cwd=root, env=cli_env() | {"OMP_NUM_THREADS": "1"}, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "sweep"


@pytest.mark.slow
def test_sweep_hparams_show_the_varying_key_and_the_rare_class_first(sweep):
    # one experiment, at the sweep root: TensorBoard uses the first one it finds, so jobs write none
    experiments = [p for p in sweep.rglob("events.out.tfevents.*") if p.name.endswith(SWEEP_EXPERIMENT_SUFFIX)]
    assert [p.parent for p in experiments] == [sweep]
    experiment, groups = hparams_view(sweep)
    names = [h.name for h in experiment.hparam_infos]
    assert names[0] == "weighting.scheme" and experiment.hparam_infos[0].differs
    assert not any(h.differs for h in experiment.hparam_infos[1:])  # the rest is constant in this sweep
    assert len(names) <= 6 and "dataset.name" not in names[:SHOWN]
    metrics = [m.name.tag for m in experiment.metric_infos][:SHOWN]
    record = json.loads(next(sweep.glob("0_*/metrics.json")).read_text())
    assert record["rare_classes"] == ["car"] and record["class_stats"]["val"]["image_counts"][3] > 0  # the data
    assert metrics[:3] == ["val/IoU/car", "val/rare_mIoU", "val/mIoU"]  # car: the rarest class
    # one row per job, with its own value and its metric columns filled from the job's last evaluation
    rows = {g.name: g for g in groups}
    assert len(rows) == 2
    assert sorted(_value(g.hparams["weighting.scheme"]) for g in groups) == ["inverse", "none"]
    for group in groups:
        assert _value(group.hparams["loss"]) == "ce" and _value(group.hparams["sampler"]) == "none"
        assert {m.name.tag for m in group.metric_values} >= set(metrics)
        assert group.sessions[0].status == 1  # STATUS_SUCCESS


@pytest.mark.slow
def test_sweep_run_names_start_with_the_swept_key(sweep):
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert [j.split(",")[0] for j in jobs] == ["0_weighting=none", "1_weighting=inverse"]
    _, groups = hparams_view(sweep)
    assert sorted(g.name for g in groups) == jobs


@pytest.mark.slow
def test_sweep_custom_scalars_have_no_empty_or_duplicate_chart(sweep):
    layout, runs = custom_scalars_view(sweep)
    assert len(runs) == 2
    charts = [(category["title"], chart) for category in layout["category"] for chart in category["chart"]]
    seen: dict[frozenset, str] = {}
    for category, chart in charts:
        regexes = chart["multiline"]["tag"]
        for run, tags in runs.items():
            matched = frozenset(t for t in tags if any(re.match(r, t) for r in regexes))
            assert matched, f"{category} / {chart['title']}: empty in {run}"
            assert len(matched) == 1, f"{category} / {chart['title']}: several tags, one colour"
        key = frozenset(t for tags in runs.values() for t in tags if any(re.match(r, t) for r in regexes))
        assert key not in seen, f"{chart['title']} repeats {seen.get(key)}"
        seen[key] = chart["title"]
    titles = [c["title"] for c in layout["category"]]
    assert titles[0] == "rare classes" and "overview" in titles
    assert "IoU per class, rarest first (not in the val split: road)" in titles  # why road has no chart
    assert not any("best/" in t for tags in seen for t in tags)  # best/val/mIoU would repeat val/mIoU


@pytest.mark.slow
def test_sweep_pred_share_for_every_class_and_text_names_the_scheme(sweep):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for job, scheme in (("0_", "none"), ("1_", "inverse")):
        (run,) = [p for p in sweep.iterdir() if p.name.startswith(job)]
        acc = EventAccumulator(str(run), size_guidance={"scalars": 0, "tensors": 0, "images": 0})
        acc.Reload()
        scalars = acc.Tags()["scalars"]
        shares = [acc.Scalars(f"val/pred_share/{name}")[-1].value for name in CLASSES]
        assert sum(shares) == pytest.approx(1.0, abs=1e-5) and all(0 <= s <= 1 for s in shares)
        text = acc.Tensors("class_weights/text_summary")[0].tensor_proto.string_val[0].decode()
        assert text.splitlines()[0].startswith(f"**class weights: {scheme}**")
        never = [n for n, s in zip(CLASSES, shares) if s == 0]
        assert all(f"val/precision/{n}" not in scalars for n in never)  # the card pred_share stands in for
        assert "val/overlays" in acc.Tags()["images"]


# -- hparams, by hand --------------------------------------------------------------------------------------------
def test_hparam_keys_put_the_swept_ones_first_and_add_missing_ones():
    configured = ["loss", "weighting.scheme", "optimizer.lr", "sampler", "seed"]
    assert hparam_keys(configured) == configured
    assert hparam_keys(configured, ["weighting"]) == ["weighting.scheme", "loss", "optimizer.lr", "sampler", "seed"]
    assert hparam_keys(configured, ["loss.gamma", "seed"])[:2] == ["seed", "loss.gamma"]
    # sweeping the optimizer group varies its lr and its choice, which no configured key names
    assert hparam_keys(configured, ["optimizer"])[:2] == ["optimizer.lr", "optimizer"]
    assert "hydra.launcher.n_jobs" not in hparam_keys(configured, ["hydra.launcher.n_jobs"])


def test_hparams_name_the_chosen_option_of_a_group():
    config = {"loss": {"_target_": "train_seg.losses.FocalLoss", "gamma": 2.0}, "sampler": {"_target_": None},
              "optimizer": {"_target_": "torch.optim.SGD", "lr": 0.02}}
    values = hparams_from_config(config, ["loss", "sampler", "optimizer._target_", "optimizer.lr", "experiment"],
                                 {"loss": "focal", "sampler": "none", "experiment": "quick", "optimizer.lr": "9"})
    assert values == {"loss": "focal", "sampler": "none", "optimizer._target_": "SGD", "optimizer.lr": 0.02,
                      "experiment": "quick"}


def test_metric_columns_start_with_the_rarest_class():
    assert rarest_class(CLASSES, SHARE) == "car"
    assert rarest_class(CLASSES, [0.7, 0.3, 0.0, 0.0]) == "lake"  # a class without training pixels is skipped
    assert rarest_class(CLASSES, SHARE, [True, True, True, False]) == "road"  # car is not in the val split
    tags = hparam_metric_tags(CLASSES, "val/rare_mIoU", SHARE)
    assert tags[:SHOWN] == ["val/IoU/car", "val/rare_mIoU", "val/mIoU", "val/recall/car", "val/pred_share/car"]
    assert tags[SHOWN:] == ["best/val/rare_mIoU", "best/epoch", "val/IoU/road", "val/IoU/lake", "val/IoU/background"]


def test_run_context_tells_a_sweep_job_from_a_single_run(tmp_path):
    import yaml

    from train_seg.config.naming import job_context

    sweep = tmp_path / "sweep"
    job = sweep / "0_weighting=none"
    job.mkdir(parents=True)
    (sweep / "multirun.yaml").write_text(yaml.safe_dump(
        {"hydra": {"overrides": {"task": ["weighting=none,inverse", "trainer.max_steps=2"]}}}))
    hydra = {"mode": "MULTIRUN", "sweeper": {"params": {"loss": "ce,focal"}},
             "overrides": {"task": ["weighting=none", "loss=focal"]},
             "runtime": {"choices": {"loss": "ce", "sampler": "none", "hydra/launcher": "basic"}}}
    context = job_context(hydra, job)
    assert context.multirun and context.swept == ("loss", "weighting")
    assert context.choices["loss"] == "focal" and context.choices["sampler"] == "none"  # the override wins
    assert "hydra/launcher" not in context.choices
    assert not job_context({**hydra, "mode": "RUN"}, job).multirun
    assert job_context({**hydra, "mode": "RunMode.MULTIRUN"}, job).multirun  # the enum as OmegaConf gives it
    # no Hydra node (the Python API): the sweep's multirun.yaml still tells
    assert job_context(None, job).multirun and job_context(None, job).swept == ("weighting",)
    assert not job_context(None, tmp_path / "elsewhere").multirun


def test_a_run_is_handed_the_choices_of_its_hydra_job(tmp_path):
    """The in-memory HydraConfig of the job reaches the run (no file is read): prepare inside a composed Hydra
    config with runtime choices gives run.context those choices."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from train_seg.config.naming import current_job_context

    HydraConfig.instance().cfg = OmegaConf.create({"hydra": {
        "mode": "RUN", "runtime": {"choices": {"loss": "focal", "hydra/launcher": "basic"}},
        "overrides": {"task": ["weighting=inverse"]}}})
    try:
        context = current_job_context(tmp_path)
    finally:
        HydraConfig.instance().cfg = None
    assert not context.multirun and dict(context.choices) == {"loss": "focal", "weighting": "inverse"}
    assert current_job_context(tmp_path).choices == {}  # outside a Hydra app


def _run_dir(path: Path, hparams: dict, experiment: bool, scalars: dict) -> Path:
    tb = TensorBoardLogger(path, flush_secs=1)
    tb.log_hparams(hparams, hparam_metric_tags(CLASSES, "val/mIoU", SHARE), experiment=experiment)
    tb.log_scalars(scalars, step=1)
    tb.log_session_end(success=True)
    tb.close()
    return path


def test_outputs_logdir_with_a_single_run_and_a_sweep_is_one_sensible_table(tmp_path):
    """--logdir outputs/: TensorBoard picks one experiment among the single run's and the sweep's; whichever it is,
    it names every configured hyperparameter, the rare class comes first, and every run is a row."""
    base = {"loss": "ce", "weighting.scheme": "none", "optimizer.lr": 0.02, "sampler": "none", "seed": 42}
    scalars = {"val/IoU/car": 0.1, "val/rare_mIoU": 0.1, "val/mIoU": 0.5}
    _run_dir(tmp_path / "2026-11-22" / "09-00-00", base, True, scalars)
    sweep = tmp_path / "multirun" / "2026-11-22" / "10-00-00"
    jobs = [_run_dir(sweep / f"{i}_weighting={s}", {**base, "weighting.scheme": s}, False, scalars)
            for i, s in enumerate(["none", "median_freq"])]
    write_sweep_experiment(sweep, jobs, hparam_metric_tags(CLASSES, "val/mIoU", SHARE), ["weighting"])
    experiment, groups = hparams_view(tmp_path)
    assert {h.name for h in experiment.hparam_infos} == set(base)
    assert [m.name.tag for m in experiment.metric_infos][:2] == ["val/IoU/car", "val/rare_mIoU"]
    assert len(groups) == 3
    # the sweep directory alone: its root experiment, the swept key first
    experiment, groups = hparams_view(sweep)
    assert experiment.hparam_infos[0].name == "weighting.scheme" and experiment.hparam_infos[0].differs
    assert sorted(experiment.hparam_infos[0].domain_discrete.values[i].string_value for i in range(2)) == \
        ["median_freq", "none"]
    assert len(groups) == 2
    # written again (summary re-run): replaced, not a second experiment
    write_sweep_experiment(sweep, jobs, hparam_metric_tags(CLASSES, "val/mIoU", SHARE), ["weighting"])
    assert len(list(sweep.glob(f"*{SWEEP_EXPERIMENT_SUFFIX}"))) == 1


def test_sweep_experiment_is_skipped_without_sessions(tmp_path):
    (tmp_path / "0_job").mkdir()
    assert write_sweep_experiment(tmp_path, [tmp_path / "0_job"], ["val/mIoU"], ["weighting"]) is None
    assert not list(tmp_path.glob("events.out.tfevents.*"))


# -- scalars and layout ------------------------------------------------------------------------------------------
def test_pred_share_is_the_column_share_and_zero_for_a_never_predicted_class():
    confusion = torch.tensor([[6, 2, 0], [1, 1, 0], [0, 0, 0]])  # class 2 absent and never predicted
    scalars = eval_scalars(metrics_from_confusion(confusion), ["a", "b", "c"], confusion)
    assert [scalars[f"val/pred_share/{n}"] for n in "abc"] == [0.7, 0.3, 0.0]
    assert np.isnan(scalars["val/precision/c"])  # why pred_share is there: precision has no point
    assert "val/pred_share/a" not in eval_scalars(metrics_from_confusion(confusion), ["a", "b", "c"])


def test_layout_gives_every_tag_one_chart_and_absent_classes_no_empty_chart():
    layout = custom_scalars_layout(CLASSES + ["boat"], ["car", "boat"], SHARE + [0.001],
                                   val_present=[True, True, True, True, False])
    rare = layout["rare classes"]
    assert list(rare)[0].startswith("boat: share of predicted pixels (absent from the val split")
    assert not any(t.startswith("boat: IoU") or t.startswith("boat: recall") for t in rare)
    regexes = [r for category in layout.values() for _, (kind, tags) in category.items() for r in tags]
    assert all(kind == "Multiline" for category in layout.values() for kind, _ in category.values())
    assert len(regexes) == len(set(regexes)) and all(r.startswith("^") and r.endswith("$") for r in regexes)
    assert "rare-class mIoU" not in layout["overview"]  # one rare class in val: it would repeat car's IoU
    assert not any("objects found" in t for t in rare)
    counted = custom_scalars_layout(CLASSES + ["boat"], ["car", "boat"], SHARE + [0.001],
                                    val_present=[True, True, True, True, False], object_names=["car", "boat"])
    assert counted["rare classes"]["car: objects found (object recall, IoU > 0.5)"] == \
        ["Multiline", ["^val/objects/recall/car$"]]
    assert not any(t.startswith("boat: objects") for t in counted["rare classes"])  # absent from val: no chart
    many = [f"c{i}" for i in range(MAX_CLASS_CHARTS + 5)]
    big = custom_scalars_layout(many, [], [1.0 / len(many)] * len(many))
    (title,) = [t for t in big if t.startswith("IoU per class")]
    assert len(big[title]) == MAX_CLASS_CHARTS and f"of {len(many)}" in title


def test_weighting_heading_names_the_scheme():
    assert weighting_heading({"scheme": "power", "normalize": "mean", "power": 0.5}) == \
        "**class weights: power** (normalize=mean, power=0.5)"
    assert weighting_heading(None) == "**class weights**"


# -- overlays ----------------------------------------------------------------------------------------------------
class _Source:
    ignore_index = 255

    def __init__(self, image, mask):
        self.image, self.mask = image, mask

    def load_image(self, index):
        return self.image

    def load_mask(self, index):
        return self.mask


def test_source_view_is_the_uint8_image_with_the_val_geometry():
    import albumentations as A
    from albumentations.pytorch import ToTensorV2

    from train_seg.data.base import SegmentationDataset

    rng = np.random.default_rng(0)
    image = (100 + rng.integers(-3, 4, size=(20, 30, 3))).astype(np.uint8)  # flat grey + mild noise
    mask = np.zeros((20, 30), dtype=np.uint8)
    transform = A.Compose([A.PadIfNeeded(min_height=32, min_width=32, border_mode=0, fill=0, fill_mask=255),
                           A.Normalize(mean=[0.5] * 3, std=[0.25] * 3), ToTensorV2()])
    dataset = SegmentationDataset(_Source(image, mask), transform)
    _, item_mask = dataset[0]
    view = overlays.source_view(dataset, 0, item_mask.shape)
    assert view.dtype == np.uint8 and view.shape == (32, 32, 3)
    inside = item_mask.numpy() != 255
    assert inside.sum() == image.shape[0] * image.shape[1]
    assert np.array_equal(np.sort(view[inside].ravel()), np.sort(image.ravel()))  # the pixels, not a stretch
    assert (view[~inside] == 0).all()  # the padding, as the pipeline pads
    other = SegmentationDataset(_Source(image, mask), lambda image, mask: {"image": image[:10], "mask": mask[:10]})
    assert overlays.source_view(other, 0, (10, 30)).shape == (10, 30, 3)  # not albumentations: resized to the mask


def test_overlay_fill_images_show_more_than_the_background():
    presence = np.zeros((10, 3), dtype=bool)
    presence[:, 0] = True
    presence[[1, 4, 7], 1] = True
    presence[[2], 2] = True
    picks = overlays.select_overlay_indices(presence, [0.9, 0.09, 0.01], 4)
    assert picks[0] == 2 and set(picks[1:]) == {1, 4, 7}


def test_overlay_text_is_large_horizontal_and_the_legend_is_on_top():
    masks = [np.array([[0, 1], [2, 0]]), np.array([[0, 0], [0, 3]])]
    figure = overlays.overlay_figure([np.zeros((2, 2, 3), np.uint8)] * 2, masks, [np.zeros((2, 2), int)] * 2,
                                      [(0, 0, 0), (0, 0, 255), (255, 128, 0), (255, 0, 0)], CLASSES,
                                      captions=["val #3", "val #8"], title="epoch 2")
    from matplotlib.text import Text

    plots.figure_to_array(figure)
    texts = [t for t in figure.findobj(Text) if t.get_text()]
    assert {t.get_text() for t in texts} >= {
        "val #3 · truth: background, lake, road\npredicted: background · missed: lake, road",
        "val #8 · truth: background, car\npredicted: background · missed: car"}
    # 17 px at actual size, about 12 px in a TensorBoard image card (which shrinks the 500 px figure to ~350 px)
    assert all(t.get_fontsize() >= 12 and t.get_rotation() == 0 for t in texts)
    assert plots.figure_to_array(figure).shape[1] <= 520
    (legend,) = [legend for sub in figure.subfigs for legend in sub.legends]
    assert [t.get_text() for t in legend.get_texts()] == CLASSES  # the classes shown, no unused ignore entry
    assert all(t.get_fontsize() >= 12 for t in legend.get_texts())
    renderer = figure.canvas.get_renderer()
    top_of_axes = max(ax.get_window_extent(renderer).y1 for ax in figure.axes)
    assert legend.get_window_extent(renderer).y0 >= top_of_axes  # above every panel
