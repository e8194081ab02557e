"""Parity benchmark: this book's harness against lm-evaluation-harness on the same examples, written as a record.

Runs :func:`avss_lib.core.lm_eval_parity.run_parity` (lm-evaluation-harness's own task definitions pointed at the
local benchmark files, and this book's harness) with the bundled model on the first ``--n`` examples of SciQ,
TruthfulQA MC1/MC2 and SST-2, and writes ``benchmarks/records/lm_eval_parity.json``: the date, the machine, the
package versions, the per-task table (scores of both, |Δ| in points, per-example agreement, largest
log-likelihood gap) and whether every row meets |Δ| ≤ 0.5 points and log-likelihoods within 1e-3. The record is
committed and shown in the reproducibility appendix (:mod:`avss_lib.book.reproducibility`).

Usage: ``python benchmarks/lm_eval_parity.py [--n 100] [--data-root ../shared/data] [--device cpu]
[--batch-size 8]``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import tempfile
from pathlib import Path


from avss_lib.book.run_record import benchmark_machine
from avss_lib.core.io import write_json
from avss_lib.core.lm_eval_parity import run_parity
from avss_lib.core.models import DEFAULT_MODEL, load_model, model_provenance

RECORD = Path(__file__).resolve().parent / "records" / "lm_eval_parity.json"
PACKAGES = ("lm_eval", "torch", "transformers", "datasets", "numpy", "avss_lib")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100, help="examples per task (first n of each file)")
    parser.add_argument("--data-root", default=os.environ.get("AVSS_DATA_DIR", "../shared/data"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--record", type=Path, default=RECORD)
    args = parser.parse_args()
    started = dt.datetime.now(dt.timezone.utc)
    model, tokenizer = load_model(DEFAULT_MODEL, device=args.device)
    with tempfile.TemporaryDirectory() as folder:
        _, table = run_parity(model, tokenizer, data_root=args.data_root, n=args.n, folder=Path(folder),
                              batch_size=args.batch_size)
    record = {
        "date": started.isoformat(timespec="seconds"), "seconds": (dt.datetime.now(dt.timezone.utc) - started).total_seconds(),
        **benchmark_machine(PACKAGES, args.device), "n": args.n, "model": model_provenance(DEFAULT_MODEL),
        "all_agree": bool(table["agrees"].all()), "table": table.to_dict(orient="records"),
    }
    write_json(record, args.record)
    print(table.to_string(index=False))
    print(f"all agree: {record['all_agree']}; record: {args.record}")


if __name__ == "__main__":
    main()
