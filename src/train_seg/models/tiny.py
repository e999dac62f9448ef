"""A tiny segmenter for tests and smoke runs: the output contract of torchvision's DeepLabV3 (``{"out": logits at
the input size, "aux": ...}``) at a few thousand parameters, so a training step takes milliseconds and a checkpoint
a few KB. ``train_seg.models.tiny.TinySegmenter`` is the ``_target_`` of configs/model/tiny.yaml."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from train_seg.models.deeplabv3 import ModelError


def _block(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class TinySegmenter(nn.Module):
    """Two strided conv-BN-ReLU blocks (output stride 4) and a 1x1 classifier, upsampled bilinearly to the input.

    Args:
        num_classes: classes of the dataset (the head has 1 channel with ``binary_head``).
        aux_loss: add an auxiliary 1x1 head on the first block (output ``"aux"``, also at the input size).
        binary_head: a one-channel sigmoid head; requires ``num_classes == 2`` (else ``ModelError``).
        width: channels of the first block (the second has twice as many).
        dropout: channel dropout (``nn.Dropout2d``) before the classifier while training, as in DeepLabV3's head
          (0: none, the default): a random draw per step, what resume tests check the random state with.
        arch: the model's name, ``"tiny"`` (reports, checkpoints and exports name the model by ``model.arch``).
    Forward: images ``(N, 3, H, W)`` -> ``{"out": (N, C, H, W)}`` (+ ``"aux"`` with ``aux_loss``).
    """

    def __init__(self, num_classes: int, aux_loss: bool = False, binary_head: bool = False, width: int = 8,
                 arch: str = "tiny", dropout: float = 0.0):
        super().__init__()
        if arch != "tiny":
            raise ModelError(f"model.arch={arch!r}: TinySegmenter is arch 'tiny'; pick another model= for {arch}.")
        if binary_head and num_classes != 2:
            raise ModelError(f"model.binary_head=true needs a 2-class dataset, but the dataset has {num_classes} "
                             "classes; set model.binary_head=false.")
        if not 0.0 <= float(dropout) < 1.0:
            raise ModelError(f"model.dropout={dropout}: must be in [0, 1).")
        out_channels = 1 if binary_head else num_classes
        self.stem = _block(3, width, 2)
        self.body = _block(width, 2 * width, 2)
        self.dropout = nn.Dropout2d(float(dropout)) if dropout else nn.Identity()
        self.classifier = nn.Conv2d(2 * width, out_channels, 1)
        self.aux_classifier = nn.Conv2d(width, out_channels, 1) if aux_loss else None

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        size = images.shape[-2:]
        stem = self.stem(images)
        outputs = {"out": F.interpolate(self.classifier(self.dropout(self.body(stem))), size=size, mode="bilinear",
                                        align_corners=False)}
        if self.aux_classifier is not None:
            outputs["aux"] = F.interpolate(self.aux_classifier(stem), size=size, mode="bilinear", align_corners=False)
        return outputs
