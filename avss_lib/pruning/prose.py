"""The data-dependent phrases of the pruning chapter: lists of tasks and layer sets, and the clauses that apply.

The chapter's sentences live in its notebook's markdown; each function here returns one phrase (or sentence)
whose structure depends on the results, glued in with ``{glue:md}`` (:meth:`avss_lib.pruning.stage.PruningResult.glue`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from avss_lib.core.benchmarks import Benchmark
from avss_lib.core.formatting import percent
from avss_lib.core.verdicts import Verdict
from avss_lib.pruning.display import score_text
from avss_lib.pruning.plan import method_label
from avss_lib.pruning.tasks import TASK_FAMILY, TaskSpec, task_name
from avss_lib.pruning.verdict import RETENTION_THRESHOLD

NO_TASK = "n/a (no task is counted)"


def word_list(items: Sequence[str], empty: str = "none") -> str:
    """``["a", "b"]`` -> ``"a, b"``; no item -> ``empty``."""
    return ", ".join(items) if items else empty


def counted_tasks(retention: pd.DataFrame) -> list[str]:
    """Task keys whose unpruned score is above chance (the retention table's ``informative``), in table order."""
    flags = retention.drop_duplicates("task_key").set_index("task_key")["informative"]
    return [t for t in flags.index if flags[t]]


def skipped_tasks_sentence(retention: pd.DataFrame) -> str:
    """Which tasks are shown but not counted, or that every task is counted."""
    skipped = [t for t in dict.fromkeys(retention["task_key"]) if t not in counted_tasks(retention)]
    if not skipped:
        return "Every task's unpruned score is above chance, so every task is counted."
    return (f"Tasks where the unpruned model is not above chance ({', '.join(skipped)}) are shown but not counted: "
            "a percentage of a score near zero is meaningless.")


def holding_variants(retention: pd.DataFrame, column: str = "retention") -> list[str]:
    """AVSS variants whose point-estimate ``column`` (``retention`` or ``chance_corrected``) is at least the
    threshold on every counted task (and that have a counted task)."""
    used = counted_tasks(retention)
    avss = retention[retention["method"].str.startswith("avss:") & retention["task_key"].isin(used)]
    return [m for m, g in avss.groupby("method", sort=False) if (g[column] >= RETENTION_THRESHOLD).all()]


def retention_list(retention: pd.DataFrame, method: str, column: str = "retention") -> str:
    """``method``'s ``column`` with its CI on each counted task: ``"sciq 44% [36, 52]; ..."``."""
    used = counted_tasks(retention)
    rows = retention[(retention["method"] == method) & retention["task_key"].isin(used)]
    return "; ".join(f"{r['task_key']} {percent(r[column])}% [{percent(r[column + '_low'])}, "
                     f"{percent(r[column + '_high'])}]" for _, r in rows.iterrows()) or NO_TASK


def worst_task(retention: pd.DataFrame, method: str, column: str = "retention") -> str:
    """``method``'s lowest ``column`` on a counted task, with the task and its family: ``"44% (sciq, ...)"``."""
    rows = retention[(retention["method"] == method) & retention["task_key"].isin(counted_tasks(retention))]
    if rows.empty:
        return NO_TASK
    worst = rows.loc[rows[column].idxmin()]
    return f"{percent(worst[column])}% ({worst['task_key']}, {TASK_FAMILY.get(task_name(worst['task_key']), '')})"


def best_worst_case(retention: pd.DataFrame, column: str = "retention") -> str:
    """The ranking (random seeds pooled) with the best worst-case ``column`` over the counted tasks, and that %
    (exploratory: chosen on the same examples it is reported on)."""
    rows = retention[(retention["method"] != "unpruned") & retention["task_key"].isin(counted_tasks(retention))]
    if rows.empty:
        return NO_TASK
    best = rows.groupby("method")[column].min().sort_values(ascending=False)
    return f"{method_label(best.index[0])} ({percent(best.iloc[0])}% on its worst counted task)"


def family_sentence(comparison: pd.DataFrame, alpha: float) -> str:
    """The size of the comparison family, how many of its comparisons are significant after Holm's adjustment,
    and how many would be without it."""
    tested = comparison.dropna(subset=["p_value"])
    if tested.empty:
        return "No comparison has enough paired examples for a test."
    return (f"The comparison family has {len(tested)} tests (every AVSS variant × baseline × task with enough "
            f"examples and different layers); {int((tested['p_holm'] < alpha).sum())} are significant at a "
            f"family-wise error rate of {alpha:.0%} after Holm's adjustment, against "
            f"{int((tested['p_value'] < alpha).sum())} unadjusted.")


def exploratory_sentence(verdicts: Sequence[Verdict]) -> str:
    """The exploratory verdicts, each with its outcome and summary (or that there are none)."""
    rest = [v for v in verdicts if v.analysis == "exploratory"]
    if not rest:
        return "There is no exploratory verdict."
    return "Exploratory, not the claim's verdict: " + "; ".join(f"{v.summary} — {v.outcome}" for v in rest) + "."


def comparison_sentence(comparison: pd.DataFrame, retention: pd.DataFrame, baseline: str, primary: str) -> str:
    """How the AVSS variants fare against ``baseline`` on the counted tasks: the verdict counts, and the
    ``primary`` variant's verdict per task."""
    c = comparison[(comparison["baseline"] == baseline) & comparison["task_key"].isin(counted_tasks(retention))]
    if c.empty:
        return f"There is no counted task on which to compare AVSS with {method_label(baseline)}."
    counts = c["verdict"].value_counts()
    text = (f"Against {method_label(baseline)}, over all AVSS variants × counted tasks ({len(c)} comparisons), AVSS "
            f"is better (Holm-adjusted) in {counts.get('better', 0)}, worse in {counts.get('worse', 0)}, "
            f"indistinguishable in {counts.get('indistinguishable', 0)}")
    if counts.get("same set", 0):
        text += f", prunes the same set in {counts['same set']}"
    if counts.get("too few examples", 0):
        text += f", has too few examples for a verdict in {counts['too few examples']}"
    own = c[c["avss"] == primary]
    if not own.empty:
        text += f"; for {method_label(primary)}: " + ", ".join(f"{r.task_key}: {r.verdict}" for r in own.itertuples())
    return text + "."


def agreement_sentence(spearman: pd.DataFrame, jaccard: pd.DataFrame, primary: str,
                       others: Sequence[str] = ("last_k", "block_influence", "angular_distance", "delta_ppl")) -> str:
    """Spearman's rho and Jaccard overlap of the ``primary`` AVSS ranking with each baseline, and which baselines
    prune exactly its layers."""
    if primary not in spearman.index:
        return f"{method_label(primary)} is not among the compared rankings."
    parts = [f"{method_label(o)} ρ = {spearman.loc[primary, o]:.2f}, Jaccard = {jaccard.loc[primary, o]:.2f}"
             for o in others if o in spearman.columns]
    text = f"{method_label(primary)} against the baselines: " + "; ".join(parts) + "."
    same = [o for o in jaccard.columns if o != primary and jaccard.loc[primary, o] == 1.0]
    if same:
        text += f" It prunes exactly the same layers as {', '.join(method_label(s) for s in same)}."
    return text


def shared_sets_sentence(plan: pd.DataFrame) -> str:
    """Which rankings chose identical layer sets (each evaluated once), or that none did."""
    shared = plan.groupby("set_id", sort=False)["method"].apply(list)
    shared = shared[shared.map(len) > 1]
    if shared.empty:
        return "No two rankings chose the same layers at the same ratio."
    return "Identical sets, evaluated once: " + "; ".join(
        f"{', '.join(method_label(m) for m in dict.fromkeys(ms))} at ratio "
        f"{plan.loc[plan['set_id'] == sid, 'ratio'].iloc[0]:.3g}" for sid, ms in shared.sort_index().items()) + "."


def task_list(specs: Sequence[TaskSpec], benchmarks: Mapping[str, tuple[TaskSpec, Benchmark]]) -> str:
    """The retention table's tasks with split, size and the settings that change their scores."""
    parts = []
    for s in specs:
        bench = benchmarks[s.key][1]
        split = bench.provenance.get("split")
        if s.name == "wikitext2":
            parts.append(f"wikitext2 {split} (first ≈{s.n or 'all'} tokens, window {s.options.get('max_length', 1024)}, "
                         f"stride {s.options.get('stride', 'max_length/2')})")
            continue
        extra = ""
        if s.name == "sciq":
            extra = (", open-book (support in the prompt)" if s.options.get("with_support", True)
                     else ", closed-book (no support paragraph)")
        if s.name == "wikiqa":
            extra = f", {s.options.get('scoring', 'pmi')} scoring"
        parts.append(f"{s.name} {split} n={len(bench)}{extra}")
    return "; ".join(parts)


def selection_sentence(mismatches: Sequence[str]) -> str:
    """Whether the AVSS sets at the table's ratio are chapter 02's fixed-fraction selections."""
    if not mismatches:
        return "Every AVSS set at the table's ratio is chapter 02's fixed-fraction selection of that variant."
    return (f"The AVSS sets of variants {', '.join(mismatches)} differ from chapter 02's fixed-fraction selections "
            "(chapter 02 ran with another ratio or rounding).")


def precision_sentence(precision: pd.DataFrame | None, dtype: str) -> str:
    """What evaluating in ``dtype`` instead of float32 changes on the unpruned model (or that all ran in float32)."""
    if precision is None or precision.empty:
        return f"All evaluations ran in {dtype}; no reduced-precision check was needed."
    parts = []
    for row in precision.itertuples():
        same = ("" if math.isnan(row.same_per_example)
                else f", the same outcome on {row.same_per_example:.0%} of the {row.n} examples")
        parts.append(f"{row.task_key} {row.metric} {score_text(row.value, row.metric)} in {dtype} against "
                     f"{score_text(row.value_float32, row.metric)} in float32 (difference {row.difference:+.4g}{same})")
    return (f"The pruning evaluations ran in {dtype} (the `dtype` parameter). To show what that costs, the unpruned "
            "model was also evaluated in float32 on the curve tasks: " + "; ".join(parts)
            + ". Retention compares pruned and unpruned models evaluated in the same dtype.")


def outcome_phrase(outcome: str) -> str:
    """A verdict's outcome in bold."""
    return f"**{outcome}**"


def speed_numbers(speed: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of the speed paragraph, from :func:`avss_lib.core.timing.measure_speedup`'s record."""
    return {"speed_n_removed": speed["n_removed"], "speed_n_layers": speed["n_layers"],
            "speed_batch_rows": speed["batch_shape"][0], "speed_batch_tokens": speed["batch_shape"][1],
            "speed_repeats": speed["repeats"], "speed_threads": speed["torch_threads"],
            "seconds_pruned": speed["seconds_pruned"], "seconds_unpruned": speed["seconds_unpruned"],
            "measured_speedup": speed["measured_speedup"], "theoretical_speedup": speed["theoretical_speedup_layers"],
            "estimated_speedup": speed["estimated_speedup_params"]}


def stability_sentence(stability: pd.DataFrame, primary: str) -> str:
    """How far the rankings move between disjoint calibration folds: the ``primary`` variant's smallest ρ and
    Jaccard overlap, and the least and most stable ranked methods by their smallest ρ."""
    if stability.empty:
        return "Ranking stability was not measured (stability_folds = 0)."
    n_folds = len(set(stability["fold_a"]) | set(stability["fold_b"]))
    worst = stability.groupby("method", sort=False)["spearman"].min().dropna().sort_values(kind="stable")
    text = f"Recomputed on {n_folds} disjoint calibration folds"
    own = stability[stability["method"] == primary]
    if not own.empty:
        text += (f", {method_label(primary)} keeps Spearman ρ ≥ {own['spearman'].min():.2f} between any two folds "
                 f"and removes sets that overlap by Jaccard ≥ {own['jaccard'].min():.2f}")
    if len(worst):
        text += (f"; the least stable ranking is {method_label(worst.index[0])} (ρ ≥ {worst.iloc[0]:.2f}), the most "
                 f"stable {method_label(worst.index[-1])} (ρ ≥ {worst.iloc[-1]:.2f})")
    return text + "."


def detectable_phrase(half_width: float | None) -> str:
    """The minimum detectable effect of the A1 rule in points (the widest CI half-width), or why there is none."""
    if half_width is None or not math.isfinite(half_width):
        return "not defined (no counted task)"
    return f"{half_width:.1f} points"
