"""Cost of the streamed statistics pass: against a plain forward (time) and the naive collection (numbers).

:func:`measure_overhead` times the statistics pass of chapter 01
(:func:`~avss_lib.core.activation_stats.collect_activation_stats`) against a plain ``torch.inference_mode()``
forward over the same padded batches, best of ``repeats`` each (target :data:`OVERHEAD_TARGET`).
:func:`naive_hidden_state_stats` computes the block-output variances the naive way (every layer's hidden states
kept, variances at the end) and :func:`variance_agreement` compares them with the streamed ones.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pandas as pd
import torch
from torch import Tensor, nn
from tqdm import tqdm

from avss_lib.core import activation_stats as activations
from avss_lib.core import models
from avss_lib.core.errors import ConfigError, DataError
from avss_lib.core.layers import find_layers
from avss_lib.performance.calibration_set import token_counts
from avss_lib.performance.parameter_checks import check_positive_int

#: Target of the statistics pass's time relative to a plain forward over the same batches.
OVERHEAD_TARGET = 1.15
#: The two collectors agree when no variance differs by more than this (relative).
AGREEMENT_TOLERANCE = 1e-5
#: The variance definitions both collectors compute for the block outputs.
VARIANCES = ("pooled_var_padded", "pooled_var_masked", "elem_var")


def plain_forward(model: nn.Module, batches: Iterable[Mapping[str, Tensor]]) -> None:
    """A plain ``torch.inference_mode()`` forward over ``batches`` (no hooks, no KV cache), results discarded."""
    device = next(model.parameters()).device
    with torch.inference_mode():
        for b in batches:
            model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device), use_cache=False)
    models.synchronize(model)


def overhead_record(plain_runs_s: Sequence[float], stats_runs_s: Sequence[float], *, n_batches: int, tokens: int,
                    positions: int, sites: Sequence[str], target: float = OVERHEAD_TARGET) -> dict[str, Any]:
    """The overhead result from the timed runs: the best (shortest) run of each, their ratio against ``target``."""
    if not plain_runs_s or len(plain_runs_s) != len(stats_runs_s):
        raise ConfigError(f"need as many plain as statistics runs, at least one (got {len(plain_runs_s)} and "
                          f"{len(stats_runs_s)})")
    plain, stats = min(plain_runs_s), min(stats_runs_s)
    ratio = stats / plain
    return {"n_batches": n_batches, "tokens": tokens, "positions": positions, "repeats": len(plain_runs_s),
            "sites": list(sites), "plain_forward_s": plain, "stats_pass_s": stats,
            "plain_forward_runs_s": list(plain_runs_s), "stats_pass_runs_s": list(stats_runs_s),
            "overhead_ratio": ratio, "target": target, "meets_target": bool(ratio <= target),
            "torch_threads": torch.get_num_threads()}


def measure_overhead(model: nn.Module, batches: Sequence[Mapping[str, Tensor]], spec: activations.StatsSpec, *,
                     repeats: int = 3, progress: bool = False) -> tuple[dict[str, Any], pd.DataFrame]:
    """Seconds of a plain forward and of the statistics pass over the same batches, best of ``repeats`` each.

    One untimed plain forward on the first batch warms up; then each repeat times a plain forward over all
    batches and the statistics pass over the same batches, alternately. Returns the :func:`overhead_record` and
    the statistics of the last pass (for :func:`variance_agreement`).
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
    return overhead_record(plain, stats_times, n_batches=len(batches), tokens=tokens, positions=positions,
                           sites=spec.sites), stats


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
        rows.append({"layer": i, "n_samples": int(sum(len(p) for p in padded)),
                     "n_tokens": int(sum(int(m.sum()) for m in masks)),
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
    for column in VARIANCES:
        s, n = block[column].astype(float), naive[column].reindex(block.index).astype(float)
        rows.append(pd.DataFrame({"layer": block.index, "statistic": column, "streaming": s.to_numpy(),
                                  "naive": n.to_numpy(), "relative_gap": (s - n).abs().to_numpy() / n.abs().to_numpy()}))
    return pd.concat(rows, ignore_index=True)


def agreement_summary(agreement: pd.DataFrame, tolerance: float = AGREEMENT_TOLERANCE) -> dict[str, Any]:
    """The largest relative gap of a :func:`variance_agreement` table, where it is, and whether it is within
    ``tolerance``. A NaN gap (a naive variance missing or zero) counts as the largest and as not agreeing."""
    if agreement.empty:
        raise DataError("the variance agreement table is empty: compare at least one layer")
    gaps = agreement["relative_gap"].astype(float)
    worst = agreement.loc[gaps.isna().idxmax()] if gaps.isna().any() else agreement.loc[gaps.idxmax()]
    gap = float(worst["relative_gap"])
    return {"n_layers": int(agreement["layer"].nunique()), "n_statistics": int(agreement["statistic"].nunique()),
            "max_relative_gap": gap, "worst_statistic": str(worst["statistic"]), "worst_layer": int(worst["layer"]),
            "tolerance": tolerance, "agree": bool(gap <= tolerance)}
