"""Claim A1's rule as data: the pre-registered primary, the tie condition, the exploratory verdicts, outcomes and
headline numbers on hand-made retention tables and plans."""

from __future__ import annotations

import pandas as pd
import pytest

from avss_lib.core.errors import ConfigError
from avss_lib.core.verdicts import Condition, from_records, to_records
from avss_lib.pruning.verdict import A1_RULE, COUNTED, DECIDED, RETAINED, a1_outcome, a1_verdict, a1_verdicts

Cell = tuple[float, float, float]


def _retention(raw: dict[str, dict[str, Cell]], corrected: dict[str, dict[str, Cell]] | None = None,
               uninformative: tuple[str, ...] = ()) -> pd.DataFrame:
    """A retention table from ``{method: {task: (value, low, high)}}`` (raw %, and chance-corrected: the same
    unless given) plus the unpruned rows."""
    corrected = corrected or raw
    tasks = list(dict.fromkeys(t for by_task in raw.values() for t in by_task))
    full = {"retention": 100.0, "retention_low": 100.0, "retention_high": 100.0, "chance_corrected": 100.0,
            "chance_corrected_low": 100.0, "chance_corrected_high": 100.0}
    records = [{"method": "unpruned", "task_key": t, **full} for t in tasks]
    for m, by_task in raw.items():
        for t, v in by_task.items():
            c = corrected[m][t]
            records.append({"method": m, "task_key": t, "retention": v[0], "retention_low": v[1],
                            "retention_high": v[2], "chance_corrected": c[0], "chance_corrected_low": c[1],
                            "chance_corrected_high": c[2]})
    frame = pd.DataFrame(records)
    return frame.assign(informative=~frame["task_key"].isin(uninformative))


def _plan(methods: list[str], arbitrary: tuple[str, ...] = ()) -> pd.DataFrame:
    return pd.DataFrame([{"method": m, "ratio": 0.25, "arbitrary": m in arbitrary} for m in methods])


SETTING = {"ratio": 0.25, "k": 2, "n_layers": 8}
RAW = {"avss:block_rel": {"sst2": (96.0, 92.0, 99.0), "wikitext2": (95.0, 91.0, 99.0)},
       "avss:authors_code": {"sst2": (95.0, 92.0, 99.0), "wikitext2": (93.0, 91.0, 96.0)}}
# an SST-2 model that answers one class keeps most of the raw score and none of the margin above chance
CORRECTED = {"avss:block_rel": {"sst2": (5.0, -10.0, 20.0), "wikitext2": (95.0, 91.0, 99.0)},
             "avss:authors_code": {"sst2": (92.0, 90.0, 97.0), "wikitext2": (93.0, 91.0, 96.0)}}
TABLE = _retention(RAW, CORRECTED)
PLAN = _plan(["avss:block_rel", "avss:authors_code", "last_k"])


def test_the_primary_comes_first_on_its_measure_and_the_authors_raw_verdict_is_exploratory():
    primary, authors = a1_verdicts(TABLE, PLAN, "avss:block_rel", measure="chance_corrected", **SETTING)
    assert (primary.subject, primary.analysis, primary.outcome, primary.rule) == (
        "avss:block_rel", "primary", "does not hold", A1_RULE)
    assert primary.conditions == (
        Condition(DECIDED, met=True, value=0.0, threshold=0.0),
        Condition(RETAINED, met=False, value=5.0, threshold=90.0, low=-10.0, high=20.0, group="sst2"),
        Condition(RETAINED, met=True, value=95.0, threshold=90.0, low=91.0, high=99.0, group="wikitext2"))
    assert primary.numbers == {"ratio": 0.25, "k": 2.0, "n_layers": 8.0, "threshold": 90.0, "n_counted_tasks": 2.0,
                               "retention": 5.0, "retention_low": -10.0, "retention_high": 20.0,
                               "detectable_shortfall": 15.0}  # sst2's half-width (15) beats wikitext2's (4)
    assert primary.summary == ("AVSS block rel: 5% [-10, 20] retained above chance on sst2 "
                               "(worst of 2 counted task(s))")
    assert (authors.subject, authors.analysis, authors.outcome) == ("avss:authors_code", "exploratory", "holds")
    assert authors.summary.startswith("authors' AVSS, raw %: 93% [91, 96] retained on wikitext2")


