"""Claim E1 end to end: EAVSS per data set, its validation (null, stability, probes), figures and verdict.

Everything here combines the tested pieces of :mod:`avss_lib.hallucination.eavss` (HSAV / HSS / EAVSS from
per-example sufficient statistics, permutation null, split halves, pooling) and :mod:`avss_lib.hallucination.probes`
for one activation site; the notebook only calls these functions.

**Seed stability.** The model answers each question once; a "seed" draws a label-stratified subsample
(``fraction`` of the examples, default 70%) with that seed and recomputes EAVSS on it. Spearman's
:math:`\\rho` between the scores of every pair of seeds measures how much the ranking depends on which
questions were asked. Seed subsamples overlap, so this :math:`\\rho` is optimistic; the split-half
:math:`\\rho` (:func:`avss_lib.hallucination.eavss.split_half_stability`) uses disjoint halves and is the stricter
test.

**Verdict on E1** (:func:`e1_verdict`). For each usable data set (both classes at least ``min_class``),
EAVSS *locates* hallucination-prone layers when all three hold:

1. *signal* — some layer's EAVSS score beats the label-permutation null family-wise within the site
   (max-statistic p-value < ``alpha``);
2. *stability* — the median split-half Spearman :math:`\\rho` is at least ``min_rho``;
3. *validity* — the EAVSS score agrees with the per-layer probe AUROC: Spearman :math:`\\rho` over layers at
   least ``min_probe_rho``.

E1 is *supported* when a majority of usable data sets pass all three, *partly supported* when at least one
data set passes the signal test but fewer than a majority pass all three, and *not supported* otherwise.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from scipy.stats import spearmanr
from sklearn.model_selection import StratifiedShuffleSplit

from avss_lib.core.errors import ConfigError, DataError
from avss_lib.hallucination.eavss import (
    EavssConfig,
    SmallClassWarning,
    check_class_sizes,
    eavss_table,
    permutation_eavss,
    pool_rankings,
    rank_stability,
    split_half_stability,
    top_k_layers,
)
from avss_lib.hallucination.probes import probe_auroc

METRICS = ("hsav", "hss", "eavss")


@dataclass
class DatasetAnalysis:
    """E1 analysis of one data set at one site (fields are None where the class sizes do not allow them)."""

    dataset: str
    n_hallucinated: int
    n_correct: int
    usable: bool
    message: str
    scores: pd.DataFrame  # index layer: hsav, hss, eavss, score, rank
    top_k: list[int]
    p_value: pd.Series | None = None
    p_value_max: pd.Series | None = None
    split_half: pd.DataFrame | None = None
    seed_rho: pd.DataFrame | None = None
    probes: pd.DataFrame | None = None


def site_rows(example_stats: pd.DataFrame, site: str) -> pd.DataFrame:
    """The per-example rows of one site (raises when the site was not collected)."""
    rows = example_stats[example_stats["site"] == site]
    if rows.empty:
        raise ConfigError(f"site {site!r} was not collected: collect it or choose one of "
                          f"{sorted(example_stats['site'].unique())}")
    return rows


def _stratified_subset(labels: pd.Series, fraction: float, seed: int) -> pd.Index:
    split = StratifiedShuffleSplit(n_splits=1, train_size=fraction, random_state=seed)
    keep, _ = next(split.split(np.zeros(len(labels)), labels.to_numpy()))
    return labels.index[np.sort(keep)]


def seed_stability(example_stats: pd.DataFrame, labels: pd.Series, config: EavssConfig, seeds: Sequence[int],
                   fraction: float = 0.7) -> pd.DataFrame:
    """Spearman's rho between EAVSS scores of label-stratified subsamples drawn with each pair of ``seeds``.

    ``example_stats`` must hold one site. Returns one row per seed pair: ``seed_a``, ``seed_b``, ``rho``.
    """
    if len(set(seeds)) < 2:
        raise ConfigError(f"seeds={list(seeds)}: give at least two distinct seeds (the study uses >= 3)")
    if not 0 < fraction < 1:
        raise ConfigError(f"fraction={fraction} must be strictly between 0 and 1")
    scores = {}
    for seed in seeds:
        ids = _stratified_subset(labels, fraction, seed)
        sub = example_stats[example_stats["example_id"].isin(ids)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SmallClassWarning)
            result = eavss_table(sub, labels.loc[ids], replace(config, min_class=2))
        scores[seed] = result.table["score"].droplevel("site")
    return pd.DataFrame([{"seed_a": a, "seed_b": b, "rho": rank_stability(scores[a], scores[b])}
                         for a, b in itertools.combinations(list(dict.fromkeys(seeds)), 2)])


def analyse_dataset(dataset: str, example_stats: pd.DataFrame, labels: pd.Series, site: str, k: int, *,
                    config: EavssConfig = EavssConfig(), features: Mapping[int, np.ndarray] | None = None,
                    feature_ids: Sequence[str] | None = None, seeds: Sequence[int] = (0, 1, 2),
                    seed_fraction: float = 0.7, n_perm: int = 1000, n_splits: int = 20, probe_folds: int = 5,
                    seed: int = 0) -> DatasetAnalysis:
    """EAVSS scores, top-k layers, and -- when both classes reach ``config.min_class`` -- permutation null,
    split-half and seed stability, and per-layer probe AUROC (on ``features`` rows ``feature_ids``)."""
    rows = site_rows(example_stats, site)
    labels = labels.loc[pd.unique(rows["example_id"])]
    sizes = check_class_sizes(labels, config.min_class)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SmallClassWarning)  # the class-size message is reported in the table instead
        result = eavss_table(rows, labels, config)
    scores = result.table.droplevel("site")
    analysis = DatasetAnalysis(dataset, sizes.n_hallucinated, sizes.n_correct, sizes.ok, sizes.message, scores,
                               top_k_layers(scores["score"], k) if scores["score"].notna().all() else [])
    if not sizes.ok:
        return analysis
    perm = permutation_eavss(rows, labels, config, n_perm=n_perm, seed=seed)
    analysis.p_value = perm.p_value.droplevel("site")
    analysis.p_value_max = perm.p_value_max.droplevel("site")
    analysis.split_half = split_half_stability(rows, labels, config, n_splits=n_splits, seed=seed)
    analysis.seed_rho = seed_stability(rows, labels, config, seeds, seed_fraction)
    if features is not None and min(sizes.n_hallucinated, sizes.n_correct) >= probe_folds:
        if feature_ids is None:
            raise ConfigError("feature_ids must give the example id of each feature row")
        y = labels.reindex(list(feature_ids))
        if y.isna().any():
            raise DataError(f"{dataset}: feature rows lack labels: collect features for labelled examples only")
        analysis.probes = probe_auroc(features, y.to_numpy(dtype=bool), n_splits=probe_folds, seed=seed,
                                      min_class=config.min_class)
    return analysis


def score_table(analyses: Mapping[str, DatasetAnalysis]) -> pd.DataFrame:
    """Long table: dataset, layer, hsav, hss, eavss, score, rank, p_value, p_value_max, probe_auroc."""
    parts = []
    for name, a in analyses.items():
        part = a.scores.reset_index().assign(dataset=name)
        part["p_value"] = part["layer"].map(a.p_value) if a.p_value is not None else np.nan
        part["p_value_max"] = part["layer"].map(a.p_value_max) if a.p_value_max is not None else np.nan
        part["probe_auroc"] = part["layer"].map(a.probes["auroc_mean"]) if a.probes is not None else np.nan
        parts.append(part)
    columns = ["dataset", "layer", "hsav", "hss", "eavss", "score", "rank", "p_value", "p_value_max", "probe_auroc"]
    return pd.concat(parts, ignore_index=True)[columns]


def pooled_top_k(analyses: Mapping[str, DatasetAnalysis], k: int) -> tuple[list[int], pd.DataFrame, list[str]]:
    """Top-k layers by mean rank over the usable data sets; returns (layers, pooled ranks, excluded)."""
    excluded = [name for name, a in analyses.items() if not a.usable]
    included = [name for name in analyses if name not in excluded]
    if not included:
        return [], pd.DataFrame(), excluded
    pooled = pool_rankings({name: a.scores["score"] for name, a in analyses.items()}, excluded)
    return top_k_layers(-pooled["mean_rank"], k), pooled, excluded


def lowest_avss_layers(selections: pd.DataFrame, variant: str, rule: str = "fixed_fraction") -> list[int]:
    """The layers notebook 02 prunes under ``variant`` and ``rule`` (its ``selections.csv``)."""
    row = selections[(selections["variant"] == variant) & (selections["rule"] == rule)]
    if len(row) != 1:
        raise ConfigError(f"selections have no single row for variant={variant!r}, rule={rule!r}: choose from "
                          f"{sorted(set(selections['variant']))} and {sorted(set(selections['rule']))}")
    value = row["layers"].iloc[0]
    if isinstance(value, str):
        return [int(v) for v in value.split()]
    return [] if pd.isna(value) else [int(value)]


def jaccard(a: Sequence[int], b: Sequence[int]) -> float:
    """|A ∩ B| / |A ∪ B| (0 for two empty sets)."""
    union = set(a) | set(b)
    return len(set(a) & set(b)) / len(union) if union else 0.0


def summary_table(analyses: Mapping[str, DatasetAnalysis], alpha: float = 0.05) -> pd.DataFrame:
    """One row per data set: class sizes, top-k, null, stability and probe agreement (see :func:`e1_verdict`)."""
    rows = []
    for name, a in analyses.items():
        row = {"dataset": name, "n_hallucinated": a.n_hallucinated, "n_correct": a.n_correct, "usable": a.usable,
               "top_k": ", ".join(map(str, a.top_k)) or "—", "max_abs_eavss": float(a.scores["score"].max())}
        if a.usable:
            assert a.p_value_max is not None and a.split_half is not None and a.seed_rho is not None
            row.update(min_p_max=float(a.p_value_max.min()), n_layers_p_max_below_alpha=int((a.p_value_max < alpha).sum()),
                       split_half_rho_median=float(a.split_half["rho"].median()),
                       seed_rho_mean=float(a.seed_rho["rho"].mean()))
            if a.probes is not None:
                auroc = a.probes["auroc_mean"]
                row.update(probe_best_layer=int(auroc.idxmax()), probe_best_auroc=float(auroc.max()),
                           probe_eavss_rho=float(spearmanr(a.scores["score"].loc[auroc.index], auroc).statistic),
                           probe_auroc_top_k=float(auroc.loc[a.top_k].mean()),
                           probe_auroc_rest=float(auroc.drop(a.top_k).mean()))
        rows.append(row)
    return pd.DataFrame(rows).set_index("dataset")


def e1_checks(summary: pd.DataFrame, *, alpha: float = 0.05, min_rho: float = 0.5,
              min_probe_rho: float = 0.3) -> tuple[str, pd.DataFrame]:
    """The verdict (``supported``, ``partly supported``, ``not supported`` or ``not testable``) and the
    per-data-set checks (``signal``, ``stable``, ``valid``, ``all``) of the usable data sets."""
    usable = summary[summary["usable"]]
    if usable.empty:
        return "not testable", pd.DataFrame(columns=["signal", "stable", "valid", "all"])
    checks = pd.DataFrame({
        "signal": usable["min_p_max"] < alpha,
        "stable": usable["split_half_rho_median"] >= min_rho,
        "valid": usable.get("probe_eavss_rho", pd.Series(np.nan, index=usable.index)).fillna(-np.inf) >= min_probe_rho,
    })
    checks["all"] = checks.all(axis=1)
    n_all, n_signal, n = int(checks["all"].sum()), int(checks["signal"].sum()), len(checks)
    verdict = "supported" if n_all > n / 2 else "partly supported" if n_signal >= 1 else "not supported"
    return verdict, checks


#: How the E1 verdict maps onto the claims chapter's vocabulary (avss_lib.book.claims.VERDICTS).
CLAIM_VERDICT = {"supported": "holds", "partly supported": "inconclusive", "not supported": "does not hold",
                 "not testable": "inconclusive"}


def e1_claim_row(summary: pd.DataFrame, *, alpha: float = 0.05, min_rho: float = 0.5, min_probe_rho: float = 0.3,
                 site: str = "", position: str = "") -> dict[str, str]:
    """One row for ``avss_lib.book.claims.write_verdicts``: claim E1, our numbers and the mapped verdict."""
    verdict, checks = e1_checks(summary, alpha=alpha, min_rho=min_rho, min_probe_rho=min_probe_rho)
    usable = summary[summary["usable"]]
    if usable.empty:
        ours = "no data set with both classes large enough"
    else:
        parts = []
        for name, row in usable.iterrows():
            probe = row.get("probe_eavss_rho", np.nan)
            parts.append(f"{name}: min p_max {row['min_p_max']:.3f}, split-half ρ {row['split_half_rho_median']:+.2f}, "
                         f"probe ρ {probe:+.2f}")
        ours = f"{int(checks['all'].sum())}/{len(checks)} data sets pass all tests ({'; '.join(parts)})"
    return {"claim": "E1", "paper": "qualitative (no per-layer numbers published)", "ours": ours,
            "verdict": CLAIM_VERDICT[verdict],
            "detail": (f"EAVSS at {site or 'the chosen site'} ({position or 'answer'} tokens) is {verdict}: a data set "
                       f"passes when some layer beats the label-permutation null family-wise (p < {alpha}), the "
                       f"median split-half Spearman ρ ≥ {min_rho}, and Spearman ρ between |EAVSS| and per-layer "
                       f"probe AUROC ≥ {min_probe_rho}; E1 holds when a majority of usable data sets pass.")}


def e1_verdict(summary: pd.DataFrame, *, alpha: float = 0.05, min_rho: float = 0.5, min_probe_rho: float = 0.3,
               pooled: Sequence[int] = (), lowest_avss: Sequence[int] = (), site: str = "") -> str:
    """Markdown verdict on claim E1 from :func:`summary_table` (criteria in the module docstring)."""
    usable = summary[summary["usable"]]
    excluded = list(summary.index[~summary["usable"]])
    lines = []
    if excluded:
        lines.append(f"**Excluded** (a class below the minimum size): {', '.join(excluded)}.")
    verdict, checks = e1_checks(summary, alpha=alpha, min_rho=min_rho, min_probe_rho=min_probe_rho)
    if usable.empty:
        lines.append("**Verdict on E1: not testable on this run** — no data set has enough hallucinated and correct "
                     "answers in both classes.")
        return "\n\n".join(lines)
    for name, row in usable.iterrows():
        c = checks.loc[name]
        probe = (f"probe-vs-EAVSS Spearman ρ = {row['probe_eavss_rho']:+.3f} (best probe layer {int(row['probe_best_layer'])}, "
                 f"AUROC {row['probe_best_auroc']:.2f})" if "probe_eavss_rho" in row and pd.notna(row.get("probe_eavss_rho"))
                 else "no probe")
        lines.append(
            f"- **{name}** ({int(row['n_hallucinated'])} hallucinated / {int(row['n_correct'])} correct): "
            f"smallest family-wise p = {row['min_p_max']:.3f} ({'beats' if c['signal'] else 'does not beat'} the null at "
            f"α = {alpha}); split-half ρ median {row['split_half_rho_median']:+.3f} "
            f"({'stable' if c['stable'] else 'unstable'}, threshold {min_rho}); seed-subsample ρ mean "
            f"{row['seed_rho_mean']:+.2f}; {probe} ({'agrees' if c['valid'] else 'does not agree'}, threshold "
            f"{min_probe_rho}). Top layers: {row['top_k']}.")
    n_all, n_signal, n = int(checks["all"].sum()), int(checks["signal"].sum()), len(checks)
    where = f" at the {site} site" if site else ""
    lines.insert(0 if not excluded else 1,
                 f"**Verdict on E1{where}: {verdict}.** EAVSS passes all three tests (signal beyond the permutation "
                 f"null, split-half stability, agreement with linear probes) on {n_all} of {n} usable data set(s); "
                 f"{n_signal} of {n} show a layer whose EAVSS beats the null.")
    if pooled:
        overlap = sorted(set(pooled) & set(lowest_avss))
        lines.append(f"Pooled top layers: {', '.join(map(str, pooled))}"
                     + (f"; overlap with the lowest-AVSS (pruned) layers: {', '.join(map(str, overlap)) or 'none'} "
                        f"(Jaccard {jaccard(pooled, lowest_avss):.2f})." if lowest_avss else "."))
    return "\n\n".join(lines)


# ------------------------------------------------------------------------------------------- figures


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


def probe_vs_eavss(scores: pd.DataFrame) -> Figure:
    """Per data set: |EAVSS| per layer (bars, left axis) beside the linear-probe AUROC (line, right axis)."""
    datasets = list(dict.fromkeys(scores["dataset"]))
    fig, axes = plt.subplots(len(datasets), 1, figsize=(9, 2.3 * len(datasets)), squeeze=False, sharex=True)
    for ax, name in zip(axes[:, 0], datasets):
        d = scores[scores["dataset"] == name].sort_values("layer")
        ax.bar(d["layer"], d["score"], color="tab:blue", alpha=0.7, label="|EAVSS|")
        if "p_value_max" in d and d["p_value_max"].notna().any():
            sig = d[d["p_value_max"] < 0.05]
            ax.scatter(sig["layer"], sig["score"], marker="*", color="black", zorder=3, label="beats null (p_max < 0.05)")
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


# ----------------------------------------------------------------------------------------------- prose


def answers_text(summary: pd.DataFrame, label_convention: str, n_requested: int | None, min_class: int) -> str:
    """Markdown: accuracy per data set under the default convention, and a warning for every flagged one."""
    default = summary[summary["convention"].isin([label_convention, "choice"])]
    parts = []
    for row in default.itertuples():
        parts.append(f"{row.dataset} {100 * row.accuracy:.1f}% [{100 * row.ci_low:.1f}, {100 * row.ci_high:.1f}] "
                     f"({row.n_hallucinated} of {row.n} answers hallucinated)")
    lines = [f"Accuracy under the default label convention (`{label_convention}` for generative tasks, the chosen "
             f"option for multiple-choice ones), with bootstrap 95% CIs: " + "; ".join(parts) + "."]
    empty = default[default.get("n_empty_answers", pd.Series(0, index=default.index)) > 0]
    if len(empty):
        lines.append("Empty answers (the first generated token was a stop string such as a newline, so the harness's "
                     "answer is empty; counted as wrong, and with no answer token to measure): "
                     + ", ".join(f"{r.dataset} {r.n_empty_answers} of {r.n}" for r in empty.itertuples()) + ".")
    short = default[default["n"] < (n_requested or 0)]
    if len(short):
        lines.append("Fewer questions than requested (" + str(n_requested) + ") exist for: "
                     + ", ".join(f"{r.dataset} ({r.n} answerable questions)" for r in short.itertuples()) + ".")
    for row in default[~default["usable"]].itertuples():
        lines.append(f"> **Warning — {row.dataset} is excluded from pooled rankings:** {row.n_hallucinated} hallucinated "
                     f"vs {row.n_correct} correct answers, below the minimum of {min_class} per class. Its EAVSS "
                     "(if shown) is not tested against the null, for stability or against probes.")
    return "\n\n".join(lines)


def definitions_text(config: EavssConfig, site: str, position: str) -> str:
    """Markdown: the operational definitions this run uses, with its parameters filled in."""
    where = ("the tokens of the model's own answer (generated text, or the chosen option), fed back after the "
             "prompt" if position == "answer" else "the last token of the prompt, where the model starts to answer")
    return (f"Activations are read at the **{site}** site over {where}. For each layer, $V$ is `{config.variance}` "
            f"and $S$ is `{config.sparsity}`, computed separately on hallucinated ($H$) and correct ($C$) answers; "
            f"$\\mathrm{{HSAV}} = \\log(V_H / V_C)$, $\\mathrm{{HSS}} = \\log((S_H + \\delta)/(S_C + \\delta))$ with "
            f"$\\delta = {config.delta:g}$, and $\\mathrm{{EAVSS}} = \\mathrm{{HSAV}} - \\mathrm{{HSS}}$ "
            f"(contrast `{config.contrast}`, combination `{config.combine}`), the log-ratio of the layer's AVSS on "
            f"$H$ to its AVSS on $C$. Layers are ranked by `{config.rank_by}` EAVSS (rank 1 = most "
            f"hallucination-prone). A data set enters pooled rankings only with at least {config.min_class} "
            "answers in each class.")
