"""TensorBoard output of a run: ``TensorBoardSink`` writes everything a run shows, into the run directory; for a
sweep, ``write_sweep_experiment`` writes the one HPARAMS experiment at the sweep root.

Scalar tags use class NAMES: ``train/loss[/<term>]``, ``train/lr``, ``val/mIoU``, ``val/rare_mIoU``,
``val/pixel_acc``, ``val/mean_acc``, ``val/fwIoU``, ``val/{IoU,precision,recall,dice,pred_share}/<class>``,
``best/<optimized_metric>``, ``best/epoch``. A NaN metric (absent class) is not written, so its curve has a gap.
Also: a custom-scalars layout (``custom_scalars_layout``), hparams, the class-weight and config text, the
row-normalised ``val/confusion`` and ``val/overlays`` images at every evaluation, ``val/per_class`` at the end.

TensorBoard's HPARAMS tab uses the FIRST ``_hparams_/experiment`` summary it finds in the logdir (else one built
from the runs' sessions) and shows the first five hyperparameters (``differs`` first) and metrics. So a single
run writes its own experiment (metrics in ``hparam_metric_tags`` order) and session; a sweep job writes only its
session, and the sweep callback writes the experiment with the varied keys marked ``differs``.
"""
from __future__ import annotations

import math
import re
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from train_seg.evaluation.objects import counted_classes
from train_seg.reporting.events import OBJECTS, PRED_SHARE, TAG_NAMES, EpochEnd, EvalResult, Sink, TrainLog

# -- hparams ---------------------------------------------------------------------------------------------------
_MISSING = object()
# event files of the sweep root's HPARAMS experiment (replaced, never appended to, when it is written again)
SWEEP_EXPERIMENT_SUFFIX = ".sweep_hparams"


