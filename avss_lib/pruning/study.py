"""Claim A1, measured: rank layers by AVSS and by every baseline, prune, and evaluate on the seven benchmarks.

The study runs in four steps, each a function the notebook calls:

1. :func:`method_scores` — one per-layer score per method on the same calibration tokens (higher = more
   important, the :mod:`avss_lib.ranking.baselines` convention): every AVSS variant of notebook 02 (``avss:<variant>``),
   ``random:<seed>`` for several seeds, ``last_k``, ``block_influence``, ``angular_distance``, the single-layer
   removal oracle ``delta_ppl`` and, optionally, SLEB's greedy order ``sleb``. The oracle runs on notebook 01's
   calibration batches, rebuilt from its ``meta.json`` (:func:`calibration_batches_from_meta`).
2. :func:`plan_pruned_sets` — for every method and ratio the ``layers_for_ratio`` lowest-scoring layers
   (:func:`avss_lib.ranking.baselines.select_lowest`: ties by layer index); identical layer sets get one ``set_id`` so
   each is evaluated once (:func:`unique_sets`).
3. :func:`evaluate_sets` — each unique set is removed with :func:`avss_lib.core.layer_removal.remove_layers` and scored with
   :func:`avss_lib.core.harness.evaluate_task` on the tasks it needs; the unpruned model is set ``none``.
   TruthfulQA-MC prompts all start with the same 6-shot primer, so that task runs on a
   :class:`SharedPrefixLM`, which computes the primer's keys and values once per model (same logits).
4. :func:`retention_table`, :func:`comparison_table`, :func:`curve_table`, :func:`measure_speedup` — absolute
   scores with their bootstrap CIs, % of the unpruned score with a paired bootstrap CI, and AVSS minus each
   baseline with a paired bootstrap CI (the rule that decides "beyond the CIs").

Per task one *primary* metric (:data:`PRIMARY_METRIC`) is compared; every metric the evaluator reports is kept
in the result tables. For perplexity, "% retained" is ``ppl(unpruned) / ppl(pruned) × 100`` and differences
are in log-perplexity (positive = better), so "higher is better" holds for every compared quantity.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import pickle
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase
from transformers.modeling_outputs import CausalLMOutputWithPast

from avss_lib.ranking import baselines
from avss_lib.core.benchmarks import Benchmark, load_benchmark
from avss_lib.core.calibration_text import load_calibration_texts, make_batches
from avss_lib.core.errors import ConfigError, DataError
from avss_lib.core.harness import PROMPTS, TASKS, TaskResult, evaluate_task
from avss_lib.core.io import atomic_path
from avss_lib.core.layers import find_layers
from avss_lib.core.models import synchronize
from avss_lib.core.layer_removal import layers_for_ratio, remove_layers

#: The metric each task is judged on (every other metric is still reported).
PRIMARY_METRIC: dict[str, str] = {
    "nq_open": "exact_match", "triviaqa": "exact_match", "sciq": "acc", "truthfulqa_mc": "mc2",
    "truthfulqa_gen": "rougeL_acc", "wikiqa": "map", "sst2": "acc", "wikitext2": "perplexity",
}
#: Per-example column of ``TaskResult.per_example`` whose mean is the primary metric.
_PER_EXAMPLE_COLUMN = {"exact_match": "correct", "acc": "correct", "mc2": "mc2", "rougeL_acc": "correct",
                       "map": "average_precision"}
#: Score of a uniform random guess, where it is a constant (used to flag uninformative ratios).
CHANCE: dict[str, float] = {"sciq": 0.25, "sst2": 0.5, "nq_open": 0.0, "triviaqa": 0.0, "truthfulqa_gen": 0.0}
#: Claim A1's three task families.
TASK_FAMILY: dict[str, str] = {
    "nq_open": "question answering", "triviaqa": "question answering", "sciq": "question answering",
    "truthfulqa_mc": "question answering", "truthfulqa_gen": "question answering", "wikiqa": "question answering",
    "sst2": "sentiment", "wikitext2": "language modelling",
}
BASE_SET = "none"  # set_id of the unpruned model
BASELINE_FAMILIES = ("random", "last_k", "block_influence", "angular_distance", "delta_ppl", "sleb")


# ------------------------------------------------------------------------------------ tasks


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


# ------------------------------------------------------------------------------------ shared-prefix model


class SharedPrefixLM(nn.Module):
    """A causal LM that encodes a fixed token prefix once and reuses its keys and values.

    ``forward(input_ids, attention_mask)`` on a batch whose rows all start with ``prefix_ids`` (unmasked) runs
    the model only on the rest, with a copy of the cached prefix, and returns logits for the whole width (the
    prefix's own logits are cached too): the same numbers as the wrapped model up to float round-off. Any other
    call, and ``generate``, goes to the wrapped model unchanged. Inputs must be right padded (position ids
    continue from the prefix), as :func:`avss_lib.core.harness.loglikelihood` pads them.
    """

    def __init__(self, model: nn.Module, prefix_ids: Sequence[int]) -> None:
        super().__init__()
        if len(prefix_ids) < 1:
            raise ConfigError("the shared prefix is empty: give at least one token")
        self.model = model
        self.config = model.config
        self.register_buffer("prefix", torch.tensor(list(prefix_ids), dtype=torch.long), persistent=False)
        self._cache: Any = None
        self.hits = 0

    def _prefix_state(self) -> tuple[Any, torch.Tensor]:
        if self._cache is None:
            device = next(self.model.parameters()).device
            with torch.inference_mode():
                out = self.model(input_ids=self.prefix[None].to(device), use_cache=True)
            self._cache = (out.past_key_values, out.logits)
        return self._cache

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        width = len(self.prefix)
        shared = (not kwargs and input_ids.shape[1] > width
                  and bool((input_ids[:, :width] == self.prefix.to(input_ids.device)).all())
                  and (attention_mask is None or bool((attention_mask[:, :width] == 1).all())))
        if not shared:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        cache, prefix_logits = self._prefix_state()
        batch = input_ids.shape[0]
        past = copy.deepcopy(cache)
        past.batch_repeat_interleave(batch)
        out = self.model(input_ids=input_ids[:, width:], attention_mask=attention_mask, past_key_values=past,
                         use_cache=True)
        self.hits += 1
        logits = torch.cat([prefix_logits.expand(batch, -1, -1), out.logits], dim=1)
        return CausalLMOutputWithPast(logits=logits)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.model.generate(*args, **kwargs)


def truthfulqa_prefix_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Tokens of the TruthfulQA primer that every TruthfulQA prompt starts with (checked, not assumed)."""
    primer = PROMPTS["truthfulqa"].split("{question}")[0]
    stable = primer.rsplit("\n\n", 1)[0]  # stop before the "\n\nQ:" that joins the question
    ids = list(tokenizer(stable, add_special_tokens=False)["input_ids"])
    probe = list(tokenizer(PROMPTS["truthfulqa"].format(question="Is this a probe?") + " Yes",
                           add_special_tokens=False)["input_ids"])
    while ids and probe[:len(ids)] != ids:  # a merge across the boundary: back off one token
        ids = ids[:-1]
    return ids[:-1] if len(ids) > 1 else ids  # keep the last primer token in the scored part


# ------------------------------------------------------------------------------------ calibration & scores


def calibration_batches_from_meta(meta: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase, *,
                                  data_root: str | None, n_samples: int | None = None) -> list[dict[str, torch.Tensor]]:
    """Notebook 01's calibration batches, rebuilt from its ``meta.json`` (data set, split, samples, seed,
    max_length, batch size, padding); ``n_samples`` keeps only the first samples (a prefix of the same tokens).

    Raises :class:`DataError` when the calibration file's sha256 differs from the one notebook 01 used.
    """
    data, params = meta["data"], meta["parameters"]
    texts, provenance = load_calibration_texts(data["benchmark"], data["split"], data["n_samples"],
                                               data["seed"], data_root)
    expected, found = data.get("sha256"), provenance.get("sha256")
    if expected and found and expected != found:
        raise DataError(f"the calibration file differs from the one notebook 01 used ({found} vs {expected}): "
                        "point data_root at the same data, or re-run notebook 01")
    if n_samples is not None:
        if not 1 <= n_samples <= len(texts):
            raise ConfigError(f"n_samples={n_samples} but notebook 01 used {len(texts)} calibration samples: "
                              f"choose 1..{len(texts)} (or None for all)")
        texts = texts[:n_samples]
    return make_batches(tokenizer, texts, max_length=params["max_length"], batch_size=params["batch_size"],
                        padding=params["padding"])


def method_scores(stats: pd.DataFrame, avss_scores: pd.DataFrame, *, random_seeds: Sequence[int],
                  model: nn.Module | None = None, oracle_batches: Sequence[Mapping[str, torch.Tensor]] | None = None,
                  sleb_layers: int = 0) -> dict[str, pd.Series]:
    """Per-layer scores (higher = more important, indexed by layer) of every method, in a fixed order.

    ``stats``: notebook 01's table (``block_output`` rows give BI and angular distance); ``avss_scores``:
    notebook 02's table (one ``avss`` column per variant; infinite scores rank last, ties by layer index).
    With ``model`` and ``oracle_batches`` the removal-ΔPPL oracle is added, and with ``sleb_layers > 0``
    SLEB's greedy order of that many layers (removed first = lowest score; the rest keep their oracle order
    above them). Raises :class:`DataError` when the tables disagree on the number of layers.
    """
    block = stats[stats["site"] == "block_output"].sort_values("layer")
    if block.empty:
        raise DataError("the statistics have no block_output rows: notebook 01 must collect site block_output")
    layers = block["layer"].astype(int).to_numpy()
    n_layers = len(layers)
    if len(set(random_seeds)) != len(random_seeds):
        raise ConfigError(f"random seeds {list(random_seeds)} repeat: give distinct seeds")
    scores: dict[str, pd.Series] = {}
    for variant, group in avss_scores.groupby("variant", sort=False):
        group = group.sort_values("layer")
        if len(group) != n_layers:
            raise DataError(f"AVSS variant {variant} has {len(group)} layers but the statistics have {n_layers}: "
                            "re-run notebooks 01 and 02 on the same model")
        scores[f"avss:{variant}"] = pd.Series(group["avss"].to_numpy(dtype=float), index=layers)
    for seed in random_seeds:
        scores[f"random:{seed}"] = pd.Series(baselines.random_scores(n_layers, seed), index=layers)
    scores["last_k"] = pd.Series(baselines.last_k_scores(n_layers), index=layers)
    scores["block_influence"] = pd.Series(baselines.block_influence(block["cos_mean"].to_numpy()), index=layers)
    scores["angular_distance"] = pd.Series(baselines.angular_distance(block["cos_last"].to_numpy()), index=layers)
    if model is not None and oracle_batches is not None:
        if len(find_layers(model)) != n_layers:
            raise DataError(f"the model has {len(find_layers(model))} layers, the statistics {n_layers}: "
                            "use the model notebook 01 ran on")
        delta = baselines.removal_delta_ppl(model, oracle_batches, progress=False)
        scores["delta_ppl"] = pd.Series(delta, index=layers)
        if sleb_layers:
            order = baselines.greedy_removal_order(model, oracle_batches, sleb_layers, progress=False)
            sleb = pd.Series(np.argsort(np.argsort(delta)).astype(float) + n_layers, index=layers)
            sleb[order] = np.arange(len(order), dtype=float)
            scores["sleb"] = sleb
    return scores


def method_family(method: str) -> str:
    """``avss``, ``random`` or the baseline's name."""
    return method.split(":", 1)[0]


# ------------------------------------------------------------------------------------ pruned sets


def plan_pruned_sets(scores: Mapping[str, pd.Series], ratios: Iterable[float], *, rounding: str = "round"
                     ) -> pd.DataFrame:
    """One row per (method, ratio): ``k`` layers to remove, the ``layers`` (sorted list), ``arbitrary`` (a
    selected layer's score is infinite, so the order among those layers was decided by the tie rule), and a
    ``set_id`` shared by identical sets. Raises :class:`ConfigError` for a ratio outside (0, 1)."""
    rows = []
    ratios = list(ratios)
    if not ratios:
        raise ConfigError("no pruning ratio given: give at least one fraction in (0, 1)")
    for ratio in ratios:
        for method, score in scores.items():
            k = layers_for_ratio(len(score), float(ratio), rounding=rounding)
            layers = baselines.select_lowest(score, k)
            arbitrary = bool(np.isinf(score.loc[layers].to_numpy()).any())
            rows.append({"method": method, "family": method_family(method), "ratio": float(ratio), "k": k,
                         "fraction_removed": k / len(score), "layers": layers, "arbitrary": arbitrary})
    plan = pd.DataFrame(rows)
    plan["set_id"] = plan["layers"].map(set_id)
    return plan


def set_id(layers: Iterable[int]) -> str:
    """A readable identifier of a layer set (``none`` for the empty set)."""
    layers = sorted(int(i) for i in layers)
    return "L" + "-".join(map(str, layers)) if layers else BASE_SET


def unique_sets(plan: pd.DataFrame) -> dict[str, list[int]]:
    """``set_id -> layers`` for every distinct set of the plan (first appearance order)."""
    return {row.set_id: list(row.layers) for row in plan.drop_duplicates("set_id").itertuples()}


# ------------------------------------------------------------------------------------ evaluation


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
                  batch_size: int = 8, seed: int = 0, share_prefix: bool = True, checkpoint_dir: Path | None = None,
                  log: Any = None) -> Evaluations:
    """Evaluate each set (``set_id -> layers``; ``[]`` = unpruned) on the task keys ``needs[set_id]``.

    Each set is removed once (a deep copy) and freed after its tasks. ``tasks``: ``task_key -> (spec,
    benchmark)``. ``share_prefix`` runs TruthfulQA-MC on a :class:`SharedPrefixLM`. With ``checkpoint_dir`` each
    finished set is saved there (atomically, under a key of everything that determines its results) and a
    re-run after an interruption loads it instead of recomputing; an unreadable checkpoint is recomputed.
    ``log``: a callable given one progress line per set.
    """
    out = Evaluations()
    prefix = truthfulqa_prefix_ids(tokenizer) if share_prefix else None
    for sid, layers in sets.items():
        keys = list(dict.fromkeys(needs.get(sid, ())))
        if not keys:
            continue
        checkpoint = (checkpoint_dir / f"{sid}-{_set_key(model, layers, keys, tasks, batch_size, seed, share_prefix)}.pkl"
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
            target = SharedPrefixLM(pruned, prefix) if prefix and spec.name == "truthfulqa_mc" else pruned
            opts = dict(spec.options)
            bs = opts.pop("batch_size", batch_size)
            results[key] = evaluate_task(target, tokenizer, bench, batch_size=bs, seed=seed, **opts)
        del pruned
        out.seconds[sid] = time.perf_counter() - start
        out.results.update({(sid, key): results[key] for key in keys})
        if checkpoint is not None:
            with atomic_path(checkpoint) as tmp:
                tmp.write_bytes(pickle.dumps((results, out.seconds[sid])))
        if log:
            log(f"{sid}: {len(keys)} task(s) in {out.seconds[sid]:.0f} s")
    return out


def _set_key(model: nn.Module, layers: Sequence[int], keys: Sequence[str],
             tasks: Mapping[str, tuple[TaskSpec, Benchmark]], batch_size: int, seed: int, share_prefix: bool) -> str:
    """A short hash of everything that determines one set's results (model, dtype, layers, tasks, data, options)."""
    first = next(model.parameters())
    parts = [getattr(model.config, "_name_or_path", ""), str(model.config.num_hidden_layers), str(first.dtype),
             str(list(layers)), str(batch_size), str(seed), str(share_prefix)]
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
    perplexity, whose per-window losses always differ a little). It tells how much of a retention number could be an artefact of
    evaluating in reduced precision.
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


