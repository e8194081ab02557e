r"""HSAV, HSS and EAVSS: our operationalisation of hallucination-specific variance and sparsity.

The EAVSS paper (arXiv 2411.10069) publishes no formula for HSAV, HSS or EAVSS; the definitions below are
ours, and the book quotes them from here. Every statistic is computed per activation site *s* and layer
:math:`\ell`, separately on the hallucinated examples (group :math:`H`) and the correct ones (group
:math:`C`).

**Group statistics.** For a group :math:`g`, :math:`V_g(\ell)` is a variance statistic (default: the
masked pooled variance ``pooled_var_masked`` -- per example, mean over valid tokens, then the variance over
hidden units, averaged over the group's examples -- the masked form of what AVSS uses) and :math:`S_g(\ell)`
a sparsity fraction (default ``sparsity_abs_1e-05``, the share of entries with :math:`|a| < 10^{-5}`).

**Contrasts** (``contrast="log_ratio"``, the default):

.. math::

    \mathrm{HSAV}(\ell) = \log \frac{V_H(\ell)}{V_C(\ell)}, \qquad
    \mathrm{HSS}(\ell) = \log \frac{S_H(\ell) + \delta}{S_C(\ell) + \delta}, \qquad \delta = 10^{-3}.

With ``contrast="std_diff"`` each is instead Cohen's :math:`d` of the *per-example* values
:math:`x_i` (the example's own variance or sparsity fraction):
:math:`d = (\bar x_H - \bar x_C) / s_p`, with
:math:`s_p^2 = \frac{(n_H - 1) s_H^2 + (n_C - 1) s_C^2}{n_H + n_C - 2}`.

**Combination** (``combine="difference"``, the default):

.. math::

    \mathrm{EAVSS}(\ell) = \mathrm{HSAV}(\ell) - \mathrm{HSS}(\ell)
      = \log \frac{V_H(\ell) / (S_H(\ell) + \delta)}{V_C(\ell) / (S_C(\ell) + \delta)}
      = \log \frac{\mathrm{AVSS}_H(\ell)}{\mathrm{AVSS}_C(\ell)},

i.e. the log-ratio of the layer's (smoothed) AVSS on hallucinated examples to its AVSS on correct ones --
AVSS's own variance/sparsity combination, contrasted between the groups. Layers are ranked by the
**score** :math:`|\mathrm{EAVSS}(\ell)|` (``rank_by="abs"``): a hallucination-prone layer is one whose
activation profile departs most from the correct-answer profile, in either direction; the sign is kept
in the ``eavss`` column. ``combine="sum_abs"`` gives :math:`|\mathrm{HSAV}| + |\mathrm{HSS}|` (departure
in either statistic, without letting opposite-signed shifts cancel); ``rank_by="signed"`` ranks by
:math:`\mathrm{EAVSS}` itself.

**Why these defaults.** (i) Log-ratios are scale-free, so a layer with massive activations (pooled variance
~150x larger from layer 11 of SmolLM2) is not favoured for its scale alone, and HSAV is antisymmetric in
:math:`H, C`. (ii) :math:`\delta` keeps HSS finite where sparsity is exactly 0 (measured for block outputs
at :math:`\varepsilon = 10^{-5}`); then :math:`\mathrm{HSS} = 0` and EAVSS reduces to HSAV instead of
becoming :math:`\infty`. :math:`\delta = 10^{-3}` (0.1 % of entries) is a floor below which sparsity
differences are treated as immaterial; a count-based smoothing such as :math:`(k + 1)/(N + 2)` would make
5 near-zero entries in a million look like a large effect. (iii) A ratio such as
:math:`|\mathrm{HSAV}| / (|\mathrm{HSS}| + \delta)` is *not* used: it explodes exactly where sparsity does
not differ and rewards layers whose sparsity carries no signal. (iv) The AVSS normalisation over layers
(dividing by :math:`\sum_\ell`) is not applied: in the contrast it only adds a per-site constant
:math:`\log(\sum V_H / \sum V_C)` dominated by the massive-activation layers.

**Per-example sufficient statistics** (the collector's per-example table; one row per example, site and
layer; every example must have every site and layer):

============== ===========================================================================================
column         meaning (over the example's valid, i.e. unmasked, activation entries :math:`a_j`)
============== ===========================================================================================
example_id     identifier matching the labels' index
site, layer    activation site name and layer index
n              number of valid entries (valid tokens x hidden units)
sum            :math:`\sum_j a_j`
m2             :math:`\sum_j (a_j - \bar a)^2`, centred on the example's own mean (numerically stable)
sum_abs        :math:`\sum_j |a_j|`
n_tokens       number of valid tokens
pooled_var     variance over hidden units of the example's mean over valid tokens (same ddof as the
               collector's ``pooled_var_masked``: torch's default, unbiased)
below_abs_<e>  count of entries with :math:`|a_j| < e`, e.g. ``below_abs_1e-05``
below_rel_<t>  count of entries with :math:`|a_j| < t \cdot \sigma_{\mathrm{ref}}`, e.g. ``below_rel_0.01``,
               where :math:`\sigma_{\mathrm{ref}}` is the element standard deviation of that site and layer
               over **all** examples of the data set (label-free, so the same threshold serves H, C and
               every permuted labelling)
============== ===========================================================================================

Group statistics for any labelling are then sums over examples (the parallel / Chan combination of
variances), so the permutation null recomputes them with one matrix product per column.
"""

