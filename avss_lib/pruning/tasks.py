"""The evaluations of the pruning chapter: which benchmarks, how many examples, and the metric each is judged on.

A :class:`TaskSpec` names one evaluation (a benchmark, its size, the evaluator's options and split);
:func:`task_specs` builds them from the chapter's ``tasks`` and ``task_options`` parameters and
:func:`load_task` loads the seeded subset it asks for. Per task one *primary* metric
(:data:`PRIMARY_METRIC`) is compared; every metric the evaluator reports is kept in the result tables.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from transformers import PreTrainedTokenizerBase

from avss_lib.core.benchmarks import Benchmark, load_benchmark
from avss_lib.core.errors import ConfigError
from avss_lib.core.tasks import TASKS

#: The metric each task is judged on (every other metric is still reported).
PRIMARY_METRIC: dict[str, str] = {
    "nq_open": "exact_match", "triviaqa": "exact_match", "sciq": "acc", "truthfulqa_mc": "mc2",
    "truthfulqa_gen": "rougeL_acc", "wikiqa": "map", "sst2": "acc", "wikitext2": "perplexity",
}
#: Claim A1's three task families.
TASK_FAMILY: dict[str, str] = {
    "nq_open": "question answering", "triviaqa": "question answering", "sciq": "question answering",
    "truthfulqa_mc": "question answering", "truthfulqa_gen": "question answering", "wikiqa": "question answering",
    "sst2": "sentiment", "wikitext2": "language modelling",
}
CURVE_SUFFIX = "@curve"  # task key suffix of a curve evaluation that differs from the table's


def task_name(task_key: str) -> str:
    """The benchmark of a task key: ``"sciq@curve"`` -> ``"sciq"``."""
    return task_key.split("@", 1)[0]


@dataclass(frozen=True)
class TaskSpec:
    """One evaluation: benchmark ``name``, ``n`` examples (for ``wikitext2``: tokens) and evaluator options."""

    key: str
    name: str
    n: int | None
    options: dict[str, Any] = field(default_factory=dict)
    split: str | None = None


def task_specs(sizes: Mapping[str, int | None], options: Mapping[str, Mapping[str, Any]] | None = None, *,
               suffix: str = "") -> list[TaskSpec]:
    """Turn ``{task: n}`` (and per-task evaluator options, which may carry ``split``) into :class:`TaskSpec` s.

    Raises :class:`ConfigError` for an unknown task, a non-positive ``n`` or options for a task not listed.
    """
    options = dict(options or {})
    if not sizes:
        raise ConfigError("no tasks given: list at least one of " + ", ".join(TASKS))
    unknown = [t for t in [*sizes, *options] if t not in TASKS]
    if unknown:
        raise ConfigError(f"unknown task(s) {unknown}: choose from {', '.join(TASKS)}")
    specs = []
    for name, n in sizes.items():
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
            raise ConfigError(f"task {name}: n must be a positive integer or None (all), got {n!r}")
        opts = dict(options.get(name, {}))
        split = opts.pop("split", None)
        specs.append(TaskSpec(name + suffix, name, n, opts, split))
    return specs


def curve_task_specs(table: Sequence[TaskSpec], sizes: Mapping[str, int | None],
                     options: Mapping[str, Mapping[str, Any]] | None = None) -> list[TaskSpec]:
    """Task specs of the curve: a table spec where the curve asks for the same evaluation (so its results are
    reused), else a spec keyed ``<task>@curve``."""
    out = []
    for s in task_specs(sizes, options, suffix=CURVE_SUFFIX):
        same = next((t for t in table if (t.name, t.n, t.options, t.split) == (s.name, s.n, s.options, s.split)), None)
        out.append(same or s)
    return out


def load_task(spec: TaskSpec, tokenizer: PreTrainedTokenizerBase, data_root: str | None, seed: int) -> Benchmark:
    """The benchmark of ``spec``: a seeded subset of ``n`` examples, or for ``wikitext2`` the first ``n`` tokens.

    Errors (unknown task, split, ``n`` above the split's size) are the loader's :class:`ConfigError`.
    """
    if spec.name != "wikitext2":
        return load_benchmark(spec.name, data_root=data_root, split=spec.split, n=spec.n, seed=seed)
    bench = load_benchmark("wikitext2", data_root=data_root, split=spec.split)
    return bench if spec.n is None else truncate_text(bench, tokenizer, spec.n)


def truncate_text(bench: Benchmark, tokenizer: PreTrainedTokenizerBase, n_tokens: int) -> Benchmark:
    """The shortest prefix of whole lines of a one-text benchmark with at least ``n_tokens`` tokens.

    Raises :class:`ConfigError` when the whole text has fewer tokens.
    """
    text = "".join(e.text or "" for e in bench.examples)
    kept, count = [], 0
    for line in text.splitlines(keepends=True):
        if count >= n_tokens:
            break
        kept.append(line)
        count += len(tokenizer(line, add_special_tokens=False)["input_ids"])
    if count < n_tokens:
        raise ConfigError(f"{bench.name} has only about {count} tokens, fewer than the n={n_tokens} requested: "
                          f"lower n (or use n=None for the whole split)")
    example = replace(bench.examples[0], text="".join(kept))
    provenance = {**bench.provenance, "n_tokens_requested": n_tokens, "lines_kept": len(kept)}
    return Benchmark(bench.name, [example], provenance)
