"""The chapter's figures: HSAV / HSS / EAVSS per layer, EAVSS beside the probes, and the rank stability.

Each takes the tables of :mod:`avss_lib.hallucination.analysis` (the ``EAVSS_SCORES`` long table, or the
per-data-set analyses) and returns a matplotlib :class:`~matplotlib.figure.Figure`.
"""

from __future__ import annotations

from collections.abc import Mapping

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from avss_lib.hallucination.analysis import DatasetAnalysis

METRICS = ("hsav", "hss", "eavss")


def eavss_heatmap(scores: pd.DataFrame) -> Figure:
    """HSAV, HSS and EAVSS (signed) per layer (columns) and data set (rows), one diverging panel each."""
    datasets = list(dict.fromkeys(scores["dataset"]))
    fig, axes = plt.subplots(3, 1, figsize=(min(16, 0.4 * scores["layer"].nunique() + 3), 1.2 + 3 * (0.35 * len(datasets) + 0.8)),
                             sharex=True)
    for ax, metric in zip(axes, METRICS):
        table = scores.pivot(index="dataset", columns="layer", values=metric).loc[datasets]
        bound = float(np.nanmax(np.abs(table.to_numpy()))) if np.isfinite(table.to_numpy()).any() else 1.0
        sns.heatmap(table, cmap="RdBu_r", center=0, vmin=-bound or -1, vmax=bound or 1, ax=ax,
                    cbar_kws={"label": f"{metric.upper()} (log-ratio H/C)"})
        ax.set_title(metric.upper())
        ax.set_ylabel("")
        ax.set_xlabel("layer" if metric == "eavss" else "")
    fig.tight_layout()
    return fig


def probe_vs_eavss(scores: pd.DataFrame, alpha: float = 0.05) -> Figure:
    """Per data set: |EAVSS| per layer (bars, left axis) beside the linear-probe AUROC (line, right axis).

    Stars mark the layers whose score beats the permutation null family-wise (``p_value_max < alpha``).
    """
    datasets = list(dict.fromkeys(scores["dataset"]))
    fig, axes = plt.subplots(len(datasets), 1, figsize=(9, 2.3 * len(datasets)), squeeze=False, sharex=True)
    for ax, name in zip(axes[:, 0], datasets):
        d = scores[scores["dataset"] == name].sort_values("layer")
        ax.bar(d["layer"], d["score"], color="tab:blue", alpha=0.7, label="|EAVSS|")
        if "p_value_max" in d and d["p_value_max"].notna().any():
            sig = d[d["p_value_max"] < alpha]
            ax.scatter(sig["layer"], sig["score"], marker="*", color="black", zorder=3,
                       label=f"beats null (p_max < {alpha:g})")
        ax.set_ylabel("|EAVSS|")
        ax.set_title(name, fontsize=10)
        twin = ax.twinx()
        if d["probe_auroc"].notna().any():
            twin.plot(d["layer"], d["probe_auroc"], color="tab:red", marker="o", ms=3, label="probe AUROC")
            twin.axhline(0.5, color="tab:red", lw=0.8, ls=":")
            twin.set_ylim(0.3, 1.0)
        else:
            twin.text(0.5, 0.5, "too few examples for probes", transform=ax.transAxes, ha="center", color="tab:red")
        twin.set_ylabel("probe AUROC", color="tab:red")
        handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
        labels = ax.get_legend_handles_labels()[1] + twin.get_legend_handles_labels()[1]
        ax.legend(handles, labels, fontsize=7, loc="upper left")
    axes[-1, 0].set_xlabel("layer")
    fig.tight_layout()
    return fig


def stability_figure(analyses: Mapping[str, DatasetAnalysis]) -> Figure:
    """Split-half and seed-subsample Spearman rho per usable data set (strip plot, dashed line at 0)."""
    rows = []
    for name, a in analyses.items():
        if a.split_half is not None:
            rows += [{"dataset": name, "kind": "disjoint halves", "rho": r} for r in a.split_half["rho"]]
        if a.seed_rho is not None:
            rows += [{"dataset": name, "kind": "seed subsamples", "rho": r} for r in a.seed_rho["rho"]]
    fig, ax = plt.subplots(figsize=(8, 3.2))
    if rows:
        sns.stripplot(pd.DataFrame(rows), x="dataset", y="rho", hue="kind", dodge=True, ax=ax, size=4)
    else:
        ax.text(0.5, 0.5, "no usable data set", transform=ax.transAxes, ha="center")
    ax.axhline(0, color="grey", lw=0.8, ls="--")
    ax.set_ylim(-1.05, 1.05)
    ax.set_ylabel("Spearman ρ of EAVSS scores")
    fig.tight_layout()
    return fig
