"""Stopping a run cleanly on SIGTERM / SIGINT (what SLURM, Kubernetes and Ctrl-C send).

``StopRequest`` is a context manager that, in the main thread, replaces the two handlers: the first signal only
records itself; the training loop sees it after the current step (or evaluation batch), writes a checkpoint, marks
metrics.json ``interrupted`` and raises ``RunInterrupted``. A second signal raises ``KeyboardInterrupt`` at once
(no checkpoint: the previous one stays). The handlers in place before are restored on exit.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class RunInterrupted(KeyboardInterrupt):
    """The run stopped on a signal after saving its state (``signum``, ``epoch`` and ``step`` say where)."""

    def __init__(self, signum: int, epoch: int, step: int, checkpoint):
        super().__init__(f"interrupted by {signal.Signals(signum).name} at epoch {epoch}, step {step}; "
                         f"the run's state is in {checkpoint}")
        self.signum, self.epoch, self.step, self.checkpoint = signum, epoch, step, checkpoint

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum)


class StopRequest:
    """``with StopRequest() as stop: ... if stop.signum: save and raise``. Outside the main thread (where Python
    cannot install handlers, e.g. inside some launchers) it installs nothing and never asks to stop."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt(f"second signal ({signal.Signals(signum).name}): stopped at once")
        self.signum = signum

    def __call__(self) -> bool:
        return self.signum is not None


def requeue_slurm_job(environ=os.environ) -> str | None:
    """``scontrol requeue $SLURM_JOB_ID`` when running under SLURM; returns what happened (None: not under SLURM)."""
    job = environ.get("SLURM_JOB_ID")
    if not job:
        return None
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        return f"SLURM job {job}: scontrol is not on PATH, the job was not requeued"
    result = subprocess.run([scontrol, "requeue", job], capture_output=True, text=True)
    if result.returncode != 0:
        return f"SLURM job {job}: scontrol requeue failed ({(result.stderr or result.stdout).strip()})"
    return f"SLURM job {job} requeued"
