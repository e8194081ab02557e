"""The figures of chapter 05: scores per arm with intervals, reliability diagrams, and training curves."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from avss_lib.core.metrics import N_BINS, reliability_bins
from avss_lib.mitigation.arms import ARM_LABELS, ARMS
from avss_lib.mitigation.tables import METRIC_LABELS


def scores_figure(table: pd.DataFrame, metrics: Sequence[str] = ("accuracy", "ece")) -> Figure:
    """Each metric per dataset and arm with its 95% interval (one panel per metric)."""
    datasets = list(table["dataset"].unique())
    arms = [a for a in ARMS if a in set(table["arm"])]
    fig, axes = plt.subplots(1, len(metrics), figsize=(6.5 * len(metrics), 4), squeeze=False)
    width = 0.8 / len(arms)
    for ax, metric in zip(axes[0], metrics):
        for j, arm in enumerate(arms):
            sub = table[(table["arm"] == arm) & (table["metric"] == metric)].set_index("dataset").reindex(datasets)
            x = np.arange(len(datasets)) + (j - (len(arms) - 1) / 2) * width
            # bounds drawn as given: a percentile interval (ECE's above all) need not contain the estimate
            (line,) = ax.plot(x, sub["value"], "o", ms=4, label=ARM_LABELS.get(arm, arm))
            ax.vlines(x, sub["low"], sub["high"], color=line.get_color(), lw=1)
        ax.set_xticks(np.arange(len(datasets)), datasets, rotation=20)
        ax.set_ylabel(METRIC_LABELS.get(metric, metric))
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def reliability_figure(per_example: pd.DataFrame, arms: Sequence[str] = ("base", "eavss"),
                       n_bins: int = N_BINS) -> Figure:
    """Reliability diagrams per dataset: accuracy vs mean confidence per bin, before (base) and after (arms)."""
    datasets = list(per_example["dataset"].unique())
    fig, axes = plt.subplots(1, len(datasets), figsize=(3.2 * len(datasets), 3.4), squeeze=False, sharey=True)
    for ax, dataset in zip(axes[0], datasets):
        ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--")
        for arm in arms:
            sub = per_example[(per_example["arm"] == arm) & (per_example["dataset"] == dataset)]
            if sub.empty:
                continue
            bins = reliability_bins(sub["confidence"], sub["correct"], n_bins=n_bins)
            bins = bins[bins["count"] > 0]
            (line,) = ax.plot(bins["confidence"], bins["accuracy"], marker="o", ms=3, lw=1,
                              label=ARM_LABELS.get(arm, arm))
            ax.scatter(bins["confidence"], bins["accuracy"], s=8 + 60 * bins["count"] / bins["count"].max(),
                       color=line.get_color(), alpha=0.3)
        ax.set_title(dataset)
        ax.set_xlim(0, 1)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("mean confidence in bin")
    axes[0, 0].set_ylabel("accuracy in bin")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def training_curves(logs: pd.DataFrame, window: int = 5) -> Figure:
    """Contrastive and LM loss per step for every trained run (rolling mean over ``window`` steps)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), squeeze=False)
    colours = {arm: plt.get_cmap("tab10")(i) for i, arm in enumerate(ARMS)}
    for ax, column, title in zip(axes[0], ("loss_con", "loss_lm"), ("contrastive term", "LM term")):
        seen = set()
        for run_id, g in logs.groupby("run_id", sort=False):
            arm = g["arm"].iloc[0]
            y = g[column].astype(float).rolling(window, min_periods=1).mean()
            if y.notna().any():
                ax.plot(g["step"], y, color=colours.get(arm), lw=1, alpha=0.8,
                        label=None if arm in seen else ARM_LABELS.get(arm, arm))
                seen.add(arm)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (rolling mean)")
        ax.grid(alpha=0.3)
        if seen:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
