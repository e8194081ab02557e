"""The claims chapter, generated at book-build time from the verdicts the chapters wrote.

Each chapter that tests a claim writes its :class:`~avss_lib.core.verdicts.Verdict` objects as data (the
``verdict.json`` artifact of its stage). This module only words them: one table row per verdict (the paper's
number, ours with its interval, the outcome), then each verdict's pre-stated rule and the conditions it checked,
with their values.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import pandas as pd

from avss_lib.core.artifacts import STAGES, RunDir, verdict
from avss_lib.core.verdicts import CLAIMS, PAPER, Condition, Verdict, from_records


def collect_verdicts(run_dir: RunDir) -> list[tuple[str, Verdict]]:
    """Every verdict of a run with the stage that wrote it, in stage order."""
    found = []
    for stage in STAGES:
        artifact = verdict(stage)
        if artifact.exists(run_dir):
            found += [(stage, v) for v in from_records(artifact.read(run_dir))]
    return found


def _number(x: float | None) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    return f"{x:.4g}"


def _condition_row(c: Condition) -> dict[str, str]:
    interval = f" [{_number(c.low)}, {_number(c.high)}]" if c.low is not None or c.high is not None else ""
    return {"condition": c.name, "about": c.group or "—", "value": _number(c.value) + interval,
            "threshold": _number(c.threshold), "met": "yes" if c.met else "no"}


def verdict_table(verdicts: list[tuple[str, Verdict]]) -> pd.DataFrame:
    """One row per verdict: claim, statement, paper, ours, outcome, analysis, subject and chapter; each claim's
    pre-registered primary verdict first (an exploratory outcome is in plain type, not bold)."""
    ordered = sorted(verdicts, key=lambda sv: (list(CLAIMS).index(sv[1].claim), sv[1].analysis != "primary"))
    return pd.DataFrame([{"claim": v.claim, "statement": CLAIMS[v.claim], "paper": PAPER[v.claim],
                          "ours": v.summary,
                          "verdict": f"**{v.outcome}**" if v.analysis == "primary" else v.outcome,
                          "analysis": v.analysis, "subject": v.subject, "chapter": stage}
                         for stage, v in ordered],
                        columns=["claim", "statement", "paper", "ours", "verdict", "analysis", "subject", "chapter"])


def untested_claims(verdicts: list[tuple[str, Verdict]]) -> list[str]:
    """The claims no chapter of the run reached a verdict on."""
    tested = {v.claim for _, v in verdicts}
    return [c for c in CLAIMS if c not in tested]


INTRO = ("Each row is generated from the artifacts of this build: the paper's number, ours with its 95% "
         "confidence interval, and the outcome of the chapter's pre-stated rule (*holds*, *does not hold*, "
         "*inconclusive* when the intervals cannot separate the alternatives, or *undefined* when the subject "
         "itself was not decided by the data). Each claim's verdict is its one pre-registered *primary* analysis "
         "(in bold); *exploratory* rows are labelled so and decide nothing. The chapter named in the last "
         "column shows the evidence; below the table, each rule and the conditions it checked.")


def _verdict_sections(verdicts: list[tuple[str, Verdict]], level: int) -> list[str]:
    """The verdict table, then each rule and its conditions, under headings of ``level`` (2 = ``##``)."""
    if not verdicts:
        return ["_No chapter that tests a claim was executed in this build._"]
    parts = [verdict_table(verdicts).to_markdown(index=False), "#" * level + " Rules and conditions"]
    for stage, v in verdicts:
        parts.append("#" * (level + 1) + f" {v.claim}: {v.subject} ({v.analysis}, {stage})")
        parts.append(f"**{v.outcome}.** Rule: {v.rule}")
        if v.conditions:
            parts.append(pd.DataFrame([_condition_row(c) for c in v.conditions]).to_markdown(index=False))
    return parts


def _untested_line(verdicts: list[tuple[str, Verdict]]) -> list[str]:
    untested = untested_claims(verdicts)
    return ["Not tested in this build: " + ", ".join(f"{c} ({CLAIMS[c]})" for c in untested)] if untested else []


def claims_markdown(run_dir: RunDir) -> str:
    """The claims chapter as MyST Markdown."""
    verdicts = collect_verdicts(run_dir)
    parts = ["# Claims: verdicts", INTRO, *_verdict_sections(verdicts, 2), *_untested_line(verdicts)]
    return "\n\n".join(parts) + "\n"


def agreement(outcomes: Mapping[str, str | None]) -> str:
    """Whether the models' primary verdicts on one claim agree, in words (``None``: the model did not test it)."""
    tested = {model: o for model, o in outcomes.items() if o is not None}
    if not tested:
        return "not tested"
    if len(tested) < len(outcomes):
        return "tested only on " + ", ".join(tested)
    if len(tested) == 1:
        return "one model"
    if len(set(tested.values())) == 1:
        return f"the models agree: {next(iter(tested.values()))}"
    return "the models disagree: " + "; ".join(f"{m}: {o}" for m, o in tested.items())


def models_verdict_table(runs: Mapping[str, RunDir]) -> pd.DataFrame:
    """One row per claim: each model's primary verdict with its summary, and whether the models agree."""
    primary = {model: {v.claim: v for _, v in collect_verdicts(run) if v.analysis == "primary"}
               for model, run in runs.items()}
    rows = []
    for claim, statement in CLAIMS.items():
        row = {"claim": claim, "statement": statement, "paper": PAPER[claim]}
        for model, verdicts in primary.items():
            v = verdicts.get(claim)
            row[model] = f"**{v.outcome}**: {v.summary}" if v else "—"
        row["agreement"] = agreement({m: (vs[claim].outcome if claim in vs else None) for m, vs in primary.items()})
        rows.append(row)
    return pd.DataFrame(rows, columns=["claim", "statement", "paper", *runs, "agreement"])


def models_claims_markdown(runs: Mapping[str, RunDir]) -> str:
    """The claims chapter of a run covering several models: one primary verdict per claim per model, whether
    they agree, then each model's full verdict table, rules and conditions."""
    parts = ["# Claims: verdicts",
             "The first table gives, for each claim, each model's pre-registered primary verdict and whether the "
             "models agree (a claim the papers state generally should hold on every model). " + INTRO,
             models_verdict_table(runs).to_markdown(index=False)]
    for model, run in runs.items():
        verdicts = collect_verdicts(run)
        parts += [f"## {model}", *_verdict_sections(verdicts, 3), *_untested_line(verdicts)]
    return "\n\n".join(parts) + "\n"
