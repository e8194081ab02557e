"""Figures of the pruning chapter (claim A1), drawn from the tables of
:class:`avss_lib.pruning.stage.PruningResult`."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from avss_lib.pruning.plan import method_family, method_label
from avss_lib.pruning.tasks import PRIMARY_METRIC, task_name


def retention_heatmap(retention: pd.DataFrame) -> Figure:
    """% of the unpruned score per method and task (random: mean over seeds), as the paper reads it (left) and
    above chance (right; perplexity: the perplexity ratio in both); † = uninformative task."""
    order = [m for m in dict.fromkeys(retention["method"]) if m != "unpruned"]
    informative = retention.drop_duplicates("task_key").set_index("task_key")["informative"]
    pruned = retention[retention["method"] != "unpruned"]
    n_tasks = pruned["task_key"].nunique()
    fig, axes = plt.subplots(1, 2, figsize=(2 * (1.1 * n_tasks + 2), 0.42 * len(order) + 2), sharey=True)
    for ax, column, title in zip(axes, ("retention", "chance_corrected"),
                                 ("raw % of unpruned score (the paper's reading)", "% of unpruned score above chance")):
        table = pruned.pivot(index="method", columns="task_key", values=column).loc[order]
        sns.heatmap(table.clip(lower=-50, upper=150), cmap="RdYlGn", vmin=0, vmax=110, center=90,
                    annot=table.round(0), fmt=".0f", annot_kws={"fontsize": 7}, ax=ax,
                    cbar_kws={"label": "% (colours clipped to [-50, 150])"})
        ax.set_title(title, fontsize=9)
        ax.set_yticklabels([method_label(m) for m in table.index], rotation=0)
        ax.set_xticklabels([f"{k}{'' if informative.get(k, True) else ' †'}\n({PRIMARY_METRIC.get(task_name(k), '')})"
                            for k in table.columns], rotation=30, ha="right", fontsize=8)
        ax.set_xlabel("task (primary metric; † = unpruned score not above chance)")
        ax.set_ylabel("ranking method" if ax is axes[0] else "")
    fig.tight_layout()
    return fig


def score_forest(retention: pd.DataFrame) -> Figure:
    """Absolute score with 95% CI per method, one panel per task; dashed = unpruned; random (red): mean and the
    range over its seeds."""
    keys = list(dict.fromkeys(retention["task_key"]))
    cols = min(4, len(keys))
    rows = int(np.ceil(len(keys) / cols))
    methods = [m for m in dict.fromkeys(retention["method"]) if m != "unpruned"]
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 0.28 * len(methods) * rows + 1.6 * rows),
                             squeeze=False, sharey=True)
    for ax, key in zip(axes.flat, keys):
        d = retention[retention["task_key"] == key].set_index("method")
        base = d.loc["unpruned"]
        for y, m in enumerate(methods):
            if m not in d.index:
                continue
            r = d.loc[m]
            # the interval as drawn from its bounds (a percentile interval need not contain the estimate)
            if r["n_seeds"] == r["n_seeds"]:  # random: mean and range over seeds
                ax.hlines(y, r["min"], r["max"], color="tab:red", lw=1)
                ax.plot(r["value"], y, "s", color="tab:red", ms=4)
            else:
                colour = "tab:blue" if method_family(m) == "avss" else "tab:gray"
                ax.hlines(y, r["low"], r["high"], color=colour, lw=1)
                ax.plot(r["value"], y, "o", color=colour, ms=4)
        ax.axvline(base["value"], color="black", ls="--", lw=1)
        ax.axvspan(base["low"], base["high"], color="black", alpha=0.08)
        metric = base["metric"]
        if metric == "perplexity":
            ax.set_xscale("log")
        ax.set_title(f"{key} ({metric})", fontsize=9)
    for ax in axes[:, 0]:
        ax.set_yticks(range(len(methods)))
        ax.set_yticklabels([method_label(m) for m in methods], fontsize=7)
        ax.invert_yaxis()
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig


def performance_curves(curve: pd.DataFrame) -> Figure:
    """Primary metric against the fraction of layers removed, one panel per task (random: mean and range band)."""
    keys = list(dict.fromkeys(curve["task_key"]))
    fig, axes = plt.subplots(1, len(keys), figsize=(4.6 * len(keys), 3.6), squeeze=False)
    palette = [c for i, c in enumerate(plt.get_cmap("tab10").colors) if i != 3]  # red is kept for random
    colors = {m: palette[i % len(palette)] for i, m in enumerate(m for m in dict.fromkeys(curve["method"]) if m != "random")}
    for ax, key in zip(axes[0], keys):
        d = curve[curve["task_key"] == key]
        for method, g in d.groupby("method", sort=False):
            g = g.sort_values("fraction_removed")
            style = {"color": "tab:red", "ls": "--"} if method == "random" else {"color": colors[method]}
            line, = ax.plot(g["fraction_removed"], g["value"], marker="o", ms=3, label=method_label(method), **style)
            if method == "random":
                ax.fill_between(g["fraction_removed"], g["min"].fillna(g["value"]), g["max"].fillna(g["value"]),
                                color="tab:red", alpha=0.15)
            elif g["low"].notna().any():
                ax.fill_between(g["fraction_removed"], g["low"], g["high"], color=line.get_color(), alpha=0.1)
        metric = d["metric"].iloc[0]
        if metric == "perplexity":
            ax.set_yscale("log")
        ax.set_xlabel("fraction of decoder layers removed")
        ax.set_ylabel(metric + (" (log scale, lower is better)" if metric == "perplexity" else ""))
        ax.set_title(key, fontsize=10)
    axes[0, -1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def agreement_heatmaps(spearman: pd.DataFrame, jaccard: pd.DataFrame) -> Figure:
    """Spearman's rho between the rankings (left) and Jaccard overlap of the pruned sets (right)."""
    size = 0.42 * len(spearman) + 2.5
    fig, axes = plt.subplots(1, 2, figsize=(2 * size + 1, size))
    for ax, table, title, vmin in ((axes[0], spearman, "Spearman ρ of the layer scores", -1),
                                   (axes[1], jaccard, "Jaccard overlap of the pruned sets", 0)):
        sns.heatmap(table, cmap="coolwarm" if vmin < 0 else "viridis", vmin=vmin, vmax=1, annot=True, fmt=".2f",
                    annot_kws={"fontsize": 6}, square=True, ax=ax, cbar_kws={"shrink": 0.7})
        labels = [method_label(m) for m in table.index]
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
        ax.set_yticklabels(labels, rotation=0, fontsize=7)
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def pruned_layers_map(plan: pd.DataFrame, ratio: float, n_layers: int) -> Figure:
    """Which layers each method removes at ``ratio`` (filled = removed; hatched = chosen among infinite ties)."""
    at = plan[np.isclose(plan["ratio"], ratio)]
    fig, ax = plt.subplots(figsize=(0.3 * n_layers + 3, 0.32 * len(at) + 1.2))
    for y, row in enumerate(at.itertuples()):
        ax.scatter(row.layers, [y] * len(row.layers), marker="s", s=60,
                   color="tab:blue" if row.family == "avss" else "tab:red" if row.family == "random" else "tab:gray",
                   hatch="///" if row.arbitrary else None, edgecolor="black", linewidth=0.3)
    ax.set_yticks(range(len(at)))
    ax.set_yticklabels([method_label(m) for m in at["method"]], fontsize=7)
    ax.invert_yaxis()
    ax.set_xticks(range(n_layers))
    ax.tick_params(axis="x", labelsize=7)
    ax.set_xlim(-0.6, n_layers - 0.4)
    ax.set_xlabel("decoder layer")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig
