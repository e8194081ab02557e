"""How stable each ranking is: every method recomputed on disjoint calibration folds, compared fold by fold.

:func:`ranking_stability` deals chapter 01's calibration samples into disjoint folds
(:func:`avss_lib.core.calibration_text.calibration_folds`), recollects the activation statistics on each
(the same sites and thresholds), recomputes every AVSS variant, Block Influence, the angular distance, the
removal-ΔPPL oracle (on the first ``oracle_samples`` samples of each fold) and Gromov's block, and compares
each pair of folds: Spearman's ρ of the per-layer scores (:func:`avss_lib.ranking.agreement.spearman_matrix`)
and the Jaccard overlap of the layers each removes at the table's ratio. Random orders and last-k do not depend
on the calibration text; SLEB's greedy order (one calibration pass per candidate and step) is not recomputed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import combinations
from typing import Any

import pandas as pd
from torch import nn
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from avss_lib.core.activation_stats import StatsSpec, collect_activation_stats
from avss_lib.core.calibration_text import calibration_folds
from avss_lib.core.layer_removal import layers_for_ratio
from avss_lib.pruning.plan import block_methods, method_scores
from avss_lib.ranking.agreement import jaccard_matrix, spearman_matrix
from avss_lib.ranking.avss import all_variant_scores, variant_by_name
from avss_lib.ranking.baselines import select_lowest


def fold_rankings(model: nn.Module, fold: Sequence[Mapping[str, Any]], spec: StatsSpec, variants: Sequence[str],
                  *, oracle_samples: int | None) -> tuple[dict[str, pd.Series], dict[str, Any]]:
    """Every calibration-dependent ranking on one fold's batches: per-layer scores by method (as
    :func:`avss_lib.pruning.plan.method_scores` names them, without random orders and last-k) and the
    block methods (:func:`avss_lib.pruning.plan.block_methods`)."""
    stats = collect_activation_stats(model, fold, spec, progress=False)
    avss = all_variant_scores(stats, tuple(variant_by_name(v) for v in variants))
    oracle = _first_samples(fold, oracle_samples)
    scores = method_scores(stats, avss, random_seeds=[], model=model, oracle_batches=oracle)
    scores.pop("last_k")
    return scores, block_methods(model, oracle)


def _first_samples(batches: Sequence[Mapping[str, Any]], n: int | None) -> list[dict[str, Any]]:
    """The first ``n`` samples of right-padded batches (all for ``None``), batched as they were."""
    kept, left = [], n
    for batch in batches:
        if left is not None and left <= 0:
            break
        rows = batch["input_ids"].shape[0] if left is None else min(left, batch["input_ids"].shape[0])
        kept.append({key: value[:rows] for key, value in batch.items()})
        left = None if left is None else left - rows
    return kept


def ranking_stability(model: nn.Module, tokenizer: PreTrainedTokenizerBase, calibration: Mapping[str, Any],
                      variants: Sequence[str], *, data_root: str | None, n_folds: int, oracle_samples: int | None,
                      ratio: float, rounding: str) -> pd.DataFrame:
    """One row per method and pair of folds: ``spearman`` (NaN for a set-choosing method such as Gromov's
    block, which has no per-layer score) and ``jaccard`` of the layers removed at ``ratio``; ``n_folds``
    disjoint folds of chapter 01's ``calibration`` record, statistics as it collected them."""
    recorded = calibration["statistics"]
    spec = StatsSpec(tuple(recorded["sites"]), tuple(recorded["abs_thresholds"]), tuple(recorded["rel_taus"]))
    folds = calibration_folds(calibration, tokenizer, data_root=data_root, n_folds=n_folds)
    results = [fold_rankings(model, fold, spec, variants, oracle_samples=oracle_samples)
               for fold in tqdm(folds, desc="calibration folds")]
    n_layers = len(next(iter(results[0][0].values())))
    k = layers_for_ratio(n_layers, ratio, rounding)
    rows = []
    for (a, (scores_a, blocks_a)), (b, (scores_b, blocks_b)) in combinations(enumerate(results), 2):
        for method in scores_a:
            rho = spearman_matrix({"a": scores_a[method], "b": scores_b[method]}).loc["a", "b"]
            overlap = jaccard_matrix({"a": set(select_lowest(scores_a[method], k)),
                                      "b": set(select_lowest(scores_b[method], k))}).loc["a", "b"]
            rows.append({"method": method, "fold_a": a, "fold_b": b, "spearman": rho, "jaccard": overlap})
        for method in blocks_a:
            overlap = jaccard_matrix({"a": set(blocks_a[method](k)), "b": set(blocks_b[method](k))}).loc["a", "b"]
            rows.append({"method": method, "fold_a": a, "fold_b": b, "spearman": float("nan"), "jaccard": overlap})
    return pd.DataFrame(rows)


def stability_summary(stability: pd.DataFrame) -> pd.DataFrame:
    """Per method (in table order): the smallest and the mean Spearman ρ and Jaccard overlap over the pairs."""
    grouped = stability.groupby("method", sort=False)[["spearman", "jaccard"]]
    summary = grouped.agg(["min", "mean"])
    summary.columns = [f"{value}_{stat}" for value, stat in summary.columns]
    return summary.reset_index()
