r"""Claim E2's pre-registered primary analysis: each arm's accuracy and ECE pooled over the data sets, its
differences from the untouched model and from the random-layer arm, and the power of the run to see them.

**Pooled metrics.** Accuracy is the share of correct answers over every evaluation example of every data set;
ECE is the mean over the data sets of each data set's ECE (the confidences of a multiple-choice task and of a
generative one are not on one scale, so they are not binned together). An arm with several runs (training seeds,
random-layer draws) is scored by the mean of its runs, as in :mod:`avss_lib.mitigation.outcomes`.

**Resampling.** One stratified two-level bootstrap serves every arm: each resample draws every data set's
examples with replacement (the same draw for all arms, so the pairing is kept) and each arm's runs with
replacement (the same run draw in every data set, since a run is one model). A difference or ratio of two arms
is read off the same resamples, so the interval of a relative change accounts for the uncertainty of its base.

**Power.** The minimum detectable effect of a difference at two-sided level :math:`\alpha` and power
:math:`1-\beta` is :math:`(z_{1-\alpha/2} + z_{1-\beta})\,\mathrm{SE}_\text{plan}`, with the planning standard error
:math:`\mathrm{SE}_\text{plan} = \sqrt{\mathrm{sd}_a^2 + \mathrm{sd}_b^2}` from each arm's own bootstrap spread: it
ignores the correlation that pairing buys, so it is conservative, and unlike the observed paired SE (``se``) it does
not collapse to 0 when two arms happen to answer alike. The examples that would bring the MDE down to an effect
:math:`c` scale as :math:`n\,(\mathrm{MDE}/c)^2`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from avss_lib.core.errors import DataError
from avss_lib.core.metrics import minimum_detectable_effect
from avss_lib.core.resampling import Resamples, percentile_interval
from avss_lib.mitigation.outcomes import LOWER_IS_BETTER, arm_matrices, arm_metric, resampled_arm_metric

PRIMARY_METRICS: tuple[str, ...] = ("accuracy", "ece")
#: Columns of :func:`primary_table` (the ``E2_PRIMARY`` artifact).
PRIMARY_COLUMNS: tuple[str, ...] = (
    "metric", "other", "value", "value_low", "value_high", "other_value", "other_low", "other_high", "diff", "low",
    "high", "rel_change", "rel_low", "rel_high", "se", "se_plan", "mde", "mde_rel", "level", "power", "n", "n_datasets",
    "runs", "other_runs")


@dataclass(frozen=True)
class PooledDraws:
    """Each arm's pooled metric and its value on every resample (arms resampled together)."""

    value: dict[str, float]
    draws: dict[str, np.ndarray]
    n_examples: int
    n_datasets: int
    n_runs: dict[str, int]


def pooled_draws(per_example: pd.DataFrame, metric: str, arms: Sequence[str], *, n_resamples: int = 1000,
                 seed: int = 0) -> PooledDraws:
    """The pooled ``metric`` of every arm in ``arms`` and its draws on shared stratified resamples."""
    present = set(per_example["arm"])
    missing = [a for a in arms if a not in present]
    if missing:
        raise DataError(f"no results for arm(s) {missing}: add them to arms")
    datasets = list(dict.fromkeys(per_example["dataset"]))
    ids = {d: sorted(per_example.loc[(per_example["dataset"] == d) & (per_example["arm"] == arms[0]), "id"].unique())
           for d in datasets}
    n_total = sum(len(v) for v in ids.values())
    rng = np.random.default_rng(seed)
    runs = {arm: per_example.loc[per_example["arm"] == arm, "run_id"].nunique() for arm in arms}
    picks = tuple(rng.integers(0, r, size=(n_resamples, r)) if r > 1 else np.zeros((n_resamples, 1), dtype=int)
                  for r in runs.values())
    value = dict.fromkeys(arms, 0.0)
    draws = {arm: np.zeros(n_resamples) for arm in arms}
    for d in datasets:
        n = len(ids[d])
        weight = n / n_total if metric == "accuracy" else 1 / len(datasets)
        idx = rng.integers(0, n, size=(n_resamples, n))
        resamples = Resamples(np.stack([np.bincount(row, minlength=n) for row in idx]), picks)
        for group, arm in enumerate(arms):
            correct, confidence = arm_matrices(per_example, arm, d, ids[d])
            if correct.shape[1] != runs[arm]:
                raise DataError(f"arm {arm!r} has {correct.shape[1]} runs on {d} but {runs[arm]} in all: re-run it")
            value[arm] += weight * arm_metric(correct, confidence, metric)
            draws[arm] += weight * resampled_arm_metric(correct, confidence, metric, resamples, group)
    return PooledDraws(value, draws, n_total, len(datasets), runs)