# ------------------------------------------------------------------------------------ statistics


def _arrays(per_example: pd.DataFrame, set_ids: Sequence[str], task_key: str) -> tuple[np.ndarray, np.ndarray]:
    """(num, den) arrays of shape (len(set_ids), n_examples), rows aligned on example id."""
    rows = per_example[per_example["task_key"] == task_key]
    nums, dens, ids = [], [], None
    for sid in set_ids:
        r = rows[rows["set_id"] == sid]
        if r.empty:
            raise DataError(f"no results for set {sid} on {task_key}: evaluate it first")
        if ids is None:
            ids = r["id"].to_numpy()
        elif not np.array_equal(ids, r["id"].to_numpy()):
            raise DataError(f"set {sid} was evaluated on different {task_key} examples: results are not paired")
        nums.append(r["num"].to_numpy(dtype=float))
        dens.append(r["den"].to_numpy(dtype=float))
    return np.array(nums), np.array(dens)


def _score(task: str, num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """Performance on a 'higher is better' scale: the metric, or minus the mean NLL for perplexity."""
    ratio = num.sum(-1) / den.sum(-1)
    return -ratio if PRIMARY_METRIC[task] == "perplexity" else ratio


def _retention(task: str, score: np.ndarray, base: np.ndarray) -> np.ndarray:
    """% of the unpruned score; for perplexity ppl_base / ppl_pruned × 100 (``score`` is minus the mean NLL)."""
    if PRIMARY_METRIC[task] == "perplexity":
        return 100.0 * np.exp(score - base)
    with np.errstate(divide="ignore", invalid="ignore"):
        return 100.0 * score / base


def paired_bootstrap(task: str, a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray],
                     statistic: str, *, n_resamples: int = 2000, seed: int = 0,
                     confidence_level: float = 0.95) -> tuple[float, float, float]:
    """Paired bootstrap of ``a`` against ``b`` on the same examples, as (value, low, high).

    ``a`` and ``b`` are (num, den) arrays of shape (n_sets, n_examples); several rows are model replicates
    (random seeds): the statistic uses their mean score, and the bootstrap resamples the replicates too (a
    two-level bootstrap: examples, jointly for a and b, and seeds with replacement). ``statistic``:
    ``"difference"`` (score(a) − score(b); log-perplexity for perplexity, positive = a better) or
    ``"retention"`` (% of b's score, see :func:`_retention`). Percentile interval.
    """
    if statistic not in ("difference", "retention"):
        raise ConfigError(f"unknown statistic {statistic!r}: use 'difference' or 'retention'")
    (an, ad), (bn, bd) = a, b
    if an.shape[1] != bn.shape[1]:
        raise DataError(f"paired samples differ in size ({an.shape[1]} vs {bn.shape[1]} examples)")
    rng = np.random.default_rng(seed)
    n = an.shape[1]

    def stat(sa: np.ndarray, sb: np.ndarray) -> np.ndarray:
        sa, sb = sa.mean(0), sb.mean(0)
        return sa - sb if statistic == "difference" else _retention(task, sa, sb)

    value = float(stat(_score(task, an, ad)[:, None], _score(task, bn, bd)[:, None])[0])
    idx = rng.integers(0, n, size=(n_resamples, n))
    counts = np.stack([np.bincount(row, minlength=n) for row in idx]).astype(float)  # (R, n)

    def resampled(num: np.ndarray, den: np.ndarray) -> np.ndarray:  # (n_sets, R) scores
        s = (num @ counts.T) / (den @ counts.T)
        s = -s if PRIMARY_METRIC[task] == "perplexity" else s
        if len(num) > 1:  # resample replicates: (R, n_sets) picks -> gathered (n_sets, R)
            pick = rng.integers(0, len(num), size=(n_resamples, len(num)))
            s = np.take_along_axis(s.T, pick, axis=1).T
        return s

    draws = stat(resampled(an, ad), resampled(bn, bd))
    draws = draws[np.isfinite(draws)]
    if draws.size == 0:
        return value, float("nan"), float("nan")
    alpha = (1 - confidence_level) / 2
    return value, float(np.quantile(draws, alpha)), float(np.quantile(draws, 1 - alpha))


