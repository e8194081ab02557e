"""Chapter 05 on tiny models and in-memory data: split, training examples, arms, runs and resumption, the
paired bootstrap, the E2 rule as data, tables, figures and phrases — each against hand-computed values."""

from __future__ import annotations

import hashlib
from dataclasses import replace
import itertools
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest
import torch

from avss_lib.core import perplexity as perplexity_module
from avss_lib.core.artifacts import (ANSWERS, EAVSS_LAYERS, MITIGATION_PER_EXAMPLE, PROVENANCE_04, QUESTION_SPLIT,
                                     RUN_CHECKPOINT, RUN_RESULT, RUNS, TRAIN_LOGS, mitigation_run_dir)
from avss_lib.core.benchmarks import Benchmark, Example
from avss_lib.core.errors import ConfigError, DataError
from avss_lib.core.metrics import reliability_bins
from avss_lib.core.splits import EVALUATION, SELECTION, normalize_question, split_datasets
from avss_lib.core.tasks import PROMPTS
from avss_lib.hallucination.answers import shots_by_id
from avss_lib.mitigation import arms as am
from avss_lib.mitigation import figures, prose, runs, tables
from avss_lib.mitigation import outcomes as oc
from avss_lib.mitigation import training_data as td
from avss_lib.mitigation import verdict as vd
from avss_lib.mitigation.stage import load_upstream, upstream_eval_options
from avss_lib.testing.tiny_models import tiny_model, tiny_tokenizer

TOK = tiny_tokenizer()
N_LAYERS = 4
# one tiny llama layer: q 16x16 + k 16x8 + v 16x8 + o 16x16 + gate/up/down 3 x 16x32 + two RMSNorm weights of 16
PARAMS_PER_LAYER = 256 + 128 + 128 + 256 + 3 * 512 + 2 * 16


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


def _prompt(name: str, e: Example) -> str:
    key = {"sciq": "sciq_closed_book", "truthfulqa_mc": "truthfulqa"}.get(name, name)
    return PROMPTS[key].format(question=e.question)


def _answers(benchmarks: dict[str, Benchmark], wrong_every: int = 2) -> pd.DataFrame:
    """A fake chapter-04 answers table: every ``wrong_every``-th example is a hallucination."""
    rows = []
    for name in td.DATASETS:
        for i, e in enumerate(benchmarks[name].examples):
            wrong = i % wrong_every == 0
            if name in td.OPEN_QA:
                pred = f"Wrong{i}" if wrong else e.answers[0]
            elif name == "wikiqa":
                pred = e.choices[1] if wrong else e.choices[0]
            elif name == "sciq":
                pred = e.choices[0] if wrong else e.choices[e.label]
            else:  # truthfulqa_mc
                pred = e.choices[1] if wrong else e.choices[0]
            rows.append({"dataset": name, "id": e.id, "question": e.question, "prediction": pred,
                         "confidence": 0.5, "correct": not wrong, "correct_exact_match": not wrong,
                         "correct_alias_containment": not wrong, "prompt": _prompt(name, e), "choice": None,
                         "gold": ""})
    return pd.DataFrame(rows)


EAVSS = {"k": 2, "site": "block_output", "per_dataset": {d: [3, 1] for d in td.DATASETS}, "pooled": [3, 1],
         "excluded": [], "lowest_avss": [0, 2]}
AVSS_SCORES = pd.DataFrame({"variant": "block_rel", "layer": range(N_LAYERS), "rank": [2, 4, 1, 3]})


def _settings(**overrides: object) -> am.MitigationSettings:
    base: dict[str, object] = {"k": 2, "steps": 2, "lr": 1e-2, "batch_size": 2, "seeds": (0,), "random_draws": 3,
                               "max_negatives": 2, "train_max_length": 64, "eval_batch_size": 4, "ppl_chars": 300,
                               "ppl_max_length": 64}
    return am.MitigationSettings(**(base | overrides))  # type: ignore[arg-type]


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
        am.random_layers(N_LAYERS, 5, draw=0)
    with pytest.raises(ConfigError, match="k=5"):
        am.eavss_top_k(EAVSS, 5, N_LAYERS)


def test_k_larger_than_chapter_04_selection_raises() -> None:
    with pytest.raises(ConfigError, match="chapter 04 selected only 2"):
        am.eavss_top_k(EAVSS, 3, N_LAYERS)


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
    split = split_datasets(answers, td.DATASETS, seed=0)
    with pytest.raises(DataError, match=r"\['nq_open'\] have no hallucinated answer"):
        td.build_training_frame(answers, split, bench)


def test_missing_dataset_columns_prompts_and_a_foreign_split_raise() -> None:
    bench = _benchmarks()
    answers = _answers(bench)
    split = split_datasets(answers, td.DATASETS, seed=0)
    with pytest.raises(DataError, match="no rows for"):
        td.split_for(split, answers[answers["dataset"] != "sciq"], td.DATASETS)
    with pytest.raises(DataError, match="lacks column"):
        td.split_for(split, answers.drop(columns=["correct_alias_containment"]), td.DATASETS)
    with pytest.raises(DataError, match="question split of sciq does not match"):
        td.split_for(split.drop(index=split.index[split["dataset"] == "sciq"][0]), answers, td.DATASETS)
    with pytest.raises(DataError, match="has an empty side"):
        td.split_for(split.assign(split=SELECTION), answers, td.DATASETS)
    assert td.split_for(split, answers, ["sciq"])["dataset"].eq("sciq").all()
    answers.loc[3, "prompt"] = ""
    with pytest.raises(DataError, match="have no prompt"):
        td.split_for(split, answers, td.DATASETS)


def test_ids_from_another_split_raise() -> None:
    bench = _benchmarks()
    answers = _answers(bench)
    answers.loc[answers["dataset"] == "sciq", "id"] = answers.loc[answers["dataset"] == "sciq", "id"].str.replace(
        "validation", "test")
    split = split_datasets(answers, td.DATASETS)
    with pytest.raises(DataError, match="load the split chapter 04 used"):
        td.build_training_frame(answers, split, bench)


# ------------------------------------------------------------------------------------------ split & examples


