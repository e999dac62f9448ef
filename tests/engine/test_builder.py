"""build.py: class weights reach every loss term that takes them; constructor errors come out unwrapped."""
import pytest
import torch
from omegaconf import OmegaConf

from train_seg.engine import builder as build
from train_seg.config.validation import ConfigError
from train_seg.losses import CrossEntropyLoss, DiceLoss, GeneralizedDiceLoss, WeightedSum

WEIGHTS = torch.tensor([0.25, 1.0, 1.25, 1.5])


def test_weights_go_to_every_term_that_takes_them(make_cfg):
    criterion = build.build_criterion(make_cfg("loss=ce_dice").loss, WEIGHTS)
    assert isinstance(criterion, WeightedSum)
    assert torch.equal(criterion.terms["ce"].weight, WEIGHTS) and torch.equal(criterion.terms["dice"].weight, WEIGHTS)
    # each term got its own copy: the vector is not shared mutable state
    assert criterion.terms["ce"].weight.data_ptr() != criterion.terms["dice"].weight.data_ptr()


def test_class_weights_false_keeps_a_term_unweighted():
    spec = OmegaConf.create({
        "_target_": "train_seg.losses.WeightedSum",
        "terms": {"ce": {"_target_": "train_seg.losses.CrossEntropyLoss"},
                  "dice": {"_target_": "train_seg.losses.DiceLoss", "class_weights": False},
                  "gdl": {"_target_": "train_seg.losses.GeneralizedDiceLoss"}},
        "weights": {"ce": 1.0, "dice": 0.5, "gdl": 0.25},
    })
    criterion = build.build_criterion(spec, WEIGHTS)
    assert torch.equal(criterion.terms["ce"].weight, WEIGHTS)
    assert criterion.terms["dice"].weight is None
    assert isinstance(criterion.terms["gdl"], GeneralizedDiceLoss)  # takes no class weights: none injected
    logits, target = torch.randn(2, 4, 6, 6), torch.randint(0, 4, (2, 6, 6))
    expected = (CrossEntropyLoss(weight=WEIGHTS)(logits, target) + 0.5 * DiceLoss()(logits, target)
                + 0.25 * GeneralizedDiceLoss()(logits, target))
    assert criterion(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)
    assert set(criterion.last_terms) == {"ce", "dice", "gdl"}


def test_explicit_weight_in_config_wins(make_cfg):
    cfg = make_cfg("+loss.weight=[1,2,3,4]")
    assert build.build_criterion(cfg.loss, WEIGHTS).weight.tolist() == [1, 2, 3, 4]


def test_no_weighting_gives_unit_weights_through_the_app(make_cfg, tmp_path):
    from train_seg.engine.trainer import prepare

    run = prepare(make_cfg("loss=focal", "loss.gamma=2"), tmp_path / "run")
    assert run.criterion.gamma == 2 and torch.equal(run.criterion.weight, torch.ones(4))


@pytest.mark.parametrize("override, message", [
    ("loss.gamma=-1", "gamma"),                 # the loss's own ValueError, unwrapped
    ("+loss.gama=2", "loss"),                   # a typo in a constructor argument names the node
])
def test_loss_errors_name_the_problem(make_cfg, override, message):
    with pytest.raises(ValueError, match=message):
        build.build_criterion(make_cfg("loss=focal", override).loss, WEIGHTS)


def test_missing_target_is_a_config_error():
    with pytest.raises(ConfigError, match="_target_"):
        build.build_criterion(OmegaConf.create({"ignore_index": 255}), None)
