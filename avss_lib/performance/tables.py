"""The performance appendix's tables, formatted for the book (pandas Stylers)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd
from pandas.io.formats.style import Styler

from avss_lib.performance.memory import memory_display
from avss_lib.performance.peer_record import peer_frame

SPEED_COLUMNS = {"ratio": "{:.3f}", "n_removed": "{:d}", "seconds_unpruned": "{:.3f}", "seconds_pruned": "{:.3f}",
                 "measured_speedup": "×{:.2f}", "theoretical_speedup": "×{:.2f}",
                 "estimated_speedup_params": "×{:.2f}", "measured_over_theoretical": "{:.0%}"}


def memory_table(memory: pd.DataFrame) -> Styler:
    """Peak RSS, its increase during the pass and the seconds of each collector, one row per token multiple."""
    return memory_display(memory).style.format(precision=1, thousands=",", na_rep="skipped").hide(axis="index")


def load_table(load: Mapping[str, Any]) -> Styler:
    """The first and the second (cached) load's seconds."""
    gguf = load["kind"] == "gguf"
    rows = [{"load": "first (GGUF dequantisation)" if gguf else "first", "seconds": load["first_load_s"]},
            {"load": "from the cache" if gguf else "second", "seconds": load["cached_load_s"]}]
    return pd.DataFrame(rows).style.format({"seconds": "{:.2f}"}).hide(axis="index")


def speed_table(speed: pd.DataFrame) -> Styler:
    """Seconds and speed-ups of each removal ratio."""
    return speed[list(SPEED_COLUMNS)].style.format(SPEED_COLUMNS).hide(axis="index")


def times_table(times: pd.DataFrame) -> Styler:
    """Wall time, share and peak RSS of each notebook of the run."""
    return times.style.format({"seconds": "{:.1f}", "share": "{:.0%}", "peak_rss_mib": "{:,.0f}"},
                              na_rep="not recorded").hide(axis="index")


def peer_table(record: Mapping[str, Any] | None) -> Styler:
    """This harness against lm-evaluation-harness, from the peer benchmark's committed record."""
    return (peer_frame(dict(record) if record is not None else None)
            .style.format({"ours (s)": "{:.1f}", "lm-eval (s)": "{:.1f}", "lm-eval ÷ ours": "×{:.2f}"}, na_rep="")
            .hide(axis="index"))
