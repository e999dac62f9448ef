"""Our training epoch against a plain PyTorch loop written the way torchvision's reference script writes it.

    python scripts/bench_vs_reference.py [--rounds 5] [--images 160] [--crop 256] [--batch 4] [--workers 2]
                                         [--arch deeplabv3_mobilenet_v3_large] [--our-override KEY=VALUE ...]

Both train one epoch of DeepLabV3 on the same Pascal-VOC-layout data (``--images`` 500x375 JPEG images with
palette-PNG masks, 21 classes, written once to a temporary folder), with the same crop, batch size and number of
DataLoader workers; only training is timed (first batch requested to last step done, worker start-up included;
no evaluation, no checkpoints).

* ``reference``: the loop of torchvision's ``references/segmentation/train.py``, re-written here (not imported):
  a ``VOCSegmentation``-style dataset (PIL ``open().convert("RGB")``), its paired PIL transforms (RandomResize of
  the shorter side to [0.5, 2] x ``base_size`` (crop x 520/480, the reference's ratio), RandomHorizontalFlip,
  RandomCrop with padding (mask padded with 255), PILToTensor, ConvertImageDtype(float), Normalize), its padding
  collate, ``torchvision.models.get_model(arch, weights=None, num_classes=21)``, SGD (momentum 0.9, weight decay
  1e-4) over backbone and classifier parameter groups, a per-step poly LambdaLR, cross-entropy with
  ``ignore_index=255``, fp32, contiguous tensors, and ``loss.item()`` every step for its metric logger.
* ``ours``: train_seg's defaults (``python -m train_seg dataset=voc`` with ``dataset.transforms.crop_size``,
  ``trainer.batch_size`` and ``trainer.num_workers`` set to the shared values, plus ``--our-override``s), built by
  ``train_seg.engine.trainer.prepare`` and trained by ``engine.train_one_epoch``: its own precision, memory format,
  transforms (albumentations RandomScale 0.5-2, class-aware crop) and loss.

Each epoch runs in a fresh Python process (like two separate runs), and the tools alternate, reference first in
odd rounds and ours first in even rounds, so drift on the machine hits both. Prints each round's images/s, then
min / median / max per tool and ``ratio`` = median(ours) / median(reference). Run it alone on the machine.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from _bench_common import TimedLoader, precision_setting, prepare_our_run, write_voc_dataset  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# -- the reference-style loop ------------------------------------------------------------------------------------
class PairedCompose:
    def __init__(self, transforms):
        self.transforms = transforms

    def __call__(self, image, target):
        for transform in self.transforms:
            image, target = transform(image, target)
        return image, target


class RandomResize:
    """Shorter side to a random size in [min_size, max_size] (bilinear image, nearest mask)."""

    def __init__(self, min_size: int, max_size: int):
        self.min_size, self.max_size = min_size, max_size

    def __call__(self, image, target):
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        size = random.randint(self.min_size, self.max_size)
        return TF.resize(image, size), TF.resize(target, size, interpolation=InterpolationMode.NEAREST)


class RandomHorizontalFlip:
    def __init__(self, p: float):
        self.p = p

    def __call__(self, image, target):
        from torchvision.transforms import functional as TF

        if random.random() < self.p:
            return TF.hflip(image), TF.hflip(target)
        return image, target


def _pad_to(image, size: int, fill: int):
    from torchvision.transforms import functional as TF

    width, height = image.size
    if min(width, height) >= size:
        return image
    return TF.pad(image, [0, 0, max(size - width, 0), max(size - height, 0)], fill=fill)


class RandomCrop:
    def __init__(self, size: int):
        self.size = size

    def __call__(self, image, target):
        from torchvision import transforms as T
        from torchvision.transforms import functional as TF

        image, target = _pad_to(image, self.size, 0), _pad_to(target, self.size, 255)
        top, left, height, width = T.RandomCrop.get_params(image, (self.size, self.size))
        return TF.crop(image, top, left, height, width), TF.crop(target, top, left, height, width)


class ToNormalizedTensors:
    """PILToTensor + ConvertImageDtype(float) + Normalize for the image; the mask to int64."""

    def __call__(self, image, target):
        from torchvision.transforms import functional as TF

        image = TF.convert_image_dtype(TF.pil_to_tensor(image), torch.float)
        return TF.normalize(image, mean=MEAN, std=STD), torch.as_tensor(TF.pil_to_tensor(target)[0], dtype=torch.int64)


class VOCPairs(torch.utils.data.Dataset):
    """What ``torchvision.datasets.VOCSegmentation`` does: ids from the split file, PIL images, a paired transform."""

    def __init__(self, root: Path, split: str, transforms):
        voc = Path(root) / "VOCdevkit" / "VOC2012"
        ids = (voc / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()
        self.images = [voc / "JPEGImages" / f"{i}.jpg" for i in ids]
        self.masks = [voc / "SegmentationClass" / f"{i}.png" for i in ids]
        self.transforms = transforms

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        from PIL import Image

        image = Image.open(self.images[index]).convert("RGB")
        target = Image.open(self.masks[index])
        return self.transforms(image, target)


def _cat_list(tensors, fill_value):
    """The reference's padding collate: a batch of the largest size, padded with ``fill_value``."""
    max_size = tuple(max(s) for s in zip(*[t.shape for t in tensors]))
    batched = tensors[0].new_full((len(tensors), *max_size), fill_value)
    for tensor, pad in zip(tensors, batched):
        pad[..., : tensor.shape[-2], : tensor.shape[-1]].copy_(tensor)
    return batched


