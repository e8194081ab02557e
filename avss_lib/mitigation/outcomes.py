"""Chapter 05's numbers from the runs' per-example results: per-run and per-arm metrics, and paired differences.

**Metrics** (in %): accuracy under chapter 04's label convention, the hallucination rate ``100 − accuracy``
and ECE (:func:`avss_lib.core.metrics.expected_calibration_error`). An arm with several runs (seeds,
random-layer draws) is scored by the mean of its runs' metric on the same held-out examples.

**Intervals.** A run's and an arm's own 95% interval resamples the examples (an arm's runs together), so it
shows example-sampling uncertainty, not seed variance (the per-run table shows the spread across runs). A
difference between two arms (:func:`paired_difference`) uses the study's one paired bootstrap
(:mod:`avss_lib.core.resampling`): the held-out examples are resampled jointly for both arms and, for an arm
with several runs, its runs are resampled too, so run-to-run variance enters the interval.

**Comparisons** (:func:`comparisons`): ``EAVSS − other`` per data set and metric at the Bonferroni-corrected
level ``1 − 0.05 / m`` for the ``m`` (data set, metric) pairs; EAVSS *beats* the other arm when the whole
interval lies on its side of zero (accuracy higher, ECE lower) and the difference is at least ``min_effect``
percentage points, and *is beaten* in the mirror case. :mod:`avss_lib.mitigation.verdict` decides claim E2
from them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from avss_lib.core.errors import ConfigError, DataError
from avss_lib.core.metrics import averaged_proportion_ci, bootstrap_statistic_ci, expected_calibration_error
from avss_lib.core.resampling import CI, Resamples, paired_resamples, percentile_interval
from avss_lib.mitigation.arms import ARMS

METRICS: tuple[str, ...] = ("accuracy", "hallucination_rate", "ece")
LOWER_IS_BETTER: dict[str, bool] = {"accuracy": False, "hallucination_rate": True, "ece": True}
#: The arms claim E2's layer specificity is tested against.
CONTROL_ARMS: tuple[str, ...] = ("random", "lm_only")


def metric_value(metric: str, correct: np.ndarray, confidence: np.ndarray) -> float:
    """One metric of one run on one set of examples (accuracy and hallucination rate in %, ECE in %)."""
    if metric == "accuracy":
        return 100.0 * float(np.mean(correct))
    if metric == "hallucination_rate":
        return 100.0 * (1.0 - float(np.mean(correct)))
    if metric == "ece":
        return expected_calibration_error(confidence, correct.astype(bool))
    raise ConfigError(f"unknown metric {metric!r}: choose one of {METRICS}")


def rate_ci(shares: np.ndarray) -> CI:
    """A rate in % (accuracy, hallucination rate) over the examples, each example's share averaged over an arm's
    runs, with Wilson's 95% interval (:func:`avss_lib.core.metrics.averaged_proportion_ci`): it stays open at 0%
    and 100%, where a bootstrap interval collapses to a point."""
    value, low, high = averaged_proportion_ci(np.asarray(shares, dtype=float))
    return 100 * value, 100 * low, 100 * high


def summarise_runs(per_example: pd.DataFrame, *, seed: int = 0, n_resamples: int = 1000) -> pd.DataFrame:
    """Per run and data set: accuracy and hallucination rate (%) with Wilson's 95% interval (:func:`rate_ci`), and
    ECE (%) with a 95% bootstrap interval.

    Also ``alias_hallucination_rate`` for open QA (wrong under alias containment).
    """
    rows = []
    for (run_id, arm, dataset), g in per_example.groupby(["run_id", "arm", "dataset"], sort=False):
        correct = g["correct"].to_numpy(dtype=float)
        conf = g["confidence"].to_numpy(dtype=float)
        cis = {"accuracy": rate_ci(correct), "hallucination_rate": rate_ci(1 - correct),
               "ece": bootstrap_statistic_ci([conf, correct], expected_calibration_error, seed=seed,
                                             n_resamples=n_resamples)}
        if g["alias_containment"].notna().all():
            cis["alias_hallucination_rate"] = rate_ci(1 - g["alias_containment"].to_numpy(dtype=float))
        for metric, (value, low, high) in cis.items():
            rows.append({"run_id": run_id, "arm": arm, "dataset": dataset, "metric": metric, "value": value,
                         "low": low, "high": high, "n": len(g)})
    return pd.DataFrame(rows)


def arm_matrices(per_example: pd.DataFrame, arm: str, dataset: str, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(correct, confidence) as ``[n_examples, n_runs]`` arrays of one arm's runs, rows in ``ids`` order."""
    sub = per_example[(per_example["arm"] == arm) & (per_example["dataset"] == dataset)]
    if sub.empty:
        raise DataError(f"no results for arm {arm!r} on {dataset}: add it to arms")
    correct = sub.pivot(index="id", columns="run_id", values="correct").reindex(list(ids))
    conf = sub.pivot(index="id", columns="run_id", values="confidence").reindex(list(ids))
    if correct.isna().any().any():
        raise DataError(f"arm {arm!r} was evaluated on other {dataset} examples than the comparison arm: re-run it")
    return correct.to_numpy(dtype=float), conf.to_numpy(dtype=float)