def chance_level(task: str, bench: Benchmark, *, n_permutations: int = 200, seed: int = 0) -> float | None:
    """Expected primary score of a uniform random guess on ``bench``: :data:`CHANCE` where it is a constant,
    the mean share of true answers for TruthfulQA MC2, the mean average precision of random candidate orders
    for WikiQA (Monte Carlo, seeded), ``None`` for perplexity."""
    if PRIMARY_METRIC[task] == "perplexity":
        return None
    if task == "truthfulqa_mc":
        return float(np.mean([np.mean(e.mc2_labels) for e in bench.examples if e.mc2_labels]))
    if task == "wikiqa":
        from avss_lib.core.metrics import average_precision

        rng = np.random.default_rng(seed)
        values = []
        for e in bench.examples:
            if not e.correct_choices or not e.choices:
                continue  # the evaluator drops questions without a correct sentence
            labels = np.zeros(len(e.choices), dtype=int)
            labels[list(e.correct_choices)] = 1
            values.append(np.mean([average_precision(rng.random(len(labels)), labels) for _ in range(n_permutations)]))
        return float(np.mean(values)) if values else 0.0
    return CHANCE.get(task, 0.0)


def informative(task: str, base_low: float, chance: float | None = None) -> bool:
    """Whether a % of the unpruned score means anything: the unpruned CI's lower end is above ``chance``
    (default :data:`CHANCE`, 0 where absent); always true for perplexity."""
    if PRIMARY_METRIC[task] == "perplexity":
        return True
    return base_low > (CHANCE.get(task, 0.0) if chance is None else chance)


