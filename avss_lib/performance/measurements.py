"""Performance measurements of the study's machinery: the statistics pass, its memory, model loading, pruning.

Everything here is measured on the machine that runs it; nothing is a stored result. The measurements:

1. :func:`measure_overhead` — the streamed statistics pass (:func:`~avss_lib.core.activation_stats.collect_activation_stats`)
   against a plain ``torch.inference_mode()`` forward over the same padded batches, best of ``repeats`` each
   (target :data:`OVERHEAD_TARGET`);
2. :func:`measure_memory` — peak RSS of the streaming pass and of the naive collection
   (:func:`naive_hidden_state_stats`: ``output_hidden_states=True``, every layer's hidden states kept for all
   tokens, variances computed at the end) at several multiples of a base batch set (the batches repeated), each
   in a fresh subprocess (``python -m avss_lib.performance.measurements memory-child``, which prints one JSON line, see
   :func:`memory_child`) so the peaks are comparable; the streaming peak should be flat in the number of tokens;
3. :func:`measure_load_times` — the first load of a GGUF model (dequantisation into an empty cache) against a
   load from the converted-weights cache;
4. :func:`measure_pruning_speedups` — forward time of the model without ``k = round(r · n)`` decoder layers
   against the unpruned one, best of ``repeats``, next to the theoretical ``1 / (1 − k/n)``;
5. :func:`notebook_wall_times` — wall time and peak RSS of each notebook of a run, from its ``_done.json``.

The ``*_sentence`` functions turn each result into one sentence that compares it with its target, and the
``*_figure`` functions draw it. :func:`run_benchmark` runs all of it for ``benchmarks/stats_benchmark.py``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import operator
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from torch import Tensor, nn
from tqdm import tqdm

from avss_lib.core import activation_stats as activations
from avss_lib.core import calibration_text as calibration
from avss_lib.core import models
from avss_lib.core.errors import AvssError, ConfigError, DataError
from avss_lib.core.layers import find_layers

#: Target of the statistics pass's time relative to a plain forward over the same batches.
OVERHEAD_TARGET = 1.15
#: The streaming peak RSS counts as flat when it grows by at most this fraction of its smallest value ...
FLAT_TOLERANCE = 0.05
#: ... or by at most this many MiB (allocator noise on a small process).
FLAT_TOLERANCE_MIB = 64.0
#: The naive collection is skipped at a multiple whose kept hidden states would exceed this many MiB.
NAIVE_LIMIT_MIB = 4096.0
#: Identifies the JSON line a memory child prints (and its version).
CHILD_PROTOCOL = "avss-performance-memory/1"
COLLECTORS = ("streaming", "naive")
#: This notebook's folder; left out of the wall-time table (its record is written after it finishes).
SELF_NOTEBOOK = "06_performance"
_MIB = 1024.0 * 1024.0


class MemoryChildFailed(AvssError):
    """A memory-measurement subprocess exited with an error or printed no result; the message quotes its stderr."""


# --------------------------------------------------------------------------------------------- text helpers


def _count(n: int, word: str, plural: str | None = None) -> str:
    """``n`` and ``word`` in the singular or plural, e.g. '1 batch', '3 batches'."""
    return f"{n:,} {word if n == 1 else plural or word + 's'}"


def _span(low: float, high: float, fmt: str) -> str:
    """``low–high`` formatted with ``fmt``, or one value when both format alike."""
    a, b = fmt.format(low), fmt.format(high)
    return a if a == b else f"{a}–{b}"


# --------------------------------------------------------------------------------------------- input checks


def check_positive_int(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an int after checking it is an integer (not a bool) of at least ``minimum``."""
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    try:
        number = operator.index(value)
    except TypeError as exc:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}") from exc
    if number < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {number}")
    return number


