"""Figures and generated prose of the pruning chapter (claim A1), built from :mod:`avss_lib.pruning.study` tables."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from avss_lib.pruning.study import PRIMARY_METRIC, TASK_FAMILY, method_family

RETENTION_THRESHOLD = 90.0  # claim A1: "keeps over 90% of the original performance"
COMPARISON_RULE = (
    "AVSS beats a baseline on a task *beyond the confidence intervals* when the 95% paired bootstrap interval of "
    "the difference (AVSS minus baseline, on the same examples; log-perplexity for WikiText-2, sign flipped so "
    "that positive means better) lies entirely above 0; it is worse when the interval lies entirely below 0, and "
    "indistinguishable otherwise. For the random baseline the bootstrap also resamples the random seeds, so "
    "the seed-to-seed spread counts as uncertainty."
)


def _label(method: str) -> str:
    return method.replace("avss:", "AVSS ").replace("_", " ")


def _pct(value: float) -> str:
    """A percentage with two significant digits below 10 (0.42%), none above (63%), 'n/a' for NaN."""
    if np.isnan(value):
        return "n/a"
    return f"{value:.2g}" if abs(value) < 10 else f"{value:.0f}"


def _fmt(value: float, metric: str) -> str:
    return f"{value:.2f}" if metric == "perplexity" else f"{value:.3f}"


# ------------------------------------------------------------------------------------ tables for display


def retention_display(retention: pd.DataFrame) -> pd.DataFrame:
    """Methods × tasks, each cell ``score [low, high] · r% [low, high]`` (random: mean ± sd and range over seeds;
    for perplexity the geometric mean and range)."""
    def cell(r: pd.Series) -> str:
        spread = "" if r.metric == "perplexity" else f" ± {_fmt(r.sd, r.metric)} sd"
        score = (f"{_fmt(r.value, r.metric)}{spread} (seeds {_fmt(r['min'], r.metric)}–{_fmt(r['max'], r.metric)})"
                 if r.n_seeds == r.n_seeds else f"{_fmt(r.value, r.metric)} [{_fmt(r.low, r.metric)}, {_fmt(r.high, r.metric)}]")
        if r.method == "unpruned":
            return score
        flag = "" if r.informative else " †"
        return f"{score} · {_pct(r.retention)}% [{_pct(r.retention_low)}, {_pct(r.retention_high)}]{flag}"
    frame = retention.assign(cell=retention.apply(cell, axis=1),
                             column=retention["task_key"] + " (" + retention["metric"] + ")")
    order = list(dict.fromkeys(retention["method"]))
    return frame.pivot(index="method", columns="column", values="cell").loc[order].rename(index=_label)


def comparison_display(comparison: pd.DataFrame) -> pd.DataFrame:
    """AVSS variant × baseline rows, one column per task: verdict counts ``better/indistinguishable/worse``."""
    def cell(g: pd.DataFrame) -> str:
        return ", ".join(f"{v}: {n}" for v, n in g["verdict"].value_counts().items())
    table = comparison.groupby(["baseline", "task_key"]).apply(cell, include_groups=False).unstack("task_key")
    return table.rename(index=_label)


# ------------------------------------------------------------------------------------ figures


def retention_heatmap(retention: pd.DataFrame) -> Figure:
    """% of the unpruned score per method and task (random: mean over seeds); † = uninformative task."""
    table = retention[retention["method"] != "unpruned"].pivot(index="method", columns="task_key", values="retention")
    order = [m for m in dict.fromkeys(retention["method"]) if m != "unpruned"]
    table = table.loc[order]
    informative = retention.drop_duplicates("task_key").set_index("task_key")["informative"]
    fig, ax = plt.subplots(figsize=(1.25 * table.shape[1] + 3, 0.42 * table.shape[0] + 1.8))
    sns.heatmap(table.clip(upper=150), cmap="RdYlGn", vmin=0, vmax=110, center=90, annot=table.round(0),
                fmt=".0f", annot_kws={"fontsize": 7}, cbar_kws={"label": "% of unpruned score (clipped at 150)"}, ax=ax)
    ax.set_yticklabels([_label(m) for m in table.index], rotation=0)
    ax.set_xticklabels([f"{k}{'' if informative.get(k, True) else ' †'}\n({PRIMARY_METRIC.get(k.split('@')[0], '')})"
                        for k in table.columns], rotation=30, ha="right", fontsize=8)
    ax.set_xlabel("task (primary metric; † = unpruned score not above chance, ratio meaningless)")
    ax.set_ylabel("ranking method")
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
            if r["n_seeds"] == r["n_seeds"]:  # random: mean and range over seeds
                ax.errorbar(r["value"], y, xerr=[[r["value"] - r["min"]], [r["max"] - r["value"]]], fmt="s",
                            color="tab:red", ms=4, capsize=2)
            else:
                ax.errorbar(r["value"], y, xerr=[[r["value"] - r["low"]], [r["high"] - r["value"]]],
                            fmt="o", ms=4, capsize=2, color="tab:blue" if method_family(m) == "avss" else "tab:gray")
        ax.axvline(base["value"], color="black", ls="--", lw=1)
        ax.axvspan(base["low"], base["high"], color="black", alpha=0.08)
        metric = base["metric"]
        if metric == "perplexity":
            ax.set_xscale("log")
        ax.set_title(f"{key} ({metric})", fontsize=9)
    for ax in axes[:, 0]:
        ax.set_yticks(range(len(methods)))
        ax.set_yticklabels([_label(m) for m in methods], fontsize=7)
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
            line, = ax.plot(g["fraction_removed"], g["value"], marker="o", ms=3, label=_label(method), **style)
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
        labels = [_label(m) for m in table.index]
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
    ax.set_yticklabels([_label(m) for m in at["method"]], fontsize=7)
    ax.invert_yaxis()
    ax.set_xticks(range(n_layers))
    ax.tick_params(axis="x", labelsize=7)
    ax.set_xlim(-0.6, n_layers - 0.4)
    ax.set_xlabel("decoder layer")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------ prose


def speed_summary(speed: Mapping[str, Any]) -> str:
    """One paragraph on the measured inference speed-up."""
    return (
        f"Removing {speed['n_removed']} of {speed['n_layers']} decoder layers, one forward pass over the same batch "
        f"({speed['batch_shape'][0]} × {speed['batch_shape'][1]} tokens, median of {speed['repeats']} alternating runs, "
        f"{speed['torch_threads']} CPU thread(s)) took {speed['seconds_pruned']:.3f} s instead of "
        f"{speed['seconds_unpruned']:.3f} s: a measured speed-up of ×{speed['measured_speedup']:.2f}, against "
        f"×{speed['theoretical_speedup_layers']:.2f} if time were proportional to the number of decoder layers and "
        f"×{speed['estimated_speedup_params']:.2f} when the LM head, which pruning does not shrink, is counted by its "
        "parameters."
    )


def precision_summary(precision: pd.DataFrame | None, dtype: str) -> str:
    """One paragraph on what evaluating in ``dtype`` instead of float32 changes on the unpruned model."""
    if precision is None or precision.empty:
        return f"All evaluations ran in {dtype}; no reduced-precision check was needed."
    parts = []
    for row in precision.itertuples():
        same = ("" if math.isnan(row.same_per_example)
                else f", the same outcome on {row.same_per_example:.0%} of the {row.n} examples")
        parts.append(f"{row.task_key} {row.metric} {_fmt(row.value, row.metric)} in {dtype} against "
                     f"{_fmt(row.value_float32, row.metric)} in float32 (difference {row.difference:+.4g}{same})")
    return (f"The pruning evaluations ran in {dtype} (the `dtype` parameter, chosen for speed on CPUs with bfloat16 "
            "matrix units). To show what that costs, the unpruned model was also evaluated in float32 on the curve tasks: "
            + "; ".join(parts) + ". Retention compares pruned and unpruned models evaluated in the same dtype.")


def a1_verdict(retention: pd.DataFrame, comparison: pd.DataFrame, *, ratio: float, k: int, n_layers: int,
               primary: str) -> str:
    """The generated verdict on claim A1: retention of every AVSS variant, the primary variant in detail, and
    how AVSS compares with random and last-k under :data:`COMPARISON_RULE`."""
    tasks = list(dict.fromkeys(retention["task_key"]))
    informative = retention.drop_duplicates("task_key").set_index("task_key")["informative"]
    used = [t for t in tasks if informative[t]]
    skipped = [t for t in tasks if not informative[t]]
    avss = retention[retention["method"].str.startswith("avss:")]
    holds = []
    for method, g in avss.groupby("method", sort=False):
        g = g[g["task_key"].isin(used)]
        if len(g) and (g["retention"] >= RETENTION_THRESHOLD).all():
            holds.append(method)
    n_variants = avss["method"].nunique()
    text = [(
        f"**Claim A1 at {ratio:.0%} ({k} of {n_layers} layers removed).** A1 is counted as holding for a ranking when "
        f"the pruned model keeps at least {RETENTION_THRESHOLD:.0f}% of the unpruned score (point estimate) on every "
        f"task whose unpruned score is above chance ({', '.join(used) or 'none'})."
    )]
    if skipped:
        text.append(f"Tasks where the unpruned model is not above chance ({', '.join(skipped)}) are shown but not "
                    "counted: a percentage of a score near zero is meaningless.")
    text.append(f"A1 holds for {len(holds)} of {n_variants} AVSS variants"
                + (f" ({', '.join(_label(h) for h in holds)})." if holds else "."))
    p = retention[retention["method"] == primary].set_index("task_key")
    if not p.empty:
        parts = [f"{t} {_pct(p.loc[t, 'retention'])}% [{_pct(p.loc[t, 'retention_low'])}, "
                 f"{_pct(p.loc[t, 'retention_high'])}]" for t in used if t in p.index]
        if parts:
            text.append(f"For {_label(primary)}, the % of the unpruned score on the counted tasks (paired bootstrap "
                        "95% CI) is: " + "; ".join(parts) + ".")
        worst = p.loc[[t for t in used if t in p.index], "retention"]
        if len(worst):
            text.append(f"Its lowest retention on a counted task is {_pct(worst.min())}% ({worst.idxmin()}, "
                        f"{TASK_FAMILY.get(worst.idxmin().split('@')[0], '')}).")
    base = retention[retention["method"] != "unpruned"]
    best = base[base["task_key"].isin(used)].groupby("method")["retention"].min().sort_values(ascending=False)
    if len(best):
        text.append(f"The ranking with the best worst-case retention is {_label(best.index[0])} "
                    f"({_pct(best.iloc[0])}% on its worst counted task).")
    for baseline in ("random", "last_k"):
        c = comparison[(comparison["baseline"] == baseline) & comparison["task_key"].isin(used)]
        if c.empty:
            continue
        counts = c["verdict"].value_counts()
        n = len(c)
        pc = c[c["avss"] == primary]
        pv = ", ".join(f"{r.task_key}: {r.verdict}" for r in pc.itertuples())
        text.append(
            f"Against {_label(baseline)}, over all AVSS variants × counted tasks ({n} comparisons), AVSS is better "
            f"beyond the CIs in {counts.get('better', 0)}, worse in {counts.get('worse', 0)}, indistinguishable in "
            f"{counts.get('indistinguishable', 0)}" + (f", prunes the same set in {counts.get('same set', 0)}" if counts.get("same set", 0) else "")
            + (f", has too few examples for a verdict in {counts.get('too few examples', 0)}"
               if counts.get("too few examples", 0) else "")
            + (f"; for {_label(primary)}: {pv}." if pv else ".")
        )
    text.append("Rule: " + COMPARISON_RULE)
    rows = a1_verdict_rows(retention, primary, ratio=ratio, k=k, n_layers=n_layers)
    text.append(f"Verdict on A1 for the claims chapter: **{rows[0]['verdict']}** ({rows[0]['ours']}); the rule: "
                f"A1 {A1_RULE}.")
    return " ".join(text)


def agreement_summary(spearman: pd.DataFrame, jaccard: pd.DataFrame, primary: str,
                      others: Sequence[str] = ("last_k", "block_influence", "angular_distance", "delta_ppl")) -> str:
    """Which baseline the primary AVSS ranking agrees with, by Spearman's rho and Jaccard overlap."""
    if primary not in spearman.index:
        return ""
    parts = [f"{_label(o)} ρ = {spearman.loc[primary, o]:.2f}, Jaccard = {jaccard.loc[primary, o]:.2f}"
             for o in others if o in spearman.columns]
    same = [o for o in jaccard.columns if o != primary and jaccard.loc[primary, o] == 1.0]
    text = f"{_label(primary)} against the baselines: " + "; ".join(parts) + "."
    if same:
        text += f" It prunes exactly the same layers as {', '.join(_label(s) for s in same)}."
    return text


