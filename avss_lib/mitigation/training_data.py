"""Chapter 05's data: the question-disjoint split of chapter 04's answers, the contrastive training examples,
the held-out evaluation sets and the WikiText-2 prefix scored for perplexity.

1. **Split.** Chapter 04 split every data set's questions into a selection half and an evaluation half before it
   chose any layer (the ``QUESTION_SPLIT`` artifact, :func:`avss_lib.core.splits.split_datasets`); :func:`split_for`
   checks it covers this chapter's data sets. Training (and anything tuned) uses the selection half, every score the
   evaluation half, so no evaluated question — not even a re-cased or re-punctuated copy — chose the EAVSS layers
   or was trained on.
2. **Training examples.** :func:`build_training_frame` turns the *selection* half into contrastive examples, one
   per question, with the prompt chapter 04 showed the model (its ``prompt`` column):

   - ``nq_open`` / ``triviaqa``: positive = the first gold answer (TriviaQA: the most central alias,
     :func:`central_alias`); negative = the model's own greedy answer when it is a hallucination (wrong under
     exact match *and* under alias containment, and not empty — an answer one convention accepts is never
     pushed away);
   - ``sciq`` / ``wikiqa``: positive = the correct option (the first correct sentence for WikiQA); negative =
     the option the model wrongly chose;
   - ``truthfulqa_mc``: positive = TruthfulQA's best answer; negatives = its incorrect answers (from the
     generation view of the same question), whatever the model chose.

   Answers are prefixed with a space, as the evaluator scores them. At most ``max_negatives`` negatives are
   kept per question. Questions without a negative are left out of training (the contrastive term needs
   one); a data set left with none raises :class:`~avss_lib.core.errors.DataError`.
3. **Evaluation sets.** :func:`eval_benchmarks` keeps the evaluation half of each data set (at most ``n_eval``
   examples, :func:`avss_lib.core.splits.side_examples`); :func:`perplexity_benchmark` is a fixed prefix of
   the WikiText-2 test split (the language-modelling cost of a fine-tune).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from avss_lib.core.answer_matching import normalize_answer
from avss_lib.core.benchmarks import Benchmark, Example, load_benchmark
from avss_lib.core.errors import ConfigError, DataError
from avss_lib.core.splits import EVALUATION, SELECTION, SPLIT_COLUMNS, side_examples
from avss_lib.mitigation.contrastive_loss import ContrastiveExample

#: The five data sets of claim E2 (names as in chapter 04's ``ANSWERS`` artifact).
DATASETS: tuple[str, ...] = ("nq_open", "triviaqa", "sciq", "truthfulqa_mc", "wikiqa")
OPEN_QA: tuple[str, ...] = ("nq_open", "triviaqa")
#: The columns of chapter 04's answers this chapter reads.
ANSWER_COLUMNS: tuple[str, ...] = ("dataset", "id", "question", "prompt", "prediction", "confidence", "correct",
                                   "correct_exact_match", "correct_alias_containment")


def check_answers(answers: pd.DataFrame, datasets: Sequence[str]) -> pd.DataFrame:
    """Validate chapter 04's answers for ``datasets``; return those rows with ``id`` as str."""
    missing = [c for c in ANSWER_COLUMNS if c not in answers.columns]
    if missing:
        raise DataError(f"answers table lacks column(s) {missing}: re-run chapter 04 (it writes {list(ANSWER_COLUMNS)})")
    unknown = [d for d in datasets if d not in DATASETS]
    if unknown:
        raise ConfigError(f"unknown dataset(s) {unknown}: choose from {', '.join(DATASETS)}")
    absent = [d for d in datasets if not (answers["dataset"] == d).any()]
    if absent:
        raise DataError(f"chapter 04's answers have no rows for {absent}: add them to chapter 04's datasets "
                        "or drop them from this chapter's datasets")
    rows = answers[answers["dataset"].isin(list(datasets))].copy()
    rows["id"] = rows["id"].astype(str)
    dup = rows.duplicated(["dataset", "id"])
    if dup.any():
        raise DataError(f"answers table repeats (dataset, id) {rows[dup].iloc[0][['dataset', 'id']].tolist()}: "
                        "each example must be answered once")
    no_prompt = rows[~rows["prompt"].map(lambda p: isinstance(p, str) and p != "")]
    if len(no_prompt):
        raise DataError(f"answers of {no_prompt.iloc[0]['dataset']} id {no_prompt.iloc[0]['id']} have no prompt: "
                        "re-run chapter 04 (it records the context it showed the model)")
    return rows.reset_index(drop=True)