def test_split_is_question_disjoint_and_seeded() -> None:
    bench = _benchmarks(12)
    answers = _answers(bench)
    # a re-cased, re-punctuated duplicate of one question must land on the same side
    dup = answers[answers["dataset"] == "nq_open"].iloc[[0]].assign(id="nq_open-dup", question="WHO is person 0?!")
    answers = pd.concat([answers, dup], ignore_index=True)
    split = split_datasets(answers, td.DATASETS, evaluation_fraction=0.5, seed=3)
    for _, part in split.groupby("dataset"):
        train = set(part[part["split"] == SELECTION]["question"].map(normalize_question))
        held = set(part[part["split"] == EVALUATION]["question"].map(normalize_question))
        assert train and held and not train & held
    assert split.set_index("id").loc["nq_open-dup", "split"] == split.set_index("id").loc["nq_open-0", "split"]
    assert (split[split["dataset"] == "sciq"]["split"] == EVALUATION).sum() == 6  # round(0.5 * 12)
    again = split_datasets(answers.sample(frac=1, random_state=1), td.DATASETS, evaluation_fraction=0.5, seed=3)
    key = ["dataset", "id"]
    assert split.sort_values(key)["split"].tolist() == again.sort_values(key)["split"].tolist()
    other = split_datasets(answers, td.DATASETS, evaluation_fraction=0.5, seed=4)
    assert split.sort_values(key)["split"].tolist() != other.sort_values(key)["split"].tolist()


def test_training_examples_use_own_hallucinations_and_truthfulqa_incorrect_answers() -> None:
    bench = _benchmarks()
    answers = _answers(bench)
    # an answer accepted by alias containment only must not become a negative
    mask = (answers["dataset"] == "triviaqa") & (answers["id"] == "triviaqa-2")
    answers.loc[mask, ["prediction", "correct", "correct_exact_match", "correct_alias_containment"]] = [
        "the Thing2 one", False, False, True]
    split = split_datasets(answers, td.DATASETS, seed=0)
    frame = td.build_training_frame(answers, split, bench, max_negatives=2)
    assert set(frame["id"]) == set(split[split["split"] == SELECTION]["id"])  # only the selection half
    for row in frame[frame["dataset"] == "nq_open"].itertuples():
        i = int(row.id.split("-")[1])
        assert row.positive == f" Name{i}"
        assert row.negatives == ([f" Wrong{i}"] if i % 2 == 0 else [])
        assert row.usable == (i % 2 == 0)
        assert row.prompt == f"Answer these questions:\nQ: who is person {i}?\nA:"  # chapter 04's prompt column
    trivia = frame[frame["dataset"] == "triviaqa"].set_index("id")
    for i in range(8):
        if f"triviaqa-{i}" in trivia.index:
            expected = [] if i == 2 or i % 2 else [f" Wrong{i}"]
            assert trivia.loc[f"triviaqa-{i}", "negatives"] == expected
    tqa = frame[frame["dataset"] == "truthfulqa_mc"]
    assert tqa["usable"].all()  # TruthfulQA's own incorrect answers, whatever the model chose
    assert all(r.positive == " No" and r.negatives == [" Yes", " Always"] for r in tqa.itertuples())
    wiki = frame[frame["dataset"] == "wikiqa"]
    assert all(r.negatives == ([" Fish swim."] if r.hallucinated else []) for r in wiki.itertuples())
    sciq = frame[frame["dataset"] == "sciq"]
    assert (sciq["positive"] == " oxygen").all()
    assert all(r.negatives == ([" neon"] if r.hallucinated else []) for r in sciq.itertuples())
    with_prompt = td.build_training_frame(answers.assign(prompt="CTX " + answers["id"]), split, bench)
    assert (with_prompt["prompt"] == "CTX " + with_prompt["id"]).all()  # chapter 04's exact context
    examples = td.to_examples(frame)
    used = frame[frame["usable"]]
    assert [e.id for e in examples] == [f"{r.dataset}:{r.id}" for r in used.itertuples()]
    assert [list(e.negatives) for e in examples] == used["negatives"].tolist()


def test_no_evaluation_label_reaches_training() -> None:
    """Flipping every evaluation-half label (and answer) changes neither the training examples nor which
    examples are scored: training reads the selection half only."""
    bench = _benchmarks(12)
    answers = _answers(bench)
    split = split_datasets(answers, td.DATASETS, seed=0)
    evaluation = set(zip(split.loc[split["split"] == EVALUATION, "dataset"], split.loc[split["split"] == EVALUATION, "id"]))
    flipped = answers.copy()
    mask = [(d, i) in evaluation for d, i in zip(answers["dataset"], answers["id"])]
    for column in ("correct", "correct_exact_match", "correct_alias_containment"):
        flipped.loc[mask, column] = ~flipped.loc[mask, column].astype(bool)
    flipped.loc[mask, "prediction"] = "changed"
    frame = td.build_training_frame(answers, split, bench)
    pd.testing.assert_frame_equal(td.build_training_frame(flipped, split, bench), frame)
    assert not evaluation & set(zip(frame["dataset"], frame["id"]))
    scored = {(name, e.id) for name, b in td.eval_benchmarks(split, bench).items() for e in b.examples}
    assert scored <= evaluation and scored


def test_eval_sets_are_the_held_out_side_subsampled_in_order() -> None:
    bench = _benchmarks(12)
    answers = _answers(bench)
    split = split_datasets(answers, td.DATASETS, seed=0)
    full = td.eval_benchmarks(split, bench, n_eval=None)
    capped = td.eval_benchmarks(split, bench, n_eval=4, seed=0)
    for name, b in capped.items():
        held = split[(split["dataset"] == name) & (split["split"] == EVALUATION)]["id"].tolist()
        assert [e.id for e in full[name].examples] == held  # the held-out side, in split order
        keep = np.sort(np.random.default_rng(0).permutation(len(held))[:4])  # the subsample before the refactor
        assert [e.id for e in b.examples] == [held[i] for i in keep]
        assert b.provenance["held_out"] == 4 and b.provenance["n_eval"] == 4
    assert [e.id for e in td.eval_benchmarks(split, bench, n_eval=50)["sciq"].examples] == \
        [e.id for e in full["sciq"].examples]  # a cap above the held-out size keeps them all


def test_central_alias_prefers_the_canonical_name() -> None:
    assert td.central_alias(("Born to Be Wild (Ozzy Osbourne Cover)", "Born to Be Wild", "Born To Be Wild",
                             "Born to be wild")) == "Born to Be Wild"
    assert td.central_alias(("Paul Gaugin", "Eugene Henri Paul Gauguin", "Paul Gauguin", "Gauguin",
                             "Eugène Henri Paul Gauguin")) == "Paul Gauguin"
    assert td.central_alias(("Paris",)) == "Paris"
    assert td.central_alias(("a b", "c d")) == "a b"  # no overlap: the first


