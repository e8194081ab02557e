"""Retention, comparison and curve tables and the paired bootstrap, against hand-computed values."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from avss_lib.core.benchmarks import Benchmark, load_benchmark
from avss_lib.core.errors import ConfigError, DataError
from avss_lib.core.resampling import paired_resamples
from avss_lib.pruning import retention as tables

FIXTURES = Path(__file__).parent / "fixtures" / "data"
ONES = np.ones((1, 4))


# ------------------------------------------------------------------------------------ the paired bootstrap


def test_paired_bootstrap_on_a_tiny_input_by_hand():
    # default_rng(0) draws these example indices for 5 resamples of 4 examples (the stream of paired_resamples)
    rows = [[3, 2, 2, 1], [1, 0, 0, 0], [0, 3, 2, 3], [2, 2, 3, 2], [2, 2, 2, 3]]
    assert paired_resamples(4, [1, 1], n_resamples=5, seed=0).counts.tolist() == [
        np.bincount(r, minlength=4).tolist() for r in rows]
    a, b = np.array([[1.0, 0, 1, 1]]), np.array([[1.0, 1, 0, 1]])
    # per resample: mean(a[rows]) - mean(b[rows]) = .75-.5, .75-1, .75-.5, 1-.25, 1-.25
    draws = [0.25, -0.25, 0.25, 0.75, 0.75]
    low, high = np.quantile(draws, [0.025, 0.975])  # -0.2, 0.75
    got = tables.paired_bootstrap("sst2", (a, ONES), (b, ONES), "difference", n_resamples=5, seed=0)
    assert got == pytest.approx((0.0, low, high)) and low == pytest.approx(-0.2)


def test_paired_bootstrap_resamples_replicates_after_the_examples():
    # the same example draws as above; then default_rng(0) picks a's two replicates (0,1),(1,0),(0,1),(1,0),(1,1)
    assert paired_resamples(4, [2, 1], n_resamples=5, seed=0).picks[0].tolist() == [[0, 1], [1, 0], [0, 1], [1, 0], [1, 1]]
    a = np.array([[1.0, 0, 1, 1], [0.0, 0, 1, 1]])
    b = np.array([[1.0, 1, 0, 1]])
    # per resample, the replicates' means on its examples, averaged over the picked replicates, minus b's mean:
    # (.75, .75) -> .75 - .5; (.75, 0) -> .375 - 1; (1, .75) -> .875 - .75; (1, 1) -> 1 - .25; (1, 1) -> 1 - .25
    draws = [0.25, -0.625, 0.125, 0.75, 0.75]
    got = tables.paired_bootstrap("sst2", (a, np.ones((2, 4))), (b, ONES), "difference", n_resamples=5, seed=0)
    assert got == pytest.approx((0.625 - 0.75, *np.quantile(draws, [0.025, 0.975])))
    assert got[1] == pytest.approx(-0.55)


def test_paired_bootstrap_identical_and_dominated():
    a = (np.array([[1.0, 0, 1, 1]]), ONES)
    assert tables.paired_bootstrap("sst2", a, a, "difference", n_resamples=200) == (0.0, 0.0, 0.0)
    assert tables.paired_bootstrap("sst2", a, a, "retention", n_resamples=200) == (100.0, 100.0, 100.0)
    better = (np.array([[1.0, 1, 1, 1, 1, 1]]), np.ones((1, 6)))
    worse = (np.array([[0.0, 0, 0, 1, 0, 0]]), np.ones((1, 6)))
    d, low, high = tables.paired_bootstrap("sst2", better, worse, "difference", n_resamples=500)
    assert d == pytest.approx(5 / 6) and 0 < low <= high <= 1  # every resample has at most one 1 in worse
    with pytest.raises(ConfigError, match="statistic"):
        tables.paired_bootstrap("sst2", a, a, "ratio")
    with pytest.raises(DataError, match="differ in size"):
        tables.paired_bootstrap("sst2", a, better, "difference")


def test_perplexity_retention_and_difference_use_log_ppl():
    base = (np.array([[20.0, 20.0]]), np.array([[10.0, 10.0]]))  # mean nll 2
    pruned = (np.array([[30.0, 30.0]]), np.array([[10.0, 10.0]]))  # mean nll 3
    ret = tables.paired_bootstrap("wikitext2", pruned, base, "retention", n_resamples=100)
    assert ret == pytest.approx((100 * math.exp(-1),) * 3)  # ppl e^2 / e^3, the same in every resample
    diff = tables.paired_bootstrap("wikitext2", pruned, base, "difference", n_resamples=100)
    assert diff == pytest.approx((-1.0, -1.0, -1.0))  # worse: log ppl is higher by 1


# ------------------------------------------------------------------------------------ tables


def _synthetic(task: str = "sst2") -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Plan, summary and per-example tables on 200 examples: unpruned 80% correct, AVSS 40%, last-k 80%,
    two random seeds 60% and 70%; block influence prunes the AVSS set."""
    i = np.arange(200)
    base = (i % 10 < 8).astype(float)
    values = {"none": base, "A": base * (i % 2 == 0), "K": base.copy(), "R0": base * (i % 4 != 0),
              "R1": base * (i % 8 != 0)}
    assert [v.mean() for v in values.values()] == pytest.approx([0.8, 0.4, 0.8, 0.6, 0.7])
    methods = [("avss:x", "avss", "A"), ("last_k", "last_k", "K"), ("random:0", "random", "R0"),
               ("random:1", "random", "R1"), ("block_influence", "block_influence", "A")]
    plan = pd.DataFrame([{"method": m, "family": f, "ratio": 0.25, "k": 2, "fraction_removed": 0.25, "layers": [0],
                          "arbitrary": False, "set_id": s} for m, f, s in methods])
    per_example = pd.concat([pd.DataFrame({"set_id": s, "task_key": task, "task": task, "id": i.astype(str),
                                           "num": v, "den": 1.0}) for s, v in values.items()])
    summary = pd.DataFrame([{"set_id": s, "task_key": task, "task": task, "metric": "acc", "value": v.mean(),
                             "low": v.mean() - 0.05, "high": v.mean() + 0.05} for s, v in values.items()])
    return plan, summary, per_example


