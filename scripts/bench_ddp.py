"""Does DDP pay on this CPU? Training-step throughput of 1 process x T threads against P processes x T/P threads
(DistributedDataParallel over gloo), on the real model builder and the trainer's loss and autocast.

    python scripts/bench_ddp.py [--size 128] [--batch 8] [--steps 10] [--warmup 3] [--rounds 3] [--procs 2]
                                [--threads 2] [--precision bf16|32] [--per-process-batch]

Each setting runs in freshly spawned processes (the same start-up for both), on one fixed synthetic batch, and times
``--steps`` optimisation steps (forward + loss + backward + gradient all-reduce + SGD step) after ``--warmup``
steps, between two barriers. Rounds alternate the order of the two settings (A B, B A, ...) so that a drift of the
machine's load hits both alike. By default the GLOBAL batch is the same (``--batch`` images per step: P processes
take batch/P each), i.e. the same optimisation, only faster or slower; ``--per-process-batch`` gives every process
``--batch`` images instead (P times the global batch, like P independent jobs). Prints images/s per round, the
medians and the ratio DDP / single.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.multiprocessing as mp

from train_seg import distributed
from train_seg.evaluation.loop import autocast
from train_seg.losses import CrossEntropyLoss
from train_seg.models.deeplabv3 import build_deeplabv3


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker(rank: int, world: int, threads: int, port: int, args: argparse.Namespace, results) -> None:
    torch.set_num_threads(threads)
    env = distributed.DistEnv(rank=rank, local_rank=rank, world_size=world, local_world_size=world,
                              master_addr="127.0.0.1", master_port=port, source="torchrun" if world > 1 else "single")
    with distributed.session(env, "cpu", timeout_s=600) as device:
        torch.manual_seed(0)
        model = build_deeplabv3(args.arch, num_classes=args.classes, bn_momentum=0.1).to(device).train()
        model = distributed.wrap_ddp(model, device)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        criterion = CrossEntropyLoss()
        dtype = torch.bfloat16 if args.precision == "bf16" else None
        batch = args.batch if args.per_process_batch else args.batch // world
        generator = torch.Generator().manual_seed(rank)
        images = torch.randn(batch, 3, args.size, args.size, generator=generator)
        targets = torch.randint(0, args.classes, (batch, args.size, args.size), generator=generator)

        def step():
            with autocast(device, dtype):
                loss = criterion(model(images)["out"], targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        for _ in range(args.warmup):
            step()
        distributed.barrier()
        tic = time.perf_counter()
        for _ in range(args.steps):
            step()
        distributed.barrier()
        elapsed = time.perf_counter() - tic
        if rank == 0:
            results.put(args.steps * batch * world / elapsed)


def measure(world: int, threads: int, args: argparse.Namespace) -> float:
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    mp.spawn(worker, args=(world, threads, free_port(), args, results), nprocs=world, join=True)
    return results.get()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="deeplabv3_mobilenet_v3_large")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8, help="global batch per step (see --per-process-batch)")
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--procs", type=int, default=2, help="processes of the DDP setting")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="threads in all")
    parser.add_argument("--precision", choices=("bf16", "32"), default="bf16", help="the trainer's CPU default: bf16")
    parser.add_argument("--per-process-batch", action="store_true",
                        help="every process takes --batch images (P times the global batch)")
    args = parser.parse_args()
    per_proc = args.batch if args.per_process_batch else args.batch // args.procs
    if per_proc < 2:
        parser.error(f"each DDP process would get {per_proc} image(s): BatchNorm in the ASPP pooling branch needs "
                     f">= 2; raise --batch to at least {2 * args.procs} or use --per-process-batch")
    ddp_threads = max(1, args.threads // args.procs)
    single_name, ddp_name = f"1 proc x {args.threads} thr", f"{args.procs} proc x {ddp_threads} thr"
    print(f"{args.arch}, {args.size} px, {args.classes} classes, precision {args.precision}, CPU, "
          f"{args.steps} steps after {args.warmup} warm-up, {args.rounds} interleaved rounds")
    print(f"batch: single {args.batch} per step; DDP {per_proc} per "
          f"process, {per_proc * args.procs} global")
    print(f"{'round':<6} {single_name + ' img/s':>22} {ddp_name + ' img/s':>22}")
    single, ddp = [], []
    for round_ in range(args.rounds):
        order = [("single", 1, args.threads), ("ddp", args.procs, ddp_threads)]
        if round_ % 2:
            order.reverse()
        got = {name: measure(world, threads, args) for name, world, threads in order}
        single.append(got["single"])
        ddp.append(got["ddp"])
        print(f"{round_:<6} {got['single']:>22.1f} {got['ddp']:>22.1f}")
    a, b = statistics.median(single), statistics.median(ddp)
    print(f"{'median':<6} {a:>22.1f} {b:>22.1f}")
    print(f"ratio DDP / single: {b / a:.2f}x ({ddp_name} vs {single_name})")


if __name__ == "__main__":
    main()
