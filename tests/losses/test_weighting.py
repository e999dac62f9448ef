"""Class weighting: every scheme against a hand-computed example of its published formula, then normalisation,
clip, absent classes, errors, the table and the configs in configs/weighting/.

The hand-made split (K=3, four images, ignore pixels already excluded):

    image  pixels  class 0  class 1  class 2
      0      450     450       -        -
      1      250     150      100       -
      2      250     200       -       50
      3      250     100      100       50
    total   1200     900      200      100     N = 1200, image counts n = [4, 2, 2]

Expected numbers are written with plain Python ``math``, independently of the numpy code under test.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from train_seg.data.class_stats import ClassStats
from train_seg.losses.weighting import (
    NORMALIZATIONS,
    SCHEMES,
    all_scheme_weights,
    class_weights,
    format_weight_table,
    scheme_defaults,
)

CONFIG_DIR = Path(__file__).resolve().parents[2] / "src" / "train_seg" / "configs" / "weighting"
FREQUENCY_SCHEMES = [name for name in SCHEMES if name not in ("none", "manual")]


def make_stats(per_image: list[list[int]]) -> ClassStats:
    """ClassStats from per-image pixel counts (rows: images, columns: classes)."""
    counts = np.asarray(per_image, dtype=np.int64).reshape(len(per_image), -1)
    return ClassStats(
        pixel_counts=counts.sum(0),
        image_counts=(counts > 0).sum(0),
        presence=counts > 0,
        ignored_pixels=0,
        image_pixels=counts.sum(1),
    )


SPLIT = [[450, 0, 0], [150, 100, 0], [200, 0, 50], [100, 100, 50]]


@pytest.fixture
def stats() -> ClassStats:
    return make_stats(SPLIT)


def raw(stats: ClassStats, scheme: str, **params) -> list[float]:
    weights = class_weights(stats, scheme, normalize="none", **params)
    assert weights.dtype == torch.float32 and weights.shape == (stats.num_classes,)
    return weights.tolist()


def test_fixture_counts(stats):
    assert stats.pixel_counts.tolist() == [900, 200, 100]
    assert stats.image_counts.tolist() == [4, 2, 2]
    assert stats.pixels_of_images_containing.tolist() == [1200, 500, 500]


# --------------------------------------------------------------------------------------------------- schemes


def test_none(stats):
    assert raw(stats, "none") == [1.0, 1.0, 1.0]


def test_inverse(stats):  # N / (K N_c)
    assert raw(stats, "inverse") == pytest.approx([1200 / (3 * 900), 1200 / (3 * 200), 1200 / (3 * 100)])


def test_sqrt_inverse(stats):
    expected = [math.sqrt(1200 / (3 * 900)), math.sqrt(1200 / (3 * 200)), math.sqrt(1200 / (3 * 100))]
    assert raw(stats, "sqrt_inverse") == pytest.approx(expected)


@pytest.mark.parametrize("normalize", list(NORMALIZATIONS))
@pytest.mark.parametrize("max_ratio", [None, 3.0])
@pytest.mark.parametrize("split", [SPLIT, [[450, 0, 0, 0], [150, 100, 0, 0], [200, 0, 50, 0]], [[0, 0, 0]]],
                         ids=["all present", "absent class", "empty split"])
def test_power_is_none_sqrt_inverse_inverse_at_0_half_1(normalize, max_ratio, split):
    stats = make_stats(split)
    for p, scheme in ((0, "none"), (0.5, "sqrt_inverse"), (1, "inverse")):
        expected = class_weights(stats, scheme, normalize=normalize, max_ratio=max_ratio)
        got = class_weights(stats, "power", normalize=normalize, max_ratio=max_ratio, power=p)
        assert torch.equal(got, expected), (p, scheme)  # exactly, not approximately


def test_sqrt_inverse_numbers_unchanged_by_the_power_formula(stats):
    # sqrt_inverse is power(0.5): numpy's x ** 0.5 must be sqrt(x) bit for bit (the weights stay what they were)
    assert raw(stats, "sqrt_inverse") == np.sqrt([1200 / 2700, 2.0, 4.0]).astype(np.float32).tolist()
    assert raw(stats, "inverse") == np.asarray([1200 / 2700, 2.0, 4.0]).astype(np.float32).tolist()


def test_power_quarter(stats):  # (N / (K N_c))^0.25, N / (K N_c) = [4/9, 2, 4]
    expected = [(4 / 9) ** 0.25, 2 ** 0.25, 4 ** 0.25]  # [0.8165, 1.1892, 1.4142]
    assert raw(stats, "power", power=0.25) == pytest.approx(expected, rel=1e-6)
    mean = sum(expected) / 3
    assert class_weights(stats, "power", power=0.25).tolist() == pytest.approx([w / mean for w in expected], rel=1e-6)
    # clip then normalise, like every scheme: max_ratio 1.5 caps 4^0.25 (not 2^0.25) at 1.5 * (4/9)^0.25 = 1.2247
    cap = 1.5 * (4 / 9) ** 0.25
    assert raw(stats, "power", power=0.25, max_ratio=1.5) == pytest.approx([(4 / 9) ** 0.25, 2 ** 0.25, cap],
                                                                          rel=1e-6)


def test_power_above_one_is_allowed(stats):
    assert raw(stats, "power", power=2) == pytest.approx([(4 / 9) ** 2, 4.0, 16.0])


def test_median_freq(stats):
    # f_c = N_c / pixels of the images containing c = [900/1200, 200/500, 100/500] = [0.75, 0.4, 0.2]; median 0.4
    assert raw(stats, "median_freq") == pytest.approx([0.4 / 0.75, 0.4 / 0.4, 0.4 / 0.2])


def test_median_freq_even_number_of_classes():
    stats = make_stats([[300, 100, 0, 0], [100, 0, 50, 50]])
    # f = [400/600, 100/400, 50/200, 50/200] = [2/3, 1/4, 1/4, 1/4]; median of four = (1/4 + 1/4) / 2
    assert raw(stats, "median_freq") == pytest.approx([0.25 / (2 / 3), 1.0, 1.0, 1.0])


def test_median_freq_differs_from_inverse_when_images_differ(stats):
    inverse = np.asarray(raw(stats, "inverse"))
    median = np.asarray(raw(stats, "median_freq"))
    assert not np.allclose(inverse / inverse[0], median / median[0])


def test_enet(stats):  # 1 / ln(c + p_c), p = [0.75, 1/6, 1/12]
    expected = [1 / math.log(1.02 + 900 / 1200), 1 / math.log(1.02 + 200 / 1200), 1 / math.log(1.02 + 100 / 1200)]
    assert raw(stats, "enet") == pytest.approx(expected)
    expected_c = [1 / math.log(1.5 + 900 / 1200), 1 / math.log(1.5 + 200 / 1200), 1 / math.log(1.5 + 100 / 1200)]
    assert raw(stats, "enet", c=1.5) == pytest.approx(expected_c)


def test_effective_num_images(stats):  # (1 - beta) / (1 - beta^n_c), n = images containing c = [4, 2, 2]
    assert raw(stats, "effective_num", beta=0.9) == pytest.approx(
        [0.1 / (1 - 0.9**4), 0.1 / (1 - 0.9**2), 0.1 / (1 - 0.9**2)]
    )
    assert raw(stats, "effective_num") == pytest.approx(  # default beta 0.999
        [0.001 / (1 - 0.999**4), 0.001 / (1 - 0.999**2), 0.001 / (1 - 0.999**2)], rel=1e-6
    )


def test_effective_num_pixels(stats):  # n = pixel counts [900, 200, 100]
    expected = [0.001 / (1 - 0.999**900), 0.001 / (1 - 0.999**200), 0.001 / (1 - 0.999**100)]
    assert raw(stats, "effective_num", beta=0.999, count="pixels") == pytest.approx(expected, rel=1e-6)


def test_effective_num_pixel_counts_degenerate_to_one_minus_beta():
    stats = make_stats([[10_000_000, 100_000, 0], [0, 0, 20_000]])
    assert raw(stats, "effective_num", beta=0.999, count="pixels") == pytest.approx([0.001] * 3)


def test_effective_num_limits(stats):
    assert raw(stats, "effective_num", beta=0.0) == pytest.approx([1.0, 1.0, 1.0])
    # beta -> 1: proportional to 1 / n_c (inverse image frequency); stable thanks to expm1
    weights = raw(stats, "effective_num", beta=1 - 1e-12)
    assert [w / weights[0] for w in weights] == pytest.approx([1.0, 2.0, 2.0], rel=1e-6)


def test_log(stats):  # max(1, ln(mu N / N_c))
    expected = [max(1.0, math.log(2 * 1200 / n)) for n in (900, 200, 100)]
    assert expected[0] == 1.0 and expected[2] > 3  # the example exercises both branches
    assert raw(stats, "log", mu=2.0) == pytest.approx(expected)


def test_log_default_mu():
    stats = make_stats([[9000, 900, 90, 10]])
    expected = [max(1.0, math.log(0.15 * 10000 / n)) for n in (9000, 900, 90, 10)]
    assert expected[:2] == [1.0, 1.0]
    assert raw(stats, "log") == pytest.approx(expected)


def test_manual(stats):
    assert raw(stats, "manual", values=[1.0, 2.0, 5.0]) == [1.0, 2.0, 5.0]
    weights = class_weights(stats, "manual", values=[1.0, 2.0, 6.0])  # normalize="mean" by default
    assert weights.tolist() == pytest.approx([1 / 3, 2 / 3, 2.0])


def test_manual_accepts_omegaconf_list(stats):
    cfg = OmegaConf.create({"scheme": "manual", "normalize": "none", "max_ratio": None, "values": [1, 2, 3]})
    assert class_weights(stats, **cfg).tolist() == [1.0, 2.0, 3.0]


# --------------------------------------------------------------------------------------- normalisation, clip


@pytest.mark.parametrize(
    "normalize, check",
    [
        ("mean", lambda w: w.mean() == pytest.approx(1.0)),
        ("sum", lambda w: w.sum() == pytest.approx(1.0)),
        ("max", lambda w: w.max() == pytest.approx(1.0)),
    ],
)
def test_normalize(stats, normalize, check):
    weights = class_weights(stats, "inverse", normalize=normalize)
    assert check(weights.double())
    raw_weights = torch.tensor(raw(stats, "inverse"))
    assert (weights / weights[0]).tolist() == pytest.approx((raw_weights / raw_weights[0]).tolist(), rel=1e-6)


def test_normalize_mean_values(stats):
    inverse = [1200 / 2700, 2.0, 4.0]
    mean = sum(inverse) / 3
    assert class_weights(stats, "inverse").tolist() == pytest.approx([w / mean for w in inverse], rel=1e-6)


def test_clip_before_normalisation(stats):
    # raw inverse [4/9, 2, 4], max_ratio 3 -> capped at 4/9 * 3 = 4/3
    assert raw(stats, "inverse", max_ratio=3) == pytest.approx([4 / 9, 4 / 3, 4 / 3])
    weights = class_weights(stats, "inverse", normalize="mean", max_ratio=3).double()
    assert weights.mean().item() == pytest.approx(1.0)
    assert (weights.max() / weights.min()).item() == pytest.approx(3.0)
    mean = (4 / 9 + 8 / 3) / 3
    assert weights.tolist() == pytest.approx([4 / 9 / mean, 4 / 3 / mean, 4 / 3 / mean], rel=1e-6)


def test_clip_ratio_one_gives_equal_weights(stats):
    assert class_weights(stats, "inverse", max_ratio=1).tolist() == pytest.approx([1.0, 1.0, 1.0])


def test_clip_above_ratio_is_noop(stats):
    assert raw(stats, "inverse", max_ratio=100) == pytest.approx(raw(stats, "inverse"))


# ------------------------------------------------------------------------------------------- absent classes


@pytest.mark.parametrize("scheme", FREQUENCY_SCHEMES)
def test_absent_class_gets_largest_present_weight(scheme):
    stats = make_stats([[450, 0, 0, 0], [150, 100, 0, 0], [200, 0, 50, 0], [100, 100, 50, 0]])
    weights = raw(stats, scheme)
    assert all(math.isfinite(w) and w > 0 for w in weights)
    assert weights[3] == pytest.approx(max(weights[:3]))
    # the present classes keep their ratios (inverse's N / (K N_c) counts the absent class in K: a constant factor)
    without = raw(make_stats(SPLIT), scheme)
    assert [w / weights[0] for w in weights[:3]] == pytest.approx([w / without[0] for w in without], rel=1e-6)


@pytest.mark.parametrize("scheme", [name for name in SCHEMES if name != "manual"])
@pytest.mark.parametrize("per_image", [[[0, 0, 0]], []], ids=["all-ignored image", "no image"])
def test_empty_split_gives_ones(scheme, per_image):
    if per_image:
        stats = make_stats(per_image)
    else:
        stats = ClassStats(np.zeros(3), np.zeros(3), np.zeros((0, 3)), 0, np.zeros(0))
    for normalize in NORMALIZATIONS:
        weights = class_weights(stats, scheme, normalize=normalize)
        assert torch.isfinite(weights).all()
        assert torch.allclose(weights, weights[0].expand(3))


def test_single_present_class():
    stats = make_stats([[100, 0, 0]])
    for scheme in FREQUENCY_SCHEMES:
        assert class_weights(stats, scheme).tolist() == pytest.approx([1.0, 1.0, 1.0]), scheme


def test_absent_class_keeps_manual_value():
    stats = make_stats([[100, 0, 0]])
    assert raw(stats, "manual", values=[1, 2, 3]) == [1.0, 2.0, 3.0]


# -------------------------------------------------------------------------------------------------- errors


def test_unknown_scheme_lists_choices(stats):
    with pytest.raises(ValueError, match="weighting.scheme") as info:
        class_weights(stats, "inverse_freq")
    for name in SCHEMES:
        assert name in str(info.value)


def test_unknown_normalize_lists_choices(stats):
    with pytest.raises(ValueError, match="weighting.normalize.*mean, sum, max, none"):
        class_weights(stats, "inverse", normalize="l1")


def test_manual_wrong_length(stats):
    with pytest.raises(ValueError, match=r"weighting\.values has 2 entries.*K=3 classes.*class_names"):
        class_weights(stats, "manual", values=[1.0, 2.0])


@pytest.mark.parametrize("values", [None, "1,2,3", [1, 0, 2], [1, -1, 2], [1, float("nan"), 2], [1, "a", 2]])
def test_manual_bad_values(stats, values):
    with pytest.raises(ValueError, match=r"weighting\.values"):
        class_weights(stats, "manual", values=values)


@pytest.mark.parametrize(
    "scheme, params, key",
    [
        ("effective_num", {"beta": 1.0}, "weighting.beta"),
        ("effective_num", {"beta": -0.1}, "weighting.beta"),
        ("effective_num", {"beta": "high"}, "weighting.beta"),
        ("effective_num", {"count": "masks"}, "weighting.count"),
        ("enet", {"c": 1.0}, "weighting.c"),
        ("log", {"mu": 0.0}, "weighting.mu"),
        ("power", {"power": -0.5}, "weighting.power"),
        ("power", {"power": float("nan")}, "weighting.power"),
        ("power", {"power": float("inf")}, "weighting.power"),
        ("power", {"power": "strong"}, "weighting.power"),
        ("inverse", {"beta": 0.9}, "weighting.beta"),
        ("inverse", {"max_ratio": 0.5}, "weighting.max_ratio"),
    ],
)
def test_bad_params_name_the_key(stats, scheme, params, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        class_weights(stats, scheme, **params)


def test_unknown_param_lists_the_scheme_parameters(stats):
    with pytest.raises(ValueError, match=r"weighting\.mu is not a parameter of scheme 'effective_num'.*beta, count"):
        class_weights(stats, "effective_num", mu=0.1)


def test_median_freq_needs_image_pixels():
    stats = ClassStats(np.array([3, 1]), np.array([1, 1]), np.array([[True, True]]), 0)
    with pytest.raises(ValueError, match="image_pixels"):
        class_weights(stats, "median_freq")


# --------------------------------------------------------------------------------------- properties


counts_matrices = st.lists(
    st.lists(st.integers(0, 10**7), min_size=4, max_size=4), min_size=1, max_size=6
)


@settings(max_examples=60, deadline=None)
@given(per_image=counts_matrices, scheme=st.sampled_from(FREQUENCY_SCHEMES), max_ratio=st.none() | st.floats(1, 50))
def test_weights_always_finite_positive_and_normalised(per_image, scheme, max_ratio):
    stats = make_stats(per_image)
    weights = class_weights(stats, scheme, normalize="mean", max_ratio=max_ratio).double()
    assert torch.isfinite(weights).all() and (weights > 0).all()
    assert weights.mean().item() == pytest.approx(1.0, rel=1e-5)
    if max_ratio is not None:
        assert (weights.max() / weights.min()).item() <= max_ratio * (1 + 1e-5)


@settings(max_examples=40, deadline=None)
@given(per_image=counts_matrices, scale=st.integers(2, 1000))
def test_pixel_frequency_schemes_are_scale_free(per_image, scale):
    # inverse, sqrt_inverse, median_freq, enet and log depend on pixel SHARES only
    stats, scaled = make_stats(per_image), make_stats([[n * scale for n in row] for row in per_image])
    for scheme in ("inverse", "sqrt_inverse", "power", "median_freq", "enet", "log"):
        assert torch.allclose(class_weights(stats, scheme), class_weights(scaled, scheme), rtol=1e-5), scheme


@settings(max_examples=40, deadline=None)
@given(per_image=counts_matrices)
def test_rarer_class_never_weighs_less(per_image):
    stats = make_stats(per_image)
    order = np.argsort(stats.pixel_counts, kind="stable")
    present = order[stats.pixel_counts[order] > 0]
    if present.size == 0:
        return
    for scheme in ("inverse", "sqrt_inverse", "power", "enet", "log"):
        weights = class_weights(stats, scheme).numpy()[present]
        assert (np.diff(weights) <= 1e-6 * weights.max()).all(), scheme


# ------------------------------------------------------------------------------------ table, all schemes


def test_all_scheme_weights(stats):
    weights = all_scheme_weights(stats)
    assert set(weights) == set(SCHEMES) - {"manual", "power"}  # power at its default 0.5 is sqrt_inverse
    assert torch.allclose(weights["inverse"], class_weights(stats, "inverse"))


def test_format_weight_table():
    stats = make_stats([[450, 0, 0, 0], [150, 100, 0, 1], [200, 0, 50, 0]])
    weights = class_weights(stats, "inverse")
    table = format_weight_table(["background", "car", "person", "bike"], stats, weights)
    lines = table.splitlines()
    assert lines[0].split() == ["class", "pixels", "%", "images", "weight"]
    assert len(lines) == 2 + 4
    assert lines[2].split()[:3] == ["background", "84.12", "3/3"]
    assert lines[3].split()[:3] == ["car", "10.52", "1/3"]
    assert lines[5].split()[:3] == ["bike", "0.11", "1/3"]
    assert f"{weights[1].item():.4g}" in lines[3]
    # right-aligned numeric columns: the weight column ends at the same position on every row
    ends = {len(line) for line in lines}
    assert len(ends) == 1


def test_format_weight_table_absent_class_and_many_columns(stats):
    absent = make_stats([[450, 0, 0], [150, 100, 0]])
    table = format_weight_table(["bg", "a", "b"], absent, all_scheme_weights(absent))
    assert "absent" in table.splitlines()[-1]
    assert "median_freq" in table.splitlines()[0]
    with pytest.raises(ValueError):
        format_weight_table(["bg", "a"], stats, class_weights(stats, "inverse"))


# --------------------------------------------------------------------------------------------- configs


def test_one_config_per_scheme():
    assert {path.stem for path in CONFIG_DIR.glob("*.yaml")} == set(SCHEMES)


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_config_matches_scheme_defaults(scheme, stats):
    cfg = OmegaConf.load(CONFIG_DIR / f"{scheme}.yaml")
    assert cfg.scheme == scheme
    assert cfg.normalize == "mean" and cfg.max_ratio is None
    container = OmegaConf.to_container(cfg)  # a missing value reads as "???"
    params = {key: value for key, value in container.items() if key not in ("scheme", "normalize", "max_ratio")}
    defaults = scheme_defaults(scheme)
    assert set(params) == set(defaults)
    if scheme == "manual":
        assert OmegaConf.is_missing(cfg, "values")  # mandatory
        cfg["values"] = [1.0, 2.0, 3.0]  # not cfg.values: that is DictConfig.values()
    else:
        assert params == defaults  # one source of truth: the YAML repeats the function defaults exactly
    weights = class_weights(stats, **cfg)
    assert weights.shape == (3,) and torch.isfinite(weights).all()
