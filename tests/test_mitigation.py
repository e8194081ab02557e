"""Notebook 05's mitigation pipeline on tiny models and in-memory data: splits, examples, arms, resumption, verdict."""

from __future__ import annotations

import hashlib
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest
import torch

from avss_lib.mitigation import study as mit
from avss_lib.mitigation import report as rep
from avss_lib.core.benchmarks import Benchmark, Example
from avss_lib.core.errors import ConfigError, DataError
from avss_lib.core.splits import normalize_question
from avss_lib.testing.tiny_models import tiny_model, tiny_tokenizer

TOK = tiny_tokenizer()
N_LAYERS = 4


# ------------------------------------------------------------------------------------------ fake upstream


def _benchmarks(n: int = 8) -> dict[str, Benchmark]:
    """Small in-memory benchmarks with the record conventions of avss_lib.core.benchmarks."""
    prov = {"source": "test"}
    nq = [Example(id=f"nq_open-{i}", question=f"who is person {i}", answers=(f"Name{i}", f"N{i}")) for i in range(n)]
    tq = [Example(id=f"triviaqa-{i}", question=f"what is thing {i}", answers=(f"Thing{i}",)) for i in range(n)]
    sciq = [Example(id=f"sciq-validation-{i}", question=f"which gas {i}", answers=("oxygen",),
                    choices=("neon", "argon", "helium", "oxygen"), label=3, context=f"Support {i}.")
            for i in range(n)]
    tqa_mc = [Example(id=f"truthfulqa-{i:012d}", question=f"is myth {i} true", choices=("No", "Yes"), label=0,
                      mc2_choices=("No", "Never", "Yes"), mc2_labels=(1, 1, 0)) for i in range(n)]
    tqa_gen = [Example(id=f"truthfulqa-{i:012d}", question=f"is myth {i} true", answers=("No", "Never"),
                       incorrect_answers=("Yes", "Always", "Sometimes")) for i in range(n)]
    wikiqa = [Example(id=f"Q{i}", question=f"how do birds fly {i}", context="Bird",
                      choices=("Birds have wings.", "Fish swim.", "Rocks sit."), correct_choices=(0,), label=0)
              for i in range(n)]
    text = "The quick brown fox jumps over the lazy dog. " * 20
    return {"nq_open": Benchmark("nq_open", nq, prov), "triviaqa": Benchmark("triviaqa", tq, prov),
            "sciq": Benchmark("sciq", sciq, prov), "truthfulqa_mc": Benchmark("truthfulqa_mc", tqa_mc, prov),
            "truthfulqa_gen": Benchmark("truthfulqa_gen", tqa_gen, prov), "wikiqa": Benchmark("wikiqa", wikiqa, prov),
            "wikitext2": Benchmark("wikitext2", [Example(id="wikitext2-test", text=text)], prov)}


def _answers(benchmarks: dict[str, Benchmark], wrong_every: int = 2) -> pd.DataFrame:
    """A fake notebook-04 answers table: every ``wrong_every``-th example is a hallucination."""
    rows = []
    for name in mit.DATASETS:
        for i, e in enumerate(benchmarks[name].examples):
            wrong = i % wrong_every == 0
            if name in mit.OPEN_QA:
                pred = f"Wrong{i}" if wrong else e.answers[0]
            elif name == "wikiqa":
                pred = e.choices[1] if wrong else e.choices[0]
            elif name == "sciq":
                pred = e.choices[0] if wrong else e.choices[e.label]
            else:  # truthfulqa_mc
                pred = e.choices[1] if wrong else e.choices[0]
            rows.append({"dataset": name, "id": e.id, "question": e.question, "prediction": pred,
                         "confidence": 0.5, "correct": not wrong, "correct_exact_match": not wrong,
                         "correct_alias_containment": not wrong})
    return pd.DataFrame(rows)


EAVSS = {"k": 2, "site": "block_output", "per_dataset": {d: [3, 1] for d in mit.DATASETS}, "pooled": [3, 1],
         "excluded": [], "lowest_avss": [0, 2]}