def run_summary(plan: pd.DataFrame, sets: Mapping[str, Sequence[int]], set_seconds: Mapping[str, float],
                ranking_seconds: float, evaluation_seconds: float, specs: Sequence[Any],
                benchmarks: Mapping[str, Any], mismatches: Sequence[str]) -> str:
    """What was evaluated: rankings, unique pruned sets, task sizes and settings, and the time each step took."""
    n_rows = len(plan)
    shared = plan.groupby("set_id")["method"].apply(list)
    shared = shared[shared.map(len) > 1]
    ratios = ", ".join(f"{r:.3g}" for r in sorted(plan["ratio"].unique()))
    text = [(f"{plan['method'].nunique()} rankings × {plan['ratio'].nunique()} ratios ({ratios}) give {n_rows} pruned "
             f"sets, of which {len(sets) - 1} are distinct and were evaluated (plus the unpruned model).")]
    if len(shared):
        text.append("Identical sets, evaluated once: " + "; ".join(
            f"{', '.join(_label(m) for m in dict.fromkeys(ms))} at ratio "
            f"{plan.loc[plan['set_id'] == sid, 'ratio'].iloc[0]:.3g}" for sid, ms in shared.items()) + ".")
    parts = []
    for s in specs:
        bench = benchmarks[s.key][1]
        if s.name == "wikitext2":
            parts.append(f"wikitext2 {bench.provenance.get('split')} (first ≈{s.n or 'all'} tokens, window "
                         f"{s.options.get('max_length', 1024)}, stride {s.options.get('stride', 'max_length/2')})")
        else:
            extra = ""
            if s.name == "sciq":
                extra = ", open-book (support in the prompt)" if s.options.get("with_support", True) else \
                    ", closed-book (no support paragraph)"
            if s.name == "wikiqa":
                extra = f", {s.options.get('scoring', 'pmi')} scoring"
            parts.append(f"{s.name} {bench.provenance.get('split')} n={len(bench)}{extra}")
    text.append("Tasks of the retention table: " + "; ".join(parts) + ".")
    text.append(f"Rankings took {ranking_seconds:.0f} s (the ΔPPL oracle dominates) and the evaluations "
                f"{evaluation_seconds:.0f} s (median {np.median(list(set_seconds.values())):.0f} s per set).")
    if mismatches:
        text.append(f"The AVSS sets of variants {', '.join(mismatches)} differ from notebook 02's fixed-fraction "
                    "selections (notebook 02 ran with another ratio or rounding).")
    return " ".join(text)