def primary_table(per_example: pd.DataFrame, *, target: str = "eavss", others: Sequence[str] = ("base", "random"),
                  metrics: Sequence[str] = PRIMARY_METRICS, level: float = 0.975, power: float = 0.8,
                  n_resamples: int = 1000, seed: int = 0) -> pd.DataFrame:
    """``target − other`` pooled over the data sets, per metric and other arm present (:data:`PRIMARY_COLUMNS`).

    Values are in points (%); ``rel_change`` is ``(target − other) / other`` in %, its interval from the same
    resamples; ``se`` is the bootstrap standard deviation of the difference, ``se_plan`` the planning SE of the
    module docstring and ``mde`` (``mde_rel`` in % of the other arm's value) the smallest difference the run detects
    at ``level`` with ``power``.
    """
    present = [o for o in others if o in set(per_example["arm"])]
    rows = []
    for metric in metrics:
        pooled = pooled_draws(per_example, metric, [target, *present], n_resamples=n_resamples, seed=seed)
        for other in present:
            a, b = pooled.draws[target], pooled.draws[other]
            va, vb = pooled.value[target], pooled.value[other]
            diff, low, high = percentile_interval(va - vb, a - b, level)
            with np.errstate(divide="ignore", invalid="ignore"):
                rel, rel_low, rel_high = percentile_interval(100 * (va - vb) / vb if vb else np.nan,
                                                             100 * (a - b) / b, level)
            se = float(np.std(a - b, ddof=1))
            se_plan = float(np.hypot(np.std(a, ddof=1), np.std(b, ddof=1)))
            mde = minimum_detectable_effect(se_plan, level=level, power=power)
            rows.append({"metric": metric, "other": other, "value": va,
                         **dict(zip(("value_low", "value_high"), percentile_interval(va, a, level)[1:])),
                         "other_value": vb,
                         **dict(zip(("other_low", "other_high"), percentile_interval(vb, b, level)[1:])),
                         "diff": diff, "low": low, "high": high, "rel_change": rel, "rel_low": rel_low,
                         "rel_high": rel_high, "se": se, "se_plan": se_plan, "mde": mde, "mde_rel": 100 * mde / vb if vb else np.nan,
                         "level": level, "power": power, "n": pooled.n_examples, "n_datasets": pooled.n_datasets,
                         "runs": pooled.n_runs[target], "other_runs": pooled.n_runs[other]})
    return pd.DataFrame(rows, columns=list(PRIMARY_COLUMNS))


def improvement(row: pd.Series, relative: bool = False) -> tuple[float, float, float]:
    """A primary row's change as an improvement (positive = better: accuracy up, ECE down), ``(value, low, high)``
    in points, or in % of the other arm's value when ``relative``."""
    value, low, high = (row[c] for c in (("rel_change", "rel_low", "rel_high") if relative else ("diff", "low", "high")))
    if LOWER_IS_BETTER[row["metric"]]:
        return -value, -high, -low
    return value, low, high


def examples_needed(row: pd.Series, effect: float) -> float:
    """Evaluation examples (pooled) at which the run's MDE would equal ``effect`` points (same runs, level, power)."""
    if not effect > 0 or not np.isfinite(row["mde"]):
        return float("nan")
    return float(np.ceil(row["n"] * (row["mde"] / effect) ** 2))
