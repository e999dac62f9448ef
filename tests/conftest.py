"""Shared test helpers: compose the REAL configs (configs/), shrunk to tiny images and a few steps."""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
# Threads per test process: the cores shared among pytest-xdist's workers (`make test` runs `-n auto`), at most 2.
# Set before torch is imported so that the subprocesses the tests start (train_seg CLIs, torchrun) inherit it.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
THREADS = max(1, min(2, (os.cpu_count() or 1) // WORKERS))
if WORKERS > 1:
    os.environ["OMP_NUM_THREADS"] = str(THREADS)

import pytest
import torch

import train_seg  # noqa: F401  registers the config schemas the YAML files extend (train_seg/schema.py)
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = str(ROOT / "src" / "train_seg" / "configs")

torch.set_num_threads(THREADS)

# Temporary files in RAM when the machine has room (docs/development.md: the checkpoint-writing tests are
# disk-bound otherwise). Nothing they check depends on the medium (a SIGKILL loses no page cache; atomic renames
# behave the same). TRAIN_SEG_TEST_TMP=disk, or --basetemp, keeps pytest's own choice.
SHM = Path("/dev/shm")
SHM_MIN_FREE = 8 * 2**30  # what the whole suite leaves behind until it ends stays below this (docs/development.md)
MIN_AVAILABLE_RAM = 16 * 2**30  # ... which must leave the test processes room


def _available_ram() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _shm_basetemp() -> Path | None:
    if os.environ.get("TRAIN_SEG_TEST_TMP", "").lower() == "disk" or not SHM.is_dir() or not os.access(SHM, os.W_OK):
        return None
    stats = os.statvfs(SHM)
    if stats.f_bavail * stats.f_frsize < SHM_MIN_FREE or _available_ram() < MIN_AVAILABLE_RAM:
        return None
    return SHM / f"train_seg-pytest-{os.getuid()}-{os.getpid()}"


def pytest_configure(config):
    if config.option.basetemp is None and not hasattr(config, "workerinput"):
        basetemp = _shm_basetemp()
        if basetemp is not None:
            config.option.basetemp = str(basetemp)
            config._train_seg_shm_basetemp = basetemp


def pytest_unconfigure(config):
    basetemp = getattr(config, "_train_seg_shm_basetemp", None)
    if basetemp is not None:  # RAM: never leave it behind (a failed test's files are gone too; rerun with
        import shutil        # TRAIN_SEG_TEST_TMP=disk to keep them)

        shutil.rmtree(basetemp, ignore_errors=True)


def tiny_overrides(tmp_path: Path) -> list[str]:
    """Overrides that make a default run take a second or two on CPU (64 px mobilenet, 8 images, 2 per batch)."""
    return [
        "dataset.num_train=8",
        "dataset.num_val=4",
        "dataset.image_size=64",
        "trainer.batch_size=2",
        "trainer.val_batch_size=4",
        "trainer.max_epochs=1",
        "trainer.num_workers=0",
        "trainer.progress=false",
        "trainer.log_every=1",
        "scheduler.warmup_steps=1",
        f"paths.output_dir={tmp_path / 'run'}",
        f"paths.cache_dir={tmp_path / 'cache'}",
    ]


def compose_cfg(tmp_path: Path, *overrides: str, tiny: bool = True):
    """The composed config of `python -m train_seg <overrides>` (tiny unless tiny=False)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=(tiny_overrides(tmp_path) if tiny else []) + list(overrides))


@pytest.fixture
def make_cfg(tmp_path):
    def factory(*overrides: str, tiny: bool = True):
        return compose_cfg(tmp_path, *overrides, tiny=tiny)

    return factory


def crash_in_epoch(monkeypatch, error: BaseException, epoch: int = 2) -> None:
    """Makes the training loop raise ``error`` at the start of epoch ``epoch`` (a failed or interrupted run)."""
    import train_seg.engine.trainer as train_module

    real, calls = train_module.train_one_epoch, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == epoch:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_one_epoch", flaky)


def cli_env() -> dict:
    env = dict(os.environ)
    env["NO_ALBUMENTATIONS_UPDATE"] = "1"
    env["OMP_NUM_THREADS"] = str(THREADS)
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def pytest_collection_modifyitems(config, items):
    """Files holding slow tests run first (a stable sort, the same on every worker): pytest-xdist's ``--dist
    loadfile`` hands files to the workers in collection order, and a long file handed out last keeps one worker busy
    alone while the other idles."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow") is not None}
    items.sort(key=lambda item: item.path not in slow_files)
