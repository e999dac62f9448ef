"""The one atomic-write helper: every file that must never be seen half-written (checkpoints, the class-statistics
cache, metrics.json, sweep summaries) goes through ``atomic_write``.

Guarantee: the data goes to a temp file in the SAME folder (so the final rename never crosses file systems), is
flushed and fsynced, then renamed over the target with ``os.replace``. A crash, a full disk or an exception in the
writer leaves the previous file intact and removes the temp file. Readers therefore see the old or the new file,
never a mix.
"""
from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable


def atomic_write(path: str | Path, write: Callable[[IO], None], binary: bool = False) -> Path:
    """Calls ``write(handle)`` on a temp file beside ``path``, then renames it over ``path`` (see module docstring).
    Text files are opened with ``newline=""`` (the csv module's convention). Creates the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"newline": "", "encoding": "utf-8"})) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the file the mode open() would
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(path, exc) from exc
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


class DiskFullError(OSError):
    """The disk (or quota) filled while ``atomic_write`` wrote ``path``: the previous file is intact, the temp file
    removed; the message says so and what to do."""

    def __init__(self, path: Path, error: OSError):
        previous = (f"the previous {path} is intact" if path.exists() else f"{path} was not written (there was no "
                    "earlier version)")
        super().__init__(error.errno, (
            f"the disk filled while writing {path} ({error.strerror or error}): {previous} and the partial temp "
            f"file was removed. Free space on the file system of {path.parent} (or choose another paths.output_root), "
            f"then run again; a training run continues from its last checkpoint with trainer.resume={path.parent}."))
        self.path = path

    def __str__(self) -> str:
        return str(self.strerror)


def link_or_copy(source: str | Path, target: str | Path) -> Path:
    """``target`` becomes a file with ``source``'s content, atomically: a hard link renamed over ``target`` (no
    copy; a later ``os.replace`` of ``source`` gives ``source`` a new inode and leaves ``target`` as it was), or,
    where the file system has no hard links, an ``atomic_write`` copy."""
    import shutil

    source, target = Path(source), Path(target)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.link")
    try:
        os.link(source, tmp)
        os.replace(tmp, target)
    except OSError:
        Path(tmp).unlink(missing_ok=True)
        with source.open("rb") as handle:
            atomic_write(target, lambda out: shutil.copyfileobj(handle, out), binary=True)
    return target


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json_atomic(path: str | Path, data: Any) -> Path:
    """``data`` as indented JSON; tensors and numpy arrays become lists."""
    return atomic_write(path, lambda handle: json.dump(data, handle, indent=2, default=_json_default))


def write_text_atomic(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda handle: handle.write(text))


def _json_default(obj):
    if hasattr(obj, "tolist"):  # torch.Tensor, numpy arrays and scalars
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj)}")
