"""The data-dependent phrases of chapter 04's prose (lists of data sets, and which of two clauses applies).

The chapter's sentences are in its notebook's markdown cells; these functions write only the parts whose
structure depends on the results, for :meth:`avss_lib.hallucination.stage.HallucinationResult.glue`.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from avss_lib.core.formatting import layer_list
from avss_lib.core.verdicts import Verdict

POSITION_PHRASES = {
    "answer": "the tokens of the model's own answer (generated text, or the chosen option), fed back after the prompt",
    "question_last": "the last token of the prompt, where the model starts to answer",
}


def position_phrase(position: str) -> str:
    """Which tokens the statistics are read over, in words."""
    return POSITION_PHRASES[position]


def _default_rows(answer_summary: pd.DataFrame, label_convention: str) -> pd.DataFrame:
    """One row per data set: the run's label convention for generative tasks, the choice for the others."""
    return answer_summary[answer_summary["convention"].isin([label_convention, "choice"])]


def accuracy_list(answer_summary: pd.DataFrame, label_convention: str) -> str:
    """``nq_open 12.5% [0.0, 25.0] (21 of 24 answers hallucinated); ...`` for every data set."""
    return "; ".join(f"{r.dataset} {100 * r.accuracy:.1f}% [{100 * r.ci_low:.1f}, {100 * r.ci_high:.1f}] "
                     f"({r.n_hallucinated} of {r.n} answers hallucinated)"
                     for r in _default_rows(answer_summary, label_convention).itertuples())


def empty_answers_sentence(answer_summary: pd.DataFrame, label_convention: str) -> str:
    """The data sets with empty answers and how many, or that there are none."""
    rows = _default_rows(answer_summary, label_convention)
    empty = rows[rows["n_empty_answers"] > 0]
    if empty.empty:
        return "No answer is empty."
    return ("Empty answers (the first generated token was a stop string such as a newline, so the harness's "
            "answer is empty; counted as wrong, and with no answer token to measure): "
            + ", ".join(f"{r.dataset} {r.n_empty_answers} of {r.n}" for r in empty.itertuples()) + ".")


def short_datasets_sentence(answer_summary: pd.DataFrame, label_convention: str, n_requested: int | None) -> str:
    """The data sets with fewer answerable questions than requested, or that every one has enough."""
    if n_requested is None:
        return "Every answerable question of each data set was asked."
    rows = _default_rows(answer_summary, label_convention)
    short = rows[rows["n"] < n_requested]
    if short.empty:
        return f"Every data set has the {n_requested} questions requested."
    return (f"Fewer questions than requested ({n_requested}) exist for: "
            + ", ".join(f"{r.dataset} ({r.n} answerable questions)" for r in short.itertuples()) + ".")


def class_size_warnings(answer_summary: pd.DataFrame, label_convention: str, min_class: int) -> str:
    """A warning per data set with a class below ``min_class`` answers, or that every data set is tested."""
    rows = _default_rows(answer_summary, label_convention)
    small = rows[~rows["usable"]]
    if small.empty:
        return f"Every data set has at least {min_class} answers in each class, so every one is tested."
    return "\n\n".join(
        f"> **Warning — {r.dataset} is excluded from pooled rankings:** {r.n_hallucinated} hallucinated vs "
        f"{r.n_correct} correct answers, below the minimum of {min_class} per class. Its EAVSS (if shown) is not "
        "tested against the null, for stability or against probes." for r in small.itertuples())


def excluded_sentence(summary: pd.DataFrame) -> str:
    """The data sets the E1 rule leaves out (a class below the minimum size), or that none is left out."""
    excluded = list(summary.index[~summary["usable"].astype(bool)])
    if not excluded:
        return "No data set is excluded."
    return f"**Excluded** (a class below the minimum size): {', '.join(map(str, excluded))}."


def dataset_lines(verdict: Verdict, summary: pd.DataFrame) -> str:
    """One bullet per usable data set: its three conditions, met or not, with values and thresholds."""
    lines = []
    for name, row in summary[summary["usable"].astype(bool)].iterrows():
        signal, stable, valid = (verdict.condition(c, str(name)) for c in ("signal", "stable", "valid"))
        if valid.value is None:
            probe = "no probe"
        else:
            probe = (f"probe-vs-EAVSS Spearman ρ = {valid.value:+.3f} (best probe layer "
                     f"{int(row['probe_best_layer'])}, AUROC {row['probe_best_auroc']:.2f})")
        lines.append(
            f"- **{name}** ({int(row['n_hallucinated'])} hallucinated / {int(row['n_correct'])} correct): smallest "
            f"family-wise p = {_num(signal.value, '.3f')} ({'beats' if signal.met else 'does not beat'} the null at "
            f"α = {signal.threshold}); split-half ρ median {_num(stable.value, '+.3f')} "
            f"({'stable' if stable.met else 'unstable'}, threshold {stable.threshold}); seed-subsample ρ mean "
            f"{row['seed_rho_mean']:+.2f}; {probe} ({'agrees' if valid.met else 'does not agree'}, threshold "
            f"{valid.threshold}). Top layers: {layer_list(row['top_k'])}.")
    if not lines:
        return "No data set has enough hallucinated and correct answers in both classes to be tested."
    return "\n".join(lines)


