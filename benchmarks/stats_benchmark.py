"""Benchmark of the activation-statistics pass, model loading and pruning speed (it reports numbers, asserts nothing).

A command-line wrapper over :func:`avss_lib.performance.stage.run_performance` (the measurements of the performance
appendix, notebook ``06_performance``), with the parameters of a pipeline profile (default: the published book's):

1. the time of the streamed statistics pass relative to a plain inference-mode forward over the same batches
   (target <= 1.15x), each the best of ``--repeats`` runs;
2. peak RSS of the statistics pass at several multiples of the base calibration tokens (the same batches
   repeated), each in a fresh subprocess so that peak RSS is comparable (target: flat), and the same for the
   naive collection that keeps every layer's hidden states;
3. the model load time from the converted-weights cache relative to the first GGUF load (dequantisation);
4. the forward speed-up of the model without a fraction of its decoder layers against 1 / (1 - k/n).

Usage: ``python benchmarks/stats_benchmark.py [--profile default] [--n-samples N] [--token-multiples 1 4 10]
[--repeats 3] [--prune-ratios 0.25 0.5] [--run-dir DIR]``. The artifacts of stage 06 are written to
``DIR/06_performance/`` (default ``data/benchmarks/stats_benchmark/``) and the numbers the appendix's prose
pastes are printed, one ``key: value`` per line.
"""

from __future__ import annotations

import argparse
import inspect
import os
import tempfile
from pathlib import Path
from typing import Any

from avss_lib.book.pipeline import REPO_ROOT, declared_parameters, load_profile, notebook_parameters
from avss_lib.performance.stage import run_performance
from avss_lib.performance.wall_times import SELF_NOTEBOOK


def profile_calibration(p01: dict[str, Any]) -> dict[str, Any]:
    """The part of chapter 01's calibration record the appendix reads, from chapter 01's parameters."""
    return {"benchmark": p01["calibration_dataset"], "split": p01["calibration_split"], "padding": p01["padding"],
            "statistics": {"sites": p01["sites"], "abs_thresholds": p01["abs_thresholds"],
                           "rel_taus": p01["rel_taus"]}}


def profile_parameters(profile: str | os.PathLike[str]) -> dict[str, Any]:
    """Keyword arguments of :func:`~avss_lib.performance.stage.run_performance` for a pipeline profile: the
    performance notebook's parameters (its defaults, then the profile's values) and chapter 01's calibration."""
    prof, run_dir = load_profile(profile), Path(tempfile.gettempdir())

    def resolved(notebook: str) -> dict[str, Any]:
        defaults = {name: p.default for name, p in declared_parameters(notebook).items()}
        return {**defaults, **notebook_parameters(prof, notebook, run_dir)}

    accepted = set(inspect.signature(run_performance).parameters) - {"run_dir", "calibration", "progress"}
    own = resolved(SELF_NOTEBOOK)
    return {**{k: v for k, v in own.items() if k in accepted},
            "calibration": profile_calibration(resolved("01_activations"))}


def main() -> None:
    """Parse the command line, run the measurements, print the numbers."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="default", help="pipeline profile whose parameters to use")
    parser.add_argument("--n-samples", type=int, help="base calibration paragraphs (the 1x token multiple)")
    parser.add_argument("--token-multiples", type=int, nargs="+", help="multiples of the base tokens for the memory test")
    parser.add_argument("--repeats", type=int, help="timed runs of each timing (the best is kept)")
    parser.add_argument("--prune-ratios", type=float, nargs="+", help="fractions of decoder layers removed")
    parser.add_argument("--run-dir", type=Path, default=REPO_ROOT / "data" / "benchmarks" / "stats_benchmark",
                        help="run folder whose 06_performance/ receives the artifacts")
    args = parser.parse_args()
    params = profile_parameters(args.profile)
    overrides = {"n_samples": args.n_samples, "token_multiples": args.token_multiples, "repeats": args.repeats,
                 "prune_ratios": args.prune_ratios}
    params.update({k: v for k, v in overrides.items() if v is not None})
    result = run_performance(args.run_dir, **params)
    for key, value in result.glue().items():
        print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
    print(f"artifacts written to {args.run_dir / SELF_NOTEBOOK}")


if __name__ == "__main__":
    main()
