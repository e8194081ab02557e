"""Edge cases of the two answer-matching conventions."""

from __future__ import annotations

import pytest

from avss_lib.core.answer_matching import (
    LABEL_CONVENTIONS,
    alias_containment,
    exact_match,
    normalize_answer,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("The Eiffel Tower.", "eiffel tower"),
        ("  A   cat,  an  apple!  ", "cat apple"),
        ("THEORY of the Atom", "theory of atom"),  # "the" inside "theory" is not an article
        ("U.S.A.", "usa"),
        ("", ""),
        ("the a an", ""),
    ],
)
def test_normalize_answer(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


def test_exact_match_ignores_case_punctuation_and_articles() -> None:
    assert exact_match("The Beatles!", ["beatles"])
    assert exact_match("paris", ["London", "Paris."])  # any alias
    assert not exact_match("Paris, France", ["Paris"])  # extra words are not an exact match


def test_exact_match_empty_prediction_and_empty_golds() -> None:
    assert not exact_match("", ["", "paris"])
    assert not exact_match("the", ["a"])  # both normalise to empty
    assert not exact_match("paris", [""])
    assert not exact_match("paris", [])


def test_alias_containment_whole_words_only() -> None:
    assert alias_containment("I think it is Paris, France.", ["paris"])
    assert alias_containment("new york city", ["New York"])
    assert not alias_containment("the parisian cafe", ["paris"])
    assert not alias_containment("new yorker", ["new york"])
    assert not alias_containment("shipping", ["hip"])


def test_alias_containment_empty_cases() -> None:
    assert not alias_containment("", ["paris"])
    assert not alias_containment("paris", ["", "the"])  # golds that normalise to empty are ignored
    assert alias_containment("Paris", ["", "PARIS"])


def test_label_conventions_registry() -> None:
    assert set(LABEL_CONVENTIONS) == {"exact_match", "alias_containment"}
    assert LABEL_CONVENTIONS["exact_match"] is exact_match
    assert LABEL_CONVENTIONS["alias_containment"] is alias_containment
    assert LABEL_CONVENTIONS["alias_containment"]("it is paris", ["Paris"])
    assert not LABEL_CONVENTIONS["exact_match"]("it is paris", ["Paris"])
