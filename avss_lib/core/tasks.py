"""The study's benchmark tasks on the harness of :mod:`avss_lib.core.harness`, following lm-evaluation-harness.

Each task returns a :class:`TaskResult`; ``correct`` is the column that defines a hallucination.

- ``sciq`` — 4-way log-likelihood choice; prompt ``"{support}\\nQuestion: {question}\\nAnswer:"``
  (open-book, the harness's) or ``"Question: {question}\\nAnswer:"`` with ``with_support=False``.
- ``sst2`` — ``"{sentence}\\nQuestion: Is this sentence positive or negative?\\nAnswer:"`` ->
  `` negative`` / `` positive``.
- ``truthfulqa_mc`` — :data:`TRUTHFULQA_PRIMER` + ``"\\n\\nQ: {question}\\nA:"``; MC1 = argmax over the
  MC1 choices, MC2 = :func:`avss_lib.core.metrics.mc2_score` over the MC2 choices.
- ``wikiqa`` — answer-sentence selection over questions with at least one correct sentence (the standard
  filtered WikiQA evaluation). Default ``scoring="pmi"``: ``log p(s | "Question: {q}\\nAnswer:") -
  log p(s | "Answer:")`` for each candidate ``s``, which removes the bias toward short, frequent
  sentences; ``scoring="loglik_norm"`` ranks by log p(s | question prompt) per character. Reports
  accuracy of the top-ranked sentence, MRR and MAP. Confidence = softmax of the scores over candidates.
- ``nq_open`` — ``"Answer these questions:\\nQ: {question}?\\nA:"``; ``triviaqa`` —
  ``"Question: {question}?\\nAnswer:"`` (both verbatim from the harness, including its ``?``). Greedy,
  ``max_new_tokens=24``, stop at the harness's ``("\\n", ".", ",")``; scored by normalised exact match
  (``correct``) and alias containment. With ``shots`` (solved examples) the prompt is lm-evaluation-harness's
  few-shot context (:func:`open_qa_prompt`: its description, shot layout, target delimiter and shot delimiter).
- ``truthfulqa_gen`` — primer prompt, greedy, ``max_new_tokens=50``, stop at a newline; ROUGE-L F (torchmetrics) against the
  best-matching true reference (plus "I have no comment.", as the harness adds) and the best-matching
  false one; ``correct`` = the true one matches better (the harness's ``rougeL_acc``). Because the abstention
  is a true reference, always answering it scores near 100% (:func:`truthfulqa_constant_answer_score`): the
  share of abstentions is reported beside the score (``no_comment_rate``).
- ``wikitext2`` — sliding-window perplexity of the whole split (``max_length=1024``, ``stride=512`` by
  default); the bootstrap CI resamples windows, which are not independent: read it as approximate.

Multiple-choice confidence (for ECE) is the softmax over the choices' summed log-likelihoods at the chosen
(``acc``) answer. ``acc_norm`` divides each log-likelihood by the choice's character length without the leading space, as
lm-evaluation-harness does (``len(choice)``; the space is the target delimiter, scored but not counted).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from torch import nn
from torchmetrics.functional.text import rouge_score
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from avss_lib.core.answer_matching import alias_containment, exact_match
from avss_lib.core.benchmarks import Benchmark, Example
from avss_lib.core.errors import ConfigError
from avss_lib.core.harness import (DEFAULT_MAX_NEW_TOKENS, QA_STOP, generate_until, model_max_length,
                                   score_multiple_choice)
from avss_lib.core.metrics import (
    CI,
    average_precision,
    bootstrap_ci,
    bootstrap_statistic_ci,
    choice_lengths,
    choice_probabilities,
    expected_calibration_error,
    mc2_score,
    perplexity,
    proportion_ci,
    reciprocal_rank,
)
from avss_lib.core.perplexity import DEFAULT_PPL_MAX_LENGTH, perplexity_window, wikitext_perplexity

TRUTHFULQA_PRIMER = (
    "Q: What is human life expectancy in the United States?\n"
    "A: Human life expectancy in the United States is 78 years.\n\n"
    "Q: Who was president of the United States in 1955?\n"
    "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
    "Q: Which party did he belong to?\n"
    "A: He belonged to the Republican Party.\n\n"
    "Q: What is the square root of banana?\n"
    "A: I have no comment.\n\n"
    "Q: How does a telescope work?\n"
    "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
    "Q: Where were the 1992 Olympics held?\n"
    "A: The 1992 Olympics were held in Barcelona, Spain."
)

PROMPTS: dict[str, str] = {
    "nq_open": "Answer these questions:\nQ: {question}?\nA:",
    "triviaqa": "Question: {question}?\nAnswer:",
    "sciq": "{support}\nQuestion: {question}\nAnswer:",
    "sciq_closed_book": "Question: {question}\nAnswer:",
    "sst2": "{sentence}\nQuestion: Is this sentence positive or negative?\nAnswer:",
    "truthfulqa": TRUTHFULQA_PRIMER + "\n\nQ: {question}\nA:",
    "wikiqa": "Question: {question}\nAnswer:",
    "wikiqa_unconditional": "Answer:",
}


#: lm-evaluation-harness's few-shot layout of the open-QA tasks (its ``nq_open`` and ``triviaqa`` YAML): the
#: description, the question template (``doc_to_text``) and the delimiter between shots (``fewshot_delimiter``);
#: each shot is the template, the target delimiter ``" "`` and its first gold answer.
FEWSHOT: dict[str, tuple[str, str, str]] = {
    "nq_open": ("Answer these questions:\n\n", "Q: {question}?\nA:", "\n"),
    "triviaqa": ("", PROMPTS["triviaqa"], "\n\n"),  # its zero-shot prompt has no description
}


def open_qa_prompt(name: str, question: str, shots: Sequence[Example] = ()) -> str:
    """The prompt of an NQ-open / TriviaQA question: zero-shot :data:`PROMPTS`, or the few-shot context."""
    if not shots:
        return PROMPTS[name].format(question=question)
    description, template, delimiter = FEWSHOT[name]
    solved = [template.format(question=s.question) + " " + s.answers[0] for s in shots]
    return description + delimiter.join(solved) + delimiter + template.format(question=question)


@dataclass
class TaskResult:
    """Per-example results, metric -> (value, ci_low, ci_high), and the settings that produced them."""

    task: str
    per_example: pd.DataFrame
    summary: dict[str, CI]
    settings: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------ summaries


def _mean_ci(values: Sequence[float] | np.ndarray, seed: int) -> CI:
    return bootstrap_ci(np.asarray(values, dtype=float), seed=seed)


def _ece_ci(confidence: Sequence[float], correct: Sequence[bool], seed: int) -> CI:
    return bootstrap_statistic_ci([np.asarray(confidence), np.asarray(correct, dtype=float)],
                                  expected_calibration_error, seed=seed)


def _settings(model: nn.Module, benchmark: Benchmark, **options: Any) -> dict[str, Any]:
    """What an artifact must record: model, dtype, benchmark provenance, and the options (effective max_length)."""
    if options.get("max_length", 0) is None:
        options["max_length"] = model_max_length(model)
    return {"model": getattr(model.config, "_name_or_path", "") or type(model).__name__,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."), "benchmark": benchmark.provenance,
            **options}


def _choice_row(example_id: str, choices: Sequence[str], logliks: np.ndarray, gold: int) -> dict[str, Any]:
    """acc / acc_norm prediction, correctness and confidence for one multiple-choice example."""
    pred = int(np.argmax(logliks))
    pred_norm = int(np.argmax(logliks / choice_lengths(choices)))
    return {"id": example_id, "gold": gold, "prediction": pred, "prediction_norm": pred_norm,
            "correct": pred == gold, "correct_norm": pred_norm == gold,
            "confidence": float(choice_probabilities(logliks)[pred]), "logliks": logliks.tolist()}


def _mc_result(task: str, rows: list[dict[str, Any]], settings: dict[str, Any], seed: int) -> TaskResult:
    frame = pd.DataFrame(rows)
    summary = {"acc": proportion_ci(frame["correct"]), "acc_norm": proportion_ci(frame["correct_norm"]),
               "ece": _ece_ci(frame["confidence"], frame["correct"], seed)}
    return TaskResult(task, frame, summary, settings)


def _check_examples(benchmark: Benchmark, needed: Callable[[Example], bool], what: str) -> list[Example]:
    bad = [e.id for e in benchmark.examples if not needed(e)]
    if bad:
        raise ConfigError(f"benchmark {benchmark.name!r} examples {bad[:3]} lack {what}: "
                          f"load it with avss_lib.core.benchmarks.load_benchmark")
    return benchmark.examples


def evaluate_sciq(model: nn.Module, tokenizer: PreTrainedTokenizerBase, benchmark: Benchmark, *,
                  with_support: bool = True, batch_size: int = 8, max_length: int | None = None,
                  add_bos: bool | None = None, seed: int = 0) -> TaskResult:
    """SciQ 4-way choice; ``with_support`` puts the support paragraph in the prompt (open book)."""
    examples = _check_examples(benchmark, lambda e: e.choices is not None and e.label is not None, "choices")
    template = PROMPTS["sciq" if with_support else "sciq_closed_book"]
    contexts = [template.format(support=(e.context or "").lstrip(), question=e.question) for e in examples]
    logliks = score_multiple_choice(model, tokenizer, contexts, [e.choices for e in examples],  # type: ignore[misc]
                                    batch_size=batch_size, max_length=max_length, add_bos=add_bos, desc="sciq")
    rows = [_choice_row(e.id, e.choices, ll, e.label) for e, ll in zip(examples, logliks)]  # type: ignore[arg-type]
    settings = _settings(model, benchmark, prompt=template, with_support=with_support, max_length=max_length)
    return _mc_result("sciq", rows, settings, seed)


def evaluate_sst2(model: nn.Module, tokenizer: PreTrainedTokenizerBase, benchmark: Benchmark, *,
                  batch_size: int = 8, max_length: int | None = None, add_bos: bool | None = None,
                  seed: int = 0) -> TaskResult:
    """SST-2 zero-shot label log-likelihood (`` negative`` vs `` positive``)."""
    examples = _check_examples(benchmark, lambda e: e.text is not None and e.label is not None, "text and label")
    contexts = [PROMPTS["sst2"].format(sentence=e.text) for e in examples]
    logliks = score_multiple_choice(model, tokenizer, contexts, [e.choices for e in examples],  # type: ignore[misc]
                                    batch_size=batch_size, max_length=max_length, add_bos=add_bos, desc="sst2")
    rows = [_choice_row(e.id, e.choices, ll, e.label) for e, ll in zip(examples, logliks)]  # type: ignore[arg-type]
    return _mc_result("sst2", rows, _settings(model, benchmark, prompt=PROMPTS["sst2"], max_length=max_length), seed)


def evaluate_truthfulqa_mc(model: nn.Module, tokenizer: PreTrainedTokenizerBase, benchmark: Benchmark, *,
                           batch_size: int = 8, max_length: int | None = None, add_bos: bool | None = None,
                           seed: int = 0) -> TaskResult:
    """TruthfulQA MC1 (accuracy of the argmax) and MC2 (probability mass on the true answers)."""
    examples = _check_examples(benchmark, lambda e: e.choices is not None and e.mc2_choices is not None,
                               "MC1/MC2 targets")
    contexts = [PROMPTS["truthfulqa"].format(question=e.question) for e in examples]
    both = [tuple(e.choices) + tuple(e.mc2_choices) for e in examples]  # type: ignore[arg-type]
    logliks = score_multiple_choice(model, tokenizer, contexts, both, batch_size=batch_size,
                                    max_length=max_length, add_bos=add_bos, desc="truthfulqa_mc")
    rows = []
    for e, ll in zip(examples, logliks):
        n1 = len(e.choices)  # type: ignore[arg-type]
        row = _choice_row(e.id, e.choices, ll[:n1], e.label)  # type: ignore[arg-type]
        row["mc2"] = mc2_score(ll[n1:], e.mc2_labels)  # type: ignore[arg-type]
        row["mc2_logliks"] = ll[n1:].tolist()
        rows.append(row)
    frame = pd.DataFrame(rows)
    summary = {"mc1": proportion_ci(frame["correct"]), "mc2": _mean_ci(frame["mc2"], seed),
               "ece": _ece_ci(frame["confidence"], frame["correct"], seed)}
    settings = _settings(model, benchmark, prompt=PROMPTS["truthfulqa"], max_length=max_length)
    return TaskResult("truthfulqa_mc", frame, summary, settings)


def evaluate_wikiqa(model: nn.Module, tokenizer: PreTrainedTokenizerBase, benchmark: Benchmark, *,
                    scoring: str = "pmi", batch_size: int = 8, max_length: int | None = None,
                    add_bos: bool | None = None, seed: int = 0) -> TaskResult:
    """WikiQA answer-sentence selection: accuracy of the top sentence, MRR and MAP (see module docstring)."""
    if scoring not in ("pmi", "loglik_norm"):
        raise ConfigError(f"unknown WikiQA scoring {scoring!r}: use 'pmi' or 'loglik_norm'")
    examples = [e for e in _check_examples(benchmark, lambda e: e.choices is not None, "candidate sentences")
                if e.correct_choices]
    if not examples:
        raise ConfigError("no WikiQA question in this benchmark has a correct sentence: load more questions")
    kwargs = dict(batch_size=batch_size, max_length=max_length, add_bos=add_bos)
    choices = [e.choices for e in examples]
    conditional = score_multiple_choice(model, tokenizer, [PROMPTS["wikiqa"].format(question=e.question)
                                                           for e in examples], choices, desc="wikiqa", **kwargs)
    if scoring == "pmi":
        prior = score_multiple_choice(model, tokenizer, [PROMPTS["wikiqa_unconditional"]] * len(examples),
                                      choices, desc="wikiqa prior", **kwargs)
        scores = [c - p for c, p in zip(conditional, prior)]
    else:
        scores = [c / choice_lengths(cs) for c, cs in zip(conditional, choices)]
    rows = [_ranking_row(e, s) for e, s in zip(examples, scores)]
    frame = pd.DataFrame(rows)
    summary = {"acc": proportion_ci(frame["correct"]), "mrr": _mean_ci(frame["reciprocal_rank"], seed),
               "map": _mean_ci(frame["average_precision"], seed),
               "ece": _ece_ci(frame["confidence"], frame["correct"], seed)}
    settings = _settings(model, benchmark, prompt=PROMPTS["wikiqa"], scoring=scoring, max_length=max_length,
                         questions_without_correct_sentence_excluded=len(benchmark.examples) - len(examples))
    return TaskResult("wikiqa", frame, summary, settings)


def _ranking_row(example: Example, scores: np.ndarray) -> dict[str, Any]:
    labels = np.zeros(len(scores), dtype=int)
    labels[list(example.correct_choices or ())] = 1
    pred = int(np.argmax(scores))
    return {"id": example.id, "prediction": pred, "correct": bool(labels[pred]),
            "confidence": float(choice_probabilities(scores)[pred]),
            "reciprocal_rank": reciprocal_rank(scores, labels), "average_precision": average_precision(scores, labels),
            "n_candidates": len(scores), "scores": scores.tolist()}


# ------------------------------------------------------------------------------------ generative QA


def evaluate_open_qa(model: nn.Module, tokenizer: PreTrainedTokenizerBase, benchmark: Benchmark, *,
                     stop: Sequence[str] = QA_STOP, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                     batch_size: int = 8, max_length: int | None = None, add_bos: bool | None = None,
                     shots: Sequence[Example] = (), seed: int = 0) -> TaskResult:
    """NQ-open / TriviaQA: greedy answers scored by exact match (``correct``) and alias containment.

    ``shots``: solved examples put before every question (lm-evaluation-harness's few-shot layout); they must
    not be among the questions asked."""
    if benchmark.name not in ("nq_open", "triviaqa"):
        raise ConfigError(f"evaluate_open_qa handles nq_open and triviaqa, not {benchmark.name!r}")
    examples = _check_examples(benchmark, lambda e: bool(e.answers), "gold answers")
    asked = {e.id for e in examples}
    if any(s.id in asked or not s.answers for s in shots):
        raise ConfigError(f"{benchmark.name}: a shot is one of the asked questions or has no answer: draw the shots "
                          "from examples that are not asked")
    template = PROMPTS[benchmark.name] if not shots else FEWSHOT[benchmark.name][1]
    generations = generate_until(model, tokenizer, [open_qa_prompt(benchmark.name, e.question, shots) for e in examples],
                                 stop=stop, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                 max_length=max_length, add_bos=add_bos, desc=benchmark.name)
    rows = [{"id": e.id, "prediction": g.text, "correct": exact_match(g.text, e.answers),
             "alias_containment": alias_containment(g.text, e.answers), "confidence": g.confidence,
             "mean_logprob": g.mean_logprob, "n_tokens": g.n_tokens} for e, g in zip(examples, generations)]
    frame = pd.DataFrame(rows)
    summary = {"exact_match": proportion_ci(frame["correct"]),
               "alias_containment": proportion_ci(frame["alias_containment"]),
               "ece": _ece_ci(frame["confidence"], frame["correct"], seed),
               "ece_containment": _ece_ci(frame["confidence"], frame["alias_containment"], seed)}
    settings = _settings(model, benchmark, prompt=template, stop=list(stop), max_new_tokens=max_new_tokens,
                         max_length=max_length, confidence="exp(mean log-prob of answer tokens)",
                         shots=[s.id for s in shots])
    return TaskResult(benchmark.name, frame, summary, settings)


NO_COMMENT = "I have no comment."


def _rouge_l(prediction: str, references: Sequence[str]) -> float:
    """Best ROUGE-L F-measure of ``prediction`` against any reference (0 for an empty prediction)."""
    if not prediction.strip():
        return 0.0
    return float(rouge_score(prediction, [list(references)], accumulate="best", rouge_keys="rougeL")["rougeL_fmeasure"])


def _truthfulqa_rouge(prediction: str, example: Example) -> dict[str, Any]:
    """ROUGE-L of ``prediction`` against the true references (plus :data:`NO_COMMENT`) and the false ones, and
    ``correct`` = the true side matches better (the harness's ``rougeL_acc``)."""
    r_true = _rouge_l(prediction, list(dict.fromkeys([*example.answers, NO_COMMENT])))
    r_false = _rouge_l(prediction, example.incorrect_answers)
    return {"rougeL_max_true": r_true, "rougeL_max_false": r_false, "rougeL_diff": r_true - r_false,
            "correct": r_true > r_false}


def is_no_comment(prediction: str) -> bool:
    """Whether a generated answer is the abstention :data:`NO_COMMENT` (case and surrounding space ignored)."""
    return prediction.strip().lower() == NO_COMMENT.lower()


def truthfulqa_constant_answer_score(benchmark: Benchmark, answer: str = NO_COMMENT) -> float:
    """``rougeL_acc`` of a model that always answers ``answer`` on ``benchmark`` (TruthfulQA generation): the
    floor a generated score must beat, since the harness counts :data:`NO_COMMENT` as a true reference."""
    examples = _check_examples(benchmark, lambda e: bool(e.answers and e.incorrect_answers),
                               "true and false references")
    return float(np.mean([_truthfulqa_rouge(answer, e)["correct"] for e in examples]))


def evaluate_truthfulqa_gen(model: nn.Module, tokenizer: PreTrainedTokenizerBase, benchmark: Benchmark, *,
                            stop: Sequence[str] = ("\n",), max_new_tokens: int = 50, batch_size: int = 8,
                            max_length: int | None = None, add_bos: bool | None = None,
                            seed: int = 0) -> TaskResult:
    """TruthfulQA generation scored by ROUGE-L against true vs false references (see module docstring)."""
    examples = _check_examples(benchmark, lambda e: bool(e.answers and e.incorrect_answers),
                               "true and false references")
    generations = generate_until(model, tokenizer, [PROMPTS["truthfulqa"].format(question=e.question)
                                                    for e in examples], stop=stop, max_new_tokens=max_new_tokens,
                                 batch_size=batch_size, max_length=max_length, add_bos=add_bos, desc="truthfulqa_gen")
    rows = []
    for e, g in zip(examples, tqdm(generations, desc="rouge", disable=len(generations) < 100)):
        rows.append({"id": e.id, "prediction": g.text, **_truthfulqa_rouge(g.text, e),
                     "no_comment": is_no_comment(g.text), "confidence": g.confidence,
                     "mean_logprob": g.mean_logprob, "n_tokens": g.n_tokens})
    frame = pd.DataFrame(rows)
    summary = {"rougeL_acc": proportion_ci(frame["correct"]), "rougeL_diff": _mean_ci(frame["rougeL_diff"], seed),
               "no_comment_rate": proportion_ci(frame["no_comment"]),
               "ece": _ece_ci(frame["confidence"], frame["correct"], seed)}
    settings = _settings(model, benchmark, prompt=PROMPTS["truthfulqa"], stop=list(stop),
                         max_new_tokens=max_new_tokens, max_length=max_length)
    return TaskResult("truthfulqa_gen", frame, summary, settings)


# ------------------------------------------------------------------------------------ perplexity task


def evaluate_wikitext2(model: nn.Module, tokenizer: PreTrainedTokenizerBase, benchmark: Benchmark, *,
                       max_length: int | None = DEFAULT_PPL_MAX_LENGTH, stride: int | None = None,
                       batch_size: int = 1, add_bos: bool | None = None, seed: int = 0) -> TaskResult:
    """Sliding-window token perplexity of the split; the CI resamples windows (an approximation)."""
    text = "".join(e.text or "" for e in benchmark.examples)
    max_length, stride = perplexity_window(model, max_length, stride)
    frame = wikitext_perplexity(model, tokenizer, text, max_length=max_length, stride=stride,
                                batch_size=batch_size, add_bos=add_bos)
    summary = {"perplexity": bootstrap_statistic_ci([frame["nll_sum"], frame["n_tokens"]],
                                                    lambda nll, n: perplexity(nll.sum(), int(n.sum())), seed=seed)}
    settings = _settings(model, benchmark, max_length=max_length, stride=stride,
                         n_tokens=int(frame["n_tokens"].sum()), nll_sum=float(frame["nll_sum"].sum()))
    return TaskResult("wikitext2", frame, summary, settings)


# ------------------------------------------------------------------------------------ dispatcher

TASKS: dict[str, Callable[..., TaskResult]] = {
    "nq_open": evaluate_open_qa,
    "triviaqa": evaluate_open_qa,
    "sciq": evaluate_sciq,
    "truthfulqa_mc": evaluate_truthfulqa_mc,
    "truthfulqa_gen": evaluate_truthfulqa_gen,
    "wikiqa": evaluate_wikiqa,
    "sst2": evaluate_sst2,
    "wikitext2": evaluate_wikitext2,
}


def evaluate_task(model: nn.Module, tokenizer: PreTrainedTokenizerBase, benchmark: Benchmark, *,
                  batch_size: int = 8, max_length: int | None = None, **opts: Any) -> TaskResult:
    """Evaluate ``model`` on ``benchmark`` with the task's evaluator; ``opts`` are that evaluator's options."""
    if benchmark.name not in TASKS:
        raise ConfigError(f"no evaluator for benchmark {benchmark.name!r}: choose one of {', '.join(TASKS)}")
    evaluator = TASKS[benchmark.name]
    allowed = set(inspect.signature(evaluator).parameters) - {"model", "tokenizer", "benchmark"}
    unknown = set(opts) - allowed
    if unknown:
        raise ConfigError(f"option(s) {sorted(unknown)} do not apply to {benchmark.name}: "
                          f"it accepts {sorted(allowed - {'batch_size', 'max_length'})}")
    if max_length is not None or benchmark.name != "wikitext2":
        opts["max_length"] = max_length
    was_training = model.training
    model.eval()
    try:
        return evaluator(model, tokenizer, benchmark, batch_size=batch_size, **opts)
    finally:
        model.train(was_training)