from __future__ import annotations

import warnings
from collections.abc import Collection, Hashable, Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.stats import spearmanr
from sklearn.model_selection import StratifiedShuffleSplit

from avss_lib.core.errors import ConfigError, DataError

#: Columns every per-example sufficient-statistics table must have (plus any ``below_*`` counts).
SUFFICIENT_STAT_COLUMNS: tuple[str, ...] = (
    "example_id", "site", "layer", "n", "sum", "m2", "sum_abs", "n_tokens", "pooled_var",
)
_BELOW_PREFIXES = ("below_abs_", "below_rel_")
CONTRASTS = ("log_ratio", "std_diff")
COMBINES = ("difference", "sum_abs")
RANK_BY = ("abs", "signed")

Arrays = dict[str, np.ndarray]


class SmallClassWarning(UserWarning):
    """A class (hallucinated or correct) has fewer examples than the study's minimum."""


@dataclass(frozen=True)
class EavssConfig:
    """Which statistics EAVSS contrasts and how (see the module docstring for the formulas).

    Attributes:
        variance: group variance column, ``pooled_var_masked`` (default) or ``elem_var``.
        sparsity: group sparsity column, e.g. ``sparsity_abs_1e-05`` (default) or ``sparsity_rel_0.01``.
        contrast: ``log_ratio`` (default) or ``std_diff`` (Cohen's d of per-example values).
        delta: smoothing added to both sparsities in the HSS log-ratio.
        combine: ``difference`` (HSAV - HSS, default) or ``sum_abs`` (|HSAV| + |HSS|).
        rank_by: ``abs`` (score = |EAVSS|, default) or ``signed`` (score = EAVSS).
        min_class: smallest class size for a data set to enter pooled rankings.
    """

    variance: str = "pooled_var_masked"
    sparsity: str = "sparsity_abs_1e-05"
    contrast: str = "log_ratio"
    delta: float = 1e-3
    combine: str = "difference"
    rank_by: str = "abs"
    min_class: int = 30

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("contrast", self.contrast, CONTRASTS),
            ("combine", self.combine, COMBINES),
            ("rank_by", self.rank_by, RANK_BY),
        ):
            if value not in allowed:
                raise ConfigError(f"{name}={value!r} is unknown: use one of {allowed}")
        if self.variance not in ("pooled_var_masked", "elem_var"):
            raise ConfigError(f"variance={self.variance!r} is unknown: use 'pooled_var_masked' or 'elem_var'")
        if not self.sparsity.startswith(("sparsity_abs_", "sparsity_rel_")):
            raise ConfigError(f"sparsity={self.sparsity!r} is unknown: use a 'sparsity_abs_<eps>' or "
                              "'sparsity_rel_<tau>' column")
        if not self.delta > 0:
            raise ConfigError(f"delta={self.delta} must be > 0 so that HSS stays finite at zero sparsity")
        if self.min_class < 2:
            raise ConfigError(f"min_class={self.min_class} must be at least 2")


