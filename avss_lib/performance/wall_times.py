"""Wall time and peak memory of each notebook of a run, from the records the pipeline leaves when one finishes."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from avss_lib.core.artifacts import NOTEBOOK_TIMES, STAGES, RunDir, done_record
from avss_lib.core.errors import DataError

#: This chapter's stage; left out of the wall-time table (its record is written after it finishes).
SELF_NOTEBOOK = NOTEBOOK_TIMES.stage
MIB = 1024.0 * 1024.0


def size_parameters(params: Mapping[str, Any]) -> str:
    """The integer parameters of a notebook (sizes, repeats; not seeds) as ``name=value`` pairs."""
    pairs = [f"{k}={v}" for k, v in params.items()
             if isinstance(v, int) and not isinstance(v, bool) and "seed" not in k]
    return ", ".join(pairs)


def notebook_wall_times(run_dir: RunDir, *, exclude: Sequence[str] = (SELF_NOTEBOOK,)) -> pd.DataFrame:
    """Wall time, peak RSS and integer (size) parameters of each stage of ``run_dir`` that finished.

    Columns: ``notebook``, ``seconds``, ``share`` (of the listed total), ``peak_rss_mib`` (NaN when not recorded),
    ``finished`` and ``sizes``; stages in study order. Raises :class:`DataError` naming a corrupt record.
    """
    rows = []
    for stage in STAGES:
        done = done_record(run_dir, stage)
        if stage in exclude or not done.is_file():
            continue
        try:
            record = json.loads(done.read_text())
            seconds = float(record["seconds"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{done} is not a finished-notebook record ({exc}): re-run that notebook") from exc
        rss = record.get("peak_rss_mib")
        rows.append({"notebook": stage, "seconds": seconds,
                     "peak_rss_mib": float(rss) if rss is not None else math.nan,
                     "finished": record.get("finished", ""), "sizes": size_parameters(record.get("parameters", {}))})
    frame = pd.DataFrame(rows, columns=["notebook", "seconds", "peak_rss_mib", "finished", "sizes"])
    frame.insert(2, "share", frame["seconds"] / frame["seconds"].sum() if len(frame) else [])
    return frame


def machine_memory_mib() -> float:
    """Physical memory of this machine in MiB (NaN where the OS does not tell)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / MIB
    except (ValueError, OSError, AttributeError):
        return math.nan


def wall_time_summary(times: pd.DataFrame, machine_mib: float) -> dict[str, Any] | None:
    """The total, the slowest notebook and the largest recorded peak RSS (with its share of ``machine_mib``).

    None for an empty table; ``largest_rss_*`` are None when no notebook recorded its memory, and
    ``largest_rss_share`` also when the machine's memory is unknown (NaN).
    """
    if times.empty:
        return None
    slow = times.loc[times["seconds"].idxmax()]
    summary: dict[str, Any] = {"n_notebooks": len(times), "total_minutes": float(times["seconds"].sum()) / 60,
                               "slowest": str(slow["notebook"]), "slowest_seconds": float(slow["seconds"]),
                               "slowest_share": float(slow["share"]), "largest_rss_notebook": None,
                               "largest_rss_mib": None, "largest_rss_share": None, "machine_gib": None}
    rss = times.dropna(subset=["peak_rss_mib"])
    if not rss.empty:
        big = rss.loc[rss["peak_rss_mib"].idxmax()]
        summary.update(largest_rss_notebook=str(big["notebook"]), largest_rss_mib=float(big["peak_rss_mib"]))
        if math.isfinite(machine_mib):
            summary.update(largest_rss_share=float(big["peak_rss_mib"]) / machine_mib, machine_gib=machine_mib / 1024)
    return summary
