"""The committed record of ``benchmarks/harness_peer.py`` (this harness against lm-evaluation-harness's Hugging Face
backend on the same requests), read for the performance appendix.

The benchmark takes minutes of both harnesses, so the book shows its committed record, with the date, machine,
commit and versions it ran with, instead of re-running it in every build.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from avss_lib.core.io import read_json

PEER_RECORD = Path(__file__).resolve().parents[2] / "benchmarks" / "records" / "harness_peer.json"
KINDS = {"loglikelihood": "log-likelihood (SciQ, TruthfulQA MC1/MC2)", "generation": "generation (NQ-open, 5-shot)",
         "total": "both"}


def peer_record(path: Path = PEER_RECORD) -> dict[str, Any] | None:
    """The record, or None when none is committed."""
    return read_json(path) if path.is_file() else None


def peer_frame(record: dict[str, Any] | None) -> pd.DataFrame:
    """Per request kind: how many, each harness's seconds, lm-eval ÷ ours, and whether the results agree."""
    if record is None:
        return pd.DataFrame([{"requests": "no record committed: run `python benchmarks/harness_peer.py`"}])
    rows = []
    for kind, label in KINDS.items():
        r = record[kind]
        agree = {"loglikelihood": f"greedy flags {r.get('same_greedy', 0):.0%}, chosen answers "
                                  f"{r.get('same_choice', 0):.0%}, max |Δ log-lik| {r.get('max_loglik_gap', 0):.1e}",
                 "generation": f"same text {r.get('same_text', 0):.0%}",
                 "total": "identical" if record["identical"] else "not identical"}[kind]
        rows.append({"requests": label, "n": r.get("requests", r.get("prompts", "")), "ours (s)": r["ours_s"],
                     "lm-eval (s)": r["lm_eval_s"], "lm-eval ÷ ours": r["speedup"], "agreement": agree})
    return pd.DataFrame(rows)


def peer_glue(record: dict[str, Any] | None) -> dict[str, str]:
    """The record's provenance and overall ratio, as the phrases the appendix pastes (``n/a`` without a record)."""
    if record is None:
        return dict.fromkeys(("peer_date", "peer_machine", "peer_commit", "peer_lm_eval", "peer_threads", "peer_n",
                              "peer_speedup"), "n/a")
    return {"peer_date": record["date"], "peer_machine": record["machine"]["platform"],
            "peer_commit": (record.get("commit") or "unknown")[:7], "peer_lm_eval": record["versions"]["lm_eval"],
            "peer_threads": str(record["machine"]["torch_threads"]), "peer_n": str(record["n"]),
            "peer_speedup": f"{record['total']['speedup']:.2f}"}
