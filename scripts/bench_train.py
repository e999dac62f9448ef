"""Training-step throughput on this machine: the bare model step against our whole step over the real data pipeline.

    python scripts/bench_train.py [--arch deeplabv3_mobilenet_v3_large] [--size 128] [--batch 8] [--steps 12]
                                  [--precision auto|32|bf16-mixed|16-mixed] [--channels-last true|false]
                                  [--workers auto|N] [--only variants|pipeline|all]

Two parts, in one process:

1. ``variants``: the median step time and images/s of a bare step of our model (forward, loss, backward, SGD step
   on one fixed random batch) for fp32 / bf16 autocast x contiguous / channels_last x ``model.skip_padding_taps``
   true / false (CUDA adds fp16 + GradScaler), in ``--rounds`` interleaved rounds, each against fp32 with every
   tap; then the overhead of ``train_one_epoch`` over the bare bf16 step on the same fixed batch.
2. ``pipeline``: the question a user asks, "does the tool cost more than the model?". The bare torchvision step
   (``torchvision.models.segmentation.<arch>``, ``F.cross_entropy``, ``loss.backward()``, ``SGD.step()`` on a
   fixed batch, 21 classes) against our whole step: a Pascal-VOC-layout dataset of JPEG images and PNG masks
   (500x375, written to a temporary folder) read through train_seg's own dataset, transform and loader builders
   (``train_seg.engine.trainer.prepare`` with ``dataset=voc``, crop = ``--size``), trained by ``engine.train_one_epoch``
   with the run's loss, optimizer, scheduler and settings. Same precision and memory format on both sides
   (``--precision`` / ``--channels-last``, default: the trainer's defaults). Prints both s/step (medians over
   the steps after ``--warmup``), ``ratio`` = ours / bare, and the share of our step time spent blocked in
   ``next(loader)`` (waiting for data). Worker start-up (the first batch of the epoch) is printed on its own.
   The bare step of our own model (``model.skip_padding_taps`` skips padding-only taps, so it is faster than
   torchvision's) is measured in the same rounds, and ``loop overhead`` = our step / that bare step is what the
   tool adds on top of its model's compute.

Timings need a quiet machine: run it alone.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _bench_common, also when imported from elsewhere

from _bench_common import TimedLoader, precision_setting, prepare_our_run, write_voc_dataset  # noqa: E402

from train_seg.engine.loop import LoopSettings, train_one_epoch  # noqa: E402
from train_seg.evaluation.loop import autocast  # noqa: E402
from train_seg.losses import CrossEntropyLoss  # noqa: E402
from train_seg.models.deeplabv3 import build_deeplabv3  # noqa: E402


def bare_steps(model, criterion, optimizer, scaler, batch, device, dtype, steps, channels_last, warmup=2):
    images, targets = batch
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    images = images.to(device).contiguous(memory_format=memory_format)
    targets = targets.to(device)
    times = []
    for _ in range(steps + warmup):
        tic = time.perf_counter()
        with autocast(device, dtype):
            loss = criterion(model(images)["out"], targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - tic)
    return statistics.median(times[warmup:])


def variants(args, device) -> None:
    """The bare step of our model by precision, memory format and ``model.skip_padding_taps``, measured in
    ``--rounds`` interleaved rounds (every variant once per round, the order reversed in odd rounds); medians."""
    torch.manual_seed(0)
    batch = (torch.randn(args.batch, 3, args.size, args.size),
             torch.randint(0, args.classes, (args.batch, args.size, args.size)))
    rows = [(f"{precision}{' channels_last' if channels_last else ''}{'' if skip else ' all taps'}", dtype,
             channels_last, skip)
            for skip in (True, False) for precision, dtype in (("fp32", None), ("bf16", torch.bfloat16))
            for channels_last in (False, True)]
    if device.type == "cuda":
        rows.append(("fp16 + GradScaler", torch.float16, False, True))
    print(f"{args.arch}, batch {args.batch}, {args.size} px, {args.classes} classes, {device}, "
          f"{torch.get_num_threads()} threads; 'all taps' = model.skip_padding_taps=false; medians of "
          f"{args.rounds} interleaved rounds of {args.steps} steps")
    criterion = CrossEntropyLoss()
    setups = []
    for name, dtype, channels_last, skip in rows:
        torch.manual_seed(0)
        model = build_deeplabv3(args.arch, args.classes, skip_padding_taps=skip).to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        setups.append((name, dtype, channels_last, model, optimizer, scaler))
    times: dict[str, list[float]] = {row[0]: [] for row in setups}
    for round_index in range(args.rounds):
        for name, dtype, channels_last, model, optimizer, scaler in (setups if round_index % 2 == 0
                                                                     else setups[::-1]):
            times[name].append(bare_steps(model, criterion, optimizer, scaler, batch, device, dtype, args.steps,
                                          channels_last, args.warmup))
    reference = statistics.median(times["fp32 all taps"])
    print(f"{'variant':<30} {'step s':>8} {'img/s':>8} {'vs fp32 all taps':>17}")
    for name in times:
        step = statistics.median(times[name])
        print(f"{name:<30} {step:8.3f} {args.batch / step:8.1f} {reference / step:16.2f}x")

    # engine overhead: the same steps through train_one_epoch (bf16) against the bare loop, interleaved rounds
    model = build_deeplabv3(args.arch, args.classes).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    settings = LoopSettings(device=device, amp_dtype=torch.bfloat16, log_every=10, progress=False)
    bares, engines = [], []
    for round_index in range(args.rounds):
        bares.append(bare_steps(model, criterion, optimizer, scaler, batch, device, torch.bfloat16, args.steps,
                                False, args.warmup))
        tic = time.perf_counter()
        train_one_epoch(model, criterion, optimizer, None, scaler, [batch] * args.steps, settings,
                        epoch=round_index, global_step=round_index * args.steps)
        engines.append((time.perf_counter() - tic) / args.steps)
    bare, engine = statistics.median(bares), statistics.median(engines)
    print(f"train_one_epoch bf16: {engine:.3f} s/step vs bare {bare:.3f} s/step ({100 * (engine / bare - 1):+.1f}%, "
          f"medians of {args.rounds} interleaved rounds)")


def _overrides(args) -> list[str]:
    overrides = [f"model.arch={args.arch}", f"dataset.transforms.crop_size={args.size}",
                 f"trainer.batch_size={args.batch}"]
    for key, value in (("precision", args.precision), ("channels_last", args.channels_last),
                       ("num_workers", args.workers)):
        if value is not None:
            overrides.append(f"trainer.{key}={value}")
    return overrides + list(args.override)


class BareStep:
    """A model, plain ``F.cross_entropy`` and SGD on one fixed batch, with the autocast dtype and memory format of
    ``settings``; ``measure(steps, warmup)`` returns the median s/step of one timing round. The model is
    torchvision's own (``model_cfg=None``) or ours as the run's ``model`` config builds it."""

    def __init__(self, arch: str, size: int, batch: int, settings: LoopSettings, model_cfg=None):
        import torchvision

        torch.manual_seed(0)
        self.settings = settings
        if model_cfg is None:
            self.model = torchvision.models.get_model(arch, weights=None, weights_backbone=None, num_classes=21)
        else:
            from train_seg.engine.builder import build_model

            self.model = build_model(model_cfg, num_classes=21)
        self.model.to(settings.device, memory_format=settings.memory_format).train()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.02, momentum=0.9, weight_decay=1e-4)
        self.scaler = torch.amp.GradScaler(settings.device.type, enabled=settings.amp_dtype == torch.float16)
        self.fixed = (torch.randn(batch, 3, size, size), torch.randint(0, 21, (batch, size, size)))

    def measure(self, steps: int, warmup: int) -> float:
        def criterion(logits, target):
            return F.cross_entropy(logits, target, ignore_index=255)

        return bare_steps(self.model, criterion, self.optimizer, self.scaler, self.fixed, self.settings.device,
                          self.settings.amp_dtype, steps, self.settings.channels_last, warmup)


def pipeline(args) -> None:
    """``--rounds`` interleaved rounds in one process: the bare step, then one epoch of ours (its own DataLoader
    iteration, workers started anew as in training); the ratio is of the medians over all rounds."""
    bares, bares_ours, ours_steps, waits_all, totals, first_batches = [], [], [], [], [], []
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        work = Path(tmp)
        root = write_voc_dataset(work / "data", num_train=args.batch * (args.steps + args.warmup), num_val=2)
        run = prepare_our_run(root, work, _overrides(args))
        settings = run.settings
        bare = BareStep(args.arch, args.size, args.batch, settings)
        bare_ours = BareStep(args.arch, args.size, args.batch, settings, model_cfg=run.config["model"])
        for round_index in range(args.rounds):
            bares.append(bare.measure(args.steps, args.warmup))
            bares_ours.append(bare_ours.measure(args.steps, args.warmup))
            loader = TimedLoader(run.train_loader)
            run.train_loader.sampler.set_epoch(round_index)
            train_one_epoch(run.train_model, run.criterion, run.optimizer, run.scheduler, run.scaler, loader,
                            settings, epoch=round_index, global_step=round_index * len(run.train_loader))
            durations, waits = loader.cycles(skip=args.warmup)
            ours_steps.append(statistics.median(durations))
            waits_all.append(sum(waits))
            totals.append(sum(durations))
            first_batches.append(loader.received[0] - loader.requested[0])
            print(f"round {round_index}: bare {bares[-1]:.3f} s/step, ours {ours_steps[-1]:.3f} s/step, "
                  f"ratio {ours_steps[-1] / bares[-1]:.3f}")
    bare_step, ours = statistics.median(bares), statistics.median(ours_steps)
    bare_own = statistics.median(bares_ours)
    trainer = run.config["trainer"]
    precision = precision_setting(settings.amp_dtype)
    print(f"\npipeline: {args.arch}, VOC-layout JPEG/PNG 500x375 -> crop {args.size}, batch {args.batch}, "
          f"precision {precision}, channels_last {settings.channels_last}, workers {run.train_loader.num_workers} "
          f"(trainer.num_workers={trainer['num_workers']}), {torch.get_num_threads()} threads, {settings.device}; "
          f"medians over {args.steps} steps after {args.warmup} warm-up, {args.rounds} interleaved rounds")
    print(f"bare torchvision step   {bare_step:8.3f} s/step {args.batch / bare_step:8.1f} img/s")
    print(f"bare step of our model  {bare_own:8.3f} s/step {args.batch / bare_own:8.1f} img/s "
          f"(model.skip_padding_taps={run.config['model'].get('skip_padding_taps', True)})")
    print(f"our epoch step          {ours:8.3f} s/step {args.batch / ours:8.1f} img/s")
    print(f"ratio {ours / bare_step:.3f} (median ours / median bare; per-round ratios "
          f"{' '.join(f'{o / b:.3f}' for o, b in zip(ours_steps, bares))})")
    print(f"data wait {100 * sum(waits_all) / sum(totals):.1f}% of our step time (blocked in next(loader)); "
          f"first batch of an epoch (worker start-up) {statistics.median(first_batches):.2f} s")
    print(f"loop overhead {ours / bare_own:.3f} (median our epoch step / median bare step of our model: data "
          f"pipeline, loss, checks and logging on top of the same model compute)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="deeplabv3_mobilenet_v3_large")
    parser.add_argument("--size", type=int, default=128, help="image side of the fixed batch / training crop, px")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--classes", type=int, default=4, help="variants part only (the pipeline has VOC's 21)")
    parser.add_argument("--steps", type=int, default=12, help="measured steps (after --warmup)")
    parser.add_argument("--warmup", type=int, default=2, help="steps excluded from the medians")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (both parts)")
    parser.add_argument("--precision", default=None, help="pipeline part: trainer.precision (default: trainer's)")
    parser.add_argument("--channels-last", default=None, choices=("true", "false"),
                        help="pipeline part: trainer.channels_last (default: trainer's)")
    parser.add_argument("--workers", default=None, help="pipeline part: trainer.num_workers (default: trainer's)")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="pipeline part: any further Hydra override of our run (repeatable)")
    parser.add_argument("--only", choices=("variants", "pipeline", "all"), default="all")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.only in ("variants", "all"):
        variants(args, device)
    if args.only in ("pipeline", "all"):
        pipeline(args)


if __name__ == "__main__":
    main()
