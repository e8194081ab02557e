"""The chapter's tables for display: the retention table, AVSS against each baseline, and the verdict counts."""

from __future__ import annotations

import pandas as pd
from pandas.io.formats.style import Styler

from avss_lib.core.formatting import percent
from avss_lib.pruning.plan import method_label
from avss_lib.pruning.stability import stability_summary


def score_text(value: float, metric: str) -> str:
    """A score for a reader: two decimals for perplexity, three for every other metric."""
    return f"{value:.2f}" if metric == "perplexity" else f"{value:.3f}"


def retention_cell(r: pd.Series) -> str:
    """One cell of :func:`retention_display`: ``score [low, high] · raw r% [low, high] · above chance c% [low, high]``
    (random: mean ± sd and the range over seeds; for perplexity the geometric mean and the range, and only the
    perplexity ratio); † marks an uninformative task."""
    metric = r["metric"]
    if r["n_seeds"] == r["n_seeds"]:  # pooled random seeds
        spread = "" if metric == "perplexity" else f" ± {score_text(r['sd'], metric)} sd"
        score = (f"{score_text(r['value'], metric)}{spread} (seeds {score_text(r['min'], metric)}–"
                 f"{score_text(r['max'], metric)})")
    else:
        score = (f"{score_text(r['value'], metric)} [{score_text(r['low'], metric)}, "
                 f"{score_text(r['high'], metric)}]")
    if r["method"] == "unpruned":
        return score
    flag = "" if r["informative"] else " †"
    text = f"{score} · raw {percent(r['retention'])}% [{percent(r['retention_low'])}, {percent(r['retention_high'])}]"
    if metric != "perplexity":
        text += (f" · above chance {percent(r['chance_corrected'])}% [{percent(r['chance_corrected_low'])}, "
                 f"{percent(r['chance_corrected_high'])}]")
    return text + flag


def retention_display(retention: pd.DataFrame) -> pd.DataFrame:
    """Methods × tasks (``task_key (metric)``), each cell a :func:`retention_cell`, methods in table order."""
    frame = retention.assign(cell=retention.apply(retention_cell, axis=1),
                             column=retention["task_key"] + " (" + retention["metric"] + ")")
    order = list(dict.fromkeys(retention["method"]))
    return frame.pivot(index="method", columns="column", values="cell").loc[order].rename(index=method_label)


def primary_comparison(comparison: pd.DataFrame, primary: str) -> Styler:
    """The ``primary`` AVSS variant against every baseline and task: difference, its paired CI, the bootstrap
    p-value, its Holm adjustment over the whole comparison family and the verdict."""
    table = comparison[comparison["avss"] == primary].set_index(["baseline", "task_key"])
    return table[["difference", "low", "high", "p_value", "p_holm", "verdict"]].style.format(
        {"difference": "{:+.3f}", "low": "{:+.3f}", "high": "{:+.3f}", "p_value": "{:.4f}", "p_holm": "{:.4f}"},
        na_rep="")


def comparison_display(comparison: pd.DataFrame) -> pd.DataFrame:
    """Baseline rows, one column per task: how many AVSS variants are ``better``, ``indistinguishable``, ... ."""
    def cell(g: pd.DataFrame) -> str:
        return ", ".join(f"{v}: {n}" for v, n in g["verdict"].value_counts().items())
    table = comparison.groupby(["baseline", "task_key"]).apply(cell, include_groups=False).unstack("task_key")
    return table.rename(index=method_label)


def stability_display(stability: pd.DataFrame) -> pd.DataFrame:
    """Per ranking: the smallest and mean Spearman ρ and Jaccard overlap between disjoint calibration folds
    (:func:`avss_lib.pruning.stability.stability_summary`), methods by label, rounded to two decimals."""
    if stability.empty:
        return pd.DataFrame(columns=["spearman_min", "spearman_mean", "jaccard_min", "jaccard_mean"])
    return stability_summary(stability).set_index("method").rename(index=method_label).round(2)
