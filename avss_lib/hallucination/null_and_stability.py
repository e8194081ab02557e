"""Is an EAVSS ranking more than chance, and does it survive a change of questions?

- :func:`permutation_eavss` — the label-permutation null of the EAVSS score: shuffle which examples are
  hallucinated (class sizes kept) and recompute every layer's score; a layer's p-value is the share of
  shuffled scores at least as large as the observed one, and the family-wise p-value within a site
  compares it with the largest shuffled score over the site's layers (max-statistic, Westfall-Young single
  step).
- :func:`split_half_stability` — Spearman's rho between the scores computed on two disjoint,
  label-stratified halves of the examples, for several random splits.

Both reuse the per-example sufficient statistics (:mod:`avss_lib.hallucination.group_stats`): the group
statistics of any labelling are sums over examples, so a whole null costs one matrix product per column.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedShuffleSplit

from avss_lib.core.errors import ConfigError, DataError
from avss_lib.hallucination.eavss import EavssConfig, eavss_scores
from avss_lib.hallucination.group_stats import (
    ClassSizeCheck,
    ExampleCube,
    SmallClassWarning,
    additive_sums,
    check_class_sizes,
    example_cube,
    group_stats_arrays,
)
from avss_lib.ranking.agreement import spearman_matrix


@dataclass(frozen=True)
class PermutationResult:
    """Label-permutation null of the EAVSS score.

    Attributes:
        observed: observed score per (site, layer).
        null: null scores, one row per permutation, one column per (site, layer).
        p_value: per-layer p-value, (1 + number of null scores >= observed) / (n_perm + 1).
        p_value_max: family-wise p-value within each site (max-statistic / Westfall-Young single step):
            the null of each permutation is the maximum score over the site's layers.
        class_sizes: the class-size check of the observed labels.
    """

    observed: pd.Series
    null: pd.DataFrame
    p_value: pd.Series
    p_value_max: pd.Series
    class_sizes: ClassSizeCheck


def spearman_rho(a: pd.Series, b: pd.Series) -> float:
    """Spearman's rho between two score Series of the same layers, aligned on their index.

    :func:`avss_lib.ranking.agreement.spearman_matrix` for one pair (different layers are a
    :class:`DataError`; a constant score vector gives NaN).
    """
    return float(spearman_matrix({"a": a, "b": b}).loc["a", "b"])


def _scores_for_memberships(cube: ExampleCube, h_members: np.ndarray, config: EavssConfig) -> np.ndarray:
    """Scores, shape (rows, labellings), for (labellings, examples) boolean H-membership rows."""
    add, centre = additive_sums(cube)
    h = group_stats_arrays(add, centre, h_members.astype(np.float64))
    c = group_stats_arrays(add, centre, (~h_members).astype(np.float64))
    return eavss_scores(h, c, config)["score"]


def permutation_eavss(example_stats: pd.DataFrame, labels: pd.Series, config: EavssConfig = EavssConfig(),
                      n_perm: int = 1000, seed: int = 0, strata: pd.Series | None = None) -> PermutationResult:
    """Permutation null of the EAVSS score: shuffle the labels ``n_perm`` times (class sizes kept).

    With ``strata`` (a group per example id, e.g. the answer-length quartile) the labels are shuffled within each
    group only, so the null keeps whatever the groups explain of the labels: a layer beats this null only by what,
    say, the answer's length does not explain.

    Raises when a class has fewer than 2 examples (nothing to permute); flags (``class_sizes.ok``) and
    warns (:class:`SmallClassWarning`) when below ``config.min_class``.
    """
    if n_perm < 1:
        raise ConfigError(f"n_perm={n_perm} must be at least 1 (use >= 999 for p-values near 0.001)")
    sizes = check_class_sizes(labels, config.min_class)
    if min(sizes.n_hallucinated, sizes.n_correct) < 2:
        raise DataError(f"{sizes.message}; a permutation null needs at least 2 per class")
    if not sizes.ok:
        warnings.warn(sizes.message, SmallClassWarning, stacklevel=2)
    cube = example_cube(example_stats, labels)
    rng = np.random.default_rng(seed)
    if strata is None:
        shuffled = np.stack([rng.permutation(cube.labels) for _ in range(n_perm)])
    else:
        groups = strata.reindex(np.sort(example_stats["example_id"].unique())).to_numpy()
        if pd.isna(groups).any():
            raise DataError("strata lack some example ids of the statistics table: give every example a group")
        shuffled = np.tile(cube.labels, (n_perm, 1))
        for group in pd.unique(groups):
            idx = np.flatnonzero(groups == group)
            shuffled[:, idx] = rng.permuted(shuffled[:, idx], axis=1)
    observed = _scores_for_memberships(cube, cube.labels[None, :], config)[:, 0]
    null = _scores_for_memberships(cube, shuffled, config).T  # (n_perm, rows)
    p_value = (1 + (null >= observed).sum(axis=0)) / (n_perm + 1)
    null_frame = pd.DataFrame(null, columns=cube.keys)
    site_max = null_frame.T.groupby(level="site").max().T  # (n_perm, sites)
    max_null = site_max[cube.keys.get_level_values("site")].to_numpy()
    p_max = (1 + (max_null >= observed).sum(axis=0)) / (n_perm + 1)
    return PermutationResult(
        observed=pd.Series(observed, index=cube.keys, name="score"),
        null=null_frame,
        p_value=pd.Series(p_value, index=cube.keys, name="p_value"),
        p_value_max=pd.Series(p_max, index=cube.keys, name="p_value_max"),
        class_sizes=sizes,
    )


def split_half_stability(example_stats: pd.DataFrame, labels: pd.Series, config: EavssConfig = EavssConfig(),
                         n_splits: int = 20, seed: int = 0) -> pd.DataFrame:
    """Spearman's rho between EAVSS scores on disjoint, label-stratified halves of the examples.

    Returns one row per (split, site) with column ``rho``.
    """
    sizes = check_class_sizes(labels, config.min_class)
    if min(sizes.n_hallucinated, sizes.n_correct) < 4:
        raise DataError(f"{sizes.message}; split halves need at least 4 examples per class")
    cube = example_cube(example_stats, labels)
    halves = StratifiedShuffleSplit(n_splits=n_splits, test_size=0.5, random_state=seed)
    rows = []
    for split, (first, _) in enumerate(halves.split(np.zeros(len(cube.labels)), cube.labels)):
        in_first = np.zeros(len(cube.labels), dtype=bool)
        in_first[first] = True
        scores = [_half_scores(cube, mask, config) for mask in (in_first, ~in_first)]
        for site in cube.keys.unique(level="site"):
            rho = spearman_rho(scores[0].xs(site, level="site"), scores[1].xs(site, level="site"))
            rows.append({"split": split, "site": site, "rho": rho})
    return pd.DataFrame(rows)


def _half_scores(cube: ExampleCube, mask: np.ndarray, config: EavssConfig) -> pd.Series:
    """Scores computed on the examples selected by ``mask`` only."""
    sub = cube.subset(mask)
    return pd.Series(_scores_for_memberships(sub, sub.labels[None, :], config)[:, 0], index=cube.keys)
