"""The mitigation stage's artifacts in the smoke run (see conftest.smoke_run), checked against each other and
against the upstream artifacts they derive from."""

from __future__ import annotations

import numpy as np
import pytest

from avss_lib.core.artifacts import (ARM_METRICS, ARMS, AVSS_SCORES, COMPARISONS, E2_PRIMARY, EAVSS_LAYERS,
                                     MITIGATION_PER_EXAMPLE, PROVENANCE_05, QUESTION_SPLIT, RUN_CHECKPOINT,
                                     RUN_RESULT, RUNS, TRAIN_EXAMPLES, done_record, mitigation_run_dir)
from avss_lib.core.io import read_json
from avss_lib.core.verdicts import from_records, to_records
from avss_lib.core.splits import EVALUATION, SELECTION, normalize_question
from avss_lib.mitigation.verdict import READINGS, e2_primary_verdict, e2_reading, e2_verdicts
from avss_lib.ranking.avss import lowest_avss_layers
from conftest import needs_data, stage_verdicts

STAGE = "05_mitigation"


def check_mitigation_artifacts(run_dir) -> None:
    """Every check of the smoke run's stage 05 (a function, so it can also be run on another run folder)."""
    params = read_json(done_record(run_dir, STAGE))["parameters"]
    k, n_eval = params["k"], params["n_eval"]
    split = QUESTION_SPLIT.read(run_dir)  # chapter 04's, made before any layer was chosen
    assert set(params["datasets"]) <= set(split["dataset"])
    for _, part in split.groupby("dataset"):
        sides = part.assign(q=part["question"].map(normalize_question)).groupby("q")["split"].nunique()
        assert (sides == 1).all()  # no question on both sides

    arms = ARMS.read(run_dir).set_index("run_id")
    assert list(dict.fromkeys(arms["arm"])) == params["arms"]
    eavss = EAVSS_LAYERS.read(run_dir)
    assert arms.loc["eavss-s42", "layers"] == [int(i) for i in eavss[params["eavss_source"]][:k]]
    assert arms.loc["lm_only-s42", "layers"] == arms.loc["eavss-s42", "layers"]
    assert arms.loc["lowest_avss-s42", "layers"] == lowest_avss_layers(AVSS_SCORES.read(run_dir),
                                                                       params["avss_variant"], k)
    n_layers = int(arms["model_layers"].iloc[0])
    assert arms.loc["all-s42", "layers"] == list(range(n_layers)) and arms.loc["base", "layers"] == []
    random = arms[arms["arm"] == "random"]
    assert len(random) == params["random_draws"] and len({tuple(v) for v in random["layers"]}) == len(random)
    k_arms = arms[arms["arm"].isin(["eavss", "random", "lowest_avss", "lm_only"])]
    assert (k_arms["n_layers_trained"] == k).all() and k_arms["trainable_params"].nunique() == 1
    assert arms.loc["all-s42", "trainable_params"] == n_layers * k_arms["trainable_params"].iloc[0] // k

    train = TRAIN_EXAMPLES.read(run_dir)
    train_side = split[(split["split"] == SELECTION) & split["dataset"].isin(params["datasets"])]
    assert set(zip(train["dataset"], train["id"])) == set(zip(train_side["dataset"], train_side["id"]))
    assert (train["usable"] == train["negatives"].map(len).gt(0)).all()
    assert train["negatives"].map(len).max() <= params["max_negatives"]

    per_example = MITIGATION_PER_EXAMPLE.read(run_dir)
    eval_side = set(zip(split[split["split"] == EVALUATION]["dataset"], split[split["split"] == EVALUATION]["id"]))
    assert set(zip(per_example["dataset"], per_example["id"])) <= eval_side
    counts = per_example.groupby(["run_id", "dataset"]).size()
    assert (counts == n_eval).all() and set(per_example["run_id"]) == set(arms.index)

    runs = RUNS.read(run_dir).set_index("run_id")
    assert runs["layers"].to_dict() == arms["layers"].to_dict()
    assert (runs["perplexity"] > 1).all() and (runs["perplexity_low"] <= runs["perplexity"]).all()
    for run_id in runs.index:
        folder = mitigation_run_dir(run_dir, run_id)
        assert (folder / RUN_RESULT).is_file() and not (folder / RUN_CHECKPOINT).exists()

    table = ARM_METRICS.read(run_dir)
    wide = table.pivot_table(index=["arm", "dataset"], columns="metric", values="value")
    assert (wide["accuracy"] + wide["hallucination_rate"]).to_numpy() == pytest.approx(np.full(len(wide), 100.0))
    mean_correct = per_example.groupby(["arm", "dataset"])["correct"].mean() * 100
    assert wide["accuracy"].sort_index().to_numpy() == pytest.approx(mean_correct.sort_index().to_numpy())
    assert table[table["arm"] == "base"]["diff"].isna().all()
    base = wide.xs("base", level="arm")["accuracy"]
    eavss_rows = table[(table["arm"] == "eavss") & (table["metric"] == "accuracy")].set_index("dataset")
    assert eavss_rows["diff"].to_numpy() == pytest.approx((eavss_rows["value"] - base.reindex(eavss_rows.index)).to_numpy())

    comp = COMPARISONS.read(run_dir)
    assert len(comp) == len(params["datasets"]) * 2 * 2  # (data set, metric) x (random, lm_only)
    assert np.allclose(comp["level"], 1 - 0.05 / (len(params["datasets"]) * 2))
    assert (comp["low"] <= comp["diff"] + 1e-9).all() and (comp["diff"] <= comp["high"] + 1e-9).all()

    primary, verdict = stage_verdicts(run_dir, STAGE, "E2")
    assert (primary.analysis, verdict.analysis) == ("primary", "exploratory")
    table_primary = E2_PRIMARY.read(run_dir)
    recomputed = e2_primary_verdict(table_primary, margin=params["random_margin"])  # from the artifact
    assert primary == from_records(to_records([recomputed]))[0]
    assert set(zip(table_primary["metric"], table_primary["other"])) == {(m, o) for m in ("accuracy", "ece")
                                                                         for o in ("base", "random")}
    assert np.allclose(table_primary["level"], 1 - 0.05 / 2)
    assert (table_primary["n"] == n_eval * len(params["datasets"])).all()
    assert verdict.outcome == READINGS[e2_reading(verdict.conditions)]
    assert verdict.conditions == e2_verdicts(comp, table)[0].conditions  # recomputed from the artifacts
    for r in comp.itertuples():
        better = verdict.condition(f"better than {r.other}", f"{r.dataset}/{r.metric}")
        assert (better.met, better.value, better.low, better.high) == (r.beats, r.diff, r.low, r.high)

    provenance = PROVENANCE_05.read(run_dir)
    assert provenance["layers"] == {arm: [list(v) for v in g["layers"]] for arm, g in arms.groupby("arm", sort=False)}
    assert all(provenance["data"][d]["sha256"] and provenance["data"][d]["held_out"] == n_eval
               for d in params["datasets"])
    assert provenance["n_train_examples"] + provenance["n_validation_examples"] == int(train["usable"].sum())
    assert provenance["n_validation_examples"] == max(1, round(params["validation_fraction"] * int(train["usable"].sum())))
    assert params["eval_dtype"] == "bfloat16"  # the smoke profile evaluates in bfloat16


@pytest.mark.slow
@needs_data
def test_mitigation_artifacts(smoke_run):
    check_mitigation_artifacts(smoke_run)
