"""Test-only fork server: ``python -m train_seg ...`` and ``python -c ...`` subprocesses without their start-up.

Every command-line test used to start a fresh interpreter that spent seconds importing torch, Hydra and
albumentations before doing anything. Here one helper process per pytest process imports them once (and nothing
else: no tensor is created, no thread started) and then forks a child per command. The child is a real, separate
process with the command's argv, environment, working directory and thread count; its stdout and stderr go to
files, and its exit status is reported as subprocess's would be (``-N`` for a signal). ``run`` stands in for
``subprocess.run(..., capture_output=True, text=True)`` and ``popen`` for ``subprocess.Popen`` (``pid``, ``poll``,
``wait``, ``kill``, ``communicate``). It serves ``python -m train_seg...``, ``python -c ...`` and ``python
script.py ...``; other commands (another executable, ``-m`` of a module outside ``train_seg``, torchrun), and
every command when ``TRAIN_SEG_TEST_FORK=0``, run as ordinary subprocesses.
"""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ENABLED = os.environ.get("TRAIN_SEG_TEST_FORK", "1") != "0"
PRELOAD = ("torch", "torch._dynamo", "hydra", "omegaconf", "albumentations", "matplotlib", "PIL.Image",
           "torch.utils.tensorboard", "train_seg.__main__", "train_seg.engine.trainer", "train_seg.cli.evaluate",
           "train_seg.cli.predict", "train_seg.cli.export", "train_seg.cli.stats")


# -- the server side ------------------------------------------------------------------------------------------
def _child(request: dict) -> None:
    """Runs in the forked child: becomes the requested command, never returns."""
    code = 1
    try:
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        stdin = os.open(os.devnull, os.O_RDONLY)
        out = os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        err = os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        for source, target in ((stdin, 0), (out, 1), (err, 2)):
            os.dup2(source, target)
            os.close(source)
        sys.stdin = open(0, closefd=False)
        if "OMP_NUM_THREADS" in os.environ:
            import torch

            torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        code = _execute(request["argv"])
    except SystemExit as exc:
        code = _exit_status(exc)
    except BaseException:  # noqa: BLE001  what the interpreter does with an uncaught exception
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        code = _finalize(code)
        os._exit(code)


def _execute(argv: list[str]) -> int:
    import runpy

    if argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:]]
        sys.path[0] = os.getcwd()
        for name in (argv[1], f"{argv[1]}.__main__"):  # preloaded: run afresh as __main__, as `python -m` does
            sys.modules.pop(name, None)
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    elif argv[0] == "-c":
        sys.argv = ["-c", *argv[2:]]
        sys.path[0] = ""
        exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
    else:  # a script
        sys.argv = list(argv)
        sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
        runpy.run_path(argv[0], run_name="__main__")
    return 0


def _exit_status(exc: SystemExit) -> int:
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code & 0xFF
    print(exc.code, file=sys.stderr)
    return 1


def _finalize(code: int) -> int:
    """What interpreter shutdown does: wait for non-daemon threads, run atexit handlers, flush the streams."""
    try:
        threading._shutdown()  # type: ignore[attr-defined]
    except BaseException:  # noqa: BLE001
        pass
    import atexit

    try:
        atexit._run_exitfuncs()
    except SystemExit as exc:
        code = _exit_status(exc)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    return code


def serve() -> None:
    """The server's loop: one JSON request per line on stdin, answered with the child's pid on stdout; each
    child's exit status is written to ``<request["status"]>`` when it ends. Exits when stdin closes."""
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    statuses: dict[int, str] = {}
    while True:
        readable, _, _ = select.select([sys.stdin], [], [], 0.02)
        if readable:
            line = sys.stdin.readline()
            if not line:
                break
            request = json.loads(line)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _child(request)
            statuses[pid] = request["status"]
            sys.stdout.write(f"{pid}\n")
            sys.stdout.flush()
        _reap(statuses, block=False)
    while statuses:  # the client went away: let running children finish and record them
        _reap(statuses, block=True)


def _reap(statuses: dict[int, str], block: bool) -> None:
    while statuses:
        try:
            pid, status = os.waitpid(-1, 0 if block else os.WNOHANG)
        except ChildProcessError:
            statuses.clear()
            return
        if pid == 0:
            return
        path = statuses.pop(pid, None)
        if path is not None:
            code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
            Path(path + ".tmp").write_text(str(code))
            os.replace(path + ".tmp", path)


# -- the client side ------------------------------------------------------------------------------------------
class _Server:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.process: subprocess.Popen | None = None
        self.scratch = Path(tempfile.mkdtemp(prefix="train_seg-forkserver-"))
        self.count = 0

    def start(self) -> subprocess.Popen:
        if self.process is None or self.process.poll() is not None:
            env = dict(os.environ)
            env.pop("HYDRA_FULL_ERROR", None)
            self.process = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, text=True, env=env, cwd="/")
            if self.process.stdout.readline().strip() != "ready":
                raise RuntimeError("the test fork server did not start")
        return self.process

    def spawn(self, argv: list[str], cwd, env: dict) -> "Forked":
        with self.lock:
            process = self.start()
            self.count += 1
            stem = self.scratch / str(self.count)
            request = {"argv": argv, "cwd": str(cwd or os.getcwd()), "env": dict(env if env is not None
                                                                                  else os.environ),
                       "stdout": f"{stem}.out", "stderr": f"{stem}.err", "status": f"{stem}.rc"}
            process.stdin.write(json.dumps(request) + "\n")
            process.stdin.flush()
            pid = int(process.stdout.readline())
        return Forked(pid, stem)


_SERVER = _Server()


class Forked:
    """A forked command, with the part of subprocess.Popen's interface the tests use."""

    def __init__(self, pid: int, stem: Path) -> None:
        self.pid = pid
        self.stem = stem
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            status = Path(f"{self.stem}.rc")
            if status.exists():
                self.returncode = int(status.read_text())
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(str(self.pid), timeout)
            time.sleep(0.01)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self.wait(timeout)
        return (Path(f"{self.stem}.out").read_text(errors="replace"),
                Path(f"{self.stem}.err").read_text(errors="replace"))


def _servable(args: list[str]) -> bool:
    if not ENABLED or len(args) < 2 or args[0] != sys.executable:
        return False
    if args[1] == "-c":
        return len(args) >= 3
    if args[1].endswith(".py") and os.path.isfile(args[1]):
        return True
    return args[1] == "-m" and len(args) >= 3 and args[2].split(".")[0] == "train_seg"


def popen(args: list[str], *, cwd=None, env: dict | None = None):
    """``subprocess.Popen(args, stdout=PIPE, stderr=PIPE, text=True)``, forked from the server when it can be."""
    args = [str(a) for a in args]
    if not _servable(args):
        return subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return _SERVER.spawn(args[1:], cwd, env)


def run(args: list[str], *, cwd=None, env: dict | None = None, timeout: float | None = None
        ) -> subprocess.CompletedProcess:
    """``subprocess.run(args, capture_output=True, text=True, timeout=...)``, forked when it can be."""
    process = popen(args, cwd=cwd, env=env)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise
    return subprocess.CompletedProcess(args, process.returncode, stdout, stderr)


if __name__ == "__main__":
    serve()
