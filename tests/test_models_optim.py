import math

import pytest
import torch
import torchvision

from train_seg.models import ModelError, build_model, hub_checkpoint_path
from train_seg.optim import lr_factor, warmup_schedule


def test_builds_random_init_mobilenet_with_bn_momentum_and_aux():
    model = build_model("deeplabv3_mobilenet_v3_large", num_classes=4, aux_loss=True, bn_momentum=0.1)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(m.momentum == 0.1 for m in bns)
    model.eval()
    out = model(torch.randn(1, 3, 64, 64))
    assert out["out"].shape == (1, 4, 64, 64) and out["aux"].shape == (1, 4, 64, 64)


def test_bn_momentum_null_keeps_torchvision_value():
    model = build_model("deeplabv3_mobilenet_v3_large", num_classes=3, bn_momentum=None)
    # torchvision: 0.01 in the MobileNetV3 backbone, PyTorch's default 0.1 in the DeepLab head
    assert {m.momentum for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {0.01}


def test_binary_head_has_one_channel_and_needs_two_classes():
    model = build_model("deeplabv3_mobilenet_v3_large", num_classes=2, binary_head=True)
    assert model.classifier[-1].out_channels == 1
    with pytest.raises(ModelError, match="binary_head"):
        build_model("deeplabv3_mobilenet_v3_large", num_classes=3, binary_head=True)


def test_unknown_arch_lists_choices():
    with pytest.raises(ModelError, match="deeplabv3_resnet50"):
        build_model("unet", num_classes=3)


def test_full_weights_from_local_file_skip_mismatched_head(tmp_path):
    source = build_model("deeplabv3_mobilenet_v3_large", num_classes=21)
    path = tmp_path / "full.pth"
    torch.save(source.state_dict(), path)
    model = build_model("deeplabv3_mobilenet_v3_large", num_classes=4, weights=str(path))
    src, dst = source.state_dict(), model.state_dict()
    key = "backbone.0.0.weight"
    assert torch.equal(src[key], dst[key])
    assert dst["classifier.4.weight"].shape[0] == 4  # head left at init, not loaded


def test_backbone_weights_from_a_classification_checkpoint(tmp_path):
    classifier = torchvision.models.mobilenet_v3_large(weights=None)
    path = tmp_path / "mnv3.pth"
    torch.save(classifier.state_dict(), path)
    model = build_model("deeplabv3_mobilenet_v3_large", num_classes=3, weights_backbone=str(path), bn_momentum=None)
    assert torch.equal(model.backbone["0"][0].weight, classifier.features[0][0].weight)
    assert torch.equal(model.backbone["16"][1].running_var, classifier.features[16][1].running_var)


def test_hub_weights_come_from_the_cache_only(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(ModelError) as info:
        build_model("deeplabv3_mobilenet_v3_large", num_classes=3, weights_backbone="hub")
    from torchvision.models import MobileNet_V3_Large_Weights

    expected = tmp_path / "torch" / "hub" / "checkpoints" / "mobilenet_v3_large-8738ca79.pth"  # IMAGENET1K_V1
    assert str(expected) in str(info.value) and "nothing is downloaded" in str(info.value)
    # once the file is where the message says, it loads
    expected.parent.mkdir(parents=True)
    classifier = torchvision.models.mobilenet_v3_large(weights=None)
    torch.save(classifier.state_dict(), expected)
    assert hub_checkpoint_path(MobileNet_V3_Large_Weights.IMAGENET1K_V1) == expected
    model = build_model("deeplabv3_mobilenet_v3_large", num_classes=3, weights_backbone="hub")
    assert torch.equal(model.backbone["0"][0].weight, classifier.features[0][0].weight)


def test_missing_or_bad_weights_file(tmp_path):
    with pytest.raises(ModelError, match="no such file"):
        build_model("deeplabv3_mobilenet_v3_large", num_classes=3, weights=str(tmp_path / "nope.pth"))
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="could not read"):
        build_model("deeplabv3_mobilenet_v3_large", num_classes=3, weights=str(bad))


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