def test_perplexity_prefix(tmp_path: Path, monkeypatch) -> None:
    bench = _benchmarks()
    monkeypatch.setattr(td, "load_benchmark", lambda name, data_root=None: bench[name])
    ppl = td.perplexity_benchmark(None, 10)
    assert ppl.examples[0].text == "The quick " and ppl.provenance["chars"] == 10
    assert td.perplexity_benchmark(None, 0) is None


# ------------------------------------------------------------------------------------------ arms


def test_arm_layers_and_plan() -> None:
    settings = _settings(seeds=(0, 1))
    layers = am.arm_layers(settings, N_LAYERS, EAVSS, AVSS_SCORES, "block_rel", layer_seed=7)
    assert layers["eavss"] == [(3, 1)] and layers["lm_only"] == [(3, 1)]
    assert layers["lowest_avss"] == [(0, 2)]  # ranks 1 and 2
    assert layers["all"] == [(0, 1, 2, 3)]
    draws = layers["random"]
    assert len(draws) == 3 and all(len(set(d)) == 2 and all(0 <= i < N_LAYERS for i in d) for d in draws)
    assert draws == am.arm_layers(settings, N_LAYERS, EAVSS, AVSS_SCORES, "block_rel", layer_seed=7)["random"]
    planned = am.plan_runs(settings, layers)
    assert [r.run_id for r in planned] == [
        "base", "eavss-s0", "eavss-s1", "random-d0-s0", "random-d1-s0", "random-d2-s0", "random-d0-s1",
        "random-d1-s1", "random-d2-s1", "lowest_avss-s0", "lowest_avss-s1", "all-s0", "all-s1", "lm_only-s0",
        "lm_only-s1", "iti"]  # the untrained intervention runs once, whatever the seeds
    assert planned[-1].layers == (3, 1) and layers["iti"] == layers["eavss"]
    assert [r.lambda_con for r in planned if r.arm == "lm_only"] == [0.0, 0.0]
    assert all(r.lambda_con == settings.lambda_con for r in planned if r.arm in ("eavss", "random"))
    with pytest.raises(ConfigError, match="identical to lm_only"):
        am.plan_runs(_settings(lambda_con=0.0), layers)


def test_random_draws_differ_and_are_pure() -> None:
    draws = [tuple(am.random_layers(30, 7, d, seed=42)) for d in range(5)]
    assert len(set(draws)) == 5 and all(d == tuple(sorted(set(d))) for d in draws)
    assert am.random_layers(30, 7, 3, seed=42) == list(draws[3])
    assert am.random_layers(4, 4, 0) == [0, 1, 2, 3]


def test_lowest_avss_layers_come_from_the_ranking_and_match_the_model() -> None:
    assert am.lowest_avss_arm_layers(AVSS_SCORES, "block_rel", 3, N_LAYERS) == [0, 2, 3]
    with pytest.raises(ConfigError, match="no AVSS variant 'nope'"):
        am.lowest_avss_arm_layers(AVSS_SCORES, "nope", 2, N_LAYERS)
    with pytest.raises(DataError, match="scored 4 layers but the model has 6"):
        am.lowest_avss_arm_layers(AVSS_SCORES, "block_rel", 2, 6)


def test_budget_table_counts_parameters() -> None:
    model = tiny_model("llama", N_LAYERS)
    settings = _settings()
    planned = am.plan_runs(settings, am.arm_layers(settings, N_LAYERS, EAVSS, AVSS_SCORES, "block_rel"))
    table = am.runs_table(planned, model).set_index("run_id")
    assert table.loc["eavss-s0", "trainable_params"] == 2 * PARAMS_PER_LAYER
    assert table.loc["all-s0", "trainable_params"] == N_LAYERS * PARAMS_PER_LAYER
    assert table.loc["base", "trainable_params"] == 0 and table.loc["base", "layers"] == []
    assert table.loc["iti", "trainable_params"] == 0 and table.loc["iti", "n_layers_trained"] == 0
    assert table.loc["iti", "layers"] == [3, 1]  # the layers it shifts, untrained
    assert table.loc["eavss-s0", "layers"] == [3, 1] and (table["model_layers"] == N_LAYERS).all()
    shown = tables.budget_table(table.reset_index())
    assert shown.loc["eavss-s0", "layers"] == "3, 1" and shown.loc["base", "layers"] == "—"
    phrase = prose.budget_phrase(table.reset_index())
    assert phrase == ("top-k EAVSS: 4,672; k random: 4,672; k lowest AVSS: 4,672; all layers: 9,344; LM term only "
                      "(EAVSS layers): 4,672. The arms that train k layers train exactly the same number of "
                      "parameters, and the all-layers arm trains more by construction.")


# ------------------------------------------------------------------------------------------ end to end


def _pipeline(arms: tuple[str, ...] = am.ARMS, seeds: tuple[int, ...] = (0,)):
    bench = _benchmarks(8)
    answers = _answers(bench)
    split = split_datasets(answers, td.DATASETS, seed=0)
    frame = td.build_training_frame(answers, split, bench, max_negatives=2)
    examples = td.to_examples(frame)
    sets = td.eval_benchmarks(split, bench, n_eval=3, seed=0)
    unit = [1.0] + [0.0] * 15  # the tiny models' hidden size is 16
    settings = _settings(arms=arms, seeds=seeds, iti_alpha=2.0,
                         iti_vectors={str(layer): {"direction": unit, "sigma": 1.0} for layer in range(N_LAYERS)})
    planned = am.plan_runs(settings, am.arm_layers(settings, N_LAYERS, EAVSS, AVSS_SCORES, "block_rel"))
    return examples, sets, bench["wikitext2"], settings, planned


