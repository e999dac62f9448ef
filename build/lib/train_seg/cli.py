"""What every command line of train_seg shares: where the configs are, which errors are the user's (reported as one
paragraph, exit status 2, no traceback unless ``HYDRA_FULL_ERROR=1``), and composing a config from overrides for
the commands that are not Hydra apps themselves (``python -m train_seg.stats``)."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import NoReturn, Sequence

# inside the package, so an installed wheel finds them (a checkout installed with -e edits them in place)
CONFIG_DIR = str(Path(__file__).resolve().parent / "configs")
# what bad input raises (ConfigError, DatasetError, ModelError, CheckpointError, RecordError are ValueErrors)
USER_ERRORS = (ValueError, FileNotFoundError)


def exit_with_user_error(prog: str, error: BaseException) -> NoReturn:
    """Prints ``<prog>: error: <message>`` on stderr and exits with status 2 (re-raises with HYDRA_FULL_ERROR=1)."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise error
    print(f"{prog}: error: {error}", file=sys.stderr)
    sys.exit(2)


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
        raise ValueError(str(exc).strip()) from exc
