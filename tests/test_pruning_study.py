"""The pruning study: shared-prefix scoring, rankings, pruned-set planning, evaluation of removed layers,
paired bootstrap comparisons and input validation, on tiny models and the fixture data."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import avss_lib.pruning.study as study
from avss_lib.ranking import baselines
from avss_lib.pruning import report as pruning_report
from avss_lib.core.benchmarks import load_benchmark
from avss_lib.core.errors import ConfigError, DataError
from avss_lib.core.harness import PROMPTS, evaluate_task
from avss_lib.core.layer_removal import skip_layers
from avss_lib.testing.tiny_models import tiny_model, tiny_tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "data"
N_LAYERS = 6


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", N_LAYERS, seed=2)


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


# ------------------------------------------------------------------------------------ shared prefix


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_shared_prefix_logits_equal_plain_model(tok, model_type):
    model = tiny_model(model_type, 3, seed=4)
    prefix = tok("Q: a shared primer.\n\n", add_special_tokens=False)["input_ids"]
    rows = [prefix + tok("Q: one?", add_special_tokens=False)["input_ids"], prefix + [10, 11]]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    wrapped = study.SharedPrefixLM(model, prefix)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        got = wrapped(input_ids=ids, attention_mask=mask).logits
        other = torch.tensor([[5, 6, 7, 8]])
        fallback = wrapped(input_ids=other, attention_mask=torch.ones_like(other)).logits
    assert wrapped.hits == 1
    assert got.shape == expected.shape
    assert torch.allclose(got[mask.bool()], expected[mask.bool()], atol=1e-5)
    assert torch.allclose(fallback, model(input_ids=other).logits, atol=1e-6)
    assert wrapped.hits == 1  # the non-prefixed batch went to the plain model


def test_truthfulqa_mc_with_shared_prefix_matches_plain_evaluation(tok, llama):
    bench = load_benchmark("truthfulqa_mc", data_root=FIXTURES)
    prefix = study.truthfulqa_prefix_ids(tok)
    wrapped = study.SharedPrefixLM(llama, prefix)
    plain = evaluate_task(llama, tok, bench, batch_size=3)
    shared = evaluate_task(wrapped, tok, bench, batch_size=3)
    assert wrapped.hits > 0
    for a, b in zip(plain.per_example["logliks"], shared.per_example["logliks"]):
        assert np.allclose(a, b, atol=1e-4)
    assert np.allclose(plain.per_example["mc2"], shared.per_example["mc2"], atol=1e-5)


def test_truthfulqa_prefix_is_a_token_prefix_of_every_prompt(tok):
    prefix = study.truthfulqa_prefix_ids(tok)
    assert len(prefix) > 100
    for question in ("What is it?", "Why?"):
        ids = tok(PROMPTS["truthfulqa"].format(question=question) + " An answer", add_special_tokens=False)["input_ids"]
        assert ids[:len(prefix)] == prefix and len(ids) > len(prefix)


def test_shared_prefix_rejects_empty_prefix(llama):
    with pytest.raises(ConfigError):
        study.SharedPrefixLM(llama, [])


# ------------------------------------------------------------------------------------ tasks and bad input


def test_task_specs_validate_names_and_sizes():
    specs = study.task_specs({"sst2": 3, "wikitext2": None}, {"sst2": {"split": "validation"}})
    assert [(s.key, s.n, s.split, s.options) for s in specs] == [("sst2", 3, "validation", {}), ("wikitext2", None, None, {})]
    with pytest.raises(ConfigError, match="unknown task"):
        study.task_specs({"sst3": 3})
    with pytest.raises(ConfigError, match="unknown task"):
        study.task_specs({"sst2": 3}, {"imdb": {}})
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ConfigError, match="positive integer"):
            study.task_specs({"sst2": bad})
    with pytest.raises(ConfigError):
        study.task_specs({})


def test_curve_specs_reuse_identical_table_specs():
    table = study.task_specs({"sst2": 3, "wikitext2": 50})
    curve = study.curve_task_specs(table, {"sst2": 3, "wikitext2": 20})
    assert [s.key for s in curve] == ["sst2", "wikitext2@curve"]


def test_load_task_rejects_n_above_the_split(tok):
    spec = study.task_specs({"sst2": 5})[0]  # the fixture has 4 rows
    with pytest.raises(ConfigError, match="out of range"):
        study.load_task(spec, tok, str(FIXTURES), 0)


def test_wikitext_is_cut_at_whole_lines_with_enough_tokens(tok):
    bench = study.load_task(study.task_specs({"wikitext2": 5})[0], tok, str(FIXTURES), 0)
    text = bench.examples[0].text
    full = load_benchmark("wikitext2", data_root=FIXTURES).examples[0].text
    assert full.startswith(text) and text.endswith("\n") and len(text) < len(full)
    assert len(tok(text, add_special_tokens=False)["input_ids"]) >= 5
    assert bench.provenance["n_tokens_requested"] == 5
    with pytest.raises(ConfigError, match="fewer than"):
        study.load_task(study.task_specs({"wikitext2": 10**6})[0], tok, str(FIXTURES), 0)


@pytest.mark.parametrize("ratio", [0.0, 1.0, 1.5, -0.25])
def test_plan_rejects_ratio_outside_open_interval(ratio):
    scores = {"last_k": pd.Series(baselines.last_k_scores(N_LAYERS))}
    with pytest.raises(ConfigError, match="outside"):
        study.plan_pruned_sets(scores, [ratio])


def test_plan_never_removes_every_layer():
    plan = study.plan_pruned_sets({"last_k": pd.Series(baselines.last_k_scores(4))}, [0.99])
    assert plan["k"].iloc[0] == 3 and plan["layers"].iloc[0] == [0, 1, 2]


# ------------------------------------------------------------------------------------ rankings and plan


def test_method_scores_and_plan_deduplicate_identical_sets(llama):
    stats, avss = _tables()
    batches = [{"input_ids": torch.tensor([[1, 20, 30, 40, 50, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0]])}]
    scores = study.method_scores(stats, avss, random_seeds=[0, 1], model=llama, oracle_batches=batches, sleb_layers=2)
    assert list(scores) == ["avss:finite", "avss:with_inf", "random:0", "random:1", "last_k", "block_influence",
                            "angular_distance", "delta_ppl", "sleb"]
    assert np.allclose(scores["delta_ppl"], baselines.removal_delta_ppl(llama, batches, progress=False))
    sleb_order = baselines.greedy_removal_order(llama, batches, 2, progress=False)
    assert baselines.prune_order(scores["sleb"])[:2] == sleb_order
    scores["copy"] = scores["avss:finite"].copy()
    plan = study.plan_pruned_sets(scores, [0.34, 0.5])
    at = plan[np.isclose(plan["ratio"], 0.34)].set_index("method")
    assert at.loc["avss:finite", "layers"] == [1, 3]  # k = round(2.04) = 2 lowest of (5, 1, 4, 2, 6, 3)
    assert at.loc["last_k", "layers"] == [3, 4]
    assert at.loc["copy", "set_id"] == at.loc["avss:finite", "set_id"] == "L1-3"
    assert not at.loc["avss:finite", "arbitrary"]
    sets = study.unique_sets(plan)
    assert len(sets) == plan["set_id"].nunique() < len(plan)
    # with_inf has 4 finite scores: a 5th layer must be one of the two infinite ones (tie rule: lower index)
    plan5 = study.plan_pruned_sets({"avss:with_inf": scores["avss:with_inf"]}, [0.67, 0.84]).set_index("k")
    assert plan5.loc[4, "layers"] == [1, 3, 4, 5] and not plan5.loc[4, "arbitrary"]
    assert plan5.loc[5, "layers"] == [0, 1, 3, 4, 5] and plan5.loc[5, "arbitrary"]


def test_method_scores_reject_mismatched_layers():
    stats, avss = _tables()
    with pytest.raises(DataError, match="layers"):
        study.method_scores(stats, avss[avss["layer"] < 4], random_seeds=[0])
    with pytest.raises(ConfigError, match="repeat"):
        study.method_scores(stats, avss, random_seeds=[1, 1])


def test_calibration_batches_from_meta(tok):
    meta = {"data": {"benchmark": "wikitext2", "split": "test", "n_samples": 1, "seed": 42},
            "parameters": {"max_length": 16, "batch_size": 1, "padding": "max_length"}}
    batches = study.calibration_batches_from_meta(meta, tok, data_root=str(FIXTURES))
    assert len(batches) == 1 and batches[0]["input_ids"].shape == (1, 16)
    with pytest.raises(ConfigError, match="n_samples"):
        study.calibration_batches_from_meta(meta, tok, data_root=str(FIXTURES), n_samples=2)
    bad = {**meta, "data": {**meta["data"], "sha256": {"wikitext2/test.txt": "0" * 64}}}
    with pytest.raises(DataError, match="differs"):
        study.calibration_batches_from_meta(bad, tok, data_root=str(FIXTURES))


# ------------------------------------------------------------------------------------ evaluation


def test_evaluate_sets_removes_the_planned_layers(tok, llama):
    specs = study.task_specs({"sst2": 4, "wikitext2": None})
    tasks = {s.key: (s, study.load_task(s, tok, str(FIXTURES), 0)) for s in specs}
    sets = {study.BASE_SET: [], "L1-4": [1, 4]}
    needs = {study.BASE_SET: ["sst2", "wikitext2"], "L1-4": ["sst2"]}
    ev = study.evaluate_sets(llama, tok, sets, needs, tasks, batch_size=2)
    assert set(ev.results) == {(study.BASE_SET, "sst2"), (study.BASE_SET, "wikitext2"), ("L1-4", "sst2")}
    with skip_layers(llama, [1, 4]):
        expected = evaluate_task(llama, tok, tasks["sst2"][1], batch_size=2)
    got = ev.results[("L1-4", "sst2")]
    assert np.allclose(np.stack(got.per_example["logliks"]), np.stack(expected.per_example["logliks"]), atol=1e-4)
    per_example = ev.per_example_table()
    ppl = per_example[per_example["task_key"] == "wikitext2"]
    value = ev.results[(study.BASE_SET, "wikitext2")].summary["perplexity"][0]
    assert math.isclose(math.exp(ppl["num"].sum() / ppl["den"].sum()), value, rel_tol=1e-9)
    assert len(llama.model.layers) == N_LAYERS  # the original model is untouched


def test_evaluate_sets_resumes_from_checkpoints(tok, llama, tmp_path, monkeypatch):
    specs = study.task_specs({"sst2": 4})
    tasks = {s.key: (s, study.load_task(s, tok, str(FIXTURES), 0)) for s in specs}
    sets = {study.BASE_SET: [], "L1-4": [1, 4]}
    needs = {sid: ["sst2"] for sid in sets}
    first = study.evaluate_sets(llama, tok, sets, needs, tasks, batch_size=2, checkpoint_dir=tmp_path)
    files = sorted(tmp_path.glob("*.pkl"))
    assert [f.name.split("-")[0] for f in files] == ["L1", study.BASE_SET]
    files[0].write_bytes(b"truncated")  # an interrupted or corrupt checkpoint is recomputed, not trusted
    calls = []
    real = study.evaluate_task
    monkeypatch.setattr(study, "evaluate_task", lambda *a, **k: calls.append(1) or real(*a, **k))
    lines = []
    again = study.evaluate_sets(llama, tok, sets, needs, tasks, batch_size=2, checkpoint_dir=tmp_path, log=lines.append)
    assert len(calls) == 1 and any("unreadable" in line for line in lines)
    for key in first.results:
        assert first.results[key].summary == again.results[key].summary
    study.evaluate_sets(llama, tok, sets, needs, tasks, batch_size=3, checkpoint_dir=tmp_path)
    assert len(calls) == 3  # another batch size is another computation: nothing reused


def test_precision_check_compares_with_float32(tok, llama):
    specs = study.task_specs({"sst2": 4, "wikitext2": None})
    tasks = {s.key: (s, study.load_task(s, tok, str(FIXTURES), 0)) for s in specs}
    half = copy.deepcopy(llama).to(torch.bfloat16)
    needs = {study.BASE_SET: list(tasks)}
    ev = study.evaluate_sets(half, tok, {study.BASE_SET: []}, needs, tasks, batch_size=2)
    table = study.precision_check(llama, tok, ev, tasks, batch_size=2).set_index("task_key")
    assert set(table["dtype"]) == {"bfloat16"}
    exact = study.evaluate_task(llama, tok, tasks["wikitext2"][1], batch_size=2).summary["perplexity"][0]
    assert table.loc["wikitext2", "value_float32"] == pytest.approx(exact, rel=1e-6)
    assert table.loc["wikitext2", "difference"] == pytest.approx(table.loc["wikitext2", "value"] - exact)
    assert math.isnan(table.loc["wikitext2", "same_per_example"])
    assert 0.0 <= table.loc["sst2", "same_per_example"] <= 1.0 and table.loc["sst2", "n"] == 4
    same = study.precision_check(llama, tok, study.evaluate_sets(llama, tok, {study.BASE_SET: []}, needs, tasks,
                                                                  batch_size=2), tasks, batch_size=2)
    assert (same["difference"].abs() < 1e-9).all() and same["same_per_example"].dropna().eq(1.0).all()
    text = pruning_report.precision_summary(same, "float32")
    assert "sst2 acc" in text and "the same outcome on 100% of the 4 examples" in text
    assert text.count("the same outcome") == 1  # not claimed for perplexity
    with pytest.raises(ConfigError, match="no unpruned results"):
        study.precision_check(llama, tok, study.Evaluations(), tasks)


def test_measure_speedup_reports_theory(llama):
    batch = {"input_ids": torch.randint(4, 90, (2, 12)), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    speed = study.measure_speedup(llama, [0, 2, 4], batch, repeats=2)
    assert speed["theoretical_speedup_layers"] == pytest.approx(2.0)
    assert 1.0 < speed["estimated_speedup_params"] < 2.0  # the LM head is not pruned
    assert len(speed["times_pruned"]) == 2 and speed["seconds_pruned"] > 0
    with pytest.raises(ConfigError):
        study.measure_speedup(llama, [0], batch, repeats=0)


# ------------------------------------------------------------------------------------ statistics


def _synthetic(task: str = "sst2") -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Plan, summary and per-example tables: base 80% correct, AVSS 40%, last-k 80%, two random seeds 60/70%."""
    n = 200
    rng = np.random.default_rng(0)
    base = (np.arange(n) % 10 < 8).astype(float)
    values = {"none": base, "A": base * (rng.random(n) < 0.5), "K": base.copy(),
              "R0": base * (np.arange(n) % 4 != 0), "R1": base * (np.arange(n) % 8 != 0)}
    methods = [("avss:x", "avss", "A"), ("last_k", "last_k", "K"), ("random:0", "random", "R0"),
               ("random:1", "random", "R1"), ("block_influence", "block_influence", "A")]
    plan = pd.DataFrame([{"method": m, "family": f, "ratio": 0.25, "k": 2, "fraction_removed": 0.25, "layers": [0],
                          "arbitrary": False, "set_id": s} for m, f, s in methods])
    per_example = pd.concat([pd.DataFrame({"set_id": s, "task_key": task, "task": task, "id": np.arange(n).astype(str),
                                           "num": v, "den": 1.0}) for s, v in values.items()])
    summary = pd.DataFrame([{"set_id": s, "task_key": task, "task": task, "metric": "acc", "value": v.mean(),
                             "low": v.mean() - 0.05, "high": v.mean() + 0.05} for s, v in values.items()])
    return plan, summary, per_example


