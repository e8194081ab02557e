r"""The rules that decide claim E2, as :class:`~avss_lib.core.verdicts.Verdict` data: one pre-registered primary
rule, and the per-data-set layer-specificity rule as an exploratory reading.

**Primary rule** (:func:`e2_primary_verdict`, stated in the chapter before the run). From
:func:`avss_lib.mitigation.pooled_effects.primary_table` — the EAVSS arm against the untouched model and against
the random-layer arm, accuracy and ECE pooled over the data sets, intervals at the Bonferroni level
``1 − 0.05/2`` for the two metrics — each metric reaches one of three outcomes. With :math:`g` the improvement
over the untouched model (accuracy up, ECE down) in points and :math:`g_\%` in % of the untouched value, the
claimed magnitude :math:`c` (12 for accuracy, 34 for ECE: the abstract does not say whether points or per cent, so
both readings are checked) and :math:`h` the improvement over the random-layer arm, margin :math:`m` points:

- **holds** when the improvement over the untouched model is significant (its interval above 0), reaches the
  claim under either reading (:math:`g \ge c` or :math:`g_\% \ge c`), and EAVSS beats the random layers
  (interval of :math:`h` above 0 and :math:`h \ge m`);
- **does not hold** when the interval of the improvement lies below the claim under both readings (a
  non-superiority bound: upper ends of :math:`g` and :math:`g_\%` below :math:`c`) and the run's minimum
  detectable effect is at most the smaller reading of the claim in points, or when EAVSS is no better than random
  layers within the margin (upper end of :math:`h` below :math:`m`, with a minimum detectable effect of at most
  :math:`m`) — an interval counts as evidence of absence only where the run could have seen the effect;
- **inconclusive** otherwise.

Claim E2 asserts both magnitudes, so it *holds* when both metrics hold, *does not hold* when either does not hold,
and is *inconclusive* otherwise. Each condition records its value
and interval; the chapter's power table gives the minimum detectable effect of each difference.

**Exploratory rule** (:func:`e2_verdicts`, layer specificity per data set). From :func:`avss_lib.mitigation.outcomes.comparisons` (``EAVSS − other`` per data set and metric, paired
bootstrap at the Bonferroni-corrected level, an effect at least ``min_effect`` points), the rule records one
``better than <arm>`` and one ``worse than <arm>`` condition per (data set, metric, control arm) — group
``"<data set>/<metric>"`` — and one ``<arm> run`` condition per control arm. EAVSS *wins* a (data set,
metric) pair when it is better than every control arm there. Claim E2's layer specificity is then

- **supported** (the claim *holds*) when EAVSS wins at least one pair and is worse than no control arm anywhere;
- **contradicted** (*does not hold*) when it is worse somewhere and wins no pair;
- **mixed** when both happen, and **not resolved** when neither does (both *inconclusive*).

The paper's magnitudes (up to +12% accuracy, up to −34% ECE) are recorded beside the rule, not in it: the
largest relative accuracy change and ECE change of the EAVSS arm against the untouched model, each with its
paired 95% interval (conditions ``largest accuracy change`` / ``largest ECE change``, group = the data set;
met when the interval excludes zero and the change is at least 0.05 points, the printed precision).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from avss_lib.core.errors import DataError
from avss_lib.core.verdicts import Condition, Verdict
from avss_lib.mitigation.outcomes import CONTROL_ARMS
from avss_lib.mitigation.pooled_effects import improvement

PAPER_ACC_GAIN, PAPER_ECE_DROP = 12.0, 34.0  # the paper's "up to" numbers, in %
SHOWN_PRECISION = 0.05  # points: a smaller difference prints as 0.0
E2_RULE = ("On every data set and metric (accuracy, ECE) the top-k EAVSS arm is compared with the random-layer and "
           "the LM-only arm by a paired bootstrap of the difference on the same held-out examples, at the "
           "Bonferroni-corrected level 1 − 0.05/m for m (data set, metric) pairs; it is better (worse) when the "
           "interval excludes zero on its (their) side and the difference is at least min_effect points. Holds "
           "when EAVSS is better than both on at least one pair and worse nowhere; does not hold when it is worse "
           "somewhere and better than both nowhere; inconclusive otherwise.")
#: The rule's readings and the outcome each one is in the claims chapter's vocabulary.
READINGS: dict[str, str] = {"supported": "holds", "contradicted": "does not hold", "mixed": "inconclusive",
                            "not resolved": "inconclusive"}
MAGNITUDES: tuple[tuple[str, str, str], ...] = (("accuracy", "largest accuracy change", "idxmax"),
                                               ("ece", "largest ECE change", "idxmin"))


def comparison_conditions(comp: pd.DataFrame, against: Sequence[str] = CONTROL_ARMS) -> list[Condition]:
    """The rule's conditions: which control arms were run, and EAVSS better / worse per comparison."""
    ran = set(comp["other"])
    conditions = [Condition(f"{arm} run", met=arm in ran, group=arm) for arm in against]
    for r in comp.itertuples(index=False):
        for name, met in ((f"better than {r.other}", r.beats), (f"worse than {r.other}", r.beaten)):
            conditions.append(Condition(name, met=bool(met), value=float(r.diff), threshold=float(r.min_effect),
                                        low=float(r.low), high=float(r.high), group=f"{r.dataset}/{r.metric}"))
    return conditions


