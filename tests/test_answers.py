"""Answers and hallucination labels on the fixture benchmarks, with tiny random models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import avss_lib.core.tasks as tasks
from avss_lib.hallucination import answers as ans
from avss_lib.core.answer_matching import alias_containment, exact_match
from avss_lib.core.benchmarks import load_benchmark
from avss_lib.core.errors import ConfigError, DataError
from avss_lib.core.harness import Generation
from avss_lib.testing.tiny_models import tiny_model, tiny_tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "data"


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", n_layers=2)


@pytest.fixture(scope="module")
def all_answers(model, tok):
    frame, settings = ans.answer_benchmarks(model, tok, ans.DATASETS, n=None, seed=0, data_root=FIXTURES)
    return frame, settings


def test_artifact_columns_and_types(all_answers):
    frame, settings = all_answers
    assert list(frame.columns[:len(ans.ANSWER_COLUMNS)]) == list(ans.ANSWER_COLUMNS)
    assert set(frame["dataset"]) == set(ans.DATASETS) == set(settings)
    for column in ("correct", "correct_exact_match", "correct_alias_containment"):
        assert frame[column].dtype == bool
    assert frame["confidence"].between(0, 1).all()
    assert not frame.duplicated(["dataset", "id"]).any()
    assert (frame["correct"] == frame["correct_exact_match"]).all()  # default convention


def test_multiple_choice_prediction_is_the_chosen_option(all_answers):
    frame, _ = all_answers
    for dataset in ("sciq", "truthfulqa_mc", "wikiqa"):
        bench = {e.id: e for e in load_benchmark(dataset, data_root=FIXTURES).examples}
        rows = frame[frame["dataset"] == dataset]
        for row in rows.itertuples():
            example = bench[row.id]
            assert row.prediction == example.choices[row.choice]
            gold = example.correct_choices if dataset == "wikiqa" else (example.label,)
            assert row.correct == (row.choice in gold)
        assert (rows["correct_exact_match"] == rows["correct"]).all()
        assert (rows["correct_alias_containment"] == rows["correct"]).all()


def test_wikiqa_keeps_only_answerable_questions(all_answers):
    frame, settings = all_answers
    answerable = [e.id for e in load_benchmark("wikiqa", data_root=FIXTURES).examples if e.correct_choices]
    assert list(frame.loc[frame["dataset"] == "wikiqa", "id"]) == answerable
    assert settings["wikiqa"]["benchmark"]["examples_eligible"] == len(answerable)


def test_truthfulqa_mc1_matches_the_harness_evaluator(model, tok):
    bench = load_benchmark("truthfulqa_mc", data_root=FIXTURES)
    ours = ans.answer_benchmark(model, tok, bench).answers
    harness = tasks.evaluate_task(model, tok, bench).per_example
    assert list(ours["id"]) == list(harness["id"])
    np.testing.assert_array_equal(ours["choice"].to_numpy(dtype=int), harness["prediction"].to_numpy())
    np.testing.assert_array_equal(ours["correct"].to_numpy(), harness["correct"].to_numpy())
    np.testing.assert_allclose(ours["confidence"], harness["confidence"], rtol=1e-6)
    both = ans.answer_benchmark(model, tok, bench, truthfulqa_mc2=True).answers
    pd.testing.assert_frame_equal(ours, both)


def test_generative_labels_follow_both_conventions(model, tok, monkeypatch):
    """A fake generator answers gold, gold + extra words, or nonsense: EM and containment must differ as expected."""
    bench = load_benchmark("nq_open", data_root=FIXTURES)
    texts = {}
    for i, e in enumerate(bench.examples):
        texts[e.question] = [e.answers[0], f"I think {e.answers[0]} maybe", "zzz"][i % 3]

    def fake_generate(model, tokenizer, prompts, **kwargs):
        out = []
        for p in prompts:
            question = p.split("Q: ", 1)[1].rsplit("?\nA:", 1)[0]
            out.append(Generation(text=texts[question], confidence=0.25, mean_logprob=float(np.log(0.25)), n_tokens=2))
        return out

    monkeypatch.setattr(tasks, "generate_until", fake_generate)
    em = ans.answer_benchmark(model, tok, bench, label_convention="exact_match").answers
    contain = ans.answer_benchmark(model, tok, bench, label_convention="alias_containment").answers
    golds = {e.id: e.answers for e in bench.examples}
    for row in em.itertuples():
        assert row.correct_exact_match == exact_match(row.prediction, golds[row.id])
        assert row.correct_alias_containment == alias_containment(row.prediction, golds[row.id])
    kinds = np.arange(len(em)) % 3
    assert em["correct_exact_match"].to_numpy().tolist() == (kinds == 0).tolist()
    assert em["correct_alias_containment"].to_numpy().tolist() == (kinds != 2).tolist()
    assert (em["correct"] == em["correct_exact_match"]).all()
    assert (contain["correct"] == contain["correct_alias_containment"]).all()
    labels = ans.hallucination_labels(contain, "nq_open")
    assert labels.dtype == bool and (labels.to_numpy() == (kinds == 2)).all()
    assert (ans.hallucination_labels(contain, "nq_open", "exact_match").to_numpy() == (kinds != 0)).all()
    summary = ans.answer_summary(em, min_class=1)
    assert list(summary["convention"]) == ["exact_match", "alias_containment"]
    assert summary["accuracy"].tolist() == pytest.approx([(kinds == 0).mean(), (kinds != 2).mean()])
    assert summary["n_hallucinated"].tolist() == [int((kinds != 0).sum()), int((kinds == 2).sum())]


def test_load_questions_subsamples_and_caps(tmp_path):
    total = len(load_benchmark("sciq", data_root=FIXTURES).examples)
    two = ans.load_questions("sciq", 2, seed=1, data_root=FIXTURES)
    assert len(two.examples) == 2 and two.provenance["n"] == 2
    capped = ans.load_questions("sciq", 10_000, seed=1, data_root=FIXTURES)
    assert len(capped.examples) == total and capped.provenance["n_requested"] == 10_000


def test_errors(model, tok, all_answers):
    frame, _ = all_answers
    with pytest.raises(ConfigError, match="label_convention"):
        ans.answer_benchmark(model, tok, load_benchmark("sciq", data_root=FIXTURES), label_convention="fuzzy")
    with pytest.raises(ConfigError, match="not one of"):
        ans.load_questions("sst2", 3, seed=0, data_root=FIXTURES)
    with pytest.raises(DataError, match="no answers"):
        ans.hallucination_labels(frame, "triviaqa_typo")
    small = ans.answer_summary(frame, min_class=30)
    assert not small["usable"].any()  # fixtures have a handful of questions each


def test_answer_summary_by_hand():
    frame = pd.DataFrame({
        "dataset": ["nq_open"] * 4 + ["sciq"] * 2,
        "prediction": ["Paris", " ", "", "Rome", "iron", "gold"],
        "confidence": [0.9, 0.9, 0.2, 0.2, 0.6, 0.6],
        "correct_exact_match": [True, False, False, False, True, True],
        "correct_alias_containment": [True, False, False, True, True, True],
        "correct": [True, False, False, False, True, True],
    })
    summary = ans.answer_summary(frame, min_class=1).set_index(["dataset", "convention"])
    em = summary.loc[("nq_open", "exact_match")]
    assert (em["n"], em["accuracy"], em["hallucination_rate"]) == (4, 0.25, 0.75)
    assert (em["n_hallucinated"], em["n_correct"], em["n_empty_answers"], em["usable"]) == (3, 1, 2, True)
    # 15 bins: {0.9, 0.9} has accuracy 1/2, {0.2, 0.2} accuracy 0 -> (2 * 0.4 + 2 * 0.2) / 4 = 0.3
    assert em["ece_percent"] == pytest.approx(30.0)
    contain = summary.loc[("nq_open", "alias_containment")]
    assert (contain["accuracy"], contain["n_hallucinated"]) == (0.5, 2)
    sciq = summary.loc[("sciq", "choice")]
    assert (sciq["accuracy"], sciq["n_hallucinated"], sciq["usable"]) == (1.0, 0, False)  # no hallucination
    assert sciq["ece_percent"] == pytest.approx(40.0)  # confidence 0.6, all correct
    assert list(summary.index) == [("nq_open", "exact_match"), ("nq_open", "alias_containment"), ("sciq", "choice")]
    assert not ans.answer_summary(frame, min_class=2).set_index("convention").loc["exact_match", "usable"]


def test_few_shot_prompts_follow_the_harness_layout():
    """lm-evaluation-harness's nq_open / triviaqa YAML: description, shots "text target" joined by the few-shot
    delimiter, then the question; zero shots keep the zero-shot prompt."""
    nq = load_benchmark("nq_open", data_root=FIXTURES).examples
    assert tasks.open_qa_prompt("nq_open", "who is it", nq[:2]) == (
        "Answer these questions:\n\n"
        f"Q: {nq[0].question}?\nA: {nq[0].answers[0]}\n"
        f"Q: {nq[1].question}?\nA: {nq[1].answers[0]}\n"
        "Q: who is it?\nA:")
    tq = load_benchmark("triviaqa", data_root=FIXTURES).examples
    assert tasks.open_qa_prompt("triviaqa", "Who is it", tq[:1]) == (
        f"Question: {tq[0].question}?\nAnswer: {tq[0].answers[0]}\n\nQuestion: Who is it?\nAnswer:")
    assert tasks.open_qa_prompt("nq_open", "who is it") == tasks.PROMPTS["nq_open"].format(question="who is it")


def test_shots_are_never_asked_and_the_answers_use_them(model, tok):
    asked = ans.load_questions("nq_open", 2, seed=0, data_root=FIXTURES)
    shots = ans.load_shots(asked, 2, seed=0, data_root=FIXTURES)
    assert len(shots) == 2 and not {s.id for s in shots} & {e.id for e in asked.examples}
    assert ans.load_shots(asked, 0, seed=0, data_root=FIXTURES) == ()
    with pytest.raises(DataError, match="unasked examples"):
        ans.load_shots(asked, 3, seed=0, data_root=FIXTURES)
    result = ans.answer_benchmark(model, tok, asked, shots=shots)
    assert result.settings["shots"] == [s.id for s in shots]
    assert all(p == tasks.open_qa_prompt("nq_open", q, shots)
               for p, q in zip(result.answers["prompt"], result.answers["question"]))
    with pytest.raises(ConfigError, match="a shot is one of the asked questions"):
        ans.answer_benchmark(model, tok, asked, shots=asked.examples[:1])