def _checked_list(name: str, values: Any, what: str, example: str, check_item: Callable[[Any], None]) -> list[Any]:
    """``values`` as a non-empty list (not a string) of items that pass ``check_item`` and are not repeated."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise ConfigError(f"{name} must be a list of {what}, e.g. {example}; got {values!r}")
    items = list(values)
    if not items:
        raise ConfigError(f"{name} is empty: give at least one, e.g. {example}")
    for item in items:
        check_item(item)
    if len(set(items)) != len(items):
        raise ConfigError(f"{name} {items} repeat a value: list each once")
    return items


def _check_multiple(m: Any) -> None:
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1:
        raise ConfigError(f"token multiple {m!r} is not an integer >= 1: each multiple repeats the base batches "
                          "that many times, e.g. [1, 4, 10]")


def _check_ratio(r: Any) -> None:
    if isinstance(r, bool) or not isinstance(r, (int, float, np.number)) or not 0 < r < 1:
        raise ConfigError(f"ratio {r!r} is outside (0, 1): give the fraction of decoder layers to remove, e.g. 0.25")


def check_token_multiples(multiples: Sequence[int]) -> list[int]:
    """Sorted, unique token multiples after checking each is an integer >= 1 (1 = the base batches once)."""
    values = _checked_list("token_multiples", multiples, "integers >= 1", "[1, 4, 10]", _check_multiple)
    return sorted(int(m) for m in values)


def check_ratios(ratios: Sequence[float]) -> list[float]:
    """Sorted, unique removal ratios after checking each is a number in the open interval (0, 1)."""
    values = _checked_list("prune_ratios", ratios, "fractions of layers to remove in (0, 1)", "[0.25, 0.5]",
                           _check_ratio)
    return sorted(float(r) for r in values)


def theoretical_speedup(ratio: float) -> float:
    """Speed-up ``1 / (1 − ratio)`` if forward time were proportional to the number of decoder layers kept."""
    check_ratios([ratio])
    return 1.0 / (1.0 - ratio)


# --------------------------------------------------------------------------------------------- calibration


def calibration_settings(meta01: Mapping[str, Any] | None) -> dict[str, Any]:
    """Data set, split, padding and statistics spec of notebook 01 (from its ``meta.json``), or the defaults.

    Returns a dict with ``dataset``, ``split``, ``padding`` and ``spec`` (a :class:`~avss_lib.core.activation_stats.StatsSpec`)
    and ``source`` ('01_activations/meta.json' or 'defaults').
    """
    if not meta01:
        return {"dataset": "wikitext2", "split": "test", "padding": "max_length", "spec": activations.StatsSpec(),
                "source": "defaults"}
    data, params = meta01.get("data", {}), meta01.get("parameters", {})
    default = activations.StatsSpec()
    spec = activations.StatsSpec(tuple(params.get("sites", default.sites)),
                                 tuple(params.get("abs_thresholds", default.abs_thresholds)),
                                 tuple(params.get("rel_taus", default.rel_taus)))
    return {"dataset": data.get("benchmark", "wikitext2"), "split": data.get("split", "test"),
            "padding": params.get("padding", "max_length"), "spec": spec, "source": "01_activations/meta.json"}


def base_batches(tokenizer: Any, *, data_root: str | None, n_samples: int, seed: int, max_length: int,
                 batch_size: int, dataset: str = "wikitext2", split: str = "test",
                 padding: str = "max_length") -> tuple[list[dict[str, Tensor]], dict[str, Any]]:
    """The base calibration batches (``n_samples`` seeded paragraphs, padded) and their provenance."""
    check_positive_int("n_samples", n_samples)
    texts, provenance = calibration.load_calibration_texts(dataset, split, n_samples, seed, data_root)
    batches = calibration.make_batches(tokenizer, texts, max_length=max_length, batch_size=batch_size, padding=padding)
    return batches, provenance


def token_counts(batches: Sequence[Mapping[str, Tensor]]) -> tuple[int, int]:
    """(non-padding tokens, all positions including padding) of ``batches``."""
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    positions = sum(int(b["attention_mask"].numel()) for b in batches)
    return tokens, positions


def repeat_batches(batches: Sequence[Mapping[str, Tensor]], multiple: int) -> Iterator[Mapping[str, Tensor]]:
    """The batches ``multiple`` times in a row (the same tensor objects: no extra memory)."""
    for _ in range(check_positive_int("token multiple", multiple)):
        yield from batches


# --------------------------------------------------------------------------------------------- collectors


def plain_forward(model: nn.Module, batches: Iterable[Mapping[str, Tensor]]) -> None:
    """A plain ``torch.inference_mode()`` forward over ``batches`` (no hooks, no KV cache), results discarded."""
    device = next(model.parameters()).device
    with torch.inference_mode():
        for b in batches:
            model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device), use_cache=False)
    models.synchronize(model)


def naive_hidden_state_stats(model: nn.Module, batches: Iterable[Mapping[str, Tensor]], *,
                             progress: bool = False, total: int | None = None) -> pd.DataFrame:
    """The block-output variances computed the naive way: keep every layer's hidden states, compute at the end.

    Each forward runs with ``output_hidden_states=True`` and every decoder layer's output for every position of
    every batch is kept; only after the last batch are the per-layer statistics computed (in float64), so
    memory grows with the number of tokens. ``transformers`` returns the *final-normed* state as the last
    hidden state, so the last layer's raw output is taken with a forward hook instead (the same tensors,
    the same memory). Returns one row per layer with ``n_samples``, ``n_tokens``, ``pooled_var_padded``,
    ``pooled_var_masked`` and ``elem_var``, defined as in :mod:`avss_lib.core.activation_stats` (site ``block_output``).
    """
    layers = find_layers(model)
    n_layers = len(layers)
    device = next(model.parameters()).device
    kept: list[list[Tensor]] = [[] for _ in range(n_layers)]
    masks: list[Tensor] = []
    last: dict[str, Tensor] = {}

    def last_hook(module: nn.Module, args: tuple, output: Any) -> None:
        last["output"] = output[0] if isinstance(output, (tuple, list)) else output

    handle = layers.layers[n_layers - 1].register_forward_hook(last_hook)
    try:
        with torch.inference_mode():
            for batch in tqdm(batches, desc="naive hidden states", total=total, disable=not progress):
                attention_mask = batch["attention_mask"].to(device)
                out = model(input_ids=batch["input_ids"].to(device), attention_mask=attention_mask,
                            output_hidden_states=True, use_cache=False)
                shape = attention_mask.shape
                for i in range(n_layers - 1):
                    kept[i].append(out.hidden_states[i + 1].reshape(*shape, -1))
                kept[n_layers - 1].append(last.pop("output").reshape(*shape, -1))
                masks.append(attention_mask.bool())
                del out
    finally:
        handle.remove()
    if not masks:
        raise ConfigError("the calibration set is empty: give at least one batch")
    rows = []
    for i in range(n_layers):
        padded, masked, valid_entries = [], [], []
        for x, valid in zip(kept[i], masks):
            x64 = x.double()
            counts = valid.sum(dim=1)
            has = counts > 0
            padded.append(x64.mean(dim=1)[has].var(dim=-1))
            sums = (x64 * valid.unsqueeze(-1)).sum(dim=1)
            masked.append((sums[has] / counts[has].unsqueeze(-1)).var(dim=-1))
            valid_entries.append(x64[valid].reshape(-1))
        every = torch.cat(valid_entries)
        rows.append({"layer": i, "n_samples": int(sum(len(p) for p in padded)), "n_tokens": int(sum(int(m.sum()) for m in masks)),
                     "pooled_var_padded": float(torch.cat(padded).mean()),
                     "pooled_var_masked": float(torch.cat(masked).mean()),
                     "elem_var": float(every.var(correction=0))})
        del every, valid_entries
    return pd.DataFrame(rows)


def variance_agreement(streaming: pd.DataFrame, naive: pd.DataFrame) -> pd.DataFrame:
    """Per layer, the streaming collector's block-output variances next to the naive ones and their relative gap."""
    block = streaming[streaming["site"] == "block_output"].set_index("layer")
    if block.empty:
        raise ConfigError("the streaming statistics have no block_output rows: collect the block_output site")
    naive = naive.set_index("layer")
    rows = []
    for column in ("pooled_var_padded", "pooled_var_masked", "elem_var"):
        s, n = block[column].astype(float), naive[column].reindex(block.index).astype(float)
        rows.append(pd.DataFrame({"layer": block.index, "statistic": column, "streaming": s.to_numpy(),
                                  "naive": n.to_numpy(), "relative_gap": (s - n).abs().to_numpy() / n.abs().to_numpy()}))
    return pd.concat(rows, ignore_index=True)