def test_the_measure_decides_the_outcome():
    raw = a1_verdict(TABLE, "avss:block_rel", measure="raw", arbitrary=False, **SETTING)
    corrected = a1_verdict(TABLE, "avss:block_rel", measure="chance_corrected", arbitrary=False, **SETTING)
    assert (raw.outcome, corrected.outcome) == ("holds", "does not hold")
    assert raw.condition(RETAINED, "sst2").low == 92.0 and corrected.condition(RETAINED, "sst2").high == 20.0
    with pytest.raises(ConfigError, match="retention measure"):
        a1_verdict(TABLE, "avss:block_rel", measure="corrected", arbitrary=False, **SETTING)


def test_a_set_decided_by_ties_is_undefined_whatever_the_numbers():
    plan = _plan(["avss:block_rel", "avss:authors_code"], arbitrary=("avss:authors_code",))
    primary, authors = a1_verdicts(TABLE, plan, "avss:block_rel", measure="chance_corrected", **SETTING)
    assert primary.outcome == "does not hold"
    assert authors.outcome == "undefined" and authors.condition(DECIDED).met is False  # its numbers "hold"
    assert authors.summary == "authors' AVSS, raw %: pruned set decided by ties"
    (only,) = a1_verdicts(TABLE, plan, "avss:authors_code", measure="raw", **SETTING)
    assert (only.analysis, only.outcome) == ("primary", "undefined")


def test_the_held_out_best_variant_is_exploratory_and_scored_on_its_own_table():
    scored = _retention({"avss:authors_code": {"sst2": (91.0, 90.0, 95.0)}})
    verdicts = a1_verdicts(TABLE, PLAN, "avss:block_rel", measure="raw", held_out=("avss:authors_code", scored),
                           **SETTING)
    assert [(v.subject, v.analysis) for v in verdicts] == [
        ("avss:block_rel", "primary"), ("avss:authors_code", "exploratory"), ("avss:authors_code", "exploratory")]
    best = verdicts[2]
    assert best.outcome == "holds" and [c.group for c in best.conditions if c.name == RETAINED] == ["sst2"]
    assert best.summary.startswith("best AVSS variant on held-out examples (AVSS authors code): 91% [90, 95]")


def test_each_outcome_is_reachable_from_the_per_task_intervals():
    for (low, high), outcome in [((90.0, 95.0), "holds"), ((80.0, 89.9), "does not hold"),
                                 ((80.0, 90.0), "inconclusive")]:
        table = _retention({"avss:x": {"sst2": ((low + high) / 2, low, high)}})
        v = a1_verdict(table, "avss:x", measure="raw", arbitrary=False, **SETTING)
        assert v.outcome == outcome
        assert a1_verdict(table, "avss:x", measure="raw", arbitrary=True, **SETTING).outcome == "undefined"


def test_inconclusive_when_no_task_can_be_counted():
    table = _retention({"avss:x": {"sst2": (20.0, 10.0, 30.0)}}, uninformative=("sst2",))
    (v,) = a1_verdicts(table, _plan(["avss:x"]), "avss:x", measure="chance_corrected", **SETTING)
    assert (v.subject, v.outcome, v.summary) == ("avss:x", "inconclusive", "AVSS x: no task above chance")
    assert v.condition(COUNTED) == Condition(COUNTED, met=False, value=0.0, threshold=1.0)
    assert v.numbers["n_counted_tasks"] == 0.0


def test_the_primary_must_be_planned():
    with pytest.raises(ConfigError, match="not in the plan"):
        a1_verdicts(TABLE, PLAN, "avss:mlp_rel", measure="raw", **SETTING)


def test_the_outcome_follows_from_the_stored_conditions():
    verdicts = a1_verdicts(TABLE, PLAN, "avss:block_rel", measure="chance_corrected", **SETTING)
    back = from_records(to_records(verdicts))
    assert back == verdicts
    assert [a1_outcome(v.conditions) for v in back] == [v.outcome for v in verdicts] == ["does not hold", "holds"]
    missing = Condition(RETAINED, met=False, value=95.0, threshold=90.0, low=None, high=None, group="sst2")
    assert a1_outcome((missing,)) == "inconclusive"  # no interval: neither side of the threshold is shown
    assert a1_outcome(()) == "inconclusive"
    assert a1_outcome((Condition(DECIDED, met=False), missing)) == "undefined"