def test_retention_table_by_hand():
    plan, summary, per_example = _synthetic()
    retention = tables.retention_table(plan, summary, per_example, 0.25, ["sst2"], n_resamples=300,
                                       chance={"sst2": 0.5})
    r = retention.set_index("method")
    assert list(r.index) == ["unpruned", "avss:x", "last_k", "block_influence", "random"]
    assert r.loc["avss:x", "retention"] == pytest.approx(50.0)  # 0.4 / 0.8
    assert (r.loc["avss:x", "value"], r.loc["avss:x", "low"], r.loc["avss:x", "high"]) == pytest.approx((0.4, 0.35, 0.45))
    assert r.loc["avss:x", "retention_low"] < 50 < r.loc["avss:x", "retention_high"]
    assert r.loc["last_k", ["retention", "retention_low", "retention_high"]].tolist() == pytest.approx([100.0] * 3)
    rnd = r.loc["random"]
    assert rnd["n_seeds"] == 2 and rnd["value"] == pytest.approx(0.65) and rnd["retention"] == pytest.approx(81.25)
    assert rnd["sd"] == pytest.approx(math.sqrt(0.005)) and (rnd["min"], rnd["max"]) == pytest.approx((0.6, 0.7))
    assert math.isnan(rnd["low"]) and rnd["set_ids"] == "R0 R1"
    assert r["informative"].all() and (r["chance"] == 0.5).all()  # unpruned low 0.75 > 1/2
    # above chance: (0.4 - 0.5) / (0.8 - 0.5) for AVSS, (0.65 - 0.5) / 0.3 for the random seeds' mean
    assert r["chance_corrected"].tolist() == pytest.approx([100.0, -100 / 3, 100.0, -100 / 3, 50.0])
    assert r.loc["avss:x", "chance_corrected_low"] < -100 / 3 < r.loc["avss:x", "chance_corrected_high"]
    assert r.loc["avss:x", "chance_corrected_high"] < r.loc["avss:x", "retention_low"]
    with pytest.raises(ConfigError, match="no chance level"):
        tables.retention_table(plan, summary, per_example, 0.25, ["sst2"], n_resamples=10, chance={})
    strict = tables.retention_table(plan, summary, per_example, 0.25, ["sst2"], n_resamples=10, chance={"sst2": 0.9})
    assert not strict["informative"].any() and (strict["chance"] == 0.9).all()


