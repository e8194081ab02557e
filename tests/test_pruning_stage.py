"""Stage 03's artifacts in the smoke run (see conftest.smoke_run), checked against each other, and the stage's
upstream checks."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from avss_lib.core import artifacts as art
from avss_lib.core.errors import ConfigError
from avss_lib.core.layer_removal import layers_for_ratio
from avss_lib.pruning.plan import BASE_SET, set_id
from avss_lib.pruning.retention import MIN_EXAMPLES_FOR_VERDICT
from avss_lib.pruning.stage import check_upstream
from avss_lib.pruning.tasks import PRIMARY_METRIC
from avss_lib.pruning.verdict import DECIDED, RETAINED, RETENTION_THRESHOLD, a1_outcome
from avss_lib.testing.tiny_models import tiny_model
from conftest import needs_data, stage_verdicts

SMOKE_TASKS = {"nq_open", "triviaqa", "sciq", "truthfulqa_mc", "truthfulqa_gen", "wikiqa", "sst2", "wikitext2"}
PRIMARY = "avss:block_rel"  # the smoke profile's pre-registered primary_variant


def check_pruning_artifacts(run_dir: Path) -> None:
    """Every artifact of stage 03 of a smoke-profile run, against the others and the smoke parameters."""
    plan = art.PRUNED_SETS.read(run_dir)
    results = art.RESULTS.read(run_dir)
    per_example = art.PER_EXAMPLE.read(run_dir)
    retention = art.RETENTION.read(run_dir)
    provenance = art.PROVENANCE_03.read(run_dir)
    n_layers = art.PROVENANCE_01.read(run_dir)["n_layers"]

    # the plan: k = round(0.25 * 30) = 8 layers (and 15 at the curve's 0.5), named by their layers
    assert provenance["n_layers"] == n_layers and provenance["k"] == layers_for_ratio(n_layers, 0.25) == 8
    for row in plan.itertuples():
        assert len(row.layers) == row.k == layers_for_ratio(n_layers, row.ratio) and row.set_id == set_id(row.layers)
    assert set(plan["ratio"]) == {0.25, 0.5}
    evaluated = set(results["set_id"])
    assert evaluated <= {BASE_SET, *plan["set_id"]} and BASE_SET in evaluated
    assert len(list(art.pruning_checkpoint_dir(run_dir).glob("*.pkl"))) == provenance["unique_sets"] == len(evaluated)

    # retention: the unpruned row is the results' value; every other % follows from the per-example numbers
    assert set(retention["task_key"]) == SMOKE_TASKS
    assert {"unpruned", PRIMARY, "random", "last_k", "block_influence", "angular_distance", "gromov_block", "delta_ppl",
            "sleb"} <= set(
        retention["method"])
    value = results.set_index(["set_id", "task_key", "metric"])["value"]
    for row in retention[retention["method"] != "random"].itertuples():
        sid = BASE_SET if row.method == "unpruned" else row.set_ids
        assert row.value == value[(sid, row.task_key, PRIMARY_METRIC[row.task])]
        if row.method == "unpruned":
            assert row.retention == row.retention_low == row.retention_high == 100.0 and row.low <= row.value <= row.high
            continue
        mine = per_example[(per_example["set_id"] == sid) & (per_example["task_key"] == row.task_key)]
        base = per_example[(per_example["set_id"] == BASE_SET) & (per_example["task_key"] == row.task_key)]
        if row.metric == "perplexity":
            nll = mine["num"].sum() / mine["den"].sum() - base["num"].sum() / base["den"].sum()
            assert row.retention == pytest.approx(100 * math.exp(-nll), rel=1e-9)
            assert row.value == pytest.approx(math.exp(mine["num"].sum() / mine["den"].sum()), rel=1e-9)
        else:  # a % of an unpruned score of 0 is NaN (0 / 0) or infinite
            with np.errstate(divide="ignore", invalid="ignore"):
                expected = 100 * np.float64(mine["num"].mean()) / np.float64(base["num"].mean())
            assert row.retention == pytest.approx(expected, rel=1e-9, nan_ok=True)
            with np.errstate(divide="ignore", invalid="ignore"):
                corrected = 100 * (np.float64(mine["num"].mean()) - row.chance) / (base["num"].mean() - row.chance)
            assert row.chance_corrected == pytest.approx(corrected, rel=1e-9, nan_ok=True)
    assert set(retention.loc[retention["method"] == "random", "n_seeds"]) == {5}

    # the comparison's verdicts follow from Holm's adjustment over every tested comparison
    comparison = art.COMPARISON.read(run_dir)
    assert {"random", "last_k"} <= set(comparison["baseline"])
    sizes = per_example[per_example["set_id"] == BASE_SET].groupby("task_key").size()
    few = comparison["task_key"].map(sizes) < MIN_EXAMPLES_FOR_VERDICT
    assert (comparison.loc[few & (comparison["verdict"] != "same set"), "verdict"] == "too few examples").all()
    assert comparison.loc[few, "p_value"].isna().all()
    tested = comparison.dropna(subset=["p_value"])
    assert (tested["p_holm"] >= tested["p_value"]).all()
    assert set(comparison.loc[comparison["p_value"].isna(), "verdict"]) <= {"same set", "too few examples"}
    for row in tested.itertuples():
        expected = ("indistinguishable" if row.p_holm >= 0.05 else "better" if row.difference > 0 else "worse")
        assert row.verdict == expected and row.low <= row.difference <= row.high

    # the curve starts at the unpruned score, and the speed was measured on the primary set, best of 3 runs
    curve = art.CURVE.read(run_dir)
    for row in curve[curve["fraction_removed"] == 0].itertuples():
        assert row.value == value[(BASE_SET, row.task_key, row.metric)]
    speed = art.SPEED.read(run_dir)
    primary_set = plan[(plan["method"] == PRIMARY) & (plan["ratio"] == 0.25)]["layers"].iloc[0]
    assert speed["layers_removed"] == primary_set and speed["repeats"] == len(speed["times_pruned"]) == 3
    assert speed["seconds_pruned"] == min(speed["times_pruned"])

    # the precision check: the smoke profile evaluates in bfloat16, checked in float32 on the curve tasks
    precision = art.PRECISION.read(run_dir)
    assert set(precision["dtype"]) == {"bfloat16"} and set(precision["task_key"]) == {"wikitext2", "sciq"}  # the table's
    for row in precision.itertuples():
        assert row.value == value[(BASE_SET, row.task_key, row.metric)]
        assert row.difference == pytest.approx(row.value - row.value_float32)

    # the oracle ran on chapter 01's calibration batches (all 8 samples of the smoke profile), validation text
    # disjoint from every evaluated split
    calibration = art.CALIBRATION.read(run_dir)
    evaluated = sorted({f"{p['benchmark']}/{p['split']}" for p in provenance["benchmarks"].values()})
    assert provenance["oracle_calibration"] == {"source": "wikitext2/validation", "disjoint_from": evaluated,
                                                "n_batches": calibration["n_batches"], "n_tokens": calibration["n_tokens"]}
    assert "wikitext2/test" in evaluated
    assert all(p["files"] and p["sha256"] for p in provenance["benchmarks"].values())
    assert provenance["model"]["spec"] == "smollm2-135m-instruct"

    # the primary verdict (chance-corrected, as pre-registered) and the authors' raw one record the tie condition
    # and one condition per counted task, with the retention table's numbers; the held-out best comes last
    verdicts = stage_verdicts(run_dir, "03_pruning", "A1")
    assert [(v.subject, v.analysis) for v in verdicts[:2]] == [(PRIMARY, "primary"), ("avss:authors_code", "exploratory")]
    assert len(verdicts) == 3 and verdicts[2].analysis == "exploratory"
    counted = retention[retention["informative"]].drop_duplicates("task_key")["task_key"].tolist()
    at = plan[plan["ratio"] == 0.25].set_index("method")
    for v, column in zip(verdicts, ("chance_corrected", "retention")):
        rows = retention[retention["method"] == v.subject].set_index("task_key")
        assert v.condition(DECIDED).met == (not at.loc[v.subject, "arbitrary"])
        per_task = [c for c in v.conditions if c.name == RETAINED]
        assert [c.group for c in per_task] == counted
        for c in per_task:
            r = rows.loc[c.group]
            assert (c.value, c.low, c.high, c.threshold) == (
                r[column], r[f"{column}_low"], r[f"{column}_high"], RETENTION_THRESHOLD)
            assert c.met == (r[f"{column}_low"] >= RETENTION_THRESHOLD)
        if counted:
            assert v.numbers["retention"] == rows.loc[counted, column].min()
    assert all(v.outcome == a1_outcome(v.conditions) for v in verdicts)


@pytest.mark.slow
@needs_data
def test_pruning_artifacts(smoke_run):
    check_pruning_artifacts(smoke_run)


def test_check_upstream_compares_model_spec_and_layers():
    model = tiny_model("llama", 4)
    check_upstream({"model": {"spec": "tiny"}, "n_layers": 4}, "tiny", model)
    with pytest.raises(ConfigError, match="loads 'another'"):
        check_upstream({"model": {"spec": "tiny"}, "n_layers": 4}, "another", model)
    with pytest.raises(ConfigError, match="6 layers"):
        check_upstream({"model": {"spec": "tiny"}, "n_layers": 6}, "tiny", model)
