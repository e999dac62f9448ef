"""Post-hoc calibration (train_seg.evaluation.calibration): recovering a known shift, never lowering the fitted
metric, bounded logit caching, the closed-form prior offsets and the model wrapper."""
import math

import pytest
import torch

from train_seg.evaluation.calibration import (Calibrated, Calibration, LogitSample, confusion_of, fit_offsets,
                                              prior_offsets, score)
from train_seg.evaluation.metrics import metrics_from_confusion


def shifted_logits(shift, n=40000, seed=0):
    """Balanced labels, logits 3 * onehot + noise (symmetric in the classes: zero offsets are their optimum), then
    class c lowered by shift[c]: the uncalibrated arg-max misses the lowered classes, offsets = shift undo it."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=gen)
    clean = 3.0 * torch.nn.functional.one_hot(labels, 4).float() + torch.randn(n, 4, generator=gen)
    return clean - torch.tensor(shift), labels, clean


def test_a_known_per_class_shift_is_given_back():
    shift = [0.0, 1.5, -1.0, 2.5]
    logits, labels, clean = shifted_logits(shift)
    offsets, before, after = fit_offsets(logits, labels, "val/mIoU")
    assert torch.allclose(offsets, torch.tensor(shift), atol=0.15), offsets
    ideal = score(confusion_of(clean, labels, torch.zeros(4)), "val/mIoU")
    assert before < ideal - 0.1 and after >= ideal - 0.01  # the shift cost mIoU; the offsets restore it


@pytest.mark.parametrize("metric", ["val/mIoU", "val/rare_mIoU", "val/mean_acc", "val/fwIoU", "val/pixel_acc"])
@pytest.mark.parametrize("seed", [0, 1])
def test_the_fitted_metric_never_drops(metric, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(5000, 5, generator=gen) * 2
    labels = torch.randint(0, 5, (5000,), generator=gen)
    rare = torch.tensor([False, False, False, True, True])
    offsets, before, after = fit_offsets(logits, labels, metric, rare)
    assert after >= before
    assert after == score(confusion_of(logits, labels, offsets), metric, rare)  # what the real arg-max gives
    assert offsets[0] == 0
    value = metrics_from_confusion(confusion_of(logits, labels, offsets), rare)[metric[4:]]
    assert math.isclose(value, after)


def test_a_calibrated_model_already_at_its_optimum_keeps_zero_offsets():
    labels = torch.arange(4).repeat(100)
    logits = 5 * torch.nn.functional.one_hot(labels, 4).float()  # perfect: mIoU 1
    offsets, before, after = fit_offsets(logits, labels, "val/mIoU")
    assert before == after == 1.0 and torch.equal(offsets, torch.zeros(4))


def test_logit_sample_keeps_at_most_its_budget_uniformly_and_reproducibly():
    def fill(seed):
        sample = LogitSample(max_pixels=3000, ignore_index=255, seed=seed)
        gen = torch.Generator().manual_seed(7)
        for _ in range(10):  # 10 batches of 2 x 20 x 20 = 8000 pixels, 1/8 of them ignored
            target = torch.randint(0, 3, (2, 20, 20), generator=gen)
            target[:, ::4, ::2] = 255
            logits = torch.randn(2, 3, 20, 20, generator=gen) + 5 * torch.nn.functional.one_hot(
                target.clamp_max(2), 3).permute(0, 3, 1, 2)
            sample.add(logits, target)
        return sample

    sample = fill(0)
    assert sample.seen == 10 * 800 * 7 // 8 and sample.labels.numel() == 3000 and sample.logits.shape == (3000, 3)
    assert (sample.labels != 255).all()
    shares = torch.bincount(sample.labels, minlength=3) / 3000
    assert torch.allclose(shares, torch.full((3,), 1 / 3), atol=0.04)  # uniform over what was seen
    # each kept logit row still belongs to its label (rows and labels subsampled together)
    assert (sample.logits.argmax(1) == sample.labels).float().mean() > 0.95
    again = fill(0)
    assert torch.equal(again.logits, sample.logits) and not torch.equal(fill(1).labels, sample.labels)
    with pytest.raises(ValueError, match="max_pixels must be >= 1"):
        LogitSample(0, 255)


def test_prior_offsets_are_the_closed_form_post_hoc_logit_adjustment():
    prior = torch.tensor([0.8, 0.15, 0.05, 0.0])
    offsets = prior_offsets(prior, tau=1.0)
    expected = -torch.log(torch.tensor([0.8, 0.15, 0.05, 1e-6], dtype=torch.float64))
    torch.testing.assert_close(offsets.double(), expected - expected[0], rtol=1e-6, atol=1e-6)
    assert torch.equal(prior_offsets(prior, tau=0.0), torch.zeros(4))


def test_the_wrapper_adds_the_offsets_to_out_only_and_the_file_round_trips(tmp_path):
    class Model(torch.nn.Module):
        def forward(self, x):
            return {"out": x, "aux": x}

    wrapped = Calibrated(Model(), [0.0, 1.0, -2.0])
    x = torch.zeros(1, 3, 2, 2)
    out = wrapped(x)
    assert out["out"][0, :, 0, 0].tolist() == [0.0, 1.0, -2.0] and torch.equal(out["aux"], x)
    record = Calibration(offsets=[0.0, 1.0, -2.0], class_names=["a", "b", "c"], method="fit", split="calib",
                         metric="val/mIoU", before=0.4, after=0.5, checkpoint="/x/best.pt", step=10)
    path = record.write(tmp_path / "calibration.json")
    assert Calibration.read(path) == record
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="bad.json: not a readable train_seg calibration"):
        Calibration.read(tmp_path / "bad.json")
