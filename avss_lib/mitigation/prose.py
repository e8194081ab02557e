"""Phrases of chapter 05 whose structure depends on the data (lists of data sets or arms, which clause applies).

The chapter's sentences live in the notebook's markdown; these functions write only the parts that cannot be a
fixed sentence with glued numbers. Each takes the chapter's tables or its :class:`~avss_lib.core.verdicts.Verdict`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from avss_lib.core.verdicts import Verdict
from avss_lib.mitigation.arms import ARM_LABELS
from avss_lib.mitigation.outcomes import CONTROL_ARMS
from avss_lib.mitigation.pooled_effects import examples_needed
from avss_lib.mitigation.training_data import OPEN_QA
from avss_lib.mitigation.verdict import CLAIMED, MAGNITUDES, PAPER_ACC_GAIN, PAPER_ECE_DROP, wins_and_losses

#: At most this many correct answers of the untouched model on a data set are "a handful".
HANDFUL = 5
K_LAYER_ARMS = ("eavss", "random", "lowest_avss", "lm_only")


def and_list(items: Sequence[str]) -> str:
    """``["a"]`` -> ``"a"``, ``["a", "b"]`` -> ``"a and b"``, ``["a", "b", "c"]`` -> ``"a, b and c"``."""
    items = list(items)
    return " and ".join(items) if len(items) < 3 else ", ".join(items[:-1]) + " and " + items[-1]


def counts_phrase(counts: Mapping[str, int]) -> str:
    """``{"nq_open": 3, "sciq": 5}`` -> ``"nq_open: 3, sciq: 5"``."""
    return ", ".join(f"{name}: {int(n)}" for name, n in counts.items())


def runs_phrase(runs: pd.DataFrame, seconds: float) -> str:
    """How many runs were computed now or reused, and the longest training and evaluation of a computed run."""
    ran = runs[~runs["reused"].astype(bool)]
    text = f"{len(runs)} runs ({len(ran)} computed now, {len(runs) - len(ran)} reused) in {seconds:.0f} s"
    if ran.empty:
        return text + "."
    trained = ran[ran["trainable_params"] > 0]
    train = f"{trained['train_seconds'].max():.0f} s to train and " if len(trained) else ""
    return text + f"; a computed run took at most {train}{ran['eval_seconds'].max():.0f} s to evaluate."


def budget_phrase(arms: pd.DataFrame) -> str:
    """Trainable parameters per trained arm, and whether the arms that train ``k`` layers match exactly."""
    trained = arms[arms["trainable_params"] > 0]
    if trained.empty:
        return "none (no arm is trained)."
    per_arm = trained.groupby("arm", sort=False)["trainable_params"].agg(["min", "max"])
    parts = [f"{ARM_LABELS.get(a, a)}: {int(r['min']):,}" + (f"–{int(r['max']):,}" if r["max"] != r["min"] else "")
             for a, r in per_arm.iterrows()]
    k_arms = trained[trained["arm"].isin(K_LAYER_ARMS)]["trainable_params"]
    clauses = []
    if len(k_arms):
        clauses.append("the arms that train k layers " + ("train exactly the same number of parameters"
                                                          if k_arms.nunique() == 1 else
                                                          "differ in trainable parameters (their layers differ in size)"))
    if "all" in per_arm.index and len(k_arms) and per_arm.loc["all", "min"] > k_arms.max():
        clauses.append("the all-layers arm trains more by construction")
    text = "; ".join(parts) + "."
    if clauses:
        sentence = ", and ".join(clauses)
        text += " " + sentence[0].upper() + sentence[1:] + "."
    return text


def open_qa_phrase(table: pd.DataFrame) -> str:
    """How many held-out open-QA questions the untouched model answers correctly, and what that means."""
    base = table[(table["arm"] == "base") & (table["metric"] == "accuracy") & table["dataset"].isin(OPEN_QA)]
    if base.empty:
        return "No open-QA data set was evaluated on the untouched model."
    correct = {r.dataset: (int(round(r.value * r.n / 100)), int(r.n)) for r in base.itertuples()}
    listed = and_list([f"{c} of {n} on {d}" for d, (c, n) in correct.items()])
    text = f"Of the held-out open questions, the untouched model answers {listed} correctly"
    few = [d for d, (c, _) in correct.items() if c <= HANDFUL]
    if few:
        return text + f", so relative changes on {and_list(few)} rest on a handful of examples: read them with the intervals."
    return text + "."


def comparison_phrase(verdict: Verdict, against: Sequence[str] = CONTROL_ARMS) -> str:
    """Where EAVSS beats every control arm and where it is beaten (from the verdict's conditions)."""
    run = [a for a in against if verdict.condition(f"{a} run", a).met]
    if not run:
        return ("No control arm was run, so no verdict on claim E2 is possible: add "
                + " and ".join(f"`{a}`" for a in against) + " to arms.")
    wins, losses = wins_and_losses(verdict.conditions, against)
    lost = [f"{c.group.replace('/', ' ')} vs {ARM_LABELS[c.name.removeprefix('worse than ')]}" for c in losses]
    text = (f"EAVSS beats every control arm on {len(wins)} pair(s)"
            + (f" ({'; '.join(w.replace('/', ' ') for w in wins)})" if wins else "")
            + f" and is beaten on {len(losses)} comparison(s)" + (f" ({'; '.join(lost)})" if lost else "") + ".")
    missing = [a for a in against if a not in run]
    if missing:
        text += f" Arm(s) {', '.join(missing)} were not run, so the verdict cannot be 'supported' in full."
    return text


def magnitude_phrase(verdict: Verdict, metric: str) -> str:
    """The largest relative change of ``metric`` against the untouched model with its paired interval."""
    rel = verdict.numbers.get(f"{metric}_rel_change")
    if rel is None:
        return ("not defined (the untouched model was not evaluated, or its score is zero on every data set)")
    name = next(n for m, n, _ in MAGNITUDES if m == metric)
    condition = next(c for c in verdict.conditions if c.name == name)
    paper = f"up to +{PAPER_ACC_GAIN:.0f}%" if metric == "accuracy" else f"up to −{PAPER_ECE_DROP:.0f}%"
    return (f"{rel:+.1f}% on {condition.group} ({condition.value:+.1f} points, "
            f"{'beyond' if condition.met else 'within'} the 95% paired interval [{condition.low:+.1f}, "
            f"{condition.high:+.1f}]; paper: {paper})")


def never_correct_phrase(table: pd.DataFrame) -> str:
    """Data sets on which no arm answers any held-out question correctly (ECE there is the mean confidence)."""
    acc = table[table["metric"] == "accuracy"]
    never = [d for d, g in acc.groupby("dataset", sort=False) if np.all(g["value"] == 0)]
    if not never:
        return "On every data set at least one arm answers a held-out question correctly."
    return (f"On {and_list(never)} no arm answers any held-out question correctly, so ECE there equals the mean "
            "confidence: a lower ECE only means less confident wrong answers, not fewer hallucinations.")


def metric_outcome(verdict: Verdict, metric: str) -> str:
    """The outcome the primary rule reached for one metric (from its ``<metric> outcome: ...`` condition)."""
    prefix = f"{metric} outcome: "
    return next(c.name.removeprefix(prefix) for c in verdict.conditions if c.name.startswith(prefix))


def primary_line(primary: pd.DataFrame, metric: str) -> str:
    """One metric's pooled numbers: the EAVSS arm and each other arm with intervals, the difference in points and
    in %, and the run's minimum detectable effect."""
    name = "accuracy" if metric == "accuracy" else "ECE"
    rows = primary[primary["metric"] == metric]
    if rows.empty:
        return f"{name}: the untouched and random arms were not run, so nothing is compared."
    first = rows.iloc[0]
    parts = [f"{name} (pooled over {int(first['n_datasets'])} data sets, {int(first['n'])} examples): top-k EAVSS "
             f"{first['value']:.1f}% [{first['value_low']:.1f}, {first['value_high']:.1f}]"]
    for _, r in rows.iterrows():
        parts.append(f"against {ARM_LABELS[r['other']]} {r['other_value']:.1f}% [{r['other_low']:.1f}, "
                     f"{r['other_high']:.1f}]: {r['diff']:+.1f} points [{r['low']:+.1f}, {r['high']:+.1f}], "
                     f"{r['rel_change']:+.1f}% [{r['rel_low']:+.1f}, {r['rel_high']:+.1f}], MDE {r['mde']:.1f} points")
    return "; ".join(parts) + "."


def power_sentence(primary: pd.DataFrame, claimed: Mapping[str, float]) -> str:
    """Whether the run can see the paper's accuracy gain against the untouched model, and the n that would."""
    rows = primary[(primary["metric"] == "accuracy") & (primary["other"] == "base")]
    if rows.empty:
        return "Without the untouched arm the run has no power to see the claimed accuracy gain."
    r = rows.iloc[0]
    claim = claimed["accuracy"]
    if r["mde"] <= claim:
        return (f"At {int(r['n'])} pooled evaluation examples the smallest accuracy change this run detects against "
                f"the untouched model is {r['mde']:.1f} points, within the paper's {claim:g}: a null result here is "
                "informative.")
    needed = int(examples_needed(r, claim))
    return (f"At {int(r['n'])} pooled evaluation examples the smallest detectable accuracy change against the "
            f"untouched model is {r['mde']:.1f} points, above the paper's {claim:g}: about {needed} examples (same "
            "runs) would bring it down to the claim, so an inconclusive result here says little.")


def primary_glue(verdict: Verdict, primary: pd.DataFrame, margin: float) -> dict[str, object]:
    """Chapter 05's glue for the primary verdict."""
    return {"e2p_outcome": verdict.outcome, "e2p_margin": margin,
            "e2p_level_pct": 100 * float(primary["level"].iloc[0]) if len(primary) else float("nan"),
            "e2p_accuracy_outcome": metric_outcome(verdict, "accuracy"),
            "e2p_ece_outcome": metric_outcome(verdict, "ece"),
            "e2p_accuracy_line": primary_line(primary, "accuracy"), "e2p_ece_line": primary_line(primary, "ece"),
            "e2p_power": power_sentence(primary, CLAIMED)}