@dataclass(frozen=True)
class ClassSizeCheck:
    """Class sizes of one labelled data set against the minimum ``min_class``."""

    n_hallucinated: int
    n_correct: int
    min_class: int

    @property
    def ok(self) -> bool:
        """True when both classes have at least ``min_class`` examples."""
        return min(self.n_hallucinated, self.n_correct) >= self.min_class

    @property
    def message(self) -> str:
        """One readable line: the sizes and, if too small, what to do."""
        sizes = f"{self.n_hallucinated} hallucinated vs {self.n_correct} correct examples"
        if self.ok:
            return f"{sizes} (minimum {self.min_class}): usable"
        return (f"{sizes}, below the minimum of {self.min_class} per class: exclude this data set from "
                "pooled rankings, or label more examples")


@dataclass(frozen=True)
class EavssResult:
    """EAVSS per (site, layer) and the class-size check it was computed under.

    ``table`` is indexed by (site, layer) with columns ``hsav``, ``hss``, ``eavss``, ``score`` and
    ``rank`` (1 = most hallucination-prone within the site). When a class has fewer than 2 examples the
    score columns are NaN and ``class_sizes.ok`` is False.
    """

    table: pd.DataFrame
    class_sizes: ClassSizeCheck

    @property
    def usable(self) -> bool:
        """Whether this data set may enter pooled rankings."""
        return self.class_sizes.ok


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


# ---------------------------------------------------------------------------------------------- input


@dataclass(frozen=True)
class _Cube:
    """Per-example statistics as (rows = (site, layer), examples) arrays, plus the aligned labels."""

    keys: pd.MultiIndex
    columns: Arrays
    labels: np.ndarray  # bool, True = hallucinated, aligned with the example axis


def _below_columns(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if c.startswith(_BELOW_PREFIXES)]


def _check_labels(labels: pd.Series) -> None:
    if not isinstance(labels, pd.Series) or not pd.api.types.is_bool_dtype(labels.dtype):
        raise DataError("labels must be a boolean pandas Series indexed by example_id "
                        "(True = hallucinated): build it with pd.Series(flags, index=ids, dtype=bool)")


def _cube(example_stats: pd.DataFrame, labels: pd.Series) -> _Cube:
    """Validate the per-example table and reshape it into (site-layer, example) arrays."""
    missing = [c for c in SUFFICIENT_STAT_COLUMNS if c not in example_stats.columns]
    if missing:
        raise DataError(f"per-example statistics lack columns {missing}: emit the columns listed in "
                        "avss_lib.hallucination.eavss.SUFFICIENT_STAT_COLUMNS")
    _check_labels(labels)
    frame = example_stats.sort_values(["site", "layer", "example_id"], kind="stable")
    ids = np.sort(frame["example_id"].unique())
    keys = pd.MultiIndex.from_frame(frame[["site", "layer"]].drop_duplicates())
    if frame.duplicated(["example_id", "site", "layer"]).any() or len(frame) != len(keys) * len(ids):
        raise DataError("per-example statistics must have exactly one row per (example_id, site, layer) "
                        "for every example: drop duplicates and re-collect incomplete examples")
    if (frame["n"] <= 0).any():
        raise DataError("per-example statistics have rows with n <= 0: drop examples with no valid tokens")
    aligned = labels.reindex(ids)
    if aligned.isna().any():
        raise DataError(f"labels lack {int(aligned.isna().sum())} example_ids of the statistics table "
                        f"(e.g. {list(ids[aligned.isna().to_numpy()][:3])}): label every example")
    numeric = list(SUFFICIENT_STAT_COLUMNS[3:]) + _below_columns(frame)
    shape = (len(keys), len(ids))
    columns = {c: frame[c].to_numpy(dtype=np.float64).reshape(shape) for c in numeric}
    return _Cube(keys, columns, aligned.to_numpy(dtype=bool))


