"""Inference speed and peak memory on one large image: whole image, sliding windows, sliding windows + flip TTA.

    python scripts/bench_inference.py [--ckpt RUN_DIR_OR_FILE] [--size 2048] [--window 512] [--overlap 0.5]
                                      [--repeat 3] [--batch-size N] [--precision 32] [--device auto] [--threads N]

Without --ckpt the default model (configs/train.yaml: DeepLabV3-MobileNetV3, the embedded dataset's 4 classes) is
built untrained: speed and memory do not depend on the weights. The input is one random normalised
(1, 3, size, size) image; each mode runs ``train_seg.evaluation.inference.infer_logits`` (the predict command's path) and the
arg-max, once to warm up, then --repeat times; the median is reported.

Each mode runs in a fresh subprocess, so that peak memory is that mode's alone: on CPU, the peak resident set size
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``, which counts torch's allocations, unlike tracemalloc) and its
increase over the peak after loading the model and creating the input; on CUDA, ``torch.cuda.max_memory_allocated``
and its increase over the memory allocated before inference. Ratios are to the whole-image mode.

--batch-size (windows per forward pass) defaults to what ``python -m train_seg.cli.predict`` uses: the checkpoint's
trainer.val_batch_size (the default config's, 16, without --ckpt); --precision likewise defaults to the checkpoint's
(the default config's) trainer.precision, resolved on the device (``auto`` = bf16 on CPU).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

MODES = ("whole", "slide", "slide+flip")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default=None, help="checkpoint file or run directory (default: untrained model)")
    parser.add_argument("--size", type=int, default=2048, help="side of the square image in pixels")
    parser.add_argument("--window", type=int, default=512, help="sliding-window side in pixels")
    parser.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap, in [0, 1)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per mode (after one warm-up run)")
    parser.add_argument("--batch-size", type=int, default=None, help="windows per forward pass")
    parser.add_argument("--precision", default=None, help="32 | bf16-mixed | 16-mixed | auto")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {', '.join(MODES)}")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: run one mode, print JSON
    return parser.parse_args(argv)


def max_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def load_model(args, device):
    """``(model in eval mode on device, its config dict)``: the checkpoint's, or the default config's untrained."""
    from omegaconf import OmegaConf

    from train_seg.engine import builder as build
    from train_seg.config.command_line import compose
    from train_seg.checkpoint import load_checkpoint_model

    if args.ckpt:
        model, meta = load_checkpoint_model(args.ckpt, device)
        return model, meta.config
    config = OmegaConf.to_container(compose([], "train"), resolve=False)
    spec = dict(config["model"], weights=None, weights_backbone=None)
    return build.build_model(spec, num_classes=4).eval().to(device), config


def settings(args, config, device):
    from train_seg.config.validation import resolve_precision

    trainer = config.get("trainer") or {}
    precision = args.precision if args.precision is not None else str(trainer.get("precision", "32"))
    batch_size = args.batch_size or int(trainer.get("val_batch_size", 1))
    return resolve_precision(precision, device), batch_size, bool(trainer.get("channels_last", False))


def child(args) -> dict:
    """One mode in this process: median seconds per image and peak memory."""
    import torch

    from train_seg.config.validation import resolve_device
    from train_seg.evaluation.inference import infer_logits
    from train_seg.evaluation.metrics import predictions

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    model, config = load_model(args, device)
    amp_dtype, batch_size, channels_last = settings(args, config, device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    images = torch.randn((1, 3, args.size, args.size), generator=torch.Generator().manual_seed(0))
    kwargs = {"mode": "whole"} if args.child == "whole" else {
        "mode": "slide", "window": args.window, "overlap": args.overlap, "flip": args.child == "slide+flip"}
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device) if cuda else max_rss_bytes()
    times = []
    for run in range(args.repeat + 1):
        tic = time.perf_counter()
        mask = predictions(infer_logits(model, images, device, amp_dtype, channels_last, batch_size=batch_size,
                                        **kwargs)).cpu()
        if cuda:
            torch.cuda.synchronize(device)
        if run:  # the first run warms up
            times.append(time.perf_counter() - tic)
        del mask
    peak = torch.cuda.max_memory_allocated(device) if cuda else max_rss_bytes()
    return {"mode": args.child, "seconds": statistics.median(times), "peak": peak, "delta": peak - base,
            "memory": "CUDA max_memory_allocated" if cuda else "peak RSS (ru_maxrss)", "device": str(device),
            "threads": torch.get_num_threads(), "batch_size": batch_size,
            "precision": "fp32" if amp_dtype is None else str(amp_dtype).replace("torch.", "")}


def run_mode(mode: str, argv) -> dict:
    command = [sys.executable, os.path.abspath(__file__), *argv, "--child", mode]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{mode}: the benchmark subprocess failed (exit {result.returncode}):\n"
                         f"{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or "whole" not in modes:
        raise SystemExit(f"--modes: {unknown or modes}: choose among {', '.join(MODES)}, whole included (the ratios' "
                         "reference).")
    results = [run_mode(mode, argv) for mode in modes]
    first = results[0]
    print(f"{args.ckpt or 'untrained default model'}, one {args.size}x{args.size} image, {first['device']}, "
          f"{first['threads']} threads, {first['precision']}, window {args.window}, overlap {args.overlap}, "
          f"{first['batch_size']} windows per pass, median of {args.repeat}; memory: {first['memory']}")
    whole = next(r for r in results if r["mode"] == "whole")
    mib = 1024 * 1024
    print(f"{'mode':<12} {'s/image':>9} {'images/s':>9} {'x time':>7} {'peak MiB':>9} {'+MiB':>8} {'x +mem':>7}")
    for r in results:
        print(f"{r['mode']:<12} {r['seconds']:>9.3f} {1 / r['seconds']:>9.3f} {r['seconds'] / whole['seconds']:>7.2f} "
              f"{r['peak'] / mib:>9.0f} {r['delta'] / mib:>8.0f} {r['delta'] / max(whole['delta'], 1):>7.2f}")


if __name__ == "__main__":
    main()
