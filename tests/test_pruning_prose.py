"""The chapter's data-dependent phrases, on hand-made tables: each alternative and each list, exactly."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from avss_lib.core.benchmarks import Benchmark, Example
from avss_lib.core.verdicts import Verdict
from avss_lib.pruning import display, prose
from avss_lib.pruning.tasks import task_specs


def _retention() -> pd.DataFrame:
    rows = [("unpruned", "sst2", 100, 100, 100, True), ("unpruned", "nq_open", 100, 100, 100, False),
            ("avss:a", "sst2", 95, 91, 99, True), ("avss:a", "nq_open", 3, 0, 9, False),
            ("avss:b", "sst2", 44, 36, 52, True), ("avss:b", "nq_open", 0, 0, 0, False),
            ("last_k", "sst2", 97.4, 93, 100, True), ("last_k", "nq_open", 0, 0, 0, False)]
    return pd.DataFrame(rows, columns=["method", "task_key", "retention", "retention_low", "retention_high",
                                       "informative"])


def test_counted_and_skipped_tasks():
    r = _retention()
    assert prose.counted_tasks(r) == ["sst2"]
    assert prose.skipped_tasks_sentence(r) == ("Tasks where the unpruned model is not above chance (nq_open) are shown "
                                               "but not counted: a percentage of a score near zero is meaningless.")
    every = r[r["task_key"] == "sst2"]
    assert prose.skipped_tasks_sentence(every) == "Every task's unpruned score is above chance, so every task is counted."
    assert prose.word_list(["a", "b"]) == "a, b" and prose.word_list([]) == "none"


def test_retention_phrases_of_the_primary_variant_and_the_best_ranking():
    r = _retention()
    assert prose.holding_variants(r) == ["avss:a"]  # 95 >= 90 on the only counted task; b's 44 is not
    assert prose.retention_list(r, "avss:b") == "sst2 44% [36, 52]"
    assert prose.worst_task(r, "avss:b") == "44% (sst2, sentiment)"
    assert prose.best_worst_case(r) == "last k (97% on its worst counted task)"
    none = r.assign(informative=False)
    assert prose.retention_list(none, "avss:b") == prose.worst_task(none, "avss:b") == prose.NO_TASK
    assert prose.best_worst_case(none) == prose.NO_TASK and prose.holding_variants(none) == []


def _comparison() -> pd.DataFrame:
    rows = [("avss:a", "random", "sst2", "better"), ("avss:b", "random", "sst2", "worse"),
            ("avss:a", "random", "nq_open", "worse"), ("avss:a", "last_k", "sst2", "same set"),
            ("avss:b", "last_k", "sst2", "too few examples")]
    return pd.DataFrame(rows, columns=["avss", "baseline", "task_key", "verdict"])


def test_comparison_sentence_counts_only_counted_tasks_and_names_optional_verdicts():
    r, c = _retention(), _comparison()
    assert prose.comparison_sentence(c, r, "random", "avss:b") == (
        "Against random, over all AVSS variants × counted tasks (2 comparisons), AVSS is better (Holm-adjusted) in 1, "
        "worse in 1, indistinguishable in 0; for AVSS b: sst2: worse.")
    assert prose.comparison_sentence(c, r, "last_k", "avss:c") == (
        "Against last k, over all AVSS variants × counted tasks (2 comparisons), AVSS is better (Holm-adjusted) in 0, "
        "worse in 0, indistinguishable in 0, prunes the same set in 1, has too few examples for a verdict in 1.")
    assert prose.comparison_sentence(c, r.assign(informative=False), "random", "avss:a") == (
        "There is no counted task on which to compare AVSS with random.")


def test_agreement_sentence():
    names = ["avss:a", "last_k", "block_influence"]
    spearman = pd.DataFrame([[1, -0.5, 0.25], [-0.5, 1, 0], [0.25, 0, 1]], index=names, columns=names)
    jaccard = pd.DataFrame([[1, 0.2, 1.0], [0.2, 1, 0], [1.0, 0, 1]], index=names, columns=names)
    assert prose.agreement_sentence(spearman, jaccard, "avss:a") == (
        "AVSS a against the baselines: last k ρ = -0.50, Jaccard = 0.20; block influence ρ = 0.25, Jaccard = 1.00. "
        "It prunes exactly the same layers as block influence.")
    assert prose.agreement_sentence(spearman, jaccard, "avss:z") == "AVSS z is not among the compared rankings."


def test_shared_sets_and_selection_sentences():
    plan = pd.DataFrame({"method": ["avss:a", "avss:b", "last_k", "avss:a", "avss:b"], "ratio": [0.25] * 3 + [0.5] * 2,
                         "set_id": ["L1", "L1", "L2", "L1-2", "L0-3"]})
    assert prose.shared_sets_sentence(plan) == "Identical sets, evaluated once: AVSS a, AVSS b at ratio 0.25."
    assert prose.shared_sets_sentence(plan.iloc[2:]) == "No two rankings chose the same layers at the same ratio."
    assert prose.selection_sentence([]) == ("Every AVSS set at the table's ratio is chapter 02's fixed-fraction "
                                            "selection of that variant.")
    assert prose.selection_sentence(["a", "b"]).startswith("The AVSS sets of variants a, b differ")


def test_task_list_states_split_size_and_settings():
    specs = task_specs({"sciq": 2, "wikiqa": 1, "wikitext2": 64},
                       {"sciq": {"with_support": False}, "wikitext2": {"max_length": 32, "stride": 16}})
    examples = [Example(id="1", question="q"), Example(id="2", question="q")]
    benches = {"sciq": Benchmark("sciq", examples, {"split": "validation"}),
               "wikiqa": Benchmark("wikiqa", examples[:1], {"split": "test"}),
               "wikitext2": Benchmark("wikitext2", examples[:1], {"split": "test"})}
    tasks = {s.key: (s, benches[s.key]) for s in specs}
    assert prose.task_list(specs, tasks) == (
        "sciq validation n=2, closed-book (no support paragraph); wikiqa test n=1, pmi scoring; "
        "wikitext2 test (first ≈64 tokens, window 32, stride 16)")


def test_precision_sentence_for_each_case():
    assert prose.precision_sentence(None, "float32") == "All evaluations ran in float32; no reduced-precision check was needed."
    table = pd.DataFrame([{"task_key": "sst2", "metric": "acc", "value": 0.5, "value_float32": 0.625,
                           "difference": -0.125, "same_per_example": 0.875, "n": 8},
                          {"task_key": "wikitext2", "metric": "perplexity", "value": 20.0, "value_float32": 19.5,
                           "difference": 0.5, "same_per_example": math.nan, "n": 3}])
    assert prose.precision_sentence(table, "bfloat16") == (
        "The pruning evaluations ran in bfloat16 (the `dtype` parameter). To show what that costs, the unpruned model "
        "was also evaluated in float32 on the curve tasks: sst2 acc 0.500 in bfloat16 against 0.625 in float32 "
        "(difference -0.125, the same outcome on 88% of the 8 examples); wikitext2 perplexity 20.00 in bfloat16 "
        "against 19.50 in float32 (difference +0.5). Retention compares pruned and unpruned models evaluated in the "
        "same dtype.")


def test_display_cells():
    base = {"method": "avss:a", "task_key": "sst2", "metric": "acc", "value": 0.4, "low": 0.3, "high": 0.5,
            "sd": np.nan, "min": np.nan, "max": np.nan, "n_seeds": np.nan, "retention": 50.0, "retention_low": 4.25,
            "retention_high": 61.0, "chance_corrected": -20.0, "chance_corrected_low": -50.0,
            "chance_corrected_high": 0.0, "informative": False}
    assert display.retention_cell(pd.Series(base)) == (
        "0.400 [0.300, 0.500] · raw 50% [4.2, 61] · above chance -20% [-50, 0] †")
    pooled = {**base, "method": "random", "metric": "perplexity", "value": 30.0, "min": 20.0, "max": 45.0,
              "n_seeds": 2, "informative": True}
    assert display.retention_cell(pd.Series(pooled)) == "30.00 (seeds 20.00–45.00) · raw 50% [4.2, 61]"
    table = display.comparison_display(_comparison())
    assert list(table.index) == ["last k", "random"] and list(table.columns) == ["nq_open", "sst2"]
    assert table.loc["random", "nq_open"] == "worse: 1" and pd.isna(table.loc["last k", "nq_open"])


def test_chance_corrected_phrases_read_their_own_column():
    r = _retention().assign(chance_corrected=lambda f: f["retention"] - 60, chance_corrected_low=lambda f:
                            f["retention_low"] - 60, chance_corrected_high=lambda f: f["retention_high"] - 60)
    assert prose.retention_list(r, "avss:a", "chance_corrected") == "sst2 35% [31, 39]"
    assert prose.holding_variants(r, "chance_corrected") == [] and prose.holding_variants(r) == ["avss:a"]
    assert prose.worst_task(r, "avss:b", "chance_corrected") == "-16% (sst2, sentiment)"


def test_family_and_exploratory_sentences():
    c = pd.DataFrame({"p_value": [0.01, 0.04, np.nan, 0.2], "p_holm": [0.03, 0.08, np.nan, 0.2]})
    assert prose.family_sentence(c, 0.05) == (
        "The comparison family has 3 tests (every AVSS variant × baseline × task with enough examples and different "
        "layers); 1 are significant at a family-wise error rate of 5% after Holm's adjustment, against 2 unadjusted.")
    assert prose.family_sentence(c.iloc[[2]], 0.05) == "No comparison has enough paired examples for a test."
    primary = Verdict("A1", "avss:a", "does not hold", "rule", summary="AVSS a: 5%")
    other = Verdict("A1", "avss:b", "undefined", "rule", summary="AVSS b: ties", analysis="exploratory")
    assert prose.exploratory_sentence([primary, other]) == (
        "Exploratory, not the claim's verdict: AVSS b: ties — undefined.")
    assert prose.exploratory_sentence([primary]) == "There is no exploratory verdict."


def test_detectable_phrase_both_ways():
    assert prose.detectable_phrase(12.345) == "12.3 points"
    assert prose.detectable_phrase(None) == prose.detectable_phrase(float("nan")) == "not defined (no counted task)"
