"""torchvision DeepLabV3 builders. Nothing is ever downloaded: pretrained weights come from a local file or from
files already present in the torch hub cache (``$TORCH_HOME/hub/checkpoints``, default ``~/.cache/torch``).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from train_seg.models.padding_conv import use_padding_aware_convs

log = logging.getLogger(__name__)

# torchvision is imported when a model is built, not with this module: importing it costs seconds (its ops import
# torch._dynamo), which the commands and runs that build no DeepLabV3 need not pay.
ARCHITECTURES = ("deeplabv3_mobilenet_v3_large", "deeplabv3_resnet50", "deeplabv3_resnet101")


def _torchvision_parts(arch: str):
    """``(builder, full-model weights enum (COCO subset, VOC labels), backbone weights enum (ImageNet))``."""
    from torchvision.models import MobileNet_V3_Large_Weights, ResNet50_Weights, ResNet101_Weights
    from torchvision.models import segmentation as tv_seg

    return {
        "deeplabv3_mobilenet_v3_large": (tv_seg.deeplabv3_mobilenet_v3_large,
                                         tv_seg.DeepLabV3_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1,
                                         MobileNet_V3_Large_Weights.IMAGENET1K_V1),
        "deeplabv3_resnet50": (tv_seg.deeplabv3_resnet50, tv_seg.DeepLabV3_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1,
                               ResNet50_Weights.IMAGENET1K_V1),
        "deeplabv3_resnet101": (tv_seg.deeplabv3_resnet101,
                                tv_seg.DeepLabV3_ResNet101_Weights.COCO_WITH_VOC_LABELS_V1,
                                ResNet101_Weights.IMAGENET1K_V1),
    }[arch]


# arch: (output strides accepted by ``model.output_stride``, the architecture's own). torchvision dilates the last
# MobileNetV3 stage (1/16) and the last two ResNet stages (1/8).
OUTPUT_STRIDES = {
    "deeplabv3_mobilenet_v3_large": ((8, 16), 16),
    "deeplabv3_resnet50": ((8, 16), 8),
    "deeplabv3_resnet101": ((8, 16), 8),
}
# ResNet ``replace_stride_with_dilation`` per output stride (torchvision's deeplabv3_resnet* use the 8 entry).
_RESNET_DILATION = {8: [False, True, True], 16: [False, False, True]}
_RESNETS = ("deeplabv3_resnet50", "deeplabv3_resnet101")


class ModelError(ValueError):
    """Bad model configuration or a missing weights file; the message names the key or path and the fix."""


def build_deeplabv3(
    arch: str,
    num_classes: int,
    aux_loss: bool = False,
    bn_momentum: float | None = 0.1,
    binary_head: bool = False,
    weights: str | None = None,
    weights_backbone: str | None = None,
    output_stride: int | None = None,
    skip_padding_taps: bool = True,
) -> nn.Module:
    """Builds a randomly initialised DeepLabV3 (``weights=None, weights_backbone=None``), then loads local weights.

    Args:
        arch: one of ``ARCHITECTURES``.
        num_classes: output channels of the head (1 with ``binary_head``).
        aux_loss: add torchvision's auxiliary FCN head (output ``"aux"``).
        bn_momentum: momentum of every BatchNorm layer (None keeps the architecture's own; see configs/model).
        binary_head: a one-channel sigmoid head; requires ``num_classes == 2``.
        weights: full-model weights: a file path, or ``"hub"`` for torchvision's COCO_WITH_VOC_LABELS file in the
            hub cache. Tensors whose shape differs from the model (the 21-class heads when ``num_classes != 21``)
            are skipped and reported.
        weights_backbone: backbone weights: a file path (an ImageNet classification checkpoint of the same
            backbone) or ``"hub"``.
        output_stride: input size / backbone output size, 8 or 16 (None = the architecture's own: 16 for
            MobileNetV3, 8 for the ResNets). Smaller means a finer output map (small objects) at more compute in the
            last stages and the ASPP; strides are replaced by dilation, so parameter names and shapes (and weight
            files) are the same for every value.
        skip_padding_taps: make every stride-1 "same" k x k convolution a ``PaddingAwareConv2d``, which skips the
            kernel rows / columns that read only zero padding at the input's size (exact; see there). Module class
            only: parameters, names and state dicts are those of the plain model.
    """
    _check_head(arch, num_classes, binary_head)
    output_stride = _check_output_stride(arch, output_stride)
    model = _new_deeplabv3(arch, 1 if binary_head else num_classes, aux_loss, output_stride)
    _load_weights(model, arch, weights, weights_backbone)
    if bn_momentum is not None:
        set_bn_momentum(model, float(bn_momentum))
    if skip_padding_taps:
        use_padding_aware_convs(model)
    return model


def _check_head(arch: str, num_classes: int, binary_head: bool) -> None:
    if arch not in ARCHITECTURES:
        raise ModelError(f"model.arch={arch!r} is not known; choose one of {sorted(ARCHITECTURES)}.")
    if binary_head and num_classes != 2:
        raise ModelError(
            f"model.binary_head=true needs a 2-class dataset (background, foreground), but the dataset has "
            f"{num_classes} classes; set model.binary_head=false."
        )


def _check_output_stride(arch: str, output_stride: int | None) -> int:
    """``output_stride`` checked against ``OUTPUT_STRIDES`` (None: the architecture's own)."""
    choices, default_stride = OUTPUT_STRIDES[arch]
    if output_stride is None:
        output_stride = default_stride
    if isinstance(output_stride, bool) or output_stride not in choices:
        raise ModelError(
            f"model.output_stride={output_stride!r} is not supported by {arch}; choose one of {list(choices)} "
            f"or null (the architecture's own, {default_stride})."
        )
    return int(output_stride)


def _new_deeplabv3(arch: str, out_channels: int, aux_loss: bool, output_stride: int) -> nn.Module:
    """The randomly initialised model: torchvision's builder, its backbone re-strided when ``output_stride`` is not
    the architecture's own."""
    builder, default_stride = _torchvision_parts(arch)[0], OUTPUT_STRIDES[arch][1]
    if arch in _RESNETS and output_stride != default_stride:
        return _deeplabv3_resnet(arch, out_channels, aux_loss, output_stride)
    model = builder(weights=None, weights_backbone=None, num_classes=out_channels, aux_loss=aux_loss)
    if "mobilenet" in arch and output_stride != default_stride:
        _dilate_mobilenet(model.backbone, output_stride)
    return model


def _load_weights(model: nn.Module, arch: str, weights: str | None, weights_backbone: str | None) -> None:
    """Local backbone weights, then full-model weights (see ``build_deeplabv3``), each only when given."""
    _, full_enum, backbone_enum = _torchvision_parts(arch)
    if weights_backbone is not None:
        path = _resolve_weights(weights_backbone, backbone_enum, "model.weights_backbone")
        _load_backbone(model, arch, path)
    if weights is not None:
        path = _resolve_weights(weights, full_enum, "model.weights")
        _load_matching(model, _read_state_dict(path, "model.weights"), path)


def _deeplabv3_resnet(arch: str, num_classes: int, aux_loss: bool, output_stride: int) -> nn.Module:
    """torchvision's ``deeplabv3_resnet50/101`` (same modules, names and init order) with the backbone's
    ``replace_stride_with_dilation`` chosen for ``output_stride``."""
    from torchvision.models import resnet50, resnet101
    from torchvision.models._utils import IntermediateLayerGetter
    from torchvision.models.segmentation.deeplabv3 import DeepLabHead, DeepLabV3
    from torchvision.models.segmentation.fcn import FCNHead

    resnet = {"deeplabv3_resnet50": resnet50, "deeplabv3_resnet101": resnet101}[arch]
    backbone = resnet(weights=None, replace_stride_with_dilation=_RESNET_DILATION[output_stride])
    return_layers = {"layer4": "out"}
    if aux_loss:
        return_layers["layer3"] = "aux"
    backbone = IntermediateLayerGetter(backbone, return_layers=return_layers)
    aux_classifier = FCNHead(1024, num_classes) if aux_loss else None
    return DeepLabV3(backbone, DeepLabHead(2048, num_classes), aux_classifier)


def _dilate_mobilenet(features: nn.Module, output_stride: int) -> None:
    """Lowers the output stride of torchvision's (already last-stage dilated) MobileNetV3 features in place, the
    DeepLab way: the strided block that would take the map below 1/``output_stride`` gets stride 1, and its and every
    later k x k conv's dilation is multiplied by the stride removed (cumulative: the last stage goes from 2 to 4 at
    output stride 8), with padding ``dilation * (k - 1) // 2`` so sizes are kept. Only conv hyper-parameters change,
    never a parameter; the return layers ('out' = last block, 'aux' = the 1/8 block) stay where they are."""
    current, factor = 1, 1
    for block in features.children():
        convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
        strided = [m for m in convs if m.stride != (1, 1)]
        if len(strided) > 1:  # not a MobileNetV3 block (one strided conv per block)
            raise ModelError(f"cannot dilate block {type(block).__name__}: {len(strided)} strided convs.")
        for conv in strided:
            step = conv.stride[0]
            if current * step > output_stride:
                conv.stride = (1, 1)
                factor *= step
            else:
                current *= step
        for conv in convs:
            if conv.kernel_size != (1, 1) and factor > 1:
                conv.dilation = tuple(d * factor for d in conv.dilation)
                conv.padding = tuple(d * (k - 1) // 2 for d, k in zip(conv.dilation, conv.kernel_size))


def hub_checkpoint_path(weights_enum) -> Path:
    """Where torch hub keeps the file of a torchvision weights enum (the file name is the URL's basename)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(weights_enum.url).name


def _resolve_weights(spec: str, weights_enum, key: str) -> Path:
    if str(spec) == "hub":
        path = hub_checkpoint_path(weights_enum)
        if not path.is_file():
            raise ModelError(
                f"{key}=hub: the file {path} is not in the torch hub cache and nothing is downloaded at run time. "
                f"Copy it there from a machine with internet access (it is {weights_enum.url}), set TORCH_HOME to a "
                f"folder whose hub/checkpoints holds it, or pass {key}=/path/to/file.pth."
            )
        return path
    path = Path(str(spec)).expanduser()
    if not path.is_file():
        raise ModelError(f"{key}={spec}: no such file. Give the path of a local .pth/.pt file, `hub`, or null.")
    return path


def _read_state_dict(path: Path, key: str) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, pickle that is not a plain state dict...
        raise ModelError(f"{key}: could not read {path} as a PyTorch state dict ({exc}).") from exc
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]  # a train_seg checkpoint or a torchvision-reference checkpoint
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(f"{key}: {path} does not hold a state dict (a mapping of parameter names to tensors).")
    return obj


def _load_matching(module: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    own = module.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(k for k in state if k not in usable)
    missing = sorted(k for k in own if k not in usable)
    if not usable:
        raise ModelError(f"{path}: no tensor matches the model (wrong architecture?).")
    module.load_state_dict(usable, strict=False)
    log.info("loaded %d tensors from %s (%d skipped, %d left at init)", len(usable), path, len(skipped), len(missing))
    if skipped:
        log.info("skipped (shape or name mismatch): %s", ", ".join(skipped[:10]) + (" ..." if len(skipped) > 10 else ""))


def _load_backbone(model: nn.Module, arch: str, path: Path) -> None:
    state = _read_state_dict(path, "model.weights_backbone")
    if "mobilenet" in arch:
        # classification MobileNetV3 keys are "features.<i>..."; the segmentation backbone holds the features.
        state = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    else:
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    _load_matching(model.backbone, state, path)


def set_bn_momentum(model: nn.Module, momentum: float) -> None:
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = momentum
