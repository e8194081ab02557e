"""The tables chapter 05 shows, built from its artifacts' frames (formatting only: no number is computed here)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from avss_lib.core.benchmarks import Benchmark
from avss_lib.core.errors import DataError
from avss_lib.core.formatting import interval, layer_list
from avss_lib.core.splits import EVALUATION, SELECTION
from avss_lib.mitigation.arms import ARM_LABELS

METRIC_LABELS = {"accuracy": "accuracy (%)", "hallucination_rate": "hallucination rate (%)", "ece": "ECE (%)"}


def data_summary(train_frame: pd.DataFrame, split: pd.DataFrame, eval_sets: Mapping[str, Benchmark]) -> pd.DataFrame:
    """Per data set: questions on each side of the split, training questions with negatives, held-out examples."""
    rows = []
    for dataset in split["dataset"].unique():
        s = split[split["dataset"] == dataset]
        t = train_frame[train_frame["dataset"] == dataset]
        rows.append({"dataset": dataset, "selection half": int((s["split"] == SELECTION).sum()),
                     "evaluation half": int((s["split"] == EVALUATION).sum()),
                     "train: hallucinated": int(t["hallucinated"].sum()),
                     "train: used (have negatives)": int(t["usable"].sum()),
                     "negatives per question": round(float(t[t["usable"]]["negatives"].map(len).mean()), 2),
                     "held-out evaluated": len(eval_sets[dataset].examples)})
    return pd.DataFrame(rows).set_index("dataset")


def budget_table(arms: pd.DataFrame) -> pd.DataFrame:
    """The ``ARMS`` artifact for reading: one row per run, layers as a list."""
    shown = arms.drop(columns=["model_layers"]).assign(layers=arms["layers"].map(layer_list))
    return shown.astype({"seed": "Int64", "draw": "Int64"}).set_index("run_id")


def runs_table(runs: pd.DataFrame) -> pd.io.formats.style.Styler:
    """The ``RUNS`` artifact for reading: perplexity with its interval and the seconds of every run."""
    shown = runs.drop(columns=["lambda_con"]).assign(layers=runs["layers"].map(layer_list)).set_index("run_id")
    return shown.style.format({"seed": "{:.0f}", "draw": "{:.0f}", "perplexity": "{:.2f}", "perplexity_low": "{:.2f}", "perplexity_high": "{:.2f}",
                               "train_seconds": "{:.0f}", "eval_seconds": "{:.0f}", "best_step": "{:.0f}"},
                              na_rep="—")


def results_table(table: pd.DataFrame, metric: str, runs: pd.DataFrame | None = None) -> pd.DataFrame:
    """Arms × data sets for one metric: ``value [low, high]`` and the relative change from the untouched model.

    With ``runs`` (the ``RUNS`` artifact), a WikiText-2 perplexity column (mean over the arm's runs) is added.
    """
    sub = table[table["metric"] == metric]
    cells: dict[str, dict[str, str]] = {}
    for r in sub.itertuples(index=False):
        text = interval(r.value, r.low, r.high, "{:.1f}")
        if np.isfinite(r.rel_change):
            text += f" ({r.rel_change:+.0f}%)"
        elif r.arm != "base" and np.isfinite(r.diff):
            text += f" ({r.diff:+.1f} pt)"
        cells.setdefault(r.arm, {})[r.dataset] = text
    out = pd.DataFrame.from_dict(cells, orient="index")
    if runs is not None and runs["perplexity"].notna().any():
        ppl = runs.groupby("arm", sort=False)["perplexity"].mean()
        out["WikiText-2 ppl"] = [f"{ppl[a]:.2f}" if a in ppl else "" for a in out.index]
    out.index = [ARM_LABELS.get(a, a) for a in out.index]
    out.index.name = METRIC_LABELS.get(metric, metric)
    return out


def comparison_table(comp: pd.DataFrame) -> pd.DataFrame:
    """The ``COMPARISONS`` artifact as a readable table: the difference with its interval and the outcome."""
    if comp.empty:
        return pd.DataFrame({"comparison": ["no control arm was run"]})
    out = comp.assign(other=comp["other"].map(ARM_LABELS),
                      difference=[interval(r.diff, r.low, r.high, "{:+.1f}") for r in comp.itertuples()],
                      outcome=np.where(comp["beats"], "EAVSS better", np.where(comp["beaten"], "EAVSS worse", "—")))
    return out.pivot_table(index=["dataset", "metric"], columns="other", values=["difference", "outcome"],
                           aggfunc="first")


def per_run_table(run_metrics: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One metric of the ``RUN_METRICS`` artifact as runs × data sets, ``value [low, high]``."""
    sub = run_metrics[run_metrics["metric"] == metric]
    if sub.empty:
        raise DataError(f"no per-run metric {metric!r}: choose one of {sorted(set(run_metrics['metric']))}")
    cells = sub.assign(text=[interval(r.value, r.low, r.high, "{:.1f}") for r in sub.itertuples()])
    out = cells.pivot(index="run_id", columns="dataset", values="text").reindex(list(dict.fromkeys(sub["run_id"])))
    out.index.name = f"{metric} (%)"
    return out
