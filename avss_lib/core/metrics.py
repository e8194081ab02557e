"""Metrics with uncertainty: bootstrap confidence intervals, TruthfulQA MC2, ranking metrics, ECE, perplexity.

Conventions:

- Confidence intervals are 95% bootstrap intervals from :func:`scipy.stats.bootstrap` with a fixed seed
  (percentile method by default: it needs no jackknife, so it stays cheap on 10k-example sets), except for a
  proportion of successes (accuracy, exact match), whose interval is Wilson's score interval
  (:func:`proportion_ci`, statsmodels; :func:`averaged_proportion_ci` for a share averaged over runs): it does not
  collapse to a point at 0 or n successes. Every interval is
  returned as ``(value, low, high)`` where ``value`` is the statistic on the full sample.
- ECE is torchmetrics' :func:`~torchmetrics.functional.classification.binary_calibration_error` applied to
  (top-choice confidence, was-the-top-choice-correct): 15 equal-width bins on [0, 1], L1 norm, i.e. the
  standard top-label ECE. It is returned in percent. :func:`reliability_bins` uses the same bucketing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from numpy.typing import ArrayLike
from scipy.special import logsumexp
from scipy.stats import bootstrap, norm
from statsmodels.stats.proportion import proportion_confint
from torchmetrics.functional.classification import binary_calibration_error

from avss_lib.core.errors import ConfigError

CI = tuple[float, float, float]  # (value, low, high)

N_BINS = 15


def bootstrap_ci(
    values: ArrayLike,
    *,
    confidence_level: float = 0.95,
    n_resamples: int = 10_000,
    method: str = "percentile",
    seed: int = 0,
) -> CI:
    """Mean of a per-example metric vector with its bootstrap confidence interval.

    A constant vector (including a single value) has no sampling spread: the interval collapses to the
    mean instead of scipy's NaN.
    """
    x = _as_1d(values, "values")
    mean = float(x.mean())
    if np.ptp(x) == 0:
        return mean, mean, mean
    res = bootstrap((x,), np.mean, n_resamples=n_resamples, batch=max(1, 50_000_000 // len(x) // 8),
                    vectorized=True, confidence_level=confidence_level, method=method,
                    rng=np.random.default_rng(seed))
    return mean, float(res.confidence_interval.low), float(res.confidence_interval.high)


def proportion_ci(successes: ArrayLike, *, confidence_level: float = 0.95) -> CI:
    """Share of true values in a boolean (0/1) vector with Wilson's score interval (statsmodels
    ``proportion_confint(method="wilson")``); raises :class:`ConfigError` for values other than 0 and 1."""
    x = _as_1d(successes, "successes")
    if not np.isin(x, (0, 1)).all():
        raise ConfigError("a proportion needs 0/1 (False/True) values; use bootstrap_ci for a continuous metric")
    return averaged_proportion_ci(x, confidence_level=confidence_level)


def averaged_proportion_ci(shares: ArrayLike, *, confidence_level: float = 0.95) -> CI:
    """Mean of per-example shares in [0, 1] — an example's successes averaged over several runs, or 0/1 for one
    run — with Wilson's score interval at n = the number of examples (for 0/1 values exactly
    :func:`proportion_ci`). The examples are the unit: the spread between runs is not in this interval (the
    paired comparisons of :mod:`avss_lib.mitigation.outcomes` resample runs as well)."""
    x = _as_1d(shares, "shares")
    if ((x < 0) | (x > 1)).any():
        raise ConfigError("shares must lie in [0, 1]: one value per example, its share of successful runs")
    if not 0 < confidence_level < 1:
        raise ConfigError(f"confidence_level={confidence_level} must lie in (0, 1)")
    k, n = float(x.sum()), len(x)
    low, high = proportion_confint(k, n, alpha=1 - confidence_level, method="wilson")
    # at k = 0 or n statsmodels' bound lands a rounding error (~1e-18) beyond the estimate: keep it contained
    return k / n, min(float(low), k / n), max(float(high), k / n)


def bootstrap_statistic_ci(
    samples: Sequence[ArrayLike],
    statistic: Callable[..., float],
    *,
    confidence_level: float = 0.95,
    n_resamples: int = 1_000,
    method: str = "percentile",
    seed: int = 0,
) -> CI:
    """A statistic of paired per-example vectors (e.g. ECE of confidence and correctness) with its CI.

    ``statistic(*samples)`` is called once per resample, with the rows resampled jointly.
    """
    arrays = [_as_1d(s, "sample") for s in samples]
    if len({len(a) for a in arrays}) != 1:
        raise ConfigError(f"paired samples must have equal lengths, got {[len(a) for a in arrays]}")
    value = float(statistic(*arrays))
    if len(arrays[0]) < 2:
        return value, value, value
    res = bootstrap(tuple(arrays), statistic, n_resamples=n_resamples, paired=True, vectorized=False,
                    confidence_level=confidence_level, method=method, rng=np.random.default_rng(seed))
    low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if np.isnan(low):  # every resample gave the same value
        low = high = value
    return value, low, high


def _as_1d(values: ArrayLike, what: str) -> np.ndarray:
    x = np.asarray(values, dtype=float).ravel()
    if x.size == 0:
        raise ConfigError(f"{what} is empty: a metric needs at least one example")
    if not np.all(np.isfinite(x)):
        raise ConfigError(f"{what} contains NaN or infinite entries: fix the per-example scores first")
    return x


# ------------------------------------------------------------------------------ multiple choice


def mc2_score(logliks: ArrayLike, labels: ArrayLike) -> float:
    """TruthfulQA MC2: normalised probability mass on the true answers, ``sum p(true) / sum p(all)``.

    ``labels`` are 0/1 per answer. The harness splits at the first 0 (it assumes true answers come first);
    selecting by label is the same when they do and still right when they do not.
    """
    ll = np.asarray(logliks, dtype=float)
    mask = np.asarray(labels, dtype=int) == 1
    if ll.shape != mask.shape or not mask.any():
        raise ConfigError("mc2_score needs one 0/1 label per answer and at least one true answer")
    return float(np.exp(logsumexp(ll[mask]) - logsumexp(ll)))


def choice_probabilities(logliks: ArrayLike) -> np.ndarray:
    """Softmax of the choices' summed log-likelihoods: the model's distribution over the offered choices."""
    ll = np.asarray(logliks, dtype=float)
    return np.exp(ll - logsumexp(ll))


def choice_lengths(choices: Sequence[str]) -> np.ndarray:
    """Character length of each choice, without the target delimiter: lm-evaluation-harness's ``acc_norm``
    denominator (``len(choice)`` in ``ConfigurableTask.process_results``, lm_eval 0.4.13)."""
    return np.array([len(c) for c in choices], dtype=float)


# ------------------------------------------------------------------------------ ranking (WikiQA)


def _ranked_labels(scores: ArrayLike, labels: ArrayLike) -> np.ndarray:
    """Labels sorted by descending score; ties keep the original order (like ``argmax``)."""
    order = np.argsort(-np.asarray(scores, dtype=float), kind="stable")
    return np.asarray(labels, dtype=int)[order]


def reciprocal_rank(scores: ArrayLike, labels: ArrayLike) -> float:
    """1 / rank of the first relevant candidate (0 when none is relevant)."""
    ranked = _ranked_labels(scores, labels)
    hits = np.flatnonzero(ranked == 1)
    return float(1.0 / (hits[0] + 1)) if hits.size else 0.0


def average_precision(scores: ArrayLike, labels: ArrayLike) -> float:
    """Mean of precision@k over the ranks k of the relevant candidates (0 when none is relevant)."""
    ranked = _ranked_labels(scores, labels)
    hits = np.flatnonzero(ranked == 1)
    if not hits.size:
        return 0.0
    return float(np.mean(np.arange(1, hits.size + 1) / (hits + 1)))


# ------------------------------------------------------------------------------ calibration


def _calibration_inputs(confidence: ArrayLike, correct: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    conf = torch.tensor(np.asarray(confidence, dtype=float), dtype=torch.float64)
    target = torch.tensor(np.asarray(correct, dtype=bool), dtype=torch.long)
    if conf.shape != target.shape or conf.numel() == 0:
        raise ConfigError("calibration needs one confidence and one correctness flag per example")
    if bool(((conf < 0) | (conf > 1)).any()):
        raise ConfigError("confidences must be probabilities in [0, 1]")
    return conf, target


def expected_calibration_error(confidence: ArrayLike, correct: ArrayLike, n_bins: int = N_BINS) -> float:
    """Top-label ECE in percent: confidence of the chosen answer vs whether it was correct (see module doc)."""
    conf, target = _calibration_inputs(confidence, correct)
    return 100.0 * float(binary_calibration_error(conf, target, n_bins=n_bins, norm="l1"))


def reliability_bins(confidence: ArrayLike, correct: ArrayLike, n_bins: int = N_BINS) -> pd.DataFrame:
    """Per-bin mean confidence, accuracy and count for a reliability diagram (empty bins have NaN means).

    Bins are torchmetrics' ``[k/n, (k+1)/n)`` with 1.0 in the last bin, so
    ``sum(count * |accuracy - confidence|) / total * 100`` equals :func:`expected_calibration_error`.
    """
    conf, target = _calibration_inputs(confidence, correct)
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    index = (torch.bucketize(conf, edges, right=True) - 1).clamp(0, n_bins - 1).numpy()
    frame = pd.DataFrame({"bin": index, "confidence": conf.numpy(), "accuracy": target.numpy().astype(float)})
    stats = frame.groupby("bin").agg(confidence=("confidence", "mean"), accuracy=("accuracy", "mean"),
                                     count=("accuracy", "size"))
    stats = stats.reindex(range(n_bins))
    stats["count"] = stats["count"].fillna(0).astype(int)
    stats.insert(0, "bin_lower", edges[:-1].numpy())
    stats.insert(1, "bin_upper", edges[1:].numpy())
    return stats.reset_index(drop=True)


# ------------------------------------------------------------------------------ language modelling


def perplexity(nll_sum: float, n_tokens: int) -> float:
    """exp(summed negative log-likelihood / number of scored tokens)."""
    if n_tokens <= 0:
        raise ConfigError(f"perplexity needs at least one scored token, got n_tokens={n_tokens}")
    return float(np.exp(nll_sum / n_tokens))


def minimum_detectable_effect(se: float, *, level: float = 0.95, power: float = 0.8) -> float:
    """The smallest true effect a two-sided test at confidence ``level`` detects with ``power``, for an estimate
    with standard error ``se``: ``(z_{1-alpha/2} + z_power) * se``."""
    return float((norm.ppf(1 - (1 - level) / 2) + norm.ppf(power)) * se)
