r"""Group statistics of hallucinated and correct examples, from per-example sufficient statistics.

EAVSS (:mod:`avss_lib.hallucination.eavss`) contrasts a variance and a sparsity statistic between the
hallucinated examples (group :math:`H`) and the correct ones (group :math:`C`). Both are computed here from a
table of **per-example sufficient statistics** (what :func:`avss_lib.hallucination.example_stats.
collect_example_stats` emits; one row per example, site and layer; every example must have every site and
layer):

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
variances), so the permutation null (:mod:`avss_lib.hallucination.null_and_stability`) recomputes them for
every shuffled labelling with one matrix product per column. Labels are a boolean Series indexed by
``example_id``, True = hallucinated; a class smaller than the study's minimum is flagged by
:func:`check_class_sizes`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from avss_lib.core.errors import DataError

#: Columns every per-example sufficient-statistics table must have (plus any ``below_*`` counts).
SUFFICIENT_STAT_COLUMNS: tuple[str, ...] = (
    "example_id", "site", "layer", "n", "sum", "m2", "sum_abs", "n_tokens", "pooled_var",
)
_BELOW_PREFIXES = ("below_abs_", "below_rel_")

Arrays = dict[str, np.ndarray]


class SmallClassWarning(UserWarning):
    """A class (hallucinated or correct) has fewer examples than the study's minimum."""


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


def check_labels(labels: pd.Series) -> None:
    """Raise a :class:`DataError` unless ``labels`` is a boolean Series (True = hallucinated)."""
    if not isinstance(labels, pd.Series) or not pd.api.types.is_bool_dtype(labels.dtype):
        raise DataError("labels must be a boolean pandas Series indexed by example_id "
                        "(True = hallucinated): build it with pd.Series(flags, index=ids, dtype=bool)")


def check_class_sizes(labels: pd.Series, min_class: int = 30) -> ClassSizeCheck:
    """Count hallucinated (True) and correct (False) examples against ``min_class``."""
    check_labels(labels)
    n_h = int(labels.sum())
    return ClassSizeCheck(n_hallucinated=n_h, n_correct=len(labels) - n_h, min_class=min_class)


# ---------------------------------------------------------------------------------------------- input


@dataclass(frozen=True)
class ExampleCube:
    """Per-example statistics as (rows = (site, layer), examples) arrays, plus the aligned labels."""

    keys: pd.MultiIndex
    columns: Arrays
    labels: np.ndarray  # bool, True = hallucinated, aligned with the example axis

    def subset(self, mask: np.ndarray) -> ExampleCube:
        """The same rows for the examples selected by the boolean ``mask`` only."""
        return ExampleCube(self.keys, {k: v[:, mask] for k, v in self.columns.items()}, self.labels[mask])


def example_cube(example_stats: pd.DataFrame, labels: pd.Series) -> ExampleCube:
    """Validate the per-example table and reshape it into (site-layer, example) arrays."""
    missing = [c for c in SUFFICIENT_STAT_COLUMNS if c not in example_stats.columns]
    if missing:
        raise DataError(f"per-example statistics lack columns {missing}: emit the columns listed in "
                        "avss_lib.hallucination.group_stats.SUFFICIENT_STAT_COLUMNS")
    check_labels(labels)
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
    below = [c for c in frame.columns if c.startswith(_BELOW_PREFIXES)]
    numeric = list(SUFFICIENT_STAT_COLUMNS[3:]) + below
    shape = (len(keys), len(ids))
    columns = {c: frame[c].to_numpy(dtype=np.float64).reshape(shape) for c in numeric}
    return ExampleCube(keys, columns, aligned.to_numpy(dtype=bool))


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


def additive_sums(cube: ExampleCube) -> tuple[Arrays, Arrays]:
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


def group_stats_arrays(add: Arrays, centre: Arrays, members: np.ndarray) -> Arrays:
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
    cube = example_cube(example_stats, labels)
    if cube.labels.all() or not cube.labels.any():
        raise DataError("one class is empty, so its group statistics are undefined: use eavss_table, "
                        "which flags such data sets, or label examples of both classes")
    add, centre = additive_sums(cube)
    members = np.stack([cube.labels, ~cube.labels]).astype(np.float64)
    stats = group_stats_arrays(add, centre, members)
    h = _frame(cube.keys, {k: v[:, :1] for k, v in stats.items()})
    c = _frame(cube.keys, {k: v[:, 1:] for k, v in stats.items()})
    return h, c
