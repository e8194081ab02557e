r"""HSAV, HSS and EAVSS: our operationalisation of hallucination-specific variance and sparsity.

The EAVSS paper (arXiv 2411.10069) publishes no formula for HSAV, HSS or EAVSS; the definitions below are
ours (chapter 04 states them with its run's settings), and this module is the one place they are
implemented. Every statistic is computed per activation site *s* and layer
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

Group statistics are sums over the per-example sufficient statistics of
:mod:`avss_lib.hallucination.group_stats`; the permutation null and split-half stability of the score are in
:mod:`avss_lib.hallucination.null_and_stability`, the rankings built from it in
:mod:`avss_lib.hallucination.layer_rankings`.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from avss_lib.core.errors import ConfigError, DataError
from avss_lib.hallucination.group_stats import (
    Arrays,
    ClassSizeCheck,
    SmallClassWarning,
    check_class_sizes,
    example_cube,
    group_stats,
)
from avss_lib.hallucination.layer_rankings import rank_scores

CONTRASTS = ("log_ratio", "std_diff")
COMBINES = ("difference", "sum_abs")
RANK_BY = ("abs", "signed")


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


def eavss_scores(h: Mapping[str, np.ndarray], c: Mapping[str, np.ndarray], config: EavssConfig) -> Arrays:
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
    table = pd.DataFrame(eavss_scores(h_a, c_a, config), index=index)
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
        keys = example_cube(example_stats, labels).keys
        nan = pd.DataFrame(np.nan, index=keys, columns=["hsav", "hss", "eavss", "score", "rank"])
        return EavssResult(nan, sizes)
    h, c = group_stats(example_stats, labels)
    return EavssResult(eavss_from_groups(h, c, config), sizes)
