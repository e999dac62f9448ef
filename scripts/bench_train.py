"""Training-step throughput of the real engine path (forward + loss + backward + optimizer step) on this machine.

    python scripts/bench_train.py [--arch deeplabv3_mobilenet_v3_large] [--size 128] [--batch 8] [--steps 12]

Prints the median step time and images/s for fp32, bf16 autocast and channels_last (CUDA adds fp16 + GradScaler),
and the overhead of train_one_epoch over a bare model step (loss accumulation, logging, scheduler).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from train_seg.engine import LoopSettings, autocast, train_one_epoch
from train_seg.losses import CrossEntropyLoss
from train_seg.models import build_deeplabv3


def bare_steps(model, criterion, optimizer, scaler, batch, device, dtype, steps, channels_last):
    images, targets = batch
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    images = images.to(device).contiguous(memory_format=memory_format)
    times = []
    for _ in range(steps):
        tic = time.perf_counter()
        with autocast(device, dtype):
            loss = criterion(model(images)["out"], targets.to(device))
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - tic)
    return statistics.median(times[2:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="deeplabv3_mobilenet_v3_large")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    batch = (torch.randn(args.batch, 3, args.size, args.size),
             torch.randint(0, args.classes, (args.batch, args.size, args.size)))
    variants = [("fp32", None, False), ("bf16", torch.bfloat16, False), ("fp32 channels_last", None, True),
                ("bf16 channels_last", torch.bfloat16, True)]
    if device.type == "cuda":
        variants.append(("fp16 + GradScaler", torch.float16, False))
    print(f"{args.arch}, batch {args.batch}, {args.size} px, {args.classes} classes, {device}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'variant':<22} {'step s':>8} {'img/s':>8}")
    criterion = CrossEntropyLoss()
    for name, dtype, channels_last in variants:
        model = build_deeplabv3(args.arch, args.classes).to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        step = bare_steps(model, criterion, optimizer, scaler, batch, device, dtype, args.steps, channels_last)
        print(f"{name:<22} {step:8.3f} {args.batch / step:8.1f}")

    # engine overhead: the same steps through train_one_epoch (bf16), against the bare loop above
    model = build_deeplabv3(args.arch, args.classes).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    bare = bare_steps(model, criterion, optimizer, scaler, batch, device, torch.bfloat16, args.steps, False)
    loader = [batch] * args.steps
    tic = time.perf_counter()
    settings = LoopSettings(device=device, amp_dtype=torch.bfloat16, log_every=10, progress=False)
    train_one_epoch(model, criterion, optimizer, None, scaler, loader, settings, epoch=0, global_step=0)
    engine = (time.perf_counter() - tic) / args.steps
    print(f"train_one_epoch bf16: {engine:.3f} s/step vs bare {bare:.3f} s/step ({100 * (engine / bare - 1):+.1f}%)")


if __name__ == "__main__":
    main()