def test_comparison_table_by_hand():
    plan, summary, per_example = _synthetic()
    comparison = tables.comparison_table(plan, per_example, summary, 0.25, ["sst2"], n_resamples=300)
    c = comparison.set_index("baseline")
    assert list(c.index) == ["last_k", "random", "block_influence"]
    # 300 resamples, none at or above 0: two-sided add-one p = 2 (0 + 1) / 301; Holm over the two tests
    # multiplies the smaller by 2 and keeps the step-down monotone: both 4/301
    assert c.loc[["last_k", "random"], "p_value"].tolist() == pytest.approx([2 / 301, 2 / 301])
    assert c.loc[["last_k", "random"], "p_holm"].tolist() == pytest.approx([4 / 301, 4 / 301])
    assert math.isnan(c.loc["block_influence", "p_holm"])
    assert c.loc["last_k", "difference"] == pytest.approx(-0.4) and c.loc["last_k", "verdict"] == "worse"
    assert c.loc["random", "difference"] == pytest.approx(0.4 - 0.65) and c.loc["random", "verdict"] == "worse"
    assert c.loc["last_k", "high"] < 0
    assert c.loc["block_influence", ["difference", "low", "high", "verdict"]].tolist() == [0.0, 0.0, 0.0, "same set"]


def test_comparison_gives_no_verdict_on_a_handful_of_examples():
    plan, summary, per_example = _synthetic()
    few = per_example[per_example["id"].astype(int) < 5]
    comparison = tables.comparison_table(plan, few, summary, 0.25, ["sst2"], n_resamples=100)
    assert comparison["verdict"].tolist() == ["too few examples", "too few examples", "same set"]
    unpaired = per_example[~((per_example["set_id"] == "R1") & (per_example["id"] == "3"))]
    with pytest.raises(DataError, match="not paired"):
        tables.comparison_table(plan, unpaired, summary, 0.25, ["sst2"], n_resamples=10)


def test_curve_table_pools_random_seeds_and_rejects_unknown_methods():
    plan, summary, _ = _synthetic()
    curve = tables.curve_table(plan, summary, ["avss:x", "random"], ["sst2"])
    assert curve[["method", "fraction_removed"]].values.tolist() == [["avss:x", 0.0], ["avss:x", 0.25],
                                                                     ["random", 0.0], ["random", 0.25]]
    assert curve["value"].tolist() == pytest.approx([0.8, 0.4, 0.8, 0.65])
    rnd = curve.iloc[3]
    assert rnd["sd"] == pytest.approx(math.sqrt(0.005)) and (rnd["min"], rnd["max"]) == pytest.approx((0.6, 0.7))
    assert curve.iloc[1][["low", "high"]].tolist() == pytest.approx([0.35, 0.45])
    with pytest.raises(ConfigError, match="not in the plan"):
        tables.curve_table(plan, summary, ["sleb"], ["sst2"])
    with pytest.raises(DataError, match="no results"):
        tables.curve_table(plan, summary, ["avss:x"], ["wikitext2"])


