"""Evaluate pruned models: each distinct layer set is removed once and scored on the tasks it needs.

:func:`evaluate_sets` removes each set with :func:`avss_lib.core.layer_removal.remove_layers` and scores it
with :func:`avss_lib.core.tasks.evaluate_task`; the unpruned model is set ``none``. Finished sets are
checkpointed so that an interrupted run resumes; a checkpoint's name carries a hash of everything its results
depend on — the inputs and the source of the modules that compute scores (:data:`SCORING_MODULES`) — so it stays
valid across runs whose other code (figures, prose) changed, and the pipeline keeps the folder
(:data:`avss_lib.core.artifacts.SELF_KEYED`). :func:`precision_check` re-evaluates the unpruned model in
float32 to show what the run's dtype costs.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from torch import nn
from transformers import PreTrainedTokenizerBase

from avss_lib.core.benchmarks import Benchmark
from avss_lib.core.errors import ConfigError
from avss_lib.core.io import atomic_path
from avss_lib.core.layer_removal import remove_layers
from avss_lib.core.source_digest import PACKAGE_ROOT, source_digest
from avss_lib.core.tasks import TaskResult, evaluate_task
from avss_lib.pruning.plan import BASE_SET
from avss_lib.pruning.tasks import PRIMARY_METRIC, TaskSpec

#: The modules whose source decides a pruned set's scores (part of every checkpoint's key).
SCORING_MODULES: tuple[str, ...] = ("core/activation_stats.py", "core/answer_matching.py", "core/benchmarks.py",
                                    "core/harness.py", "core/layer_removal.py", "core/layers.py", "core/metrics.py",
                                    "core/perplexity.py", "core/tasks.py", "pruning/evaluate.py", "pruning/tasks.py")


def scoring_code_digest() -> str:
    """sha256 of the source of :data:`SCORING_MODULES`."""
    return source_digest(PACKAGE_ROOT / name for name in SCORING_MODULES)


#: Per-example column of ``TaskResult.per_example`` whose mean is the primary metric.
_PER_EXAMPLE_COLUMN = {"exact_match": "correct", "acc": "correct", "mc2": "mc2", "rougeL_acc": "correct",
                       "map": "average_precision"}


@dataclass
class Evaluations:
    """Results of :func:`evaluate_sets`: ``results[(set_id, task_key)]`` and seconds per set."""

    results: dict[tuple[str, str], TaskResult] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def summary_table(self) -> pd.DataFrame:
        """Long table: set_id, task_key, task, metric, value, low, high."""
        rows = [{"set_id": s, "task_key": k, "task": r.task, "metric": m, "value": v[0], "low": v[1], "high": v[2]}
                for (s, k), r in self.results.items() for m, v in r.summary.items()]
        return pd.DataFrame(rows)

    def per_example_table(self) -> pd.DataFrame:
        """Long table of the primary metric per example: set_id, task_key, id, num, den (metric = sum num / sum den)."""
        frames = []
        for (s, k), r in self.results.items():
            num, den = primary_values(r)
            ids = r.per_example["id"] if "id" in r.per_example else pd.Series(range(len(num)))
            frames.append(pd.DataFrame({"set_id": s, "task_key": k, "task": r.task, "id": ids.astype(str).to_numpy(),
                                        "num": num, "den": den}))
        return pd.concat(frames, ignore_index=True)


def primary_values(result: TaskResult) -> tuple[np.ndarray, np.ndarray]:
    """Per-example numerator and denominator of the primary metric: the metric is ``sum(num) / sum(den)``
    (a mean for per-example metrics; the mean NLL per token for perplexity, whose value is ``exp`` of it)."""
    metric = PRIMARY_METRIC[result.task]
    frame = result.per_example
    if metric == "perplexity":
        return frame["nll_sum"].to_numpy(dtype=float), frame["n_tokens"].to_numpy(dtype=float)
    values = frame[_PER_EXAMPLE_COLUMN[metric]].to_numpy(dtype=float)
    return values, np.ones_like(values)


def evaluate_sets(model: nn.Module, tokenizer: PreTrainedTokenizerBase, sets: Mapping[str, Sequence[int]],
                  needs: Mapping[str, Sequence[str]], tasks: Mapping[str, tuple[TaskSpec, Benchmark]], *,
                  batch_size: int = 8, seed: int = 0, checkpoint_dir: Path | None = None,
                  log: Any = None) -> Evaluations:
    """Evaluate each set (``set_id -> layers``; ``[]`` = unpruned) on the task keys ``needs[set_id]``.

    Each set is removed once (a deep copy) and freed after its tasks. ``tasks``: ``task_key -> (spec,
    benchmark)``. With ``checkpoint_dir`` each
    finished set is saved there (atomically, under a key of everything that determines its results) and a
    re-run after an interruption loads it instead of recomputing; an unreadable checkpoint is recomputed.
    ``log``: a callable given one progress line per set.
    """
    out = Evaluations()
    for sid, layers in sets.items():
        keys = list(dict.fromkeys(needs.get(sid, ())))
        if not keys:
            continue
        checkpoint = (checkpoint_dir / f"{sid}-{_set_key(model, layers, keys, tasks, batch_size, seed)}.pkl"
                      if checkpoint_dir is not None else None)
        saved = _load_checkpoint(checkpoint, log)
        if saved is not None:
            results, out.seconds[sid] = saved
            out.results.update({(sid, key): results[key] for key in keys})
            if log:
                log(f"{sid}: {len(keys)} task(s) loaded from {checkpoint.name}")
            continue
        start = time.perf_counter()
        pruned = remove_layers(model, layers) if layers else model
        results = {}
        for key in keys:
            spec, bench = tasks[key]
            opts = dict(spec.options)
            bs = opts.pop("batch_size", batch_size)
            results[key] = evaluate_task(pruned, tokenizer, bench, batch_size=bs, seed=seed, **opts)
        del pruned
        out.seconds[sid] = time.perf_counter() - start
        out.results.update({(sid, key): results[key] for key in keys})
        if checkpoint is not None:
            with atomic_path(checkpoint) as tmp:
                tmp.write_bytes(pickle.dumps((results, out.seconds[sid])))
        if log:
            log(f"{sid}: {len(keys)} task(s) in {out.seconds[sid]:.0f} s")
    return out


def evaluate_share(model: nn.Module, tokenizer: PreTrainedTokenizerBase, share: Sequence[tuple[str, Sequence[int]]],
                   *, needs: Mapping[str, Sequence[str]], tasks: Mapping[str, tuple[TaskSpec, Benchmark]],
                   batch_size: int, seed: int, checkpoint_dir: Path) -> None:
    """A worker's share of :func:`evaluate_sets` (:func:`avss_lib.core.workers.prefill`): its ``(set_id, layers)``
    pairs evaluated into ``checkpoint_dir``, where the serial pass finds them."""
    evaluate_sets(model, tokenizer, dict(share), needs, tasks, batch_size=batch_size, seed=seed,
                  checkpoint_dir=checkpoint_dir)


def _set_key(model: nn.Module, layers: Sequence[int], keys: Sequence[str],
             tasks: Mapping[str, tuple[TaskSpec, Benchmark]], batch_size: int, seed: int) -> str:
    """A short hash of everything that determines one set's results (model, dtype, layers, tasks, data, options,
    and the scoring code)."""
    first = next(model.parameters())
    parts = [getattr(model.config, "_name_or_path", ""), str(model.config.num_hidden_layers), str(first.dtype),
             str(list(layers)), str(batch_size), str(seed), scoring_code_digest()]
    for key in keys:
        spec, bench = tasks[key]
        parts += [repr(spec), json.dumps(bench.provenance, sort_keys=True, default=str)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _load_checkpoint(path: Path | None, log: Any) -> tuple[dict[str, TaskResult], float] | None:
    if path is None or not path.is_file():
        return None
    try:
        return pickle.loads(path.read_bytes())
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as exc:
        # a truncated or foreign file: recompute rather than fail
        if log:
            log(f"ignoring unreadable checkpoint {path} ({exc}); recomputing")
        return None


def precision_check(reference: nn.Module, tokenizer: PreTrainedTokenizerBase, evaluations: Evaluations,
                    tasks: Mapping[str, tuple[TaskSpec, Benchmark]], *, batch_size: int = 8,
                    seed: int = 0) -> pd.DataFrame:
    """The unpruned model in ``reference``'s dtype (float32) against the run's unpruned results on ``tasks``.

    Returns one row per task: the primary metric in the run's dtype and in the reference dtype, their
    difference, and the share of examples whose per-example primary value is the same in both (NaN for
    perplexity, whose per-window losses always differ a little). It tells how much of a retention number could be
    an artefact of evaluating in reduced precision.
    """
    missing = [key for key in tasks if (BASE_SET, key) not in evaluations.results]
    if missing:
        raise ConfigError(f"the run has no unpruned results for {missing}: evaluate set {BASE_SET!r} on them first")
    ref = evaluate_sets(reference, tokenizer, {BASE_SET: []}, {BASE_SET: list(tasks)}, tasks,
                        batch_size=batch_size, seed=seed)
    rows = []
    for key in tasks:
        run, fp = evaluations.results[(BASE_SET, key)], ref.results[(BASE_SET, key)]
        metric = PRIMARY_METRIC[run.task]
        (num_a, den_a), (num_b, den_b) = primary_values(run), primary_values(fp)
        same = (float(np.mean(np.isclose(num_a / den_a, num_b / den_b, rtol=1e-6, atol=1e-9)))
                if metric != "perplexity" and len(num_a) > 1 else float("nan"))
        rows.append({"task_key": key, "metric": metric, "dtype": run.settings.get("dtype"),
                     "value": run.summary[metric][0], "value_float32": fp.summary[metric][0],
                     "difference": run.summary[metric][0] - fp.summary[metric][0], "same_per_example": same,
                     "n": len(num_a)})
    return pd.DataFrame(rows)
