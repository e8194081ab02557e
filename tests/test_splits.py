"""Question-level train/eval splits: disjoint, seeded, duplicate-safe, fraction-respecting."""

from __future__ import annotations

import pytest

from avss_lib.core.errors import ConfigError, DataError
from avss_lib.core.splits import normalize_question, split_by_question


def _questions(n: int) -> tuple[list[str], list[str]]:
    return [f"q{i}" for i in range(n)], [f"What is item number {i}?" for i in range(n)]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Who  wrote 'Emma'?", "who wrote emma"),
        ("  WHAT is\tthe U.S.A.?\n", "what is the usa"),
        ("¿Qué es «esto»?", "qué es esto"),
        ("", ""),
    ],
)
def test_normalize_question(raw: str, expected: str) -> None:
    assert normalize_question(raw) == expected


def test_split_is_disjoint_and_complete() -> None:
    ids, questions = _questions(20)
    split = split_by_question(ids, questions, eval_fraction=0.3, seed=1)
    assert set(split.train_ids).isdisjoint(split.eval_ids)
    assert sorted(split.train_ids + split.eval_ids) == sorted(ids)
    assert list(split.frame.columns) == ["id", "question", "question_norm", "group", "split"]
    assert split.frame.loc[split.frame.split == "eval", "id"].tolist() == split.eval_ids


def test_fraction_is_exact_without_duplicates() -> None:
    ids, questions = _questions(20)
    assert len(split_by_question(ids, questions, eval_fraction=0.3, seed=1).eval_ids) == 6
    assert len(split_by_question(ids, questions, eval_fraction=0.5, seed=2).eval_ids) == 10


def test_deterministic_by_seed_and_independent_of_order() -> None:
    ids, questions = _questions(30)
    a = split_by_question(ids, questions, eval_fraction=0.5, seed=7)
    b = split_by_question(ids, questions, eval_fraction=0.5, seed=7)
    c = split_by_question(ids, questions, eval_fraction=0.5, seed=8)
    reversed_ = split_by_question(ids[::-1], questions[::-1], eval_fraction=0.5, seed=7)
    assert a.eval_ids == b.eval_ids
    assert set(a.eval_ids) != set(c.eval_ids)  # 30 choose 15 splits: a collision would be a bug
    assert set(reversed_.eval_ids) == set(a.eval_ids)


def test_duplicates_land_on_the_same_side() -> None:
    ids, questions = _questions(12)
    ids += ["dupA", "dupB", "dupC"]
    questions += ["what is ITEM number 3", "What is item   number 3!!", "WHAT IS ITEM NUMBER 5?"]
    for seed in range(10):
        frame = split_by_question(ids, questions, eval_fraction=0.4, seed=seed).frame.set_index("id")
        assert frame.loc["dupA", "split"] == frame.loc["dupB", "split"] == frame.loc["q3", "split"]
        assert frame.loc["dupC", "split"] == frame.loc["q5", "split"]
        assert frame.loc["dupA", "group"] == frame.loc["q3", "group"]
        assert len(frame[frame.split == "eval"]) <= round(0.4 * 15)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_bad_fraction_raises(fraction: float) -> None:
    ids, questions = _questions(10)
    with pytest.raises(ConfigError, match="eval_fraction"):
        split_by_question(ids, questions, eval_fraction=fraction)


def test_one_empty_side_raises() -> None:
    ids, questions = _questions(3)
    with pytest.raises(ConfigError, match="one side empty"):
        split_by_question(ids, questions, eval_fraction=0.1)


def test_bad_inputs_raise() -> None:
    with pytest.raises(DataError, match="more than once"):
        split_by_question(["a", "a"], ["x", "y"])
    with pytest.raises(DataError, match="one question per id"):
        split_by_question(["a", "b"], ["x"])
    with pytest.raises(DataError, match="no examples"):
        split_by_question([], [])
