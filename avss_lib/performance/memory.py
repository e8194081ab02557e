"""Peak memory of the statistics pass against the number of calibration tokens, each run in a fresh process.

:func:`measure_memory` runs the streaming pass and the naive collection
(:func:`~avss_lib.performance.overhead.naive_hidden_state_stats`) at several multiples of the base batches (the
batches repeated), each in a fresh ``python -m avss_lib.performance.memory memory-child`` process
(:func:`memory_child`, which prints one JSON line read by :func:`parse_child_output`), so that the peaks are
comparable. :func:`memory_flatness` decides whether the streaming peak is flat in the number of tokens and
:func:`naive_comparison` sets the naive collection against it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from tqdm import tqdm

from avss_lib.core import activation_stats as activations
from avss_lib.core import models
from avss_lib.core.errors import AvssError, ConfigError, DataError
from avss_lib.performance.calibration_set import repeat_batches, token_counts
from avss_lib.performance.overhead import naive_hidden_state_stats, plain_forward
from avss_lib.performance.parameter_checks import check_positive_int, check_token_multiples

#: The streaming peak RSS counts as flat when it grows by at most this fraction of its smallest value ...
FLAT_TOLERANCE = 0.05
#: ... or by at most this many MiB (allocator noise on a small process).
FLAT_TOLERANCE_MIB = 64.0
#: The naive collection is skipped at a multiple whose kept hidden states would exceed this many MiB.
NAIVE_LIMIT_MIB = 4096.0
#: Identifies the JSON line a memory child prints (and its version).
CHILD_PROTOCOL = "avss-performance-memory/1"
COLLECTORS = ("streaming", "naive")
#: The module a memory child runs as (``python -m CHILD_MODULE memory-child ...``).
CHILD_MODULE = "avss_lib.performance.memory"
MIB = 1024.0 * 1024.0


class MemoryChildFailed(AvssError):
    """A memory-measurement subprocess exited with an error or printed no result; the message quotes its stderr."""


# --------------------------------------------------------------------------------------------- the child


def _rss_fields() -> dict[str, float]:
    """Current and peak resident set size in MiB from ``/proc/self/status`` (empty off Linux)."""
    fields: dict[str, float] = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = float(value.split()[0]) / 1024.0
    except OSError:
        pass
    return fields


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS; False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def memory_child(*, model_spec: str, batches_file: str | os.PathLike[str], multiple: int, collector: str,
                 spec: activations.StatsSpec, device: str = "cpu", dtype: str = "float32") -> dict[str, Any]:
    """What a memory subprocess does: load the model and batches, warm up, reset the peak RSS, run one pass.

    ``collector`` is 'streaming' (:func:`~avss_lib.core.activation_stats.collect_activation_stats` with ``spec``)
    or 'naive' (:func:`~avss_lib.performance.overhead.naive_hidden_state_stats`); the base batches in
    ``batches_file`` (``torch.save`` of a list of dicts) are repeated ``multiple`` times. One untimed plain
    forward on the first batch comes first (it pages the weights in and initialises the kernels). The peak is
    the kernel's VmHWM after a reset just before the pass (the peak *during* the pass, model included); without a
    resettable VmHWM it is the lifetime ``ru_maxrss``.
    """
    if collector not in COLLECTORS:
        raise ConfigError(f"unknown collector {collector!r}: choose one of {', '.join(COLLECTORS)}")
    multiple = check_positive_int("token multiple", multiple)
    start = time.perf_counter()
    model, _ = models.load_model(model_spec, device=device, dtype=dtype)
    load_s = time.perf_counter() - start
    batches = torch.load(batches_file, weights_only=True)
    tokens, positions = token_counts(batches)
    plain_forward(model, batches[:1])  # warm-up: pages the weights in, initialises the kernels
    gc.collect()
    reset = _reset_peak_rss()
    before = _rss_fields()
    start = time.perf_counter()
    if collector == "streaming":
        activations.collect_activation_stats(model, repeat_batches(batches, multiple), spec, progress=False)
    else:
        naive_hidden_state_stats(model, repeat_batches(batches, multiple))
    seconds = time.perf_counter() - start
    after = _rss_fields()
    lifetime = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    hwm = reset and "VmHWM" in after
    return {"protocol": CHILD_PROTOCOL, "collector": collector, "multiple": multiple,
            "n_batches": len(batches) * multiple, "tokens": tokens * multiple, "positions": positions * multiple,
            "seconds": seconds, "load_s": load_s, "peak_rss_mib": after["VmHWM"] if hwm else lifetime,
            "rss_before_pass_mib": before.get("VmRSS", float("nan")), "lifetime_peak_rss_mib": lifetime,
            "peak_method": "VmHWM reset before the pass" if hwm else "ru_maxrss (lifetime)",
            "torch_threads": torch.get_num_threads()}


def child_command(*, model_spec: str, batches_file: str | os.PathLike[str], multiple: int, collector: str,
                  spec: activations.StatsSpec, device: str = "cpu", dtype: str = "float32") -> list[str]:
    """The command line of one memory child (read back by :func:`main`)."""
    return [sys.executable, "-m", CHILD_MODULE, "memory-child", "--model", model_spec,
            "--batches", str(batches_file), "--multiple", str(multiple), "--collector", collector,
            "--device", device, "--dtype", dtype, "--sites", *spec.sites,
            "--abs-thresholds", *map(repr, spec.abs_thresholds), "--rel-taus", *map(repr, spec.rel_taus)]


def parse_child_output(stdout: str) -> dict[str, Any]:
    """The result record of a memory child: the last stdout line that is JSON with :data:`CHILD_PROTOCOL`."""
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and record.get("protocol") == CHILD_PROTOCOL:
                return record
    raise MemoryChildFailed(f"the memory child printed no {CHILD_PROTOCOL} JSON line; its stdout ended with: "
                            f"{stdout.strip()[-500:]!r}")


def run_memory_child(*, model_spec: str, batches_file: str | os.PathLike[str], multiple: int, collector: str,
                     spec: activations.StatsSpec, device: str = "cpu", dtype: str = "float32",
                     timeout: float | None = None) -> dict[str, Any]:
    """Run :func:`memory_child` in a fresh process (:func:`child_command`); return its record."""
    cmd = child_command(model_spec=model_spec, batches_file=batches_file, multiple=multiple, collector=collector,
                        spec=spec, device=device, dtype=dtype)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise MemoryChildFailed(f"memory child ({collector}, {multiple}x) exited with {proc.returncode}: "
                                f"{proc.stderr.strip()[-1500:]}")
    return parse_child_output(proc.stdout)


# --------------------------------------------------------------------------------------------- the parent


def naive_estimate_mib(positions: int, n_layers: int, hidden: int, bytes_per_value: int = 4) -> float:
    """MiB of the hidden states the naive collection keeps: ``positions × n_layers × hidden × bytes``."""
    return positions * n_layers * hidden * bytes_per_value / MIB


def bytes_per_value(dtype: str) -> int:
    """Bytes of one activation value in ``dtype`` (e.g. 4 for 'float32')."""
    return torch.finfo(models.DTYPES[dtype]).bits // 8


def measure_memory(model_spec: str, batches: Sequence[Mapping[str, Tensor]], multiples: Sequence[int],
                   spec: activations.StatsSpec, *, n_layers: int, hidden: int, device: str = "cpu",
                   dtype: str = "float32", collectors: Sequence[str] = COLLECTORS,
                   naive_limit_mib: float = NAIVE_LIMIT_MIB, progress: bool = True) -> pd.DataFrame:
    """Peak RSS and time of each collector at each token multiple, each in a fresh subprocess.

    The base ``batches`` are saved once to a temporary file that every child reads. The naive collection is
    skipped (``status`` 'skipped: ...') at a multiple whose kept hidden states (:func:`naive_estimate_mib`)
    would exceed ``naive_limit_mib``. One row per (collector, multiple), multiples ascending.
    """
    multiples = check_token_multiples(multiples)
    unknown = [c for c in collectors if c not in COLLECTORS]
    if unknown or not collectors:
        raise ConfigError(f"unknown collector(s) {unknown or '(none given)'}: choose from {', '.join(COLLECTORS)}")
    tokens, positions = token_counts(batches)
    width = bytes_per_value(dtype)
    jobs = [(c, m) for m in multiples for c in collectors]
    rows = []
    with tempfile.TemporaryDirectory(prefix="avss_perf_") as tmp:
        batches_file = Path(tmp) / "batches.pt"
        torch.save([dict(b.items()) for b in batches], batches_file)
        for collector, m in tqdm(jobs, desc="memory subprocesses", disable=not progress):
            estimate = naive_estimate_mib(positions * m, n_layers, hidden, width)
            if collector == "naive" and estimate > naive_limit_mib:
                rows.append({"collector": collector, "multiple": m, "tokens": tokens * m, "positions": positions * m,
                             "status": f"skipped: kept hidden states ~{estimate:,.0f} MiB > {naive_limit_mib:,.0f} MiB",
                             "naive_estimate_mib": estimate})
                continue
            record = run_memory_child(model_spec=model_spec, batches_file=batches_file, multiple=m,
                                      collector=collector, spec=spec, device=device, dtype=dtype)
            rows.append({**record, "status": "measured", "naive_estimate_mib": estimate})
    frame = pd.DataFrame(rows)
    frame["pass_increase_mib"] = frame.get("peak_rss_mib", np.nan) - frame.get("rss_before_pass_mib", np.nan)
    return frame.drop(columns=["protocol"], errors="ignore")


def measured(memory: pd.DataFrame, collector: str) -> pd.DataFrame:
    """The measured (not skipped) rows of one collector, multiples ascending."""
    d = memory[(memory["collector"] == collector) & (memory["status"] == "measured")]
    return d.sort_values("multiple")


def memory_flatness(memory: pd.DataFrame) -> dict[str, Any]:
    """How much the streaming pass's peak RSS grew from the smallest to the largest measured token multiple.

    It is flat when the growth is at most the tolerance, the larger of :data:`FLAT_TOLERANCE` of the smallest
    peak and :data:`FLAT_TOLERANCE_MIB`. ``tested`` is False when only one multiple was measured.
    """
    d = measured(memory, "streaming")
    if d.empty:
        raise DataError("no measured streaming rows in the memory table: run measure_memory with 'streaming'")
    first, last = d.iloc[0], d.iloc[-1]
    growth = float(last["peak_rss_mib"] - first["peak_rss_mib"])
    tolerance = max(FLAT_TOLERANCE * float(first["peak_rss_mib"]), FLAT_TOLERANCE_MIB)
    return {"multiple_low": int(first["multiple"]), "multiple_high": int(last["multiple"]),
            "tokens_low": int(first["tokens"]), "tokens_high": int(last["tokens"]),
            "peak_low_mib": float(first["peak_rss_mib"]), "peak_high_mib": float(last["peak_rss_mib"]),
            "growth_mib": growth, "tolerance_mib": tolerance, "tested": len(d) > 1, "flat": bool(growth <= tolerance)}


def naive_comparison(memory: pd.DataFrame, *, n_layers: int, hidden: int, bytes_per_value: int = 4) -> dict[str, Any] | None:
    """The naive collection against the streaming pass at the largest multiple both measured (None if none).

    With two or more such multiples it also gives the naive peak's growth per 1,000 positions from the smallest
    to the largest (``growth_per_1000_mib``) next to what the kept hidden states alone take
    (``expected_per_1000_mib``, :func:`naive_estimate_mib` of 1,000 positions); both None with one multiple.
    """
    s, n = measured(memory, "streaming").set_index("multiple"), measured(memory, "naive").set_index("multiple")
    common = sorted(set(s.index) & set(n.index))
    if not common:
        return None
    lo, hi = common[0], common[-1]
    result = {"multiple": int(hi), "tokens": int(s.loc[hi, "tokens"]),
              "naive_peak_mib": float(n.loc[hi, "peak_rss_mib"]), "streaming_peak_mib": float(s.loc[hi, "peak_rss_mib"]),
              "memory_ratio": float(n.loc[hi, "peak_rss_mib"] / s.loc[hi, "peak_rss_mib"]),
              "naive_seconds": float(n.loc[hi, "seconds"]), "streaming_seconds": float(s.loc[hi, "seconds"]),
              "multiple_low": int(lo), "growth_per_1000_mib": None, "expected_per_1000_mib": None,
              "n_layers": n_layers, "hidden": hidden, "bytes_per_value": bytes_per_value}
    if hi != lo:
        grown = n.loc[hi, "peak_rss_mib"] - n.loc[lo, "peak_rss_mib"]
        result["growth_per_1000_mib"] = float(grown / (n.loc[hi, "positions"] - n.loc[lo, "positions"]) * 1000)
        result["expected_per_1000_mib"] = naive_estimate_mib(1000, n_layers, hidden, bytes_per_value)
    return result


def memory_display(memory: pd.DataFrame) -> pd.DataFrame:
    """The memory table with one row per multiple and the two collectors side by side."""
    labels = {"peak_rss_mib": "peak RSS (MiB)", "pass_increase_mib": "increase in the pass (MiB)", "seconds": "seconds"}
    wide = memory.set_index(["multiple", "tokens", "positions", "collector"])[[c for c in labels if c in memory]]
    wide = wide.unstack("collector")
    order = [(name, collector) for name in labels for collector in COLLECTORS if (name, collector) in wide.columns]
    wide = wide[order]
    wide.columns = [f"{collector}: {labels[name]}" for name, collector in order]
    return wide.reset_index()


# --------------------------------------------------------------------------------------------- entry point


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m avss_lib.performance.memory memory-child ...``: one memory measurement, printed as one JSON line."""
    parser = argparse.ArgumentParser(prog=f"python -m {CHILD_MODULE}", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    child = sub.add_parser("memory-child", help="one collection pass in this process; prints one JSON line")
    child.add_argument("--model", required=True)
    child.add_argument("--batches", required=True, help="torch.save file of the base batches")
    child.add_argument("--multiple", type=int, required=True)
    child.add_argument("--collector", choices=COLLECTORS, required=True)
    child.add_argument("--device", default="cpu")
    child.add_argument("--dtype", default="float32")
    child.add_argument("--sites", nargs="+", default=list(activations.SITES))
    child.add_argument("--abs-thresholds", nargs="+", type=float, default=list(activations.StatsSpec().abs_thresholds))
    child.add_argument("--rel-taus", nargs="+", type=float, default=list(activations.StatsSpec().rel_taus))
    args = parser.parse_args(argv)
    spec = activations.StatsSpec(tuple(args.sites), tuple(args.abs_thresholds), tuple(args.rel_taus))
    record = memory_child(model_spec=args.model, batches_file=args.batches, multiple=args.multiple,
                          collector=args.collector, spec=spec, device=args.device, dtype=args.dtype)
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
