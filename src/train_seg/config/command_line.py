"""What every command line of train_seg shares: where the configs are, which errors are the user's (reported as one
paragraph, exit status 2, no traceback unless ``HYDRA_FULL_ERROR=1``), and composing a config from overrides for
the commands that are not Hydra apps themselves (``python -m train_seg.cli.stats``)."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import NoReturn, Sequence

# inside the package, so an installed wheel finds them (a checkout installed with -e edits them in place)
CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")
# what bad input raises (ConfigError, DatasetError, ModelError, CheckpointError, RecordError are ValueErrors)
USER_ERRORS = (ValueError, FileNotFoundError)


class SetupError(ValueError):
    """Bad input found by a Hydra plugin of ours before any job runs (the Optuna sweeper's settings, a missing
    extra): reported like every user error, one paragraph and exit status 2 (``report_hydra_errors``)."""


# the exit status of every user error, before or during a run: bad input, an output that cannot be written
USER_ERROR_STATUS = 2


def user_message(error: BaseException) -> str:
    """The one paragraph of a user error. An error re-raised by a DataLoader worker carries the worker's traceback
    in its message (torch's ``ExceptionWrapper``): only its last line, the original message, is kept."""
    text = str(error).strip()
    if "Original Traceback (most recent call last):" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text


def exit_with_user_error(prog: str, error: BaseException) -> NoReturn:
    """Prints ``<prog>: error: <message>`` on stderr and exits with status 2 (re-raises with HYDRA_FULL_ERROR=1)."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise error
    print(f"{prog}: error: {user_message(error)}", file=sys.stderr)
    sys.exit(USER_ERROR_STATUS)


def hydra_error_message(error: BaseException) -> str:
    """Hydra's composition error (a bad override, an unknown key or group option, a value of the wrong type) as one
    paragraph: its lines joined, the list of available options on one line, the key named, and the fix."""
    texts = [str(error).strip()]
    cause = error.__cause__
    if cause is not None and str(cause).strip() and str(cause).strip() not in texts[0]:
        texts.append(str(cause).strip())
    sentences: list[str] = []
    options: list[str] = []
    for line in "\n".join(texts).splitlines():
        stripped = line.strip()
        if stripped.startswith("Config search path"):  # what follows lists Hydra's providers
            break
        if not stripped or stripped.startswith(("object_type=", "Set the environment variable HYDRA_FULL_ERROR")):
            continue
        if line.startswith("\t"):  # one available option per line
            options.append(stripped)
            continue
        if stripped.startswith("full_key:"):
            stripped = f"(key: {stripped.split(':', 1)[1].strip()})"
        sentences.append(stripped if stripped[-1] in ".:)" else stripped + ".")
    text = " ".join(sentences)
    if options:
        text = f"{text} {', '.join(options)}."
    return (f"{text} Fix the override: every key, its type and its allowed values are in docs/configuration.md "
            "(the configuration reference), and `--help` lists the groups and their options.")


def hydra_quoted(value) -> str:
    """``value`` as one single-quoted value of Hydra's override grammar (``'a=b,c'``): sweep job directories hold
    ``=`` and ``,``, which unquoted would be a syntax error or a sweep."""
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def report_hydra_errors(prog: str) -> None:
    """Makes Hydra's own errors (composing the config: an override that does not parse, an unknown key or group
    option, a value of the wrong type) and our plugins' ``SetupError`` user errors like every other: ``<prog>: error: <one paragraph>``, exit status
    2, no traceback unless ``HYDRA_FULL_ERROR=1``. Hydra reports them itself with exit status 1; this wraps its
    ``run_and_report`` (hydra-core 1.1-1.3), leaving every other error to it."""
    import hydra._internal.utils as hydra_utils
    from hydra.errors import CompactHydraException

    original = getattr(hydra_utils, "run_and_report", None)
    if original is None or getattr(original, "train_seg_wrapped", False):
        return

    def run_and_report(func):
        def guarded():
            try:
                return func()
            except (CompactHydraException, SetupError) as exc:
                if os.environ.get("HYDRA_FULL_ERROR") == "1":
                    raise
                message = str(exc) if isinstance(exc, SetupError) else hydra_error_message(exc)
                print(f"{prog}: error: {message}", file=sys.stderr)
                sys.exit(USER_ERROR_STATUS)

        return original(guarded)

    run_and_report.train_seg_wrapped = True
    hydra_utils.run_and_report = run_and_report


def compose(overrides: Sequence[str], config_name: str = "train"):
    """The config ``python -m train_seg <overrides>`` would run with, without a run directory or logging setup.
    A bad override (unknown key, wrong type, unknown group option) raises ``ValueError`` with Hydra's message."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            return hydra_compose(config_name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as exc:
        raise ValueError(hydra_error_message(exc)) from exc