def _num(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def pooled_sentence(pooled: Sequence[int], lowest_avss: Sequence[int], jaccard: float) -> str:
    """The pooled top layers and their overlap with the lowest-AVSS layers, or that nothing was pooled."""
    if not pooled:
        return "No data set is usable, so there is no pooled ranking."
    if not lowest_avss:
        return f"Pooled top layers: {layer_list(pooled)}; notebook 02's selection prunes no layer."
    overlap = sorted(set(pooled) & set(lowest_avss))
    return (f"Pooled top layers: {layer_list(pooled)}; overlap with the lowest-AVSS (pruned) layers: "
            f"{layer_list(overlap, empty='none')} (Jaccard {jaccard:.2f}).")


def secondary_sentence(verdict: Verdict | None, length_strata: int) -> str:
    """The exploratory reading at the secondary position, or that none was run."""
    if verdict is None:
        return "No secondary position was analysed in this run (parameter `secondary_position`)."
    control = (f"the permutation null shuffles the labels within {length_strata} answer-length bins, so "
               "length alone cannot pass it, and " if length_strata > 1 else "")
    return (f"Exploratory, at the secondary position ({verdict.subject}): {control}"
            f"{int(verdict.numbers['n_pass_all'])} of {int(verdict.numbers['n_usable'])} usable data set(s) pass "
            f"all three tests (outcome *{verdict.outcome}* under the same rule; not the claim's verdict).")


def convention_sentence(verdict: Verdict | None, primary: Verdict) -> str:
    """The E1 rule with the generative data sets labelled by the other convention, beside the primary outcome."""
    if verdict is None:
        return "No generative data set was analysed, so the label convention cannot matter here."
    same = "the same as" if verdict.outcome == primary.outcome else "unlike"
    return (f"With the other label convention for NQ-open and TriviaQA ({verdict.subject}), "
            f"{int(verdict.numbers['n_pass_all'])} of {int(verdict.numbers['n_usable'])} usable data set(s) pass "
            f"all three tests: outcome *{verdict.outcome}*, {same} the primary *{primary.outcome}* (exploratory).")


def causal_sentence(table: pd.DataFrame | None) -> str:
    """The causal check in one sentence: each removed set's change of the pooled hallucination rate."""
    if table is None or table.empty:
        return ("The causal check did not run (parameter `causal_n` is 0, or no data set was usable, so there is no "
                "pooled ranking to remove layers by).")
    rows = table.set_index("set")
    base = rows.loc["untouched"]
    changes = [f"{name} {r['change']:+.1f} points [{r['change_low']:+.1f}, {r['change_high']:+.1f}]"
               for name, r in rows.drop(index="untouched").iterrows()]
    return (f"On {int(base['n'])} evaluation-half questions the untouched model hallucinates "
            f"{base['hallucination_rate']:.1f}% [{base['low']:.1f}, {base['high']:.1f}]; removing the layers changes "
            f"that by: {'; '.join(changes)} (95% paired intervals). If EAVSS located the layers where hallucinations "
            "arise, removing the top-k set would move the rate more than removing random or bottom-k layers.")


def power_sentence(summary: pd.DataFrame) -> str:
    """The smallest AUROC each data set's selection half can tell from chance (the ``mde_auroc`` column)."""
    rows = summary["mde_auroc"].dropna() if "mde_auroc" in summary.columns else pd.Series(dtype=float)
    if rows.empty:
        return "No data set has both classes, so none has any power to locate hallucination-prone layers."
    listed = ", ".join(f"{name} {value:.2f}" for name, value in rows.items())
    return (f"**Power.** At the selection half's class sizes, the smallest AUROC a layer (or its probe) must reach to be "
            f"told from chance at 80% power in a single two-sided test at 5% is: {listed}; weaker separations "
            "cannot be seen here whatever EAVSS does.")
