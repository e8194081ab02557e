"""The performance appendix's figures: overhead of the statistics pass, memory against tokens, pruning speed-up."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from avss_lib.performance.memory import measured
from avss_lib.performance.prose import count


def overhead_figure(result: Mapping[str, Any]) -> Figure:
    """Bar chart of the plain forward and the statistics pass (best run; dots: every run) with the target line."""
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    labels = ["plain forward", "statistics pass"]
    best = [result["plain_forward_s"], result["stats_pass_s"]]
    ax.bar(labels, best, color=["tab:grey", "tab:blue"], width=0.55, label="best run")
    for x, runs in enumerate((result["plain_forward_runs_s"], result["stats_pass_runs_s"])):
        ax.scatter(np.full(len(runs), x), runs, color="black", s=12, zorder=3, label="each run" if x == 0 else None)
    ax.axhline(result["plain_forward_s"] * result["target"], color="red", ls="--", lw=1.2,
               label=f"target: {result['target']:.2f}× plain forward")
    ax.set_ylabel("seconds")
    top = max(max(result["plain_forward_runs_s"]), max(result["stats_pass_runs_s"]), best[0] * result["target"])
    ax.set_ylim(0, top * 1.4)
    ax.set_title(f"{result['tokens']:,} tokens in {count(result['n_batches'], 'batch', 'batches')}", fontsize=10)
    ax.legend(fontsize=8, loc="upper center", ncol=3)
    fig.tight_layout()
    return fig


def memory_figure(memory: pd.DataFrame) -> Figure:
    """Peak RSS (left) and pass time (right) against calibration tokens, streaming and naive collection."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    styles = {"streaming": ("tab:blue", "o", "streaming statistics (this library)"),
              "naive": ("tab:red", "s", "naive: output_hidden_states kept")}
    for collector, (color, marker, label) in styles.items():
        d = measured(memory, collector)
        if d.empty:
            continue
        axes[0].plot(d["tokens"], d["peak_rss_mib"], marker=marker, color=color, label=label)
        axes[1].plot(d["tokens"], d["seconds"], marker=marker, color=color, label=label)
    s = measured(memory, "streaming")
    if not s.empty:
        axes[0].plot(s["tokens"], s["rss_before_pass_mib"], ls=":", color="grey",
                     label="RSS before the pass (after a warm-up batch)")
    axes[0].set_ylabel("peak RSS during the pass (MiB)")
    axes[1].set_ylabel("seconds of the pass")
    for ax in axes:
        ax.set_xlabel("calibration tokens (non-padding)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def speedup_figure(speed: pd.DataFrame) -> Figure:
    """Measured speed-up against the fraction of layers removed, with the theoretical curve and the estimate."""
    fig, ax = plt.subplots(figsize=(5.8, 3.8))
    grid = np.linspace(0, max(0.6, float(speed["removed_fraction"].max()) + 0.05), 100)
    ax.plot(grid, 1 / (1 - grid), color="grey", ls="--", label="theoretical 1/(1 − k/n) (decoder layers)")
    ax.plot(speed["removed_fraction"], speed["estimated_speedup_params"], color="tab:orange", marker="^",
            label="estimate counting the LM head")
    ax.plot(speed["removed_fraction"], speed["measured_speedup"], color="tab:blue", marker="o",
            label="measured (best run)")
    ax.axhline(1.0, color="black", lw=0.6)
    ax.set_xlabel("fraction of decoder layers removed (k/n)")
    ax.set_ylabel("speed-up of one forward pass (×)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
