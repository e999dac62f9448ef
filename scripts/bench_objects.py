"""What object-level metrics cost: an evaluation pass of the embedded val split with and without them.

    python scripts/bench_objects.py [--ckpt RUN_DIR_OR_FILE] [--rounds 5] [--objects rare|all] [--threads N]

The pass is the trainer's own: ``train_seg.engine.trainer.prepare`` on the default config (embedded dataset,
100 val images of 128 px, DeepLabV3-MobileNetV3), then ``train_seg.evaluation.loop.evaluate`` over its val loader,
once plainly and once with the ``ObjectCounts`` of ``metrics.objects`` (``rare`` = car by default; ``all`` = every
class). Without --ckpt the model is untrained; pass a trained run so that the prediction has objects to label (the
cost of the connected components grows with them). The two passes alternate for --rounds rounds after a warm-up
of each; printed: the median seconds of each and their ratio.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default=None, help="a trained run or checkpoint (default: the untrained model)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--objects", choices=("rare", "all"), default="rare")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args(argv)

    import torch
    from hydra import compose, initialize_config_dir

    from train_seg.config.command_line import CONFIG_DIR
    from train_seg.engine.trainer import prepare
    from train_seg.evaluation.loop import evaluate
    from train_seg.evaluation.objects import object_counter

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench_objects-"))
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.output_dir={work / 'run'}", f"paths.cache_dir={work / 'cache'}",
                                          "trainer.progress=false", "logger=none", "trainer.num_workers=0"])
    run = prepare(cfg, work / "run")
    if args.ckpt:
        from train_seg.checkpoint import load_checkpoint_model

        trained, _ = load_checkpoint_model(args.ckpt, run.settings.device, calibration="none")
        run.model.load_state_dict(trained.state_dict())
    metrics_cfg = {"objects": args.objects}
    ignore = int(cfg.dataset.ignore_index)

    def timed(with_objects: bool) -> float:
        objects = object_counter(metrics_cfg, run.rare, ignore) if with_objects else None
        tic = time.perf_counter()
        evaluate(run.model, run.val_loader, len(run.class_names), run.settings, objects=objects)
        seconds = time.perf_counter() - tic
        if objects is not None:
            timed.objects = objects.counts[:, 0].sum().item()
        return seconds

    timed(False), timed(True)  # warm-up
    plain, counted = [], []
    for _ in range(args.rounds):
        plain.append(timed(False))
        counted.append(timed(True))
    a, b = statistics.median(plain), statistics.median(counted)
    print(f"val split: {len(run.val_set)} images of {int(cfg.dataset.image_size)} px, objects={args.objects} "
          f"({timed.objects:.0f} ground-truth objects counted), {args.rounds} rounds")
    print(f"evaluation pass: {a:.3f} s plain, {b:.3f} s with object metrics: x{b / a:.3f} ({100 * (b / a - 1):+.1f}%)")


if __name__ == "__main__":
    main()