def hparams_from_config(config: Mapping, keys: Sequence[str],
                        choices: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Values of the dotted ``keys`` of a plain (resolved) config dict, as TensorBoard hparams.

    Numbers, strings and booleans are kept (a ``..._target_`` keeps its class name only). A config node is the
    name of the option chosen for that config group when ``choices`` knows it (``{"loss": "focal"}``: Hydra's
    ``hydra.runtime.choices`` and the command-line overrides, see ``train_seg.config.naming.job_context``), else one compact string
    (``loss`` -> ``"FocalLoss(gamma=2.0, ignore_index=255)"``, the ``_target_``'s class name or a weighting's
    ``scheme`` first); lists and null become strings. A key missing from the config is its choice
    (``experiment`` -> ``"quick"``) or ``"n/a"``. Every job of a sweep therefore logs the same hparam names, which the
    HPARAMS tab needs to line jobs up in one table."""
    choices = dict(choices or {})
    out: dict[str, Any] = {}
    for key in keys:
        node: Any = config
        for part in str(key).split("."):
            node = node.get(part, _MISSING) if isinstance(node, Mapping) else _MISSING
        if node is _MISSING or (isinstance(node, Mapping) and choices.get(key) is not None):
            out[key] = str(choices.get(key) or "n/a")
        elif isinstance(node, str) and str(key).endswith("_target_"):
            out[key] = node.rsplit(".", 1)[-1]
        elif isinstance(node, (bool, int, float, str)):
            out[key] = node
        else:
            out[key] = _compact(node)
    return out


def _compact(value: Any) -> str:
    if isinstance(value, Mapping):
        name = str(value.get("_target_") or value.get("scheme") or "").rsplit(".", 1)[-1]
        args = ", ".join(f"{k}={_compact(v)}" for k, v in value.items() if k not in ("_target_", "_partial_", "scheme"))
        return f"{name}({args})"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_compact(v) for v in value) + "]"
    return str(value)


def _under(key: str, keys: Sequence[str]) -> bool:
    """``key`` is one of ``keys`` or lies inside one of them (``weighting.scheme`` inside ``weighting``)."""
    return any(key == k or key.startswith(k + ".") for k in keys)


def hparam_keys(configured: Sequence[str], swept: Sequence[str] = ()) -> list[str]:
    """The hparam names of a run: the ``configured`` keys that a sweep varies (a swept key or inside one:
    sweeping the group ``optimizer`` varies ``optimizer.lr``) first, then the swept keys not configured, then the
    other configured keys. A swept group whose choice is already named by a configured ``<group>.scheme`` or
    ``<group>._target_`` is not added again (``weighting`` by ``weighting.scheme``). ``hydra.*`` keys are left
    out."""
    configured = list(dict.fromkeys(str(k) for k in configured))
    swept = [str(k) for k in dict.fromkeys(swept) if not str(k).startswith("hydra")]
    first = [k for k in configured if _under(k, swept)]
    added = [s for s in swept if not {s, f"{s}.scheme", f"{s}._target_"} & set(configured)]
    return list(dict.fromkeys(first + added + [k for k in configured if not _under(k, swept)]))


def rarest_class(class_names: Sequence[str], pixel_share: Sequence[float] | None,
                 val_present: Sequence[bool] | None = None) -> str | None:
    """The class with the smallest training pixel share among those with training pixels that are in the val split
    (``val_present``; a class absent from it has no IoU to show), else among all with a share."""
    if not class_names or pixel_share is None or len(pixel_share) != len(class_names):
        return None
    present = list(val_present) if val_present is not None and len(val_present) == len(class_names) else None
    pairs = [(float(s), i) for i, s in enumerate(pixel_share) if not math.isnan(float(s))]
    candidates = [p for p in pairs if p[0] > 0 and (present is None or present[p[1]])] or pairs
    return class_names[min(candidates)[1]] if candidates else None


def hparam_metric_tags(class_names: Sequence[str], optimized_metric: str, pixel_share: Sequence[float] | None = None,
                       val_present: Sequence[bool] | None = None) -> list[str]:
    """The scalar tags shown as metric columns of the HPARAMS tab, in order (the tab shows the first five; it reads
    each tag's LAST value). With ``pixel_share`` (training split): the rarest class's IoU (``rarest_class``: in the
    val split when ``val_present`` says which are), ``val/rare_mIoU``, ``val/mIoU``, the rarest class's recall and
    predicted-pixel share, then ``best/<optimized_metric>``, ``best/epoch`` and every other class's IoU, rarest
    first; without it ``val/mIoU``, ``val/rare_mIoU``, the best ones and every class's IoU."""
    rarest = rarest_class(class_names, pixel_share, val_present)
    if rarest is None:
        order = list(class_names)
        tags = ["val/mIoU", "val/rare_mIoU", f"best/{optimized_metric}", "best/epoch"]
    else:
        order = [class_names[i] for i in sorted(range(len(class_names)), key=lambda i: float(pixel_share[i]))]
        tags = [f"val/IoU/{rarest}", "val/rare_mIoU", "val/mIoU", f"val/recall/{rarest}",
                f"val/{PRED_SHARE}/{rarest}", f"best/{optimized_metric}", "best/epoch"]
    return list(dict.fromkeys(tags + [f"val/IoU/{name}" for name in order]))


def _hparam_info(name: str, values: Sequence[Any], differs: bool):
    from google.protobuf import struct_pb2
    from tensorboard.plugins.hparams import api_pb2

    info = api_pb2.HParamInfo(name=name, differs=bool(differs or len(set(map(repr, values))) > 1))
    if values and all(isinstance(v, bool) for v in values):
        info.type = api_pb2.DATA_TYPE_BOOL
        info.domain_discrete.CopyFrom(struct_pb2.ListValue(values=[struct_pb2.Value(bool_value=v)
                                                                   for v in sorted(set(values))]))
    elif values and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        info.type = api_pb2.DATA_TYPE_FLOAT64
        info.domain_interval.min_value, info.domain_interval.max_value = float(min(values)), float(max(values))
    else:  # the filter's check boxes; TensorBoard filters nothing while all are ticked
        info.type = api_pb2.DATA_TYPE_STRING
        info.domain_discrete.CopyFrom(struct_pb2.ListValue(values=[struct_pb2.Value(string_value=v)
                                                                   for v in sorted(set(map(str, values)))]))
    return info


def _hparams_summary(tag: str, **plugin_data):
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2

    content = plugin_data_pb2.HParamsPluginData(**plugin_data)
    return Summary(value=[Summary.Value(tag=tag, metadata=metadata.create_summary_metadata(content))])


def experiment_summary(values: Mapping[str, Sequence[Any]], metric_tags: Sequence[str],
                       differs: Sequence[str] = ()):
    """The ``_hparams_/experiment`` summary: one hyperparameter per entry of ``values`` (name -> the values the
    runs take; ``differs`` when it is in ``differs`` or takes more than one value) and the metric columns, in order."""
    from tensorboard.plugins.hparams import api_pb2, metadata

    experiment = api_pb2.Experiment(
        hparam_infos=[_hparam_info(name, list(vals), name in differs) for name, vals in values.items()],
        metric_infos=[api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag)) for tag in metric_tags])
    return _hparams_summary(metadata.EXPERIMENT_TAG, experiment=experiment)


