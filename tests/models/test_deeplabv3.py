import math

import pytest
import torch
import torchvision

from train_seg.models.deeplabv3 import ModelError, build_deeplabv3, hub_checkpoint_path
from train_seg.engine.optim import lr_factor, warmup_schedule


def test_builds_random_init_mobilenet_with_bn_momentum_and_aux():
    model = build_deeplabv3("deeplabv3_mobilenet_v3_large", num_classes=4, aux_loss=True, bn_momentum=0.1)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(m.momentum == 0.1 for m in bns)
    model.eval()
    out = model(torch.randn(1, 3, 64, 64))
    assert out["out"].shape == (1, 4, 64, 64) and out["aux"].shape == (1, 4, 64, 64)


def test_bn_momentum_null_keeps_torchvision_value():
    model = build_deeplabv3("deeplabv3_mobilenet_v3_large", num_classes=3, bn_momentum=None)
    # torchvision: 0.01 in the MobileNetV3 backbone, PyTorch's default 0.1 in the DeepLab head
    assert {m.momentum for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {0.01}


def test_binary_head_has_one_channel_and_needs_two_classes():
    model = build_deeplabv3("deeplabv3_mobilenet_v3_large", num_classes=2, binary_head=True)
    assert model.classifier[-1].out_channels == 1
    with pytest.raises(ModelError, match="binary_head"):
        build_deeplabv3("deeplabv3_mobilenet_v3_large", num_classes=3, binary_head=True)


def test_unknown_arch_lists_choices():
    with pytest.raises(ModelError, match="deeplabv3_resnet50"):
        build_deeplabv3("unet", num_classes=3)


def test_full_weights_from_local_file_skip_mismatched_head(tmp_path):
    source = build_deeplabv3("deeplabv3_mobilenet_v3_large", num_classes=21)
    path = tmp_path / "full.pth"
    torch.save(source.state_dict(), path)
    model = build_deeplabv3("deeplabv3_mobilenet_v3_large", num_classes=4, weights=str(path))
    src, dst = source.state_dict(), model.state_dict()
    key = "backbone.0.0.weight"
    assert torch.equal(src[key], dst[key])
    assert dst["classifier.4.weight"].shape[0] == 4  # head left at init, not loaded


def test_backbone_weights_from_a_classification_checkpoint(tmp_path):
    classifier = torchvision.models.mobilenet_v3_large(weights=None)
    path = tmp_path / "mnv3.pth"
    torch.save(classifier.state_dict(), path)
    model = build_deeplabv3("deeplabv3_mobilenet_v3_large", num_classes=3, weights_backbone=str(path), bn_momentum=None)
    assert torch.equal(model.backbone["0"][0].weight, classifier.features[0][0].weight)
    assert torch.equal(model.backbone["16"][1].running_var, classifier.features[16][1].running_var)


def test_hub_weights_come_from_the_cache_only(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(ModelError) as info:
        build_deeplabv3("deeplabv3_mobilenet_v3_large", num_classes=3, weights_backbone="hub")
    from torchvision.models import MobileNet_V3_Large_Weights

    expected = tmp_path / "torch" / "hub" / "checkpoints" / "mobilenet_v3_large-8738ca79.pth"  # IMAGENET1K_V1
    assert str(expected) in str(info.value) and "nothing is downloaded" in str(info.value)
    # once the file is where the message says, it loads
    expected.parent.mkdir(parents=True)
    classifier = torchvision.models.mobilenet_v3_large(weights=None)
    torch.save(classifier.state_dict(), expected)
    assert hub_checkpoint_path(MobileNet_V3_Large_Weights.IMAGENET1K_V1) == expected
    model = build_deeplabv3("deeplabv3_mobilenet_v3_large", num_classes=3, weights_backbone="hub")
    assert torch.equal(model.backbone["0"][0].weight, classifier.features[0][0].weight)


def test_missing_or_bad_weights_file(tmp_path):
    with pytest.raises(ModelError, match="no such file"):
        build_deeplabv3("deeplabv3_mobilenet_v3_large", num_classes=3, weights=str(tmp_path / "nope.pth"))
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="could not read"):
        build_deeplabv3("deeplabv3_mobilenet_v3_large", num_classes=3, weights=str(bad))


def _shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _kxk_convs(module):
    return {n: m for n, m in module.named_modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)}