def test_random_perplexity_is_pooled_geometrically():
    pooled = tables._pool(pd.Series([10.0, 1000.0]), "perplexity")
    assert pooled["value"] == pytest.approx(100.0) and (pooled["min"], pooled["max"]) == (10.0, 1000.0)
    assert tables._pool(pd.Series([0.2, 0.4]), "acc")["value"] == pytest.approx(0.3)


def test_agreement_of_scores_and_sets():
    plan = pd.DataFrame({"method": ["a", "b", "c"], "ratio": 0.5, "layers": [[0, 1], [1, 2], []]})
    scores = {"a": pd.Series([1.0, 2, 3]), "b": pd.Series([3.0, 2, 1]), "c": pd.Series([1.0, 3, 2]),
              "other": pd.Series([1.0, 2, 3])}
    spearman, jaccard = tables.agreement(scores, plan, 0.5)
    assert list(spearman.index) == ["a", "b", "c"]  # only methods in the plan
    assert spearman.loc["a", "b"] == pytest.approx(-1.0) and spearman.loc["a", "c"] == pytest.approx(0.5)
    assert jaccard.loc["a", "b"] == pytest.approx(1 / 3) and jaccard.loc["a", "c"] == 0.0
    assert jaccard.loc["c", "c"] == 1.0  # two empty sets


# ------------------------------------------------------------------------------------ chance


def test_chance_levels_from_the_examples():
    mc = load_benchmark("truthfulqa_mc", data_root=FIXTURES)
    expected = np.mean([np.mean(e.mc2_labels) for e in mc.examples])
    assert tables.chance_level("truthfulqa_mc", mc) == pytest.approx(expected) and 0 < expected < 1
    wikiqa = load_benchmark("wikiqa", data_root=FIXTURES, split="validation")
    # the fixture: 2 of 3 sentences correct, 1 of 1, and a question without a correct one (dropped). For m of n
    # relevant in a random order E[AP] = (H_n + (m-1)/(n-1) (n - H_n)) / n: 29/36 and 1, mean 65/72
    shapes = [(len(e.choices), len(e.correct_choices)) for e in wikiqa.examples]
    assert shapes == [(3, 2), (1, 1), (2, 0)]
    assert tables.chance_level("wikiqa", wikiqa, n_permutations=4000) == pytest.approx(65 / 72, abs=0.01)
    assert tables.chance_level("sciq", wikiqa) == pytest.approx((1 / 3 + 1 + 1 / 2) / 3)  # 1/n per question
    assert tables.chance_level("sciq", load_benchmark("sciq", data_root=FIXTURES)) == 0.25
    assert tables.chance_level("wikitext2", wikiqa) is None
    sst2 = load_benchmark("sst2", data_root=FIXTURES)
    assert [e.label for e in sst2.examples] == [1, 0, 1, 0] and tables.chance_level("sst2", sst2) == 0.5
    skewed = Benchmark("sst2", sst2.examples[:3], sst2.provenance)
    assert tables.chance_level("sst2", skewed) == pytest.approx(2 / 3)  # the majority class, not 1/2
    # always answering "I have no comment." matches that true reference exactly on every question
    assert tables.chance_level("truthfulqa_gen", load_benchmark("truthfulqa_gen", data_root=FIXTURES)) == 1.0
    # no gold answer is shared by two NQ questions: the best constant answer is right once in four
    assert tables.chance_level("nq_open", load_benchmark("nq_open", data_root=FIXTURES)) == 0.25
    shared = load_benchmark("nq_open", data_root=FIXTURES).examples
    twice = Benchmark("nq_open", [shared[0], replace(shared[1], answers=("Anna  berg",))], {})
    assert tables.chance_level("nq_open", twice) == 1.0  # "anna berg" after normalisation answers both
    with pytest.raises(ConfigError, match="no chance level"):
        tables.chance_level("mmlu", wikiqa)