def session_start_summary(hparams: Mapping[str, Any]):
    """The ``_hparams_/session_start_info`` summary: this run's row of the HPARAMS table."""
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2

    info = plugin_data_pb2.SessionStartInfo(start_time_secs=time.time())
    for name, value in hparams.items():
        if isinstance(value, bool):
            info.hparams[name].bool_value = value
        elif isinstance(value, (int, float)):
            info.hparams[name].number_value = float(value)
        else:
            info.hparams[name].string_value = str(value)
    return _hparams_summary(metadata.SESSION_START_INFO_TAG, session_start_info=info)


def session_end_summary(success: bool):
    """The ``_hparams_/session_end_info`` summary (the table's status: success or failure)."""
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    info = plugin_data_pb2.SessionEndInfo(status=api_pb2.STATUS_SUCCESS if success else api_pb2.STATUS_FAILURE,
                                          end_time_secs=time.time())
    return _hparams_summary(metadata.SESSION_END_INFO_TAG, session_end_info=info)


def read_session_hparams(run_dir: str | Path, max_events: int = 200) -> dict[str, Any] | None:
    """The hparams of the session a run wrote (its ``_hparams_/session_start_info``), read from the first
    ``max_events`` events of each event file in ``run_dir`` (the session comes right after the text summaries);
    None when there is none."""
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader
    from tensorboard.plugins.hparams import metadata

    for path in sorted(Path(run_dir).glob("events.out.tfevents.*")):
        try:
            for count, event in enumerate(LegacyEventFileLoader(str(path)).Load()):
                if count >= max_events:
                    break
                for value in event.summary.value:
                    if value.tag == metadata.SESSION_START_INFO_TAG:
                        info = metadata.parse_session_start_info_plugin_data(value.metadata.plugin_data.content)
                        return {name: _from_proto_value(v) for name, v in info.hparams.items()}
        except Exception:  # a damaged event file is not this run's session
            continue
    return None


def _from_proto_value(value) -> Any:
    kind = value.WhichOneof("kind")
    return {"number_value": value.number_value, "bool_value": value.bool_value}.get(kind, value.string_value)


def write_sweep_experiment(sweep_dir: str | Path, job_dirs: Sequence[str | Path], metric_tags: Sequence[str],
                           swept: Sequence[str] = ()) -> Path | None:
    """Writes the sweep's one HPARAMS experiment into ``sweep_dir`` (an event file ending in
    ``SWEEP_EXPERIMENT_SUFFIX``, replacing an earlier one): the hyperparameters of the jobs' sessions, those under a
    ``swept`` key (or taking several values) marked ``differs``, swept ones first, and ``metric_tags``. Returns the
    file, or None when no job wrote a session (TensorBoard off)."""
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    sessions = [s for s in (read_session_hparams(d) for d in job_dirs) if s]
    if not sessions:
        return None
    names = hparam_keys(list(dict.fromkeys(name for s in sessions for name in s)), swept)
    values = {name: [s[name] for s in sessions if name in s] for name in names}
    summary = experiment_summary(values, metric_tags, differs=[n for n in names if _under(n, swept)])
    sweep_dir = Path(sweep_dir)
    for old in sweep_dir.glob(f"events.out.tfevents.*{SWEEP_EXPERIMENT_SUFFIX}"):
        old.unlink()
    writer = EventFileWriter(str(sweep_dir), filename_suffix=SWEEP_EXPERIMENT_SUFFIX)
    writer.add_event(Event(wall_time=time.time(), summary=summary))
    writer.close()
    return next(sweep_dir.glob(f"events.out.tfevents.*{SWEEP_EXPERIMENT_SUFFIX}"), None)


