"""Models: torchvision DeepLabV3 builders (``deeplabv3``) and the exact padding-aware convolution they use
(``padding_conv``). ``train_seg.models.build_deeplabv3`` is the ``_target_`` of configs/model/ and of saved configs."""
from torch import nn

from train_seg.config.instantiate import instantiate_node, plain_node
from train_seg.models.deeplabv3 import ARCHITECTURES, ModelError, build_deeplabv3
from train_seg.models.padding_conv import PaddingAwareConv2d, live_taps, use_padding_aware_convs

__all__ = ["ARCHITECTURES", "ModelError", "PaddingAwareConv2d", "RESERVED_MODEL_KEYS", "build_deeplabv3", "build_model",
           "live_taps", "use_padding_aware_convs"]


# model keys that are not arguments of the builder: how the trainer wraps the model (train_seg.engine.trainer)
RESERVED_MODEL_KEYS = ("sync_batchnorm",)


def build_model(model_cfg, num_classes: int) -> nn.Module:
    """The model of a ``model`` config node (or a saved config's plain dict) with ``num_classes`` outputs."""
    spec = {k: v for k, v in plain_node(model_cfg, "model").items() if k not in RESERVED_MODEL_KEYS}
    return instantiate_node(spec, "model", num_classes=num_classes)
