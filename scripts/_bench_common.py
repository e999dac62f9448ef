"""Shared by the training benchmarks (``bench_train.py``, ``bench_vs_reference.py``): a Pascal-VOC-layout dataset
written to a folder, our run built by ``train_seg.engine.trainer.prepare`` from the real configs, and a loader wrapper that
measures the time spent blocked in ``next(loader)``.

The dataset imitates VOC where it matters for speed: 500x375 JPEG photographs (quality 90) of smooth regions and
object shapes, palette-PNG masks with 21 classes and VOC's 255 outlines, ``ImageSets/Segmentation/{train,val}.txt``.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from PIL import Image

VOC_SIZE = (375, 500)  # height, width of a typical VOC image


def precision_setting(amp_dtype) -> str:
    """The ``trainer.precision`` value that gives this autocast dtype (None = fp32)."""
    import torch

    return {None: "32", torch.bfloat16: "bf16-mixed", torch.float16: "16-mixed"}[amp_dtype]


def _palette() -> list[int]:
    from train_seg.data.voc import voc_colormap

    return [v for colour in voc_colormap(256) for v in colour]


def _scene(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """A photograph-like image (smooth gradients, textured objects, sensor noise) and its VOC mask."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(40, 200, size=3).astype(np.float32)
    slope = rng.uniform(-0.15, 0.15, size=(2, 3)).astype(np.float32)
    image = base + yy[..., None] * slope[0] + xx[..., None] * slope[1]
    mask = np.zeros((height, width), np.uint8)
    for _ in range(int(rng.integers(1, 4))):
        label = int(rng.integers(1, 21))
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        ry, rx = rng.uniform(20, height / 2.5), rng.uniform(20, width / 2.5)
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
        colour = rng.uniform(0, 255, size=3).astype(np.float32)
        texture = 20 * np.sin(xx / rng.uniform(3, 12) + yy / rng.uniform(3, 12))[..., None]
        image = np.where((inside <= 1)[..., None], colour + texture, image)
        mask[(inside > 1) & (inside <= 1.08)] = 255  # VOC's outline
        mask[inside <= 1] = label
    image += rng.normal(0, 6, size=image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8), mask


def write_voc_dataset(root: Path, num_train: int, num_val: int = 2, size: tuple[int, int] = VOC_SIZE,
                      seed: int = 0) -> Path:
    """``root/VOCdevkit/VOC2012`` with ``num_train`` + ``num_val`` images; returns ``root`` (for ``dataset.root``)."""
    voc = Path(root) / "VOCdevkit" / "VOC2012"
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / folder).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    palette = _palette()
    ids = {"train": [f"2007_{i:06d}" for i in range(num_train)],
           "val": [f"2008_{i:06d}" for i in range(num_val)]}
    for split, names in ids.items():
        for name in names:
            image, mask = _scene(rng, *size)
            Image.fromarray(image).save(voc / "JPEGImages" / f"{name}.jpg", quality=90)
            png = Image.fromarray(mask, mode="P")
            png.putpalette(palette)
            png.save(voc / "SegmentationClass" / f"{name}.png")
        (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(names) + "\n")
    return Path(root)


def compose_our_config(root: Path, work: Path, overrides: list[str]):
    """The composed config of ``python -m train_seg dataset=voc dataset.root=<root> <overrides>`` (one epoch, no
    progress bars, no TensorBoard), with its run and cache directories under ``work``."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import train_seg  # noqa: F401  registers the schemas
    from train_seg.config.command_line import CONFIG_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[
            "dataset=voc", f"dataset.root={root}", "trainer.max_epochs=1", "trainer.progress=false",
            "logger.tensorboard=null", f"paths.output_dir={work / 'run'}", f"paths.cache_dir={work / 'cache'}",
            *overrides])
    GlobalHydra.instance().clear()
    return cfg


def prepare_our_run(root: Path, work: Path, overrides: list[str]):
    """``train_seg.engine.trainer.prepare`` on that config: the model, loss, optimizer, scheduler and loaders of a real run."""
    from train_seg.engine.trainer import prepare

    cfg = compose_our_config(root, work, overrides)
    run_dir = Path(cfg.paths.output_dir)
    if run_dir.exists():  # prepare refuses a run directory holding an earlier run
        import shutil

        shutil.rmtree(run_dir)
    return prepare(cfg, run_dir)


class TimedLoader:
    """Wraps a loader; records, for each batch, when it was asked for and when it arrived (``perf_counter``), and
    when the iteration ended. ``wait`` = time blocked in ``next(loader)``."""

    def __init__(self, loader):
        self.loader = loader
        self.requested: list[float] = []
        self.received: list[float] = []
        self.end = None

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        iterator = iter(self.loader)
        while True:
            self.requested.append(time.perf_counter())
            try:
                batch = next(iterator)
            except StopIteration:
                self.end = self.requested.pop()
                return
            self.received.append(time.perf_counter())
            yield batch

    def cycles(self, skip: int = 0) -> tuple[list[float], list[float]]:
        """Per measured step (after ``skip`` warm-up steps): its whole duration (arrival of its batch to arrival of
        the next one, or the end) and the part of it spent waiting for that next batch."""
        arrivals = self.received + ([self.end] if self.end is not None else [])
        steps = range(skip, len(arrivals) - 1)
        durations = [arrivals[i + 1] - arrivals[i] for i in steps]
        waits = [(self.received[i + 1] - self.requested[i + 1]) if i + 1 < len(self.received) else 0.0 for i in steps]
        return durations, waits