# -- custom scalars ----------------------------------------------------------------------------------------------
# Classes beyond this many get no IoU chart of their own in CUSTOM SCALARS (the Scalars tab still has every tag).
MAX_CLASS_CHARTS = 40


def _chart(tag: str) -> list:
    return ["Multiline", [f"^{re.escape(tag)}$"]]


def custom_scalars_layout(class_names: Sequence[str], rare_names: Sequence[str] = (),
                          pixel_share: Sequence[float] | None = None,
                          val_present: Sequence[bool] | None = None, object_names: Sequence[str] = ()) -> dict:
    """CUSTOM SCALARS layout: ONE tag per chart, so a chart has one curve per run, in the run's colour (a Multiline
    chart colours its curves by run and tells the tags of one run apart only by markers, assigned in the order the
    data arrives). No tag is on two charts, and no chart is given a tag that may never get a point:

    * ``rare classes``: per rare class (rarest first), its IoU, recall and ``val/pred_share`` (0 = never predicted;
      its precision has no point then, so it stays in the Scalars tab), and its object recall
      (``val/objects/recall``) when it is in ``object_names``; a class absent from the val split (``val_present``
      False) gets only the predicted share;
    * ``IoU per class, rarest first``: the other classes' IoU (those present in the val split, at most
      ``MAX_CLASS_CHARTS``), titled with their training pixel share;
    * ``overview``: ``val/mIoU``, ``val/rare_mIoU`` (when more than one rare class is in the val split; with one it
      is that class's IoU) and ``train/loss``.

    Tags are regular expressions, matched from the start of the tag; each is anchored at both ends."""
    k = len(class_names)
    share = [float(v) for v in pixel_share] if pixel_share is not None else [math.nan] * k
    present = [bool(v) for v in val_present] if val_present is not None else [True] * k
    order = sorted(range(k), key=lambda i: (math.isnan(share[i]), share[i] if not math.isnan(share[i]) else 0.0))
    rare = [i for i in order if class_names[i] in set(rare_names)]
    layout: dict = {}
    if rare:
        charts: dict = {}
        for i in rare:
            name = class_names[i]
            if present[i]:
                charts[f"{name}: IoU"] = _chart(f"val/{TAG_NAMES['iou']}/{name}")
                charts[f"{name}: recall"] = _chart(f"val/{TAG_NAMES['recall']}/{name}")
                charts[f"{name}: share of predicted pixels (0 = never predicted)"] = _chart(f"val/{PRED_SHARE}/{name}")
                if name in object_names:
                    charts[f"{name}: objects found (object recall, IoU > 0.5)"] = _chart(f"val/{OBJECTS}/recall/{name}")
            else:
                charts[f"{name}: share of predicted pixels (absent from the val split: no IoU, no recall)"] = \
                    _chart(f"val/{PRED_SHARE}/{name}")
        layout["rare classes"] = charts
    others = [i for i in order if i not in rare and present[i]]
    if others:
        shown = others[:MAX_CLASS_CHARTS]
        title = "IoU per class, rarest first"
        if len(shown) < len(others):
            title += f" (the {len(shown)} rarest of {len(others)})"
        absent = [class_names[i] for i in order if i not in rare and not present[i]]
        if absent:  # their IoU is NaN, or 0 once predicted: no chart
            title += f" (not in the val split: {', '.join(absent[:5])}{' ...' if len(absent) > 5 else ''})"
        layout[title] = {(f"{class_names[i]} ({100 * share[i]:.2f}% of training pixels)" if not math.isnan(share[i])
                          else class_names[i]): _chart(f"val/{TAG_NAMES['iou']}/{class_names[i]}") for i in shown}
    overview = {"mIoU": _chart("val/mIoU")}
    if sum(present[i] for i in rare) > 1:
        overview["rare-class mIoU"] = _chart("val/rare_mIoU")
    overview["train loss"] = _chart("train/loss")
    layout["overview"] = overview
    return layout


