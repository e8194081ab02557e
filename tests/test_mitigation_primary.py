"""Claim E2's primary analysis: pooled metrics and intervals on hand-made results, and a rule whose three
outcomes are each reachable."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from avss_lib.core.metrics import expected_calibration_error
from avss_lib.mitigation.pooled_effects import examples_needed, improvement, pooled_draws, primary_table
from avss_lib.mitigation.verdict import e2_primary_verdict


def _per_example() -> pd.DataFrame:
    """Two data sets (4 and 2 examples); base and eavss one run each, random two draws."""
    rows = []
    correct = {"base": {"a": [1, 0, 0, 0], "b": [0, 1]}, "eavss": {"a": [1, 1, 1, 0], "b": [1, 1]},
               "random-0": {"a": [1, 1, 0, 0], "b": [0, 1]}, "random-1": {"a": [1, 0, 0, 0], "b": [1, 1]}}
    for run, by_dataset in correct.items():
        for dataset, values in by_dataset.items():
            for i, c in enumerate(values):
                rows.append({"run_id": run, "arm": run.split("-")[0], "dataset": dataset, "id": f"{dataset}{i}",
                             "correct": bool(c), "confidence": 0.6 if c else 0.9})
    return pd.DataFrame(rows)


def test_pooled_accuracy_is_over_examples_and_ece_over_data_sets() -> None:
    per_example = _per_example()
    acc = pooled_draws(per_example, "accuracy", ["eavss", "base", "random"], n_resamples=200, seed=0)
    assert acc.value["eavss"] == pytest.approx(100 * 5 / 6)
    assert acc.value["base"] == pytest.approx(100 * 2 / 6)
    assert acc.value["random"] == pytest.approx(100 * (3 / 6 + 3 / 6) / 2)
    assert acc.n_examples == 6 and acc.n_datasets == 2 and acc.n_runs == {"eavss": 1, "base": 1, "random": 2}
    ece = pooled_draws(per_example, "ece", ["eavss", "base"], n_resamples=50, seed=0)

    def dataset_ece(values: list[int]) -> float:
        c = np.array(values, dtype=bool)
        return expected_calibration_error(np.where(c, 0.6, 0.9), c)

    assert ece.value["base"] == pytest.approx((dataset_ece([1, 0, 0, 0]) + dataset_ece([0, 1])) / 2)
    assert ece.value["eavss"] == pytest.approx((dataset_ece([1, 1, 1, 0]) + dataset_ece([1, 1])) / 2)


def test_primary_table_intervals_contain_the_pooled_difference_and_the_mde_scales() -> None:
    flat = primary_table(_per_example(), n_resamples=500, seed=1)
    table = flat.set_index(["metric", "other"])
    row = table.loc[("accuracy", "base")]
    assert row["diff"] == pytest.approx(100 * 3 / 6)
    assert row["rel_change"] == pytest.approx(150.0)
    assert row["low"] <= row["diff"] <= row["high"] and row["se"] > 0
    assert row["mde"] == pytest.approx((2.241403 + 0.841621) * row["se_plan"], rel=1e-5)  # z_0.9875 + z_0.8
    assert row["se_plan"] > 0
    assert examples_needed(row, row["mde"] / 2) == 4 * row["n"]
    assert set(table.index) == {("accuracy", "base"), ("accuracy", "random"), ("ece", "base"), ("ece", "random")}
    ece = flat[(flat["metric"] == "ece") & (flat["other"] == "base")].iloc[0]
    assert improvement(ece) == (-ece["diff"], -ece["high"], -ece["low"])  # lower ECE is better


def test_the_mde_does_not_collapse_when_two_arms_answer_alike() -> None:
    """Identical arms give a paired SE of 0; the planning SE still reflects the examples' spread."""
    per_example = _per_example()
    same = per_example[per_example["arm"] != "eavss"]
    clone = same[same["arm"] == "base"].assign(arm="eavss", run_id="eavss")
    table = primary_table(pd.concat([same, clone], ignore_index=True), others=("base",), n_resamples=300, seed=2)
    acc = table[table["metric"] == "accuracy"].iloc[0]
    assert acc["diff"] == 0 and acc["se"] == 0 and acc["mde"] > 10


