"""Figures of the book: labelled seaborn/matplotlib plots built from the artifact tables."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from avss_lib.core.activation_stats import abs_column, rel_column

SITE_LABELS = {"block_output": "block output", "mlp_activation": "MLP activation", "attn_output": "attention output"}


def per_layer_statistics(stats: pd.DataFrame, abs_eps: float = 1e-5, rel_tau: float = 0.01) -> Figure:
    """Variance (element and pooled) and sparsity (absolute and relative) per layer, one column per site."""
    sites = [s for s in SITE_LABELS if s in set(stats["site"])]
    fig, axes = plt.subplots(2, len(sites), figsize=(4.2 * len(sites), 6.5), squeeze=False, sharex=True)
    for j, site in enumerate(sites):
        d = stats[stats["site"] == site].sort_values("layer")
        ax = axes[0, j]
        ax.plot(d["layer"], d["elem_var"], marker="o", ms=3, label="element variance")
        ax.plot(d["layer"], d["pooled_var_padded"], marker="s", ms=3, label="pooled variance (authors)")
        ax.set_yscale("log")
        ax.set_title(SITE_LABELS[site])
        ax.set_ylabel("variance (log scale)")
        ax = axes[1, j]
        for column, label in ((abs_column(abs_eps), f"|a| < {abs_eps:g}"), (rel_column(rel_tau), f"|a| < {rel_tau:g}·std")):
            values = d[column].to_numpy(dtype=float)
            ax.plot(d["layer"], np.where(values > 0, values, np.nan), marker="o", ms=3, label=label)
            zero = d["layer"][values == 0]
            ax.scatter(zero, np.full(len(zero), ax.get_ylim()[0] if len(values[values > 0]) else 1e-9),
                       marker="x", color="red", zorder=3, label=f"{label}: exactly 0" if len(zero) else None)
        ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.set_ylabel("sparsity (fraction, log scale)")
    axes[0, 0].legend(fontsize=8)
    axes[1, 0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def avss_per_layer(scores: pd.DataFrame) -> Figure:
    """AVSS per layer (log scale) for every variant; infinite scores are marked at the top of each panel."""
    variants = list(dict.fromkeys(scores["variant"]))
    cols = min(4, len(variants))
    rows = int(np.ceil(len(variants) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.9 * rows), squeeze=False, sharex=True)
    for ax, name in zip(axes.flat, variants):
        d = scores[scores["variant"] == name].sort_values("layer")
        finite = d[np.isfinite(d["avss"])]
        ax.bar(finite["layer"], finite["avss"], color="tab:blue")
        ax.set_yscale("log")
        inf_layers = d.loc[~np.isfinite(d["avss"]), "layer"]
        for layer in inf_layers:
            ax.axvline(layer, color="red", lw=1.5, ls="--")
        ax.set_title(f"{name}" + (f" ({len(inf_layers)} × ∞)" if len(inf_layers) else ""), fontsize=9)
        ax.set_xlabel("layer")
        ax.set_ylabel("AVSS (log scale)")
    for ax in list(axes.flat)[len(variants):]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig


def rank_heatmap(scores: pd.DataFrame) -> Figure:
    """Heatmap of each variant's pruning rank per layer (1 = least important, pruned first)."""
    table = scores.pivot(index="variant", columns="layer", values="rank").loc[list(dict.fromkeys(scores["variant"]))]
    fig, ax = plt.subplots(figsize=(min(16, 0.42 * table.shape[1] + 3), 0.45 * table.shape[0] + 1.6))
    sns.heatmap(table, cmap="viridis_r", annot=table.shape[1] <= 32, fmt="d", annot_kws={"fontsize": 6},
                cbar_kws={"label": "pruning rank (1 = pruned first)"}, ax=ax)
    ax.set_xlabel("layer")
    ax.set_ylabel("AVSS variant")
    fig.tight_layout()
    return fig


def block_output_table(stats: pd.DataFrame) -> pd.DataFrame:
    """The block-output rows of the statistics (the site the authors hooked), one per layer."""
    columns = ["layer", "n_tokens", "pooled_var_padded", "pooled_var_masked", "elem_var", "mean_abs"] + [
        c for c in stats.columns if c.startswith("sparsity_")] + ["cos_mean", "cos_last"]
    return stats[stats["site"] == "block_output"][columns].set_index("layer")