AVSS_SCORES = pd.DataFrame({"variant": "block_rel", "layer": range(N_LAYERS), "rank": [2, 4, 1, 3]})


def _settings(**overrides: object) -> mit.MitigationSettings:
    base: dict[str, object] = {"k": 2, "steps": 2, "lr": 1e-2, "batch_size": 2, "seeds": (0,), "random_draws": 3,
                               "max_negatives": 2, "train_max_length": 64, "eval_batch_size": 4, "ppl_chars": 300,
                               "ppl_max_length": 64}
    return mit.MitigationSettings(**(base | overrides))  # type: ignore[arg-type]


def _weights_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ bad input


def test_k_larger_than_model_raises() -> None:
    with pytest.raises(ConfigError, match="k=5 layers requested but the model has 4"):
        _settings(k=5).validate(N_LAYERS)
    with pytest.raises(ConfigError, match="k=5"):
        mit.random_layers(N_LAYERS, 5, draw=0)
    with pytest.raises(ConfigError, match="k=5"):
        mit.eavss_top_k(EAVSS, 5, N_LAYERS)


def test_k_larger_than_notebook_04_selection_raises() -> None:
    with pytest.raises(ConfigError, match="notebook 04 selected only 2"):
        mit.eavss_top_k(EAVSS, 3, N_LAYERS)


@pytest.mark.parametrize("lr", [0.0, -1e-5])
def test_non_positive_lr_raises(lr: float) -> None:
    with pytest.raises(ConfigError, match="lr="):
        _settings(lr=lr).validate(N_LAYERS)


def test_unknown_arm_and_empty_seeds_raise() -> None:
    with pytest.raises(ConfigError, match="unknown arm"):
        _settings(arms=("eavss", "middle")).validate(N_LAYERS)
    with pytest.raises(ConfigError, match="seeds"):
        _settings(seeds=()).validate(N_LAYERS)


def test_dataset_without_hallucinations_raises() -> None:
    bench = _benchmarks()
    answers = _answers(bench)
    answers.loc[answers["dataset"] == "nq_open", ["correct", "correct_exact_match", "correct_alias_containment"]] = True
    split = mit.split_answers(answers, mit.DATASETS, seed=0)
    with pytest.raises(DataError, match=r"\['nq_open'\] have no hallucinated answer"):
        mit.build_training_frame(answers, split, bench)


def test_missing_dataset_and_columns_raise() -> None:
    bench = _benchmarks()
    answers = _answers(bench)
    with pytest.raises(DataError, match="no rows for"):
        mit.split_answers(answers[answers["dataset"] != "sciq"], mit.DATASETS)
    with pytest.raises(DataError, match="lacks column"):
        mit.split_answers(answers.drop(columns=["correct_alias_containment"]), mit.DATASETS)


def test_ids_from_another_split_raise() -> None:
    bench = _benchmarks()
    answers = _answers(bench)
    answers.loc[answers["dataset"] == "sciq", "id"] = answers.loc[answers["dataset"] == "sciq", "id"].str.replace(
        "validation", "test")
    split = mit.split_answers(answers, mit.DATASETS)
    with pytest.raises(DataError, match="load the split notebook 04 used"):
        mit.build_training_frame(answers, split, bench)


# ------------------------------------------------------------------------------------------ split & examples