def agreement_sentence(agreement: pd.DataFrame) -> str:
    """One sentence: the largest relative gap between the streaming and the naive variances."""
    worst = agreement.loc[agreement["relative_gap"].idxmax()]
    return (f"On the base batches both collectors give the same block-output variances: over "
            f"{agreement['layer'].nunique()} layers and {agreement['statistic'].nunique()} variance definitions the "
            f"largest relative gap is {worst['relative_gap']:.1e} ({worst['statistic']}, layer {int(worst['layer'])}), "
            "float32 activations summed in float64 by the streaming collector and in one float64 pass by the naive one.")


# --------------------------------------------------------------------------------------------- 1. overhead


def measure_overhead(model: nn.Module, batches: Sequence[Mapping[str, Tensor]], spec: activations.StatsSpec, *,
                     repeats: int = 3, progress: bool = False) -> tuple[dict[str, Any], pd.DataFrame]:
    """Seconds of a plain forward and of the statistics pass over the same batches, best of ``repeats`` each.

    One untimed plain forward on the first batch warms up; then each repeat times a plain forward over all
    batches and the statistics pass over the same batches, alternately. Returns the result record and the
    statistics of the last pass (for :func:`variance_agreement`).
    """
    repeats = check_positive_int("repeats", repeats)
    if not batches:
        raise ConfigError("the calibration set is empty: give at least one batch")
    plain_forward(model, batches[:1])
    plain, stats_times = [], []
    stats = pd.DataFrame()
    for _ in tqdm(range(repeats), desc="overhead repeats", disable=not progress):
        start = time.perf_counter()
        plain_forward(model, batches)
        plain.append(time.perf_counter() - start)
        start = time.perf_counter()
        stats = activations.collect_activation_stats(model, batches, spec, progress=False)
        stats_times.append(time.perf_counter() - start)
    tokens, positions = token_counts(batches)
    ratio = min(stats_times) / min(plain)
    return {"n_batches": len(batches), "tokens": tokens, "positions": positions, "repeats": repeats,
            "sites": list(spec.sites), "plain_forward_s": min(plain), "stats_pass_s": min(stats_times),
            "plain_forward_runs_s": plain, "stats_pass_runs_s": stats_times, "overhead_ratio": ratio,
            "target": OVERHEAD_TARGET, "meets_target": bool(ratio <= OVERHEAD_TARGET),
            "torch_threads": torch.get_num_threads()}, stats


