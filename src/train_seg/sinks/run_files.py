"""The run's own files: ``last.pt`` (and ``best.pt`` on an improving epoch) and ``metrics.json`` after every epoch,
``metrics.json`` marked ``completed`` at the end, or ``failed`` / ``interrupted`` with the error when the loop
raised. Always on, and always the last sink, so the files describe everything the other sinks reported."""
from __future__ import annotations

from train_seg import record
from train_seg.checkpoint import save_checkpoint
from train_seg.events import EpochEnd, EvalResult, Sink


class RunFilesSink(Sink):
    def __init__(self) -> None:
        self.run = None
        self.final: dict | None = None  # the last evaluation entry of this process's run

    def on_train_start(self, run) -> None:
        self.run = run
        run.run_dir.mkdir(parents=True, exist_ok=True)

    def on_eval(self, result: EvalResult) -> None:
        self.final = result.entry()

    def on_epoch_end(self, end: EpochEnd) -> None:
        run = self.run
        state = run.checkpoint_state(end.epoch)  # captured once: best.pt of this epoch is the same state
        if end.improved:
            save_checkpoint(run.run_dir / "best.pt", state)
        save_checkpoint(run.run_dir / "last.pt", state)
        record.write(run.run_dir, run.record("running", self.final))

    def on_train_end(self, run) -> None:
        record.write(run.run_dir, run.record("completed", self.final))

    def on_failure(self, error: BaseException) -> None:
        if self.run is None:
            return
        status = "interrupted" if isinstance(error, KeyboardInterrupt) else "failed"
        record.write(self.run.run_dir, self.run.record(status, self.final, record.describe_error(error)))