def _table(acc: tuple[float, float, float], acc_rel: tuple[float, float, float],
           acc_random: tuple[float, float, float] | None, ece: tuple[float, float, float] = (-20.0, -30.0, -10.0),
           ece_rel: tuple[float, float, float] = (-50.0, -70.0, -30.0),
           ece_random: tuple[float, float, float] | None = (-8.0, -12.0, -4.0), mde: float = 4.0,
           random_mde: float = 1.5) -> pd.DataFrame:
    """A primary table by hand: (diff, low, high) in points and in % per metric and other arm; the untouched
    model scores 40 (accuracy) and 30 (ECE), so the claim's smaller reading is 4.8 and 10.2 points."""
    rows = []
    for metric, base, rel, random, other in (("accuracy", acc, acc_rel, acc_random, 40.0),
                                             ("ece", ece, ece_rel, ece_random, 30.0)):
        rows.append({"metric": metric, "other": "base", "diff": base[0], "low": base[1], "high": base[2],
                     "rel_change": rel[0], "rel_low": rel[1], "rel_high": rel[2], "mde": mde, "n": 240,
                     "other_value": other})
        if random is not None:
            rows.append({"metric": metric, "other": "random", "diff": random[0], "low": random[1], "high": random[2],
                         "rel_change": np.nan, "rel_low": np.nan, "rel_high": np.nan, "mde": random_mde, "n": 240,
                         "other_value": other})
    return pd.DataFrame(rows)


def test_each_outcome_is_reachable() -> None:
    # both metrics reach the claim and beat random layers: holds
    holds = e2_primary_verdict(_table((14.0, 8.0, 20.0), (40.0, 20.0, 60.0), (6.0, 3.0, 9.0)))
    assert holds.outcome == "holds" and holds.analysis == "primary"
    assert holds.condition("beats random layers", "accuracy").met
    # the accuracy gain is significant but excluded from 12 under both readings: does not hold
    small = e2_primary_verdict(_table((3.0, 1.0, 5.0), (8.0, 2.0, 11.0), (3.0, 1.0, 5.0)))
    assert small.outcome == "does not hold"
    assert small.condition("claim excluded under both readings", "accuracy").met
    # reaching 12% relative only (points below) still counts as reaching the claim
    relative = e2_primary_verdict(_table((6.0, 3.0, 9.0), (13.0, 6.0, 20.0), (5.0, 2.5, 8.0)))
    assert relative.condition("reaches the claim (%)", "accuracy").met and relative.outcome == "holds"
    # a large gain that random layers match within the margin: does not hold (no layer specificity)
    unspecific = e2_primary_verdict(_table((14.0, 8.0, 20.0), (40.0, 20.0, 60.0), (0.2, -1.0, 1.5)))
    assert unspecific.outcome == "does not hold"
    assert unspecific.condition("no better than random layers", "accuracy").met
    # the claim excluded by an interval the run was too small to trust (MDE above the claim's 4.8 points): inconclusive
    underpowered = e2_primary_verdict(_table((3.0, 1.0, 5.0), (8.0, 2.0, 11.0), (3.0, 1.0, 5.0), mde=20.0))
    assert underpowered.outcome == "inconclusive"
    assert not underpowered.condition("powered to exclude the claim", "accuracy").met
    # no better than random layers, but the run could not see a 2-point margin: not evidence either
    blind = e2_primary_verdict(_table((14.0, 8.0, 20.0), (40.0, 20.0, 60.0), (0.2, -1.0, 1.5), random_mde=6.0))
    assert blind.outcome == "inconclusive"
    # wide intervals that neither reach nor exclude the claim: inconclusive
    wide = e2_primary_verdict(_table((4.0, -6.0, 14.0), (10.0, -15.0, 35.0), (2.0, -8.0, 12.0)))
    assert wide.outcome == "inconclusive"
    # no random arm: cannot hold
    unrun = e2_primary_verdict(_table((14.0, 8.0, 20.0), (40.0, 20.0, 60.0), None, ece_random=None))
    assert unrun.outcome == "inconclusive" and not unrun.condition("random run", "accuracy").met


def test_ece_is_read_as_a_drop_and_either_metric_failing_fails_the_claim() -> None:
    good_acc = ((14.0, 8.0, 20.0), (40.0, 20.0, 60.0), (6.0, 3.0, 9.0))
    # ECE drops by 1 point (3%) at most: the 34 claim is excluded under both readings
    verdict = e2_primary_verdict(_table(*good_acc, ece=(-1.0, -2.0, -0.5), ece_rel=(-3.0, -6.0, -1.0)))
    assert verdict.condition("claim excluded under both readings", "ece").met
    assert verdict.outcome == "does not hold"
    assert verdict.condition("accuracy outcome: holds", "accuracy").met
    # an ECE *rise* is no improvement at all
    rise = e2_primary_verdict(_table(*good_acc, ece=(5.0, 2.0, 8.0), ece_rel=(20.0, 8.0, 30.0)))
    assert not rise.condition("improvement over untouched is significant", "ece").met and rise.outcome == "does not hold"
