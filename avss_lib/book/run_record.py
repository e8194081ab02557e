"""A committed record of one run (``avss record``), for runs made outside the book's own build.

A run on a GPU machine, or with another model, is cited in the README and in notes rather than rendered, so its
numbers need a record that says when, where and with what they were made: the date, the commit, the machine and
GPU, the package versions, the model file's provenance, each notebook's wall time and peak memory, any further
timings (set-up, book build) and every verdict the run's chapters wrote, as data. A run cut off midway is recorded
too: the stages started but not finished say when they started, and chapter 05's finished training runs each give
their training and evaluation seconds.
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from avss_lib.book.reproducibility import PACKAGES, package_version
from avss_lib.core.artifacts import (PROVENANCE_01, STAGES, RunDir, finished_mitigation_runs, finished_stages,
                                     started_record, verdict)
from avss_lib.core.errors import DataError
from avss_lib.core.io import read_json, write_json


def current_commit() -> str | None:
    """The commit that ran: ``AVSS_COMMIT`` if set (a machine given a copy of the tree has no history), else git's."""
    if os.environ.get("AVSS_COMMIT"):
        return os.environ["AVSS_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip() or None


def benchmark_machine(packages: tuple[str, ...], device: str = "cpu") -> dict[str, Any]:
    """What a benchmark's record says of where it ran: the commit, the machine (platform, Python, CPUs, torch
    threads, device) and the versions of ``packages``."""
    return {"commit": current_commit(),
            "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                        "torch_threads": torch.get_num_threads(), "device": device},
            "versions": {p: package_version(p) for p in packages}}


def run_record(run_dir: RunDir, *, what: str, seconds: Mapping[str, float] | None = None) -> dict[str, Any]:
    """The record of the finished notebooks of ``run_dir`` (raises :class:`DataError` when none finished)."""
    run_dir = Path(run_dir)
    notebooks = {stage: {"seconds": round(d["seconds"], 1), "peak_rss_mib": round(d["peak_rss_mib"]),
                         "finished": d["finished"]} for stage, d in finished_stages(run_dir).items()}
    if not notebooks:
        raise DataError(f"{run_dir} holds no finished notebook: run `avss run --run-dir {run_dir}` first")
    return {
        "what": what,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "commit": current_commit(),
        "run_dir": run_dir.name,
        "machine": platform.platform(),
        "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "versions": {p: package_version(p) for p in PACKAGES},
        "model": PROVENANCE_01.read(run_dir)["model"] if PROVENANCE_01.exists(run_dir) else None,
        "seconds": {k: round(float(v), 1) for k, v in (seconds or {}).items()},
        "notebooks": notebooks,
        "unfinished": {stage: read_json(started_record(run_dir, stage))["started"] for stage in STAGES
                       if stage not in notebooks and started_record(run_dir, stage).is_file()},
        "mitigation_runs": {run_id: {"train_seconds": round(r["train_seconds"], 1),
                                     "eval_seconds": round(r["eval_seconds"], 1),
                                     "steps_run": r.get("steps_run"), "best_step": r.get("best_step")}
                            for run_id, r in finished_mitigation_runs(run_dir).items()},
        "verdicts": {stage: verdict(stage).read(run_dir) for stage in STAGES if verdict(stage).exists(run_dir)},
    }


def write_run_record(run_dir: RunDir, record: str | os.PathLike[str], *, what: str,
                     seconds: Mapping[str, float] | None = None) -> Path:
    """Write :func:`run_record` of ``run_dir`` to ``record`` (JSON, atomically); return its path."""
    return write_json(run_record(run_dir, what=what, seconds=seconds), record)
