"""The rule that decides claim E2's layer specificity, as :class:`~avss_lib.core.verdicts.Verdict` data.

From :func:`avss_lib.mitigation.outcomes.comparisons` (``EAVSS − other`` per data set and metric, paired
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

import pandas as pd

from avss_lib.core.verdicts import Condition, Verdict
from avss_lib.mitigation.outcomes import CONTROL_ARMS

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
    return [Verdict(claim="E2", subject=target, outcome=READINGS[reading], rule=E2_RULE, conditions=tuple(conditions),
                    summary="; ".join(ours), numbers=numbers)]
