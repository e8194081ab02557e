"""The model's answers on the five QA benchmarks, labelled correct / hallucinated under several conventions.

:func:`answer_benchmark` runs one benchmark with the evaluation harness (:func:`avss_lib.core.harness.
evaluate_task`, lm-evaluation-harness prompts) and returns one row per question in the notebook-04 artifact
format (:data:`ANSWER_COLUMNS`):

- ``nq_open``, ``triviaqa`` — greedy generation (stop at newline, ``.`` or ``,``), zero-shot or after ``shots``
  solved examples in lm-evaluation-harness's few-shot layout (:func:`load_shots` draws them from the split's
  examples that are *not* asked, as the harness draws them from another split); ``prediction`` is the
  answer text, ``confidence`` its length-normalised sequence probability; ``correct_exact_match`` and
  ``correct_alias_containment`` are the two label conventions of :mod:`avss_lib.core.answer_matching`.
- ``sciq`` (4-way), ``truthfulqa_mc`` (MC1: the single true answer among the MC1 targets) and ``wikiqa``
  (answer-sentence selection over the questions that have a correct sentence) — the option with the
  highest log-likelihood (WikiQA: the PMI score by default) is the answer; ``prediction`` is its text,
  ``confidence`` the softmax of the choices' scores at it, and both convention columns equal ``correct``.
  TruthfulQA is scored on MC1 only by default (the MC2 targets would add ~1.5x the cost and do not enter
  the hallucination label); ``truthfulqa_mc2=True`` scores both with the harness's evaluator.

``correct`` is the column of the chosen ``label_convention`` (a hallucination is ``correct == False``).
Extra columns: ``prompt`` (the exact context the model saw, which the activation statistics reuse),
``choice`` (the chosen option's index, missing for generative tasks) and ``gold`` (the reference answers,
``" | "``-joined).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from torch import nn
from transformers import PreTrainedTokenizerBase

from avss_lib.core.answer_matching import LABEL_CONVENTIONS
from avss_lib.core.benchmarks import Benchmark, Example, load_benchmark, subsample
from avss_lib.core.errors import ConfigError, DataError
from avss_lib.core.harness import score_multiple_choice
from avss_lib.core.metrics import bootstrap_ci, choice_probabilities, expected_calibration_error
from avss_lib.core.tasks import FEWSHOT, PROMPTS, evaluate_task, open_qa_prompt
from avss_lib.hallucination.group_stats import check_class_sizes

#: Benchmarks this module answers (the EAVSS paper's five QA sets).
DATASETS: tuple[str, ...] = ("nq_open", "triviaqa", "sciq", "truthfulqa_mc", "wikiqa")
GENERATIVE: tuple[str, ...] = ("nq_open", "triviaqa")
#: The artifact contract of ``answers.parquet`` (other notebooks read these columns).
ANSWER_COLUMNS: tuple[str, ...] = (
    "dataset", "id", "question", "prediction", "confidence", "correct", "correct_exact_match",
    "correct_alias_containment",
)
EXTRA_COLUMNS: tuple[str, ...] = ("prompt", "choice", "gold")


@dataclass(frozen=True)
class AnswerSet:
    """One benchmark's answers (:data:`ANSWER_COLUMNS` + :data:`EXTRA_COLUMNS`) and how they were made."""

    dataset: str
    answers: pd.DataFrame
    settings: dict[str, Any]


def _check_convention(label_convention: str) -> None:
    if label_convention not in LABEL_CONVENTIONS:
        raise ConfigError(f"label_convention={label_convention!r} is unknown: use one of {list(LABEL_CONVENTIONS)}")


def _eligible(example: Example, dataset: str) -> bool:
    """WikiQA questions without a correct sentence cannot be answered correctly (standard filtered set)."""
    return bool(example.correct_choices) if dataset == "wikiqa" else True


def load_questions(dataset: str, n: int | None, seed: int, data_root: Any = None,
                   split: str | None = None) -> Benchmark:
    """A seeded subsample of ``n`` answerable questions (all of them when fewer exist; ``n=None``: all).

    ``provenance`` records ``n_requested``, ``n`` (what was taken) and ``examples_eligible``.
    """
    if dataset not in DATASETS:
        raise ConfigError(f"dataset {dataset!r} is not one of {DATASETS}")
    full = load_benchmark(dataset, data_root=data_root, split=split)
    eligible = [e for e in full.examples if _eligible(e, dataset)]
    if not eligible:
        raise DataError(f"{dataset}: no answerable question in this split")
    take = len(eligible) if n is None else min(n, len(eligible))
    kept = subsample(eligible, take, seed)
    provenance = {**full.provenance, "n_requested": n, "n": take, "seed": seed, "examples_eligible": len(eligible)}
    return Benchmark(name=dataset, examples=kept, provenance=provenance)


