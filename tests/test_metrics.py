"""Metric functions against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from avss_lib.core.errors import ConfigError
from avss_lib.core.metrics import (
    average_precision,
    bootstrap_ci,
    bootstrap_statistic_ci,
    choice_lengths,
    choice_probabilities,
    expected_calibration_error,
    mc2_score,
    perplexity,
    averaged_proportion_ci,
    proportion_ci,
    reciprocal_rank,
    reliability_bins,
)

# Six answers: confidence, correct. Torchmetrics bins [k/15, (k+1)/15), 1.0 in the last bin:
#   0.05 -> bin 0 (acc 0); 0.3 -> bin 4 (acc 1); 0.5 -> bin 7 (acc 1); 0.55 -> bin 8 (acc 0);
#   0.95, 1.0 -> bin 14 (mean conf 0.975, acc 1).
# ECE = (0.05 + 0.7 + 0.5 + 0.55 + 2 * 0.025) / 6 = 1.85 / 6 = 30.8333...%
CONF = [0.05, 0.5, 0.55, 0.95, 1.0, 0.3]
CORRECT = [0, 1, 0, 1, 1, 1]


def test_bootstrap_ci_contains_mean_and_matches_normal_width() -> None:
    x = np.tile([0.0, 1.0], 50)  # mean 0.5, standard error 0.05
    mean, low, high = bootstrap_ci(x)
    assert mean == 0.5
    assert low < 0.5 < high
    assert 0.37 < low < 0.43 and 0.57 < high < 0.63  # about 0.5 -/+ 1.96 * 0.05
    assert bootstrap_ci(x) == (mean, low, high)  # fixed seed: reproducible


def test_bootstrap_ci_narrows_with_more_data() -> None:
    _, low_small, high_small = bootstrap_ci(np.tile([0.0, 1.0], 20))
    _, low_big, high_big = bootstrap_ci(np.tile([0.0, 1.0], 2000))
    assert high_big - low_big < (high_small - low_small) / 5


def test_bootstrap_ci_constant_and_single_value() -> None:
    assert bootstrap_ci([1.0, 1.0, 1.0]) == (1.0, 1.0, 1.0)
    assert bootstrap_ci([0.0]) == (0.0, 0.0, 0.0)


@pytest.mark.parametrize("bad", [[], [1.0, float("nan")]])
def test_bootstrap_ci_rejects_empty_or_nan(bad: list[float]) -> None:
    with pytest.raises(ConfigError):
        bootstrap_ci(bad)


def test_bootstrap_statistic_ci_paired_ece() -> None:
    value, low, high = bootstrap_statistic_ci([CONF, CORRECT], expected_calibration_error)
    assert value == pytest.approx(1.85 / 6 * 100)
    assert low <= value <= high
    with pytest.raises(ConfigError, match="equal lengths"):
        bootstrap_statistic_ci([CONF, CORRECT[:-1]], expected_calibration_error)


def test_mc2_score_hand_examples() -> None:
    assert mc2_score(np.log([0.5, 0.2, 0.3]), [1, 0, 1]) == pytest.approx(0.8)
    assert mc2_score([-1.0, -2.0], [1, 0]) == pytest.approx(1 / (1 + math.exp(-1)))
    assert mc2_score([-1000.0, -1001.0], [0, 1]) == pytest.approx(1 / (1 + math.e))  # stable for tiny probs
    with pytest.raises(ConfigError):
        mc2_score([-1.0, -2.0], [0, 0])


def test_choice_probabilities_and_lengths() -> None:
    np.testing.assert_allclose(choice_probabilities(np.log([1.0, 3.0])), [0.25, 0.75])
    np.testing.assert_array_equal(choice_lengths([" ab", "é"]), [3.0, 1.0])  # characters, as lm-eval's len()


def test_reciprocal_rank_and_average_precision() -> None:
    assert reciprocal_rank([0.1, 0.9, 0.5], [1, 0, 0]) == pytest.approx(1 / 3)
    assert reciprocal_rank([0.1, 0.9], [0, 0]) == 0.0
    scores, labels = [0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0]
    assert average_precision(scores, labels) == pytest.approx((1 / 1 + 2 / 3) / 2)
    assert average_precision(scores, labels) == pytest.approx(average_precision_score(labels, scores))
    assert average_precision([0.2, 0.1], [0, 0]) == 0.0


def test_ranking_ties_keep_the_original_order() -> None:
    assert reciprocal_rank([0.5, 0.5], [0, 1]) == 0.5  # like argmax, the first tied candidate ranks first
    assert reciprocal_rank([0.5, 0.5], [1, 0]) == 1.0


def test_ece_hand_computed() -> None:
    assert expected_calibration_error(CONF, CORRECT) == pytest.approx(1.85 / 6 * 100)
    assert expected_calibration_error([1.0, 1.0], [1, 1]) == 0.0
    assert expected_calibration_error([0.9, 0.9], [0, 0]) == pytest.approx(90.0)


def test_ece_rejects_non_probabilities() -> None:
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        expected_calibration_error([1.5], [1])


def test_reliability_bins_hand_computed_and_consistent_with_ece() -> None:
    bins = reliability_bins(CONF, CORRECT)
    assert len(bins) == 15 and bins["count"].sum() == 6
    assert bins.loc[0, "bin_lower"] == 0.0 and bins.loc[14, "bin_upper"] == 1.0
    assert bins["count"].tolist() == [1, 0, 0, 0, 1, 0, 0, 1, 1, 0, 0, 0, 0, 0, 2]
    assert bins.loc[14, "confidence"] == pytest.approx(0.975) and bins.loc[14, "accuracy"] == 1.0
    assert bins.loc[8, "accuracy"] == 0.0 and math.isnan(bins.loc[1, "confidence"])
    filled = bins[bins["count"] > 0]
    ece = (filled["count"] * (filled["accuracy"] - filled["confidence"]).abs()).sum() / 6 * 100
    assert ece == pytest.approx(expected_calibration_error(CONF, CORRECT))


def test_perplexity() -> None:
    assert perplexity(10 * math.log(4.0), 10) == pytest.approx(4.0)
    with pytest.raises(ConfigError, match="at least one scored token"):
        perplexity(1.0, 0)


def test_proportion_ci_is_wilsons_interval_by_hand() -> None:
    # Wilson: centre (p + z²/2n) / (1 + z²/n), half-width z / (1 + z²/n) · sqrt(p(1-p)/n + z²/4n²), z = 1.959964
    z = 1.959963984540054
    for k, n in [(0, 10), (5, 10), (10, 10), (1, 3)]:
        p = k / n
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        assert proportion_ci([1] * k + [0] * (n - k)) == pytest.approx((p, centre - half, centre + half))
    value, low, high = proportion_ci([False] * 10)
    assert value == low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)  # not the zero-width [0, 0]
    assert proportion_ci([True] * 10)[1] == pytest.approx(1 - 0.2775, abs=1e-4)
    for n in (37, 100, 200):  # statsmodels' bound at 0 or n is off by a rounding error for some n: kept contained
        for x in ([0] * n, [1] * n):
            value, low, high = proportion_ci(x)
            assert low <= value <= high and high - low > 0.01
    with pytest.raises(ConfigError, match="0/1"):
        proportion_ci([0.5, 1.0])
    with pytest.raises(ConfigError, match="confidence_level"):
        proportion_ci([0, 1], confidence_level=1.0)


def test_averaged_proportion_ci_is_wilsons_interval_on_the_averaged_shares() -> None:
    # two runs on four questions: shares 1, 1/2, 1/2, 0 -> 2 successes of 4 in Wilson's formula (n = questions)
    z = 1.959963984540054
    p, n = 0.5, 4
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert averaged_proportion_ci([1.0, 0.5, 0.5, 0.0]) == pytest.approx((0.5, centre - half, centre + half))
    assert averaged_proportion_ci([1, 0, 1]) == proportion_ci([1, 0, 1])  # one run: exactly Wilson's
    value, low, high = averaged_proportion_ci([0.0, 0.0])
    assert value == low == 0.0 and high == pytest.approx((z * z / 2) / (1 + z * z / 2))  # open at 0
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        averaged_proportion_ci([0.5, 1.5])


def test_holm_and_the_bootstrap_p_value_by_hand() -> None:
    from avss_lib.core.resampling import bootstrap_p_value, holm

    # sorted 0.01, 0.03, 0.04 of m = 3: 3 * 0.01, 2 * 0.03, max(0.06, 1 * 0.04); NaN is not in the family
    assert holm([0.01, 0.04, 0.03, float("nan")]).tolist()[:3] == pytest.approx([0.03, 0.06, 0.06])
    assert math.isnan(holm([0.01, float("nan")])[1]) and holm([0.5, 0.9]).tolist() == pytest.approx([1.0, 1.0])
    # 3 of 9 draws at or below 0: 2 (3 + 1) / 10; no draw on one side: 2 / 10; both sides equal: capped at 1
    assert bootstrap_p_value(np.array([-1.0, 0, -2, 1, 2, 3, 4, 5, 6])) == pytest.approx(0.8)
    assert bootstrap_p_value(np.arange(1.0, 10)) == pytest.approx(0.2)
    assert bootstrap_p_value(np.array([-1.0, 1.0])) == 1.0 and math.isnan(bootstrap_p_value(np.array([np.nan])))