def collate(batch):
    images, targets = zip(*batch)
    return _cat_list(images, 0), _cat_list(targets, 255)


def reference_epoch(root: Path, args) -> dict:
    import torchvision

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    random.seed(0)  # the reference itself is unseeded; seeded here so that every round does the same work
    torch.manual_seed(0)
    base = round(args.crop * 520 / 480)
    transforms = PairedCompose([RandomResize(int(0.5 * base), int(2.0 * base)), RandomHorizontalFlip(0.5),
                                RandomCrop(args.crop), ToNormalizedTensors()])
    dataset = VOCPairs(root, "train", transforms)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch, sampler=torch.utils.data.RandomSampler(dataset),
                                         num_workers=args.workers, collate_fn=collate, drop_last=True)
    model = torchvision.models.get_model(args.arch, weights=None, weights_backbone=None, num_classes=21)
    model.to(device)
    params = [{"params": [p for p in model.backbone.parameters() if p.requires_grad]},
              {"params": [p for p in model.classifier.parameters() if p.requires_grad]}]
    optimizer = torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=1e-4)
    iters = len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda x: (1 - x / iters) ** 0.9)

    def criterion(inputs, target):
        losses = {name: torch.nn.functional.cross_entropy(x, target, ignore_index=255) for name, x in inputs.items()}
        return losses["out"] if len(losses) == 1 else losses["out"] + 0.5 * losses["aux"]

    # the reference's MetricLogger: a smoothed loss from .item() every step, a line every print_freq steps
    losses, lines, print_freq = deque(maxlen=20), [], 10
    model.train()
    steps = 0
    tic = time.perf_counter()
    for step, (image, target) in enumerate(loader):
        image, target = image.to(device), target.to(device)
        output = model(image)
        loss = criterion(output, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if step % print_freq == 0:
            lines.append(f"[{step}/{iters}] loss {statistics.median(losses):.4f} lr {optimizer.param_groups[0]['lr']:.6f}")
        steps += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - tic
    return {"images": steps * args.batch, "seconds": seconds, "loss": statistics.median(losses) if losses else math.nan,
            "setting": f"fp32, contiguous, {args.workers} workers, {torch.get_num_threads()} threads"}


# -- ours -------------------------------------------------------------------------------------------------------
def our_epoch(root: Path, work: Path, args) -> dict:
    from train_seg.engine.loop import train_one_epoch

    overrides = [f"model.arch={args.arch}", f"dataset.transforms.crop_size={args.crop}",
                 f"trainer.batch_size={args.batch}", f"trainer.num_workers={args.workers}",
                 f"optimizer.lr={args.lr}", *args.our_override]
    run = prepare_our_run(root, work, overrides)
    run.train_set.reseed(int(run.config["seed"]))
    loader = TimedLoader(run.train_loader)
    tic = time.perf_counter()
    step, loss = train_one_epoch(run.model, run.criterion, run.optimizer, run.scheduler, run.scaler, loader,
                                 run.settings, epoch=0, global_step=0)
    if run.settings.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - tic
    trainer = run.config["trainer"]
    precision = precision_setting(run.settings.amp_dtype)
    _, waits = loader.cycles()
    return {"images": step * args.batch, "seconds": seconds, "loss": loss, "data_wait": sum(waits) / seconds,
            "setting": f"precision {precision}, channels_last {run.settings.channels_last}, compile "
                       f"{trainer.get('compile', False)}, {run.train_loader.num_workers} workers, "
                       f"{torch.get_num_threads()} threads"}


# -- driver -----------------------------------------------------------------------------------------------------
def _child(args) -> None:
    root, work = Path(args.data), Path(args.work)
    result = reference_epoch(root, args) if args.one == "reference" else our_epoch(root, work, args)
    print("RESULT " + json.dumps(result))


def _spawn(tool: str, root: Path, work: Path, argv: list[str]) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), *argv, "--one", tool, "--data", str(root),
               "--work", str(work / tool)]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"{tool} epoch failed (exit status {done.returncode})")
    return json.loads(lines[-1][len("RESULT "):])


