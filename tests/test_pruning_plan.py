"""Rankings of every method and the pruned sets they give, against hand-computed layers on tiny inputs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from avss_lib.core.errors import ConfigError, DataError
from avss_lib.pruning import plan as planning
from avss_lib.ranking import baselines
from avss_lib.testing.tiny_models import tiny_model

N_LAYERS = 6


def _tables(n_layers: int = N_LAYERS) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A minimal statistics table (block_output cosines) and an AVSS table with two variants, one with inf."""
    layers = np.arange(n_layers)
    stats = pd.DataFrame({"site": "block_output", "layer": layers,
                          "cos_mean": np.linspace(0.5, 0.95, n_layers), "cos_last": np.linspace(0.9, 0.2, n_layers)})
    finite = np.array([5.0, 1.0, 4.0, 2.0, 6.0, 3.0])[:n_layers]
    with_inf = np.array([np.inf, 1.0, np.inf, 2.0, 6.0, 3.0])[:n_layers]
    avss = pd.concat([pd.DataFrame({"variant": "finite", "layer": layers, "avss": finite}),
                      pd.DataFrame({"variant": "with_inf", "layer": layers, "avss": with_inf})])
    return stats, avss


def test_method_scores_and_plan_deduplicate_identical_sets():
    llama = tiny_model("llama", N_LAYERS, seed=2)
    stats, avss = _tables()
    batches = [{"input_ids": torch.tensor([[1, 20, 30, 40, 50, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0]])}]
    scores = planning.method_scores(stats, avss, random_seeds=[0, 1], model=llama, oracle_batches=batches, sleb_layers=2)
    assert list(scores) == ["avss:finite", "avss:with_inf", "random:0", "random:1", "last_k", "block_influence",
                            "angular_distance", "delta_ppl", "sleb"]
    assert scores["avss:finite"].tolist() == [5.0, 1.0, 4.0, 2.0, 6.0, 3.0]
    assert np.allclose(scores["block_influence"], 1 - np.linspace(0.5, 0.95, N_LAYERS))  # BI = 1 - cos
    assert np.allclose(scores["delta_ppl"], baselines.removal_delta_ppl(llama, batches, progress=False))
    sleb_order = baselines.greedy_removal_order(llama, batches, 2, progress=False)
    assert baselines.prune_order(scores["sleb"])[:2] == sleb_order
    assert sorted(scores["sleb"][sleb_order]) == [0.0, 1.0]  # removed first = lowest scores
    other = [{"input_ids": torch.tensor([[1, 7, 9, 3, 2, 5, 8]]), "attention_mask": torch.ones(1, 7, dtype=torch.long)}]
    own = planning.method_scores(stats, avss, random_seeds=[0], model=llama, oracle_batches=batches, sleb_layers=3,
                                 sleb_batches=other)
    assert baselines.prune_order(own["sleb"])[:3] == baselines.greedy_removal_order(llama, other, 3, progress=False)
    assert np.allclose(own["delta_ppl"], scores["delta_ppl"])  # the oracle keeps its own batches
    scores["copy"] = scores["avss:finite"].copy()
    plan = planning.plan_pruned_sets(scores, [0.34, 0.5])
    at = plan[np.isclose(plan["ratio"], 0.34)].set_index("method")
    assert at.loc["avss:finite", "layers"] == [1, 3]  # k = round(2.04) = 2 lowest of (5, 1, 4, 2, 6, 3)
    assert at.loc["last_k", "layers"] == [3, 4]  # the deepest layers but the final one
    assert at.loc["block_influence", "layers"] == [4, 5]  # the highest cosines
    assert at.loc["copy", "set_id"] == at.loc["avss:finite", "set_id"] == "L1-3"
    assert not at.loc["avss:finite", "arbitrary"]
    half = plan[np.isclose(plan["ratio"], 0.5)].set_index("method")
    assert half.loc["avss:finite", "layers"] == [1, 3, 5] and half.loc["avss:finite", "k"] == 3
    assert half.loc["avss:finite", "fraction_removed"] == 0.5
    sets = planning.unique_sets(plan)
    assert sets["L1-3"] == [1, 3] and len(sets) == plan["set_id"].nunique()
    assert list(sets).index("L1-3") == 0  # first appearance order
    # with_inf has 4 finite scores: a 5th layer must be one of the two infinite ones (tie rule: lower index)
    plan5 = planning.plan_pruned_sets({"avss:with_inf": scores["avss:with_inf"]}, [0.67, 0.84]).set_index("k")
    assert plan5.loc[4, "layers"] == [1, 3, 4, 5] and not plan5.loc[4, "arbitrary"]
    assert plan5.loc[5, "layers"] == [0, 1, 3, 4, 5] and plan5.loc[5, "arbitrary"]


def test_method_scores_without_a_model_have_no_oracle():
    stats, avss = _tables()
    scores = planning.method_scores(stats, avss, random_seeds=[3])
    assert list(scores) == ["avss:finite", "avss:with_inf", "random:3", "last_k", "block_influence", "angular_distance"]
    assert scores["random:3"].tolist() == baselines.random_scores(N_LAYERS, 3).tolist()


def test_method_scores_reject_mismatched_layers_and_bad_seeds():
    stats, avss = _tables()
    with pytest.raises(DataError, match="layers"):
        planning.method_scores(stats, avss[avss["layer"] < 4], random_seeds=[0])
    with pytest.raises(ConfigError, match="repeat"):
        planning.method_scores(stats, avss, random_seeds=[1, 1])
    with pytest.raises(DataError, match="block_output"):
        planning.method_scores(stats.assign(site="mlp_activation"), avss, random_seeds=[0])
    with pytest.raises(DataError, match="layers"):
        planning.method_scores(stats, avss, random_seeds=[0], model=tiny_model("llama", 4),
                               oracle_batches=[{"input_ids": torch.tensor([[1, 2]])}])


