"""Tables, figures and the generated verdict on claim E2 from notebook 05's per-example results.

**Arm-level numbers.** An arm with several runs (seeds, random-layer draws) is scored by the mean of its runs'
metric on the same held-out examples; its 95% interval resamples the examples (all runs together), so it
shows example-sampling uncertainty, not seed variance (the per-run table shows the spread across runs).

**The rule behind the verdict.** For each dataset and each of accuracy and ECE, the difference
``EAVSS − other`` is computed on the same held-out examples with a paired bootstrap
(:func:`avss_lib.mitigation.study.paired_difference`). EAVSS *beats* the other arm when the whole interval lies on
its side of zero (accuracy higher, ECE lower) and the difference is at least ``min_effect`` percentage points
(0.5 by default), and *is beaten* in the mirror case. The interval
level is Bonferroni-corrected for the ``m`` (dataset, metric) pairs tested: ``1 − 0.05 / m``. Claim E2's
layer specificity is then

- **supported** when EAVSS beats *both* the random-layer and the LM-only arm on at least one (dataset, metric)
  pair and is beaten by neither anywhere;
- **contradicted** when it is beaten by one of them somewhere and beats both nowhere;
- **mixed** when both happen;
- **not resolved** otherwise (no difference beyond the intervals).
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from avss_lib.core.errors import DataError
from avss_lib.core.metrics import bootstrap_statistic_ci, reliability_bins
from avss_lib.mitigation.study import ARMS, arm_matrices, arm_metric, paired_difference

ARM_LABELS = {"base": "untouched", "eavss": "top-k EAVSS", "random": "k random", "lowest_avss": "k lowest AVSS",
              "all": "all layers", "lm_only": "LM term only (EAVSS layers)"}
METRIC_LABELS = {"accuracy": "accuracy (%)", "hallucination_rate": "hallucination rate (%)", "ece": "ECE (%)"}
LOWER_IS_BETTER = {"accuracy": False, "hallucination_rate": True, "ece": True}
PAPER_ACC_GAIN, PAPER_ECE_DROP = 12.0, 34.0  # the paper's "up to" numbers, in %


def _arms_present(per_example: pd.DataFrame) -> list[str]:
    present = set(per_example["arm"])
    return [a for a in ARMS if a in present]


def arm_table(per_example: pd.DataFrame, metrics: Sequence[str] = ("accuracy", "hallucination_rate", "ece"), *,
              seed: int = 0, n_resamples: int = 1000) -> pd.DataFrame:
    """Per arm, dataset and metric: value (mean over the arm's runs) with a 95% CI, and the change from ``base``.

    ``rel_change`` is ``(value − base) / base`` in %; ``diff_low``/``diff_high`` bound ``value − base`` by a
    paired bootstrap (NaN for the base arm or when there is no base arm).
    """
    rows = []
    has_base = "base" in set(per_example["arm"])
    for dataset in per_example["dataset"].unique():
        ids = sorted(per_example[per_example["dataset"] == dataset]["id"].unique())
        for arm in _arms_present(per_example):
            correct, conf = arm_matrices(per_example, arm, dataset, ids)
            n_runs = correct.shape[1]
            for metric in metrics:
                value, low, high = bootstrap_statistic_ci(
                    [np.arange(len(ids), dtype=float)],
                    lambda idx, c=correct, f=conf, m=metric: arm_metric(c[idx.astype(int)], f[idx.astype(int)], m),
                    n_resamples=n_resamples, seed=seed)
                row = {"arm": arm, "dataset": dataset, "metric": metric, "value": value, "low": low, "high": high,
                       "n": len(ids), "n_runs": n_runs, "diff": np.nan, "diff_low": np.nan, "diff_high": np.nan,
                       "rel_change": np.nan}
                if has_base and arm != "base":
                    d, dl, dh = paired_difference(per_example, arm, "base", dataset, metric, n_resamples=n_resamples,
                                                  seed=seed)
                    base = value - d
                    row.update(diff=d, diff_low=dl, diff_high=dh, rel_change=100 * d / base if base else np.nan)
                rows.append(row)
    return pd.DataFrame(rows)


def results_table(table: pd.DataFrame, metric: str, perplexity: pd.DataFrame | None = None) -> pd.DataFrame:
    """Arms × datasets for one metric: ``value [low, high]`` and the relative change from the untouched model.

    With ``perplexity`` (notebook 05's runs table), a WikiText-2 column (mean over the arm's runs) is added.
    """
    sub = table[table["metric"] == metric]
    cells: dict[str, dict[str, str]] = {}
    for r in sub.itertuples(index=False):
        text = f"{r.value:.1f} [{r.low:.1f}, {r.high:.1f}]"
        if np.isfinite(r.rel_change):
            text += f" ({r.rel_change:+.0f}%)"
        elif r.arm != "base" and np.isfinite(r.diff):
            text += f" ({r.diff:+.1f} pt)"
        cells.setdefault(r.arm, {})[r.dataset] = text
    out = pd.DataFrame.from_dict(cells, orient="index")
    if perplexity is not None and perplexity["perplexity"].notna().any():
        ppl = perplexity.groupby("arm", sort=False)["perplexity"].mean()
        out["WikiText-2 ppl"] = [f"{ppl[a]:.2f}" if a in ppl else "" for a in out.index]
    out.index = [ARM_LABELS.get(a, a) for a in out.index]
    out.index.name = METRIC_LABELS.get(metric, metric)
    return out


def comparisons(per_example: pd.DataFrame, *, target: str = "eavss", against: Sequence[str] = ("random", "lm_only"),
                metrics: Sequence[str] = ("accuracy", "ece"), family_alpha: float = 0.05, min_effect: float = 0.5,
                n_resamples: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Paired differences ``target − other`` per dataset and metric at the Bonferroni-corrected level.

    ``beats`` / ``beaten``: the interval excludes 0 on that side *and* the difference is at least ``min_effect``
    percentage points (so float-level differences between near-identical runs are not called effects).
    """
    present = set(per_example["arm"])
    if target not in present:
        raise DataError(f"no results for arm {target!r}: the verdict needs it in arms")
    others = [a for a in against if a in present]
    datasets = list(per_example["dataset"].unique())
    m = len(datasets) * len(metrics)
    level = 1 - family_alpha / m
    rows = []
    for dataset in datasets:
        for metric in metrics:
            for other in others:
                d, low, high = paired_difference(per_example, target, other, dataset, metric, confidence_level=level,
                                                 n_resamples=n_resamples, seed=seed)
                sign = -1 if LOWER_IS_BETTER[metric] else 1
                lo, hi = sorted((sign * low, sign * high))
                big = abs(d) >= min_effect
                rows.append({"dataset": dataset, "metric": metric, "other": other, "diff": d, "low": low,
                             "high": high, "level": level, "min_effect": min_effect, "beats": bool(lo > 0 and big),
                             "beaten": bool(hi < 0 and big)})
    return pd.DataFrame(rows)


def e2_outcome(comp: pd.DataFrame, against: Sequence[str] = ("random", "lm_only")
               ) -> tuple[str, list[tuple[str, str]], pd.DataFrame]:
    """(verdict, the (dataset, metric) pairs EAVSS wins against every arm, the comparisons it loses) by the rule."""
    if comp.empty:
        return "not resolved", [], comp
    pairs = comp.groupby(["dataset", "metric"])
    wins = [k for k, g in pairs if g["beats"].all() and set(g["other"]) >= set(against)]
    losses = comp[comp["beaten"]]
    if wins and losses.empty:
        verdict = "supported"
    elif len(losses) and not wins:
        verdict = "contradicted"
    elif wins:
        verdict = "mixed"
    else:
        verdict = "not resolved"
    return verdict, wins, losses


#: How the verdict of :func:`e2_outcome` maps onto the claims chapter's vocabulary.
CLAIM_VERDICT = {"supported": "holds", "contradicted": "does not hold", "mixed": "inconclusive",
                 "not resolved": "inconclusive"}


def verdict_rows(comp: pd.DataFrame, table: pd.DataFrame, *, target: str = "eavss",
                 against: Sequence[str] = ("random", "lm_only")) -> list[dict[str, str]]:
    """The E2 row of the claims chapter (:func:`avss_lib.book.claims.write_verdicts`), from the same numbers."""
    verdict, wins, losses = e2_outcome(comp, against)
    sub = table[(table["arm"] == target) & table["metric"].isin(["accuracy", "ece"])].dropna(subset=["rel_change"])
    ours = []
    for metric, best in (("accuracy", "idxmax"), ("ece", "idxmin")):
        m = sub[sub["metric"] == metric]
        if not m.empty:
            r = m.loc[getattr(m["rel_change"], best)()]
            ours.append(f"{'accuracy' if metric == 'accuracy' else 'ECE'} {r['rel_change']:+.1f}% on {r['dataset']} "
                        f"({r['diff']:+.1f} pt, 95% CI [{r['diff_low']:+.1f}, {r['diff_high']:+.1f}])")
    ours.append(f"vs random layers and LM-only: better on {len(wins)} (data set, metric) pair(s), worse on "
                f"{len(losses)} comparison(s)")
    detail = (f"{e2_verdict(comp, table, target=target, against=against)}" if not comp.empty else
              "No comparison arm was run.")
    return [{"claim": "E2", "paper": f"up to +{PAPER_ACC_GAIN:.0f}% performance, up to −{PAPER_ECE_DROP:.0f}% ECE",
             "ours": "; ".join(ours), "verdict": CLAIM_VERDICT[verdict], "detail": detail.replace("**", "")}]


def e2_verdict(comp: pd.DataFrame, table: pd.DataFrame, *, target: str = "eavss",
               against: Sequence[str] = ("random", "lm_only")) -> str:
    """Markdown: the verdict on claim E2 by the rule in the module docstring, and the paper's magnitudes."""
    if comp.empty:
        return "No comparison arm was run, so no verdict on claim E2 is possible: add `random` and `lm_only` to arms."
    level = comp["level"].iloc[0]
    verdict, wins, losses = e2_outcome(comp, against)
    missing = [a for a in against if a not in set(comp["other"])]
    text = [
        (f"**Verdict on E2's layer specificity: {verdict}.** Rule: on each dataset and metric (accuracy, ECE), the "
        f"top-k EAVSS arm is compared with the {' and the '.join(ARM_LABELS[a] for a in against if a not in missing)} "
        f"arm(s) by a paired bootstrap of the difference on the same held-out examples, at the "
        f"Bonferroni-corrected level {100 * level:.2f}% ({comp.groupby(['dataset', 'metric']).ngroups} pairs); an arm "
        f"beats another when the interval excludes zero on its side and the difference is at least "
        f"{comp['min_effect'].iloc[0]:g} percentage points. E2 is supported if EAVSS beats all of them on at least "
        "one pair and is beaten nowhere; contradicted if it is beaten somewhere and beats them nowhere; mixed if both; "
        "not resolved otherwise."),
    ]
    if missing:
        text.append(f"Arm(s) {', '.join(missing)} were not run, so the verdict cannot be 'supported' in full.")
    text.append(f"EAVSS beats every comparison arm on {len(wins)} pair(s)"
                + (f" ({'; '.join(f'{d} {m}' for d, m in wins)})" if wins else "")
                + f" and is beaten on {len(losses)} comparison(s)"
                + (f" ({'; '.join(f'{r.dataset} {r.metric} vs {ARM_LABELS[r.other]}' for r in losses.itertuples())})"
                   if len(losses) else "") + ".")
    text.append(claim_magnitudes(table, target))
    acc = table[table["metric"] == "accuracy"]
    never = [d for d, g in acc.groupby("dataset", sort=False) if (g["value"] == 0).all()]
    if never:
        text.append(f"On {', '.join(never)} no arm answers any held-out question correctly, so ECE there equals the "
                    "mean confidence: a lower ECE only means less confident wrong answers, not fewer hallucinations.")
    return " ".join(text)


def claim_magnitudes(table: pd.DataFrame, target: str = "eavss") -> str:
    """Markdown sentence: the largest relative accuracy gain and ECE drop of ``target`` vs the untouched model."""
    sub = table[table["arm"] == target]
    acc = sub[sub["metric"] == "accuracy"].dropna(subset=["rel_change"])
    ece = sub[sub["metric"] == "ece"].dropna(subset=["rel_change"])
    if acc.empty or ece.empty:
        return "The untouched model was not evaluated, so the relative changes the paper reports cannot be compared."
    a, e = acc.loc[acc["rel_change"].idxmax()], ece.loc[ece["rel_change"].idxmin()]

    def beyond(row: pd.Series) -> str:
        excludes_zero = row["diff_low"] > 0 or row["diff_high"] < 0
        return "beyond" if excludes_zero and abs(row["diff"]) >= 0.05 else "within"  # 0.05: below print precision

    return (f"Against the untouched model, the largest relative accuracy change of the EAVSS arm is "
            f"{a['rel_change']:+.1f}% on {a['dataset']} ({a['diff']:+.1f} points, {beyond(a)} the 95% paired "
            f"interval [{a['diff_low']:+.1f}, {a['diff_high']:+.1f}]; paper: up to +{PAPER_ACC_GAIN:.0f}%), and "
            f"the largest relative ECE change is {e['rel_change']:+.1f}% on {e['dataset']} ({e['diff']:+.1f} "
            f"points, {beyond(e)} [{e['diff_low']:+.1f}, {e['diff_high']:+.1f}]; paper: up to "
            f"−{PAPER_ECE_DROP:.0f}%). A maximum over datasets favours large changes; read it with the intervals.")


def comparison_table(comp: pd.DataFrame) -> pd.DataFrame:
    """The paired differences as a readable table."""
    out = comp.assign(other=comp["other"].map(ARM_LABELS),
                      difference=[f"{r.diff:+.1f} [{r.low:+.1f}, {r.high:+.1f}]" for r in comp.itertuples()],
                      outcome=np.where(comp["beats"], "EAVSS better", np.where(comp["beaten"], "EAVSS worse", "—")))
    return out.pivot_table(index=["dataset", "metric"], columns="other", values=["difference", "outcome"],
                           aggfunc="first")


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
            ax.errorbar(x, sub["value"], yerr=[sub["value"] - sub["low"], sub["high"] - sub["value"]], fmt="o",
                        ms=4, capsize=2, label=ARM_LABELS.get(arm, arm))
        ax.set_xticks(np.arange(len(datasets)), datasets, rotation=20)
        ax.set_ylabel(METRIC_LABELS.get(metric, metric))
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def reliability_figure(per_example: pd.DataFrame, arms: Sequence[str] = ("base", "eavss"), n_bins: int = 15) -> Figure:
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


def data_summary(train_frame: pd.DataFrame, split: pd.DataFrame, eval_sets: dict) -> pd.DataFrame:
    """Per dataset: questions on each side of the split, training questions with negatives, held-out examples."""
    rows = []
    for dataset in split["dataset"].unique():
        s = split[split["dataset"] == dataset]
        t = train_frame[train_frame["dataset"] == dataset]
        rows.append({"dataset": dataset, "train side": int((s["split"] == "train").sum()),
                     "eval side": int((s["split"] == "eval").sum()),
                     "train: hallucinated": int(t["hallucinated"].sum()), "train: used (have negatives)":
                     int(t["usable"].sum()), "negatives per question": round(float(t[t["usable"]]["negatives"].map(len).mean()), 2),
                     "held-out evaluated": len(eval_sets[dataset].examples)})
    return pd.DataFrame(rows).set_index("dataset")


def data_summary_text(summary: pd.DataFrame, n_examples: int, seed: int) -> str:
    """Markdown: what the training set is made of (generated from the numbers)."""
    used = ", ".join(f"{d}: {int(n)}" for d, n in summary["train: used (have negatives)"].items())
    return (f"The split (seed {seed}) assigns whole duplicate-question groups to one side, so no held-out question "
            f"is trained on. Training uses {n_examples} questions with at least one negative ({used}); "
            f"evaluation uses {int(summary['held-out evaluated'].sum())} held-out examples in all.")


def budget_text(runs: pd.DataFrame) -> str:
    """Markdown: trainable parameters per arm (the budget the arms share or do not)."""
    trained = runs[runs["trainable_params"] > 0]
    per_arm = trained.groupby("arm", sort=False)["trainable_params"].agg(["min", "max"])
    parts = [f"{ARM_LABELS.get(a, a)}: {int(r['min']):,}" + (f"–{int(r['max']):,}" if r["max"] != r["min"] else "")
             for a, r in per_arm.iterrows()]
    return ("Every trained arm uses the same steps, learning rate, batch size and examples. Trainable parameters: "
            + "; ".join(parts) + ". Arms training k layers match exactly when all decoder layers have the same size; "
            "the all-layers arm trains more parameters by construction.")


def per_run_table(run_metrics: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One metric of :func:`avss_lib.mitigation.study.summarise_runs` as runs × datasets, ``value [low, high]``."""
    sub = run_metrics[run_metrics["metric"] == metric]
    if sub.empty:
        raise DataError(f"no per-run metric {metric!r}: choose one of {sorted(set(run_metrics['metric']))}")
    cells = sub.assign(text=[f"{r.value:.1f} [{r.low:.1f}, {r.high:.1f}]" for r in sub.itertuples()])
    out = cells.pivot(index="run_id", columns="dataset", values="text").reindex(list(dict.fromkeys(sub["run_id"])))
    out.index.name = f"{metric} (%)"
    return out
