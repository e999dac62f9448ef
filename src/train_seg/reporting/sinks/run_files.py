"""The run's own files: ``last.pt`` (and ``best.pt`` on an improving epoch) and ``metrics.json`` after every epoch,
``last.pt`` with the epoch's position also mid-epoch (``trainer.checkpoint_every_*``, stop signals);
at the end ``metrics.json`` marked ``completed`` and ``per_class.png`` (IoU against training pixel share, recall
and precision of the last evaluation); or ``metrics.json`` marked ``failed`` / ``interrupted`` / ``pruned`` (an Optuna
trial its pruner stopped) with the error when the loop raised. Always on, and always the last sink, so the files describe everything the other sinks reported."""
from __future__ import annotations

from train_seg.reporting import record
from train_seg.atomic import atomic_write, link_or_copy
from train_seg.checkpoint import save_checkpoint
from train_seg.reporting.events import Checkpoint, EpochEnd, EvalResult, Sink
from train_seg.reporting.plots import result_figure

PER_CLASS_PNG = "per_class.png"


class RunFilesSink(Sink):
    def __init__(self) -> None:
        self.run = None
        self.final: dict | None = None  # the last evaluation entry of this process's run
        self.last_result: EvalResult | None = None

    def on_train_start(self, run) -> None:
        self.run = run
        run.run_dir.mkdir(parents=True, exist_ok=True)

    def on_checkpoint(self, checkpoint: Checkpoint) -> None:
        run = self.run
        save_checkpoint(run.run_dir / "last.pt", run.checkpoint_state(checkpoint.epoch, checkpoint.progress))
        record.write(run.run_dir, run.record("running", self.final))

    def on_eval(self, result: EvalResult) -> None:
        self.final = result.entry()
        self.last_result = result

    def on_epoch_end(self, end: EpochEnd) -> None:
        run = self.run
        last = save_checkpoint(run.run_dir / "last.pt", run.checkpoint_state(end.epoch))
        if end.improved:  # the same state: link (or copy) the file just written instead of serialising it again
            link_or_copy(last, run.run_dir / "best.pt")
        record.write(run.run_dir, run.record("running", self.final))

    def on_train_end(self, run) -> None:
        if self.last_result is not None:
            figure = result_figure(self.last_result, float(run.config["rare_share"]))
            atomic_write(run.run_dir / PER_CLASS_PNG, lambda handle: figure.savefig(handle, format="png"), binary=True)
        record.write(run.run_dir, run.record("completed", self.final))

    def on_failure(self, error: BaseException) -> None:
        if self.run is None:
            return
        record.write(self.run.run_dir, self.run.record(record.status_of(error), self.final,
                                                       record.describe_error(error)))
