"""Claim A1's rule as data: per-task conditions, outcomes and headline numbers on hand-made retention tables."""

from __future__ import annotations

import pandas as pd
import pytest

from avss_lib.core.verdicts import Condition, from_records, to_records
from avss_lib.pruning.verdict import A1_RULE, COUNTED, RETAINED, a1_outcome, a1_verdicts


def _retention(rows: dict[str, dict[str, tuple[float, float, float]]], uninformative: tuple[str, ...] = ()) -> pd.DataFrame:
    """A retention table from ``{method: {task: (retention, low, high)}}`` plus the unpruned rows."""
    tasks = list(dict.fromkeys(t for by_task in rows.values() for t in by_task))
    records = [{"method": "unpruned", "task_key": t, "retention": 100.0, "retention_low": 100.0,
                "retention_high": 100.0} for t in tasks]
    records += [{"method": m, "task_key": t, "retention": v[0], "retention_low": v[1], "retention_high": v[2]}
                for m, by_task in rows.items() for t, v in by_task.items()]
    frame = pd.DataFrame(records)
    return frame.assign(informative=~frame["task_key"].isin(uninformative))


TABLE = _retention({
    "avss:x": {"sst2": (44.0, 36.0, 52.0), "wikitext2": (95.0, 91.0, 99.0), "nq_open": (0.0, 0.0, 0.0)},
    "avss:y": {"sst2": (80.0, 70.0, 95.0), "wikitext2": (92.0, 85.0, 99.0), "nq_open": (0.0, 0.0, 0.0)},
    "last_k": {"sst2": (99.0, 95.0, 100.0), "wikitext2": (99.0, 95.0, 100.0), "nq_open": (0.0, 0.0, 0.0)},
}, uninformative=("nq_open",))


def test_primary_and_best_variant_with_one_condition_per_counted_task():
    primary, best = a1_verdicts(TABLE, "avss:x", ratio=0.25, k=2, n_layers=8)
    assert (primary.claim, primary.subject, primary.outcome, primary.rule) == ("A1", "avss:x", "does not hold", A1_RULE)
    assert primary.conditions == (
        Condition(RETAINED, met=False, value=44.0, threshold=90.0, low=36.0, high=52.0, group="sst2"),
        Condition(RETAINED, met=True, value=95.0, threshold=90.0, low=91.0, high=99.0, group="wikitext2"))
    assert primary.numbers == {"ratio": 0.25, "k": 2.0, "n_layers": 8.0, "threshold": 90.0, "n_counted_tasks": 2.0,
                               "retention": 44.0, "retention_low": 36.0, "retention_high": 52.0}
    assert primary.summary == "AVSS x: 44% [36, 52] retained on sst2 (worst of 2 counted task(s))"
    # the best worst case among AVSS variants (80 > 44; last_k is not an AVSS variant): both CIs reach 90
    assert best.subject == "avss:y" and best.outcome == "inconclusive"
    assert [(c.group, c.met) for c in best.conditions] == [("sst2", False), ("wikitext2", False)]
    assert best.summary == "best AVSS variant (AVSS y): 80% [70, 95] retained on sst2 (worst of 2 counted task(s))"


def test_one_verdict_when_the_primary_variant_is_the_best():
    verdicts = a1_verdicts(TABLE, "avss:y", ratio=0.25, k=2, n_layers=8)
    assert [v.subject for v in verdicts] == ["avss:y"]


def test_holds_when_every_counted_ci_is_at_or_above_the_threshold():
    table = _retention({"avss:authors_code": {"sst2": (95.0, 90.0, 99.0), "nq_open": (3.0, 0.0, 50.0)}},
                       uninformative=("nq_open",))
    (v,) = a1_verdicts(table, "avss:authors_code", ratio=0.25, k=8, n_layers=30)
    assert v.outcome == "holds" and [c.group for c in v.conditions] == ["sst2"]  # 90 is "at or above"
    assert v.summary.startswith("authors' AVSS: 95% [90, 99]")


def test_inconclusive_when_no_task_can_be_counted():
    table = _retention({"avss:x": {"sst2": (20.0, 10.0, 30.0)}}, uninformative=("sst2",))
    (v,) = a1_verdicts(table, "avss:x", ratio=0.25, k=2, n_layers=8)
    assert (v.subject, v.outcome, v.summary) == ("avss:x", "inconclusive", "no task above chance")
    assert v.conditions == (Condition(COUNTED, met=False, value=0.0, threshold=1.0),)
    assert v.numbers["n_counted_tasks"] == 0.0


def test_the_outcome_follows_from_the_stored_conditions():
    verdicts = a1_verdicts(TABLE, "avss:x", ratio=0.25, k=2, n_layers=8)
    back = from_records(to_records(verdicts))
    assert back == verdicts
    assert [a1_outcome(v.conditions) for v in back] == ["does not hold", "inconclusive"]
    missing = Condition(RETAINED, met=False, value=95.0, threshold=90.0, low=None, high=None, group="sst2")
    assert a1_outcome((missing,)) == "inconclusive"  # no interval: neither side of the threshold is shown
    assert a1_outcome(()) == "inconclusive"


@pytest.mark.parametrize(("low", "high", "outcome"), [(90.0, 95.0, "holds"), (80.0, 89.9, "does not hold"),
                                                       (80.0, 90.0, "inconclusive")])
def test_thresholds_of_the_rule(low, high, outcome):
    table = _retention({"avss:x": {"sst2": ((low + high) / 2, low, high)}})
    assert a1_verdicts(table, "avss:x", ratio=0.25, k=2, n_layers=8)[0].outcome == outcome
