r"""Claim E1 for one activation site: EAVSS per data set with its null, stability and probe checks, and pooling.

:func:`analyse_dataset` combines the pieces — EAVSS scores (:mod:`avss_lib.hallucination.eavss`), the
label-permutation null and split-half stability (:mod:`avss_lib.hallucination.null_and_stability`), seed
stability (below) and per-layer linear probes (:mod:`avss_lib.hallucination.probes`) — for one data set;
:func:`summary_table` condenses the analyses into the numbers the E1 rule
(:mod:`avss_lib.hallucination.verdict`) decides on, and :func:`pooled_top_k` pools the usable data sets.

**Seed stability.** The model answers each question once; a "seed" draws a label-stratified subsample
(``fraction`` of the examples, default 70%) with that seed and recomputes EAVSS on it. Spearman's
:math:`\rho` between the scores of every pair of seeds measures how much the ranking depends on which
questions were asked. Seed subsamples overlap, so this :math:`\rho` is optimistic; the split-half
:math:`\rho` (:func:`avss_lib.hallucination.null_and_stability.split_half_stability`) uses disjoint halves and
is the stricter test.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedShuffleSplit

from avss_lib.core.errors import ConfigError, DataError
from avss_lib.core.metrics import minimum_detectable_effect
from avss_lib.hallucination.eavss import EavssConfig, eavss_table
from avss_lib.hallucination.group_stats import SmallClassWarning, check_class_sizes
from avss_lib.hallucination.layer_rankings import pool_rankings, top_k_layers
from avss_lib.hallucination.null_and_stability import permutation_eavss, spearman_rho, split_half_stability
from avss_lib.hallucination.probes import probe_auroc

#: Columns of :func:`score_table` (the ``EAVSS_SCORES`` artifact).
SCORE_COLUMNS: tuple[str, ...] = ("dataset", "layer", "hsav", "hss", "eavss", "score", "rank", "p_value",
                                  "p_value_max", "probe_auroc")


@dataclass
class DatasetAnalysis:
    """E1 analysis of one data set at one site (fields are None where the class sizes do not allow them)."""

    dataset: str
    n_hallucinated: int
    n_correct: int
    usable: bool
    message: str
    scores: pd.DataFrame  # index layer: hsav, hss, eavss, score, rank
    top_k: list[int]
    p_value: pd.Series | None = None
    p_value_max: pd.Series | None = None
    split_half: pd.DataFrame | None = None
    seed_rho: pd.DataFrame | None = None
    probes: pd.DataFrame | None = None
    length_auroc: float | None = None  # the same probe on the answer's length in tokens alone


def site_rows(example_stats: pd.DataFrame, site: str) -> pd.DataFrame:
    """The per-example rows of one site (raises when the site was not collected)."""
    rows = example_stats[example_stats["site"] == site]
    if rows.empty:
        raise ConfigError(f"site {site!r} was not collected: collect it or choose one of "
                          f"{sorted(example_stats['site'].unique())}")
    return rows


def _stratified_subset(labels: pd.Series, fraction: float, seed: int) -> pd.Index:
    split = StratifiedShuffleSplit(n_splits=1, train_size=fraction, random_state=seed)
    keep, _ = next(split.split(np.zeros(len(labels)), labels.to_numpy()))
    return labels.index[np.sort(keep)]


def seed_stability(example_stats: pd.DataFrame, labels: pd.Series, config: EavssConfig, seeds: Sequence[int],
                   fraction: float = 0.7) -> pd.DataFrame:
    """Spearman's rho between EAVSS scores of label-stratified subsamples drawn with each pair of ``seeds``.

    ``example_stats`` must hold one site. Returns one row per seed pair: ``seed_a``, ``seed_b``, ``rho``.
    """
    if len(set(seeds)) < 2:
        raise ConfigError(f"seeds={list(seeds)}: give at least two distinct seeds (the study uses >= 3)")
    if not 0 < fraction < 1:
        raise ConfigError(f"fraction={fraction} must be strictly between 0 and 1")
    scores = {}
    for seed in seeds:
        ids = _stratified_subset(labels, fraction, seed)
        sub = example_stats[example_stats["example_id"].isin(ids)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SmallClassWarning)
            result = eavss_table(sub, labels.loc[ids], replace(config, min_class=2))
        scores[seed] = result.table["score"].droplevel("site")
    return pd.DataFrame([{"seed_a": a, "seed_b": b, "rho": spearman_rho(scores[a], scores[b])}
                         for a, b in itertools.combinations(list(dict.fromkeys(seeds)), 2)])


def length_bins(lengths: pd.Series, n_bins: int) -> pd.Series:
    """Each example's answer-length quantile bin (0 .. at most ``n_bins - 1``; ties share a bin), by example id."""
    if lengths.nunique() < 2:  # one length: one bin
        return pd.Series(0, index=lengths.index)
    return pd.Series(pd.qcut(lengths.rank(method="min"), n_bins, labels=False, duplicates="drop"),
                     index=lengths.index).astype(int)