def load_shots(asked: Benchmark, k: int, seed: int, data_root: Any = None) -> tuple[Example, ...]:
    """``k`` solved examples of ``asked``'s split for a few-shot prompt, drawn (seeded) from the examples with an
    answer that are *not* asked, so no shot is ever a question the model answers or is scored on."""
    if k < 0:
        raise ConfigError(f"open_qa_shots={k} must be >= 0 (0: zero-shot)")
    if k == 0:
        return ()
    full = load_benchmark(asked.name, data_root=data_root, split=asked.provenance.get("split"))
    taken = {e.id for e in asked.examples}
    pool = [e for e in full.examples if e.id not in taken and e.answers]
    if len(pool) < k:
        raise DataError(f"{asked.name}: only {len(pool)} unasked examples for {k} shots: ask fewer questions")
    return tuple(subsample(pool, k, seed + 1))


def shots_by_id(benchmark: Benchmark, ids: Sequence[str]) -> tuple[Example, ...]:
    """The few-shot examples recorded by id (``answer_settings[dataset]["shots"]``), in order, from ``benchmark``."""
    index = {e.id: e for e in benchmark.examples}
    missing = [i for i in ids if i not in index]
    if missing:
        raise DataError(f"{benchmark.name}: shot ids {missing[:3]} are not in the benchmark: use the data chapter 04 used")
    return tuple(index[i] for i in ids)


def _prompt(dataset: str, example: Example, sciq_with_support: bool, shots: Sequence[Example] = ()) -> str:
    if dataset in GENERATIVE:
        return open_qa_prompt(dataset, example.question, shots)
    if dataset == "sciq":
        template = PROMPTS["sciq" if sciq_with_support else "sciq_closed_book"]
        return template.format(support=(example.context or "").lstrip(), question=example.question)
    key = "truthfulqa" if dataset == "truthfulqa_mc" else dataset
    return PROMPTS[key].format(question=example.question)


def _gold(dataset: str, example: Example) -> str:
    if dataset in GENERATIVE:
        return " | ".join(example.answers)
    assert example.choices is not None
    correct = example.correct_choices if dataset == "wikiqa" else (example.label,)
    return " | ".join(example.choices[i] for i in correct or ())  # type: ignore[index]


def _truthfulqa_mc1(model: nn.Module, tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example],
                    prompts: Sequence[str], batch_size: int) -> pd.DataFrame:
    """MC1 only: argmax of the summed log-likelihoods of the MC1 targets (as the harness's MC1)."""
    logliks = score_multiple_choice(model, tokenizer, prompts, [e.choices for e in examples],  # type: ignore[misc]
                                    batch_size=batch_size, desc="truthfulqa_mc1")
    rows = []
    for e, ll in zip(examples, logliks):
        pred = int(np.argmax(ll))
        rows.append({"id": e.id, "prediction": pred, "correct": pred == e.label,
                     "confidence": float(choice_probabilities(ll)[pred])})
    return pd.DataFrame(rows)


def answer_benchmark(model: nn.Module, tokenizer: PreTrainedTokenizerBase, benchmark: Benchmark, *,
                     label_convention: str = "exact_match", batch_size: int = 8, sciq_with_support: bool = False,
                     wikiqa_scoring: str = "pmi", truthfulqa_mc2: bool = False, shots: Sequence[Example] = (),
                     seed: int = 0) -> AnswerSet:
    """Answer every question of ``benchmark`` and label it (see the module docstring); ``shots`` are the
    open-QA few-shot examples (ignored by the multiple-choice sets)."""
    _check_convention(label_convention)
    dataset = benchmark.name
    if dataset not in DATASETS:
        raise ConfigError(f"dataset {dataset!r} is not one of {DATASETS}")
    examples = benchmark.examples
    shots = tuple(shots) if dataset in GENERATIVE else ()
    prompts = [_prompt(dataset, e, sciq_with_support, shots) for e in examples]
    opts: dict[str, Any] = {"seed": seed}
    if dataset in GENERATIVE:
        opts["shots"] = shots
    if dataset == "sciq":
        opts["with_support"] = sciq_with_support
    if dataset == "wikiqa":
        opts["scoring"] = wikiqa_scoring
    was_training = model.training
    model.eval()
    try:
        if dataset == "truthfulqa_mc" and not truthfulqa_mc2:
            frame = _truthfulqa_mc1(model, tokenizer, examples, prompts, batch_size)
        else:
            frame = evaluate_task(model, tokenizer, benchmark, batch_size=batch_size, **opts).per_example
    finally:
        model.train(was_training)
    by_id = {e.id: (e, p) for e, p in zip(examples, prompts)}
    if list(frame["id"]) != [e.id for e in examples]:
        raise DataError(f"{dataset}: the evaluator returned other examples than asked (filtered?): "
                        "load the questions with load_questions")
    out = pd.DataFrame({"dataset": dataset, "id": frame["id"], "question": [by_id[i][0].question for i in frame["id"]]})
    if dataset in GENERATIVE:
        out["prediction"] = frame["prediction"].astype(str)
        out["correct_exact_match"] = frame["correct"].astype(bool)
        out["correct_alias_containment"] = frame["alias_containment"].astype(bool)
        out["choice"] = pd.array([pd.NA] * len(frame), dtype="Int64")
    else:
        choices = [by_id[i][0].choices for i in frame["id"]]
        out["prediction"] = [c[int(k)] for c, k in zip(choices, frame["prediction"])]  # type: ignore[index]
        out["correct_exact_match"] = frame["correct"].astype(bool)
        out["correct_alias_containment"] = frame["correct"].astype(bool)
        out["choice"] = pd.array(frame["prediction"].astype(int), dtype="Int64")
    out["confidence"] = frame["confidence"].astype(float).clip(0.0, 1.0)
    out["correct"] = out[f"correct_{label_convention}"]
    out["prompt"] = [by_id[i][1] for i in frame["id"]]
    out["gold"] = [_gold(dataset, by_id[i][0]) for i in frame["id"]]
    out = out[list(ANSWER_COLUMNS) + list(EXTRA_COLUMNS)].reset_index(drop=True)
    settings = {"dataset": dataset, "benchmark": benchmark.provenance, "label_convention": label_convention,
                "prompt_template": PROMPTS["sciq" if sciq_with_support else "sciq_closed_book"] if dataset == "sciq"
                else (FEWSHOT[dataset][1] if shots else PROMPTS[dataset]) if dataset in GENERATIVE
                else PROMPTS["truthfulqa" if dataset == "truthfulqa_mc" else dataset],
                **({"shots": [e.id for e in shots]} if dataset in GENERATIVE else {}),
                **({"sciq_with_support": sciq_with_support} if dataset == "sciq" else {}),
                **({"wikiqa_scoring": wikiqa_scoring} if dataset == "wikiqa" else {}),
                **({"truthfulqa_scored": "MC1 and MC2" if truthfulqa_mc2 else "MC1 only"}
                   if dataset == "truthfulqa_mc" else {}),
                "confidence": "exp(mean log-prob of answer tokens)" if dataset in GENERATIVE
                else "softmax of the choice scores at the chosen option"}
    return AnswerSet(dataset, out, settings)