def overhead_sentence(result: Mapping[str, Any]) -> str:
    """One sentence: the statistics pass's time against the plain forward, and the target."""
    verdict = "within" if result["meets_target"] else "above"
    return (f"Over the same {_count(result['n_batches'], 'padded batch', 'padded batches')} ({result['tokens']:,} "
            f"tokens, {result['positions']:,} positions with padding), the statistics pass on "
            f"{_count(len(result['sites']), 'site')} took {result['stats_pass_s']:.2f} s against {result['plain_forward_s']:.2f} s for a plain "
            f"inference-mode forward (best of {result['repeats']} each, {_count(result['torch_threads'], 'CPU thread')}): "
            f"{result['overhead_ratio']:.2f}×, {verdict} the target of ≤ {result['target']:.2f}×.")


def overhead_figure(result: Mapping[str, Any]) -> Figure:
    """Bar chart of the plain forward and the statistics pass (best run; dots: every run) with the target line."""
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    labels = ["plain forward", "statistics pass"]
    best = [result["plain_forward_s"], result["stats_pass_s"]]
    ax.bar(labels, best, color=["tab:grey", "tab:blue"], width=0.55, label="best run")
    for x, runs in enumerate((result["plain_forward_runs_s"], result["stats_pass_runs_s"])):
        ax.scatter(np.full(len(runs), x), runs, color="black", s=12, zorder=3, label="each run" if x == 0 else None)
    ax.axhline(result["plain_forward_s"] * result["target"], color="red", ls="--", lw=1.2,
               label=f"target: {result['target']:.2f}× plain forward")
    ax.set_ylabel("seconds")
    top = max(max(result["plain_forward_runs_s"]), max(result["stats_pass_runs_s"]), best[0] * result["target"])
    ax.set_ylim(0, top * 1.4)
    ax.set_title(f"{result['tokens']:,} tokens in {_count(result['n_batches'], 'batch', 'batches')}", fontsize=10)
    ax.legend(fontsize=8, loc="upper center", ncol=3)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------- 2-3. memory


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

    ``collector`` is 'streaming' (:func:`~avss_lib.core.activation_stats.collect_activation_stats` with ``spec``) or 'naive'
    (:func:`naive_hidden_state_stats`); the base batches in ``batches_file`` (``torch.save`` of a list of dicts)
    are repeated ``multiple`` times. One untimed plain forward on the first batch comes first (it pages the
    weights in and initialises the kernels). The peak is the kernel's VmHWM after a reset just before the pass
    (the peak *during* the pass, model included); without a resettable VmHWM it is the lifetime ``ru_maxrss``.
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
    peak = after["VmHWM"] if reset and "VmHWM" in after else lifetime
    return {"protocol": CHILD_PROTOCOL, "collector": collector, "multiple": multiple,
            "n_batches": len(batches) * multiple, "tokens": tokens * multiple, "positions": positions * multiple,
            "seconds": seconds, "load_s": load_s, "peak_rss_mib": peak,
            "rss_before_pass_mib": before.get("VmRSS", float("nan")), "lifetime_peak_rss_mib": lifetime,
            "peak_method": "VmHWM reset before the pass" if reset and "VmHWM" in after else "ru_maxrss (lifetime)",
            "torch_threads": torch.get_num_threads()}


def parse_child_output(stdout: str) -> dict[str, Any]:
    """The result record of a memory child: the last stdout line that is JSON with :data:`CHILD_PROTOCOL`."""
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("protocol") == CHILD_PROTOCOL:
                return record
    raise MemoryChildFailed(f"the memory child printed no {CHILD_PROTOCOL} JSON line; its stdout ended with: "
                            f"{stdout.strip()[-500:]!r}")


