"""The activation and ranking stages' artifacts in the smoke run (see conftest.smoke_run)."""

from __future__ import annotations

from conftest import needs_data

import pytest

from avss_lib.core import artifacts
from avss_lib.ranking.avss import lowest_avss_layers


@pytest.mark.slow
@needs_data
def test_activation_artifacts(smoke_run):
    stats = artifacts.ACTIVATION_STATS.read(smoke_run)
    assert len(stats) == 30 * 3 and set(stats["site"]) == {"block_output", "mlp_activation", "attn_output"}
    assert stats.groupby("site")["layer"].apply(sorted).map(lambda v: v == list(range(30))).all()
    for column in ("pooled_var_padded", "elem_var", "sparsity_abs_1e-05_padded", "sparsity_rel_0.01"):
        assert stats[column].notna().all(), column
    block = stats[stats["site"] == "block_output"]
    assert block["cos_mean"].between(-1, 1).all() and (block["hidden"] == 576).all()
    calibration = artifacts.CALIBRATION.read(smoke_run)
    # the smoke profile: 8 wikitext2/validation paragraphs padded to 48 tokens in batches of 4
    assert (calibration["benchmark"], calibration["split"], calibration["n_samples"]) == ("wikitext2", "validation", 8)
    assert (calibration["max_length"], calibration["padding"], calibration["n_batches"]) == (48, "max_length", 2)
    assert calibration["n_tokens"] == int(block["n_tokens"].iloc[0])  # every layer saw every valid token
    assert list(calibration["sha256"]) == ["wikitext2/valid.txt"] and calibration["source"] == "local"
    provenance = artifacts.PROVENANCE_01.read(smoke_run)
    assert provenance["n_layers"] == 30 and provenance["norm_placement"] == "pre"
    assert provenance["model"]["spec"] == "smollm2-135m-instruct" and len(provenance["model"]["sha256"]) == 64


@pytest.mark.slow
@needs_data
def test_ranking_artifacts(smoke_run):
    scores = artifacts.AVSS_SCORES.read(smoke_run)
    assert scores["variant"].iloc[0] == "authors_code" and scores.groupby("variant").size().eq(30).all()
    selections = artifacts.SELECTIONS.read(smoke_run)
    fixed = selections[selections["rule"] == "fixed_fraction"].set_index("variant")
    assert (fixed["n_pruned"] == 8).all()  # round(0.25 * 30) = 8 (7.5 rounds half up)
    for variant, row in fixed.iterrows():  # the layer lists decode, and are the 8 lowest-ranked layers
        assert row["layers"] == lowest_avss_layers(scores, variant, 8)
