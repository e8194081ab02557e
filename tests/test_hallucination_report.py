"""The E1 analysis on synthetic per-example statistics with a planted hallucination layer, and the verdict rules."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest

from avss_lib.hallucination import eavss as hal
from avss_lib.hallucination import analysis as hr
from avss_lib.core.errors import ConfigError

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
    config = hal.EavssConfig(sparsity="sparsity_rel_0.01", min_class=20)
    a = hr.analyse_dataset("toy", stats, labels, "block_output", 2, config=config, features=features,
                           feature_ids=list(labels.index), n_perm=199, n_splits=5, seeds=(0, 1, 2))
    assert a.usable and a.top_k[0] == PLANTED
    assert a.p_value_max.loc[PLANTED] < 0.01
    assert (a.p_value_max.drop(PLANTED) > 0.05).mean() > 0.5
    assert int(a.probes["auroc_mean"].idxmax()) == PLANTED
    assert len(a.seed_rho) == 3 and a.seed_rho["rho"].between(-1, 1).all()
    table = hr.summary_table({"toy": a})
    assert table.loc["toy", "probe_best_layer"] == PLANTED
    assert table.loc["toy", "probe_auroc_top_k"] > table.loc["toy", "probe_auroc_rest"]
    scores = hr.score_table({"toy": a})
    assert set(scores.columns) >= {"hsav", "hss", "eavss", "score", "p_value_max", "probe_auroc"}
    for figure in (hr.eavss_heatmap(scores), hr.probe_vs_eavss(scores), hr.stability_figure({"toy": a})):
        assert figure.axes


def test_small_class_is_flagged_not_tested_and_not_pooled():
    stats, labels, features = synthetic(60)
    rare = pd.Series(np.arange(60) < 4, index=labels.index, dtype=bool)
    config = hal.EavssConfig(sparsity="sparsity_rel_0.01", min_class=10)
    small = hr.analyse_dataset("rare", stats, rare, "block_output", 2, config=config, features=features,
                               feature_ids=list(labels.index))
    assert not small.usable and small.p_value_max is None and small.probes is None
    ok = hr.analyse_dataset("ok", stats, labels, "block_output", 2, config=config, n_perm=50, n_splits=3)
    pooled, ranks, excluded = hr.pooled_top_k({"rare": small, "ok": ok}, 2)
    assert excluded == ["rare"] and pooled == ok.top_k and list(ranks.columns[:1]) == ["ok"]
    assert hr.pooled_top_k({"rare": small}, 2)[0] == []
    text = hr.e1_verdict(hr.summary_table({"rare": small}))
    assert "not testable" in text and "rare" in text


def _summary(signal, stable, valid):
    n = len(signal)
    return pd.DataFrame({
        "n_hallucinated": [50] * n, "n_correct": [50] * n, "usable": [True] * n, "top_k": ["1, 2"] * n,
        "min_p_max": [0.001 if s else 0.5 for s in signal],
        "split_half_rho_median": [0.9 if s else 0.1 for s in stable],
        "seed_rho_mean": [0.9] * n, "probe_best_layer": [1] * n, "probe_best_auroc": [0.7] * n,
        "probe_eavss_rho": [0.8 if v else -0.2 for v in valid],
    }, index=[f"d{i}" for i in range(n)])


@pytest.mark.parametrize("signal, stable, valid, verdict", [
    ([1, 1, 0], [1, 1, 0], [1, 1, 0], "supported"),
    ([1, 1, 1], [1, 0, 0], [1, 1, 1], "partly supported"),
    ([0, 0, 0], [1, 1, 1], [1, 1, 1], "not supported"),
])
def test_verdict_rules(signal, stable, valid, verdict):
    text = hr.e1_verdict(_summary(signal, stable, valid), pooled=[1, 2], lowest_avss=[2, 3])
    assert f"Verdict on E1: {verdict}." in text
    assert "Jaccard 0.33" in text


def test_lowest_avss_layers_and_jaccard():
    selections = pd.DataFrame({"variant": ["v", "v"], "rule": ["fixed_fraction", "authors_code"],
                               "layers": ["0 3 7", ""]})
    assert hr.lowest_avss_layers(selections, "v") == [0, 3, 7]
    assert hr.lowest_avss_layers(selections, "v", "authors_code") == []
    with pytest.raises(ConfigError, match="variant"):
        hr.lowest_avss_layers(selections, "w")
    assert hr.jaccard([1, 2], [2, 3]) == pytest.approx(1 / 3) and hr.jaccard([], []) == 0.0


def test_claim_row_maps_the_verdict_for_the_claims_chapter(tmp_path):
    from avss_lib.book import claims

    for flags, expected in (([1, 1, 0], "holds"), ([0, 0, 0], "does not hold")):
        row = hr.e1_claim_row(_summary(flags, flags, flags), site="block_output")
        assert row["claim"] == "E1" and row["verdict"] == expected
        claims.write_verdicts([row], tmp_path / "verdict.json")
    empty = hr.e1_claim_row(_summary([1], [1], [1]).assign(usable=False))
    assert empty["verdict"] == "inconclusive"
