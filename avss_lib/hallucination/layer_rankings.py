"""Layer rankings by EAVSS score: within-site ranks, the top-k layers, and the mean rank across data sets.

Rank 1 is the most hallucination-prone layer (the highest score, :mod:`avss_lib.hallucination.eavss`). How
much two rankings agree is Spearman's rho of :func:`avss_lib.ranking.agreement.spearman_matrix`.
"""

from __future__ import annotations

from collections.abc import Collection, Hashable, Mapping

import pandas as pd

from avss_lib.core.errors import ConfigError, DataError


def rank_scores(scores: pd.Series) -> pd.Series:
    """Rank 1 = highest score, within each site when the index has a ``site`` level (ties averaged)."""
    if "site" in (scores.index.names or []):
        return scores.groupby(level="site").rank(ascending=False, method="average")
    return scores.rank(ascending=False, method="average")


def top_k_layers(scores: pd.Series, k: int) -> list[Hashable]:
    """The index labels of the ``k`` highest scores (ties broken by index order)."""
    if not 1 <= k <= len(scores):
        raise ConfigError(f"k={k} must be between 1 and the number of layers ({len(scores)})")
    return list(scores.sort_index().sort_values(ascending=False, kind="stable").index[:k])


def pool_rankings(per_dataset_scores: Mapping[str, pd.Series], excluded: Collection[str] = ()) -> pd.DataFrame:
    """Mean rank across the included data sets (rank 1 = most hallucination-prone).

    Returns one column of ranks per included data set, ``mean_rank`` and ``n_datasets``, sorted by
    ``mean_rank``. Data sets named in ``excluded`` (e.g. those with ``not result.usable``) are left out.
    """
    unknown = set(excluded) - set(per_dataset_scores)
    if unknown:
        raise ConfigError(f"excluded data sets {sorted(unknown)} are not among the scores: check their names")
    included = {name: s for name, s in per_dataset_scores.items() if name not in excluded}
    if not included:
        raise DataError("every data set is excluded from pooling: label more examples or lower min_class")
    ranks = pd.DataFrame({name: rank_scores(s) for name, s in included.items()})
    if ranks.isna().any().any():
        raise DataError("the included data sets score different layers (or NaN scores): pool only "
                        "data sets scored on the same sites and layers, and exclude flagged ones")
    ranks["mean_rank"] = ranks[list(included)].mean(axis=1)
    ranks["n_datasets"] = len(included)
    return ranks.sort_values("mean_rank", kind="stable")
