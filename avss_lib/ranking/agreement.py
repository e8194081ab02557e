"""Compare layer rankings (Spearman's rho between score vectors) and pruned sets (Jaccard overlap)."""

from __future__ import annotations

from collections.abc import Mapping, Set

import numpy as np
import pandas as pd
from scipy import stats

from avss_lib.ranking.baselines import Scores
from avss_lib.core.errors import DataError


def spearman_matrix(rankings: Mapping[str, Scores]) -> pd.DataFrame:
    """Symmetric table of Spearman's rho between every pair of per-layer scores, rows and columns named.

    Arrays are compared position by position; Series are aligned on their layer index first. All
    rankings must cover the same layers (:class:`DataError` otherwise). ``inf`` scores are ranked above
    every finite score; a constant score vector (no order at all) gives NaN.
    """
    table = _aligned_scores(rankings)
    names = list(table.columns)
    columns = {name: table[name].to_numpy() for name in names}
    return pd.DataFrame([[_spearman(columns[a], columns[b]) for b in names] for a in names],
                        index=names, columns=names)


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho of two score vectors; NaN when either has a single distinct value."""
    if len(np.unique(a)) < 2 or len(np.unique(b)) < 2:
        return float("nan")
    return float(stats.spearmanr(a, b).statistic)


def _aligned_scores(rankings: Mapping[str, Scores]) -> pd.DataFrame:
    """One column per ranking, one row per layer; raises :class:`DataError` when the layers differ."""
    series = {name: s if isinstance(s, pd.Series) else pd.Series(np.asarray(s, dtype=float))
              for name, s in rankings.items()}
    layer_sets = {name: frozenset(s.index) for name, s in series.items()}
    if len(set(layer_sets.values())) > 1 or any(s.index.has_duplicates for s in series.values()):
        sizes = {name: len(layers) for name, layers in layer_sets.items()}
        raise DataError(f"rankings cover different layers (layers per ranking: {sizes}): "
                        "compute every ranking on the same model, one score per layer")
    table = pd.DataFrame(series).astype(float)
    if table.isna().any().any():
        raise DataError(f"rankings {table.columns[table.isna().any()].tolist()} contain NaN scores: "
                        "a ranking needs a number for every layer")
    return table


def jaccard_matrix(pruned_sets: Mapping[str, Set[int]]) -> pd.DataFrame:
    """Symmetric table of Jaccard overlap ``|A & B| / |A | B|`` between pruned layer sets (two empty sets: 1)."""
    names = list(pruned_sets)
    sets = {name: frozenset(pruned_sets[name]) for name in names}
    return pd.DataFrame([[_jaccard(sets[a], sets[b]) for b in names] for a in names], index=names, columns=names)


def _jaccard(a: frozenset[int], b: frozenset[int]) -> float:
    """Jaccard index of two sets, 1.0 for two empty sets."""
    union = a | b
    return len(a & b) / len(union) if union else 1.0