class TensorBoardLogger:
    """Thin wrapper over ``SummaryWriter`` writing into the run directory; NaN scalars are skipped. Every method is a
    no-op when TensorBoard is disabled (callers check ``enabled`` before rendering anything expensive)."""

    def __init__(self, log_dir: str | Path, enabled: bool = True, flush_secs: int = 30, purge_step: int | None = None):
        """``purge_step``: a run resumed in its own directory from step S passes S + 1, so TensorBoard drops the
        points the killed process logged after its checkpoint (no duplicated or rewound steps)."""
        self.enabled = enabled
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(log_dir), flush_secs=flush_secs, purge_step=purge_step)

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        if self.writer is None:
            return
        for tag, value in scalars.items():
            if value is not None and not math.isnan(value):
                self.writer.add_scalar(tag, value, step)

    def log_text(self, tag: str, text: str, step: int = 0, heading: str | None = None) -> None:
        """``text`` as a fixed-width block (TensorBoard renders text as markdown: every line is indented by 4
        spaces), under ``heading`` (markdown) when given."""
        if self.writer is not None:
            block = "\n".join("    " + line for line in text.splitlines())
            self.writer.add_text(tag, f"{heading}\n\n{block}" if heading else block, step)

    def log_layout(self, class_names: Sequence[str], rare_names: Sequence[str] = (),
                   pixel_share: Sequence[float] | None = None, val_present: Sequence[bool] | None = None,
                   object_names: Sequence[str] = ()) -> None:
        """The CUSTOM SCALARS layout (``custom_scalars_layout``); written once per run."""
        if self.writer is not None:
            self.writer.add_custom_scalars(custom_scalars_layout(class_names, rare_names, pixel_share, val_present,
                                                                 object_names))

    def log_hparams(self, hparams: dict[str, Any], metric_tags: Sequence[str], experiment: bool = True) -> None:
        """Registers this run in the HPARAMS tab: its session (its hyperparameters) and, with ``experiment``, an
        experiment naming the hyperparameters and which scalar tags are the metric columns, in order (a job of a
        sweep leaves the experiment to the sweep root, see the module docstring).

        Written at the start of the run into the run's own event file. The HPARAMS tab takes each metric's value
        from the LAST point of that scalar tag in the run, so the columns fill in as training goes and a crashed
        job still shows its last evaluation. (``SummaryWriter.add_hparams`` is not used: it opens a second writer
        in a sub-directory, a new run in every run list, unless ``run_name="."``, and even then it re-writes each
        metric as one more scalar point, which would add a point to the ``val/*`` curves.)"""
        if self.writer is None:
            return
        file_writer = self.writer._get_file_writer()
        if experiment:
            file_writer.add_summary(experiment_summary({k: [v] for k, v in hparams.items()}, metric_tags))
        file_writer.add_summary(session_start_summary(hparams))

    def log_session_end(self, success: bool) -> None:
        """The end of this run's HPARAMS session (status success or failure)."""
        if self.writer is not None:
            self.writer._get_file_writer().add_summary(session_end_summary(success))

    def log_best(self, best: dict, step: int) -> None:
        """``best/<metric>`` and ``best/epoch`` of the best checkpoint so far (HPARAMS metric columns)."""
        if best:
            self.log_scalars({f"best/{best['metric']}": best["value"], "best/epoch": float(best["epoch"])}, step)

    def log_figure(self, tag: str, figure, step: int) -> None:
        """A matplotlib ``Figure`` as an image (rendered by ``train_seg.reporting.plots.figure_to_array``)."""
        if self.writer is not None:
            from train_seg.reporting.plots import figure_to_array

            self.writer.add_image(tag, figure_to_array(figure), step, dataformats="HWC")

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class TensorBoardSink(Sink):
    """Writes the run's TensorBoard events (module docstring) into the run directory.

    Args (``logger.tensorboard`` in the config, where every default lives):
      flush_secs: how often the event file is flushed to disk.
      confusion_image: draw the row-normalised confusion matrix at every evaluation.
      num_overlays: this many fixed validation images drawn as image | ground truth | prediction at every
        evaluation (at least half contain the rarest class present in the val split); 0 = off.
      hparams: config keys logged as hyperparameters in the HPARAMS tab (in a sweep, the keys it varies come
        first and are added when missing, see ``hparam_keys``).
    """

    def __init__(self, flush_secs: int, confusion_image: bool, num_overlays: int, hparams: Sequence[str]):
        self.flush_secs = int(flush_secs)
        self.confusion_image = bool(confusion_image)
        self.num_overlays = int(num_overlays)
        self.hparams = list(hparams)
        self.tb: TensorBoardLogger | None = None
        self.overlays = None
        self.run = None
        self.last_result: EvalResult | None = None

    def on_train_start(self, run) -> None:
        import yaml

        from train_seg.reporting.overlays import OverlaySet, select_overlay_indices
        from train_seg.losses.weighting import format_weight_table

        self.run = run
        step = run.global_step
        self.tb = TensorBoardLogger(run.run_dir, flush_secs=self.flush_secs, purge_step=step + 1 if step else None)
        self.tb.log_text("class_weights", format_weight_table(run.class_names, run.stats, run.weights), step,
                         heading=weighting_heading(run.config.get("weighting")))
        self.tb.log_text("config", yaml.safe_dump(run.config, sort_keys=False), step)
        presence = np.asarray(run.val_stats.presence, dtype=bool).reshape(-1, len(run.class_names))
        val_present = presence.any(axis=0).tolist()  # classes of the val split (the others get no IoU chart)
        counted = counted_classes(run.config.get("metrics"), run.rare)
        self.tb.log_layout(run.class_names, run.rare_names, run.pixel_share, val_present,
                           [run.class_names[i] for i in counted])
        job = run.context
        self.tb.log_hparams(hparams_from_config(run.config, hparam_keys(self.hparams, job.swept), job.choices),
                            hparam_metric_tags(run.class_names, run.config["optimized_metric"], run.pixel_share,
                                               val_present),
                            experiment=not job.multirun)
        if self.num_overlays > 0:
            picks = select_overlay_indices(run.val_stats.presence, run.pixel_share, self.num_overlays)
            self.overlays = OverlaySet(run.val_set, picks, run.class_names, run.palette,
                                       run.val_set.source.ignore_index)

    def on_checkpoint(self, checkpoint) -> None:
        self.tb.flush()

    def on_train_log(self, log: TrainLog) -> None:
        self.tb.log_scalars(log.scalars, log.step)

    def on_eval(self, result: EvalResult) -> None:
        from train_seg.reporting.plots import confusion_figure

        self.last_result = result
        self.tb.log_scalars(result.scalars, result.step)
        if self.confusion_image:
            figure = confusion_figure(result.confusion, result.class_names, f"epoch {result.epoch}")
            self.tb.log_figure("val/confusion", figure, result.step)
        if self.overlays is not None:
            figure = self.overlays.figure(self._overlay_predictions(), f"epoch {result.epoch}")
            self.tb.log_figure("val/overlays", figure, result.step)

    def _overlay_predictions(self) -> list:
        import torch

        from train_seg.evaluation.loop import predict_batch
        from train_seg.evaluation.metrics import predictions

        model, settings = self.run.model, self.run.settings
        model.eval()
        with torch.inference_mode():  # val images may differ in size: one at a time
            return [predictions(predict_batch(model, image.unsqueeze(0), settings.device, settings.amp_dtype,
                                              settings.channels_last))[0].cpu().numpy()
                    for image, _ in self.overlays.items]

    def on_epoch_end(self, end: EpochEnd) -> None:
        if end.evaluation is not None:
            self.tb.log_best(end.best, end.step)
        self.tb.flush()

    def on_train_end(self, run) -> None:
        if self.last_result is not None:
            from train_seg.reporting.plots import result_figure

            figure = result_figure(self.last_result, float(run.config["rare_share"]))
            self.tb.log_figure("val/per_class", figure, self.last_result.step)
        self.tb.log_session_end(success=True)
        self.tb.close()

    def on_failure(self, error: BaseException) -> None:
        if self.tb is not None:
            self.tb.log_session_end(success=False)
            self.tb.close()


def weighting_heading(weighting: Mapping | None) -> str:
    """The first line of the class-weight text: the weighting scheme and its options, e.g.
    ``**class weights: inverse** (normalize=mean, max_ratio=None)``."""
    if not isinstance(weighting, Mapping):
        return "**class weights**"
    options = ", ".join(f"{k}={_compact(v)}" for k, v in weighting.items() if k != "scheme")
    return f"**class weights: {weighting.get('scheme', 'n/a')}**" + (f" ({options})" if options else "")
