"""Where a search's Optuna study lives, and the training job's side of a trial.

Storage (``hydra.sweeper.storage``, see ``storage_url``): ``null`` keeps the study in ``<sweep dir>/optuna.journal``
(so any search can be continued, and a joblib or SLURM job can reach the study to report to it); ``memory`` (the
basic launcher only: nothing is kept); a file ``*.journal`` (Optuna's JournalStorage: one
file that any number of workers on a shared file system use at once, and that a killed search continues from); or
an RDB URL (``sqlite:///search.db``, ``postgresql://user:pw@host/db``, ``mysql://...``) for workers on several
machines.

A job of the search gets the ``trial`` config node (``TrialSpec``: storage, study name, trial number, pruner);
``TrialReporter.check`` reports each evaluation's optimized metric to the trial and raises ``TrialPruned`` when
the pruner stops it. Nothing here imports Optuna until it is used.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from train_seg.config.command_line import SetupError

MEMORY = "memory"
JOURNAL = "journal:"  # the canonical form of a journal file: journal:<absolute path>
JOURNAL_FILE = "optuna.journal"  # the default file in the sweep directory
RDB_SCHEMES = ("sqlite", "postgresql", "mysql", "oracle", "mssql")
MIN_OPTUNA = (4, 0)


class SearchError(SetupError):
    """A search that cannot run as configured (a storage spec, a missing or too old Optuna): one paragraph."""


class TrialPruned(Exception):
    """The trial's pruner stopped it after an evaluation (``epoch``, ``value``): metrics.json says ``pruned``
    (``run_status``, which the run-files sink records)."""

    run_status = "pruned"

    def __init__(self, number: int, epoch: int, value: float):
        super().__init__(f"trial {number} pruned after the evaluation of epoch {epoch} ({value:.4f}): the pruner "
                         "judged it unlikely to beat the other trials")
        self.number, self.epoch, self.value = number, epoch, value


def require_optuna():
    """The ``optuna`` module, or SearchError naming the extra to install."""
    try:
        import optuna
    except ImportError as exc:
        raise SearchError("hparams_search=optuna needs Optuna >= 4, which is not installed: pip install "
                          "'train_seg[optuna]' (or pip install -e '.[optuna]' in a clone).") from exc
    version = tuple(int(part) for part in optuna.__version__.split(".")[:2] if part.isdigit())
    if version < MIN_OPTUNA:
        raise SearchError(f"hparams_search=optuna needs Optuna >= 4, but {optuna.__version__} is installed (an old "
                          "hydra-optuna-sweeper pins optuna<3): pip uninstall hydra-optuna-sweeper && pip install "
                          "'train_seg[optuna]'.")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def storage_url(spec: str | None, sweep_dir: str | Path, in_process: bool) -> str:
    """The canonical storage string of ``hydra.sweeper.storage`` (module docstring); relative journal paths are
    taken from the current directory. Raises SearchError for ``memory`` with jobs outside this process, and for a
    string that is none of the accepted forms."""
    if spec is None or str(spec).strip() == "":  # every search can be continued: same hydra.sweep.dir, same command
        return JOURNAL + str((Path(sweep_dir) / JOURNAL_FILE).resolve())
    text = str(spec).strip()
    if text == MEMORY:
        if not in_process:
            raise SearchError("hydra.sweeper.storage=memory keeps the study in the sweeper's process, but this "
                              "launcher runs the trials in other processes, which could not report to it (pruning). "
                              "Leave storage at null (a journal file in the sweep directory) or name a file: "
                              "hydra.sweeper.storage=search.journal.")
        return MEMORY
    if text.startswith(JOURNAL):
        text = text[len(JOURNAL):].removeprefix("//")
        return JOURNAL + str(Path(text).expanduser().resolve())
    if text.endswith(".journal"):
        return JOURNAL + str(Path(text).expanduser().resolve())
    scheme = text.split(":", 1)[0].split("+", 1)[0].lower()
    if "://" in text and scheme in RDB_SCHEMES:
        return text
    raise SearchError(f"hydra.sweeper.storage={spec!r} is not a storage: use null (default), memory, a file ending in "
                      ".journal (one file that several workers share and a killed search continues from), or an RDB "
                      "URL such as sqlite:///search.db or postgresql://user:password@host/db.")


_MEMORY_STORAGE: Any = None  # the one in-memory storage of this process (the sweeper and its in-process jobs)


def open_storage(url: str):
    """The Optuna storage object of a canonical ``storage_url`` string."""
    global _MEMORY_STORAGE
    optuna = require_optuna()
    if url == MEMORY:
        if _MEMORY_STORAGE is None:
            _MEMORY_STORAGE = optuna.storages.InMemoryStorage()
        return _MEMORY_STORAGE
    if url.startswith(JOURNAL):
        from optuna.storages.journal import JournalFileBackend

        path = Path(url[len(JOURNAL):])
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    return optuna.storages.RDBStorage(url)


def instantiate_component(node: Mapping | None):
    """An Optuna sampler or pruner from its config node (``_target_`` + arguments); None stays None."""
    if node is None:
        return None
    from hydra.utils import instantiate

    return instantiate(dict(node))


@dataclass(frozen=True)
class TrialSpec:
    """The ``trial`` node the sweeper gives each job: the study's storage and name, the trial's number, and the
    pruner's config as JSON (the job builds the same pruner to decide)."""

    storage: str
    study_name: str
    number: int
    pruner: str = "null"

    def override(self) -> str:
        """The Hydra override that hands this spec to a job."""
        return (f"++trial={{storage:'{self.storage}',study_name:'{self.study_name}',number:{self.number},"
                f"pruner:'{self.pruner}'}}")

    @classmethod
    def from_config(cls, node) -> "TrialSpec | None":
        if node is None:
            return None
        return cls(str(node["storage"]), str(node["study_name"]), int(node["number"]), str(node.get("pruner", "null")))


class TrialReporter:
    """The job's handle on its trial: ``start(run_dir)`` records where the run writes; ``check(value, epoch)``
    reports an evaluation and raises ``TrialPruned`` when the pruner says stop. Under torch.distributed rank 0
    reports and decides, and every rank raises alike."""

    def __init__(self, spec: TrialSpec):
        self.spec = spec
        self._trial = None

    def _open(self):
        if self._trial is None:
            optuna = require_optuna()
            pruner = instantiate_component(json.loads(self.spec.pruner))
            study = optuna.load_study(study_name=self.spec.study_name, storage=open_storage(self.spec.storage),
                                      pruner=pruner)
            trial_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, self.spec.number)
            self._trial = optuna.trial.Trial(study, trial_id)
        return self._trial

    def start(self, run_dir: str | Path) -> None:
        from train_seg import distributed

        if distributed.is_main():
            self._open().set_user_attr("run_dir", str(Path(run_dir).resolve()))

    def check(self, value: float, epoch: int) -> None:
        from train_seg import distributed

        def decide() -> bool:
            trial = self._open()
            if not math.isnan(value):
                trial.report(float(value), int(epoch))
            return bool(trial.should_prune())

        if distributed.main_then_broadcast(decide):
            raise TrialPruned(self.spec.number, epoch, value)
