r"""A training-free peer of the contrastive fine-tune: an inference-time intervention in the style of ITI
(Li et al., 2023, "Inference-Time Intervention") on the same layers and questions.

**Directions** are chapter 04's (:func:`avss_lib.hallucination.directions.steering_vectors`, from its selection
half): per layer a unit "mass mean shift" direction from hallucinated to correct answers and the standard
deviation :math:`\sigma_l` of the examples' projections on it. ITI shifts individual attention heads; a shift of
the residual stream of whole layers is the coarser variant that matches the layer granularity of EAVSS.

**Intervention** (:func:`steer`). While it is active, every chosen layer's output (the residual stream after
the block) is shifted by :math:`\alpha\,\sigma_l\,u_l` at every position, for prompts and generated tokens alike.

**Strength** (:func:`tune_strength`). :math:`\alpha` is chosen on questions of the selection half (never on the
evaluation half): the grid value with the best accuracy pooled over the data sets, ties to the smaller
:math:`\alpha` (so :math:`\alpha = 0`, no intervention, wins unless a shift helps).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from avss_lib.core.benchmarks import Benchmark, Example
from avss_lib.core.errors import ConfigError, DataError
from avss_lib.core.layers import find_layers
from avss_lib.hallucination.answers import answer_benchmark

#: Strengths tried, in units of each layer's projection standard deviation.
ALPHAS: tuple[float, ...] = (0.0, 1.0, 2.0, 4.0, 8.0)


def _shift_hook(vector: torch.Tensor):
    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        if isinstance(output, tuple):
            return (output[0] + vector.to(output[0].dtype), *output[1:])
        return output + vector.to(output.dtype)
    return hook


@contextlib.contextmanager
def steer(model: nn.Module, vectors: Mapping[str, Mapping[str, Any]], layers: Sequence[int], alpha: float
          ) -> Iterator[nn.Module]:
    """Shift the outputs of ``layers`` by ``alpha * sigma * direction`` while the context is active."""
    blocks = find_layers(model).layers
    missing = [layer for layer in layers if str(int(layer)) not in vectors]
    if missing:
        raise DataError(f"no steering direction for layer(s) {missing}: re-run chapter 04")
    device = next(model.parameters()).device
    handles = []
    try:
        if alpha != 0:
            for layer in layers:
                v = vectors[str(int(layer))]
                vector = torch.tensor(v["direction"], dtype=torch.float32, device=device) * (alpha * v["sigma"])
                handles.append(blocks[int(layer)].register_forward_hook(_shift_hook(vector)))
        yield model
    finally:
        for handle in handles:
            handle.remove()


def pooled_accuracy(answers: Sequence[pd.DataFrame]) -> float:
    """Share of correct answers over every question of every data set (%)."""
    correct = np.concatenate([a["correct"].to_numpy(dtype=float) for a in answers])
    return 100.0 * float(correct.mean())


def tune_strength(model: nn.Module, tokenizer: PreTrainedTokenizerBase, questions: Mapping[str, Benchmark],
                  vectors: Mapping[str, Mapping[str, Any]], layers: Sequence[int], *,
                  shots: Mapping[str, Sequence[Example]], alphas: Sequence[float] = ALPHAS,
                  **answer_options: Any) -> tuple[float, pd.DataFrame]:
    """The grid strength with the best pooled accuracy on ``questions`` (selection-half questions), and the grid."""
    if not alphas or any(a < 0 for a in alphas):
        raise ConfigError(f"alphas={list(alphas)} must be a non-empty list of strengths >= 0")
    rows = []
    for alpha in sorted(set(alphas)):
        with steer(model, vectors, layers, alpha):
            answered = [answer_benchmark(model, tokenizer, bench, shots=shots.get(name, ()), **answer_options).answers
                        for name, bench in questions.items()]
        rows.append({"alpha": alpha, "accuracy": pooled_accuracy(answered), "n": sum(len(a) for a in answered)})
    grid = pd.DataFrame(rows)
    best = grid.loc[grid["accuracy"].idxmax(), "alpha"]  # idxmax: the first, i.e. smallest, of tied strengths
    return float(best), grid
