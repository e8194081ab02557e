"""Independent jobs of a stage in worker processes, each with its own copy of the model.

A 135M-parameter model leaves most of a GPU idle, so chapter 03's pruned sets and chapter 05's training runs, which
are independent of each other, can run several at a time on one card. :func:`prefill` splits the jobs among
``workers`` spawned processes; each loads the model with :func:`avss_lib.core.models.load_model` and runs its share
through a function that writes every finished job to the stage's resumable store (chapter 03's per-set
checkpoints, chapter 05's run folders). The stage's own serial pass then finds every job finished and reads it, so
the results are those of a serial run, and a worker that fails leaves its unfinished jobs to that pass. With
``workers`` ≤ 1 nothing happens: the serial pass does all the work, as before.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any, TypeVar

import torch

from avss_lib.core.errors import ConfigError

T = TypeVar("T")

#: A job function: ``fn(model, tokenizer, jobs)`` runs ``jobs`` and writes each one's result to disk.
JobFunction = Callable[[Any, Any, Sequence[Any]], None]


def check_workers(workers: int) -> int:
    """``workers`` if it is a whole number ≥ 1, else a :class:`ConfigError`."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers={workers!r} must be a whole number >= 1 (1: no worker processes)")
    return workers


def shares(jobs: Sequence[T], workers: int) -> list[list[T]]:
    """``jobs`` dealt round-robin into at most ``workers`` non-empty shares (the costly first jobs spread out)."""
    return [share for w in range(workers) if (share := list(jobs[w::workers]))]


def _run_share(fn: JobFunction, share: Sequence[Any], model: str, device: str, dtype: str, threads: int) -> None:
    from avss_lib.core.models import load_model

    torch.set_num_threads(threads)
    lm, tokenizer = load_model(model, device=device, dtype=dtype)
    fn(lm, tokenizer, share)


def prefill(fn: JobFunction, jobs: Sequence[Any], *, workers: int, model: str, device: str, dtype: str) -> list[str]:
    """Run ``fn`` on ``workers`` shares of ``jobs`` in spawned processes (``fn`` and ``jobs`` must pickle) and wait.

    On a CPU the cores are divided among the workers. Returns one line per failed worker (its exception); its
    jobs are left to the caller's serial pass.
    """
    check_workers(workers)
    parts = shares(jobs, workers)
    if workers == 1 or len(parts) < 2:
        return []
    threads = 1 if device != "cpu" else max(1, (os.cpu_count() or 1) // len(parts))
    failures = []
    with ProcessPoolExecutor(len(parts), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_run_share, fn, part, model, device, dtype, threads) for part in parts]
        for i, future in enumerate(futures):
            if (error := future.exception()) is not None:
                failures.append(f"worker {i}: {error.__class__.__name__}: {error}")
    return failures