def run_memory_child(*, model_spec: str, batches_file: str | os.PathLike[str], multiple: int, collector: str,
                     spec: activations.StatsSpec, device: str = "cpu", dtype: str = "float32",
                     timeout: float | None = None) -> dict[str, Any]:
    """Run :func:`memory_child` in a fresh ``python -m avss_lib.performance.measurements memory-child`` process; return its record."""
    cmd = [sys.executable, "-m", "avss_lib.performance.measurements", "memory-child", "--model", model_spec,
           "--batches", str(batches_file), "--multiple", str(multiple), "--collector", collector,
           "--device", device, "--dtype", dtype, "--sites", *spec.sites,
           "--abs-thresholds", *map(repr, spec.abs_thresholds), "--rel-taus", *map(repr, spec.rel_taus)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise MemoryChildFailed(f"memory child ({collector}, {multiple}x) exited with {proc.returncode}: "
                                f"{proc.stderr.strip()[-1500:]}")
    return parse_child_output(proc.stdout)


def naive_estimate_mib(positions: int, n_layers: int, hidden: int, bytes_per_value: int = 4) -> float:
    """MiB of the hidden states the naive collection keeps: ``positions × n_layers × hidden × bytes``."""
    return positions * n_layers * hidden * bytes_per_value / _MIB


def measure_memory(model_spec: str, batches: Sequence[Mapping[str, Tensor]], multiples: Sequence[int],
                   spec: activations.StatsSpec, *, n_layers: int, hidden: int, device: str = "cpu",
                   dtype: str = "float32", collectors: Sequence[str] = COLLECTORS,
                   naive_limit_mib: float = NAIVE_LIMIT_MIB, progress: bool = True) -> pd.DataFrame:
    """Peak RSS and time of each collector at each token multiple, each in a fresh subprocess.

    The base ``batches`` are saved once to a temporary file that every child reads. The naive collection is
    skipped (``status`` 'skipped') at a multiple whose kept hidden states (:func:`naive_estimate_mib`) would
    exceed ``naive_limit_mib``. One row per (collector, multiple).
    """
    multiples = check_token_multiples(multiples)
    unknown = [c for c in collectors if c not in COLLECTORS]
    if unknown or not collectors:
        raise ConfigError(f"unknown collector(s) {unknown or '(none given)'}: choose from {', '.join(COLLECTORS)}")
    tokens, positions = token_counts(batches)
    bytes_per_value = torch.finfo(models.DTYPES[dtype]).bits // 8
    jobs = [(c, m) for m in multiples for c in collectors]
    rows = []
    with tempfile.TemporaryDirectory(prefix="avss_perf_") as tmp:
        batches_file = Path(tmp) / "batches.pt"
        torch.save([{k: v for k, v in b.items()} for b in batches], batches_file)
        for collector, m in tqdm(jobs, desc="memory subprocesses", disable=not progress):
            estimate = naive_estimate_mib(positions * m, n_layers, hidden, bytes_per_value)
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


def _measured(memory: pd.DataFrame, collector: str) -> pd.DataFrame:
    d = memory[(memory["collector"] == collector) & (memory["status"] == "measured")]
    return d.sort_values("multiple")


def memory_flatness(memory: pd.DataFrame) -> dict[str, Any]:
    """How much the streaming pass's peak RSS grew from the smallest to the largest token multiple, and whether
    that is flat (at most :data:`FLAT_TOLERANCE` of the smallest peak or :data:`FLAT_TOLERANCE_MIB`)."""
    d = _measured(memory, "streaming")
    if d.empty:
        raise DataError("no measured streaming rows in the memory table: run measure_memory with 'streaming'")
    first, last = d.iloc[0], d.iloc[-1]
    growth = float(last["peak_rss_mib"] - first["peak_rss_mib"])
    tolerance = max(FLAT_TOLERANCE * float(first["peak_rss_mib"]), FLAT_TOLERANCE_MIB)
    return {"multiple_low": int(first["multiple"]), "multiple_high": int(last["multiple"]),
            "tokens_low": int(first["tokens"]), "tokens_high": int(last["tokens"]),
            "peak_low_mib": float(first["peak_rss_mib"]), "peak_high_mib": float(last["peak_rss_mib"]),
            "growth_mib": growth, "tolerance_mib": tolerance, "flat": bool(growth <= tolerance)}


def memory_sentence(memory: pd.DataFrame) -> str:
    """One sentence: the streaming pass's peak RSS against the number of tokens, and the target (flat)."""
    f = memory_flatness(memory)
    if f["multiple_low"] == f["multiple_high"]:
        return (f"The streaming statistics pass peaked at {f['peak_low_mib']:,.0f} MiB on {f['tokens_low']:,} tokens; "
                "with a single token multiple the target (flat in the number of tokens) is not tested.")
    verdict = ("flat, as targeted" if f["flat"] else
               f"not flat: more than the {f['tolerance_mib']:.0f} MiB tolerance, against the flat target")
    return (f"The streaming statistics pass peaked at {f['peak_low_mib']:,.0f} MiB on {f['tokens_low']:,} tokens "
            f"({f['multiple_low']}×) and at {f['peak_high_mib']:,.0f} MiB on {f['tokens_high']:,} tokens "
            f"({f['multiple_high']}×), a change of {f['growth_mib']:+,.0f} MiB for "
            f"{f['tokens_high'] / f['tokens_low']:.0f}× the tokens: {verdict}.")


def naive_sentence(memory: pd.DataFrame, *, n_layers: int, hidden: int, bytes_per_value: int = 4) -> str:
    """One sentence: streaming against naive collection at the largest multiple both ran, and the naive growth."""
    s, n = _measured(memory, "streaming").set_index("multiple"), _measured(memory, "naive").set_index("multiple")
    common = sorted(set(s.index) & set(n.index))
    if not common:
        return "The naive collection was not measured at any multiple the streaming pass ran (see the table)."
    hi, lo = common[-1], common[0]
    text = (f"At {hi}× ({int(s.loc[hi, 'tokens']):,} tokens) keeping every layer's hidden states peaked at "
            f"{n.loc[hi, 'peak_rss_mib']:,.0f} MiB against {s.loc[hi, 'peak_rss_mib']:,.0f} MiB for the streaming "
            f"collector, {n.loc[hi, 'peak_rss_mib'] / s.loc[hi, 'peak_rss_mib']:.2f}× the memory, and took "
            f"{n.loc[hi, 'seconds']:.1f} s against {s.loc[hi, 'seconds']:.1f} s")
    if hi != lo:
        per_k = (n.loc[hi, "peak_rss_mib"] - n.loc[lo, "peak_rss_mib"]) / (n.loc[hi, "positions"] - n.loc[lo, "positions"]) * 1000
        expected = naive_estimate_mib(1000, n_layers, hidden, bytes_per_value)
        text += (f"; from {lo}× to {hi}× the naive peak grew by {per_k:,.1f} MiB per 1,000 positions, against "
                 f"{expected:,.1f} MiB for the kept hidden states alone ({n_layers} layers × {hidden} values × "
                 f"{bytes_per_value} bytes), while the target for the streaming pass is no growth")
    return text + "."


def memory_figure(memory: pd.DataFrame) -> Figure:
    """Peak RSS (left) and pass time (right) against calibration tokens, streaming and naive collection."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    styles = {"streaming": ("tab:blue", "o", "streaming statistics (this library)"),
              "naive": ("tab:red", "s", "naive: output_hidden_states kept")}
    for collector, (color, marker, label) in styles.items():
        d = _measured(memory, collector)
        if d.empty:
            continue
        axes[0].plot(d["tokens"], d["peak_rss_mib"], marker=marker, color=color, label=label)
        axes[1].plot(d["tokens"], d["seconds"], marker=marker, color=color, label=label)
    s = _measured(memory, "streaming")
    if not s.empty:
        axes[0].plot(s["tokens"], s["rss_before_pass_mib"], ls=":", color="grey", label="RSS before the pass (after a warm-up batch)")
    axes[0].set_ylabel("peak RSS during the pass (MiB)")
    axes[1].set_ylabel("seconds of the pass")
    for ax in axes:
        ax.set_xlabel("calibration tokens (non-padding)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def memory_display(memory: pd.DataFrame) -> pd.DataFrame:
    """The memory table with one row per multiple and the two collectors side by side."""
    labels = {"peak_rss_mib": "peak RSS (MiB)", "pass_increase_mib": "increase in the pass (MiB)", "seconds": "seconds"}
    wide = memory.set_index(["multiple", "tokens", "positions", "collector"])[[c for c in labels if c in memory]]
    wide = wide.unstack("collector")
    order = [(name, collector) for name in labels for collector in COLLECTORS if (name, collector) in wide.columns]
    wide = wide[order]
    wide.columns = [f"{collector}: {labels[name]}" for name, collector in order]
    return wide.reset_index()


# --------------------------------------------------------------------------------------------- 4. model load


def measure_load_times(model_spec: str, *, device: str = "cpu", dtype: str = "float32") -> dict[str, Any]:
    """Seconds of the first load of ``model_spec`` into an empty temporary cache and of a second, cached load.

    For a GGUF model the first load dequantises the file and writes the converted weights to the cache; a
    Hugging Face folder or Hub id has no conversion step, which ``kind`` records.
    """
    kind = models.resolve_spec(model_spec).kind
    with tempfile.TemporaryDirectory(prefix="avss_cache_") as cache:
        start = time.perf_counter()
        lm, _ = models.load_model(model_spec, device=device, dtype=dtype, cache_dir=cache)
        first = time.perf_counter() - start
        del lm
        gc.collect()
        start = time.perf_counter()
        lm, _ = models.load_model(model_spec, device=device, dtype=dtype, cache_dir=cache)
        cached = time.perf_counter() - start
        del lm
        gc.collect()
    return {"model": model_spec, "kind": kind, "first_load_s": first, "cached_load_s": cached,
            "speedup": first / cached}


def load_sentence(load: Mapping[str, Any]) -> str:
    """One sentence: the cached load against the first load, and the target (only the first load converts)."""
    if load["kind"] != "gguf":
        return (f"Model {load['model']!r} is a {load['kind']} checkpoint with no GGUF conversion: the first load took "
                f"{load['first_load_s']:.1f} s and the second {load['cached_load_s']:.1f} s.")
    verdict = ("so only the first load pays for the dequantisation, as targeted" if load["cached_load_s"] < load["first_load_s"]
               else "so the cache saved nothing, against the target that only the first load pays for the dequantisation")
    return (f"The first load of the GGUF model into an empty cache (dequantisation and writing the float weights) "
            f"took {load['first_load_s']:.1f} s and a load from the converted-weights cache {load['cached_load_s']:.1f} s, "
            f"{load['speedup']:.1f}× faster, {verdict}.")


# --------------------------------------------------------------------------------------------- 5. pruning speed


def speed_layers(n_layers: int, k: int) -> list[int]:
    """The ``k`` deepest decoder layers except the last one (the last-k rule; speed depends only on ``k``)."""
    if not 1 <= k <= n_layers - 1:
        raise ConfigError(f"cannot remove {k} of {n_layers} layers: remove 1..{n_layers - 1}")
    return list(range(n_layers - 1 - k, n_layers - 1))


def measure_pruning_speedups(model: nn.Module, batch: Mapping[str, Tensor], ratios: Sequence[float], *,
                             repeats: int = 3, rounding: str = "round", progress: bool = False) -> pd.DataFrame:
    """Measured forward speed-up of the model without ``k = layers_for_ratio(n, r)`` layers, for each ratio.

    Each ratio uses :func:`~avss_lib.pruning.study.measure_speedup` (the pruned copy and the original run the
    same batch alternately, after one warm-up pair); here the best of ``repeats`` runs of each is kept. The
    theoretical speed-up counts decoder layers only, ``1 / (1 − k/n)``; ``estimated_speedup_params`` also counts
    the LM head, which pruning does not shrink.
    """
    from avss_lib.core.layer_removal import layers_for_ratio
    from avss_lib.pruning.study import measure_speedup

    ratios = check_ratios(ratios)
    repeats = check_positive_int("repeats", repeats)
    n_layers = len(find_layers(model))
    rows = []
    for ratio in tqdm(ratios, desc="pruned models", disable=not progress):
        k = layers_for_ratio(n_layers, ratio, rounding)
        result = measure_speedup(model, speed_layers(n_layers, k), batch, repeats=repeats)
        best_full, best_pruned = min(result["times_unpruned"]), min(result["times_pruned"])
        rows.append({"ratio": ratio, "n_layers": n_layers, "n_removed": k, "removed_fraction": k / n_layers,
                     "layers_removed": " ".join(map(str, result["layers_removed"])),
                     "batch_shape": "×".join(map(str, result["batch_shape"])), "repeats": repeats,
                     "seconds_unpruned": best_full, "seconds_pruned": best_pruned,
                     "measured_speedup": best_full / best_pruned,
                     "theoretical_speedup": theoretical_speedup(k / n_layers),
                     "nominal_theoretical_speedup": theoretical_speedup(ratio),
                     "estimated_speedup_params": result["estimated_speedup_params"]})
    frame = pd.DataFrame(rows)
    frame["measured_over_theoretical"] = frame["measured_speedup"] / frame["theoretical_speedup"]
    return frame


def speedup_sentence(speed: pd.DataFrame) -> str:
    """One sentence: the measured speed-ups against the theoretical ``1 / (1 − k/n)``."""
    parts = [f"×{r.measured_speedup:.2f} for {r.n_removed}/{r.n_layers} layers (theory ×{r.theoretical_speedup:.2f})"
             for r in speed.itertuples()]
    share, estimate = speed["measured_over_theoretical"], speed["estimated_speedup_params"]
    return (f"Removing decoder layers made the forward pass over one {speed['batch_shape'].iloc[0]} batch faster by "
            f"{'; '.join(parts)}: the measured speed-up reached {_span(share.min(), share.max(), '{:.0%}')} of the "
            f"theoretical 1/(1 − k/n) target, against {_span(estimate.min(), estimate.max(), '×{:.2f}')} expected "
            "when the LM head, which pruning keeps, is counted by its parameters.")


def speedup_figure(speed: pd.DataFrame) -> Figure:
    """Measured speed-up against the fraction of layers removed, with the theoretical curve and the estimate."""
    fig, ax = plt.subplots(figsize=(5.8, 3.8))
    grid = np.linspace(0, max(0.6, float(speed["removed_fraction"].max()) + 0.05), 100)
    ax.plot(grid, 1 / (1 - grid), color="grey", ls="--", label="theoretical 1/(1 − k/n) (decoder layers)")
    ax.plot(speed["removed_fraction"], speed["estimated_speedup_params"], color="tab:orange", marker="^",
            label="estimate counting the LM head")
    ax.plot(speed["removed_fraction"], speed["measured_speedup"], color="tab:blue", marker="o", label="measured (best run)")
    ax.axhline(1.0, color="black", lw=0.6)
    ax.set_xlabel("fraction of decoder layers removed (k/n)")
    ax.set_ylabel("speed-up of one forward pass (×)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------- 6. wall times


def _size_parameters(params: Mapping[str, Any]) -> str:
    """The integer parameters of a notebook (sizes, repeats; not seeds) as ``name=value`` pairs."""
    pairs = [f"{k}={v}" for k, v in params.items()
             if isinstance(v, int) and not isinstance(v, bool) and "seed" not in k]
    return ", ".join(pairs)


def notebook_wall_times(run_dir: str | os.PathLike[str], *, exclude: Sequence[str] = (SELF_NOTEBOOK,)) -> pd.DataFrame:
    """Wall time, peak RSS and integer (size) parameters of each notebook of ``run_dir`` with a ``_done.json``.

    Columns: ``notebook``, ``seconds``, ``share`` (of the listed total), ``peak_rss_mib`` (NaN when not recorded),
    ``finished`` and ``sizes``. Raises :class:`DataError` naming a corrupt record.
    """
    rows = []
    for done in sorted(Path(run_dir).glob("*/_done.json")):
        if done.parent.name in exclude:
            continue
        try:
            record = json.loads(done.read_text())
            seconds = float(record["seconds"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{done} is not a finished-notebook record ({exc}): re-run that notebook") from exc
        rss = record.get("peak_rss_mib")
        rows.append({"notebook": done.parent.name, "seconds": seconds,
                     "peak_rss_mib": float(rss) if rss is not None else float("nan"),
                     "finished": record.get("finished", ""), "sizes": _size_parameters(record.get("parameters", {}))})
    frame = pd.DataFrame(rows, columns=["notebook", "seconds", "peak_rss_mib", "finished", "sizes"])
    frame.insert(2, "share", frame["seconds"] / frame["seconds"].sum() if len(frame) else [])
    return frame


def machine_memory_mib() -> float:
    """Physical memory of this machine in MiB (NaN where the OS does not tell)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / _MIB
    except (ValueError, OSError, AttributeError):
        return float("nan")


def wall_time_sentence(times: pd.DataFrame, *, machine_mib: float | None = None) -> str:
    """One sentence: the run's total wall time, its slowest notebook and its largest peak RSS against memory."""
    own = (f"This notebook ({SELF_NOTEBOOK}) is not in the table: its record is written after it finishes, and "
           "it is listed in the reproducibility appendix.")
    if times.empty:
        return f"No notebook of this run has a finished-run record yet. {own}"
    machine_mib = machine_memory_mib() if machine_mib is None else machine_mib
    slow = times.loc[times["seconds"].idxmax()]
    text = (f"The {_count(len(times), 'notebook')} listed took {times['seconds'].sum() / 60:.1f} min in total; the slowest, "
            f"{slow['notebook']}, took {slow['seconds']:.0f} s ({slow['share']:.0%})")
    rss = times.dropna(subset=["peak_rss_mib"])
    if not rss.empty:
        big = rss.loc[rss["peak_rss_mib"].idxmax()]
        text += f"; the largest peak RSS was {big['peak_rss_mib']:,.0f} MiB ({big['notebook']})"
        if math.isfinite(machine_mib):
            text += f", {big['peak_rss_mib'] / machine_mib:.0%} of this machine's {machine_mib / 1024:.0f} GiB"
    return f"{text}. {own}"


# --------------------------------------------------------------------------------------------- everything


def run_benchmark(*, model: str = models.DEFAULT_MODEL, device: str = "cpu", dtype: str = "float32",
                  data_root: str | None = None, seed: int = 42, n_samples: int = 16, max_length: int = 128,
                  batch_size: int = 8, token_multiples: Sequence[int] = (1, 4, 10), repeats: int = 3,
                  prune_ratios: Sequence[float] = (0.125, 0.25, 0.375, 0.5), meta01: Mapping[str, Any] | None = None,
                  progress: bool = True) -> dict[str, Any]:
    """All measurements of this module on one model and one base calibration set; a JSON-ready dict."""
    multiples, ratios = check_token_multiples(token_multiples), check_ratios(prune_ratios)
    repeats = check_positive_int("repeats", repeats)
    settings = calibration_settings(meta01)
    load = measure_load_times(model, device=device, dtype=dtype)
    lm, tokenizer = models.load_model(model, device=device, dtype=dtype)
    batches, provenance = base_batches(tokenizer, data_root=data_root, n_samples=n_samples, seed=seed,
                                       max_length=max_length, batch_size=batch_size, dataset=settings["dataset"],
                                       split=settings["split"], padding=settings["padding"])
    overhead, stats = measure_overhead(lm, batches, settings["spec"], repeats=repeats, progress=progress)
    agreement = variance_agreement(stats, naive_hidden_state_stats(lm, batches))
    n_layers, hidden = len(find_layers(lm)), int(lm.config.hidden_size)
    memory = measure_memory(model, batches, multiples, settings["spec"], n_layers=n_layers, hidden=hidden,
                            device=device, dtype=dtype, progress=progress)
    speed = measure_pruning_speedups(lm, batches[0], ratios, repeats=repeats, progress=progress)
    return {"machine": {"torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(), "torch": torch.__version__,
                        "memory_mib": machine_memory_mib()},
            "parameters": {"model": model, "device": device, "dtype": dtype, "seed": seed, "n_samples": n_samples,
                           "max_length": max_length, "batch_size": batch_size, "token_multiples": multiples,
                           "repeats": repeats, "prune_ratios": ratios, "sites": list(settings["spec"].sites)},
            "data": provenance, "load": load, "overhead": overhead,
            "variance_agreement_max_relative_gap": float(agreement["relative_gap"].max()),
            "memory": memory.to_dict(orient="records"), "memory_flatness": memory_flatness(memory),
            "speedup": speed.to_dict(orient="records"), "n_layers": n_layers, "hidden": hidden}


BENCHMARK_PARAMETERS = ("model", "device", "dtype", "data_root", "seed", "n_samples", "max_length", "batch_size",
                        "token_multiples", "repeats", "prune_ratios")


def summary_lines(result: Mapping[str, Any]) -> list[str]:
    """The generated sentences of a :func:`run_benchmark` result, one per measurement."""
    memory = pd.DataFrame(result["memory"])
    return [overhead_sentence(result["overhead"]), memory_sentence(memory),
            naive_sentence(memory, n_layers=result["n_layers"], hidden=result["hidden"],
                           bytes_per_value=torch.finfo(models.DTYPES[result["parameters"]["dtype"]]).bits // 8),
            ("The streaming and the naive block-output variances differ by at most "
             f"{result['variance_agreement_max_relative_gap']:.1e} (relative) on the base batches."),
            load_sentence(result["load"]), speedup_sentence(pd.DataFrame(result["speedup"]))]


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m avss_lib.performance.measurements memory-child ...``: one memory measurement, printed as one JSON line."""
    parser = argparse.ArgumentParser(prog="python -m avss_lib.performance.measurements", description=main.__doc__)
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