def split_for(question_split: pd.DataFrame, answers: pd.DataFrame, datasets: Sequence[str]) -> pd.DataFrame:
    """Chapter 04's question split restricted to ``datasets``, checked against its answers (every answered
    example on exactly one side, nothing else)."""
    rows = check_answers(answers, datasets)
    missing = [c for c in SPLIT_COLUMNS if c not in question_split.columns]
    if missing:
        raise DataError(f"the question split lacks column(s) {missing}: re-run chapter 04 (it writes the split)")
    split = question_split[question_split["dataset"].isin(list(datasets))].assign(id=lambda f: f["id"].astype(str))
    for name in datasets:
        answered = set(rows.loc[rows["dataset"] == name, "id"])
        sides = split[split["dataset"] == name]
        if set(sides["id"]) != answered or sides["id"].duplicated().any():
            raise DataError(f"chapter 04's question split of {name} does not match its answers: re-run chapter 04")
        if not {SELECTION, EVALUATION} <= set(sides["split"]):
            raise DataError(f"chapter 04's question split of {name} has an empty side: give it more examples")
    return split[list(SPLIT_COLUMNS)].reset_index(drop=True)


def load_benchmarks(datasets: Sequence[str], data_root: str | None) -> dict[str, Benchmark]:
    """Every benchmark the chapter needs, in full (``truthfulqa_gen`` too when ``truthfulqa_mc`` is used)."""
    names = list(datasets) + (["truthfulqa_gen"] if "truthfulqa_mc" in datasets else [])
    return {name: load_benchmark(name, data_root=data_root) for name in names}


def _by_id(benchmark: Benchmark, ids: Sequence[str], dataset: str) -> dict[str, Example]:
    index = {e.id: e for e in benchmark.examples}
    missing = [i for i in ids if i not in index]
    if missing:
        raise DataError(f"{len(missing)} {dataset} ids of chapter 04 (first: {missing[:3]}) are not in benchmark "
                        f"{benchmark.name!r} split {benchmark.provenance.get('split')!r}: load the split chapter 04 used")
    return index


def central_alias(aliases: Sequence[str]) -> str:
    """The alias most similar to the others (sum of word-set Jaccard after answer normalisation; ties: first).

    TriviaQA's alias lists put misspellings and page titles first ("Woody Harelson", ..., "Woody Harrelson"),
    so the first alias is a poor training target; the central one is usually the canonical name.
    """
    words = [set(normalize_answer(a).split()) for a in aliases]

    def score(i: int) -> float:
        return sum(len(words[i] & w) / len(words[i] | w) for j, w in enumerate(words) if j != i and words[i] | w)

    return aliases[max(range(len(aliases)), key=lambda i: (score(i), -i))]


def _positive_and_negatives(dataset: str, row: Any, example: Example, tqa_gen: Mapping[str, Example] | None
                            ) -> tuple[str | None, list[str]]:
    """Gold answer and negative answers (without the leading space) of one answers row."""
    prediction = str(row.prediction).strip()
    if dataset in OPEN_QA:
        wrong = not bool(row.correct_exact_match) and not bool(row.correct_alias_containment) and prediction != ""
        gold = (central_alias(example.answers) if dataset == "triviaqa" else example.answers[0]) if example.answers else None
        return gold, ([prediction] if wrong else [])
    if dataset == "sciq":
        gold = example.choices[example.label]  # type: ignore[index]
        return gold, ([prediction] if not bool(row.correct) and prediction != gold else [])
    if dataset == "wikiqa":
        if not example.correct_choices:
            return None, []
        golds = [example.choices[i] for i in example.correct_choices]  # type: ignore[index]
        return golds[0], ([prediction] if not bool(row.correct) and prediction not in golds else [])
    gen = (tqa_gen or {}).get(example.id)  # truthfulqa_mc
    if gen is None:
        raise DataError(f"TruthfulQA question {example.id} has no generation-view record: load truthfulqa_gen too")
    return gen.answers[0], list(gen.incorrect_answers)


