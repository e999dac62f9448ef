"""models.PaddingAwareConv2d: a conv that skips the kernel taps reading only zero padding gives the plain conv's
outputs and gradients, and does less arithmetic exactly where the taps are dead."""
import warnings

import pytest
import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from train_seg.models import PaddingAwareConv2d, build_deeplabv3, live_taps, use_padding_aware_convs


@pytest.mark.parametrize("kernel, dilation, size, expected", [
    # tap i reads y + i*d - p, p = d*(k-1)/2: live iff |i*d - p| < size
    (3, 1, 1, (1, 2)),     # a 1-pixel map: only the centre tap reads the pixel
    (3, 1, 2, (0, 3)),     # offsets -1, 0, 1 all land inside a 2-pixel map
    (3, 12, 12, (1, 2)),   # offset 12 = size: out of range for every output
    (3, 12, 13, (0, 3)),   # offset 12 < 13: the last output row reads row 0
    (3, 36, 16, (1, 2)),   # ASPP rate 36 at a 256 px crop (16 x 16 at output stride 16)
    (5, 2, 4, (1, 4)),     # offsets -4 -2 0 2 4: +-4 dead on a 4-pixel map
    (5, 2, 3, (1, 4)),
    (5, 2, 2, (2, 3)),
    (5, 2, 5, (0, 5)),
])
def test_live_taps_hand_values(kernel, dilation, size, expected):
    assert live_taps(kernel, dilation, dilation * (kernel - 1) // 2, size) == expected


def _pair(in_ch, out_ch, kernel, dilation, groups, bias):
    plain = nn.Conv2d(in_ch, out_ch, kernel, padding=dilation * (kernel - 1) // 2, dilation=dilation, groups=groups,
                      bias=bias).double()
    aware = nn.Conv2d(in_ch, out_ch, kernel, padding=dilation * (kernel - 1) // 2, dilation=dilation, groups=groups,
                      bias=bias).double()
    aware.load_state_dict(plain.state_dict())
    assert use_padding_aware_convs(aware) == 1 and type(aware) is PaddingAwareConv2d
    return plain, aware


@pytest.mark.parametrize("kernel, dilation, groups, height, width", [
    (3, 36, 1, 16, 16),   # every outer tap dead: a 1x1 conv
    (3, 24, 1, 16, 30),   # rows dead, columns live
    (3, 12, 1, 16, 16),   # every tap live somewhere: unchanged
    (3, 6, 1, 5, 9),
    (5, 2, 8, 4, 4),      # depthwise 5x5, dilation 2 (MobileNetV3's last stage) on a 4x4 map: a 3x3 conv
    (5, 2, 8, 2, 7),
    (3, 1, 1, 1, 1),      # a 1x1 map (ASPP pooling-sized): only the centre
])
def test_outputs_and_gradients_equal_the_plain_conv(kernel, dilation, groups, height, width):
    torch.manual_seed(0)
    plain, aware = _pair(8, 8, kernel, dilation, groups, bias=True)
    x = torch.randn(2, 8, height, width, dtype=torch.float64)
    grad_out = torch.randn(2, 8, height, width, dtype=torch.float64)
    results = []
    for conv in (plain, aware):
        xi = x.clone().requires_grad_(True)
        out = conv(xi)
        out.backward(grad_out)
        results.append((out, xi.grad, conv.weight.grad, conv.bias.grad))
    for expected, got in zip(*results):
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    top, bottom = live_taps(kernel, dilation, dilation * (kernel - 1) // 2, height)
    left, right = live_taps(kernel, dilation, dilation * (kernel - 1) // 2, width)
    dead = torch.ones(kernel, kernel, dtype=torch.bool)
    dead[top:bottom, left:right] = False
    assert (aware.weight.grad[:, :, dead] == 0).all()  # exactly zero, as in the plain conv


def test_only_stride_1_same_convs_are_converted():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),               # same: converted
        nn.Conv2d(4, 4, 3, padding=1, stride=2),     # strided: kept
        nn.Conv2d(4, 4, 1),                          # 1x1: nothing to skip
        nn.Conv2d(4, 4, 3, padding=0),               # valid padding: kept
        nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),  # padding is not zeros: kept
        nn.Conv2d(4, 4, 4, padding=2),               # even kernel: kept
    )
    assert use_padding_aware_convs(model) == 1
    assert [type(m) is PaddingAwareConv2d for m in model] == [True, False, False, False, False, False]


