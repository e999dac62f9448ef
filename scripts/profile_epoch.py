"""Where the time of a training epoch goes: one epoch of our defaults under ``torch.profiler``, broken down by the
loop's own parts, then by operator; plus the data pipeline's per-sample cost in the workers, an evaluation pass and
a checkpoint write.

    python scripts/profile_epoch.py [--images 160] [--crop 256] [--batch 4] [--workers auto] [--top 12]
                                    [--override KEY=VALUE ...] [--trace trace.json]

The data is a Pascal-VOC-layout folder (``--images`` 500x375 JPEGs with palette-PNG masks, 21 classes, and 8
validation images, written to a temporary folder); the run is ``python -m train_seg dataset=voc`` with the crop,
batch and workers given and every other setting at its default (``--override`` changes any), built by
``train_seg.engine.trainer.prepare``. Two warm-up steps run first (oneDNN primitive creation, allocator), then one epoch
without the profiler (its ms/step is printed: the profiler's own overhead shows against it), then one profiled.

What it prints:

* **step breakdown**: milliseconds per step and share of the step for each labelled part of
  ``engine.train_one_epoch`` (``train_seg.to_device``, ``forward``, ``loss``, ``backward``, ``optimizer``: the
  non-finite check, SGD and the scheduler), the time blocked in ``next(loader)`` (``data wait``), and ``other``
  (the rest: the loop, log windows, progress bar). On CUDA the labels time kernel launches, not kernels; read the
  ``--trace`` file there.
* **operators**: the ``--top`` aten operators by self CPU time over the profiled epoch, per step.
* **workers**: decode + augmentation + collate-ready tensors per sample, timed in this process (in training they run
  in the DataLoader workers, beside the compute threads).
* **evaluation**: ``engine.evaluate`` over the validation images (VOC's val policy: 512 x 512), ms per image, split
  into ``eval_forward`` and ``eval_confusion`` (arg-max + confusion-matrix update).
* **checkpoint**: one ``last.pt`` as the run writes it (``Run.checkpoint_state``, atomic, fsynced): MB and seconds.

Run it alone on the machine.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from _bench_common import TimedLoader, precision_setting, prepare_our_run, write_voc_dataset  # noqa: E402

PARTS = ("to_device", "forward", "loss", "backward", "optimizer")
EVAL_PARTS = ("eval_forward", "eval_confusion")


def label_totals(prof) -> dict[str, float]:
    """Wall seconds inside each ``train_seg.<part>`` label over the profile (nested labels counted in their own)."""
    totals: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if event.name.startswith("train_seg."):
            totals[event.name[len("train_seg."):]] += event.time_range.elapsed_us() / 1e6
    return totals


def profile_epoch(run, epoch: int):
    from train_seg.engine.loop import train_one_epoch

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if run.settings.device.type == "cuda" else [])
    run.train_loader.sampler.set_epoch(epoch)
    loader = TimedLoader(run.train_loader)
    with profile(activities=activities) as prof:
        tic = time.perf_counter()
        steps, _ = train_one_epoch(run.train_model, run.criterion, run.optimizer, run.scheduler, run.scaler, loader,
                                   run.settings, epoch=epoch, global_step=0)
        if run.settings.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - tic
    _, waits = loader.cycles()
    first_batch = loader.received[0] - loader.requested[0]
    return prof, steps, seconds, sum(waits) + first_batch


def print_breakdown(prof, steps: int, seconds: float, wait: float, batch: int) -> None:
    totals = label_totals(prof)
    step_ms = 1000 * seconds / steps
    rows = [(part, totals.get(part, 0.0)) for part in PARTS] + [("data wait", wait)]
    rows.append(("other", seconds - sum(value for _, value in rows)))
    print(f"\nstep breakdown: {steps} steps, {step_ms:.0f} ms/step ({steps * batch / seconds:.1f} images/s)")
    print(f"{'part':<12} {'ms/step':>8} {'share':>7}")
    for name, total in rows:
        print(f"{name:<12} {1000 * total / steps:8.1f} {100 * total / seconds:6.1f}%")


def print_operators(prof, steps: int, seconds: float, top: int) -> None:
    averages = [a for a in prof.key_averages() if a.key.startswith("aten::") or a.key.startswith("Optimizer.")]
    averages.sort(key=lambda a: -a.self_cpu_time_total)
    print(f"\noperators (top {top} by self CPU time; the share is of the epoch's wall time)")
    print(f"{'operator':<40} {'ms/step':>8} {'share':>7} {'calls/step':>11}")
    for item in averages[:top]:
        total = item.self_cpu_time_total / 1e6
        print(f"{item.key[:40]:<40} {1000 * total / steps:8.1f} {100 * total / seconds:6.1f}% "
              f"{item.count / steps:11.1f}")


def print_workers(run, samples: int, batch: int) -> None:
    dataset = run.train_set
    dataset.reseed(1)
    tic = time.perf_counter()
    for index in range(samples):
        dataset[index]
    per_sample = (time.perf_counter() - tic) / samples
    workers = run.train_loader.num_workers
    print(f"\nworkers: {1000 * per_sample:.1f} ms per sample to decode and augment ({samples} samples timed in this "
          f"process), {1000 * per_sample * batch:.0f} ms per batch of {batch}, spread over {workers} "
          f"worker(s) beside {torch.get_num_threads()} compute threads")


def print_evaluation(run) -> None:
    from train_seg.engine.loop import evaluate

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        tic = time.perf_counter()
        evaluate(run.model, run.val_loader, len(run.class_names), run.settings)
        seconds = time.perf_counter() - tic
    images = len(run.val_loader.dataset)
    totals = label_totals(prof)
    parts = ", ".join(f"{name} {1000 * totals.get(name, 0.0) / images:.1f} ms" for name in EVAL_PARTS)
    print(f"\nevaluation: {images} images at the val size, {1000 * seconds / images:.1f} ms per image ({parts})")


def print_checkpoint(run, work: Path) -> None:
    from train_seg.checkpoint import save_checkpoint

    path = work / "last.pt"
    tic = time.perf_counter()
    save_checkpoint(path, run.checkpoint_state(0))
    seconds = time.perf_counter() - tic
    print(f"checkpoint: last.pt {path.stat().st_size / 1e6:.1f} MB written in {seconds:.2f} s "
          f"(atomic, fsynced; once per epoch, best.pt is a hard link to it)")



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=160, help="training images (one epoch = images / batch steps)")
    parser.add_argument("--crop", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--workers", default="auto", help="trainer.num_workers")
    parser.add_argument("--top", type=int, default=12, help="operators listed")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="a Hydra override of the run, e.g. trainer.precision=32 (repeatable)")
    parser.add_argument("--trace", help="also write the profile as a Chrome trace (chrome://tracing, Perfetto)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="profile_epoch_") as tmp:
        work = Path(tmp)
        root = write_voc_dataset(work / "data", num_train=args.images, num_val=8)
        overrides = [f"dataset.transforms.crop_size={args.crop}", f"trainer.batch_size={args.batch}",
                     f"trainer.num_workers={args.workers}", *args.override]
        run = prepare_our_run(root, work, overrides)
        trainer, model = run.config["trainer"], run.config["model"]
        precision = precision_setting(run.settings.amp_dtype)
        print(f"{model['arch']}, {args.images} VOC-layout images (500x375 JPEG) -> crop {args.crop}, batch "
              f"{args.batch}, precision {precision}, channels_last {run.settings.channels_last}, "
              f"skip_padding_taps {model.get('skip_padding_taps', True)}, {run.train_loader.num_workers} workers "
              f"(trainer.num_workers={trainer['num_workers']}), {torch.get_num_threads()} threads, "
              f"{run.settings.device}")
        from train_seg.engine.loop import train_one_epoch

        train_one_epoch(run.train_model, run.criterion, run.optimizer, run.scheduler, run.scaler, run.train_loader,
                        run.settings, epoch=0, global_step=0, max_steps=2)  # warm-up
        run.train_loader.sampler.set_epoch(1)
        tic = time.perf_counter()
        plain_steps, _ = train_one_epoch(run.train_model, run.criterion, run.optimizer, run.scheduler, run.scaler,
                                         run.train_loader, run.settings, epoch=1, global_step=0)
        plain_ms = 1000 * (time.perf_counter() - tic) / plain_steps
        prof, steps, seconds, wait = profile_epoch(run, epoch=2)
        print_breakdown(prof, steps, seconds, wait, args.batch)
        print(f"(the same epoch without the profiler: {plain_ms:.0f} ms/step; the profiler's own cost is spread "
              f"over the parts)")
        print_operators(prof, steps, seconds, args.top)
        if args.trace:
            prof.export_chrome_trace(args.trace)
            print(f"trace: {args.trace}")
        print_workers(run, samples=min(16, args.images), batch=args.batch)
        print_evaluation(run)
        print_checkpoint(run, work)


if __name__ == "__main__":
    main()