def analyse_dataset(dataset: str, example_stats: pd.DataFrame, labels: pd.Series, site: str, k: int, *,
                    config: EavssConfig = EavssConfig(), features: Mapping[int, np.ndarray] | None = None,
                    feature_ids: Sequence[str] | None = None, seeds: Sequence[int] = (0, 1, 2),
                    seed_fraction: float = 0.7, n_perm: int = 1000, n_splits: int = 20, probe_folds: int = 5,
                    answer_lengths: pd.Series | None = None, length_strata: int = 0,
                    seed: int = 0) -> DatasetAnalysis:
    """EAVSS scores, top-k layers, and -- when both classes reach ``config.min_class`` -- permutation null,
    split-half and seed stability, and per-layer probe AUROC (on ``features`` rows ``feature_ids``).

    With ``answer_lengths`` (tokens per example id, 0 for an empty answer) the same probe is also fitted on the
    length alone, on the same folds: a layer's probe that does no better than this reads the answer's length,
    not the layer's state (``length_auroc``). With ``length_strata`` > 1 the permutation null shuffles the labels
    within that many answer-length quantile bins (:func:`length_bins`), the length control of the answer
    position."""
    rows = site_rows(example_stats, site)
    labels = labels.loc[pd.unique(rows["example_id"])]
    sizes = check_class_sizes(labels, config.min_class)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SmallClassWarning)  # the class-size message is reported in the table instead
        result = eavss_table(rows, labels, config)
    scores = result.table.droplevel("site")
    analysis = DatasetAnalysis(dataset, sizes.n_hallucinated, sizes.n_correct, sizes.ok, sizes.message, scores,
                               top_k_layers(scores["score"], k) if scores["score"].notna().all() else [])
    if not sizes.ok:
        return analysis
    strata = length_bins(answer_lengths, length_strata) if answer_lengths is not None and length_strata > 1 else None
    perm = permutation_eavss(rows, labels, config, n_perm=n_perm, seed=seed, strata=strata)
    analysis.p_value = perm.p_value.droplevel("site")
    analysis.p_value_max = perm.p_value_max.droplevel("site")
    analysis.split_half = split_half_stability(rows, labels, config, n_splits=n_splits, seed=seed)
    analysis.seed_rho = seed_stability(rows, labels, config, seeds, seed_fraction)
    if features is not None and min(sizes.n_hallucinated, sizes.n_correct) >= probe_folds:
        if feature_ids is None:
            raise ConfigError("feature_ids must give the example id of each feature row")
        y = labels.reindex(list(feature_ids))
        if y.isna().any():
            raise DataError(f"{dataset}: feature rows lack labels: collect features for labelled examples only")
        analysis.probes = probe_auroc(features, y.to_numpy(dtype=bool), n_splits=probe_folds, seed=seed,
                                      min_class=config.min_class)
        if answer_lengths is not None:
            lengths = answer_lengths.reindex(list(feature_ids)).to_numpy(dtype=float)[:, None]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", SmallClassWarning)
                analysis.length_auroc = float(probe_auroc({"length": lengths}, y.to_numpy(dtype=bool),
                                                          n_splits=probe_folds, seed=seed,
                                                          min_class=config.min_class)["auroc_mean"].iloc[0])
    return analysis


