"""Claim A1's rule, stated before the run, applied to the retention table: a :class:`~avss_lib.core.verdicts.Verdict`
for the chapter's primary AVSS variant and for the AVSS variant with the best worst-case retention.

A task is *counted* when its unpruned score is above chance (``informative`` in the retention table). For each
counted task the rule records one :class:`~avss_lib.core.verdicts.Condition`: the % of the unpruned score with
its paired-bootstrap 95% CI against :data:`RETENTION_THRESHOLD`, met when the CI's lower end is at or above it.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from avss_lib.core.formatting import percent
from avss_lib.core.verdicts import Condition, Verdict
from avss_lib.pruning.plan import method_label

RETENTION_THRESHOLD = 90.0  # claim A1: "keeps over 90% of the original performance"
A1_RULE = ("holds when the paired-bootstrap 95% CI of the % retained lies at or above 90% on every counted task "
           "(unpruned score above chance); does not hold when it lies below 90% on at least one counted task; "
           "inconclusive otherwise or when no task can be counted")
RETAINED = "retention CI at or above the threshold"  # the name of each counted task's condition
COUNTED = "tasks counted"  # the condition recorded when no task can be counted


def a1_outcome(conditions: Sequence[Condition]) -> str:
    """The outcome :data:`A1_RULE` gives from the per-task conditions alone: ``holds`` when every one is met,
    ``does not hold`` when a CI lies entirely below its threshold, else (or with no counted task) ``inconclusive``."""
    counted = [c for c in conditions if c.name == RETAINED]
    if counted and all(c.met for c in counted):
        return "holds"
    if any(c.high is not None and c.threshold is not None and c.high < c.threshold for c in counted):
        return "does not hold"
    return "inconclusive"


def a1_verdicts(retention: pd.DataFrame, primary: str, *, ratio: float, k: int, n_layers: int) -> list[Verdict]:
    """Claim A1 for the ``primary`` AVSS variant and for the AVSS variant with the best worst-case retention
    (one verdict when they are the same), under :data:`A1_RULE`; one ``inconclusive`` verdict when no task
    can be counted. ``retention``: :func:`avss_lib.pruning.retention.retention_table` at ``ratio``."""
    counted = retention[retention["informative"] & (retention["method"] != "unpruned")]
    avss = counted[counted["method"].str.startswith("avss:")]
    setting = {"ratio": float(ratio), "k": float(k), "n_layers": float(n_layers), "threshold": RETENTION_THRESHOLD}
    if avss.empty:
        none = Condition(COUNTED, met=False, value=0.0, threshold=1.0)
        return [Verdict("A1", primary, "inconclusive", A1_RULE, (none,), summary="no task above chance",
                        numbers={**setting, "n_counted_tasks": 0.0})]
    worst = avss.groupby("method")["retention"].min()
    best = str(worst.idxmax())
    primary_label = "authors' AVSS" if primary == "avss:authors_code" else method_label(primary)
    verdicts = []
    for label, method in ((primary_label, primary), (f"best AVSS variant ({method_label(best)})", best)):
        if method not in set(avss["method"]) or (verdicts and method == primary):
            continue
        g = avss[avss["method"] == method].set_index("task_key")
        conditions = tuple(Condition(RETAINED, met=bool(r.retention_low >= RETENTION_THRESHOLD),
                                     value=float(r.retention), threshold=RETENTION_THRESHOLD,
                                     low=float(r.retention_low), high=float(r.retention_high), group=str(key))
                           for key, r in g.iterrows())
        t = g["retention"].idxmin()
        summary = (f"{label}: {percent(g.loc[t, 'retention'])}% [{percent(g.loc[t, 'retention_low'])}, "
                   f"{percent(g.loc[t, 'retention_high'])}] retained on {t} (worst of {len(g)} counted task(s))")
        numbers = {**setting, "n_counted_tasks": float(len(g)), "retention": float(g.loc[t, "retention"]),
                   "retention_low": float(g.loc[t, "retention_low"]),
                   "retention_high": float(g.loc[t, "retention_high"])}
        verdicts.append(Verdict("A1", method, a1_outcome(conditions), A1_RULE, conditions, summary, numbers))
    return verdicts