A1_PAPER = "> 90% of the original performance kept after removing the lowest-AVSS ~25% of layers"
A1_RULE = ("holds when the paired-bootstrap 95% CI of the % retained lies at or above 90% on every counted task "
           "(unpruned score above chance); does not hold when it lies below 90% on at least one counted task; "
           "inconclusive otherwise or when no task can be counted")


def a1_verdict_rows(retention: pd.DataFrame, primary: str, *, ratio: float, k: int, n_layers: int) -> list[dict[str, Any]]:
    """Rows for :func:`avss_lib.book.claims.write_verdicts`: claim A1 for the ``primary`` AVSS variant and for the AVSS
    variant with the best worst-case retention, under :data:`A1_RULE`."""
    counted = retention[retention["informative"] & (retention["method"] != "unpruned")]
    avss = counted[counted["method"].str.startswith("avss:")]
    rows = []
    if avss.empty:
        return [{"claim": "A1", "paper": A1_PAPER, "ours": "no task above chance", "verdict": "inconclusive",
                 "detail": f"No task's unpruned score was above chance, so no retention could be counted. Rule: {A1_RULE}."}]
    worst = avss.groupby("method")["retention"].min()
    best = str(worst.idxmax())
    for label, method in (("authors' AVSS" if primary == "avss:authors_code" else _label(primary), primary),
                          (f"best AVSS variant ({_label(best)})", best)):
        if method not in set(avss["method"]) or (rows and method == primary):
            continue
        g = avss[avss["method"] == method].set_index("task_key")
        if (g["retention_low"] >= RETENTION_THRESHOLD).all():
            verdict = "holds"
        elif (g["retention_high"] < RETENTION_THRESHOLD).any():
            verdict = "does not hold"
        else:
            verdict = "inconclusive"
        t = g["retention"].idxmin()
        ours = (f"{label}: {_pct(g.loc[t, 'retention'])}% [{_pct(g.loc[t, 'retention_low'])}, "
                f"{_pct(g.loc[t, 'retention_high'])}] retained on {t} (worst of {len(g)} counted task(s))")
        tasks = "; ".join(f"{key} {_pct(r.retention)}% [{_pct(r.retention_low)}, {_pct(r.retention_high)}]"
                          for key, r in g.iterrows())
        rows.append({"claim": "A1", "paper": A1_PAPER, "ours": ours, "verdict": verdict,
                     "detail": f"{k} of {n_layers} layers removed (ratio {ratio:g}); % of the unpruned score per "
                               f"counted task: {tasks}. Rule: {A1_RULE}."})
    return rows
