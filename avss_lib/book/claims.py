"""The claims-verdict chapter, generated at book-build time from the verdicts the notebooks wrote.

Each chapter that tests a claim writes ``<run_dir>/<notebook>/verdict.json``: a list of rows
``{"claim", "statement", "paper", "ours", "verdict", "detail"}`` where ``verdict`` is one of
:data:`VERDICTS` and ``ours`` is our number with its confidence interval, computed in that notebook's run.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from avss_lib.core.io import atomic_path

VERDICTS = ("holds", "does not hold", "inconclusive")
CLAIMS = {
    "A1": "Removing the lowest-AVSS ~25% of layers keeps > 90% of performance (QA, language modelling, sentiment).",
    "E1": "HSAV and HSS locate hallucination-prone layers.",
    "E2": "Contrastive learning on those layers mitigates hallucination (up to +12% performance, up to −34% ECE).",
}


def write_verdicts(rows: Iterable[Mapping[str, Any]], path: str | Path) -> None:
    """Validate and write a notebook's verdict rows (atomically)."""
    rows = [dict(r) for r in rows]
    for row in rows:
        missing = {"claim", "paper", "ours", "verdict", "detail"} - set(row)
        if missing or row["verdict"] not in VERDICTS or row["claim"] not in CLAIMS:
            raise ValueError(f"bad verdict row {row}: needs claim in {list(CLAIMS)}, verdict in {VERDICTS}, "
                             f"and the keys paper, ours, detail (missing {sorted(missing)})")
        row.setdefault("statement", CLAIMS[row["claim"]])
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(rows, indent=2) + "\n")


def collect_verdicts(run_dir: str | Path) -> pd.DataFrame:
    """All verdict rows of a run, one per claim and measurement, with the notebook that produced each."""
    rows = []
    for path in sorted(Path(run_dir).glob("*/verdict.json")):
        for row in json.loads(path.read_text()):
            rows.append({"notebook": path.parent.name, **row})
    return pd.DataFrame(rows, columns=["claim", "statement", "paper", "ours", "verdict", "detail", "notebook"])


def claims_markdown(run_dir: str | Path) -> str:
    """The claims-verdict chapter as MyST Markdown."""
    verdicts = collect_verdicts(run_dir)
    parts = [
        "# Claims: verdicts",
        "Each row is generated from the artifacts of this build: the paper's number, ours with its 95% "
        "confidence interval, and the verdict the chapter's pre-stated rule gives (*holds*, *does not hold*, or "
        "*inconclusive* when the intervals cannot separate the alternatives). The chapter named in the last "
        "column shows the evidence.",
    ]
    if verdicts.empty:
        parts.append("_No chapter that tests a claim was executed in this build._")
    else:
        table = verdicts.assign(verdict=verdicts["verdict"].map(lambda v: f"**{v}**"))
        parts.append(table[["claim", "statement", "paper", "ours", "verdict", "notebook"]].to_markdown(index=False))
        parts.append("## Details")
        parts.extend(f"* **{r.claim}** ({r.notebook}): {r.detail}" for r in verdicts.itertuples())
    untested = [c for c in CLAIMS if c not in set(verdicts["claim"])]
    if untested:
        parts.append("Not tested in this build: " + ", ".join(f"{c} ({CLAIMS[c]})" for c in untested))
    return "\n\n".join(parts) + "\n"
