r"""AVSS scores and the rules that turn them into a set of layers to prune.

For layer :math:`i` with activation variance :math:`\sigma^2(L_i)` and sparsity :math:`S(L_i)`:

.. math::

   \mathrm{AVSS}_\delta(L_i) = \frac{\sigma^2(L_i) / \sum_j \sigma^2(L_j)}{S(L_i) + \delta},\qquad
   \widehat{\mathrm{AVSS}}(L_i) = \frac{\mathrm{AVSS}(L_i)}{\sum_j \mathrm{AVSS}(L_j)}

with :math:`\delta = 0` in the papers. Normalising the variance by its sum does not change the ranking. When a
layer has :math:`S = 0` and :math:`\delta = 0` its score is :math:`+\infty`, the normalised scores are undefined
(NaN), and any ranking among such layers is arbitrary: the functions here report this instead of hiding it.

Variance variants (``variance=``): ``pooled_padded`` (the authors' code: mean over every position including
padding, then unbiased variance over hidden units, averaged over samples), ``pooled_masked`` (the same with
padding excluded), ``element`` (the papers' formula: variance of all valid activation entries).
Sparsity variants (``sparsity=``): ``abs_padded:<eps>`` (the authors' code: fraction of all entries, padding
included, with :math:`|a| < \varepsilon`), ``abs:<eps>`` (valid entries only), ``rel:<tau>``
(:math:`|a| < \tau\cdot\mathrm{std}` of that layer, valid entries).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from avss_lib.core.activation_stats import abs_column, rel_column
from avss_lib.core.errors import ConfigError
from avss_lib.core.layer_removal import layers_for_ratio

VARIANCE_COLUMNS = {"pooled_padded": "pooled_var_padded", "pooled_masked": "pooled_var_masked", "element": "elem_var"}


@dataclass(frozen=True)
class AvssVariant:
    """One way of computing AVSS: which site, variance, sparsity and smoothing."""

    name: str
    site: str
    variance: str
    sparsity: str
    delta: float = 0.0
    description: str = ""


#: The variants the book compares. The first one is the authors' code, exactly.
DEFAULT_VARIANTS: tuple[AvssVariant, ...] = (
    AvssVariant("authors_code", "block_output", "pooled_padded", "abs_padded:1e-05", 0.0,
                "authors' code: block output, pooled variance with padding, |a|<1e-5 over all positions"),
    AvssVariant("formula_abs", "block_output", "element", "abs:1e-05", 0.0,
                "papers' formula: element variance over valid tokens, |a|<1e-5"),
    AvssVariant("block_rel", "block_output", "element", "rel:0.01", 0.0,
                "block output, relative threshold |a| < 0.01 std"),
    AvssVariant("block_smoothed", "block_output", "pooled_masked", "abs:1e-05", 1e-6,
                "block output, masked pooled variance, additive smoothing delta=1e-6"),
    AvssVariant("mlp_abs", "mlp_activation", "element", "abs:1e-05", 0.0,
                "MLP activation (input of down-projection), |a|<1e-5"),
    AvssVariant("mlp_rel", "mlp_activation", "element", "rel:0.01", 0.0,
                "MLP activation, relative threshold |a| < 0.01 std"),
    AvssVariant("attn_rel", "attn_output", "element", "rel:0.01", 0.0,
                "attention output, relative threshold |a| < 0.01 std"),
)


def sparsity_column(sparsity: str) -> str:
    """Statistics-table column for a sparsity spec such as ``abs:1e-05``, ``abs_padded:1e-05`` or ``rel:0.01``."""
    kind, _, value = sparsity.partition(":")
    try:
        threshold = float(value)
    except ValueError:
        threshold = float("nan")
    if kind not in ("abs", "abs_padded", "rel") or not threshold > 0:
        raise ConfigError(f"bad sparsity spec {sparsity!r}: use 'abs:<eps>', 'abs_padded:<eps>' or 'rel:<tau>' with a positive number")
    return rel_column(threshold) if kind == "rel" else abs_column(threshold, padded=kind == "abs_padded")


def avss_scores(stats: pd.DataFrame, variant: AvssVariant) -> pd.DataFrame:
    """Per-layer variance, sparsity and AVSS of one variant, with ranks (1 = least important).

    ``stats`` is the table of :func:`avss_lib.core.activation_stats.collect_activation_stats`. Layers whose score is
    infinite (zero sparsity, no smoothing) are flagged in column ``undefined``.
    """
    if variant.variance not in VARIANCE_COLUMNS:
        raise ConfigError(f"unknown variance {variant.variance!r}: use one of {', '.join(VARIANCE_COLUMNS)}")
    if variant.delta < 0:
        raise ConfigError(f"smoothing delta must be >= 0, got {variant.delta}")
    column = sparsity_column(variant.sparsity)
    rows = stats[stats["site"] == variant.site].sort_values("layer")
    if rows.empty:
        raise ConfigError(f"no statistics for site {variant.site!r}: collect it in notebook 01 (parameter sites)")
    if column not in rows:
        raise ConfigError(f"statistics lack column {column!r}: add that threshold to notebook 01's thresholds")
    variance = rows[VARIANCE_COLUMNS[variant.variance]].to_numpy(dtype=float)
    sparsity = rows[column].to_numpy(dtype=float)
    variance_norm = variance / variance.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        score = variance_norm / (sparsity + variant.delta)
    undefined = ~np.isfinite(score)
    total = score.sum()
    norm = score / total if np.isfinite(total) else np.full_like(score, np.nan)
    out = pd.DataFrame({
        "variant": variant.name, "layer": rows["layer"].to_numpy(), "variance": variance,
        "variance_norm": variance_norm, "sparsity": sparsity, "delta": variant.delta, "avss": score, "avss_norm": norm,
        "undefined": undefined,
    })
    out["rank"] = prune_rank(score)
    return out


def prune_rank(score: np.ndarray) -> np.ndarray:
    """Rank 1 = lowest score = pruned first; ties (including +inf) broken by layer index."""
    order = np.lexsort((np.arange(len(score)), score))
    rank = np.empty(len(score), dtype=int)
    rank[order] = np.arange(1, len(score) + 1)
    return rank


def select_fixed_fraction(score: np.ndarray, ratio: float = 0.25, rounding: str = "round") -> list[int]:
    """The ``layers_for_ratio(n, ratio)`` layers with the lowest scores (ties by layer index)."""
    k = layers_for_ratio(len(score), ratio, rounding=rounding)
    return sorted(int(i) for i in np.argsort(prune_rank(score))[:k])


def select_cumulative_sorted(norm_score: np.ndarray, threshold: float = 0.25) -> list[int]:
    """The authors' intent, done correctly: sort ascending, prune while the cumulative normalised mass <= threshold."""
    _check_threshold(threshold)
    if not np.all(np.isfinite(norm_score)):
        return []
    order = np.lexsort((np.arange(len(norm_score)), norm_score))
    cumulative = np.cumsum(norm_score[order])
    return sorted(int(i) for i in order[cumulative <= threshold])