def _spread(values: list[float]) -> str:
    return f"{min(values):.2f} / {statistics.median(values):.2f} / {max(values):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--images", type=int, default=160, help="training images in the VOC-layout dataset")
    parser.add_argument("--crop", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--workers", default="2", help="DataLoader workers of both (ours also takes auto)")
    parser.add_argument("--arch", default="deeplabv3_mobilenet_v3_large")
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--our-override", action="append", default=[], metavar="KEY=VALUE",
                        help="a Hydra override of our run, e.g. trainer.channels_last=true (repeatable)")
    parser.add_argument("--one", choices=("reference", "ours"), help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args, _ = parser.parse_known_args()
    if args.one:
        if args.one == "reference" and not args.workers.isdigit():
            raise SystemExit("--workers must be a number for the reference loop")
        args.workers = int(args.workers) if args.workers.isdigit() else args.workers
        _child(args)
        return

    argv = [a for a in sys.argv[1:]]
    ref_workers = args.workers if args.workers.isdigit() else "2"
    with tempfile.TemporaryDirectory(prefix="bench_vs_reference_") as tmp:
        work = Path(tmp)
        root = write_voc_dataset(work / "data", num_train=args.images, num_val=2)
        print(f"{args.arch}, {args.images} VOC-layout images (500x375 JPEG) -> crop {args.crop}, batch {args.batch}, "
              f"workers {args.workers}, one epoch per process, {args.rounds} interleaved rounds")
        rates: dict[str, list[float]] = {"reference": [], "ours": []}
        settings: dict[str, str] = {}
        for round_index in range(args.rounds):
            order = ("reference", "ours") if round_index % 2 == 0 else ("ours", "reference")
            cells = []
            for tool in order:
                tool_argv = argv if tool == "ours" else [*argv, "--workers", ref_workers]
                result = _spawn(tool, root, work, tool_argv)
                rate = result["images"] / result["seconds"]
                rates[tool].append(rate)
                settings[tool] = result["setting"]
                extra = f", data wait {100 * result['data_wait']:.1f}%" if "data_wait" in result else ""
                cells.append(f"{tool} {rate:.2f} img/s (loss {result['loss']:.3f}{extra})")
            print(f"round {round_index + 1}: " + "; ".join(cells), flush=True)
    print(f"reference: {settings['reference']}")
    print(f"ours:      {settings['ours']}")
    print(f"{'tool':<10} images/s min / median / max")
    for tool in ("reference", "ours"):
        print(f"{tool:<10} {_spread(rates[tool])}")
    ratio = statistics.median(rates["ours"]) / statistics.median(rates["reference"])
    print(f"ratio {ratio:.3f} (median ours / median reference)")


if __name__ == "__main__":
    main()