def wins_and_losses(conditions: Sequence[Condition], against: Sequence[str] = CONTROL_ARMS
                    ) -> tuple[list[str], list[Condition]]:
    """The (data set/metric) groups where EAVSS is better than every control arm, and the met ``worse`` conditions."""
    groups = list(dict.fromkeys(c.group for c in conditions if c.name.startswith("better than ")))
    met = {(c.name, c.group) for c in conditions if c.met}
    wins = [g for g in groups if all((f"better than {arm}", g) in met for arm in against)]
    losses = [c for c in conditions if c.name.startswith("worse than ") and c.met]
    return wins, losses


def e2_reading(conditions: Sequence[Condition], against: Sequence[str] = CONTROL_ARMS) -> str:
    """The rule's reading from its conditions: 'supported', 'contradicted', 'mixed' or 'not resolved'."""
    wins, losses = wins_and_losses(conditions, against)
    if wins and not losses:
        return "supported"
    if losses and not wins:
        return "contradicted"
    return "mixed" if wins else "not resolved"


def largest_changes(table: pd.DataFrame, target: str = "eavss") -> dict[str, pd.Series]:
    """The ``ARM_METRICS`` rows of the largest relative accuracy gain and ECE drop of ``target`` against base."""
    sub = table[(table["arm"] == target)].dropna(subset=["rel_change"])
    out = {}
    for metric, _, best in MAGNITUDES:
        rows = sub[sub["metric"] == metric]
        if not rows.empty:
            out[metric] = rows.loc[getattr(rows["rel_change"], best)()]
    return out


def _beyond(row: pd.Series) -> bool:
    excludes_zero = row["diff_low"] > 0 or row["diff_high"] < 0
    return bool(excludes_zero and abs(row["diff"]) >= SHOWN_PRECISION)


def e2_verdicts(comp: pd.DataFrame, table: pd.DataFrame, *, target: str = "eavss",
                against: Sequence[str] = CONTROL_ARMS) -> list[Verdict]:
    """Claim E2's verdict for the ``target`` arm from the ``COMPARISONS`` and ``ARM_METRICS`` tables."""
    conditions = comparison_conditions(comp, against)
    reading = e2_reading(conditions, against)
    wins, losses = wins_and_losses(conditions, against)
    numbers: dict[str, float | None] = {
        "pairs_won": float(len(wins)), "comparisons_lost": float(len(losses)),
        "level": float(comp["level"].iloc[0]) if len(comp) else None,
        "paper_accuracy_gain": PAPER_ACC_GAIN, "paper_ece_drop": PAPER_ECE_DROP}
    ours = []
    for metric, name, _ in MAGNITUDES:
        row = largest_changes(table, target).get(metric)
        if row is None:
            continue
        conditions.append(Condition(name, met=_beyond(row), value=float(row["diff"]), threshold=SHOWN_PRECISION,
                                    low=float(row["diff_low"]), high=float(row["diff_high"]), group=str(row["dataset"])))
        numbers.update({f"{metric}_rel_change": float(row["rel_change"]), f"{metric}_diff": float(row["diff"]),
                        f"{metric}_diff_low": float(row["diff_low"]), f"{metric}_diff_high": float(row["diff_high"])})
        ours.append(f"{'accuracy' if metric == 'accuracy' else 'ECE'} {row['rel_change']:+.1f}% on {row['dataset']} "
                    f"({row['diff']:+.1f} pt, 95% CI [{row['diff_low']:+.1f}, {row['diff_high']:+.1f}])")
    ours.append(f"vs random layers and LM-only: better on {len(wins)} (data set, metric) pair(s), worse on "
                f"{len(losses)} comparison(s)")
    return [Verdict(claim="E2", subject=f"{target}, per data set", outcome=READINGS[reading], rule=E2_RULE,
                    conditions=tuple(conditions), summary="; ".join(ours), numbers=numbers, analysis="exploratory")]


CLAIMED: dict[str, float] = {"accuracy": PAPER_ACC_GAIN, "ece": PAPER_ECE_DROP}
RANDOM_MARGIN = 2.0  # points: an improvement over random layers smaller than this is no practical difference
PRIMARY_RULE = (
    "Primary, pooled over the data sets (accuracy over all evaluation examples, ECE the mean of the data sets' ECE), "
    "intervals at the Bonferroni level 1 − 0.05/2 for the two metrics, the EAVSS arm's runs and the random arm's "
    "draws resampled with the examples. Per metric, with c the paper's magnitude (+12 accuracy, −34 ECE, read both "
    "as points and as % of the untouched value) and m = {margin:g} points: holds when the improvement over the "
    "untouched model is significant, reaches c under either reading, and beats the random layers significantly and "
    "by at least m; does not hold when the interval of the improvement lies below c under both readings with a "
    "minimum detectable effect no larger than the smaller reading of c, or when the improvement over the random "
    "layers is below m at the interval's upper end with a minimum detectable effect no larger than m; "
    "inconclusive otherwise. E2 "
    "holds when both metrics hold, does not hold when either does not hold, and is inconclusive otherwise.")