def select_authors_code(variance: np.ndarray, sparsity: np.ndarray, threshold: float = 0.25) -> list[int]:
    """Exactly what the authors' script (``AVSS.py`` in their repository) prunes, inf and NaN included.

    The script computes ``AVSS = Variance / Sparsity`` with pandas, normalises by ``AVSS.sum()``, takes the
    cumulative sum in *layer-index* order, then sorts by AVSS and keeps the rows whose cumulative mass is <=
    the threshold. Two consequences follow from pandas' arithmetic, and both are reproduced here by running
    the same pandas operations:

    * the cumulative sum is taken before sorting (a bug): without zero sparsities the selection is a prefix of
      the shallowest layers whose mass reaches the threshold, whatever their scores;
    * a zero sparsity gives AVSS = inf, so the sum is inf, finite/inf = 0 and inf/inf = NaN; ``cumsum`` skips
      NaN, so every layer with a non-zero sparsity has cumulative mass 0 and is pruned, and the layers with
      infinite scores are kept.

    Returns the selected layer indices, sorted.
    """
    _check_threshold(threshold)
    data = pd.DataFrame({"Layer": np.arange(len(variance)), "Variance": np.asarray(variance, dtype=float),
                         "Sparsity": np.asarray(sparsity, dtype=float)})
    with np.errstate(divide="ignore", invalid="ignore"):
        data["AVSS"] = data["Variance"] / data["Sparsity"]
        data["Normalized_AVSS"] = data["AVSS"] / data["AVSS"].sum()
    data["Cumulative_AVSS"] = data["Normalized_AVSS"].cumsum()
    data = data.sort_values(by="AVSS", ascending=True)
    return sorted(int(i) for i in data.loc[data["Cumulative_AVSS"] <= threshold, "Layer"])


