"""Answer matching for generative QA: the two hallucination-label conventions.

A generated answer is *correct* under a convention when it matches one of the gold answers (aliases);
otherwise it is a hallucination. Both conventions compare SQuAD / lm-evaluation-harness normalised text:
lower-cased, punctuation removed, the articles *a*, *an*, *the* removed, whitespace collapsed.

- ``exact_match``: the normalised prediction equals some normalised gold answer (NQ-open, TriviaQA in
  lm-evaluation-harness).
- ``alias_containment``: some normalised gold answer occurs as a whole-word span inside the normalised
  prediction (lenient: "it is paris france" contains "paris", "parisian" does not).

An empty (after normalisation) prediction is never correct; empty gold strings are ignored.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)

#: A matching convention: (prediction, gold answers) -> correct?
MatchFn = Callable[[str, Sequence[str]], bool]


def normalize_answer(s: str) -> str:
    """Lower-case, drop punctuation and the articles a/an/the, and collapse whitespace (SQuAD style)."""
    text = s.lower().translate(_PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _normalized_golds(golds: Sequence[str]) -> list[str]:
    """Normalised gold answers with the empty ones removed."""
    return [g for g in (normalize_answer(gold) for gold in golds) if g]


def exact_match(prediction: str, golds: Sequence[str]) -> bool:
    """True when the normalised prediction equals some non-empty normalised gold answer."""
    pred = normalize_answer(prediction)
    return bool(pred) and pred in _normalized_golds(golds)


def alias_containment(prediction: str, golds: Sequence[str]) -> bool:
    """True when some non-empty normalised gold answer is a whole-word span of the normalised prediction."""
    padded = f" {normalize_answer(prediction)} "
    return padded.strip() != "" and any(f" {gold} " in padded for gold in _normalized_golds(golds))


#: Convention name -> matching function.
LABEL_CONVENTIONS: dict[str, MatchFn] = {
    "exact_match": exact_match,
    "alias_containment": alias_containment,
}
