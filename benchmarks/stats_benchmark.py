"""Benchmark of the activation-statistics pass, model loading and pruning speed (it reports numbers, asserts nothing).

A command-line wrapper over :mod:`avss_lib.performance.measurements` (the same measurements as the performance appendix,
notebook ``06_performance``), with the parameters of a pipeline profile (default: the published book's):

1. the time of the streamed statistics pass relative to a plain inference-mode forward over the same batches
   (target <= 1.15x), each the best of ``--repeats`` runs;
2. peak RSS of the statistics pass at several multiples of the base calibration tokens (the same batches
   repeated), each in a fresh subprocess so that peak RSS is comparable (target: flat), and the same for the
   naive collection that keeps every layer's hidden states;
3. the model load time from the converted-weights cache relative to the first GGUF load (dequantisation);
4. the forward speed-up of the model without a fraction of its decoder layers against 1 / (1 - k/n).

Usage: ``python benchmarks/stats_benchmark.py [--profile default] [--n-samples N] [--token-multiples 1 4 10]
[--repeats 3] [--prune-ratios 0.25 0.5] [--out FILE]``. The sentences are printed and the results written as
JSON (default ``data/benchmarks/stats_benchmark.json``).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any

from avss_lib.core import io
from avss_lib.performance import measurements as performance
from avss_lib.book.pipeline import (
    REPO_ROOT,
    declared_parameters,
    load_profile,
    notebook_parameters,
)


def profile_parameters(profile: str | os.PathLike[str]) -> dict[str, Any]:
    """Keyword arguments of :func:`avss_lib.performance.measurements.run_benchmark` for a pipeline profile: the performance
    notebook's parameters (its defaults, then the profile's values) and notebook 01's calibration settings."""
    prof, run_dir = load_profile(profile), Path(tempfile.gettempdir())

    def resolved(notebook: str) -> dict[str, Any]:
        defaults = {name: p.default for name, p in declared_parameters(notebook).items()}
        return {**defaults, **notebook_parameters(prof, notebook, run_dir)}

    own, p01 = resolved(performance.SELF_NOTEBOOK), resolved("01_activations")
    meta01 = {"data": {"benchmark": p01["calibration_dataset"], "split": p01["calibration_split"]}, "parameters": p01}
    return {**{k: own[k] for k in performance.BENCHMARK_PARAMETERS}, "meta01": meta01}


def main() -> None:
    """Parse the command line, run :func:`avss_lib.performance.measurements.run_benchmark`, print and write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="default", help="pipeline profile whose parameters to use")
    parser.add_argument("--n-samples", type=int, help="base calibration paragraphs (the 1x token multiple)")
    parser.add_argument("--token-multiples", type=int, nargs="+", help="multiples of the base tokens for the memory test")
    parser.add_argument("--repeats", type=int, help="timed runs of each timing (the best is kept)")
    parser.add_argument("--prune-ratios", type=float, nargs="+", help="fractions of decoder layers removed")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "data" / "benchmarks" / "stats_benchmark.json")
    args = parser.parse_args()
    params = profile_parameters(args.profile)
    overrides = {"n_samples": args.n_samples, "token_multiples": args.token_multiples, "repeats": args.repeats,
                 "prune_ratios": args.prune_ratios}
    params.update({k: v for k, v in overrides.items() if v is not None})
    result = performance.run_benchmark(**params)
    io.write_json(result, args.out)
    for line in performance.summary_lines(result):
        print(line)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
