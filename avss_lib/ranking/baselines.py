"""Layer-importance baselines that AVSS is measured against (method chapter), and pruning selection.

Every score follows one convention: one value per decoder layer, HIGHER = MORE IMPORTANT, so the layers
to prune are those with the lowest scores (:func:`prune_order`, :func:`select_lowest`). A score is either a
numpy array (position = layer index) or a pandas Series indexed by layer; functions that transform scores
return the same kind they are given.

- :func:`random_scores`: a random permutation of the layer numbers (a uniformly random pruning order).
- :func:`last_k_scores`: prune the deepest layers first but keep the final layer (Gromov et al.).
- :func:`block_influence`: BI = 1 - mean over tokens of cos(layer input, layer output) (ShortGPT).
- :func:`angular_distance`: arccos(cos(layer input, layer output)) / pi at the last non-pad token (Gromov et al.).
- :func:`removal_delta_ppl`: calibration perplexity with the layer skipped minus the unpruned one.
- :func:`greedy_removal_order`: SLEB-style iterative removal by least perplexity increase.
- :func:`gromov_block`: Gromov et al.'s contiguous block of ``n`` layers whose input and output (at the last
  token) are closest in angle (:func:`block_angular_distances` on :func:`last_token_states`) — a set, not a
  per-layer score.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from avss_lib.core.activation_stats import site_hooks
from avss_lib.core.errors import ConfigError, DataError
from avss_lib.core.layers import find_layers
from avss_lib.core.layer_removal import skip_layers

#: One score per layer: an array (position = layer) or a Series indexed by layer.
Scores = np.ndarray | pd.Series
#: A calibration batch: ``input_ids`` and right-padded ``attention_mask``, both (batch, seq).
Batch = Mapping[str, torch.Tensor]

# cosines are means of values in [-1, 1]; allow float round-off beyond the bounds before clipping
_COS_TOLERANCE = 1e-4


def random_scores(n_layers: int, seed: int) -> np.ndarray:
    """A uniformly random permutation of ``0..n_layers-1`` as float scores, reproducible by ``seed``."""
    if n_layers < 1:
        raise ConfigError(f"n_layers must be at least 1, got {n_layers}")
    return np.random.default_rng(seed).permutation(n_layers).astype(float)


def last_k_scores(n_layers: int) -> np.ndarray:
    """Scores for "remove the deepest layers first, keep the final layer".

    Layer ``i < n-1`` scores ``n-1-i`` and the final layer ``n-1`` scores ``n``, so the pruning order is
    ``n-2, n-3, ..., 1, 0, n-1`` (for n = 6: 4, 3, 2, 1, 0, 5).
    """
    if n_layers < 1:
        raise ConfigError(f"n_layers must be at least 1, got {n_layers}")
    scores = np.arange(n_layers - 1, -1, -1, dtype=float)
    scores[-1] = n_layers
    return scores


def block_influence(cos_mean: Scores) -> Scores:
    """ShortGPT's Block Influence, ``BI_i = 1 - cos_mean_i``.

    ``cos_mean``: per layer, the mean over valid (non-pad) tokens of cos(layer input, layer output), e.g.
    the ``cos_mean`` column of the ``block_output`` statistics.
    """
    return 1.0 - _checked_cosines(cos_mean, "cos_mean")


def angular_distance(cos_last: Scores) -> Scores:
    """Gromov et al.'s angular distance ``arccos(cos_last_i) / pi``, in [0, 1].

    ``cos_last``: per layer, cos(layer input, layer output) at the last non-pad token (mean over samples),
    e.g. the ``cos_last`` column of the ``block_output`` statistics.
    """
    cos = _checked_cosines(cos_last, "cos_last")
    return np.arccos(cos.clip(-1.0, 1.0)) / math.pi


def _checked_cosines(cos: Scores, name: str) -> Scores:
    """Return ``cos`` as floats (a Series stays a Series) after checking it has no NaN and lies in [-1, 1]."""
    values = cos.astype(float) if isinstance(cos, pd.Series) else np.asarray(cos, dtype=float)
    array = np.asarray(values)
    if np.isnan(array).any():
        raise DataError(f"{name} has NaN for layers {np.flatnonzero(np.isnan(array)).tolist()}: "
                        "recollect the statistics with at least one valid token per sample")
    if (np.abs(array) > 1.0 + _COS_TOLERANCE).any():
        raise DataError(f"{name} has values outside [-1, 1] (max |cos| = {np.abs(array).max():.4g}): "
                        "pass cosine similarities, not distances or raw dot products")
    return values


def prune_order(scores: Scores) -> list[int]:
    """Layers from least to most important (ascending score; ties: lower layer index first).

    For a Series the layer numbers are its index; for an array, the positions. ``inf`` sorts last,
    NaN raises :class:`DataError`.
    """
    layers, values = _layers_and_values(scores)
    return [layer for _, layer in sorted(zip(values.tolist(), layers))]


def select_lowest(scores: Scores, k: int) -> list[int]:
    """The ``k`` least important layers (the first ``k`` of :func:`prune_order`), in increasing layer order."""
    n_layers = len(scores)
    if not 0 <= k <= n_layers:
        raise ConfigError(f"k = {k} layers cannot be selected from {n_layers}: choose 0 <= k <= {n_layers}")
    return sorted(prune_order(scores)[:k])


def _layers_and_values(scores: Scores) -> tuple[list[int], np.ndarray]:
    """Layer numbers and float values of ``scores``; raises :class:`DataError` on NaN."""
    if isinstance(scores, pd.Series):
        layers, values = [int(i) for i in scores.index], scores.to_numpy(dtype=float)
    else:
        values = np.asarray(scores, dtype=float)
        layers = list(range(len(values)))
    if np.isnan(values).any():
        raise DataError(f"scores are NaN for layers {[layers[i] for i in np.flatnonzero(np.isnan(values))]}: "
                        "a ranking needs a number for every layer")
    return layers, values


def calibration_nll(model: nn.Module, batches: Iterable[Batch]) -> tuple[float, int]:
    """Summed next-token negative log-likelihood (nats) over non-pad targets, and the number of targets.

    A target token counts when it and the token before it are both unmasked. Batches must be right
    padded (a 0 in ``attention_mask`` followed by a 1 raises :class:`DataError`), because position ids
    are taken as 0, 1, 2, ... from the left. Runs without gradients and sums in float64; put the model in
    eval mode first (dropout would make the result random).
    """
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            input_ids = batch["input_ids"].to(device)
            mask = batch["attention_mask"].to(device)
            _check_right_padded(mask)
            logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
            nll = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), input_ids[:, 1:], reduction="none")
            valid = (mask[:, :-1] * mask[:, 1:]).bool()
            total += nll[valid].double().sum().item()
            count += int(valid.sum().item())
    return total, count


def _check_right_padded(mask: torch.Tensor) -> None:
    """Raise :class:`DataError` unless every row of ``mask`` is ones followed by zeros."""
    if (mask[:, 1:] > mask[:, :-1]).any():
        raise DataError("calibration batches must be right padded (attention_mask 1...1 0...0): "
                        "tokenize with padding_side='right'")


def calibration_perplexity(model: nn.Module, batches: Iterable[Batch]) -> float:
    """``exp`` of the mean next-token NLL of :func:`calibration_nll`; :class:`DataError` if no target token."""
    total, count = calibration_nll(model, batches)
    if count == 0:
        raise DataError("the calibration batches have no target tokens: use sequences of at least 2 tokens")
    return math.exp(total / count)


def removal_delta_ppl(model: nn.Module, batches: Iterable[Batch], *, progress: bool = True) -> np.ndarray:
    """Per layer ``i``: calibration perplexity with layer ``i`` skipped minus the unpruned perplexity.

    Layers are skipped with :func:`avss_lib.core.layer_removal.skip_layers` (same result as removing them); the
    batches are materialised once and reused for all ``n_layers + 1`` evaluations.
    """
    batches = list(batches)
    n_layers = len(find_layers(model))
    baseline = calibration_perplexity(model, batches)
    deltas = np.empty(n_layers)
    for layer in tqdm(range(n_layers), desc="removal ΔPPL", disable=not progress):
        with skip_layers(model, [layer]):
            deltas[layer] = calibration_perplexity(model, batches) - baseline
    return deltas


def greedy_removal_order(model: nn.Module, batches: Iterable[Batch], n_remove: int, *,
                         progress: bool = True) -> list[int]:
    """SLEB-style order of ``n_remove`` layers: each step removes (skips) the layer whose removal, on top of
    the layers already removed, gives the lowest calibration perplexity (ties: lower layer index).

    Returns the layers in the order they were removed. Raises :class:`ConfigError` unless
    ``0 <= n_remove < n_layers``.
    """
    batches = list(batches)
    n_layers = len(find_layers(model))
    if not 0 <= n_remove < n_layers:
        raise ConfigError(f"n_remove = {n_remove} is not possible with {n_layers} layers: "
                          f"choose 0 <= n_remove <= {n_layers - 1}")
    removed: list[int] = []
    for _ in tqdm(range(n_remove), desc="greedy removal", disable=not progress):
        candidates = [layer for layer in range(n_layers) if layer not in removed]
        removed.append(min(candidates, key=lambda c: (_skipped_perplexity(model, batches, removed + [c]), c)))
    return removed


def _skipped_perplexity(model: nn.Module, batches: list[Batch], layers: list[int]) -> float:
    """Calibration perplexity of ``model`` with ``layers`` skipped."""
    with skip_layers(model, layers):
        return calibration_perplexity(model, batches)


def last_token_states(model: nn.Module, batches: Iterable[Batch]) -> tuple[np.ndarray, np.ndarray]:
    """Every decoder layer's input and output hidden state at each sample's last non-pad token, as two float64
    arrays of shape (n_layers, n_samples, hidden) (right-padded batches, one forward pass each, no gradients)."""
    device = next(model.parameters()).device
    inputs: dict[int, list[np.ndarray]] = {}
    outputs: dict[int, list[np.ndarray]] = {}
    last = torch.zeros(0, dtype=torch.long)

    def keep(site: str, layer: int, output: torch.Tensor, block_input: torch.Tensor | None) -> None:
        rows = torch.arange(output.shape[0])
        outputs.setdefault(layer, []).append(output[rows, last].double().cpu().numpy())
        inputs.setdefault(layer, []).append(block_input[rows, last].double().cpu().numpy())

    with torch.no_grad(), site_hooks(model, ["block_output"], keep):
        for batch in batches:
            mask = batch["attention_mask"].to(device)
            _check_right_padded(mask)
            last = (mask.sum(1) - 1).clamp(min=0).cpu()
            model(input_ids=batch["input_ids"].to(device), attention_mask=mask, use_cache=False)
    if not outputs:
        raise DataError("no calibration batch was given: last-token states need at least one sample")
    layers = sorted(outputs)
    return (np.stack([np.concatenate(inputs[i]) for i in layers]),
            np.stack([np.concatenate(outputs[i]) for i in layers]))


def block_angular_distances(inputs: np.ndarray, outputs: np.ndarray, n: int) -> np.ndarray:
    """Gromov et al.'s angular distance of every block of ``n`` consecutive layers: for each start ``l`` in
    ``0..n_layers-n``, the mean over samples of ``arccos(cos(input of l, output of l+n-1)) / pi``.
    ``inputs``/``outputs``: :func:`last_token_states`."""
    n_layers = inputs.shape[0]
    if not 1 <= n <= n_layers:
        raise ConfigError(f"a block of {n} layers is not possible with {n_layers} layers: choose 1 <= n <= {n_layers}")
    a, b = inputs[: n_layers - n + 1], outputs[n - 1:]
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    return (np.arccos(np.clip(cos, -1.0, 1.0)) / math.pi).mean(axis=1)


def gromov_block(inputs: np.ndarray, outputs: np.ndarray, n: int) -> list[int]:
    """The ``n`` consecutive layers with the smallest :func:`block_angular_distances` (ties: the shallower
    block); no layer for ``n = 0``."""
    if n == 0:
        return []
    start = int(np.argmin(block_angular_distances(inputs, outputs, n)))
    return list(range(start, start + n))