def _aspp_convs(model):
    return [m for branch in model.classifier[0].convs[1:4] for m in branch.modules() if isinstance(m, nn.Conv2d)]


def test_deeplabv3_keeps_torchvision_parameters_and_outputs():
    torch.manual_seed(0)
    plain = torchvision.models.segmentation.deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                                        num_classes=3)
    ours = build_deeplabv3("deeplabv3_mobilenet_v3_large", num_classes=3, bn_momentum=None)
    assert all(type(m) is PaddingAwareConv2d for m in _aspp_convs(ours))
    assert list(ours.state_dict()) == list(plain.state_dict())
    ours.load_state_dict(plain.state_dict())
    plain.double().eval(), ours.double().eval()
    x = torch.randn(2, 3, 96, 128, dtype=torch.float64)
    torch.testing.assert_close(ours(x)["out"], plain(x)["out"], rtol=1e-10, atol=1e-10)
    off = build_deeplabv3("deeplabv3_mobilenet_v3_large", num_classes=3, skip_padding_taps=False)
    assert not any(isinstance(m, PaddingAwareConv2d) for m in off.modules())


@pytest.mark.parametrize("size, aspp_taps", [(128, [1, 1, 1]), (256, [9, 1, 1]), (512, [9, 9, 1])])
def test_aspp_arithmetic_drops_where_the_rates_pass_the_map(size, aspp_taps):
    """FLOPs of the three 3x3 ASPP branches (rates 12, 24, 36; 960 -> 256 channels) at output stride 16, counted by
    torch's FlopCounterMode from the weights the convs really use: 9 taps where the rate is inside the map
    (size / 16), 1 where it passes it."""
    model = build_deeplabv3("deeplabv3_mobilenet_v3_large", num_classes=3).eval()
    feature = torch.randn(1, 960, size // 16, size // 16)
    for conv, taps in zip(_aspp_convs(model), aspp_taps):
        with FlopCounterMode(display=False) as counter:
            conv(feature)
        assert counter.get_total_flops() == 2 * 960 * 256 * taps * (size // 16) ** 2


def test_scripting_and_tracing_use_the_whole_kernel():
    """A trace at one size must stay right at another, so TorchScript and ONNX tracing (the legacy exporters, which
    torch deprecates: their FutureWarnings are expected here) see the plain conv."""
    torch.manual_seed(0)
    _, aware = _pair(4, 4, 3, 12, 1, bias=False)
    x = torch.randn(1, 4, 20, 20, dtype=torch.float64)  # every tap live at 20
    plain = nn.functional.conv2d(x, aware.weight, None, 1, 12, 12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch >= 2.10: torch.jit.trace / script are deprecated
        traced = torch.jit.trace(aware, torch.randn(1, 4, 8, 8, dtype=torch.float64))  # all outer taps dead at 8
        scripted = torch.jit.script(aware)
    torch.testing.assert_close(traced(x), plain)
    torch.testing.assert_close(scripted(x), plain)


def test_torch_export_with_dynamic_sizes_uses_the_whole_kernel():
    """Exported at 8 x 8 (outer taps dead) with dynamic height and width, the program is right at 20 x 20 (every
    tap live) too; with static sizes it keeps the live-tap slicing of its size."""
    torch.manual_seed(0)
    _, aware = _pair(4, 4, 3, 12, 1, bias=False)
    sample, x = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.randn(1, 4, 20, 20, dtype=torch.float64)
    side = torch.export.Dim("side", min=2)
    shapes = ({0: torch.export.Dim("batch", min=1), 2: side, 3: torch.export.Dim("width", min=2)},)
    program = torch.export.export(aware, (sample,), dynamic_shapes=shapes, strict=False).module()
    torch.testing.assert_close(program(x), nn.functional.conv2d(x, aware.weight, None, 1, 12, 12))
    torch.testing.assert_close(program(sample), aware(sample))
    static = torch.export.export(aware, (sample,), strict=False)
    assert static.module()(sample).shape == sample.shape
    targets = [node.target for node in static.graph.nodes if node.op == "call_function"]
    assert any("slice" in str(target) for target in targets)  # the dead taps are cut off at a known size