def _pool(values: pd.Series, metric: str) -> dict[str, float]:
    """Mean (geometric for perplexity), sd, min and max of one score per random seed."""
    v = values.to_numpy(dtype=float)
    mean = float(np.exp(np.log(v).mean())) if metric == "perplexity" else float(v.mean())
    return {"value": mean, "sd": float(v.std(ddof=1)) if len(v) > 1 else np.nan, "min": float(v.min()),
            "max": float(v.max())}


def _methods_by_set(plan: pd.DataFrame, ratio: float) -> pd.DataFrame:
    return plan[np.isclose(plan["ratio"], ratio)]


def retention_table(plan: pd.DataFrame, summary: pd.DataFrame, per_example: pd.DataFrame, ratio: float,
                    task_keys: Sequence[str], *, n_resamples: int = 2000, seed: int = 0,
                    chance: Mapping[str, float | None] | None = None) -> pd.DataFrame:
    """Per method (random seeds pooled into ``random``) and task at ``ratio``: the primary metric with its CI
    (random: mean over seeds — geometric for perplexity — with sd, min and max), and % of the unpruned score with a paired bootstrap CI. ``chance``
    (task key -> :func:`chance_level`) decides ``informative``; by default :data:`CHANCE`."""
    chance = dict(chance or {})
    rows = []
    at = _methods_by_set(plan, ratio)
    groups = {m: [sid] for m, sid in zip(at["method"], at["set_id"]) if method_family(m) != "random"}
    random_sets = at.loc[at["family"] == "random", "set_id"].tolist()
    if random_sets:
        groups["random"] = random_sets
    for key in task_keys:
        task = summary.loc[summary["task_key"] == key, "task"].iloc[0]
        metric = PRIMARY_METRIC[task]
        base_row = summary[(summary["set_id"] == BASE_SET) & (summary["task_key"] == key) & (summary["metric"] == metric)].iloc[0]
        base = _arrays(per_example, [BASE_SET], key)
        rows.append({"method": "unpruned", "task_key": key, "task": task, "metric": metric, "value": base_row["value"],
                     "low": base_row["low"], "high": base_row["high"], "sd": np.nan, "n_seeds": np.nan,
                     "min": np.nan, "max": np.nan, "retention": 100.0, "retention_low": 100.0, "retention_high": 100.0,
                     "informative": informative(task, base_row["low"], chance.get(key)), "set_ids": BASE_SET,
                     "chance": chance.get(key, CHANCE.get(task))})
        for method, sids in groups.items():
            vals = summary[(summary["task_key"] == key) & (summary["metric"] == metric) & summary["set_id"].isin(sids)]
            per_set = vals.set_index("set_id").loc[sids]
            arrays = _arrays(per_example, sids, key)
            ret = paired_bootstrap(task, arrays, base, "retention", n_resamples=n_resamples, seed=seed)
            many = len(sids) > 1
            pooled = _pool(per_set["value"], metric) if many else {"sd": np.nan, "min": np.nan, "max": np.nan}
            rows.append({
                "method": method, "task_key": key, "task": task, "metric": metric,
                "value": pooled["value"] if many else float(per_set["value"].iloc[0]),
                "low": np.nan if many else float(per_set["low"].iloc[0]),
                "high": np.nan if many else float(per_set["high"].iloc[0]),
                "sd": pooled["sd"], "min": pooled["min"], "max": pooled["max"], "n_seeds": len(sids) if many else np.nan,
                "retention": ret[0], "retention_low": ret[1], "retention_high": ret[2],
                "informative": informative(task, base_row["low"], chance.get(key)), "set_ids": " ".join(sids),
                "chance": chance.get(key, CHANCE.get(task)),
            })
    return pd.DataFrame(rows)


