"""The paired bootstrap of the study, defined once: examples resampled jointly, replicates resampled too.

Two models (a pruned set and the unpruned model; two mitigation arms) scored on the same examples are compared
by resampling the *examples* with replacement, the same draw for both, so the pairing is kept. When a side has
several replicates of the same model (random seeds, training seeds, random-layer draws), each resample also
draws its replicates with replacement (a two-level bootstrap), so run-to-run variance enters the interval.
Intervals are percentile intervals of the statistic over the resamples; :func:`bootstrap_p_value` reads a
p-value off the same draws, and :func:`holm` adjusts a family of them for multiple comparisons.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from avss_lib.core.errors import ConfigError

CI = tuple[float, float, float]  # (value, low, high)


@dataclass(frozen=True)
class Resamples:
    """``counts[r, i]``: how often example ``i`` is in resample ``r``; ``picks[g][r]``: group ``g``'s replicates."""

    counts: np.ndarray  # (n_resamples, n_examples) int
    picks: tuple[np.ndarray, ...]  # per group: (n_resamples, n_replicates) indices

    @property
    def n_resamples(self) -> int:
        return self.counts.shape[0]

    def indices(self, r: int) -> np.ndarray:
        """The example indices of resample ``r`` (each repeated as often as it was drawn)."""
        return np.repeat(np.arange(self.counts.shape[1]), self.counts[r])


def paired_resamples(n_examples: int, replicates: Sequence[int], *, n_resamples: int = 2000, seed: int = 0
                     ) -> Resamples:
    """Draw ``n_resamples`` joint resamples of ``n_examples`` examples, and of each group's ``replicates``.

    The random stream is: the example draws first, then, group by group, the replicate draws of every group
    with more than one replicate (a group with one replicate always picks it).
    """
    if n_examples < 1:
        raise ConfigError("the paired bootstrap needs at least one example")
    if n_resamples < 1:
        raise ConfigError(f"n_resamples={n_resamples} must be at least 1")
    if any(r < 1 for r in replicates):
        raise ConfigError(f"every group needs at least one replicate, got {list(replicates)}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n_examples, size=(n_resamples, n_examples))
    counts = np.stack([np.bincount(row, minlength=n_examples) for row in idx])
    picks = tuple(rng.integers(0, r, size=(n_resamples, r)) if r > 1 else np.zeros((n_resamples, 1), dtype=int)
                  for r in replicates)
    return Resamples(counts, picks)


def percentile_interval(value: float, draws: np.ndarray, confidence_level: float = 0.95) -> CI:
    """``(value, low, high)`` from the finite bootstrap draws (NaN bounds when none is finite)."""
    if not 0 < confidence_level < 1:
        raise ConfigError(f"confidence_level={confidence_level} must lie in (0, 1)")
    finite = np.asarray(draws, dtype=float)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return float(value), float("nan"), float("nan")
    alpha = (1 - confidence_level) / 2
    return float(value), float(np.quantile(finite, alpha)), float(np.quantile(finite, 1 - alpha))


def bootstrap_p_value(draws: np.ndarray) -> float:
    """Two-sided bootstrap p-value of "the statistic is 0": twice the smaller share of the finite draws on
    either side of 0, with the add-one correction ``(count + 1) / (R + 1)`` so it is never 0 (capped at 1;
    NaN when no draw is finite). It is the smallest level at which the percentile interval excludes 0."""
    finite = np.asarray(draws, dtype=float)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return float("nan")
    tail = min(int((finite <= 0).sum()), int((finite >= 0).sum()))
    return float(min(1.0, 2 * (tail + 1) / (finite.size + 1)))


def holm(p_values: Sequence[float], alpha: float = 0.05) -> np.ndarray:
    """Holm's step-down adjustment of a family of p-values (statsmodels ``multipletests(method="holm")``),
    which controls the family-wise error rate at ``alpha``; NaN entries stay NaN and are not in the family."""
    p = np.asarray(p_values, dtype=float)
    adjusted = np.full_like(p, np.nan)
    keep = np.isfinite(p)
    if keep.any():
        from statsmodels.stats.multitest import multipletests  # deferred: statsmodels is slow to import

        adjusted[keep] = multipletests(p[keep], alpha=alpha, method="holm")[1]
    return adjusted
