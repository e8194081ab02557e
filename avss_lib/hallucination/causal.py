"""A causal check of claim E1: does removing the layers EAVSS marks as hallucination-prone change how often the
model hallucinates — more than removing ``k`` random layers, or the ``k`` layers EAVSS marks *least* prone?

The check is scored on the **evaluation half** of chapter 04's question split, which the layer choice never saw,
on at most ``n`` questions per data set (a seeded subsample); the untouched model's answers are chapter 04's
own. Each removed set (:func:`causal_sets`) is a copy of the model without those layers
(:func:`avss_lib.core.layer_removal.remove_layers`) asked the same questions with the same prompts. The table
(:func:`causal_table`) gives each set's hallucination rate pooled over the data sets and its change from the
untouched model, with the study's paired bootstrap (:mod:`avss_lib.core.resampling`: the examples resampled
jointly for both sides, the random draws resampled too). Exploratory: it is reported beside the E1 verdict,
not part of its rule.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from avss_lib.core.benchmarks import Benchmark, Example, load_benchmark
from avss_lib.core.errors import ConfigError, DataError
from avss_lib.core.formatting import layer_list
from avss_lib.core.layer_removal import remove_layers
from avss_lib.core.resampling import paired_resamples, percentile_interval
from avss_lib.core.splits import EVALUATION, side_examples
from avss_lib.hallucination.answers import answer_benchmark
from avss_lib.hallucination.layer_rankings import top_k_layers

UNTOUCHED = "untouched"
#: Columns of :func:`causal_table` (the ``CAUSAL_CHECK`` artifact).
CAUSAL_COLUMNS: tuple[str, ...] = ("set", "layers", "draws", "n", "hallucination_rate", "low", "high", "change",
                                   "change_low", "change_high")


def causal_sets(pooled_ranks: pd.DataFrame, k: int, n_layers: int, *, draws: int, seed: int
                ) -> dict[str, list[list[int]]]:
    """The removed sets: the top-``k`` and bottom-``k`` layers of the pooled EAVSS ranking (``mean_rank``, rank 1
    = most hallucination-prone) and ``draws`` seeded draws of ``k`` random layers. Empty without a ranking."""
    if pooled_ranks.empty:
        return {}
    if not 1 <= k < n_layers:
        raise ConfigError(f"k={k} layers cannot be removed from a {n_layers}-layer model: use 1 <= k < {n_layers}")
    rng = random.Random(seed)
    return {"top-k EAVSS": [sorted(top_k_layers(-pooled_ranks["mean_rank"], k))],
            "bottom-k EAVSS": [sorted(top_k_layers(pooled_ranks["mean_rank"], k))],
            "k random": [sorted(rng.sample(range(n_layers), k)) for _ in range(draws)]}


def causal_questions(split: pd.DataFrame, datasets: Sequence[str], n: int | None, seed: int, data_root: Any
                     ) -> dict[str, Benchmark]:
    """At most ``n`` questions of each data set's evaluation half (seeded, in split order)."""
    out = {}
    for name in datasets:
        full = load_benchmark(name, data_root=data_root)
        examples = side_examples(split, full, EVALUATION, n=n, seed=seed)
        out[name] = Benchmark(name, examples, {**full.provenance, "causal_n": len(examples)})
    return out


def answer_removed(model: nn.Module, tokenizer: PreTrainedTokenizerBase, questions: Mapping[str, Benchmark],
                   sets: Mapping[str, list[list[int]]], shots: Mapping[str, Sequence[Example]], *,
                   progress: bool = True, **answer_options: Any) -> pd.DataFrame:
    """Per removed set, draw and question: ``set, draw, layers, dataset, id, correct`` (chapter 04's labels)."""
    rows = []
    todo = [(name, d, layers) for name, draws in sets.items() for d, layers in enumerate(draws)]
    for name, draw, layers in tqdm(todo, desc="causal check", disable=not progress):
        pruned = remove_layers(model, layers)
        for dataset, bench in questions.items():
            answered = answer_benchmark(pruned, tokenizer, bench, shots=shots.get(dataset, ()),
                                        **answer_options).answers
            rows += [{"set": name, "draw": draw, "layers": list(layers), "dataset": dataset, "id": str(i),
                      "correct": bool(c)} for i, c in zip(answered["id"], answered["correct"])]
        del pruned
    return pd.DataFrame(rows, columns=["set", "draw", "layers", "dataset", "id", "correct"])


def causal_table(untouched: pd.DataFrame, removed: pd.DataFrame, *, n_resamples: int = 2000, seed: int = 0
                 ) -> pd.DataFrame:
    """Each set's pooled hallucination rate (%) with a 95% interval and its paired change from the untouched
    model; ``untouched`` holds ``dataset, id, correct`` of the same questions (:data:`CAUSAL_COLUMNS`;
    ``layers`` lists each draw's removed layers, ``"; "``-separated)."""
    keys = untouched[["dataset", "id"]].astype(str).apply(tuple, axis=1).tolist()
    base = 1.0 - untouched["correct"].to_numpy(dtype=float)
    rows = [_row(UNTOUCHED, "", base[:, None], None, n_resamples, seed)]
    for name, part in removed.groupby("set", sort=False):
        wide = part.assign(key=part[["dataset", "id"]].astype(str).apply(tuple, axis=1)).pivot(
            index="key", columns="draw", values="correct").reindex(keys)
        if wide.isna().any().any():
            raise DataError(f"set {name!r} was not asked every question of the untouched model: re-run the check")
        layers = "; ".join(layer_list(v) for v in part.drop_duplicates("draw")["layers"])
        rows.append(_row(str(name), layers, 1.0 - wide.to_numpy(dtype=float), base, n_resamples, seed))
    return pd.DataFrame(rows, columns=list(CAUSAL_COLUMNS))


def _row(name: str, layers: str, hallucinated: np.ndarray, base: np.ndarray | None, n_resamples: int,
         seed: int) -> dict[str, Any]:
    n, runs = hallucinated.shape
    resamples = paired_resamples(n, [runs, 1], n_resamples=n_resamples, seed=seed)
    per_run = (resamples.counts @ hallucinated) / n  # (R, runs)
    draws = 100 * np.take_along_axis(per_run, resamples.picks[0], axis=1).mean(axis=1)
    value = 100 * float(hallucinated.mean())
    _, low, high = percentile_interval(value, draws)
    row = {"set": name, "layers": layers, "draws": runs, "n": n, "hallucination_rate": value, "low": low,
           "high": high, "change": np.nan, "change_low": np.nan, "change_high": np.nan}
    if base is not None:
        base_draws = 100 * (resamples.counts @ base) / n
        change, change_low, change_high = percentile_interval(value - 100 * float(base.mean()), draws - base_draws)
        row.update(change=change, change_low=change_low, change_high=change_high)
    return row