def check_class_sizes(labels: pd.Series, min_class: int = 30) -> ClassSizeCheck:
    """Count hallucinated (True) and correct (False) examples against ``min_class``."""
    _check_labels(labels)
    n_h = int(labels.sum())
    return ClassSizeCheck(n_hallucinated=n_h, n_correct=len(labels) - n_h, min_class=min_class)


# ------------------------------------------------------------------------------ sufficient statistics


def _per_example_values(col: Arrays) -> Arrays:
    """Each group statistic's per-example counterpart (for std_diff), shape (rows, examples)."""
    values = {
        "elem_var": col["m2"] / col["n"],
        "pooled_var_masked": col["pooled_var"],
        "mean_abs": col["sum_abs"] / col["n"],
    }
    for name in col:
        if name.startswith("below_"):
            values["sparsity_" + name.removeprefix("below_")] = col[name] / col["n"]
    return values


def _additive(cube: _Cube) -> tuple[Arrays, Arrays]:
    """Columns whose sums over a group's examples determine every group statistic, and their centres.

    Element means and per-example values are centred on their label-free overall mean, so that the
    between-example variance term never subtracts two large numbers.
    """
    col = cube.columns
    centre = {"elem": col["sum"].sum(axis=1, keepdims=True) / col["n"].sum(axis=1, keepdims=True)}
    dev = col["sum"] / col["n"] - centre["elem"]
    add = {
        "count": np.ones_like(col["n"]),
        "n": col["n"],
        "dev_sum": col["n"] * dev,
        "dev_sq": col["n"] * dev**2,
        **{c: col[c] for c in col if c not in ("n", "sum")},
    }
    for name, x in _per_example_values(col).items():
        centre[name] = x.mean(axis=1, keepdims=True)
        add[f"x:{name}"] = x - centre[name]
        add[f"xx:{name}"] = (x - centre[name]) ** 2
    return add, centre


def _group_stats_arrays(add: Arrays, centre: Arrays, members: np.ndarray) -> Arrays:
    """Group statistics, shape (rows, labellings), for a (labellings, examples) 0/1 membership matrix."""
    s = {name: a @ members.T for name, a in add.items()}
    n_ex, n = s["count"], s["n"]
    with np.errstate(divide="ignore", invalid="ignore"):
        stats = {
            "n_examples": n_ex,
            "n_tokens": s["n_tokens"],
            "elem_mean": centre["elem"] + s["dev_sum"] / n,
            "elem_var": (s["m2"] + s["dev_sq"] - s["dev_sum"] ** 2 / n) / n,
            "pooled_var_masked": s["pooled_var"] / n_ex,
            "mean_abs": s["sum_abs"] / n,
        }
        for name in add:
            if name.startswith("below_"):
                stats["sparsity_" + name.removeprefix("below_")] = s[name] / n
        for name in (k.removeprefix("x:") for k in add if k.startswith("x:")):
            stats[f"{name}_ex_mean"] = centre[name] + s[f"x:{name}"] / n_ex
            stats[f"{name}_ex_var"] = (s[f"xx:{name}"] - s[f"x:{name}"] ** 2 / n_ex) / (n_ex - 1)
    return stats


