"""Benchmark of the activation-statistics pass (a benchmark, not a test: it reports numbers, it asserts nothing).

Reports, on the calibration set of a profile (default: the published book's):

1. the time of the streamed statistics pass relative to a plain no-grad forward over the same batches
   (target <= 1.15x), each the best of ``--repeats`` runs;
2. peak memory of the statistics pass on 1x and on ``--scale``x more tokens (the same batches repeated), each
   in a fresh subprocess so that peak RSS is comparable (target: flat);
3. the model load time from the converted-weights cache relative to the first GGUF load (dequantisation).

Usage: ``python benchmarks/stats_benchmark.py [--profile default] [--n-samples N] [--scale 10] [--out FILE]``.
Results are printed as a table and written as JSON (default ``data/benchmarks/stats_benchmark.json``).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from avss_lib import activations, calibration, io, models
from avss_lib.pipeline import REPO_ROOT, load_profile, notebook_parameters


def _setup(profile: str, n_samples: int | None):
    params = notebook_parameters(load_profile(profile), "01_activations", Path(tempfile.gettempdir()))
    if n_samples:
        params["n_samples"] = n_samples
    lm, tok = models.load_model(params["model"], device=params["device"], dtype=params["dtype"])
    texts, _ = calibration.load_calibration_texts(params["calibration_dataset"], params["calibration_split"],
                                                  params["n_samples"], params["seed"], params["data_root"])
    batches = calibration.make_batches(tok, texts, max_length=params["max_length"], batch_size=params["batch_size"],
                                       padding=params["padding"])
    spec = activations.StatsSpec(tuple(params["sites"]), tuple(params["abs_thresholds"]), tuple(params["rel_taus"]))
    return lm, batches, spec, params


def _plain(lm, batches) -> None:
    with torch.inference_mode():
        for b in batches:
            lm(**b, use_cache=False)


def overhead(profile: str, n_samples: int | None, repeats: int) -> dict:
    lm, batches, spec, params = _setup(profile, n_samples)
    _plain(lm, batches[:1])  # warm-up
    plain, stats = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        _plain(lm, batches)
        plain.append(time.perf_counter() - start)
        start = time.perf_counter()
        activations.collect_activation_stats(lm, batches, spec, progress=False)
        stats.append(time.perf_counter() - start)
    tokens = int(sum(int(b["attention_mask"].sum()) for b in batches))
    return {"n_samples": params["n_samples"], "tokens": tokens, "plain_forward_s": min(plain),
            "stats_pass_s": min(stats), "overhead_ratio": min(stats) / min(plain), "threads": torch.get_num_threads()}


def peak_memory_child(profile: str, n_samples: int | None, scale: int) -> None:
    """Run in a subprocess: the statistics pass over the batches repeated ``scale`` times; print peak RSS."""
    lm, batches, spec, _ = _setup(profile, n_samples)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    activations.collect_activation_stats(lm, (b for _ in range(scale) for b in batches), spec, progress=False)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"scale": scale, "peak_rss_mib": after / 1024, "peak_rss_before_pass_mib": before / 1024}))


def peak_memory(profile: str, n_samples: int | None, scale: int) -> list[dict]:
    rows = []
    for s in (1, scale):
        out = subprocess.run([sys.executable, __file__, "--child-scale", str(s), "--profile", profile]
                             + (["--n-samples", str(n_samples)] if n_samples else []),
                             capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    return rows


def load_times(spec: str = models.DEFAULT_MODEL) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        models.load_model(spec, cache_dir=cache)
        first = time.perf_counter() - start
        start = time.perf_counter()
        models.load_model(spec, cache_dir=cache)
        cached = time.perf_counter() - start
    return {"first_gguf_load_s": first, "cached_load_s": cached, "ratio": cached / first}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="default")
    parser.add_argument("--n-samples", type=int, help="override the profile's calibration size")
    parser.add_argument("--scale", type=int, default=10, help="token multiple for the memory test")
    parser.add_argument("--memory-n-samples", type=int, help="calibration size of the memory test (default: --n-samples)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "data" / "benchmarks" / "stats_benchmark.json")
    parser.add_argument("--child-scale", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_scale:
        peak_memory_child(args.profile, args.n_samples, args.child_scale)
        return
    result = {
        "machine": {"cpu_threads": torch.get_num_threads(), "torch": torch.__version__},
        "load": load_times(),
        "overhead": overhead(args.profile, args.n_samples, args.repeats),
        "memory": peak_memory(args.profile, args.memory_n_samples or args.n_samples, args.scale),
    }
    io.write_json(result, args.out)
    o, m, ld = result["overhead"], result["memory"], result["load"]
    print(f"statistics pass / plain forward: {o['overhead_ratio']:.2f}x "
          f"({o['stats_pass_s']:.1f} s vs {o['plain_forward_s']:.1f} s, {o['tokens']:,} tokens; target <= 1.15x)")
    print(f"peak RSS: {m[0]['peak_rss_mib']:.0f} MiB at 1x, {m[1]['peak_rss_mib']:.0f} MiB at {args.scale}x tokens (target: flat)")
    print(f"model load: first (GGUF dequantisation) {ld['first_gguf_load_s']:.1f} s, cached {ld['cached_load_s']:.1f} s "
          f"({ld['ratio']:.2f}x)")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