def _check_threshold(threshold: float) -> None:
    if not 0 < threshold < 1:
        raise ConfigError(f"cumulative threshold must be in (0, 1), got {threshold}")


def selections(scores: pd.DataFrame, ratio: float = 0.25, threshold: float = 0.25, rounding: str = "round") -> pd.DataFrame:
    """For each variant in ``scores`` (output of :func:`avss_scores`, concatenated), the layers each rule prunes."""
    rows = []
    for name, group in scores.groupby("variant", sort=False):
        group = group.sort_values("layer")
        score, norm = group["avss"].to_numpy(), group["avss_norm"].to_numpy()
        n_undefined = int(group["undefined"].sum())
        fixed = select_fixed_fraction(score, ratio, rounding)
        rules = {
            "fixed_fraction": fixed,
            "cumulative_sorted": select_cumulative_sorted(norm, threshold),
            "authors_code": select_authors_code(group["variance"].to_numpy(),
                                                group["sparsity"].to_numpy() + group["delta"].to_numpy(), threshold),
        }
        for rule, layers in rules.items():
            arbitrary = rule == "fixed_fraction" and any(group["undefined"].to_numpy()[fixed])
            rows.append({"variant": name, "rule": rule, "n_pruned": len(layers), "layers": layers,
                         "n_undefined_scores": n_undefined, "tie_broken_arbitrarily": bool(arbitrary)})
    return pd.DataFrame(rows)


def all_variant_scores(stats: pd.DataFrame, variants: tuple[AvssVariant, ...] = DEFAULT_VARIANTS) -> pd.DataFrame:
    """:func:`avss_scores` of every variant whose site was collected, concatenated."""
    sites = set(stats["site"])
    return pd.concat([avss_scores(stats, v) for v in variants if v.site in sites], ignore_index=True)


def variant_by_name(name: str, variants: tuple[AvssVariant, ...] = DEFAULT_VARIANTS) -> AvssVariant:
    """Look a variant up by name, with a clear error listing the known ones."""
    for v in variants:
        if v.name == name:
            return v
    raise ConfigError(f"unknown AVSS variant {name!r}: choose from {', '.join(v.name for v in variants)}")


def lowest_avss_layers(scores: pd.DataFrame, variant: str, k: int) -> list[int]:
    """The ``k`` least important layers of one variant (pruning ranks 1..k, ties by layer index), sorted.

    ``scores`` is :func:`all_variant_scores`' table (the ``AVSS_SCORES`` artifact). With ``k`` equal to a
    rule's count this is the ``fixed_fraction`` selection of :func:`selections`.
    """
    rows = scores[scores["variant"] == variant]
    if rows.empty:
        raise ConfigError(f"no AVSS variant {variant!r} was computed: choose one of {sorted(scores['variant'].unique())}")
    if not 1 <= k <= len(rows):
        raise ConfigError(f"k={k} layers requested but variant {variant!r} scores {len(rows)}: use 1 <= k <= {len(rows)}")
    return sorted(int(i) for i in rows.sort_values("rank")["layer"].head(k))