def _frame(keys: pd.MultiIndex, stats: Arrays) -> pd.DataFrame:
    """One group's statistics (single labelling) in the collector's row format."""
    frame = keys.to_frame(index=False)
    for name, values in stats.items():
        frame[name] = values[:, 0]
    return frame


def group_stats(example_stats: pd.DataFrame, labels: pd.Series) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Hallucinated and correct group statistics from per-example sufficient statistics.

    Returns ``(h, c)``: one row per (site, layer), in the collector's column format (``n_tokens``,
    ``elem_mean``, ``elem_var`` (ddof 0), ``pooled_var_masked``, ``mean_abs``, ``sparsity_abs_<e>``,
    ``sparsity_rel_<t>``), plus ``n_examples`` and, for each statistic, ``<stat>_ex_mean`` and
    ``<stat>_ex_var`` (mean and ddof-1 variance of its per-example values, NaN for a one-example group;
    used by ``std_diff``). ``labels`` is a boolean Series indexed by example_id, True = hallucinated.
    """
    cube = _cube(example_stats, labels)
    if cube.labels.all() or not cube.labels.any():
        raise DataError("one class is empty, so its group statistics are undefined: use eavss_table, "
                        "which flags such data sets, or label examples of both classes")
    add, centre = _additive(cube)
    members = np.stack([cube.labels, ~cube.labels]).astype(np.float64)
    stats = _group_stats_arrays(add, centre, members)
    h = _frame(cube.keys, {k: v[:, :1] for k, v in stats.items()})
    c = _frame(cube.keys, {k: v[:, 1:] for k, v in stats.items()})
    return h, c


# ----------------------------------------------------------------------------------------- contrasts


def _require(stats: Mapping[str, np.ndarray], column: str) -> np.ndarray:
    if column not in stats:
        raise DataError(f"group statistics lack column {column!r}: collect it (for std_diff, build the "
                        "groups with group_stats from per-example statistics)")
    return np.asarray(stats[column], dtype=np.float64)


def _std_diff(h: Mapping[str, np.ndarray], c: Mapping[str, np.ndarray], column: str) -> np.ndarray:
    n_h, n_c = _require(h, "n_examples"), _require(c, "n_examples")
    m_h, m_c = _require(h, f"{column}_ex_mean"), _require(c, f"{column}_ex_mean")
    v_h, v_c = _require(h, f"{column}_ex_var"), _require(c, f"{column}_ex_var")
    pooled_sd = np.sqrt(((n_h - 1) * v_h + (n_c - 1) * v_c) / (n_h + n_c - 2))
    constant = pooled_sd <= 0
    if (constant & (m_h != m_c)).any():
        raise DataError(f"per-example {column} is constant within each group but differs between them in "
                        "some layer, so std_diff is infinite: use contrast='log_ratio'")
    # Both groups constant at the same value (e.g. sparsity exactly 0 everywhere): no difference.
    return np.where(constant, 0.0, (m_h - m_c) / np.where(constant, 1.0, pooled_sd))


def _hsav(h: Mapping[str, np.ndarray], c: Mapping[str, np.ndarray], column: str, contrast: str) -> np.ndarray:
    if contrast == "std_diff":
        return _std_diff(h, c, column)
    v_h, v_c = _require(h, column), _require(c, column)
    if not ((v_h > 0) & (v_c > 0)).all():
        raise DataError(f"{column} is zero or missing in some layer, so its log-ratio is undefined: "
                        "use another variance statistic or contrast='std_diff'")
    return np.log(v_h / v_c)


def _hss(h: Mapping[str, np.ndarray], c: Mapping[str, np.ndarray], column: str, contrast: str,
         delta: float) -> np.ndarray:
    if contrast == "std_diff":
        return _std_diff(h, c, column)
    return np.log((_require(h, column) + delta) / (_require(c, column) + delta))


def _combine(hsav_values: np.ndarray, hss_values: np.ndarray, combine: str) -> np.ndarray:
    if combine == "difference":
        return hsav_values - hss_values
    return np.abs(hsav_values) + np.abs(hss_values)


def _score(eavss_values: np.ndarray, rank_by: str) -> np.ndarray:
    return np.abs(eavss_values) if rank_by == "abs" else eavss_values


def _scores(h: Mapping[str, np.ndarray], c: Mapping[str, np.ndarray], config: EavssConfig) -> Arrays:
    """HSAV, HSS, EAVSS and the ranking score from two groups' statistics (any matching shapes)."""
    hsav_values = _hsav(h, c, config.variance, config.contrast)
    hss_values = _hss(h, c, config.sparsity, config.contrast, config.delta)
    eavss_values = _combine(hsav_values, hss_values, config.combine)
    return {"hsav": hsav_values, "hss": hss_values, "eavss": eavss_values,
            "score": _score(eavss_values, config.rank_by)}


