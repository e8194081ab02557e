"""Ranking stability: disjoint calibration folds, and each method recomputed on them, against a by-hand rerun."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from avss_lib.core.activation_stats import StatsSpec, collect_activation_stats
from avss_lib.core.calibration_text import (
    calibration_folds,
    calibration_record,
    load_calibration_texts,
    make_batches,
    recorded_texts,
)
from avss_lib.core.errors import ConfigError
from avss_lib.pruning.prose import stability_sentence
from avss_lib.pruning.stability import ranking_stability, stability_summary
from avss_lib.ranking.agreement import spearman_matrix
from avss_lib.ranking.avss import all_variant_scores, variant_by_name
from avss_lib.testing.tiny_models import tiny_model, tiny_tokenizer

PARAGRAPHS = [f"Paragraph {i} tells of town {i} and its {i % 4} rivers ." for i in range(9)]
SPEC = StatsSpec(("block_output",), (1e-5,), (0.01,))


@pytest.fixture()
def record(tmp_path: Path) -> tuple[dict, str]:
    (tmp_path / "wikitext2").mkdir()
    (tmp_path / "wikitext2" / "valid.txt").write_text("".join(f" {p} \n" for p in PARAGRAPHS))
    texts, provenance = load_calibration_texts("wikitext2", "validation", 9, 0, str(tmp_path))
    batches = make_batches(tiny_tokenizer(), texts, max_length=64, batch_size=2, padding="longest")
    statistics = {"sites": list(SPEC.sites), "abs_thresholds": list(SPEC.abs_thresholds),
                  "rel_taus": list(SPEC.rel_taus)}
    return calibration_record(provenance, batches, max_length=64, batch_size=2, padding="longest",
                              statistics=statistics), str(tmp_path)


def test_folds_are_disjoint_and_cover_the_calibration_samples(record):
    calibration, root = record
    tok = tiny_tokenizer()
    folds = calibration_folds(calibration, tok, data_root=root, n_folds=3)
    decoded = [[tok.decode(row[row.ne(tok.pad_token_id)]) for b in fold for row in b["input_ids"]] for fold in folds]
    texts = recorded_texts(calibration, root)
    assert [len(f) for f in decoded] == [3, 3, 3]
    assert [d.replace(" ", "") for f in decoded for d in f] == [
        t.replace(" ", "") for f in range(3) for t in texts[f::3]]  # sample i in fold i mod 3
    assert len({t for f in decoded for t in f}) == 9  # no sample in two folds
    with pytest.raises(ConfigError, match="n_folds=1"):
        calibration_folds(calibration, tok, data_root=root, n_folds=1)
    with pytest.raises(ConfigError, match="n_folds=10"):
        calibration_folds(calibration, tok, data_root=root, n_folds=10)


def test_each_ranking_is_recomputed_per_fold_and_compared_pair_by_pair(record):
    calibration, root = record
    model, tok = tiny_model("qwen2", 4, seed=5), tiny_tokenizer()
    stability = ranking_stability(model, tok, calibration, ["block_rel"], data_root=root, n_folds=3,
                                  oracle_samples=2, ratio=0.5, rounding="round")
    methods = ["avss:block_rel", "block_influence", "angular_distance", "delta_ppl", "gromov_block"]
    assert stability["method"].unique().tolist() == methods
    assert stability[["fold_a", "fold_b"]].drop_duplicates().values.tolist() == [[0, 1], [0, 2], [1, 2]]
    assert stability.loc[stability["method"] == "gromov_block", "spearman"].isna().all()
    # by hand: AVSS block_rel on folds 0 and 2, from statistics collected on each fold alone
    folds = calibration_folds(calibration, tok, data_root=root, n_folds=3)
    scores = [all_variant_scores(collect_activation_stats(model, folds[f], SPEC, progress=False),
                                 (variant_by_name("block_rel"),)).set_index("layer")["avss"] for f in (0, 2)]
    rho = spearman_matrix({"a": scores[0], "b": scores[1]}).loc["a", "b"]
    row = stability[(stability["method"] == "avss:block_rel") & (stability["fold_a"] == 0) & (stability["fold_b"] == 2)]
    assert row["spearman"].iloc[0] == pytest.approx(rho, nan_ok=True)
    summary = stability_summary(stability).set_index("method")
    assert summary.loc["avss:block_rel", "spearman_min"] == stability.loc[
        stability["method"] == "avss:block_rel", "spearman"].min()
    assert (summary["jaccard_min"] <= summary["jaccard_mean"]).all()


def test_stability_sentence_both_ways():
    table = pd.DataFrame({"method": ["avss:a", "avss:a", "block_influence", "block_influence", "gromov_block"],
                          "fold_a": [0, 0, 0, 0, 0], "fold_b": [1, 2, 1, 2, 1],
                          "spearman": [0.9, 0.5, 0.99, 0.95, math.nan], "jaccard": [1.0, 0.6, 1.0, 1.0, 0.5]})
    assert stability_sentence(table, "avss:a") == (
        "Recomputed on 3 disjoint calibration folds, AVSS a keeps Spearman ρ ≥ 0.50 between any two folds and removes "
        "sets that overlap by Jaccard ≥ 0.60; the least stable ranking is AVSS a (ρ ≥ 0.50), the most stable block "
        "influence (ρ ≥ 0.95).")
    assert stability_sentence(table.iloc[2:], "avss:a") == (
        "Recomputed on 3 disjoint calibration folds; the least stable ranking is block influence (ρ ≥ 0.95), the most "
        "stable block influence (ρ ≥ 0.95).")
    assert stability_sentence(table.iloc[:0], "avss:a") == "Ranking stability was not measured (stability_folds = 0)."
