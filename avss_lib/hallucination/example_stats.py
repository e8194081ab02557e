r"""Per-example activation statistics over chosen token positions, in :mod:`avss_lib.hallucination.group_stats`' format.

Each item is an example id, a *context* (the task prompt) and an *answer* (the model's generated answer, or
the option it chose in a multiple-choice task). The pair is encoded the way lm-evaluation-harness encodes a
(context, continuation) request (:func:`avss_lib.core.harness.encode_pair`, continuation ``" " + answer``) and
run through the model once, teacher-forced, with hooks on every decoder layer (:func:`avss_lib.core.activation_stats.
site_hooks`). Only the tokens chosen by ``position`` count:

- ``"answer"`` — the answer's tokens (what the model said). Items whose answer is empty have no such tokens
  and are left out (listed in :attr:`ExampleStats.dropped`).
- ``"question_last"`` — the last token of the context, i.e. the position from which the model starts to
  answer; the answer is not fed at all.

For every (example, site, layer) the collector emits the sufficient statistics that
:data:`avss_lib.hallucination.group_stats.SUFFICIENT_STAT_COLUMNS` defines -- ``n`` (valid entries = tokens x hidden
units), ``sum``, ``m2`` (centred on the example's own mean), ``sum_abs``, ``n_tokens``, ``pooled_var``
(unbiased variance over hidden units of the example's mean over its chosen tokens) -- plus
``below_abs_<eps>`` counts (:math:`|a| < \varepsilon`) and ``below_rel_<tau>`` counts
(:math:`|a| < \tau\,\sigma_{\mathrm{ref}}`). :math:`\sigma_{\mathrm{ref}}` is the element standard deviation
(ddof 0) of that site and layer over the chosen entries of **all** items, whatever their label: it is only
known after a first pass, so the chosen entries' :math:`|a|` are kept from it (float32, up to ``cache_mb``)
and counted afterwards; when they do not fit, a second forward pass recounts them (nothing of the kind is
needed when ``rel_taus`` is empty). All sums are accumulated in float64 from the model's activations.

For the linear probes the collector also keeps, for ``feature_site`` only (default ``block_output``), each
item's mean activation over its chosen tokens as a float32 ``(n_items, hidden)`` array per layer.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from avss_lib.core.activation_stats import SITES, site_hooks
from avss_lib.core.errors import ConfigError, DataError
from avss_lib.core.harness import bos_prefix, default_add_bos, encode, encode_pair, model_max_length, pad_id
from avss_lib.core.layers import find_layers
from avss_lib.hallucination.group_stats import SUFFICIENT_STAT_COLUMNS

POSITIONS: tuple[str, ...] = ("answer", "question_last")


def abs_count_column(eps: float) -> str:
    """Name of the per-example count of entries with ``|a| < eps`` (``below_abs_1e-05``)."""
    return f"below_abs_{eps:g}"


def rel_count_column(tau: float) -> str:
    """Name of the per-example count of entries with ``|a| < tau * sigma_ref`` (``below_rel_0.01``)."""
    return f"below_rel_{tau:g}"


@dataclass(frozen=True)
class StatItem:
    """One example to measure: its id, the task prompt, and the answer the model gave ('' if none)."""

    example_id: str
    context: str
    answer: str = ""


@dataclass
class ExampleStats:
    """What :func:`collect_example_stats` returns.

    Attributes:
        table: one row per (example_id, site, layer) with the sufficient-statistics columns.
        features: ``{layer: float32 array (len(example_ids), hidden)}``, the mean ``feature_site``
            activation over each example's chosen tokens, rows in ``example_ids`` order.
        example_ids: ids of the measured examples (items with no chosen token are left out).
        dropped: ids of items left out because they have no chosen token (empty answer).
        sigma_ref: element standard deviation per (site, layer) over all measured examples (index site,
            layer), the reference of the relative thresholds.
        position: which tokens were measured.
    """

    table: pd.DataFrame
    features: dict[int, np.ndarray]
    example_ids: list[str]
    dropped: list[str]
    sigma_ref: pd.Series
    position: str
    settings: dict = field(default_factory=dict)


@dataclass
class _Encoded:
    example_id: str
    ids: list[int]
    chosen: list[int]  # positions (indices into ids) whose activations count


def encode_items(tokenizer: PreTrainedTokenizerBase, items: Sequence[StatItem], position: str, *,
                 add_bos: bool = False, max_length: int) -> tuple[list[_Encoded], list[str]]:
    """Token ids and chosen positions per item; returns (encoded, ids of items without chosen tokens)."""
    if position not in POSITIONS:
        raise ConfigError(f"position={position!r} is unknown: use one of {POSITIONS}")
    encoded, dropped = [], []
    for item in items:
        if position == "question_last":
            ids = bos_prefix(tokenizer, add_bos) + encode(tokenizer, item.context.rstrip())
            if not ids:
                raise DataError(f"example {item.example_id!r} has an empty prompt: nothing to measure")
            chosen = [len(ids) - 1]
        else:
            if not item.answer.strip():
                dropped.append(item.example_id)
                continue
            context_ids, answer_ids = encode_pair(tokenizer, item.context, " " + item.answer.strip(), add_bos=add_bos)
            ids = context_ids + answer_ids
            chosen = list(range(len(context_ids), len(ids)))
        cut = max(0, len(ids) - max_length)  # keep the end (the chosen tokens), cut from the left
        if cut > chosen[0]:
            raise ConfigError(f"example {item.example_id!r}: its answer alone exceeds max_length={max_length}")
        encoded.append(_Encoded(item.example_id, ids[cut:], [c - cut for c in chosen]))
    return encoded, dropped


class _Accumulator:
    """Hook callback: per-example statistics of the chosen tokens of one batch, for every site and layer."""

    def __init__(self, abs_thresholds: Sequence[float], rel_taus: Sequence[float], feature_site: str | None,
                 sigma_ref: dict[tuple[str, int], float] | None, cache_bytes: int = 0) -> None:
        self.abs_thresholds = tuple(abs_thresholds)
        self.rel_taus = tuple(rel_taus)
        self.feature_site = feature_site
        self.sigma_ref = sigma_ref  # None in the first pass
        self.chosen: Tensor | None = None
        self.rows: dict[tuple[str, int], list[dict[str, np.ndarray]]] = {}
        self.features: dict[int, list[np.ndarray]] = {}
        # First pass only: |a| of the chosen entries (exact float32 copies) while they fit in cache_bytes,
        # so that the relative-threshold counts need no second forward pass.
        self.cache: dict[tuple[str, int], list[tuple[Tensor, Tensor, int]]] | None = (
            {} if rel_taus and cache_bytes > 0 and sigma_ref is None else None)
        self.cache_budget = cache_bytes
        self.cache_used = 0

    def set_batch(self, chosen: Tensor) -> None:
        """Boolean (B, T) mask of the tokens that count in the next forward pass."""
        self.chosen = chosen

    def __call__(self, site: str, layer: int, x: Tensor, h_in: Tensor | None) -> None:
        assert self.chosen is not None
        mask = self.chosen.to(x.device)
        x = x.detach().reshape(*mask.shape, -1)  # OPT flattens (B*T, d) inside its MLP
        b_idx, t_idx = mask.nonzero(as_tuple=True)
        xs = x[b_idx, t_idx].double()  # (tokens, d), exact copies of the float activations
        n_batch, hidden = mask.shape[0], xs.shape[-1]
        counts = mask.sum(dim=1).double()  # tokens per example (>= 1 by construction)

        def per_example(values: Tensor) -> Tensor:  # sum token-level values into their examples
            return torch.zeros(n_batch, *values.shape[1:], dtype=values.dtype, device=values.device).index_add_(
                0, b_idx, values)

        if self.sigma_ref is None:
            token_mean = per_example(xs) / counts[:, None]  # (B, d)
            n = counts * hidden
            total = per_example(xs.sum(dim=1))
            mean = total / n
            m2 = per_example(((xs - mean[b_idx, None]) ** 2).sum(dim=1))
            a = xs.abs()
            row = {"n": n, "sum": total, "m2": m2, "sum_abs": per_example(a.sum(dim=1)), "n_tokens": counts,
                   "pooled_var": token_mean.var(dim=1)}
            for eps in self.abs_thresholds:
                row[abs_count_column(eps)] = per_example((a < eps).sum(dim=1).double())
            if site == self.feature_site:
                self.features.setdefault(layer, []).append(token_mean.float().cpu().numpy())
            if self.cache is not None:
                self.cache_used += xs.numel() * 4 + b_idx.numel() * 8
                if self.cache_used > self.cache_budget:
                    self.cache = None  # too large: fall back to a second pass
                else:
                    self.cache.setdefault((site, layer), []).append((a.float().cpu(), b_idx.cpu(), n_batch))
        else:
            a = xs.abs()
            sigma = self.sigma_ref[(site, layer)]
            row = {rel_count_column(tau): per_example((a < tau * sigma).sum(dim=1).double()) for tau in self.rel_taus}
        self.rows.setdefault((site, layer), []).append({k: v.cpu().numpy() for k, v in row.items()})

    def cached_rel_counts(self, sigma_ref: dict[tuple[str, int], float]) -> dict[tuple[str, int], list[dict[str, np.ndarray]]]:
        """Relative-threshold counts from the cached |a| (same batches and order as the first pass)."""
        assert self.cache is not None
        rows: dict[tuple[str, int], list[dict[str, np.ndarray]]] = {}
        for key, chunks in self.cache.items():
            for a, b_idx, n_batch in chunks:
                a64 = a.double()  # compare in float64, exactly as the second pass does
                rows.setdefault(key, []).append({
                    rel_count_column(tau): torch.zeros(n_batch, dtype=torch.float64).index_add_(
                        0, b_idx, (a64 < tau * sigma_ref[key]).sum(dim=1).double()).numpy()
                    for tau in self.rel_taus})
        return rows

    def frame(self, example_ids: list[str]) -> pd.DataFrame:
        """The collected rows, one per (example_id, site, layer)."""
        parts = []
        for (site, layer), batches in self.rows.items():
            columns = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
            part = pd.DataFrame({"example_id": example_ids, "site": site, "layer": layer, **columns})
            parts.append(part)
        return pd.concat(parts, ignore_index=True)


def _batches(encoded: list[_Encoded], batch_size: int, pad_id: int):
    """Right-padded batches (longest first) of input ids, attention mask and chosen mask."""
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i].ids))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(encoded[i].ids) for i in idx)
        input_ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(idx), width), dtype=torch.long)
        chosen = torch.zeros((len(idx), width), dtype=torch.bool)
        for b, i in enumerate(idx):
            ids = encoded[i].ids
            input_ids[b, :len(ids)] = torch.tensor(ids)
            attention[b, :len(ids)] = 1
            chosen[b, encoded[i].chosen] = True
        yield idx, input_ids, attention, chosen


def _run_pass(model: nn.Module, encoded: list[_Encoded], acc: _Accumulator, sites: Sequence[str], batch_size: int,
              pad_id: int, progress: bool, desc: str) -> list[int]:
    """One forward pass over every item; returns the item order the accumulator saw."""
    device = next(model.parameters()).device
    # Only hidden states are needed: skip most of the LM head where the model allows it.
    extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    seen: list[int] = []
    n_batches = -(-len(encoded) // batch_size)
    with site_hooks(model, sites, acc), torch.inference_mode():
        for idx, input_ids, attention, chosen in tqdm(_batches(encoded, batch_size, pad_id), total=n_batches,
                                                      desc=desc, disable=not progress):
            acc.set_batch(chosen)
            model(input_ids=input_ids.to(device), attention_mask=attention.to(device), use_cache=False, **extra)
            seen.extend(idx)
    return seen


def _sigma_ref(table: pd.DataFrame) -> pd.Series:
    """Element standard deviation (ddof 0) per (site, layer) over all examples, from per-example moments."""
    def combine(g: pd.DataFrame) -> float:
        n = g["n"].to_numpy()
        mean_i = g["sum"].to_numpy() / n
        mean = g["sum"].sum() / n.sum()
        m2 = g["m2"].sum() + (n * (mean_i - mean) ** 2).sum()
        return float(np.sqrt(m2 / n.sum()))
    return table.groupby(["site", "layer"], sort=True)[["n", "sum", "m2"]].apply(combine).rename("sigma_ref")


def collect_example_stats(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[StatItem],
    *,
    position: str = "answer",
    sites: Sequence[str] = SITES,
    abs_thresholds: Sequence[float] = (1e-5, 1e-3, 1e-2),
    rel_taus: Sequence[float] = (0.01, 0.05, 0.1),
    feature_site: str | None = "block_output",
    batch_size: int = 8,
    max_length: int | None = None,
    add_bos: bool | None = None,
    cache_mb: float = 256.0,
    progress: bool = False,
) -> ExampleStats:
    """Per-example sufficient statistics (and probe features) over the tokens chosen by ``position``.

    See the module docstring for what is measured. ``cache_mb`` bounds the memory used to keep the chosen
    entries' |a| (float32) from the first pass; when they fit, the relative-threshold counts are read from
    that cache (identical results) and the second forward pass is skipped. Raises :class:`ConfigError` for an unknown position or
    site, and :class:`DataError` when no item has a chosen token or ids repeat.
    """
    unknown = [s for s in sites if s not in SITES]
    if unknown or not sites:
        raise ConfigError(f"unknown activation site(s) {unknown or '(none given)'}: choose from {', '.join(SITES)}")
    if feature_site is not None and feature_site not in sites:
        raise ConfigError(f"feature_site={feature_site!r} must be one of the collected sites {list(sites)}")
    ids = [item.example_id for item in items]
    if len(set(ids)) != len(ids):
        raise DataError("example ids repeat: give every item a unique example_id")
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be at least 1")
    max_length = max_length or model_max_length(model)
    add_bos = default_add_bos(model) if add_bos is None else add_bos
    encoded, dropped = encode_items(tokenizer, items, position, add_bos=add_bos, max_length=max_length)
    if not encoded:
        raise DataError(f"no item has a token at position={position!r} (all answers empty?): nothing to measure")
    was_training = model.training
    model.eval()
    pad = pad_id(tokenizer)
    try:
        first = _Accumulator(abs_thresholds, rel_taus, feature_site, None, int(cache_mb * 2**20))
        order = _run_pass(model, encoded, first, sites, batch_size, pad, progress, "example statistics")
        ordered_ids = [encoded[i].example_id for i in order]
        table = first.frame(ordered_ids)
        sigma = _sigma_ref(table)
        passes = 1
        if rel_taus:
            second = _Accumulator(abs_thresholds, rel_taus, feature_site, sigma.to_dict())
            if first.cache is not None:
                second.rows = first.cached_rel_counts(sigma.to_dict())
                first.cache = None
            else:
                _run_pass(model, encoded, second, sites, batch_size, pad, progress, "relative-threshold counts")
                passes = 2
            rel = second.frame(ordered_ids)
            table = table.merge(rel, on=["example_id", "site", "layer"], validate="one_to_one")
    finally:
        model.train(was_training)
    n_layers = len(find_layers(model))
    back = np.argsort(order)  # features back to the items' order
    features = {layer: np.concatenate(first.features[layer])[back] for layer in range(n_layers)} if feature_site else {}
    example_ids = [e.example_id for e in encoded]
    table = table.sort_values(["site", "layer"], kind="stable").reset_index(drop=True)
    missing = [c for c in SUFFICIENT_STAT_COLUMNS if c not in table.columns]
    assert not missing, missing
    return ExampleStats(table=table, features=features, example_ids=example_ids, dropped=dropped, sigma_ref=sigma,
                        position=position, settings={"position": position, "sites": list(sites),
                                                     "abs_thresholds": list(abs_thresholds),
                                                     "rel_taus": list(rel_taus), "feature_site": feature_site,
                                                     "max_length": max_length, "add_bos": add_bos,
                                                     "forward_passes": passes})