def test_paired_bootstrap_identical_and_dominated():
    a = (np.array([[1.0, 0, 1, 1]]), np.ones((1, 4)))
    assert study.paired_bootstrap("sst2", a, a, "difference", n_resamples=200) == (0.0, 0.0, 0.0)
    better = (np.array([[1.0, 1, 1, 1, 1, 1]]), np.ones((1, 6)))
    worse = (np.array([[0.0, 0, 0, 1, 0, 0]]), np.ones((1, 6)))
    d, low, _ = study.paired_bootstrap("sst2", better, worse, "difference", n_resamples=500)
    assert d == pytest.approx(5 / 6) and low > 0
    with pytest.raises(ConfigError):
        study.paired_bootstrap("sst2", a, a, "ratio")


def test_perplexity_retention_and_difference_use_log_ppl():
    base = (np.array([[20.0, 20.0]]), np.array([[10.0, 10.0]]))  # mean nll 2
    pruned = (np.array([[30.0, 30.0]]), np.array([[10.0, 10.0]]))  # mean nll 3
    ret = study.paired_bootstrap("wikitext2", pruned, base, "retention", n_resamples=100)
    assert ret[0] == pytest.approx(100 * math.exp(2) / math.exp(3))
    diff = study.paired_bootstrap("wikitext2", pruned, base, "difference", n_resamples=100)
    assert diff[0] == pytest.approx(-1.0) and diff[2] < 0  # worse: log ppl is higher by 1