def answer_benchmarks(model: nn.Module, tokenizer: PreTrainedTokenizerBase, datasets: Sequence[str], *,
                      n: int | None, seed: int = 0, data_root: Any = None, open_qa_shots: int = 0, **kwargs: Any
                      ) -> tuple[pd.DataFrame, dict[str, dict[str, Any]]]:
    """Answers of every dataset in one frame (the ``answers.parquet`` artifact) and each one's settings;
    NQ-open and TriviaQA after ``open_qa_shots`` solved examples that are not asked (:func:`load_shots`)."""
    frames, settings = [], {}
    for dataset in datasets:
        asked = load_questions(dataset, n, seed, data_root)
        shots = load_shots(asked, open_qa_shots, seed, data_root) if dataset in GENERATIVE else ()
        result = answer_benchmark(model, tokenizer, asked, seed=seed, shots=shots, **kwargs)
        frames.append(result.answers)
        settings[dataset] = result.settings
    return pd.concat(frames, ignore_index=True), settings


def hallucination_labels(answers: pd.DataFrame, dataset: str, label_convention: str | None = None) -> pd.Series:
    """Boolean Series indexed by example id, True = hallucinated (wrong under the convention)."""
    column = "correct" if label_convention is None else f"correct_{label_convention}"
    if label_convention is not None:
        _check_convention(label_convention)
    rows = answers[answers["dataset"] == dataset]
    if rows.empty:
        raise DataError(f"no answers for dataset {dataset!r}: answer it first")
    return pd.Series(~rows[column].to_numpy(dtype=bool), index=rows["id"].to_numpy(), dtype=bool, name="hallucinated")


def answer_summary(answers: pd.DataFrame, *, conventions: Sequence[str] = tuple(LABEL_CONVENTIONS),
                   min_class: int = 30, seed: int = 0) -> pd.DataFrame:
    """Accuracy with its bootstrap 95% CI, hallucination rate, class sizes and ECE per dataset and convention.

    Multiple-choice data sets have one row (convention ``choice``); generative ones one per convention.
    ``usable`` says whether both classes reach ``min_class`` examples; ``n_empty_answers`` counts answers
    that are empty (the model's first token was a stop string, e.g. a newline): they count as wrong, and
    have no answer tokens to measure at ``position="answer"``.
    """
    rows = []
    for dataset, frame in answers.groupby("dataset", sort=False):
        generative = dataset in GENERATIVE
        for convention in (conventions if generative else ("choice",)):
            correct = frame[f"correct_{convention}" if generative else "correct"].to_numpy(dtype=bool)
            acc, low, high = bootstrap_ci(correct.astype(float), seed=seed)
            sizes = check_class_sizes(pd.Series(~correct, dtype=bool), min_class)
            rows.append({"dataset": dataset, "convention": convention, "n": len(frame), "accuracy": acc,
                         "ci_low": low, "ci_high": high, "hallucination_rate": 1 - acc,
                         "n_hallucinated": sizes.n_hallucinated, "n_correct": sizes.n_correct,
                         "n_empty_answers": int((frame["prediction"].str.strip() == "").sum()),
                         "usable": sizes.ok,
                         "ece_percent": expected_calibration_error(frame["confidence"].to_numpy(), correct)})
    return pd.DataFrame(rows)