def arm_metric(correct: np.ndarray, confidence: np.ndarray, metric: str) -> float:
    """The metric averaged over an arm's runs (columns): seeds and random draws count equally."""
    return float(np.mean([metric_value(metric, correct[:, j], confidence[:, j]) for j in range(correct.shape[1])]))


def resampled_arm_metric(correct: np.ndarray, confidence: np.ndarray, metric: str, resamples: Resamples,
                         group: int) -> np.ndarray:
    """The arm's metric on every resample: its runs' metric on the resampled examples, averaged over the
    runs ``resamples.picks[group]`` drew (with replacement). Shape ``[n_resamples]``."""
    n = correct.shape[0]
    if metric in ("accuracy", "hallucination_rate"):
        mean_correct = (resamples.counts @ correct) / n  # (R, runs)
        per_run = 100.0 * (mean_correct if metric == "accuracy" else 1.0 - mean_correct)
    else:
        per_run = np.array([[metric_value(metric, correct[idx, j], confidence[idx, j]) for j in range(correct.shape[1])]
                            for idx in map(resamples.indices, range(resamples.n_resamples))])
    return np.take_along_axis(per_run, resamples.picks[group], axis=1).mean(axis=1)


def paired_difference(per_example: pd.DataFrame, arm_a: str, arm_b: str, dataset: str, metric: str, *,
                      confidence_level: float = 0.95, n_resamples: int = 1000, seed: int = 0) -> CI:
    """``metric(arm_a) − metric(arm_b)`` on the same held-out examples, with the paired bootstrap interval.

    Each resample draws the examples with replacement, the same draw for both arms, and each arm's runs with
    replacement (:func:`avss_lib.core.resampling.paired_resamples`, arm ``a`` first); the difference of the two
    arms' run-averaged metrics on it is one draw of the percentile interval.
    """
    ids = sorted(per_example[(per_example["arm"] == arm_a) & (per_example["dataset"] == dataset)]["id"].unique())
    ca, fa = arm_matrices(per_example, arm_a, dataset, ids)
    cb, fb = arm_matrices(per_example, arm_b, dataset, ids)
    value = arm_metric(ca, fa, metric) - arm_metric(cb, fb, metric)
    resamples = paired_resamples(len(ids), [ca.shape[1], cb.shape[1]], n_resamples=n_resamples, seed=seed)
    draws = (resampled_arm_metric(ca, fa, metric, resamples, 0) - resampled_arm_metric(cb, fb, metric, resamples, 1))
    return percentile_interval(value, draws, confidence_level)


