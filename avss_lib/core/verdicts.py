"""Claim verdicts as data: the conditions a pre-stated rule checks, their values, and the outcome.

A chapter that tests a claim turns its tables into :class:`Verdict` objects with a rule function of its wing
(e.g. :func:`avss_lib.pruning.verdict.a1_verdicts`); the rule decides only from the :class:`Condition` values
it records, so tests check the data, not the wording. The chapter's prose and the claims chapter
(:mod:`avss_lib.book.claims`) word them. Stored as a list of dicts in the stage's ``verdict.json``
(:func:`avss_lib.core.artifacts.verdict`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from avss_lib.core.errors import DataError

#: The outcomes a claim's rule can reach; ``undefined`` when the subject itself is not determined by the data
#: (e.g. a pruned set decided by the tie rule, not by the scores).
OUTCOMES: tuple[str, ...] = ("holds", "does not hold", "inconclusive", "undefined")
#: ``primary``: the one analysis the profile pre-registered for the claim; ``exploratory``: everything else.
ANALYSES: tuple[str, ...] = ("primary", "exploratory")
#: The claims of the two papers, as the study states them.
CLAIMS: dict[str, str] = {
    "A1": "Removing the lowest-AVSS ~25% of layers keeps > 90% of performance (QA, language modelling, sentiment).",
    "E1": "HSAV and HSS locate hallucination-prone layers.",
    "E2": "Contrastive learning on those layers mitigates hallucination (up to +12% performance, up to −34% ECE).",
}
#: What each paper reports for its claim (quoted in the claims chapter).
PAPER: dict[str, str] = {
    "A1": "> 90% of the original performance kept after removing the lowest-AVSS ~25% of layers",
    "E1": "qualitative (no per-layer numbers published)",
    "E2": "up to +12% performance, up to −34% ECE",
}


@dataclass(frozen=True)
class Condition:
    """One check of a rule: a measured ``value`` against a ``threshold`` (either may be None), and whether it is met.

    ``low`` and ``high`` carry the value's confidence interval where it has one.
    """

    name: str
    met: bool
    value: float | None = None
    threshold: float | None = None
    low: float | None = None
    high: float | None = None
    group: str = ""  # what the condition is about, e.g. a task or a data set


@dataclass(frozen=True)
class Verdict:
    """The outcome of one claim's rule for one subject (a ranking, an arm, a site)."""

    claim: str
    subject: str
    outcome: str
    rule: str  # the rule, stated before the run
    conditions: tuple[Condition, ...] = ()
    summary: str = ""  # one line for the claims table: our number with its interval
    numbers: dict[str, float | None] = field(default_factory=dict)  # the headline numbers behind ``summary``
    analysis: str = "primary"  # one of ANALYSES

    def __post_init__(self) -> None:
        if self.claim not in CLAIMS:
            raise DataError(f"unknown claim {self.claim!r}: the claims are {', '.join(CLAIMS)}")
        if self.outcome not in OUTCOMES:
            raise DataError(f"unknown outcome {self.outcome!r}: a rule reaches one of {OUTCOMES}")
        if self.analysis not in ANALYSES:
            raise DataError(f"unknown analysis {self.analysis!r}: a verdict is one of {ANALYSES}")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["conditions"] = [_clean(asdict(c)) for c in self.conditions]
        data["numbers"] = _clean(dict(self.numbers))
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Verdict:
        conditions = tuple(Condition(**c) for c in data.get("conditions", ()))
        return cls(claim=data["claim"], subject=data["subject"], outcome=data["outcome"], rule=data["rule"],
                   conditions=conditions, summary=data.get("summary", ""), numbers=dict(data.get("numbers", {})),
                   analysis=data.get("analysis", "primary"))

    def condition(self, name: str, group: str = "") -> Condition:
        """The condition called ``name`` (for ``group``), with a clear error when the rule recorded none."""
        for c in self.conditions:
            if c.name == name and c.group == group:
                return c
        raise DataError(f"verdict {self.claim}/{self.subject} has no condition {name!r} for {group!r}")


def _clean(values: dict[str, Any]) -> dict[str, Any]:
    """JSON-ready: NaN and infinities become None."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()}


def to_records(verdicts: Iterable[Verdict]) -> list[dict[str, Any]]:
    """The verdicts as JSON-ready dicts (what ``verdict.json`` holds)."""
    return [v.to_dict() for v in verdicts]


def from_records(records: Sequence[Mapping[str, Any]]) -> list[Verdict]:
    """Verdicts back from ``verdict.json``; a malformed record is a :class:`DataError`."""
    try:
        return [Verdict.from_dict(r) for r in records]
    except (KeyError, TypeError) as exc:
        raise DataError(f"a verdict record is malformed ({exc}): re-run the stage that wrote it") from exc
