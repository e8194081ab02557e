"""The E1 analysis, its summary, the E1 rule as Verdict data, the figures' data, the prose phrases and the stage helpers."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest

from avss_lib.core import artifacts as art
from avss_lib.core.errors import ConfigError, DataError
from avss_lib.core.verdicts import from_records, to_records
from avss_lib.hallucination import analysis as ha
from avss_lib.hallucination import figures, prose
from avss_lib.hallucination.eavss import EavssConfig
from avss_lib.hallucination.stage import lowest_avss_for_rule, overlap_table
from avss_lib.hallucination.verdict import e1_level, e1_verdicts

N_LAYERS, HIDDEN, PLANTED = 6, 8, 3


def synthetic(n: int = 120, seed: int = 0):
    """Per-example statistics where only layer PLANTED has a larger variance on hallucinated examples."""
    rng = np.random.default_rng(seed)
    labels = pd.Series(rng.random(n) < 0.5, index=[f"q{i}" for i in range(n)], dtype=bool)
    rows, features = [], {}
    for layer in range(N_LAYERS):
        feats = rng.normal(size=(n, HIDDEN)).astype(np.float32)
        for i, (ex, h) in enumerate(labels.items()):
            scale = 3.0 if (layer == PLANTED and h) else 1.0
            a = rng.normal(scale=scale, size=(4, HIDDEN))
            rows.append({"example_id": ex, "site": "block_output", "layer": layer, "n": a.size, "sum": a.sum(),
                         "m2": ((a - a.mean()) ** 2).sum(), "sum_abs": np.abs(a).sum(), "n_tokens": 4,
                         "pooled_var": a.mean(axis=0).var(ddof=1), "below_rel_0.01": float((np.abs(a) < 0.01).sum())})
            if layer == PLANTED:
                feats[i, 0] += 2.0 * h
        features[layer] = feats
    return pd.DataFrame(rows), labels, features


def test_planted_layer_is_found_beats_the_null_and_agrees_with_the_probe():
    stats, labels, features = synthetic()
    config = EavssConfig(sparsity="sparsity_rel_0.01", min_class=20)
    a = ha.analyse_dataset("toy", stats, labels, "block_output", 2, config=config, features=features,
                           feature_ids=list(labels.index), n_perm=199, n_splits=5, seeds=(0, 1, 2))
    assert a.usable and a.top_k[0] == PLANTED
    assert a.p_value_max.loc[PLANTED] == pytest.approx(1 / 200)  # no shuffled labelling reaches it
    assert int(a.probes["auroc_mean"].idxmax()) == PLANTED
    assert list(a.seed_rho[["seed_a", "seed_b"]].itertuples(index=False, name=None)) == [(0, 1), (0, 2), (1, 2)]
    assert len(a.split_half) == 5
    table = ha.summary_table({"toy": a})
    assert table.loc["toy", "probe_best_layer"] == PLANTED


def test_length_probe_reads_the_answer_length_alone():
    """A length that gives the label away scores AUROC 1, an unrelated one about 0.5; the summary reports it."""
    stats, labels, features = synthetic()
    config = EavssConfig(sparsity="sparsity_rel_0.01", min_class=20)
    kwargs = dict(config=config, features=features, feature_ids=list(labels.index), n_perm=19, n_splits=2)
    telling = pd.Series(np.where(labels, 9.0, 2.0), index=labels.index)
    a = ha.analyse_dataset("toy", stats, labels, "block_output", 2, answer_lengths=telling, **kwargs)
    assert a.length_auroc == pytest.approx(1.0)
    assert ha.summary_table({"toy": a}).loc["toy", "length_auroc"] == pytest.approx(1.0)
    unrelated = pd.Series(np.random.default_rng(5).integers(1, 10, len(labels)).astype(float), index=labels.index)
    b = ha.analyse_dataset("toy", stats, labels, "block_output", 2, answer_lengths=unrelated, **kwargs)
    assert 0.3 < b.length_auroc < 0.7
    assert "length_auroc" not in ha.summary_table({"toy": ha.analyse_dataset("toy", stats, labels, "block_output",
                                                                             2, **kwargs)}).columns


def _analysis(name: str, usable: bool = True, probes: bool = True) -> ha.DatasetAnalysis:
    """A hand-made analysis over 4 layers, with numbers simple enough to summarise by hand."""
    layers = pd.Index([0, 1, 2, 3], name="layer")
    scores = pd.DataFrame({"hsav": [0.1, -0.5, 0.2, 0.0], "hss": [0.0, 0.5, -0.1, 0.0],
                           "eavss": [0.1, -1.0, 0.3, 0.0], "score": [0.1, 1.0, 0.3, 0.0],
                           "rank": [3.0, 1.0, 2.0, 4.0]}, index=layers)
    a = ha.DatasetAnalysis(name, 40, 60, usable, "", scores, [1, 2])
    if usable:
        a.p_value = pd.Series([0.5, 0.01, 0.04, 0.9], index=layers)
        a.p_value_max = pd.Series([0.8, 0.02, 0.06, 1.0], index=layers)
        a.split_half = pd.DataFrame({"split": [0, 1, 2], "site": "s", "rho": [0.2, 0.8, 0.6]})
        a.seed_rho = pd.DataFrame({"seed_a": [0, 0, 1], "seed_b": [1, 2, 2], "rho": [0.9, 0.6, 0.3]})
        if probes:
            a.probes = pd.DataFrame({"auroc_mean": [0.55, 0.8, 0.7, 0.5]}, index=layers)
    return a


def test_summary_table_by_hand():
    table = ha.summary_table({"d": _analysis("d"), "noprobe": _analysis("noprobe", probes=False),
                              "small": _analysis("small", usable=False)}, alpha=0.05)
    d = table.loc["d"]
    assert d["top_k"] == [1, 2] and d["max_abs_eavss"] == 1.0
    assert d["min_p_max"] == 0.02 and d["n_layers_p_max_below_alpha"] == 1  # only 0.02 < 0.05
    assert d["split_half_rho_median"] == pytest.approx(0.6) and d["seed_rho_mean"] == pytest.approx(0.6)
    assert d["probe_best_layer"] == 1 and d["probe_best_auroc"] == 0.8
    assert d["probe_eavss_rho"] == pytest.approx(1.0)  # scores and AUROC in the same order
    assert d["probe_auroc_top_k"] == pytest.approx(0.75) and d["probe_auroc_rest"] == pytest.approx(0.525)
    assert math.isnan(table.loc["noprobe", "probe_eavss_rho"])
    assert math.isnan(table.loc["small", "min_p_max"]) and not table.loc["small", "usable"]


def test_score_table_and_pooling_by_hand():
    d, small = _analysis("d"), _analysis("small", usable=False)
    scores = ha.score_table({"d": d, "small": small})
    assert list(scores.columns) == list(ha.SCORE_COLUMNS)
    assert scores.loc[scores["dataset"] == "d", "p_value_max"].tolist() == [0.8, 0.02, 0.06, 1.0]
    assert scores.loc[scores["dataset"] == "d", "probe_auroc"].tolist() == [0.55, 0.8, 0.7, 0.5]
    assert scores.loc[scores["dataset"] == "small", "p_value"].isna().all()
    other = _analysis("e")
    other.scores["score"] = [0.2, 0.1, 0.9, 0.0]  # ranks 2, 3, 1, 4
    pooled, ranks, excluded = ha.pooled_top_k({"d": d, "e": other, "small": small}, 2)
    # mean ranks: layer 0 (3+2)/2 = 2.5, layer 1 (1+3)/2 = 2, layer 2 (2+1)/2 = 1.5, layer 3 4
    assert pooled == [2, 1] and excluded == ["small"]
    assert ranks["mean_rank"].to_dict() == {2: 1.5, 1: 2.0, 0: 2.5, 3: 4.0}
    assert ha.pooled_top_k({"small": small}, 2)[0] == []


def test_small_class_is_flagged_not_tested_and_not_pooled():
    stats, labels, features = synthetic(60)
    rare = pd.Series(np.arange(60) < 4, index=labels.index, dtype=bool)
    config = EavssConfig(sparsity="sparsity_rel_0.01", min_class=10)
    small = ha.analyse_dataset("rare", stats, rare, "block_output", 2, config=config, features=features,
                               feature_ids=list(labels.index))
    assert (small.n_hallucinated, small.n_correct, small.usable) == (4, 56, False)
    assert small.p_value_max is None and small.probes is None and small.split_half is None
    verdict, = e1_verdicts(ha.summary_table({"rare": small}), min_class=10)
    assert verdict.outcome == "inconclusive" and e1_level(verdict) == "not testable"
    assert [(c.name, c.met, c.value, c.threshold, c.group) for c in verdict.conditions] == [
        ("usable", False, 4.0, 10.0, "rare")]
    assert verdict.summary == "no data set with both classes large enough"


# ----------------------------------------------------------------------------------------- the E1 rule


def _summary(signal, stable, valid):
    n = len(signal)
    return pd.DataFrame({
        "n_hallucinated": [50] * n, "n_correct": [40] * n, "usable": [True] * n, "top_k": [[1, 2]] * n,
        "min_p_max": [0.001 if s else 0.5 for s in signal],
        "split_half_rho_median": [0.9 if s else 0.1 for s in stable],
        "seed_rho_mean": [0.9] * n, "probe_best_layer": [1] * n, "probe_best_auroc": [0.7] * n,
        "probe_eavss_rho": [0.8 if v else -0.2 for v in valid],
    }, index=[f"d{i}" for i in range(n)])


@pytest.mark.parametrize("signal, stable, valid, outcome, level, n_all, n_signal", [
    ([1, 1, 0], [1, 1, 0], [1, 1, 0], "holds", "supported", 2, 2),
    ([1, 1, 1], [1, 0, 0], [1, 1, 1], "inconclusive", "partly supported", 1, 3),
    ([0, 0, 0], [1, 1, 1], [1, 1, 1], "does not hold", "not supported", 0, 0),
    ([1, 1], [1, 1], [1, 0], "inconclusive", "partly supported", 1, 2),  # 1 of 2 is no majority
])
def test_verdict_rule_decides_from_its_conditions(signal, stable, valid, outcome, level, n_all, n_signal):
    verdict, = e1_verdicts(_summary(signal, stable, valid), min_class=30, site="block_output", position="answer")
    assert verdict.claim == "E1" and verdict.subject == "EAVSS at block_output (answer tokens)"
    assert verdict.outcome == outcome and e1_level(verdict) == level
    assert verdict.numbers == {"n_datasets": len(signal), "n_usable": len(signal), "n_pass_all": n_all,
                               "n_signal": n_signal}
    for i, (s, st, v) in enumerate(zip(signal, stable, valid)):
        group = f"d{i}"
        assert verdict.condition("usable", group).met and verdict.condition("usable", group).value == 40.0
        c = verdict.condition("signal", group)
        assert (c.met, c.value, c.threshold) == (bool(s), 0.001 if s else 0.5, 0.05)
        c = verdict.condition("stable", group)
        assert (c.met, c.value, c.threshold) == (bool(st), 0.9 if st else 0.1, 0.5)
        c = verdict.condition("valid", group)
        assert (c.met, c.value, c.threshold) == (bool(v), 0.8 if v else -0.2, 0.3)


def test_verdict_thresholds_edges_missing_probe_and_summary_line():
    summary = _summary([1, 1], [1, 1], [1, 1])
    summary.loc["d0", ["min_p_max", "split_half_rho_median", "probe_eavss_rho"]] = [0.05, 0.5, 0.3]
    summary.loc["d1", "probe_eavss_rho"] = np.nan  # no probe: not valid
    verdict, = e1_verdicts(summary)
    assert not verdict.condition("signal", "d0").met  # p must be strictly below alpha
    assert verdict.condition("stable", "d0").met and verdict.condition("valid", "d0").met  # >= thresholds
    assert not verdict.condition("valid", "d1").met and verdict.condition("valid", "d1").value is None
    assert verdict.outcome == "inconclusive" and verdict.numbers["n_pass_all"] == 0
    assert verdict.summary == ("0/2 data sets pass all tests (d0: min p_max 0.050, split-half ρ +0.50, probe ρ +0.30; "
                               "d1: min p_max 0.001, split-half ρ +0.90, probe ρ +nan)")


def test_excluded_data_sets_do_not_count_and_verdicts_round_trip(tmp_path):
    summary = _summary([1, 0, 0], [1, 0, 0], [1, 0, 0])
    summary.loc[["d1", "d2"], "usable"] = False
    verdicts = e1_verdicts(summary, min_class=45)
    assert verdicts[0].outcome == "holds" and verdicts[0].numbers["n_usable"] == 1  # 1 of 1 usable passes
    assert [c.group for c in verdicts[0].conditions if c.name == "signal"] == ["d0"]
    art.VERDICT_04.write(to_records(verdicts), tmp_path)
    assert from_records(art.VERDICT_04.read(tmp_path)) == verdicts
    with pytest.raises(DataError, match="lacks columns"):
        e1_verdicts(summary.drop(columns="usable"))


# ----------------------------------------------------------------------------------------- figures' data


def test_figures_show_the_tables_values():
    a, b = _analysis("d"), _analysis("noprobe", probes=False)
    scores = ha.score_table({"d": a, "noprobe": b})
    heat = figures.eavss_heatmap(scores)
    for ax, metric in zip(heat.axes[:3], figures.METRICS):  # then the three colour bars
        assert ax.get_title() == metric.upper()
        expected = scores.pivot(index="dataset", columns="layer", values=metric).loc[["d", "noprobe"]].to_numpy()
        np.testing.assert_allclose(np.asarray(ax.collections[0].get_array()).reshape(expected.shape), expected)
    probe = figures.probe_vs_eavss(scores, alpha=0.05)
    bars = probe.axes[0]
    assert [p.get_height() for p in bars.patches] == [0.1, 1.0, 0.3, 0.0]
    assert bars.collections[0].get_offsets().tolist() == [[1.0, 1.0]]  # only layer 1 has p_max < 0.05
    line = [ax for ax in probe.axes if ax.lines and ax.get_ylabel() == "probe AUROC"][0].lines[0]
    assert line.get_ydata().tolist() == [0.55, 0.8, 0.7, 0.5]
    stability = figures.stability_figure({"d": a, "small": _analysis("small", usable=False)})
    points = sorted(y for c in stability.axes[0].collections for _, y in c.get_offsets().tolist())
    assert points == pytest.approx(sorted([0.2, 0.8, 0.6, 0.9, 0.6, 0.3]))


# ----------------------------------------------------------------------------------------- prose


def _answer_summary():
    return pd.DataFrame({
        "dataset": ["nq_open", "nq_open", "sciq"], "convention": ["exact_match", "alias_containment", "choice"],
        "n": [20, 20, 24], "accuracy": [0.25, 0.5, 0.5], "ci_low": [0.05, 0.3, 0.3], "ci_high": [0.45, 0.7, 0.7],
        "n_hallucinated": [15, 10, 12], "n_correct": [5, 10, 12], "n_empty_answers": [2, 2, 0],
        "usable": [False, True, True]})


def test_prose_phrases_follow_the_numbers():
    s = _answer_summary()
    assert prose.accuracy_list(s, "exact_match") == ("nq_open 25.0% [5.0, 45.0] (15 of 20 answers hallucinated); "
                                                     "sciq 50.0% [30.0, 70.0] (12 of 24 answers hallucinated)")
    assert prose.empty_answers_sentence(s, "exact_match").endswith(": nq_open 2 of 20.")
    assert prose.empty_answers_sentence(s.assign(n_empty_answers=0), "exact_match") == "No answer is empty."
    assert prose.short_datasets_sentence(s, "exact_match", 24) == (
        "Fewer questions than requested (24) exist for: nq_open (20 answerable questions).")
    assert prose.short_datasets_sentence(s, "exact_match", 20) == "Every data set has the 20 questions requested."
    assert prose.class_size_warnings(s, "exact_match", 6).startswith("> **Warning — nq_open is excluded")
    assert prose.class_size_warnings(s, "alias_containment", 6) == (
        "Every data set has at least 6 answers in each class, so every one is tested.")
    summary = _summary([1, 0], [1, 0], [1, 0])
    summary.loc["d1", "usable"] = False
    assert prose.excluded_sentence(summary) == "**Excluded** (a class below the minimum size): d1."
    assert prose.excluded_sentence(summary.assign(usable=True)) == "No data set is excluded."
    verdict, = e1_verdicts(summary)
    assert prose.dataset_lines(verdict, summary) == (
        "- **d0** (50 hallucinated / 40 correct): smallest family-wise p = 0.001 (beats the null at α = 0.05); "
        "split-half ρ median +0.900 (stable, threshold 0.5); seed-subsample ρ mean +0.90; probe-vs-EAVSS Spearman "
        "ρ = +0.800 (best probe layer 1, AUROC 0.70) (agrees, threshold 0.3). Top layers: 1, 2.")
    assert prose.pooled_sentence([1, 2], [2, 3], 1 / 3) == (
        "Pooled top layers: 1, 2; overlap with the lowest-AVSS (pruned) layers: 2 (Jaccard 0.33).")
    assert prose.pooled_sentence([1], [2], 0.0).endswith("layers: none (Jaccard 0.00).")
    assert prose.pooled_sentence([], [2], math.nan) == "No data set is usable, so there is no pooled ranking."


# ----------------------------------------------------------------------------------------- stage helpers


def test_lowest_avss_layers_follow_notebook_02s_selection_size(tmp_path):
    # layer:  0    1    2    3    4   -> pruning ranks 3, 1, 5, 2, 4
    scores = pd.DataFrame({"variant": "v", "layer": range(5), "variance": 1.0, "sparsity": 0.1,
                           "avss": [0.3, 0.1, 0.9, 0.2, 0.5], "avss_norm": np.nan, "undefined": False,
                           "rank": [3, 1, 5, 2, 4]})
    selections = pd.DataFrame({"variant": ["v", "v"], "rule": ["fixed_fraction", "cumulative_sorted"],
                               "n_pruned": [2, 0], "layers": [[1, 3], []], "n_undefined_scores": 0,
                               "tie_broken_arbitrarily": False})
    art.AVSS_SCORES.write(scores, tmp_path)
    art.SELECTIONS.write(selections, tmp_path)
    assert lowest_avss_for_rule(tmp_path, "v", "fixed_fraction") == [1, 3]
    assert lowest_avss_for_rule(tmp_path, "v", "cumulative_sorted") == []
    with pytest.raises(ConfigError, match="variant='w'"):
        lowest_avss_for_rule(tmp_path, "w", "fixed_fraction")


def test_overlap_table_jaccard_by_hand():
    a, b = _analysis("d"), _analysis("small", usable=False)
    b.top_k = []
    table = overlap_table({"d": a, "small": b}, [1, 2, 3], [2, 3], 2, "lowest")
    assert table["set"].tolist() == ["top-2 EAVSS, d", "top-2 EAVSS, small", "top-2 EAVSS, pooled", "lowest"]
    assert table["layers"].tolist() == [[1, 2], [], [1, 2, 3], [2, 3]]
    j = table["jaccard_with_lowest_avss"].tolist()
    assert j[0] == pytest.approx(1 / 3) and math.isnan(j[1]) and j[2] == pytest.approx(2 / 3) and j[3] == 1.0


def test_exploratory_sentences_follow_the_data():
    from avss_lib.core.verdicts import Verdict

    def verdict(outcome: str, passed: float, subject: str = "EAVSS at block_output (answer tokens)") -> Verdict:
        return Verdict(claim="E1", subject=subject, outcome=outcome, rule="r",
                       numbers={"n_pass_all": passed, "n_usable": 3.0}, analysis="exploratory")

    assert "No secondary position" in prose.secondary_sentence(None, 4)
    with_bins = prose.secondary_sentence(verdict("holds", 2.0), 4)
    assert "within 4 answer-length bins" in with_bins and "2 of 3" in with_bins and "*holds*" in with_bins
    assert "bins" not in prose.secondary_sentence(verdict("holds", 2.0), 0)
    primary = verdict("does not hold", 0.0)
    assert "unlike the primary *does not hold*" in prose.convention_sentence(verdict("holds", 2.0), primary)
    assert "the same as the primary" in prose.convention_sentence(verdict("does not hold", 0.0), primary)
    assert "cannot matter" in prose.convention_sentence(None, primary)
    assert "did not run" in prose.causal_sentence(None)
    table = pd.DataFrame([{"set": "untouched", "n": 20, "hallucination_rate": 40.0, "low": 20.0, "high": 60.0,
                           "change": np.nan, "change_low": np.nan, "change_high": np.nan},
                          {"set": "top-k EAVSS", "n": 20, "hallucination_rate": 55.0, "low": 35.0, "high": 75.0,
                           "change": 15.0, "change_low": 5.0, "change_high": 25.0}])
    sentence = prose.causal_sentence(table)
    assert "On 20 evaluation-half questions" in sentence and "top-k EAVSS +15.0 points [+5.0, +25.0]" in sentence


def test_detectable_auroc_by_hand():
    # 50 vs 100: SE_0 = sqrt(151 / 60000) = 0.050166; (1.959964 + 0.841621) * SE_0 = 0.140546
    assert ha.detectable_auroc(50, 100) == pytest.approx(0.5 + 0.140546, abs=1e-5)
    assert ha.detectable_auroc(100, 50) == ha.detectable_auroc(50, 100)
    assert ha.detectable_auroc(500, 500) < ha.detectable_auroc(50, 100) < ha.detectable_auroc(10, 10)
    assert math.isnan(ha.detectable_auroc(0, 10))
    table = ha.summary_table({"toy": _analysis("toy")})
    assert table.loc["toy", "mde_auroc"] == pytest.approx(ha.detectable_auroc(40, 60))


def test_power_sentence_lists_each_data_set_or_says_none_has_power():
    summary = pd.DataFrame({"mde_auroc": [0.64, float("nan")]}, index=pd.Index(["sciq", "nq_open"], name="dataset"))
    sentence = prose.power_sentence(summary)
    assert "sciq 0.64" in sentence and "nq_open" not in sentence
    assert "none has any power" in prose.power_sentence(summary.iloc[1:])