def _aligned(h: pd.DataFrame, c: pd.DataFrame) -> tuple[pd.MultiIndex, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Index both group frames by (site, layer) and check they cover the same rows."""
    h_i, c_i = h.set_index(["site", "layer"]), c.set_index(["site", "layer"])
    if not h_i.index.sort_values().equals(c_i.index.sort_values()) or h_i.index.has_duplicates:
        raise DataError("H and C statistics must cover the same (site, layer) rows once each: "
                        "collect both groups with the same sites and layers")
    c_i = c_i.loc[h_i.index]
    return h_i.index, {k: h_i[k].to_numpy() for k in h_i}, {k: c_i[k].to_numpy() for k in c_i}


def hsav(h: pd.DataFrame, c: pd.DataFrame, contrast: str = "log_ratio",
         variance: str = "pooled_var_masked") -> pd.Series:
    r"""Hallucination-specific activation variance per (site, layer).

    ``log_ratio``: :math:`\log(V_H / V_C)`; ``std_diff``: Cohen's d of per-example variances.
    """
    config = EavssConfig(variance=variance, contrast=contrast)
    index, h_a, c_a = _aligned(h, c)
    return pd.Series(_hsav(h_a, c_a, config.variance, config.contrast), index=index, name="hsav")


def hss(h: pd.DataFrame, c: pd.DataFrame, contrast: str = "log_ratio",
        sparsity: str = "sparsity_abs_1e-05", delta: float = 1e-3) -> pd.Series:
    r"""Hallucination-specific sparsity per (site, layer).

    ``log_ratio``: :math:`\log((S_H + \delta) / (S_C + \delta))`; ``std_diff``: Cohen's d of per-example
    sparsity fractions.
    """
    config = EavssConfig(sparsity=sparsity, contrast=contrast, delta=delta)
    index, h_a, c_a = _aligned(h, c)
    return pd.Series(_hss(h_a, c_a, config.sparsity, config.contrast, config.delta), index=index, name="hss")


def eavss_from_groups(h: pd.DataFrame, c: pd.DataFrame, config: EavssConfig = EavssConfig()) -> pd.DataFrame:
    """HSAV, HSS, EAVSS, score and within-site rank per (site, layer) from two group frames."""
    index, h_a, c_a = _aligned(h, c)
    table = pd.DataFrame(_scores(h_a, c_a, config), index=index)
    table["rank"] = rank_scores(table["score"])
    return table


def eavss_table(example_stats: pd.DataFrame, labels: pd.Series,
                config: EavssConfig = EavssConfig()) -> EavssResult:
    """EAVSS per (site, layer) from per-example sufficient statistics, with the class-size guard.

    Never raises for small classes: a data set with fewer than ``config.min_class`` examples in a class
    is flagged (``result.usable`` is False, a :class:`SmallClassWarning` is issued); with fewer than 2
    the score columns are NaN.
    """
    sizes = check_class_sizes(labels, config.min_class)
    if not sizes.ok:
        warnings.warn(sizes.message, SmallClassWarning, stacklevel=2)
    if min(sizes.n_hallucinated, sizes.n_correct) < 2:
        keys = _cube(example_stats, labels).keys
        nan = pd.DataFrame(np.nan, index=keys, columns=["hsav", "hss", "eavss", "score", "rank"])
        return EavssResult(nan, sizes)
    h, c = group_stats(example_stats, labels)
    return EavssResult(eavss_from_groups(h, c, config), sizes)


# ---------------------------------------------------------------------------------------- rankings


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


def rank_stability(rank_a: pd.Series, rank_b: pd.Series) -> float:
    """Spearman's rho between two rankings (or scores) of the same layers, aligned on the index."""
    if not rank_a.index.sort_values().equals(rank_b.index.sort_values()):
        raise DataError("the two rankings cover different layers: compare rankings of the same site and layers")
    rho = spearmanr(rank_a.to_numpy(), rank_b.loc[rank_a.index].to_numpy()).statistic
    return float(rho)


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


# ------------------------------------------------------------------------------------ null and halves


def _scores_for_memberships(cube: _Cube, h_members: np.ndarray, config: EavssConfig) -> np.ndarray:
    """Scores, shape (rows, labellings), for (labellings, examples) boolean H-membership rows."""
    add, centre = _additive(cube)
    h = _group_stats_arrays(add, centre, h_members.astype(np.float64))
    c = _group_stats_arrays(add, centre, (~h_members).astype(np.float64))
    return _scores(h, c, config)["score"]


def permutation_eavss(example_stats: pd.DataFrame, labels: pd.Series, config: EavssConfig = EavssConfig(),
                      n_perm: int = 1000, seed: int = 0) -> PermutationResult:
    """Permutation null of the EAVSS score: shuffle the labels ``n_perm`` times (class sizes kept).

    Group statistics of every shuffled labelling are sums of the per-example sufficient statistics, so
    the whole null costs one matrix product per statistic. Raises when a class has fewer than 2 examples
    (nothing to permute); flags (``class_sizes.ok``) when below ``config.min_class``.
    """
    if n_perm < 1:
        raise ConfigError(f"n_perm={n_perm} must be at least 1 (use >= 999 for p-values near 0.001)")
    sizes = check_class_sizes(labels, config.min_class)
    if min(sizes.n_hallucinated, sizes.n_correct) < 2:
        raise DataError(f"{sizes.message}; a permutation null needs at least 2 per class")
    if not sizes.ok:
        warnings.warn(sizes.message, SmallClassWarning, stacklevel=2)
    cube = _cube(example_stats, labels)
    rng = np.random.default_rng(seed)
    shuffled = np.stack([rng.permutation(cube.labels) for _ in range(n_perm)])
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
    cube = _cube(example_stats, labels)
    halves = StratifiedShuffleSplit(n_splits=n_splits, test_size=0.5, random_state=seed)
    rows = []
    for split, (first, _) in enumerate(halves.split(np.zeros(len(cube.labels)), cube.labels)):
        in_first = np.zeros(len(cube.labels), dtype=bool)
        in_first[first] = True
        scores = [_half_scores(cube, mask, config) for mask in (in_first, ~in_first)]
        for site in cube.keys.unique(level="site"):
            rho = rank_stability(scores[0].xs(site, level="site"), scores[1].xs(site, level="site"))
            rows.append({"split": split, "site": site, "rho": rho})
    return pd.DataFrame(rows)


def _half_scores(cube: _Cube, mask: np.ndarray, config: EavssConfig) -> pd.Series:
    """Scores computed on the examples selected by ``mask`` only."""
    sub = _Cube(cube.keys, {k: v[:, mask] for k, v in cube.columns.items()}, cube.labels[mask])
    return pd.Series(_scores_for_memberships(sub, sub.labels[None, :], config)[:, 0], index=cube.keys)