def test_informative_compares_the_unpruned_low_end_with_chance():
    assert not tables.informative("sst2", 0.5, 0.5) and tables.informative("sst2", 0.55, 0.5)
    assert not tables.informative("nq_open", 0.0, 0.0) and tables.informative("wikitext2", -1e9, None)
    assert not tables.informative("sst2", 0.9, None)  # no chance level: nothing to be above
    assert not tables.informative("truthfulqa_mc", 0.3, chance=0.35) and tables.informative("truthfulqa_mc", 0.3, 0.2)


def test_the_held_out_best_variant_is_chosen_and_scored_on_disjoint_examples():
    plan, summary, per_example = _synthetic()
    i = np.arange(200)
    good = (i % 10 < 8).astype(float)  # as good as the unpruned model everywhere
    plan = pd.concat([plan, plan.iloc[[0]].assign(method="avss:y", set_id="Y")], ignore_index=True)
    per_example = pd.concat([per_example, pd.DataFrame({"set_id": "Y", "task_key": "sst2", "task": "sst2",
                                                        "id": i.astype(str), "num": good, "den": 1.0})])
    summary = pd.concat([summary, summary[summary["set_id"] == "A"].assign(set_id="Y")], ignore_index=True)
    best, scored = tables.held_out_best(plan, summary, per_example, 0.25, ["sst2"], chance={"sst2": 0.5},
                                        column="chance_corrected", n_resamples=50, seed=3)
    assert best == "avss:y"
    assert scored["method"].tolist() == ["unpruned", "avss:y"]
    assert scored.set_index("method").loc["avss:y", "chance_corrected"] == pytest.approx(100.0)
    # the scoring half is the complement of the choosing half: recompute the split and check one example
    ids = per_example.loc[per_example["set_id"] == "none", "id"].unique()
    choosing = set(np.random.default_rng(3).permutation(ids)[:100])
    assert len(choosing) == 100
    flipped = per_example.copy()
    flipped.loc[(flipped["set_id"] == "Y") & ~flipped["id"].isin(choosing), "num"] = 0.0  # Y fails where scored
    best, scored = tables.held_out_best(plan, summary, flipped, 0.25, ["sst2"], chance={"sst2": 0.5},
                                        column="chance_corrected", n_resamples=50, seed=3)
    assert best == "avss:y"  # still chosen: the choosing half did not see the failure
    assert scored.set_index("method").loc["avss:y", "chance_corrected"] < -100  # and scored where it fails


def test_held_out_best_needs_two_examples_to_split_a_task():
    plan, summary, per_example = _synthetic()
    one = per_example[per_example["id"] == "0"]
    with pytest.raises(DataError, match="two examples"):
        tables.held_out_best(plan, summary, one, 0.25, ["sst2"], chance={"sst2": 0.5}, column="retention",
                             n_resamples=10)


def test_score_forest_draws_intervals_that_exclude_their_estimate() -> None:
    """A percentile interval can lie beside its estimate, and a Wilson bound at 0 a rounding error above it: the
    figure draws the bounds as given instead of failing on a negative error bar."""
    import matplotlib

    matplotlib.use("Agg")
    from avss_lib.pruning import figures

    nan = float("nan")
    rows = [{"task_key": "sciq", "method": "unpruned", "metric": "acc", "value": 0.0, "low": 3.5e-18, "high": 0.04,
             "n_seeds": nan, "min": nan, "max": nan},
            {"task_key": "sciq", "method": "avss:block_rel", "metric": "acc", "value": 0.30, "low": 0.31, "high": 0.4,
             "n_seeds": nan, "min": nan, "max": nan},
            {"task_key": "sciq", "method": "random", "metric": "acc", "value": 0.2, "low": nan, "high": nan,
             "n_seeds": 2.0, "min": 0.1, "max": 0.3}]
    fig = figures.score_forest(pd.DataFrame(rows))
    segments = [c for c in fig.axes[0].collections if c.get_segments()]
    assert sorted(tuple(np.round(seg[0][:, 0], 3)) for c in segments for seg in [c.get_segments()]) == \
        [(0.1, 0.3), (0.31, 0.4)]