def test_retention_and_comparison_tables():
    plan, summary, per_example = _synthetic()
    retention = study.retention_table(plan, summary, per_example, 0.25, ["sst2"], n_resamples=300)
    r = retention.set_index("method")
    assert r.loc["avss:x", "retention"] == pytest.approx(100 * per_example.query("set_id == 'A'")["num"].mean() / 0.8)
    assert r.loc["last_k", "retention"] == pytest.approx(100.0)
    assert r.loc["random", "n_seeds"] == 2 and r.loc["random", "value"] == pytest.approx((0.6 + 0.7) / 2)
    assert r.loc["random", "sd"] == pytest.approx(np.std([0.6, 0.7], ddof=1))
    assert bool(r.loc["unpruned", "informative"])
    comparison = study.comparison_table(plan, per_example, summary, 0.25, ["sst2"], n_resamples=300)
    c = comparison.set_index("baseline")
    assert c.loc["last_k", "verdict"] == "worse" and c.loc["random", "verdict"] == "worse"
    assert c.loc["block_influence", "verdict"] == "same set"
    text = pruning_report.a1_verdict(retention, comparison, ratio=0.25, k=2, n_layers=8, primary="avss:x")
    assert "A1 holds for 0 of 1 AVSS variants" in text and "worse in 1" in text
    assert "Rule:" in text