#: Fewer paired examples than this give no verdict: a bootstrap of a handful of values has no coverage.
MIN_EXAMPLES_FOR_VERDICT = 10


def comparison_table(plan: pd.DataFrame, per_example: pd.DataFrame, summary: pd.DataFrame, ratio: float,
                     task_keys: Sequence[str], *, n_resamples: int = 2000, seed: int = 0,
                     min_examples: int = MIN_EXAMPLES_FOR_VERDICT) -> pd.DataFrame:
    """Every AVSS variant against every baseline family at ``ratio``, per task: score(AVSS) − score(baseline)
    (log-perplexity for perplexity; positive = AVSS better) with a paired bootstrap 95% CI, and ``verdict``:
    ``better`` / ``worse`` when the CI excludes 0, else ``indistinguishable``; identical pruned sets are
    ``same set``; fewer than ``min_examples`` paired examples (windows for perplexity) give ``too few examples``.
    Random seeds are one baseline (two-level bootstrap, see :func:`paired_bootstrap`)."""
    at = _methods_by_set(plan, ratio)
    avss_rows = at[at["family"] == "avss"]
    baseline_groups: dict[str, list[str]] = {}
    for row in at[at["family"] != "avss"].itertuples():
        baseline_groups.setdefault(row.family if row.family == "random" else row.method, []).append(row.set_id)
    rows = []
    for key in task_keys:
        task = summary.loc[summary["task_key"] == key, "task"].iloc[0]
        for a in avss_rows.itertuples():
            for baseline, sids in baseline_groups.items():
                if sids == [a.set_id]:
                    rows.append({"avss": a.method, "baseline": baseline, "task_key": key, "task": task,
                                 "difference": 0.0, "low": 0.0, "high": 0.0, "verdict": "same set"})
                    continue
                arrays = _arrays(per_example, [a.set_id], key)
                d = paired_bootstrap(task, arrays, _arrays(per_example, sids, key),
                                     "difference", n_resamples=n_resamples, seed=seed)
                verdict = ("too few examples" if arrays[0].shape[1] < min_examples else
                           "better" if d[1] > 0 else "worse" if d[2] < 0 else "indistinguishable")
                rows.append({"avss": a.method, "baseline": baseline, "task_key": key, "task": task,
                             "difference": d[0], "low": d[1], "high": d[2], "verdict": verdict})
    return pd.DataFrame(rows)


