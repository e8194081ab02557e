"""Claim A1's rule, stated before the run, applied to the retention table: one pre-registered primary
:class:`~avss_lib.core.verdicts.Verdict` and labelled exploratory ones.

The profile names the primary before the run: one AVSS variant (``primary_variant``) and one retention measure
(``primary_retention``: :data:`MEASURES`). The exploratory verdicts apply the same rule to the authors' variant
with the paper's raw % and to the AVSS variant with the best worst-case retention, chosen on a seeded half of
each task's examples and scored on the other half (:func:`avss_lib.pruning.retention.held_out_best`).

A task is *counted* when its unpruned score is above chance (``informative`` in the retention table). For each
counted task the rule records one :class:`~avss_lib.core.verdicts.Condition`: the retention with its
paired-bootstrap 95% CI against :data:`RETENTION_THRESHOLD`, met when the CI's lower end is at or above it. A
pruned set that contains a layer with an infinite score was ordered by the tie rule, not by the scores: the
verdict is then ``undefined`` (condition :data:`DECIDED`).

The minimum detectable effect at the run's sizes is recorded beside the outcome (``detectable_shortfall``): the
widest CI half-width over the counted tasks. A true retention less than that far from the threshold gives
``inconclusive``; one further below gives ``does not hold`` about as often as its interval covers it.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from avss_lib.core.errors import ConfigError
from avss_lib.core.formatting import percent
from avss_lib.core.verdicts import Condition, Verdict
from avss_lib.pruning.plan import method_label

RETENTION_THRESHOLD = 90.0  # claim A1: "keeps over 90% of the original performance"
#: The retention measures a profile can pre-register, and their columns in the retention table.
MEASURES: dict[str, str] = {"raw": "retention", "chance_corrected": "chance_corrected"}
A1_RULE = ("holds when the paired-bootstrap 95% CI of the retention lies at or above 90% on every counted task "
           "(unpruned score above chance); does not hold when it lies below 90% on at least one counted task; "
           "inconclusive otherwise or when no task can be counted; undefined when the pruned set was decided by "
           "ties (a selected layer's score is infinite)")
RETAINED = "retention CI at or above the threshold"  # the name of each counted task's condition
COUNTED = "tasks counted"  # the condition recorded when no task can be counted
DECIDED = "pruned set decided by the scores"  # met unless a selected layer's score is infinite


def a1_outcome(conditions: Sequence[Condition]) -> str:
    """The outcome :data:`A1_RULE` gives from the per-task conditions alone: ``undefined`` when :data:`DECIDED`
    is not met, ``holds`` when every counted task's condition is met, ``does not hold`` when a CI lies entirely
    below its threshold, else (or with no counted task) ``inconclusive``."""
    if any(c.name == DECIDED and not c.met for c in conditions):
        return "undefined"
    counted = [c for c in conditions if c.name == RETAINED]
    if counted and all(c.met for c in counted):
        return "holds"
    if any(c.high is not None and c.threshold is not None and c.high < c.threshold for c in counted):
        return "does not hold"
    return "inconclusive"


def _label(method: str) -> str:
    return "authors' AVSS" if method == "avss:authors_code" else method_label(method)


def a1_verdict(retention: pd.DataFrame, method: str, *, measure: str, arbitrary: bool, ratio: float, k: int,
               n_layers: int, analysis: str = "primary", label: str | None = None) -> Verdict:
    """Claim A1 for one AVSS ``method`` under :data:`A1_RULE`, on the ``measure`` column of ``retention``
    (:func:`avss_lib.pruning.retention.retention_table` at ``ratio``). ``arbitrary``: the method's pruned set
    was decided by ties (the plan's ``arbitrary``)."""
    if measure not in MEASURES:
        raise ConfigError(f"unknown retention measure {measure!r}: use one of {sorted(MEASURES)}")
    column = MEASURES[measure]
    label = label or _label(method)
    setting = {"ratio": float(ratio), "k": float(k), "n_layers": float(n_layers), "threshold": RETENTION_THRESHOLD}
    decided = Condition(DECIDED, met=not arbitrary, value=float(arbitrary), threshold=0.0)
    g = retention[retention["informative"] & (retention["method"] == method)].set_index("task_key")
    if g.empty:
        none = Condition(COUNTED, met=False, value=0.0, threshold=1.0)
        conditions = (decided, none)
        return Verdict("A1", method, a1_outcome(conditions), A1_RULE, conditions, summary=f"{label}: no task above chance",
                       numbers={**setting, "n_counted_tasks": 0.0}, analysis=analysis)
    low, high = f"{column}_low", f"{column}_high"
    conditions = (decided, *(Condition(RETAINED, met=bool(r[low] >= RETENTION_THRESHOLD), value=float(r[column]),
                                       threshold=RETENTION_THRESHOLD, low=float(r[low]), high=float(r[high]),
                                       group=str(key))
                             for key, r in g.iterrows()))
    t = g[column].idxmin()
    summary = (f"{label}: {percent(g.loc[t, column])}% [{percent(g.loc[t, low])}, {percent(g.loc[t, high])}] "
               f"{'retained' if measure == 'raw' else 'retained above chance'} on {t} "
               f"(worst of {len(g)} counted task(s))")
    if arbitrary:
        summary = f"{label}: pruned set decided by ties"
    numbers = {**setting, "n_counted_tasks": float(len(g)), "retention": float(g.loc[t, column]),
               "retention_low": float(g.loc[t, low]), "retention_high": float(g.loc[t, high]),
               "detectable_shortfall": float(((g[high] - g[low]) / 2).max())}
    return Verdict("A1", method, a1_outcome(conditions), A1_RULE, conditions, summary, numbers, analysis=analysis)


def a1_verdicts(retention: pd.DataFrame, plan: pd.DataFrame, primary: str, *, measure: str, ratio: float, k: int,
                n_layers: int, held_out: tuple[str, pd.DataFrame] | None = None) -> list[Verdict]:
    """The primary verdict (``primary`` on ``measure``) first, then the exploratory ones: the authors' variant
    on the paper's raw % (unless that is the primary) and, given ``held_out`` = (method, retention on the
    scoring half) from :func:`avss_lib.pruning.retention.held_out_best`, the best variant chosen on the other
    half. ``plan``: :data:`avss_lib.core.artifacts.PRUNED_SETS` (its ``arbitrary`` at ``ratio``)."""
    at = plan[(plan["ratio"] - ratio).abs() < 1e-9].set_index("method")
    if primary not in at.index:
        raise ConfigError(f"the primary {primary!r} is not in the plan at ratio {ratio}: choose from "
                          f"{sorted(m for m in at.index if m.startswith('avss:'))}")
    common = {"ratio": ratio, "k": k, "n_layers": n_layers}
    verdicts = [a1_verdict(retention, primary, measure=measure, arbitrary=bool(at.loc[primary, "arbitrary"]),
                           **common)]
    authors = "avss:authors_code"
    if authors in at.index and (primary, measure) != (authors, "raw"):
        verdicts.append(a1_verdict(retention, authors, measure="raw", arbitrary=bool(at.loc[authors, "arbitrary"]),
                                   analysis="exploratory", label="authors' AVSS, raw %", **common))
    if held_out is not None:
        best, scored = held_out
        verdicts.append(a1_verdict(scored, best, measure=measure, arbitrary=bool(at.loc[best, "arbitrary"]),
                                   analysis="exploratory",
                                   label=f"best AVSS variant on held-out examples ({method_label(best)})", **common))
    return verdicts