def build_training_frame(answers: pd.DataFrame, split: pd.DataFrame, benchmarks: Mapping[str, Benchmark], *,
                         max_negatives: int = 4) -> pd.DataFrame:
    """One row per train-side question: ``dataset, id, question, prompt, positive, negatives, hallucinated, usable``.

    ``negatives`` is a list (possibly empty: such rows are kept, flagged ``usable = False``, so the chapter can
    count them). Raises :class:`DataError` for a data set with no usable negative in the selection half.
    """
    if max_negatives < 1:
        raise ConfigError(f"max_negatives={max_negatives} must be >= 1")
    train_ids = split[split["split"] == SELECTION][["dataset", "id"]]
    rows = check_answers(answers, list(split["dataset"].unique())).merge(train_ids, on=["dataset", "id"], how="inner")
    records = []
    for name in split["dataset"].unique():
        sub = rows[rows["dataset"] == name]
        index = _by_id(benchmarks[name], sub["id"].tolist(), name)
        tqa_gen = ({e.id: e for e in benchmarks["truthfulqa_gen"].examples}
                   if name == "truthfulqa_mc" and "truthfulqa_gen" in benchmarks else None)
        for row in sub.itertuples(index=False):
            positive, negatives = _positive_and_negatives(name, row, index[row.id], tqa_gen)
            negatives = list(dict.fromkeys(n for n in negatives if n and n != positive))[:max_negatives]
            records.append({"dataset": name, "id": row.id, "question": row.question, "prompt": row.prompt,
                            "positive": None if positive is None else " " + positive.strip(),
                            "negatives": [" " + n.strip() for n in negatives],
                            "hallucinated": not bool(row.correct),
                            "usable": positive is not None and bool(negatives)})
    frame = pd.DataFrame(records)
    empty = [d for d in split["dataset"].unique() if frame.empty or not frame[frame["dataset"] == d]["usable"].any()]
    if empty:
        raise DataError(f"dataset(s) {empty} have no hallucinated answer in the selection half to use as a negative: "
                        "the contrastive term needs one; drop them from datasets or give chapter 04 more examples")
    return frame


def to_examples(frame: pd.DataFrame) -> list[ContrastiveExample]:
    """The usable rows of :func:`build_training_frame` as :class:`ContrastiveExample` records (id ``dataset:id``)."""
    used = frame[frame["usable"]]
    return [ContrastiveExample(f"{r.dataset}:{r.id}", r.prompt, r.positive, tuple(r.negatives))
            for r in used.itertuples(index=False)]


def hold_out_validation(examples: Sequence[ContrastiveExample], fraction: float, *, seed: int = 0
                        ) -> tuple[list[ContrastiveExample], list[ContrastiveExample]]:
    """Split the training examples (one per selection-half question) into training and a validation slice of
    ``fraction`` of them (seeded; at least one each when ``fraction > 0``), the slice that early stopping reads."""
    if not 0 <= fraction < 1:
        raise ConfigError(f"validation_fraction={fraction} must lie in [0, 1)")
    if fraction == 0:
        return list(examples), []
    if len(examples) < 2:
        raise DataError(f"{len(examples)} training example(s) cannot be split for early stopping: label more")
    order = np.random.default_rng(seed).permutation(len(examples))
    n_val = min(len(examples) - 1, max(1, round(fraction * len(examples))))
    held = set(order[:n_val].tolist())
    return ([e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held])


def eval_benchmarks(split: pd.DataFrame, benchmarks: Mapping[str, Benchmark], *, n_eval: int | None = None,
                    seed: int = 0) -> dict[str, Benchmark]:
    """The evaluation half of each data set as a :class:`Benchmark` (at most ``n_eval`` examples, seeded)."""
    out = {}
    for name in split["dataset"].unique():
        examples = side_examples(split, benchmarks[name], EVALUATION, n=n_eval, seed=seed)
        if not examples:
            raise DataError(f"the held-out part of {name} is empty: give chapter 04 more {name} examples")
        provenance = {**benchmarks[name].provenance, "held_out": len(examples), "n_eval": n_eval, "split_seed": seed}
        out[name] = Benchmark(name=name, examples=examples, provenance=provenance)
    return out


def selection_questions(split: pd.DataFrame, benchmarks: Mapping[str, Benchmark], *, n: int | None = None,
                        seed: int = 0) -> dict[str, Benchmark]:
    """At most ``n`` questions of each data set's selection half (seeded): what tunes the intervention's strength."""
    return {name: Benchmark(name, side_examples(split, benchmarks[name], SELECTION, n=n, seed=seed),
                            {**benchmarks[name].provenance, "tune_n": n}) for name in split["dataset"].unique()}


def perplexity_benchmark(data_root: str | None, n_chars: int | None) -> Benchmark | None:
    """The first ``n_chars`` characters of the WikiText-2 test split as a one-example benchmark.

    ``n_chars=None`` takes the whole split; ``0`` returns None (perplexity skipped).
    """
    if n_chars == 0:
        return None
    full = load_benchmark("wikitext2", data_root=data_root)
    text = (full.examples[0].text or "")[:n_chars]
    return Benchmark("wikitext2", [Example(id="wikitext2-test-prefix", text=text)],
                     {**full.provenance, "chars": len(text)})

