"""build.py: class weights reach every loss term that takes them; constructor errors come out unwrapped."""
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from train_seg.engine import builder as build
from train_seg.engine.trainer import prepare
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


def test_holdout_fraction_carves_a_disjoint_seeded_calib_split_out_of_train(make_cfg, tmp_path):
    from train_seg.data.base import DatasetError, HeldOut

    cfg = make_cfg("dataset.num_train=10", "+dataset.holdout_fraction=0.3", "+dataset.holdout_seed=5")
    train, calib = (build.build_source(cfg.dataset, split) for split in ("train", "calib"))
    assert isinstance(train, HeldOut) and (len(train), len(calib)) == (7, 3)
    assert sorted([*train.indices, *calib.indices]) == list(range(10))
    expected = sorted(np.random.default_rng(5).permutation(10)[:3])
    assert calib.indices.tolist() == expected
    whole = build.build_source(make_cfg("dataset.num_train=10").dataset, "train")
    assert np.array_equal(calib.load_mask(0), whole.load_mask(expected[0]))
    assert calib.describe(1) == whole.describe(expected[1]) and calib.identity() != train.identity()
    assert len(build.build_source(cfg.dataset, "val")) == 4  # val is untouched
    run = prepare(cfg, tmp_path / "run")
    assert len(run.train_set) == 7  # training never sees the held-out images
    with pytest.raises(DatasetError, match=r"dataset.holdout_fraction=1.5 needs a number in \(0, 1\)"):
        build.build_source(make_cfg("+dataset.holdout_fraction=1.5").dataset, "train")