def test_uninformative_task_is_flagged():
    assert not study.informative("sst2", 0.45) and study.informative("sst2", 0.55)
    assert not study.informative("nq_open", 0.0) and study.informative("wikitext2", 1e9)


def test_curve_table_pools_random_seeds_and_rejects_unknown_methods():
    plan, summary, _ = _synthetic()
    curve = study.curve_table(plan, summary, ["avss:x", "random"], ["sst2"])
    rnd = curve[(curve["method"] == "random") & (curve["ratio"] == 0.25)].iloc[0]
    assert rnd["value"] == pytest.approx(0.65) and rnd["sd"] > 0
    assert (curve[curve["ratio"] == 0]["value"] == 0.8).all()
    with pytest.raises(ConfigError, match="not in the plan"):
        study.curve_table(plan, summary, ["sleb"], ["sst2"])
    with pytest.raises(ConfigError, match="not ranked"):
        study.subplan(plan, ["sleb"], [0.25], 1)
    assert set(study.subplan(plan, ["random"], [0.25], 1)["method"]) == {"random:0"}


def test_comparison_gives_no_verdict_on_a_handful_of_examples():
    plan, summary, per_example = _synthetic()
    few = per_example[per_example["id"].astype(int) < 5]
    comparison = study.comparison_table(plan, few, summary, 0.25, ["sst2"], n_resamples=100)
    assert set(comparison["verdict"]) == {"too few examples", "same set"}