@pytest.mark.parametrize("ratio", [0.0, 1.0, 1.5, -0.25])
def test_plan_rejects_ratio_outside_open_interval(ratio):
    scores = {"last_k": pd.Series(baselines.last_k_scores(N_LAYERS))}
    with pytest.raises(ConfigError, match="outside"):
        planning.plan_pruned_sets(scores, [ratio])
    with pytest.raises(ConfigError, match="no pruning ratio"):
        planning.plan_pruned_sets(scores, [])


def test_plan_never_removes_every_layer():
    plan = planning.plan_pruned_sets({"last_k": pd.Series(baselines.last_k_scores(4))}, [0.99])
    assert plan["k"].iloc[0] == 3 and plan["layers"].iloc[0] == [0, 1, 2]


def test_set_ids_and_method_names():
    assert planning.set_id([12, 3, 7]) == "L3-7-12" and planning.set_id([]) == planning.BASE_SET == "none"
    assert planning.method_family("avss:block_rel") == "avss" and planning.method_family("random:4") == "random"
    assert planning.method_family("last_k") == "last_k"
    assert planning.method_label("avss:authors_code") == "AVSS authors code"
    assert planning.method_label("block_influence") == "block influence"


def _plan() -> pd.DataFrame:
    scores = {"avss:a": pd.Series([1.0, 2, 3, 4]), "random:0": pd.Series([4.0, 3, 2, 1]),
              "random:1": pd.Series([2.0, 1, 4, 3]), "last_k": pd.Series(baselines.last_k_scores(4))}
    return planning.plan_pruned_sets(scores, [0.25, 0.5])


def test_subplan_takes_the_first_random_seeds_at_the_curve_ratios():
    plan = _plan()
    sub = planning.subplan(plan, ["avss:a", "random"], [0.5], 1)
    assert sub[["method", "ratio"]].values.tolist() == [["avss:a", 0.5], ["random:0", 0.5]]
    with pytest.raises(ConfigError, match="not ranked"):
        planning.subplan(plan, ["sleb"], [0.25], 1)
    with pytest.raises(ConfigError, match="curve_random_seeds"):
        planning.subplan(plan, ["random"], [0.25], 0)


def test_task_needs_give_the_unpruned_model_every_task():
    plan = _plan()
    table = plan[plan["ratio"] == 0.25]
    curve = planning.subplan(plan, ["avss:a"], [0.25, 0.5], 0)
    needs = planning.task_needs((table, ["sst2", "wikitext2"]), (curve, ["wikitext2@curve"]))
    assert needs == {"none": ["sst2", "wikitext2", "wikitext2@curve"],
                     "L0": ["sst2", "wikitext2", "wikitext2@curve"],  # avss:a at 0.25, also on the curve
                     "L3": ["sst2", "wikitext2"], "L1": ["sst2", "wikitext2"],  # random:0, random:1
                     "L2": ["sst2", "wikitext2"],  # last_k
                     "L0-1": ["wikitext2@curve"]}


def test_selection_mismatches_name_the_variants_chapter_02_selected_otherwise():
    plan = planning.plan_pruned_sets({"avss:a": pd.Series([1.0, 2, 3, 4]), "avss:b": pd.Series([4.0, 3, 2, 1]),
                                      "avss:c": pd.Series([1.0, 1, 1, 1])}, [0.5])
    selections = pd.DataFrame({"variant": ["a", "b", "a"], "rule": ["fixed_fraction", "fixed_fraction", "authors_code"],
                               "layers": [[1, 0], [0, 1], [3]]})
    assert planning.selection_mismatches(plan, selections, 0.5) == ["b"]  # a matches (order aside); c not in 02


def test_block_methods_join_the_plan_with_their_own_set_per_size():
    scores = {"last_k": pd.Series(baselines.last_k_scores(6))}  # prunes 4, 3, 2, ... first
    plan = planning.plan_pruned_sets(scores, [0.34, 0.5], blocks={"gromov_block": lambda n: list(range(5 - n, 5))})
    rows = plan.set_index(["method", "ratio"])
    assert plan["method"].tolist() == ["last_k", "gromov_block"] * 2  # ranked methods first, at each ratio
    assert rows.loc[("gromov_block", 0.5), ["k", "layers", "family", "arbitrary"]].tolist() == [
        3, [2, 3, 4], "gromov_block", False]
    # round(0.34 * 6) = 2 layers: the same layers as last-k share its set id, so the set is evaluated once
    assert rows.loc[("gromov_block", 0.34), "layers"] == [3, 4] == rows.loc[("last_k", 0.34), "layers"]
    assert rows.loc[("gromov_block", 0.34), "set_id"] == rows.loc[("last_k", 0.34), "set_id"] == "L3-4"
    with pytest.raises(ConfigError, match="no ranking"):
        planning.plan_pruned_sets({}, [0.25], blocks={"gromov_block": lambda n: []})


def test_block_methods_choose_gromovs_block_on_the_calibration_batches():
    model = tiny_model("llama", 5, seed=3)
    batches = [{"input_ids": torch.tensor([[1, 5, 9, 13, 17, 21]]), "attention_mask": torch.ones(1, 6, dtype=torch.long)}]
    choose = planning.block_methods(model, batches)["gromov_block"]
    inputs, outputs = baselines.last_token_states(model, batches)
    distances = baselines.block_angular_distances(inputs, outputs, 2)
    start = int(np.argmin(distances))
    assert choose(2) == [start, start + 1] and choose(0) == []