def test_split_is_question_disjoint_and_seeded() -> None:
    bench = _benchmarks(12)
    answers = _answers(bench)
    # a re-cased, re-punctuated duplicate of one question must land on the same side
    dup = answers[answers["dataset"] == "nq_open"].iloc[[0]].assign(id="nq_open-dup", question="WHO is person 0?!")
    answers = pd.concat([answers, dup], ignore_index=True)
    split = mit.split_answers(answers, mit.DATASETS, eval_fraction=0.5, seed=3)
    for _, part in split.groupby("dataset"):
        train = set(part[part["split"] == "train"]["question"].map(normalize_question))
        held = set(part[part["split"] == "eval"]["question"].map(normalize_question))
        assert train and held and not train & held
    assert split.set_index("id").loc["nq_open-dup", "split"] == split.set_index("id").loc["nq_open-0", "split"]
    again = mit.split_answers(answers.sample(frac=1, random_state=1), mit.DATASETS, eval_fraction=0.5, seed=3)
    key = ["dataset", "id"]
    assert split.sort_values(key)["split"].tolist() == again.sort_values(key)["split"].tolist()
    other = mit.split_answers(answers, mit.DATASETS, eval_fraction=0.5, seed=4)
    assert split.sort_values(key)["split"].tolist() != other.sort_values(key)["split"].tolist()


def test_training_examples_use_own_hallucinations_and_truthfulqa_incorrect_answers() -> None:
    bench = _benchmarks()
    answers = _answers(bench)
    # an answer accepted by alias containment only must not become a negative
    mask = (answers["dataset"] == "triviaqa") & (answers["id"] == "triviaqa-2")
    answers.loc[mask, ["prediction", "correct", "correct_exact_match", "correct_alias_containment"]] = [
        "the Thing2 one", False, False, True]
    split = mit.split_answers(answers, mit.DATASETS, seed=0)
    frame = mit.build_training_frame(answers, split, bench, max_negatives=2)
    train_ids = set(split[split["split"] == "train"]["id"])
    assert set(frame["id"]) == train_ids  # only the train side
    by_id = frame.set_index("id")
    for row in frame[frame["dataset"] == "nq_open"].itertuples():
        i = int(row.id.split("-")[1])
        assert row.positive == f" Name{i}"
        assert row.negatives == ([f" Wrong{i}"] if i % 2 == 0 else [])
        assert row.usable == (i % 2 == 0)
        assert row.prompt == f"Answer these questions:\nQ: who is person {i}?\nA:"
    if "triviaqa-2" in by_id.index:
        assert by_id.loc["triviaqa-2", "negatives"] == [] and not by_id.loc["triviaqa-2", "usable"]
    tqa = frame[frame["dataset"] == "truthfulqa_mc"]
    assert tqa["usable"].all()  # TruthfulQA's own incorrect answers, whatever the model chose
    assert all(r.positive == " No" and r.negatives == [" Yes", " Always"] for r in tqa.itertuples())
    assert all(r.prompt.endswith(f"\n\nQ: {r.question}\nA:") for r in tqa.itertuples())
    assert tqa["prompt"].iloc[0].startswith("Q: What is human life expectancy")
    wiki = frame[frame["dataset"] == "wikiqa"]
    assert all(r.negatives == ([" Fish swim."] if r.hallucinated else []) for r in wiki.itertuples())
    sciq = frame[(frame["dataset"] == "sciq") & frame["usable"]]
    assert (sciq["positive"] == " oxygen").all() and sciq["prompt"].str.startswith("Question: which gas").all()
    open_book = mit.build_training_frame(answers, split, bench, sciq_with_support=True)
    assert open_book[open_book["dataset"] == "sciq"]["prompt"].str.startswith("Support").all()
    with_prompt = mit.build_training_frame(answers.assign(prompt="CTX " + answers["id"]), split, bench)
    assert (with_prompt["prompt"] == "CTX " + with_prompt["id"]).all()  # notebook 04's exact context wins
    examples = mit.to_examples(frame)
    assert len(examples) == int(frame["usable"].sum()) and all(e.negatives for e in examples)


def test_eval_sets_are_the_held_out_side_and_capped() -> None:
    bench = _benchmarks(12)
    answers = _answers(bench)
    split = mit.split_answers(answers, mit.DATASETS, seed=0)
    sets = mit.eval_benchmarks(split, bench, n_eval=4, seed=0)
    held = set(split[split["split"] == "eval"]["id"])
    for b in sets.values():
        assert len(b.examples) == 4 and {e.id for e in b.examples} <= held
    assert mit.eval_benchmarks(split, bench, n_eval=4, seed=0)["sciq"].examples == sets["sciq"].examples


