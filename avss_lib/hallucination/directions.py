r"""Per-layer directions from hallucinated to correct answers, for the inference-time intervention of chapter 05.

For each layer :math:`l`, ITI's "mass mean shift" direction (Li et al., 2023): the mean block output of the
correctly answered questions minus that of the hallucinated ones, at chapter 04's token position, pooled over the
data sets and computed on the selection half only,
:math:`u_l = (\bar{h}^{C}_l - \bar{h}^{H}_l) / \lVert \bar{h}^{C}_l - \bar{h}^{H}_l \rVert`, with :math:`\sigma_l` the
standard deviation of the examples' projections on :math:`u_l` (the unit the intervention's strength is given in).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from avss_lib.core.errors import DataError


def steering_vectors(features: Mapping[int, np.ndarray], hallucinated: np.ndarray) -> dict[str, dict[str, Any]]:
    """Per layer: the unit mean-shift direction (correct minus hallucinated) and the projections' std.

    ``features``: ``{layer: (n_examples, hidden)}`` rows aligned with the boolean ``hallucinated``. Returns
    ``{str(layer): {"direction": [...], "sigma": float}}`` (JSON-ready).
    """
    y = np.asarray(hallucinated, dtype=bool)
    if y.all() or not y.any():
        raise DataError("steering directions need both correct and hallucinated examples: label more questions")
    out = {}
    for layer, x in features.items():
        x = np.asarray(x, dtype=np.float64)
        if len(x) != len(y):
            raise DataError(f"layer {layer}: {len(x)} feature rows for {len(y)} labels")
        shift = x[~y].mean(axis=0) - x[y].mean(axis=0)
        norm = float(np.linalg.norm(shift))
        if norm == 0:
            raise DataError(f"layer {layer}: the class means coincide, so there is no direction to shift along")
        unit = shift / norm
        out[str(int(layer))] = {"direction": unit.tolist(), "sigma": float(np.std(x @ unit))}
    return out