def arms_present(per_example: pd.DataFrame) -> list[str]:
    """The arms of ``per_example`` in table order."""
    present = set(per_example["arm"])
    return [a for a in ARMS if a in present]


def arm_table(per_example: pd.DataFrame, metrics: Sequence[str] = METRICS, *, seed: int = 0,
              n_resamples: int = 1000) -> pd.DataFrame:
    """Per arm, data set and metric: value (mean over the arm's runs) with a 95% CI (Wilson's for the rates,
    :func:`rate_ci`; a bootstrap over the examples for ECE), and the change from ``base``.

    ``rel_change`` is ``(value − base) / base`` in %; ``diff_low``/``diff_high`` bound ``value − base`` by the
    paired bootstrap (NaN for the base arm or when there is no base arm). The ``ARM_METRICS`` artifact.
    """
    rows = []
    has_base = "base" in set(per_example["arm"])
    for dataset in per_example["dataset"].unique():
        ids = sorted(per_example[per_example["dataset"] == dataset]["id"].unique())
        for arm in arms_present(per_example):
            correct, conf = arm_matrices(per_example, arm, dataset, ids)
            for metric in metrics:
                if metric in ("accuracy", "hallucination_rate"):
                    shares = correct.mean(axis=1)
                    value, low, high = rate_ci(shares if metric == "accuracy" else 1 - shares)
                else:
                    value, low, high = bootstrap_statistic_ci(
                        [np.arange(len(ids), dtype=float)],
                        lambda idx, c=correct, f=conf, m=metric: arm_metric(c[idx.astype(int)], f[idx.astype(int)], m),
                        n_resamples=n_resamples, seed=seed)
                row = {"arm": arm, "dataset": dataset, "metric": metric, "value": value, "low": low, "high": high,
                       "n": len(ids), "n_runs": correct.shape[1], "diff": np.nan, "diff_low": np.nan,
                       "diff_high": np.nan, "rel_change": np.nan}
                if has_base and arm != "base":
                    d, dl, dh = paired_difference(per_example, arm, "base", dataset, metric, n_resamples=n_resamples,
                                                  seed=seed)
                    base = value - d
                    row.update(diff=d, diff_low=dl, diff_high=dh, rel_change=100 * d / base if base else np.nan)
                rows.append(row)
    return pd.DataFrame(rows)


def comparisons(per_example: pd.DataFrame, *, target: str = "eavss", against: Sequence[str] = CONTROL_ARMS,
                metrics: Sequence[str] = ("accuracy", "ece"), family_alpha: float = 0.05, min_effect: float = 0.5,
                n_resamples: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Paired differences ``target − other`` per data set and metric at the Bonferroni-corrected level.

    ``beats`` / ``beaten``: the interval excludes 0 on that side *and* the difference is at least ``min_effect``
    percentage points (so float-level differences between near-identical runs are not called effects). The
    ``COMPARISONS`` artifact.
    """
    present = set(per_example["arm"])
    if target not in present:
        raise DataError(f"no results for arm {target!r}: the verdict needs it in arms")
    others = [a for a in against if a in present]
    datasets = list(per_example["dataset"].unique())
    level = 1 - family_alpha / (len(datasets) * len(metrics))
    rows = []
    for dataset in datasets:
        for metric in metrics:
            for other in others:
                d, low, high = paired_difference(per_example, target, other, dataset, metric, confidence_level=level,
                                                 n_resamples=n_resamples, seed=seed)
                sign = -1 if LOWER_IS_BETTER[metric] else 1
                lo, hi = sorted((sign * low, sign * high))
                big = abs(d) >= min_effect
                rows.append({"dataset": dataset, "metric": metric, "other": other, "diff": d, "low": low,
                             "high": high, "level": level, "min_effect": min_effect, "beats": bool(lo > 0 and big),
                             "beaten": bool(hi < 0 and big)})
    return pd.DataFrame(rows, columns=["dataset", "metric", "other", "diff", "low", "high", "level", "min_effect",
                                       "beats", "beaten"])
