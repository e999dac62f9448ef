"""Forward+backward time of every loss of train_seg.losses, relative to ``F.cross_entropy`` in the same run.

    python scripts/bench_losses.py                          # (8, 21, 256, 256), random logits
    python scripts/bench_losses.py --size 64 --repeats 3    # quick
    python scripts/bench_losses.py --logits confident       # logits of a well-trained model (Lovasz worst case)

Each repeat times the reference (``F.cross_entropy(logits, target, ignore_index=255)`` forward+backward) and
the loss back to back, so a machine shared with other jobs slows both alike; the table gives the median wall
time of the loss, the median of the per-repeat wall-time ratios (status is judged on it) and, as a check less
sensitive to other jobs, the median ratio of process CPU time. Targets (max ratio) from the losses issue: focal, Dice,
generalized Dice, Tversky 1.0x; OHEM 1.5x; Lovasz-softmax 4x. Binary losses run on one-channel logits
(N, 1, H, W): their ratio is still to the C-class cross-entropy, for scale only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from train_seg import losses as L

IGNORE = 255


def make_inputs(batch: int, classes: int, size: int, logits_kind: str, ignore_frac: float, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    target = torch.randint(0, classes, (batch, size, size), generator=gen)
    target[torch.rand(batch, size, size, generator=gen) < ignore_frac] = IGNORE
    target[:, : max(1, size // 32)] = IGNORE  # a band of ignored rows, as at image borders
    logits = torch.randn(batch, classes, size, size, generator=gen)
    if logits_kind == "confident":
        # a trained model: the target class leads by ~8 nats on 95% of the pixels, errors elsewhere
        lead = torch.where(torch.rand(batch, size, size, generator=gen) < 0.95, 8.0, -2.0)
        logits.scatter_add_(1, target.clamp(max=classes - 1).unsqueeze(1), lead.unsqueeze(1))
    return logits, target


def losses(classes: int):
    """(name, module, binary?, target ratio or None)."""
    return [
        ("cross_entropy", L.CrossEntropyLoss(), False, None),
        ("cross_entropy(smooth=0.1)", L.CrossEntropyLoss(label_smoothing=0.1), False, None),
        ("focal", L.FocalLoss(gamma=2.0), False, 1.0),
        ("focal(weight,alpha)", L.FocalLoss(gamma=2.0, alpha=0.25, weight=torch.rand(classes) + 0.5), False, 1.0),
        ("dice", L.DiceLoss(), False, 1.0),
        ("generalized_dice", L.GeneralizedDiceLoss(), False, 1.0),
        ("tversky", L.TverskyLoss(alpha=0.3, beta=0.7), False, 1.0),
        ("focal_tversky", L.TverskyLoss(alpha=0.3, beta=0.7, gamma=0.75), False, 1.0),
        ("ohem", L.OhemCrossEntropyLoss(), False, 1.5),
        ("lovasz", L.LovaszSoftmaxLoss(), False, 4.0),
        ("ce+dice", L.WeightedSum({"ce": L.CrossEntropyLoss(), "dice": L.DiceLoss()}), False, None),
        ("bce (N,1,H,W)", L.BCEWithLogitsLoss(), True, None),
        ("sigmoid_focal (N,1,H,W)", L.SigmoidFocalLoss(), True, None),
        ("binary_dice (N,1,H,W)", L.BinaryDiceLoss(), True, None),
    ]


def fwd_bwd_ms(fn, logits: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """(wall ms, process CPU ms) of one forward+backward."""
    logits.grad = None
    start, start_cpu = time.perf_counter(), time.process_time()
    fn(logits, target).backward()
    return (time.perf_counter() - start) * 1e3, (time.process_time() - start_cpu) * 1e3


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256, help="H = W (default 256)")
    parser.add_argument("--batch", type=int, default=8, help="N (default 8)")
    parser.add_argument("--classes", type=int, default=21, help="C (default 21)")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats per loss (default 7), median reported")
    parser.add_argument("--logits", choices=("random", "confident"), default="random",
                        help="random normal logits, or those of a well-trained model")
    parser.add_argument("--ignore-frac", type=float, default=0.05, help="share of random ignored pixels")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--only", default=None, help="comma-separated substrings: bench matching losses only")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    logits, target = make_inputs(args.batch, args.classes, args.size, args.logits, args.ignore_frac)
    logits.requires_grad_(True)
    binary_logits = logits[:, :1].detach().clone().requires_grad_(True)
    binary_target = torch.where(target == IGNORE, target, (target == 1).long())

    def reference(x, y):
        return F.cross_entropy(x, y, ignore_index=IGNORE)

    rows = losses(args.classes)
    if args.only:
        keys = args.only.split(",")
        rows = [row for row in rows if any(key in row[0] for key in keys)]
    print(f"logits ({args.batch}, {args.classes}, {args.size}, {args.size}) {args.logits}, float32, "
          f"{torch.get_num_threads()} threads, {args.repeats} repeats, torch {torch.__version__}")
    for _ in range(2):  # warm-up (allocator, lazy init)
        fwd_bwd_ms(reference, logits, target)
    ref_times: list[float] = []
    table = []
    for name, loss, binary, goal in rows:
        x, y = (binary_logits, binary_target) if binary else (logits, target)
        fwd_bwd_ms(loss, x, y)  # warm-up
        times, ratios, cpu_ratios = [], [], []
        for _ in range(args.repeats):
            ref, ref_cpu = fwd_bwd_ms(reference, logits, target)
            took, took_cpu = fwd_bwd_ms(loss, x, y)
            ref_times.append(ref)
            times.append(took)
            ratios.append(took / ref)
            cpu_ratios.append(took_cpu / max(ref_cpu, 1e-6))
        ratio = statistics.median(ratios)
        status = "-" if goal is None else ("OK" if ratio <= goal else "MISS")
        table.append((name, statistics.median(times), ratio, statistics.median(cpu_ratios), goal, status))

    print(f"reference F.cross_entropy fwd+bwd: median {statistics.median(ref_times):.1f} ms "
          f"(min {min(ref_times):.1f}, max {max(ref_times):.1f})")
    print(f"{'loss':<26} {'ms':>8} {'ratio':>7} {'cpu':>7} {'target':>7}  status")
    for name, ms, ratio, cpu_ratio, goal, status in table:
        goal_text = "-" if goal is None else f"{goal:.1f}x"
        print(f"{name:<26} {ms:8.1f} {ratio:6.2f}x {cpu_ratio:6.2f}x {goal_text:>7}  {status}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
