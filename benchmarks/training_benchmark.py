"""Speed benchmark of chapter 05's fine-tuning: each prompt run once for all of its answers against one full
sequence per answer.

Both train the same layers from the same weights on the same batches, for ``--steps`` optimiser steps of
:func:`avss_lib.mitigation.training.train` (forward, backward, clipping, AdamW), in one process and in the order
A B B A (plain, shared, shared, plain) so that drift in the machine's load falls on both alike. The training
examples and the EAVSS arm's layers (its first seed) are read from a run folder that has run chapter 05
(``05_mitigation/train_examples.parquet`` and ``arms.csv``). It checks that both give the same per-step losses
(within ``--tolerance``) and writes ``benchmarks/records/training_step.json`` (``--record`` names another): date, commit, machine, versions, the
seconds of each (mean of its two passes), the speed-up and the largest loss difference.

Usage: ``python benchmarks/training_benchmark.py [--run-dir data/runs/default] [--steps 20] [--batch-size 4]
[--max-length 128] [--max-negatives 2] [--threads 2]`` (the default profile's sizes; ``full`` uses 8, 512 and 4).
"""

from __future__ import annotations

import argparse
import datetime as dt
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from avss_lib.book.run_record import benchmark_machine
from avss_lib.core.artifacts import ARMS, TRAIN_EXAMPLES
from avss_lib.core.errors import DataError
from avss_lib.core.io import write_json
from avss_lib.core.models import DEFAULT_MODEL, load_model, model_provenance
from avss_lib.mitigation.training import TrainConfig, train
from avss_lib.mitigation.training_data import to_examples

RECORD = Path(__file__).resolve().parent / "records" / "training_step.json"
PACKAGES = ("torch", "transformers")


def eavss_layers(run_dir: Path) -> tuple[int, ...]:
    """The layers the run's EAVSS arm trained (its first seed), from its ``arms.csv``."""
    arms = ARMS.read(run_dir)
    rows = arms[arms["arm"] == "eavss"].sort_values("seed")
    if rows.empty:
        raise DataError(f"{ARMS.path(run_dir)} has no eavss run: run chapter 05 with the eavss arm first")
    return tuple(int(i) for i in rows.iloc[0]["layers"])


def main() -> None:
    """Parse the command line, time both ways of scoring, write and print the record."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, default=Path("data/runs/default"), help="a run that ran chapter 05")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128, help="tokens per (prompt, answer) pair")
    parser.add_argument("--max-negatives", type=int, default=2, help="negatives per question (the first ones)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="largest per-step loss difference allowed")
    parser.add_argument("--record", type=Path, default=RECORD)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = dt.datetime.now(dt.timezone.utc)
    examples = [replace(e, negatives=e.negatives[:args.max_negatives])
                for e in to_examples(TRAIN_EXAMPLES.read(args.run_dir))]
    layers = eavss_layers(args.run_dir)
    model, tokenizer = load_model(DEFAULT_MODEL, device="cpu", dtype="float32")
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def run(share: bool) -> tuple[np.ndarray, float]:
        model.load_state_dict(base)
        config = TrainConfig(layers=layers, steps=args.steps, batch_size=args.batch_size, lr=2e-5,
                             max_length=args.max_length, checkpoint_every=args.steps, share_prompts=share)
        start = time.perf_counter()
        log = train(model, tokenizer, examples, config, dataset="training_benchmark", progress=False).log
        return log["loss"].to_numpy(), time.perf_counter() - start

    seconds: dict[bool, list[float]] = {False: [], True: []}
    losses: dict[bool, np.ndarray] = {}
    for share in (False, True, True, False):
        losses[share], took = run(share)
        seconds[share].append(took)
    plain_s, shared_s = float(np.mean(seconds[False])), float(np.mean(seconds[True]))
    difference = float(np.max(np.abs(losses[True] - losses[False])))
    record = {"date": started.isoformat(timespec="seconds"), **benchmark_machine(PACKAGES),
              "model": model_provenance(DEFAULT_MODEL), "run_dir": str(args.run_dir), "layers": list(layers),
              "examples": len(examples), "steps": args.steps, "batch_size": args.batch_size,
              "max_length": args.max_length, "max_negatives": args.max_negatives,
              "plain_s": plain_s, "shared_s": shared_s, "speedup": plain_s / shared_s,
              "max_loss_difference": difference, "identical": difference <= args.tolerance}
    write_json(record, args.record)
    print(f"{args.steps} steps: one sequence per answer {plain_s:.1f} s, shared prompts {shared_s:.1f} s, "
          f"speed-up {plain_s / shared_s:.2f}x; largest per-step loss difference {difference:.2e}; record: {args.record}")
    if difference > args.tolerance:
        raise SystemExit(f"the per-step losses differ by {difference:.2e} > {args.tolerance}: shared scoring is wrong")


if __name__ == "__main__":
    main()
