"""Split a dataset by question into train and held-out eval parts, with duplicates kept together, and the
study's benchmarks into a selection half and an evaluation half (:func:`split_datasets`).

Two examples are *duplicates* when their normalised question strings are equal (see
:func:`normalize_question`). A split assigns whole duplicate groups to one side, so no eval question is
ever trained on, not even as a differently cased or punctuated copy. The assignment depends only on the
set of (id, question) pairs and the seed, not on their order.
"""

from __future__ import annotations

import random
import re
import unicodedata
from dataclasses import dataclass
from typing import Sequence

import pandas as pd

from avss_lib.core.benchmarks import Benchmark, Example, subsample
from avss_lib.core.errors import ConfigError, DataError

_WHITESPACE = re.compile(r"\s+")


def normalize_question(text: str) -> str:
    """Lowercase, drop Unicode punctuation, collapse whitespace: ``"Who  wrote 'Emma'?"`` -> ``"who wrote emma"``."""
    kept = "".join(ch for ch in text.lower() if not unicodedata.category(ch).startswith("P"))
    return _WHITESPACE.sub(" ", kept).strip()


@dataclass(frozen=True)
class QuestionSplit:
    """Train and eval ids, and a table with one row per example (``id, question, question_norm, group, split``)."""

    train_ids: list[str]
    eval_ids: list[str]
    frame: pd.DataFrame


def split_by_question(
    ids: Sequence[str],
    questions: Sequence[str],
    *,
    eval_fraction: float = 0.5,
    seed: int = 0,
) -> QuestionSplit:
    """Split examples into train and eval by duplicate group, with a fixed ``seed``.

    Groups are shuffled (after sorting by normalised text, so input order does not matter) and each is put
    on the eval side while it fits under ``round(eval_fraction * len(ids))`` examples, otherwise on the train
    side. Without duplicates the eval side has exactly that many examples; with duplicates, at most that
    many.
    """
    ids, questions = [str(i) for i in ids], list(questions)
    _check_inputs(ids, questions, eval_fraction)
    norms = [normalize_question(q) for q in questions]
    keys = sorted(set(norms))
    random.Random(seed).shuffle(keys)
    group_of = {key: g for g, key in enumerate(keys)}
    sizes = pd.Series(norms).value_counts().to_dict()
    eval_keys = _fill_eval(keys, sizes, round(eval_fraction * len(ids)))
    if not eval_keys or len(eval_keys) == len(keys):
        raise ConfigError(
            f"eval_fraction={eval_fraction} leaves one side empty for {len(ids)} examples in {len(keys)} "
            "question groups: use a fraction nearer 0.5 or more examples"
        )
    split = ["eval" if n in eval_keys else "train" for n in norms]
    frame = pd.DataFrame(
        {"id": ids, "question": questions, "question_norm": norms, "group": [group_of[n] for n in norms], "split": split}
    )
    return QuestionSplit(
        train_ids=[i for i, s in zip(ids, split) if s == "train"],
        eval_ids=[i for i, s in zip(ids, split) if s == "eval"],
        frame=frame,
    )


def _check_inputs(ids: list[str], questions: list[str], eval_fraction: float) -> None:
    if len(ids) != len(questions):
        raise DataError(f"{len(ids)} ids but {len(questions)} questions: pass one question per id")
    if not ids:
        raise DataError("no examples to split: check that the dataset loaded")
    if len(set(ids)) != len(ids):
        dup = pd.Series(ids)[pd.Series(ids).duplicated()].iloc[0]
        raise DataError(f"example id {dup!r} occurs more than once: ids must be unique")
    if not 0 < eval_fraction < 1:
        raise ConfigError(f"eval_fraction={eval_fraction} must lie strictly between 0 and 1")


def _fill_eval(keys: list[str], sizes: dict[str, int], target: int) -> set[str]:
    """Greedily take groups, in ``keys`` order, that fit under ``target`` examples."""
    chosen: set[str] = set()
    total = 0
    for key in keys:
        if total + sizes[key] <= target:
            chosen.add(key)
            total += sizes[key]
    return chosen


#: The two halves of :func:`split_datasets`: what chooses (layers, probes, strengths) and trains, and what is scored.
SELECTION, EVALUATION = "selection", "evaluation"
#: Columns of :func:`split_datasets` (the ``QUESTION_SPLIT`` artifact).
SPLIT_COLUMNS: tuple[str, ...] = ("dataset", "id", "question", "question_norm", "group", "split")


def split_datasets(rows: pd.DataFrame, datasets: Sequence[str], *, evaluation_fraction: float = 0.5,
                   seed: int = 0) -> pd.DataFrame:
    """Split every data set's examples by question into a selection half and an evaluation half.

    ``rows`` needs columns ``dataset``, ``id`` and ``question``. The split is made once, before anything is
    chosen: chapter 04 chooses layers and fits probes on the ``selection`` half only, chapter 05 trains and
    tunes on it and scores on the ``evaluation`` half only. Each data set is split by
    :func:`split_by_question` (duplicate questions kept together, ``eval_fraction=evaluation_fraction``).
    Returns :data:`SPLIT_COLUMNS`, ``split`` being :data:`SELECTION` or :data:`EVALUATION`.
    """
    missing = [c for c in ("dataset", "id", "question") if c not in rows.columns]
    if missing:
        raise DataError(f"the rows to split lack column(s) {missing}: pass the ANSWERS table of chapter 04")
    parts = []
    for name in datasets:
        sub = rows[rows["dataset"] == name]
        if sub.empty:
            raise DataError(f"no {name} examples to split: add {name} to the answered data sets")
        split = split_by_question(sub["id"].astype(str).tolist(), sub["question"].tolist(),
                                  eval_fraction=evaluation_fraction, seed=seed)
        sides = split.frame["split"].map({"train": SELECTION, "eval": EVALUATION})
        parts.append(split.frame.assign(dataset=name, split=sides)[list(SPLIT_COLUMNS)])
    return pd.concat(parts, ignore_index=True)


def side_ids(split: pd.DataFrame, dataset: str, side: str) -> list[str]:
    """The ids of one data set's ``side`` (:data:`SELECTION` or :data:`EVALUATION`) of :func:`split_datasets`."""
    if side not in (SELECTION, EVALUATION):
        raise ConfigError(f"side={side!r} is unknown: use {SELECTION!r} or {EVALUATION!r}")
    rows = split[split["dataset"] == dataset]
    if rows.empty:
        raise DataError(f"the question split has no {dataset} rows: add {dataset} to chapter 04's datasets")
    return rows.loc[rows["split"] == side, "id"].astype(str).tolist()


def side_examples(split: pd.DataFrame, benchmark: Benchmark, side: str, *, n: int | None = None,
                  seed: int = 0) -> list[Example]:
    """The examples of ``benchmark`` on one ``side`` of the split, in split order, without those that cannot be
    answered correctly (a WikiQA question with no correct sentence), at most ``n`` of them (seeded subsample)."""
    ids = side_ids(split, benchmark.name, side)
    index = {e.id: e for e in benchmark.examples}
    missing = [i for i in ids if i not in index]
    if missing:
        raise DataError(f"{len(missing)} {benchmark.name} ids of the split (first: {missing[:3]}) are not in "
                        f"benchmark split {benchmark.provenance.get('split')!r}: load the split chapter 04 used")
    examples = [index[i] for i in ids if index[i].correct_choices != ()]
    return subsample(examples, n if n is not None and len(examples) > n else None, seed)
