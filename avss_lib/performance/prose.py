"""The performance appendix's phrases whose structure depends on the measured numbers.

The chapter's sentences live in ``notebooks/06_performance.ipynb``; the numbers are glued into them. Only the
phrases below are written in Python, each because which words apply depends on the data: a verdict against a
target, a singular or plural, a list of measurements, or a comparison that needs a measurement that may be
missing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import pandas as pd


def count(n: int, word: str, plural: str | None = None) -> str:
    """``n`` and ``word`` in the singular or plural, e.g. '1 batch', '3 batches'."""
    return f"{n:,} {word if n == 1 else plural or word + 's'}"


def span(low: float, high: float, fmt: str) -> str:
    """``low–high`` formatted with ``fmt``, or one value when both format alike."""
    a, b = fmt.format(low), fmt.format(high)
    return a if a == b else f"{a}–{b}"


def target_verdict(meets_target: bool) -> str:
    """'within' or 'above' (the overhead target)."""
    return "within" if meets_target else "above"


def flatness_verdict(flatness: Mapping[str, Any]) -> str:
    """Whether the streaming peak is flat, from :func:`~avss_lib.performance.memory.memory_flatness`."""
    if not flatness["tested"]:
        return "with a single token multiple the target (flat in the number of tokens) is not tested"
    return "flat, as targeted" if flatness["flat"] else "not flat, against the flat target"


def agreement_verdict(agree: bool) -> str:
    """How the two collectors' variances compare with the tolerance: 'agree within' or 'differ by more than'."""
    return "agree within" if agree else "differ by more than"


def naive_comparison(comparison: Mapping[str, Any] | None) -> str:
    """The naive collection against the streaming pass (:func:`~avss_lib.performance.memory.naive_comparison`).

    No comparison (the naive collection was skipped wherever the streaming pass ran) gives one sentence saying
    so; with a single common multiple the sentence has no growth clause.
    """
    if comparison is None:
        return "The naive collection was not measured at any multiple the streaming pass ran (see the table)."
    c = comparison
    ratio = c["memory_ratio"]
    more = f"{ratio:.2f}× the memory" if ratio >= 1 else f"only {ratio:.2f}× the memory"
    text = (f"At {c['multiple']}× ({c['tokens']:,} tokens) keeping every layer's hidden states peaked at "
            f"{c['naive_peak_mib']:,.0f} MiB against {c['streaming_peak_mib']:,.0f} MiB for the streaming collector, "
            f"{more}, and took {c['naive_seconds']:.1f} s against {c['streaming_seconds']:.1f} s")
    if c["growth_per_1000_mib"] is not None:
        text += (f"; from {c['multiple_low']}× to {c['multiple']}× the naive peak grew by "
                 f"{c['growth_per_1000_mib']:,.1f} MiB per 1,000 positions, against {c['expected_per_1000_mib']:,.1f} MiB "
                 f"for the kept hidden states alone ({c['n_layers']} layers × {c['hidden']} values × "
                 f"{c['bytes_per_value']} bytes), while the target for the streaming pass is no growth")
    return text + "."


def load_phrases(load: Mapping[str, Any]) -> dict[str, str]:
    """What the two loads were and what their times say (``load_first``, ``load_second``, ``load_verdict``).

    A GGUF model's first load converts; the target is that only it pays for the dequantisation. Another
    checkpoint has nothing to convert, so the target does not apply.
    """
    if load["kind"] != "gguf":
        return {"load_first": f"of {load['model']!r}, a {load['kind']} checkpoint with no GGUF conversion,",
                "load_second": "the second load", "load_verdict": "with no conversion step the cache target does not apply"}
    verdict = ("only the first load pays for the dequantisation, as targeted" if load["cached_load_s"] < load["first_load_s"]
               else "the cache saved nothing, against the target that only the first load pays for the dequantisation")
    return {"load_first": "of the GGUF model into an empty cache (dequantisation and writing the float weights)",
            "load_second": "a load from the converted-weights cache", "load_verdict": verdict}


def speed_direction(speed: pd.DataFrame) -> str:
    """Whether the pruned model was faster than the unpruned one at every, no or some ratio."""
    faster = speed["measured_speedup"] > 1
    if faster.all():
        return "faster at every ratio"
    return "no faster at any ratio" if not faster.any() else "faster at some ratios only"


def speedup_list(speed: pd.DataFrame) -> str:
    """The measured against the theoretical speed-up of each ratio, e.g. '×1.30 for 8/30 layers (theory ×1.36)'."""
    return "; ".join(f"×{r.measured_speedup:.2f} for {r.n_removed}/{r.n_layers} layers (theory ×{r.theoretical_speedup:.2f})"
                     for r in speed.itertuples())


def machine_memory(mib: float) -> str:
    """The machine's memory, e.g. '24 GiB of memory', or a phrase saying the OS does not report it."""
    return f"{mib / 1024:.0f} GiB of memory" if math.isfinite(mib) else "memory of a size the OS does not report"


def wall_times(summary: Mapping[str, Any] | None) -> str:
    """The run's total wall time, its slowest notebook and its largest peak RSS against the machine's memory
    (:func:`~avss_lib.performance.wall_times.wall_time_summary`)."""
    if summary is None:
        return "No notebook of this run has a finished-run record yet."
    s = summary
    text = (f"The {count(s['n_notebooks'], 'notebook')} listed took {s['total_minutes']:.1f} min in total; the slowest, "
            f"{s['slowest']}, took {s['slowest_seconds']:.0f} s ({s['slowest_share']:.0%})")
    if s["largest_rss_mib"] is not None:
        text += f"; the largest peak RSS was {s['largest_rss_mib']:,.0f} MiB ({s['largest_rss_notebook']})"
        if s["largest_rss_share"] is not None:
            text += f", {s['largest_rss_share']:.0%} of this machine's {s['machine_gib']:.0f} GiB"
    return text + "."