# ------------------------------------------------------------------------------------------ arms


def test_arm_layers_and_plan() -> None:
    settings = _settings(seeds=(0, 1))
    layers = mit.arm_layers(settings, N_LAYERS, EAVSS, AVSS_SCORES, "block_rel", layer_seed=7)
    assert layers["eavss"] == [(3, 1)] and layers["lm_only"] == [(3, 1)]
    assert layers["lowest_avss"] == [(0, 2)]  # ranks 1 and 2
    assert layers["all"] == [(0, 1, 2, 3)]
    draws = layers["random"]
    assert len(draws) == 3 and all(len(set(d)) == 2 and all(0 <= i < N_LAYERS for i in d) for d in draws)
    assert draws == mit.arm_layers(settings, N_LAYERS, EAVSS, AVSS_SCORES, "block_rel", layer_seed=7)["random"]
    runs = mit.plan_runs(settings, layers)
    by_arm = pd.Series([r.arm for r in runs]).value_counts()
    assert by_arm["base"] == 1 and by_arm["random"] == 6 and by_arm["eavss"] == 2
    assert all(r.lambda_con == 0 for r in runs if r.arm == "lm_only")
    assert all(r.lambda_con == settings.lambda_con for r in runs if r.arm in ("eavss", "random"))
    assert len({r.run_id for r in runs}) == len(runs)


def test_random_draws_differ() -> None:
    draws = {tuple(mit.random_layers(30, 7, d, seed=42)) for d in range(5)}
    assert len(draws) == 5


def test_lowest_avss_unknown_variant_raises() -> None:
    with pytest.raises(ConfigError, match="no AVSS variant 'nope'"):
        mit.lowest_avss_layers(AVSS_SCORES, "nope", 2, N_LAYERS)


def test_budget_table_counts_parameters() -> None:
    model = tiny_model("llama", N_LAYERS)
    settings = _settings()
    runs = mit.plan_runs(settings, mit.arm_layers(settings, N_LAYERS, EAVSS, AVSS_SCORES, "block_rel"))
    table = mit.runs_table(runs, model).set_index("run_id")
    per_layer = sum(p.numel() for p in model.model.layers[0].parameters())
    assert table.loc["eavss-s0", "trainable_params"] == 2 * per_layer
    assert table.loc["all-s0", "trainable_params"] == N_LAYERS * per_layer
    assert table.loc["base", "trainable_params"] == 0


# ------------------------------------------------------------------------------------------ end to end


def _pipeline(tmp_path: Path, arms: tuple[str, ...] = mit.ARMS, seeds: tuple[int, ...] = (0,)):
    bench = _benchmarks(8)
    answers = _answers(bench)
    split = mit.split_answers(answers, mit.DATASETS, seed=0)
    frame = mit.build_training_frame(answers, split, bench, max_negatives=2)
    examples = mit.to_examples(frame)
    sets = mit.eval_benchmarks(split, bench, n_eval=3, seed=0)
    settings = _settings(arms=arms, seeds=seeds)
    runs = mit.plan_runs(settings, mit.arm_layers(settings, N_LAYERS, EAVSS, AVSS_SCORES, "block_rel"))
    return examples, sets, bench["wikitext2"], settings, runs