def score_table(analyses: Mapping[str, DatasetAnalysis]) -> pd.DataFrame:
    """Long table (:data:`SCORE_COLUMNS`): per data set and layer the scores, null p-values and probe AUROC."""
    parts = []
    for name, a in analyses.items():
        part = a.scores.reset_index().assign(dataset=name)
        part["p_value"] = part["layer"].map(a.p_value) if a.p_value is not None else np.nan
        part["p_value_max"] = part["layer"].map(a.p_value_max) if a.p_value_max is not None else np.nan
        part["probe_auroc"] = part["layer"].map(a.probes["auroc_mean"]) if a.probes is not None else np.nan
        parts.append(part)
    return pd.concat(parts, ignore_index=True)[list(SCORE_COLUMNS)]


def pooled_top_k(analyses: Mapping[str, DatasetAnalysis], k: int) -> tuple[list[int], pd.DataFrame, list[str]]:
    """Top-k layers by mean rank over the usable data sets; returns (layers, pooled ranks, excluded)."""
    excluded = [name for name, a in analyses.items() if not a.usable]
    included = [name for name in analyses if name not in excluded]
    if not included:
        return [], pd.DataFrame(), excluded
    pooled = pool_rankings({name: a.scores["score"] for name, a in analyses.items()}, excluded)
    return top_k_layers(-pooled["mean_rank"], k), pooled, excluded


def detectable_auroc(n_hallucinated: int, n_correct: int, *, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest AUROC a single test at two-sided level ``alpha`` tells from chance with ``power`` at these class
    sizes: ``0.5 + (z_{1-alpha/2} + z_power) * SE_0``, with the Mann-Whitney null standard error
    ``SE_0 = sqrt((n_h + n_c + 1) / (12 n_h n_c))`` (NaN when a class is empty). It bounds what the probes, and any
    layer statistic that separates the classes about as well, can show on this data set."""
    if min(n_hallucinated, n_correct) < 1:
        return float("nan")
    se = math.sqrt((n_hallucinated + n_correct + 1) / (12 * n_hallucinated * n_correct))
    return 0.5 + minimum_detectable_effect(se, level=1 - alpha, power=power)


def summary_table(analyses: Mapping[str, DatasetAnalysis], alpha: float = 0.05) -> pd.DataFrame:
    """One row per data set (index ``dataset``): what the E1 rule (:mod:`avss_lib.hallucination.verdict`) reads.

    Always: ``n_hallucinated``, ``n_correct``, ``usable``, ``top_k`` (list of layers), ``max_abs_eavss`` (the
    largest score). For usable data sets: ``min_p_max`` (smallest family-wise null p-value),
    ``n_layers_p_max_below_alpha``, ``split_half_rho_median``, ``seed_rho_mean``; with probes also
    ``probe_best_layer``, ``probe_best_auroc``, ``probe_eavss_rho`` (Spearman's rho over layers between score
    and probe AUROC), ``probe_auroc_top_k`` and ``probe_auroc_rest`` (mean AUROC of the top-k layers and of
    the others) and, when answer lengths were given, ``length_auroc`` (the probe on the answer's length alone).
    ``mde_auroc`` is the data set's power (:func:`detectable_auroc`).
    """
    rows = []
    for name, a in analyses.items():
        row = {"dataset": name, "n_hallucinated": a.n_hallucinated, "n_correct": a.n_correct, "usable": a.usable,
               "top_k": list(a.top_k), "max_abs_eavss": float(a.scores["score"].max()),
               "mde_auroc": detectable_auroc(a.n_hallucinated, a.n_correct, alpha=alpha)}
        if a.usable:
            assert a.p_value_max is not None and a.split_half is not None and a.seed_rho is not None
            row.update(min_p_max=float(a.p_value_max.min()), n_layers_p_max_below_alpha=int((a.p_value_max < alpha).sum()),
                       split_half_rho_median=float(a.split_half["rho"].median()),
                       seed_rho_mean=float(a.seed_rho["rho"].mean()))
            if a.probes is not None:
                auroc = a.probes["auroc_mean"]
                row.update(probe_best_layer=int(auroc.idxmax()), probe_best_auroc=float(auroc.max()),
                           probe_eavss_rho=spearman_rho(a.scores["score"].loc[auroc.index], auroc),
                           probe_auroc_top_k=float(auroc.loc[a.top_k].mean()),
                           probe_auroc_rest=float(auroc.drop(a.top_k).mean()))
                if a.length_auroc is not None:
                    row["length_auroc"] = a.length_auroc
        rows.append(row)
    return pd.DataFrame(rows).set_index("dataset")
