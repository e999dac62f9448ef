"""Exact convolutions that skip the kernel taps which can only read zero padding (dilated "same" convs on small
feature maps, as in DeepLabV3's ASPP): same outputs and gradients, parameters and state dicts of ``nn.Conv2d``."""
from __future__ import annotations

import torch
from torch import nn


def live_taps(kernel: int, dilation: int, padding: int, size: int) -> tuple[int, int]:
    """``(first, end)``: the kernel taps of a stride-1 convolution along one axis of length ``size`` that read at
    least one input element rather than padding. Tap ``i`` reads input ``y + i * dilation - padding`` for output
    ``y`` in ``[0, size)``; with "same" padding (``padding = dilation * (kernel - 1) / 2``) that lands inside
    ``[0, size)`` for some ``y`` iff ``|i * dilation - padding| < size``, a range symmetric about the centre."""
    live = [i for i in range(kernel) if abs(i * dilation - padding) < size]
    return live[0], live[-1] + 1


def _is_same_conv(conv: nn.Conv2d) -> bool:
    """A stride-1, zero-padded, odd k x k (k > 1 on some axis) conv with "same" padding ``dilation * (k - 1) / 2``."""
    if type(conv) is not nn.Conv2d or conv.stride != (1, 1) or conv.padding_mode != "zeros":
        return False
    if not isinstance(conv.padding, tuple) or conv.kernel_size == (1, 1):
        return False
    return all(k % 2 == 1 and p == d * (k - 1) // 2 for k, d, p in zip(conv.kernel_size, conv.dilation, conv.padding))


class PaddingAwareConv2d(nn.Conv2d):
    """``nn.Conv2d`` that convolves with the live part of its kernel only (exact).

    An atrous convolution whose dilation reaches past the feature map reads nothing but zero padding with its outer
    taps, which add exactly ``0 * w`` to the output and get an exactly zero gradient. This forward slices the weight to the taps ``live_taps`` keeps for
    the input's height and width and pads by as much less, so the output has the same size and values (up to the
    order of float summation) and the dead taps' gradient stays exactly 0 (weight decay still acts on them, as it
    does in the plain conv). Nothing changes at sizes where every tap is live. Parameters and state-dict keys are
    those of ``nn.Conv2d``; only stride-1 "same" convs are converted (``use_padding_aware_convs``).

    TorchScript, ONNX tracing and symbolic sizes (``torch.export`` with dynamic height and width, a dynamic
    ``torch.compile``) see the plain convolution: one graph must stay right at every size.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting() or torch.jit.is_tracing():
            return self._conv_forward(input, self.weight, self.bias)
        return self._live_forward(input)

    @torch.jit.unused
    def _live_forward(self, input: torch.Tensor) -> torch.Tensor:
        height, width = input.shape[-2:]
        if not (isinstance(height, int) and isinstance(width, int)):
            # torch.SymInt sizes: choosing taps would put a guard on the size into the graph (export would refuse it)
            return self._conv_forward(input, self.weight, self.bias)
        (kh, kw), (dh, dw), (ph, pw) = self.kernel_size, self.dilation, self.padding
        top, bottom = live_taps(kh, dh, ph, height)
        left, right = live_taps(kw, dw, pw, width)
        if (top, bottom, left, right) == (0, kh, 0, kw):
            return self._conv_forward(input, self.weight, self.bias)
        weight = self.weight[:, :, top:bottom, left:right]
        return nn.functional.conv2d(input, weight, self.bias, self.stride, (ph - top * dh, pw - left * dw),
                                    self.dilation, self.groups)


def use_padding_aware_convs(model: nn.Module) -> int:
    """Turns every stride-1 "same" ``nn.Conv2d`` of ``model`` into a ``PaddingAwareConv2d`` in place (the class
    only: same parameters, same state dict); returns how many."""
    converted = 0
    for module in model.modules():
        if _is_same_conv(module):
            module.__class__ = PaddingAwareConv2d
            converted += 1
    return converted