def _metric_outcome(metric: str, vs_base: pd.Series | None, vs_random: pd.Series | None, margin: float
                    ) -> tuple[str, list[Condition]]:
    """One metric's outcome under the primary rule, and the conditions it checked (group = the metric)."""
    claim = CLAIMED[metric]
    if vs_base is None:
        return "inconclusive", [Condition("untouched model run", met=False, group=metric)]
    g, g_low, g_high = improvement(vs_base)
    r, r_low, r_high = improvement(vs_base, relative=True)
    conditions = [
        Condition("improvement over untouched is significant", met=bool(g_low > 0), value=g, threshold=0.0,
                  low=g_low, high=g_high, group=metric),
        Condition("reaches the claim (points)", met=bool(g >= claim), value=g, threshold=claim, low=g_low,
                  high=g_high, group=metric),
        Condition("reaches the claim (%)", met=bool(r >= claim), value=r, threshold=claim, low=r_low, high=r_high,
                  group=metric),
        Condition("claim excluded under both readings", met=bool(max(g, g_high) < claim and max(r, r_high) < claim),
                  value=max(g_high, r_high), threshold=claim, group=metric)]
    # an interval that excludes the claim is evidence only where the run could have seen it: its MDE at most the
    # smaller reading of the claim in points (a bootstrap of arms that answer alike collapses to [0, 0] otherwise)
    smallest = min(claim, claim * abs(float(vs_base.get("other_value", np.nan))) / 100)
    powered = bool(float(vs_base.get("mde", np.nan)) <= smallest)
    conditions.append(Condition("powered to exclude the claim", met=powered, value=float(vs_base.get("mde", np.nan)),
                                threshold=smallest, group=metric))
    if vs_random is None:
        conditions.append(Condition("random run", met=False, group=metric))
        beats = equivalent = False
    else:
        h, h_low, h_high = improvement(vs_random)
        powered_margin = bool(float(vs_random.get("mde", np.nan)) <= margin)
        beats, equivalent = bool(h_low > 0 and h >= margin), bool(max(h, h_high) < margin and powered_margin)
        conditions += [Condition("beats random layers", met=beats, value=h, threshold=margin, low=h_low, high=h_high,
                                 group=metric),
                       Condition("no better than random layers", met=equivalent, value=h_high, threshold=margin,
                                 low=h_low, high=h_high, group=metric)]
    reached = conditions[1].met or conditions[2].met
    if conditions[0].met and reached and beats:
        return "holds", conditions
    if (conditions[3].met and powered) or equivalent:
        return "does not hold", conditions
    return "inconclusive", conditions


def e2_primary_verdict(primary: pd.DataFrame, *, target: str = "eavss", margin: float = RANDOM_MARGIN) -> Verdict:
    """Claim E2's primary verdict from the ``E2_PRIMARY`` table (:func:`avss_lib.mitigation.pooled_effects.primary_table`)."""
    missing = {"metric", "other", "diff", "low", "high", "rel_change", "rel_low", "rel_high"} - set(primary.columns)
    if missing:
        raise DataError(f"the E2 primary table lacks columns {sorted(missing)}: build it with pooled_effects.primary_table")
    conditions: list[Condition] = []
    outcomes: dict[str, str] = {}
    numbers: dict[str, float | None] = {"paper_accuracy_gain": PAPER_ACC_GAIN, "paper_ece_drop": PAPER_ECE_DROP,
                                        "margin": margin}
    parts = []
    for metric in CLAIMED:
        rows = {r["other"]: r for _, r in primary[primary["metric"] == metric].iterrows()}
        outcome, checked = _metric_outcome(metric, rows.get("base"), rows.get("random"), margin)
        outcomes[metric] = outcome
        conditions += [*checked, Condition(f"{metric} outcome: {outcome}", met=outcome == "holds", group=metric)]
        if "base" in rows:
            b = rows["base"]
            numbers.update({f"{metric}_diff": float(b["diff"]), f"{metric}_low": float(b["low"]),
                            f"{metric}_high": float(b["high"]), f"{metric}_rel_change": float(b["rel_change"]),
                            f"{metric}_mde": float(b["mde"]), f"{metric}_n": float(b["n"])})
            parts.append(f"{'accuracy' if metric == 'accuracy' else 'ECE'} {b['diff']:+.1f} pt "
                         f"[{b['low']:+.1f}, {b['high']:+.1f}] ({b['rel_change']:+.1f}%) vs untouched, MDE "
                         f"{b['mde']:.1f} pt: {outcome}")
    values = set(outcomes.values())
    overall = "holds" if values == {"holds"} else "does not hold" if "does not hold" in values else "inconclusive"
    return Verdict(claim="E2", subject=f"{target}, pooled over the data sets", outcome=overall,
                   rule=PRIMARY_RULE.format(margin=margin), conditions=tuple(conditions), summary="; ".join(parts),
                   numbers=numbers)