def test_chance_levels_from_the_examples():
    mc = load_benchmark("truthfulqa_mc", data_root=FIXTURES)
    expected = np.mean([np.mean(e.mc2_labels) for e in mc.examples])
    assert study.chance_level("truthfulqa_mc", mc) == pytest.approx(expected) and 0 < expected < 1
    wikiqa = load_benchmark("wikiqa", data_root=FIXTURES, split="validation")
    value = study.chance_level("wikiqa", wikiqa, n_permutations=2000)
    one = [e for e in wikiqa.examples if e.correct_choices and len(e.correct_choices) == 1]
    if len(one) == len([e for e in wikiqa.examples if e.correct_choices]):  # one relevant: E[AP] = mean of 1/rank
        exact = np.mean([np.mean(1 / np.arange(1, len(e.choices) + 1)) for e in one])
        assert value == pytest.approx(exact, abs=0.02)
    assert 0 < value < 1
    assert study.chance_level("sciq", wikiqa) == 0.25 and study.chance_level("wikitext2", wikiqa) is None
    assert not study.informative("truthfulqa_mc", 0.3, chance=0.35) and study.informative("truthfulqa_mc", 0.3, 0.2)


def test_random_perplexity_is_pooled_geometrically():
    pooled = study._pool(pd.Series([10.0, 1000.0]), "perplexity")
    assert pooled["value"] == pytest.approx(100.0) and (pooled["min"], pooled["max"]) == (10.0, 1000.0)
    assert study._pool(pd.Series([0.2, 0.4]), "acc")["value"] == pytest.approx(0.3)


def test_a1_verdict_rows_follow_the_rule():
    from avss_lib.book.claims import write_verdicts

    plan, summary, per_example = _synthetic()
    retention = study.retention_table(plan, summary, per_example, 0.25, ["sst2"], n_resamples=300)
    rows = pruning_report.a1_verdict_rows(retention, "avss:x", ratio=0.25, k=2, n_layers=8)
    assert len(rows) == 1 and rows[0]["verdict"] == "does not hold"  # 44% [36, 52] < 90
    good = retention.assign(retention=95.0, retention_low=91.0, retention_high=99.0)
    assert pruning_report.a1_verdict_rows(good, "avss:x", ratio=0.25, k=2, n_layers=8)[0]["verdict"] == "holds"
    wide = retention.assign(retention=95.0, retention_low=60.0, retention_high=120.0)
    assert pruning_report.a1_verdict_rows(wide, "avss:x", ratio=0.25, k=2, n_layers=8)[0]["verdict"] == "inconclusive"
    none = retention.assign(informative=False)
    assert pruning_report.a1_verdict_rows(none, "avss:x", ratio=0.25, k=2, n_layers=8)[0]["verdict"] == "inconclusive"
    write_verdicts(rows, Path(__import__("tempfile").mkdtemp()) / "verdict.json")  # the claims chapter accepts them
