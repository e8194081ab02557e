"""The rule that decides claim E1 ("HSAV and HSS locate hallucination-prone layers"), as data.

For each **usable** data set (both classes at least ``min_class``, column ``usable`` of
:func:`avss_lib.hallucination.analysis.summary_table`), EAVSS *locates* hallucination-prone layers when all
three conditions hold:

1. ``signal`` — some layer's EAVSS score beats the label-permutation null family-wise within the site
   (smallest max-statistic p-value ``min_p_max`` < ``alpha``);
2. ``stable`` — the median split-half Spearman :math:`\\rho` is at least ``min_rho``;
3. ``valid`` — the EAVSS score agrees with the per-layer probe AUROC: Spearman :math:`\\rho` over layers at
   least ``min_probe_rho`` (not met when the data set has no probe).

E1 *holds* (level "supported") when a majority of the usable data sets pass all three; it is *inconclusive*
when fewer do but at least one passes the signal test ("partly supported") or when no data set is usable
("not testable"); otherwise it *does not hold* ("not supported"). Every data set also records a ``usable``
condition (its smaller class against ``min_class``).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from avss_lib.core.errors import DataError
from avss_lib.core.formatting import finite_or_none
from avss_lib.core.verdicts import Condition, Verdict

ALPHA, MIN_RHO, MIN_PROBE_RHO = 0.05, 0.5, 0.3
#: The rule's four levels and the claims chapter's outcome each maps to.
LEVELS: dict[str, str] = {"supported": "holds", "partly supported": "inconclusive",
                          "not supported": "does not hold", "not testable": "inconclusive"}


def _value(row: pd.Series, column: str) -> float:
    value = row.get(column, np.nan)
    return float(value) if value is not None and not pd.isna(value) else math.nan


def _rule(alpha: float, min_rho: float, min_probe_rho: float, min_class: int | None) -> str:
    usable = f"both classes at least {min_class}" if min_class is not None else "both classes large enough"
    return (f"For each usable data set ({usable}): signal — some layer's EAVSS score beats the label-permutation "
            f"null family-wise within the site (max-statistic p < {alpha}); stable — the median split-half "
            f"Spearman ρ ≥ {min_rho}; valid — Spearman ρ between |EAVSS| and per-layer probe AUROC ≥ "
            f"{min_probe_rho}. E1 holds when a majority of the usable data sets pass all three, is inconclusive "
            "when fewer do but at least one passes the signal test or when no data set is usable, and does not "
            "hold otherwise.")


def e1_verdicts(summary: pd.DataFrame, *, alpha: float = ALPHA, min_rho: float = MIN_RHO,
                min_probe_rho: float = MIN_PROBE_RHO, min_class: int | None = None, site: str = "",
                position: str = "") -> list[Verdict]:
    """The E1 verdict (one, for the site) from :func:`avss_lib.hallucination.analysis.summary_table`."""
    missing = {"n_hallucinated", "n_correct", "usable"} - set(summary.columns)
    if missing:
        raise DataError(f"the E1 summary lacks columns {sorted(missing)}: build it with analysis.summary_table")
    conditions, passed, signalled, parts = [], [], [], []
    for name, row in summary.iterrows():
        smaller = int(min(row["n_hallucinated"], row["n_correct"]))
        conditions.append(Condition("usable", bool(row["usable"]), float(smaller),
                                    None if min_class is None else float(min_class), group=str(name)))
        if not row["usable"]:
            continue
        p, rho, probe = (_value(row, c) for c in ("min_p_max", "split_half_rho_median", "probe_eavss_rho"))
        signal, stable = bool(p < alpha), bool(rho >= min_rho)
        valid = bool((-np.inf if math.isnan(probe) else probe) >= min_probe_rho)
        conditions += [Condition("signal", signal, finite_or_none(p), alpha, group=str(name)),
                       Condition("stable", stable, finite_or_none(rho), min_rho, group=str(name)),
                       Condition("valid", valid, finite_or_none(probe), min_probe_rho, group=str(name))]
        passed.append(signal and stable and valid)
        signalled.append(signal)
        parts.append(f"{name}: min p_max {p:.3f}, split-half ρ {rho:+.2f}, probe ρ {probe:+.2f}")
    n, n_all, n_signal = len(passed), sum(passed), sum(signalled)
    if n == 0:
        level, summary_line = "not testable", "no data set with both classes large enough"
    else:
        level = "supported" if n_all > n / 2 else "partly supported" if n_signal >= 1 else "not supported"
        summary_line = f"{n_all}/{n} data sets pass all tests ({'; '.join(parts)})"
    subject = f"EAVSS at {site or 'the chosen site'} ({position or 'answer'} tokens)"
    numbers = {"n_datasets": float(len(summary)), "n_usable": float(n), "n_pass_all": float(n_all),
               "n_signal": float(n_signal)}
    return [Verdict(claim="E1", subject=subject, outcome=LEVELS[level],
                    rule=_rule(alpha, min_rho, min_probe_rho, min_class), conditions=tuple(conditions),
                    summary=summary_line, numbers=numbers)]


def e1_level(verdict: Verdict) -> str:
    """The rule's level of an E1 verdict: supported, partly supported, not supported or not testable."""
    if verdict.claim != "E1":
        raise DataError(f"e1_level needs an E1 verdict, not {verdict.claim}")
    if not verdict.numbers.get("n_usable"):
        return "not testable"
    return {"holds": "supported", "inconclusive": "partly supported", "does not hold": "not supported"}[verdict.outcome]