def test_every_arm_starts_from_the_same_base_weights_and_resumes(tmp_path: Path, monkeypatch) -> None:
    examples, sets, ppl, settings, planned = _pipeline()
    model = tiny_model("llama", N_LAYERS)
    base_hash = _weights_hash(model)
    seen: list[tuple[str, tuple[int, ...], float]] = []
    real_train = runs.train

    def spy(model, tokenizer, examples, config, **kwargs):
        seen.append((_weights_hash(model), config.layers, config.lambda_con))
        return real_train(model, tokenizer, examples, config, **kwargs)

    monkeypatch.setattr(runs, "train", spy)
    result = runs.run_all(model, TOK, planned, examples, sets, ppl, settings, tmp_path, progress=False)
    assert [layers for _, layers, _ in seen] == [r.layers for r in planned if r.arm in am.TRAINED_ARMS]
    assert all(h == base_hash for h, _, _ in seen)
    assert _weights_hash(model) == base_hash  # restored at the end
    assert {lc for _, layers, lc in seen if layers == (3, 1)} == {0.0, settings.lambda_con}
    per_example = MITIGATION_PER_EXAMPLE.read(tmp_path)
    assert len(per_example) == len(planned) * sum(len(b.examples) for b in sets.values())
    assert per_example.groupby("run_id")["id"].apply(tuple).nunique() == 1  # every run on the same examples
    assert RUNS.read(tmp_path)["layers"].tolist() == [list(r.layers) for r in planned]
    assert sorted(TRAIN_LOGS.read(tmp_path)["step"].tolist()) == sorted([1, 2] * (len(planned) - 2))  # not base, iti
    assert result.runs["perplexity"].gt(1).all()
    assert not any(mitigation_run_dir(tmp_path, r.run_id).joinpath(RUN_CHECKPOINT).exists() for r in planned)
    trained = result.per_example[result.per_example["arm"] == "all"].set_index(["dataset", "id"])["confidence"]
    base = result.per_example[result.per_example["arm"] == "base"].set_index(["dataset", "id"])["confidence"]
    assert not np.allclose(trained.loc[base.index], base)  # training changed the model
    shifted = result.per_example[result.per_example["arm"] == "iti"].set_index(["dataset", "id"])["confidence"]
    assert not np.allclose(shifted.loc[base.index], base)  # the untrained shift changed the answers' scores
    assert result.runs.set_index("run_id").loc["iti", "trainable_params"] == 0

    def fail(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(runs, "train", fail)
    again = runs.run_all(model, TOK, planned, examples, sets, ppl, settings, tmp_path, progress=False)
    assert again.runs["reused"].all()
    pd.testing.assert_frame_equal(again.per_example, result.per_example)


def test_perplexity_windows_batched_score_as_one_at_a_time(monkeypatch) -> None:
    _, sets, ppl, settings, _ = _pipeline(arms=("base",))
    model = tiny_model("llama", N_LAYERS)
    batches: list[int] = []
    real = perplexity_module._window_nll

    def counting(model, inputs, *args):
        batches.append(len(inputs))
        return real(model, inputs, *args)

    monkeypatch.setattr(perplexity_module, "_window_nll", counting)
    scores, forwards = {}, {}
    for batch in (1, 3):
        one = replace(settings, ppl_max_length=64, ppl_batch_size=batch)
        one.validate(N_LAYERS)
        batches.clear()
        scores[batch] = runs.evaluate_model(model, TOK, {"sciq": sets["sciq"]}, ppl, one)[1]
        forwards[batch] = list(batches)
    assert max(forwards[1]) == 1 and max(forwards[3]) == 3  # the setting reaches the perplexity pass
    assert sum(forwards[3]) == len(forwards[1]) and len(forwards[3]) == -(-len(forwards[1]) // 3)
    assert scores[1]["n_tokens"] == scores[3]["n_tokens"] > 3 * 64  # several windows, the last one padded in its batch
    assert scores[3]["value"] == pytest.approx(scores[1]["value"], rel=1e-5)
    assert scores[3]["low"] == pytest.approx(scores[1]["low"], rel=1e-5)
    with pytest.raises(ConfigError, match="ppl_batch_size=0 must be >= 1"):
        replace(settings, ppl_batch_size=0).validate(N_LAYERS)


def test_runs_of_a_worker_share_are_what_the_serial_pass_reads(tmp_path: Path, monkeypatch) -> None:
    examples, sets, ppl, settings, planned = _pipeline(arms=("base", "eavss", "random"))
    model = tiny_model("llama", N_LAYERS)
    serial = runs.run_all(model, TOK, planned, examples, sets, ppl, settings, tmp_path / "serial", progress=False)
    for share in (planned[::2], planned[1::2]):  # what two workers would each run (core/workers.py)
        runs.run_share(tiny_model("llama", N_LAYERS), TOK, share, examples=examples, eval_sets=sets, ppl=ppl,
                       settings=settings, run_dir=tmp_path / "workers")

    def fail(*args, **kwargs):
        raise AssertionError("a run the workers finished was trained again")

    monkeypatch.setattr(runs, "train", fail)
    read = runs.run_all(model, TOK, planned, examples, sets, ppl, settings, tmp_path / "workers", progress=False)
    assert read.runs["reused"].all()
    pd.testing.assert_frame_equal(read.per_example, serial.per_example)


def test_interrupted_run_resumes_from_finished_arms(tmp_path: Path, monkeypatch) -> None:
    examples, sets, ppl, settings, planned = _pipeline(arms=("base", "eavss", "lm_only"))
    model = tiny_model("llama", N_LAYERS)
    real_eval = runs.evaluate_model
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_eval(*args, **kwargs)

    monkeypatch.setattr(runs, "evaluate_model", flaky)
    with pytest.raises(KeyboardInterrupt):
        runs.run_all(model, TOK, planned, examples, sets, ppl, settings, tmp_path, progress=False)
    assert (mitigation_run_dir(tmp_path, "base") / RUN_RESULT).is_file()
    assert not (mitigation_run_dir(tmp_path, "eavss-s0") / RUN_RESULT).is_file()
    assert (mitigation_run_dir(tmp_path, "eavss-s0") / RUN_CHECKPOINT / "checkpoint.pt").is_file()  # trained
    monkeypatch.setattr(runs, "evaluate_model", real_eval)
    result = runs.run_all(tiny_model("llama", N_LAYERS), TOK, planned, examples, sets, ppl, settings, tmp_path,
                          progress=False)
    assert result.runs.set_index("run_id")["reused"].to_dict() == {"base": True, "eavss-s0": False, "lm_only-s0": False}
    assert list(result.logs[result.logs["run_id"] == "eavss-s0"]["step"]) == [1, 2]  # resumed, not retrained


def test_changed_settings_recompute_a_finished_run(tmp_path: Path) -> None:
    examples, sets, ppl, settings, planned = _pipeline(arms=("base", "eavss"))
    model = tiny_model("llama", N_LAYERS)
    runs.run_all(model, TOK, planned, examples, sets, ppl, settings, tmp_path, progress=False)
    more = _settings(arms=("base", "eavss"), steps=3)
    planned2 = am.plan_runs(more, am.arm_layers(more, N_LAYERS, EAVSS, AVSS_SCORES, "block_rel"))
    result = runs.run_all(model, TOK, planned2, examples, sets, ppl, more, tmp_path, progress=False)
    # the untouched model does not depend on the training budget; the trained arm does
    assert result.runs.set_index("run_id")["reused"].to_dict() == {"base": True, "eavss-s0": False}
    assert list(result.logs["step"]) == [1, 2, 3]


def test_eval_dtype_evaluates_a_cast_copy(monkeypatch) -> None:
    examples, sets, ppl, _, _ = _pipeline(arms=("base",))
    model = tiny_model("llama", N_LAYERS)
    before = _weights_hash(model)
    seen = []
    real = runs.answer_benchmark
    monkeypatch.setattr(runs, "answer_benchmark",
                        lambda m, *a, **k: seen.append(next(m.parameters()).dtype) or real(m, *a, **k))
    per_example, perplexity = runs.evaluate_model(model, TOK, sets, ppl, _settings(eval_dtype="bfloat16"))
    assert seen == [torch.bfloat16] * len(sets) and len(per_example) == sum(len(b.examples) for b in sets.values())
    assert next(model.parameters()).dtype == torch.float32 and _weights_hash(model) == before  # untouched
    seen.clear()
    _, skipped = runs.evaluate_model(model, TOK, sets, None, _settings())
    assert seen == [torch.float32] * len(sets) and skipped == {"value": None, "low": None, "high": None, "n_tokens": 0}
    with pytest.raises(ConfigError, match="eval_dtype"):
        _settings(eval_dtype="float8").validate(N_LAYERS)


# ------------------------------------------------------------------------------------------ outcomes


def _per_example(arms: dict[str, list[list[int]]], dataset: str = "sciq", confidence: float = 0.6) -> pd.DataFrame:
    """Per-example rows from ``{arm: [correct vector of each run]}``."""
    rows = []
    for arm, run_vectors in arms.items():
        for j, correct in enumerate(run_vectors):
            for i, c in enumerate(correct):
                rows.append({"run_id": f"{arm}-{j}", "arm": arm, "dataset": dataset, "id": f"s{i}",
                             "correct": bool(c), "confidence": confidence, "prediction": "x",
                             "alias_containment": np.nan})
    return pd.DataFrame(rows)


def test_metric_values_hand_computed() -> None:
    correct, conf = np.array([1.0, 0.0, 1.0, 1.0]), np.full(4, 0.6)
    assert oc.metric_value("accuracy", correct, conf) == 75.0
    assert oc.metric_value("hallucination_rate", correct, conf) == 25.0
    assert oc.metric_value("ece", correct, conf) == pytest.approx(15.0)  # one bin: |0.75 - 0.6|
    run_metrics = oc.summarise_runs(_per_example({"base": [[1, 0, 1, 1]]}), n_resamples=100).set_index("metric")
    assert run_metrics.loc["accuracy", "value"] == 75.0 and run_metrics.loc["ece", "value"] == pytest.approx(15.0)
    assert "alias_hallucination_rate" not in run_metrics.index  # not an open-QA data set


def test_paired_difference_hand_computed_cases() -> None:
    same = _per_example({"a": [[1, 0, 1]], "b": [[1, 0, 1]]})
    assert oc.paired_difference(same, "a", "b", "sciq", "accuracy") == (0.0, 0.0, 0.0)
    # one example differs: the difference is 100 * (times example 0 is drawn) / 2 in {0, 50, 100}, with
    # probabilities 1/4, 1/2, 1/4, so the 95% interval is [0, 100]
    one = _per_example({"a": [[1, 1]], "b": [[0, 1]]})
    assert oc.paired_difference(one, "a", "b", "sciq", "accuracy", n_resamples=2000) == (50.0, 0.0, 100.0)
    # ECE with a constant confidence of 0.6: all correct 40, all wrong 60; resampling cannot change either
    ece = _per_example({"a": [[1, 1, 1]], "b": [[0, 0, 0]]})
    value, low, high = oc.paired_difference(ece, "a", "b", "sciq", "ece", n_resamples=50)
    assert value == pytest.approx(-20.0) and low == pytest.approx(-20.0) and high == pytest.approx(-20.0)


def test_paired_difference_resamples_an_arms_runs() -> None:
    # arm a: one run always right, one always wrong (mean 50); b always wrong. Resampling the examples changes
    # nothing; resampling a's two runs gives 0, 50 or 100 with probabilities 1/4, 1/2, 1/4
    pe = _per_example({"a": [[1, 1, 1, 1], [0, 0, 0, 0]], "b": [[0, 0, 0, 0]]})
    assert oc.paired_difference(pe, "a", "b", "sciq", "accuracy", n_resamples=2000) == (50.0, 0.0, 100.0)
    value, low, high = oc.paired_difference(pe, "a", "b", "sciq", "accuracy", n_resamples=2000, confidence_level=0.4)
    assert (value, low, high) == (50.0, 50.0, 50.0)  # the central 40% is all 50


def test_arm_table_hand_computed() -> None:
    pe = _per_example({"base": [[1, 0, 0, 0]], "eavss": [[1, 1, 1, 0]], "random": [[1, 1, 1, 1], [0, 0, 0, 0]]})
    table = oc.arm_table(pe, n_resamples=200).set_index(["arm", "metric"])
    assert table.loc[("base", "accuracy"), "value"] == 25.0 and np.isnan(table.loc[("base", "accuracy"), "diff"])
    assert table.loc[("eavss", "accuracy"), "diff"] == 50.0
    assert table.loc[("eavss", "accuracy"), "rel_change"] == 200.0  # (75 - 25) / 25
    assert table.loc[("eavss", "hallucination_rate"), "rel_change"] == pytest.approx(-100 * 50 / 75)
    assert table.loc[("random", "accuracy"), "value"] == 50.0 and table.loc[("random", "accuracy"), "n_runs"] == 2
    assert table.loc[("eavss", "ece"), "value"] == pytest.approx(15.0)  # |0.75 - 0.6|
    # the rates' intervals are Wilson's on the questions' run-averaged shares: random's are 1/2 on every question
    z2 = 1.959963984540054 ** 2
    half = (1.959963984540054 / (1 + z2 / 4)) * np.sqrt(0.25 / 4 + z2 / 64)
    assert table.loc[("random", "accuracy"), ["low", "high"]].tolist() == pytest.approx([100 * (0.5 - half),
                                                                                         100 * (0.5 + half)])
    assert table.loc[("random", "hallucination_rate"), "low"] == pytest.approx(100 * (0.5 - half))


def test_comparisons_level_and_minimum_effect() -> None:
    pe = _per_example({"eavss": [[1] * 30], "random": [[0] * 30], "lm_only": [[1] * 15 + [0] * 15]})
    comp = oc.comparisons(pe, n_resamples=200).set_index(["metric", "other"])
    assert (comp["level"] == 1 - 0.05 / 2).all()  # one data set, two metrics
    assert comp.loc[("accuracy", "random"), ["diff", "low", "high"]].tolist() == [100.0, 100.0, 100.0]
    assert comp.loc[("accuracy", "random"), "beats"] and comp.loc[("ece", "random"), "beats"]  # ECE 40 vs 60
    strict = oc.comparisons(pe, n_resamples=200, min_effect=150).set_index(["metric", "other"])
    assert not strict["beats"].any() and not strict["beaten"].any()
    no_controls = oc.comparisons(pe[pe["arm"] == "eavss"], n_resamples=10)
    assert no_controls.empty and list(no_controls.columns) == list(oc.comparisons(pe, n_resamples=10).columns)
    with pytest.raises(DataError, match="no results for arm 'eavss'"):
        oc.comparisons(pe[pe["arm"] != "eavss"])


# ------------------------------------------------------------------------------------------ the E2 rule


def _comp(cells: dict[tuple[str, str, str], tuple[bool, bool]]) -> pd.DataFrame:
    """A comparisons table from ``{(dataset, metric, other): (beats, beaten)}``."""
    return pd.DataFrame([{"dataset": d, "metric": m, "other": o, "diff": 1.0 if b else -1.0 if l else 0.0,
                          "low": 0.5 if b else -2.0, "high": 2.0 if b else -0.5 if l else 0.5, "level": 0.975,
                          "min_effect": 0.5, "beats": b, "beaten": l} for (d, m, o), (b, l) in cells.items()],
                        columns=["dataset", "metric", "other", "diff", "low", "high", "level", "min_effect", "beats",
                                 "beaten"])


def _old_rule(comp: pd.DataFrame, against=("random", "lm_only")) -> str:
    """The rule as it was written before the refactor (report.e2_outcome + CLAIM_VERDICT)."""
    if comp.empty:
        return "inconclusive"
    wins = [k for k, g in comp.groupby(["dataset", "metric"]) if g["beats"].all() and set(g["other"]) >= set(against)]
    losses = comp[comp["beaten"]]
    if wins and losses.empty:
        return "holds"
    if len(losses) and not wins:
        return "does not hold"
    return "inconclusive"


EMPTY_TABLE = pd.DataFrame(columns=["arm", "dataset", "metric", "value", "diff", "diff_low", "diff_high", "rel_change"])


def test_e2_rule_outcomes_as_data() -> None:
    win = _comp({("sciq", "accuracy", "random"): (True, False), ("sciq", "accuracy", "lm_only"): (True, False)})
    [v] = vd.e2_verdicts(win, EMPTY_TABLE)
    assert (v.claim, v.subject, v.outcome, v.analysis) == ("E2", "eavss, per data set", "holds", "exploratory")
    assert v.condition("better than random", "sciq/accuracy") == vd.Condition(
        "better than random", met=True, value=1.0, threshold=0.5, low=0.5, high=2.0, group="sciq/accuracy")
    assert not v.condition("worse than lm_only", "sciq/accuracy").met
    assert v.condition("random run", "random").met and v.numbers["pairs_won"] == 1.0
    assert vd.e2_reading(v.conditions) == "supported"
    half = _comp({("sciq", "accuracy", "random"): (True, False), ("sciq", "accuracy", "lm_only"): (False, False)})
    assert vd.e2_verdicts(half, EMPTY_TABLE)[0].outcome == "inconclusive"
    assert vd.e2_reading(vd.e2_verdicts(half, EMPTY_TABLE)[0].conditions) == "not resolved"
    lost = _comp({("sciq", "ece", "random"): (False, True), ("sciq", "ece", "lm_only"): (False, False)})
    [v] = vd.e2_verdicts(lost, EMPTY_TABLE)
    assert v.outcome == "does not hold" and v.numbers["comparisons_lost"] == 1.0
    mixed = pd.concat([win, lost], ignore_index=True)
    assert vd.e2_reading(vd.e2_verdicts(mixed, EMPTY_TABLE)[0].conditions) == "mixed"
    only_random = _comp({("sciq", "accuracy", "random"): (True, False)})  # lm_only not run: no pair can be won
    [v] = vd.e2_verdicts(only_random, EMPTY_TABLE)
    assert v.outcome == "inconclusive" and not v.condition("lm_only run", "lm_only").met
    [v] = vd.e2_verdicts(_comp({}), EMPTY_TABLE)
    assert v.outcome == "inconclusive" and [c.met for c in v.conditions] == [False, False]


def test_e2_rule_is_the_rule_before_the_refactor() -> None:
    keys = [(d, m, o) for d in ("sciq", "nq_open") for m in ("accuracy", "ece") for o in ("random", "lm_only")]
    states = [(False, False), (True, False), (False, True)]
    rng = np.random.default_rng(0)
    for _ in range(300):
        picks = rng.integers(0, 3, size=len(keys))
        present = [k for k, keep in zip(keys, rng.random(len(keys)) < 0.9) if keep]
        comp = _comp({k: states[p] for k, p in zip(keys, picks) if k in present})
        assert vd.e2_verdicts(comp, EMPTY_TABLE)[0].outcome == _old_rule(comp)
    for p in itertools.product(range(3), repeat=4):  # every state of one data set
        comp = _comp({k: states[s] for k, s in zip(keys[:4], p)})
        assert vd.e2_verdicts(comp, EMPTY_TABLE)[0].outcome == _old_rule(comp)


def test_e2_magnitudes_are_the_largest_changes_against_base() -> None:
    pe = pd.concat([_per_example({"base": [[1, 0, 0, 0]], "eavss": [[1, 1, 1, 0]]}, "sciq"),
                    _per_example({"base": [[1, 1, 0, 0]], "eavss": [[1, 1, 1, 0]]}, "wikiqa")], ignore_index=True)
    table = oc.arm_table(pe, n_resamples=200)
    [v] = vd.e2_verdicts(_comp({}), table)
    acc = v.condition("largest accuracy change", "sciq")  # +200% on sciq beats +50% on wikiqa
    assert acc.value == 50.0 and v.numbers["accuracy_rel_change"] == 200.0
    ece = v.condition("largest ECE change", "sciq")  # |0.75-0.6| = 15 against |0.25-0.6| = 35: -57%
    assert ece.value == pytest.approx(-20.0) and v.numbers["ece_rel_change"] == pytest.approx(-100 * 20 / 35)
    assert ece.met == (ece.high < 0 or ece.low > 0)


# ------------------------------------------------------------------------------------------ tables, figures, phrases


def test_tables_format_the_artifacts() -> None:
    pe = _per_example({"base": [[1, 1]], "eavss": [[1, 1]], "random": [[0, 0], [0, 0]]})
    table = oc.arm_table(pe, n_resamples=50)
    shown = tables.results_table(table, "accuracy")
    # Wilson's interval at 2 of 2 and 0 of 2 questions: [34.2, 100] and [0, 65.8], not a point
    assert shown.loc["untouched", "sciq"] == "100.0 [34.2, 100.0]"
    assert shown.loc["top-k EAVSS", "sciq"] == "100.0 [34.2, 100.0] (+0%)"
    assert shown.loc["k random", "sciq"] == "0.0 [0.0, 65.8] (-100%)"
    zero_base = oc.arm_table(_per_example({"base": [[0, 0]], "eavss": [[1, 0]]}), n_resamples=50)
    assert tables.results_table(zero_base, "accuracy").loc["top-k EAVSS", "sciq"].endswith("(+50.0 pt)")
    run_metrics = oc.summarise_runs(pe, n_resamples=50)
    per_run = tables.per_run_table(run_metrics, "accuracy")
    assert list(per_run.index) == ["base-0", "eavss-0", "random-0", "random-1"] and list(per_run.columns) == ["sciq"]
    with pytest.raises(DataError, match="no per-run metric"):
        tables.per_run_table(run_metrics, "alias_hallucination_rate")  # no open-QA data set here
    comp = _comp({("sciq", "accuracy", "random"): (True, False), ("sciq", "ece", "random"): (False, True)})
    outcome = tables.comparison_table(comp)["outcome"]["k random"]
    assert outcome.to_dict() == {("sciq", "accuracy"): "EAVSS better", ("sciq", "ece"): "EAVSS worse"}


def test_figures_plot_the_tables_data() -> None:
    pe = _per_example({"base": [[1, 0, 0, 0]], "eavss": [[1, 1, 1, 0]]})
    table = oc.arm_table(pe, n_resamples=50)
    fig = figures.scores_figure(table)
    points = [line.get_ydata().tolist() for line in fig.axes[0].lines]
    assert points == [[25.0], [75.0]]  # accuracy of base and eavss
    bars = [c.get_segments()[0][:, 1].tolist() for c in fig.axes[0].collections]
    acc = table[table["metric"] == "accuracy"].set_index("arm")
    assert bars == [[acc.loc[a, "low"], acc.loc[a, "high"]] for a in ("base", "eavss")]
    shifted = table.assign(low=np.where(table["metric"] == "ece", table["value"] + 1.0, table["low"]))
    figures.scores_figure(shifted)  # an interval beside its estimate is drawn, not an error
    fig = figures.reliability_figure(pe)
    bins = reliability_bins(np.full(4, 0.6), [1, 1, 1, 0])
    eavss_line = fig.axes[0].lines[2]  # the diagonal, then base, then eavss
    assert eavss_line.get_ydata().tolist() == bins[bins["count"] > 0]["accuracy"].tolist() == [0.75]
    logs = pd.DataFrame({"run_id": "eavss-s0", "arm": "eavss", "step": [1, 2, 3], "loss_con": [1.0, 0.8, 0.5],
                         "loss_lm": [2.0, 1.9, 1.8]})
    fig = figures.training_curves(logs, window=5)
    assert fig.axes[0].lines[0].get_ydata() == pytest.approx([1.0, 0.9, 2.3 / 3])
    assert fig.axes[1].lines[0].get_ydata() == pytest.approx([2.0, 1.95, 1.9])


def test_phrases_choose_their_clause_from_the_data() -> None:
    assert prose.counts_phrase({"nq_open": 3, "sciq": 5}) == "nq_open: 3, sciq: 5"
    runs_frame = pd.DataFrame({"reused": [True, False, False], "trainable_params": [0, 0, 10],
                               "train_seconds": [0.0, 0.0, 12.4], "eval_seconds": [3.0, 5.2, 4.0]})
    assert prose.runs_phrase(runs_frame, 30.2) == ("3 runs (2 computed now, 1 reused) in 30 s; a computed run took at "
                                                  "most 12 s to train and 5 s to evaluate.")
    assert prose.runs_phrase(runs_frame.assign(reused=True), 1.0) == "3 runs (0 computed now, 3 reused) in 1 s."
    base = _per_example({"base": [[1, 0]], "eavss": [[1, 1]]}, "nq_open")
    table = oc.arm_table(base, n_resamples=20)
    assert prose.open_qa_phrase(table) == ("Of the held-out open questions, the untouched model answers 1 of 2 on "
                                           "nq_open correctly, so relative changes on nq_open rest on a handful of "
                                           "examples: read them with the intervals.")
    assert prose.and_list(["a", "b", "c"]) == "a, b and c" and prose.and_list(["a", "b"]) == "a and b"
    never = oc.arm_table(_per_example({"base": [[0, 0]], "eavss": [[0, 0]]}), n_resamples=20)
    assert prose.never_correct_phrase(never).startswith("On sciq no arm answers")
    assert prose.never_correct_phrase(table) == "On every data set at least one arm answers a held-out question correctly."
    comp = _comp({("sciq", "accuracy", "random"): (True, False), ("sciq", "accuracy", "lm_only"): (True, False),
                  ("sciq", "ece", "random"): (False, True), ("sciq", "ece", "lm_only"): (False, False)})
    [v] = vd.e2_verdicts(comp, EMPTY_TABLE)
    assert prose.comparison_phrase(v) == ("EAVSS beats every control arm on 1 pair(s) (sciq accuracy) and is beaten "
                                          "on 1 comparison(s) (sciq ece vs k random).")
    assert prose.comparison_phrase(vd.e2_verdicts(_comp({}), EMPTY_TABLE)[0]).startswith("No control arm was run")
    assert prose.magnitude_phrase(v, "accuracy").startswith("not defined")


# ------------------------------------------------------------------------------------------ upstream


def test_upstream_options_follow_chapter_04(tmp_path: Path) -> None:
    EAVSS_LAYERS.write({**EAVSS, "label_convention": "alias_containment"}, tmp_path)
    PROVENANCE_04.write({"answer_settings": {"sciq": {"sciq_with_support": True},
                                             "wikiqa": {"wikiqa_scoring": "loglik_norm"},
                                             "nq_open": {"shots": ["nq_open-7", "nq_open-3"]}}}, tmp_path)
    assert upstream_eval_options(tmp_path) == {"label_convention": "alias_containment", "sciq_with_support": True,
                                               "wikiqa_scoring": "loglik_norm", "shot_ids": {"nq_open": ["nq_open-7",
                                                                                                      "nq_open-3"]}}
    bench = _benchmarks()
    assert [e.id for e in shots_by_id(bench["nq_open"], ["nq_open-7", "nq_open-3"])] == ["nq_open-7", "nq_open-3"]
    PROVENANCE_04.write({"model": {"spec": "x"}}, tmp_path)  # nothing recorded: answer_benchmark's defaults
    assert upstream_eval_options(tmp_path) == {"label_convention": "alias_containment", "sciq_with_support": False,
                                               "wikiqa_scoring": "pmi", "shot_ids": {}}
    answers = _answers(_benchmarks())
    ANSWERS.write(answers, tmp_path)
    QUESTION_SPLIT.write(split_datasets(answers, td.DATASETS, seed=0), tmp_path)
    answers, split, layers, scores = load_upstream(tmp_path)
    assert layers["pooled"] == [3, 1] and scores is None and len(answers) == len(split) == 5 * 8
    with pytest.raises(DataError, match="does not exist: run stage 04_hallucination_layers"):
        load_upstream(tmp_path / "elsewhere")


def test_the_intervention_strength_enters_only_the_intervention_runs_key() -> None:
    _, sets, _, settings, planned = _pipeline(arms=("base", "eavss", "iti"))
    other = replace(settings, iti_alpha=4.0)
    keys = {r.arm: (runs.run_key(r, settings, "d"), runs.run_key(r, other, "d")) for r in planned}
    assert keys["base"][0] == keys["base"][1] and keys["eavss"][0] == keys["eavss"][1]
    assert keys["iti"][0] != keys["iti"][1]


def test_shared_prompts_enter_the_trained_runs_key_and_not_the_untrained_runs() -> None:
    """Sharing prompts changes a trained run's key (its trajectory differs by round-off), not the base run's."""
    _, _, _, settings, planned = _pipeline(arms=("base", "eavss"))
    plain = replace(settings, share_prompts=False)
    eavss = next(r for r in planned if r.arm == "eavss")
    base = next(r for r in planned if r.arm == "base")
    shared_key, plain_key = runs.run_key(eavss, settings, "d"), runs.run_key(eavss, plain, "d")
    assert shared_key["train"]["share_prompts"] is True and plain_key["train"]["share_prompts"] is False
    assert {k: v for k, v in shared_key["train"].items() if k != "share_prompts"} == {
        k: v for k, v in plain_key["train"].items() if k != "share_prompts"}
    assert runs.run_key(base, settings, "d") == runs.run_key(base, plain, "d")
    assert settings.train_config((0,), 0, 1.0).share_prompts and not plain.train_config((0,), 0, 1.0).share_prompts


def test_a_runs_key_holds_the_code_that_trains_and_evaluates_it_and_not_the_report() -> None:
    """The key hashes the modules runs.py imports, transitively: training, scoring and the harness, not the
    chapter's prose, figures, tables or verdict, whose changes therefore reuse finished runs."""
    from avss_lib.core.source_digest import module_closure, source_digest

    _, _, _, settings, planned = _pipeline(arms=("base", "eavss"))
    closure = {str(p).split("avss_lib/")[-1] for p in module_closure([runs.RUN_CODE])}
    assert {"mitigation/training.py", "mitigation/contrastive_loss.py", "mitigation/intervention.py",
            "core/harness.py", "core/tasks.py", "hallucination/answers.py"} <= closure
    assert not closure & {"mitigation/prose.py", "mitigation/figures.py", "mitigation/tables.py",
                          "mitigation/verdict.py", "mitigation/stage.py", "book/pipeline.py"}
    key = runs.run_key(planned[0], settings, "d")
    assert key["code"] == source_digest(module_closure([runs.RUN_CODE]))


def test_the_runs_input_key_changes_with_the_base_weights_and_their_dtype() -> None:
    examples, sets, _, _, _ = _pipeline(arms=("base",))
    model = tiny_model("llama", N_LAYERS)
    state, key = runs.base_weights_and_key(model, examples, sets)
    assert runs.base_weights_and_key(model, examples, sets)[1] == key
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        next(model.parameters())[0, 0] += 1e-3
    assert runs.base_weights_and_key(model, examples, sets)[1] != key
    model.load_state_dict(state)
    assert runs.base_weights_and_key(model.to(torch.bfloat16), examples, sets)[1] != key


def test_validation_slice_is_a_seeded_disjoint_share_of_the_training_questions() -> None:
    examples = [td.ContrastiveExample(f"d:{i}", "p", " a", (" b",)) for i in range(20)]
    train_part, held = td.hold_out_validation(examples, 0.1, seed=3)
    assert len(held) == 2 and len(train_part) == 18 and not {e.id for e in held} & {e.id for e in train_part}
    assert td.hold_out_validation(examples, 0.1, seed=3) == (train_part, held)
    assert td.hold_out_validation(examples, 0.0) == (examples, [])
    with pytest.raises(ConfigError, match="validation_fraction"):
        td.hold_out_validation(examples, 1.0)
    with pytest.raises(DataError, match="cannot be split"):
        td.hold_out_validation(examples[:1], 0.5)