def curve_table(plan: pd.DataFrame, summary: pd.DataFrame, methods: Sequence[str], task_keys: Sequence[str]
                ) -> pd.DataFrame:
    """Primary metric against the fraction of layers removed for ``methods`` (``random`` = mean — geometric for
    perplexity — sd, min and max over the random seeds in the plan) on ``task_keys``; the unpruned model is fraction 0 for every method."""
    rows = []
    for key in task_keys:
        sub = summary[summary["task_key"] == key]
        if sub.empty:
            raise DataError(f"no results for curve task {key}")
        task = sub["task"].iloc[0]
        metric = PRIMARY_METRIC[task]
        values = sub[sub["metric"] == metric].set_index("set_id")
        base = values.loc[BASE_SET]
        for method in methods:
            chosen = plan[plan["family"] == "random"] if method == "random" else plan[plan["method"] == method]
            if chosen.empty:
                raise ConfigError(f"curve method {method!r} is not in the plan: choose from "
                                  f"{sorted(set(plan['method']) | {'random'})}")
            rows.append({"method": method, "task_key": key, "task": task, "metric": metric, "ratio": 0.0,
                         "fraction_removed": 0.0, "value": base["value"], "low": base["low"], "high": base["high"],
                         "sd": np.nan, "min": np.nan, "max": np.nan})
            for ratio, group in chosen.groupby("ratio"):
                v = values.loc[group["set_id"]]
                many = len(group) > 1
                pooled = _pool(v["value"], metric) if many else {"sd": np.nan, "min": np.nan, "max": np.nan}
                rows.append({"method": method, "task_key": key, "task": task, "metric": metric, "ratio": ratio,
                             "fraction_removed": float(group["fraction_removed"].iloc[0]),
                             "value": pooled["value"] if many else float(v["value"].iloc[0]),
                             "low": np.nan if many else float(v["low"].iloc[0]),
                             "high": np.nan if many else float(v["high"].iloc[0]),
                             "sd": pooled["sd"], "min": pooled["min"], "max": pooled["max"]})
    return pd.DataFrame(rows)


