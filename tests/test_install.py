"""The package as a user installs it: a wheel in a fresh venv, run from outside the repository, and configs of the
user's own composed from outside the package (slow: builds a wheel and a venv; still run in CI)."""
import json
import shutil
import site
import sys
from pathlib import Path

import pytest

import forkserver
from _dataset_fixtures import FOLDER_CLASSES, write_folder
from conftest import ROOT, cli_env

pytestmark = pytest.mark.slow
TINY = ["model=tiny", "dataset.num_train=8", "dataset.num_val=4", "dataset.image_size=64", "trainer.batch_size=2",
        "trainer.max_steps=2", "trainer.num_workers=0", "trainer.progress=false"]


def _run(args, cwd, timeout=600, env=None):
    """The command as a subprocess (the installed venv's, pip's), or forked when it is this interpreter's train_seg."""
    return forkserver.run(args, cwd=cwd, env=env or cli_env(), timeout=timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A wheel of this checkout installed with --no-deps into a fresh venv; the venv finds torch & co. (already
    installed in the test interpreter's environment) through a .pth file, and never sees the source tree."""
    tmp = tmp_path_factory.mktemp("wheel")
    # build from a copy: setuptools writes build/ and *.egg-info into the tree it builds
    source = tmp / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "outputs", "build", "dist",
                                                                 "*.egg-info", "__pycache__", ".pytest_cache"))
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                  str(tmp / "dist"), str(source)], cwd=tmp)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (tmp / "dist").glob("train_seg-*.whl")
    venv = tmp / "venv"
    assert _run([sys.executable, "-m", "venv", str(venv)], cwd=tmp).returncode == 0
    purelib = Path(_run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        cwd=tmp).stdout.strip())
    # the dependencies (torch, hydra, ...) from this interpreter's site-packages; .pth files there (the editable
    # install of this checkout) are not processed for a path added this way
    (purelib / "_train_seg_deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    pip = _run([str(venv / "bin" / "python"), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)],
               cwd=tmp)
    assert pip.returncode == 0, pip.stderr[-3000:]
    outside = tmp / "elsewhere"
    outside.mkdir()
    return venv / "bin", outside


def test_the_wheel_trains_and_reports_from_outside_the_repository(installed):
    bin_dir, outside = installed
    where = _run([str(bin_dir / "python"), "-c", "import train_seg; print(train_seg.__file__)"], cwd=outside)
    assert str(bin_dir.parent) in where.stdout and str(ROOT) not in where.stdout  # the installed copy, not src/
    version = _run([str(bin_dir / "train-seg"), "--version"], cwd=outside)
    assert version.returncode == 0 and version.stdout.startswith("train_seg ")
    train = _run([str(bin_dir / "train-seg"), *TINY, "hydra.run.dir=run", "paths.cache_dir=cache"], cwd=outside)
    assert train.returncode == 0, train.stderr[-3000:]
    metrics = json.loads((outside / "run" / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["history"][-1]["step"] == 2
    stats = _run([str(bin_dir / "train-seg-stats"), "dataset.num_train=8", "trainer.progress=false",
                  "paths.cache_dir=cache"], cwd=outside)
    assert stats.returncode == 0 and "sqrt_inverse" in stats.stdout, stats.stderr[-3000:]
    for script in ("train-seg-summary", "train-seg-evaluate", "train-seg-predict", "train-seg-export"):
        assert (bin_dir / script).is_file(), script


def test_a_users_own_dataset_config_from_outside_the_package(tmp_path):
    """examples/my_configs/dataset/defects.yaml extends the shipped folder dataset; --config-dir adds it."""
    data = tmp_path / "defects"
    write_folder(data, "subfolders", "index")
    assert FOLDER_CLASSES == ["background", "scratch", "dent"]  # the example's classes
    configs = ROOT / "examples" / "my_configs"
    result = _run([sys.executable, "-m", "train_seg", "--config-dir", str(configs), "dataset=defects",
                   f"dataset.root={data}", "dataset.transforms.crop_size=32", "dataset.transforms.val_height=32",
                   "dataset.transforms.val_width=32", "trainer.max_steps=2", "trainer.batch_size=2",
                   "trainer.num_workers=0", "trainer.progress=false", "logger.tensorboard=null",
                   f"hydra.run.dir={tmp_path / 'run'}", f"paths.cache_dir={tmp_path / 'cache'}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["class_names"] == ["background", "scratch", "dent"] and metrics["status"] == "completed"
    composed = _run([sys.executable, "-m", "train_seg", "--config-dir", str(configs), "experiment=defects_dice",
                     f"dataset.root={data}", "--cfg", "job"], cwd=tmp_path)
    assert composed.returncode == 0, composed.stderr[-2000:]
    assert "name: defects" in composed.stdout and "WeightedSum" in composed.stdout
    assert "scheme: sqrt_inverse" in composed.stdout and "max_epochs: 30" in composed.stdout