@pytest.mark.parametrize(
    "arch, output_stride, size",
    [
        ("deeplabv3_mobilenet_v3_large", 8, 64),
        ("deeplabv3_mobilenet_v3_large", 16, 64),
        ("deeplabv3_mobilenet_v3_large", None, 64),  # null = the architecture's own (16)
        ("deeplabv3_resnet50", 8, 64),
        ("deeplabv3_resnet50", 16, 64),
    ],
)
def test_output_stride_sets_the_feature_map_size_and_keeps_the_parameters(arch, output_stride, size):
    default = build_deeplabv3(arch, num_classes=3)
    model = build_deeplabv3(arch, num_classes=3, output_stride=output_stride).eval()
    assert _shapes(model) == _shapes(default)  # same names and shapes: weight files load for every stride
    expected = output_stride or (16 if "mobilenet" in arch else 8)
    features = {}
    model.backbone.register_forward_hook(lambda module, inputs, output: features.update(output))
    with torch.no_grad():  # one forward (ResNet-50 is slow on CPU)
        logits = model(torch.randn(1, 3, size, size))["out"]
    assert features["out"].shape[-2:] == (size // expected, size // expected)
    assert logits.shape == (1, 3, size, size)
    for conv in _kxk_convs(model.backbone).values():  # "same" padding everywhere
        assert conv.padding == tuple(d * (k - 1) // 2 for d, k in zip(conv.dilation, conv.kernel_size))


def test_mobilenet_output_stride_8_dilates_from_the_1_16_block_on():
    default = _kxk_convs(build_deeplabv3("deeplabv3_mobilenet_v3_large", num_classes=3).backbone)
    convs = _kxk_convs(build_deeplabv3("deeplabv3_mobilenet_v3_large", num_classes=3, output_stride=8).backbone)
    assert default["7.block.1.0"].stride == (2, 2) and default["13.block.1.0"].dilation == (2, 2)
    assert convs["7.block.1.0"].stride == (1, 1) and convs["7.block.1.0"].dilation == (2, 2)  # was the 1/8 -> 1/16 block
    for i in range(8, 13):
        assert convs[f"{i}.block.1.0"].dilation == (2, 2)
    for i in range(13, 16):  # torchvision's own last-stage dilation 2, doubled
        assert convs[f"{i}.block.1.0"].dilation == (4, 4) and convs[f"{i}.block.1.0"].padding == (8, 8)
    for name, conv in default.items():  # the 1/2 .. 1/8 part is untouched
        if int(name.split(".")[0]) < 7:
            assert (convs[name].stride, convs[name].dilation) == (conv.stride, conv.dilation)


def test_mobilenet_output_stride_8_with_aux_head_and_default_weights(tmp_path):
    source = build_deeplabv3("deeplabv3_mobilenet_v3_large", num_classes=4, aux_loss=True)
    path = tmp_path / "os16.pth"
    torch.save(source.state_dict(), path)
    model = build_deeplabv3(
        "deeplabv3_mobilenet_v3_large", num_classes=4, aux_loss=True, output_stride=8, weights=str(path)
    ).eval()
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in model.state_dict().items())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = model.backbone(x)
        out = model(x)
    assert features["aux"].shape[-2:] == (8, 8) and features["out"].shape[-2:] == (8, 8)
    assert out["out"].shape == (2, 4, 64, 64) and out["aux"].shape == (2, 4, 64, 64)


def test_resnet_output_stride_picks_torchvision_dilation_flags():
    tv = torchvision.models.segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=3)
    os8 = build_deeplabv3("deeplabv3_resnet50", num_classes=3, output_stride=8)
    os16 = build_deeplabv3("deeplabv3_resnet50", num_classes=3, output_stride=16, aux_loss=True)
    layout = lambda m: {n: (c.stride, c.dilation) for n, c in _kxk_convs(m.backbone).items()}  # noqa: E731
    assert layout(os8) == layout(tv)  # [False, True, True]
    assert os16.backbone.layer3[0].conv2.stride == (2, 2) and os16.backbone.layer3[1].conv2.dilation == (1, 1)
    assert os16.backbone.layer4[0].conv2.dilation == (1, 1) and os16.backbone.layer4[1].conv2.dilation == (2, 2)
    assert os16.backbone.return_layers == {"layer4": "out", "layer3": "aux"} and os16.aux_classifier is not None


@pytest.mark.parametrize("arch", ["deeplabv3_mobilenet_v3_large", "deeplabv3_resnet50"])
@pytest.mark.parametrize("value", [4, 32, "8", True])
def test_bad_output_stride_names_the_key_value_and_choices(arch, value):
    with pytest.raises(ModelError, match="model.output_stride") as info:
        build_deeplabv3(arch, num_classes=3, output_stride=value)
    assert repr(value) in str(info.value) and "[8, 16]" in str(info.value)


@pytest.mark.parametrize(
    "step, kind, expected",
    [
        (0, "poly", 0.001),  # warmup start
        (5, "poly", 0.001 + 0.999 * 0.5),  # halfway through a 10-step warmup
        (10, "poly", 1.0),  # end of warmup
        (60, "poly", 0.5**0.9),  # t = 50 / 100
        (110, "poly", 0.0),  # last step
        (60, "cosine", 0.5),
        (60, "constant", 1.0),
    ],
)
def test_lr_factor_hand_values(step, kind, expected):
    assert lr_factor(step, 110, kind, power=0.9, warmup_steps=10, warmup_factor=0.001) == pytest.approx(expected)


def test_warmup_schedule_drives_the_optimizer():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.1)
    sched = warmup_schedule(opt, total_steps=4, kind="poly", power=1.0, warmup_steps=0)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.1, 0.075, 0.05, 0.025])
    with pytest.raises(ValueError, match="scheduler.kind"):
        warmup_schedule(opt, 4, kind="step")
    assert not math.isnan(lr_factor(1000, 10))