def test_every_arm_starts_from_the_same_base_weights_and_resumes(tmp_path: Path, monkeypatch) -> None:
    examples, sets, ppl, settings, runs = _pipeline(tmp_path)
    model = tiny_model("llama", N_LAYERS)
    base_hash = _weights_hash(model)
    seen: list[tuple[str, tuple[int, ...], float]] = []
    real_train = mit.train

    def spy(model, tokenizer, examples, config, **kwargs):
        seen.append((_weights_hash(model), config.layers, config.lambda_con))
        return real_train(model, tokenizer, examples, config, **kwargs)

    monkeypatch.setattr(mit, "train", spy)
    result = mit.run_all(model, TOK, runs, examples, sets, ppl, settings, tmp_path, progress=False)
    assert len(seen) == len(runs) - 1  # base is not trained
    assert all(h == base_hash for h, _, _ in seen)
    assert _weights_hash(model) == base_hash  # restored at the end
    assert {lc for _, layers, lc in seen if layers == (3, 1)} == {0.0, settings.lambda_con}
    assert set(result.per_example["arm"]) == set(mit.ARMS)
    assert set(result.per_example["dataset"]) == set(mit.DATASETS)
    assert result.runs["perplexity"].gt(1).all()
    assert (tmp_path / "per_example.parquet").is_file() and (tmp_path / "runs.csv").is_file()
    assert not any((tmp_path / "runs").glob("*/checkpoint"))  # removed once a run is finished
    trained = result.per_example[result.per_example["arm"] == "all"].set_index(["dataset", "id"])["confidence"]
    base = result.per_example[result.per_example["arm"] == "base"].set_index(["dataset", "id"])["confidence"]
    assert not np.allclose(trained.loc[base.index], base)  # training changed the model

    # a second run reuses every finished run without training
    def fail(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(mit, "train", fail)
    again = mit.run_all(model, TOK, runs, examples, sets, ppl, settings, tmp_path, progress=False)
    assert again.runs["reused"].all()
    pd.testing.assert_frame_equal(again.per_example, result.per_example)


def test_interrupted_run_resumes_from_finished_arms(tmp_path: Path, monkeypatch) -> None:
    examples, sets, ppl, settings, runs = _pipeline(tmp_path, arms=("base", "eavss", "lm_only"))
    model = tiny_model("llama", N_LAYERS)
    real_eval = mit.evaluate_model
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_eval(*args, **kwargs)

    monkeypatch.setattr(mit, "evaluate_model", flaky)
    with pytest.raises(KeyboardInterrupt):
        mit.run_all(model, TOK, runs, examples, sets, ppl, settings, tmp_path, progress=False)
    assert (tmp_path / "runs" / "base" / mit.RESULT_NAME).is_file()
    assert not (tmp_path / "runs" / "eavss-s0" / mit.RESULT_NAME).is_file()
    assert (tmp_path / "runs" / "eavss-s0" / "checkpoint" / "checkpoint.pt").is_file()  # training finished
    monkeypatch.setattr(mit, "evaluate_model", real_eval)
    result = mit.run_all(tiny_model("llama", N_LAYERS), TOK, runs, examples, sets, ppl, settings, tmp_path,
                         progress=False)
    assert result.runs.set_index("run_id")["reused"].to_dict() == {"base": True, "eavss-s0": False, "lm_only-s0": False}
    log = result.logs[result.logs["run_id"] == "eavss-s0"]
    assert list(log["step"]) == [1, 2]  # resumed from the checkpoint, not retrained


def test_changed_settings_recompute_a_finished_run(tmp_path: Path) -> None:
    examples, sets, ppl, settings, runs = _pipeline(tmp_path, arms=("base", "eavss"))
    model = tiny_model("llama", N_LAYERS)
    mit.run_all(model, TOK, runs, examples, sets, ppl, settings, tmp_path, progress=False)
    more = _settings(arms=("base", "eavss"), steps=3)
    runs2 = mit.plan_runs(more, mit.arm_layers(more, N_LAYERS, EAVSS, AVSS_SCORES, "block_rel"))
    result = mit.run_all(model, TOK, runs2, examples, sets, ppl, more, tmp_path, progress=False)
    # the untouched model does not depend on the training budget; the trained arm does
    assert result.runs.set_index("run_id")["reused"].to_dict() == {"base": True, "eavss-s0": False}
    assert result.logs["step"].max() == 3


# ------------------------------------------------------------------------------------------ report


def _synthetic(n: int = 60, seed: int = 0) -> pd.DataFrame:
    """Per-example results where eavss is clearly better than the rest on accuracy and equal elsewhere."""
    rng = np.random.default_rng(seed)
    rows = []
    base_correct = rng.random(n) < 0.3
    for run_id, arm, flip in [("base", "base", 0.0), ("eavss-s0", "eavss", 0.9), ("random-d0-s0", "random", 0.0),
                              ("random-d1-s0", "random", 0.0), ("lm_only-s0", "lm_only", 0.0)]:
        correct = base_correct | (rng.random(n) < flip)
        for i in range(n):
            rows.append({"run_id": run_id, "arm": arm, "dataset": "sciq", "id": f"s{i}", "correct": bool(correct[i]),
                         "confidence": 0.6, "prediction": "x", "alias_containment": np.nan, "mc2": np.nan})
    return pd.DataFrame(rows)


def test_paired_difference_exact_cases() -> None:
    pe = _synthetic()
    value, low, high = mit.paired_difference(pe, "random", "lm_only", "sciq", "accuracy")
    assert value == low == high == 0.0  # identical per-example results
    value, low, high = mit.paired_difference(pe, "eavss", "base", "sciq", "accuracy")
    assert value > 40 and 0 < low <= value <= high


def test_verdict_rule(tmp_path: Path) -> None:
    pe = _synthetic()
    table = rep.arm_table(pe, n_resamples=200)
    comp = rep.comparisons(pe, metrics=("accuracy",), n_resamples=200)
    assert comp["beats"].all() and not comp["beaten"].any()
    assert "supported" in rep.e2_verdict(comp, table)
    assert "no arm answers any held-out question correctly" not in rep.e2_verdict(comp, table)
    never = pe.assign(correct=False)
    text = rep.e2_verdict(rep.comparisons(never, metrics=("accuracy",), n_resamples=200),
                          rep.arm_table(never, n_resamples=200))
    assert "On sciq no arm answers any held-out question correctly" in text
    rows = rep.verdict_rows(comp, table)
    assert rows[0]["claim"] == "E2" and rows[0]["verdict"] == "holds" and "better on 1" in rows[0]["ours"]
    from avss_lib.book.claims import write_verdicts

    write_verdicts(rows, tmp_path / "verdict.json")  # validates the claims chapter's schema
    flipped = pe.assign(arm=pe["arm"].replace({"eavss": "random", "random": "eavss"}),
                        run_id=pe["run_id"].replace({"eavss-s0": "tmp"}))
    flipped = flipped[~((flipped["arm"] == "eavss") & (flipped["run_id"] == "random-d1-s0"))]
    comp2 = rep.comparisons(flipped, metrics=("accuracy",), n_resamples=200)
    assert "contradicted" in rep.e2_verdict(comp2, rep.arm_table(flipped, n_resamples=200))
    same = pe[pe["arm"] != "eavss"].copy()
    same = pd.concat([same, same[same["arm"] == "lm_only"].assign(arm="eavss", run_id="eavss-s0")])
    comp3 = rep.comparisons(same, metrics=("accuracy", "ece"), n_resamples=200)
    assert comp3["level"].iloc[0] == pytest.approx(1 - 0.05 / 2)
    assert "not resolved" in rep.e2_verdict(comp3, rep.arm_table(same, n_resamples=200))
    assert rep.verdict_rows(comp3, rep.arm_table(same, n_resamples=200))[0]["verdict"] == "inconclusive"
    assert rep.verdict_rows(comp2, rep.arm_table(flipped, n_resamples=200))[0]["verdict"] == "does not hold"


def test_arm_table_relative_change_and_figures() -> None:
    pe = _synthetic()
    table = rep.arm_table(pe, n_resamples=200)
    row = table[(table["arm"] == "eavss") & (table["metric"] == "accuracy")].iloc[0]
    base = table[(table["arm"] == "base") & (table["metric"] == "accuracy")].iloc[0]
    assert row["rel_change"] == pytest.approx(100 * (row["value"] - base["value"]) / base["value"])
    rnd = table[(table["arm"] == "random") & (table["metric"] == "accuracy")].iloc[0]
    assert rnd["n_runs"] == 2
    shown = rep.results_table(table, "accuracy")
    assert "top-k EAVSS" in shown.index and "sciq" in shown.columns
    logs = pd.DataFrame({"run_id": "eavss-s0", "arm": "eavss", "step": [1, 2, 3], "loss_con": [1.0, 0.8, 0.5],
                         "loss_lm": [2.0, 1.9, 1.8]})
    run_metrics = mit.summarise_runs(pe, n_resamples=200)
    per_run = rep.per_run_table(run_metrics, "accuracy")
    assert list(per_run.index) == list(dict.fromkeys(pe["run_id"])) and list(per_run.columns) == ["sciq"]
    with pytest.raises(DataError, match="no per-run metric"):
        rep.per_run_table(run_metrics, "alias_hallucination_rate")  # no open-QA data set here
    for fig in (rep.scores_figure(table), rep.reliability_figure(pe), rep.training_curves(logs)):
        assert fig.axes


def test_upstream_options_follow_notebook_04(tmp_path: Path) -> None:
    from avss_lib.core.io import write_json, write_table

    folder = tmp_path / "04_hallucination_layers"
    write_json({**EAVSS, "label_convention": "alias_containment"}, folder / "eavss_layers.json")
    write_json({"answer_settings": {"sciq": {"sciq_with_support": True}, "wikiqa": {"wikiqa_scoring": "loglik_norm"}}},
               folder / "meta.json")
    assert mit.upstream_eval_options(tmp_path) == {"label_convention": "alias_containment", "sciq_with_support": True,
                                                   "wikiqa_scoring": "loglik_norm"}
    write_table(_answers(_benchmarks()), folder / "answers.parquet")
    answers, layers, scores = mit.load_upstream(tmp_path)
    assert layers["pooled"] == [3, 1] and scores is None and len(answers) == 5 * 8
    with pytest.raises(DataError, match="does not exist: run the notebook"):
        mit.load_upstream(tmp_path / "elsewhere")


def test_central_alias_prefers_the_canonical_name() -> None:
    assert mit.central_alias(("Born to Be Wild (Ozzy Osbourne Cover)", "Born to Be Wild", "Born To Be Wild",
                              "Born to be wild")) == "Born to Be Wild"
    assert mit.central_alias(("Paul Gaugin", "Eugene Henri Paul Gauguin", "Paul Gauguin", "Gauguin",
                              "Eugène Henri Paul Gauguin")) == "Paul Gauguin"
    assert mit.central_alias(("Paris",)) == "Paris"
    assert mit.central_alias(("a b", "c d")) == "a b"  # no overlap: the first


def test_eval_dtype_evaluates_a_cast_copy(tmp_path: Path, monkeypatch) -> None:
    examples, sets, ppl, _, _ = _pipeline(tmp_path, arms=("base",))
    model = tiny_model("llama", N_LAYERS)
    before = _weights_hash(model)
    seen = []
    real = mit.answer_benchmark
    monkeypatch.setattr(mit, "answer_benchmark",
                        lambda m, *a, **k: seen.append(next(m.parameters()).dtype) or real(m, *a, **k))
    per_example, perplexity = mit.evaluate_model(model, TOK, sets, ppl, _settings(eval_dtype="bfloat16"))
    assert set(seen) == {torch.bfloat16} and len(per_example) == sum(len(b.examples) for b in sets.values())
    assert next(model.parameters()).dtype == torch.float32 and _weights_hash(model) == before  # untouched
    seen.clear()
    mit.evaluate_model(model, TOK, sets, None, _settings())
    assert set(seen) == {torch.float32}
    with pytest.raises(ConfigError, match="eval_dtype"):
        _settings(eval_dtype="float8").validate(N_LAYERS)