def agreement(scores: Mapping[str, pd.Series], plan: pd.DataFrame, ratio: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Spearman's rho between the methods' scores and Jaccard overlap of their pruned sets at ``ratio``."""
    from avss_lib.ranking.agreement import jaccard_matrix, spearman_matrix

    at = _methods_by_set(plan, ratio).set_index("method")
    names = [m for m in scores if m in at.index]
    return (spearman_matrix({m: scores[m] for m in names}),
            jaccard_matrix({m: set(at.loc[m, "layers"]) for m in names}))


# ------------------------------------------------------------------------------------ speed


def measure_speedup(model: nn.Module, layers: Sequence[int], batch: Mapping[str, torch.Tensor], *,
                    repeats: int = 5, warmup: int = 1) -> dict[str, Any]:
    """Forward time of ``model`` and of its copy without ``layers`` on the same batch, in the same process.

    Runs alternate (unpruned, pruned) ``repeats`` times after ``warmup`` untimed pairs; reports the median
    seconds of each, the measured speed-up, the decoder-layer theoretical ``1 / (1 − k/n)`` and a
    parameter-count estimate that includes the layers that are never removed (embeddings, norm, LM head).
    """
    if repeats < 1:
        raise ConfigError(f"repeats must be >= 1, got {repeats}")
    n_layers = len(find_layers(model))
    pruned = remove_layers(model, layers)
    inputs = {k: v.to(next(model.parameters()).device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    times: dict[str, list[float]] = {"unpruned": [], "pruned": []}
    with torch.inference_mode():
        for i in range(warmup + repeats):
            for name, m in (("unpruned", model), ("pruned", pruned)):
                start = time.perf_counter()
                m(**inputs, use_cache=False)
                synchronize(m)
                if i >= warmup:
                    times[name].append(time.perf_counter() - start)
    layer_params = sum(p.numel() for p in find_layers(model).layers.parameters())
    total_params = sum(p.numel() for p in model.parameters())
    head = model.get_output_embeddings()
    head_params = head.weight.numel() if head is not None else 0  # tied to the embedding: counted once as compute
    per_layer = layer_params / n_layers
    compute_full = layer_params + head_params
    compute_pruned = compute_full - per_layer * len(layers)
    t_full, t_pruned = float(np.median(times["unpruned"])), float(np.median(times["pruned"]))
    del pruned
    return {"n_layers": n_layers, "n_removed": len(layers), "layers_removed": list(layers),
            "batch_shape": list(inputs["input_ids"].shape), "repeats": repeats,
            "seconds_unpruned": t_full, "seconds_pruned": t_pruned, "measured_speedup": t_full / t_pruned,
            "theoretical_speedup_layers": 1.0 / (1.0 - len(layers) / n_layers),
            "estimated_speedup_params": compute_full / compute_pruned,
            "total_params": total_params, "torch_threads": torch.get_num_threads(),
            "times_unpruned": times["unpruned"], "times_pruned": times["pruned"]}


def to_json_ready(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with list columns turned into space-separated strings (for CSV and Parquet)."""
    out = frame.copy()
    for column in out.columns:
        if out[column].map(lambda v: isinstance(v, (list, tuple))).any():
            out[column] = out[column].map(lambda v: " ".join(map(str, v)) if isinstance(v, (list, tuple)) else v)
    return out


def spec_record(specs: Iterable[TaskSpec]) -> list[dict[str, Any]]:
    """JSON-ready description of task specs."""
    return [json.loads(json.dumps(vars(s), default=str)) for s in specs]


def finite(x: float) -> float | None:
    """``None`` for NaN/inf (JSON)."""
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None


# ------------------------------------------------------------------------------------ plan helpers


def subplan(plan: pd.DataFrame, methods: Sequence[str], ratios: Sequence[float], n_random: int) -> pd.DataFrame:
    """Rows of ``plan`` for ``methods`` (``random`` = the first ``n_random`` random seeds) at ``ratios``."""
    random_methods = list(dict.fromkeys(plan.loc[plan["family"] == "random", "method"]))[:n_random]
    wanted = [m for m in methods if m != "random"] + (random_methods if "random" in methods else [])
    missing = sorted(set(wanted) - set(plan["method"]))
    if missing:
        raise ConfigError(f"method(s) {missing} are not ranked: choose from {sorted(set(plan['method'])) + ['random']}")
    if "random" in methods and n_random < 1:
        raise ConfigError("the curve asks for random pruning but no random seed is used: raise curve_random_seeds")
    keep = plan["method"].isin(wanted) & np.isin(plan["ratio"].to_numpy(), np.asarray(ratios, dtype=float))
    return plan[keep]


def task_needs(*parts: tuple[pd.DataFrame, Sequence[str]]) -> dict[str, list[str]]:
    """``set_id -> task keys`` for (plan rows, task keys) pairs; the unpruned model gets every task key."""
    needs: dict[str, list[str]] = {BASE_SET: []}
    for rows, keys in parts:
        needs[BASE_SET] += list(keys)
        for sid in rows["set_id"]:
            needs.setdefault(sid, [])
            needs[sid] += list(keys)
    return {sid: list(dict.fromkeys(keys)) for sid, keys in needs.items()}


def curve_task_specs(table: Sequence[TaskSpec], sizes: Mapping[str, int | None],
                     options: Mapping[str, Mapping[str, Any]] | None = None) -> list[TaskSpec]:
    """Task specs of the curve: a table spec where the curve asks for the same evaluation (so its results are
    reused), else a spec keyed ``<task>@curve``."""
    out = []
    for s in task_specs(sizes, options, suffix="@curve"):
        same = next((t for t in table if (t.name, t.n, t.options, t.split) == (s.name, s.n, s.options, s.split)), None)
        out.append(same or s)
    return out


def check_upstream(meta01: Mapping[str, Any], model_spec: str, model: nn.Module) -> None:
    """Raise :class:`ConfigError` when notebook 01 ran on another model than ``model_spec`` / ``model``."""
    ran = meta01.get("model", {}).get("spec")
    n_layers = len(find_layers(model))
    if ran is not None and ran != model_spec:
        raise ConfigError(f"notebook 01 collected statistics on model {ran!r}, this notebook loads {model_spec!r}: "
                          "use the same model parameter for notebooks 01-03")
    if meta01.get("n_layers") not in (None, n_layers):
        raise ConfigError(f"notebook 01's model has {meta01['n_layers']} layers, this one {n_layers}: re-run notebook 01")


def selection_mismatches(plan: pd.DataFrame, selections: pd.DataFrame, ratio: float) -> list[str]:
    """AVSS variants whose set at ``ratio`` differs from notebook 02's ``fixed_fraction`` selection."""
    fixed = selections[selections["rule"] == "fixed_fraction"].set_index("variant")["layers"]
    at = plan[np.isclose(plan["ratio"], ratio) & (plan["family"] == "avss")]
    bad = []
    for row in at.itertuples():
        variant = row.method.split(":", 1)[1]
        if variant in fixed.index:
            theirs = fixed[variant]
            theirs = [int(x) for x in str(theirs).split()] if not isinstance(theirs, list) else theirs
            if sorted(theirs) != list(row.layers):
                bad.append(variant)
    return bad
