"""Forward speed of the model without ``k`` of its ``n`` decoder layers against the theoretical ``1 / (1 − k/n)``.

Each ratio is timed with :func:`avss_lib.core.timing.measure_speedup` (the pruned copy and the original run the
same batch alternately, after one warm-up pair; the best run of each is compared).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
from torch import Tensor, nn
from tqdm import tqdm

from avss_lib.core.errors import ConfigError
from avss_lib.core.layer_removal import layers_for_ratio
from avss_lib.core.layers import find_layers
from avss_lib.core.timing import measure_speedup
from avss_lib.performance.parameter_checks import check_positive_int, check_ratios


def theoretical_speedup(ratio: float) -> float:
    """Speed-up ``1 / (1 − ratio)`` if forward time were proportional to the number of decoder layers kept."""
    check_ratios([ratio])
    return 1.0 / (1.0 - ratio)


def speed_layers(n_layers: int, k: int) -> list[int]:
    """The ``k`` deepest decoder layers except the last one (the last-k rule; speed depends only on ``k``)."""
    if not 1 <= k <= n_layers - 1:
        raise ConfigError(f"cannot remove {k} of {n_layers} layers: remove 1..{n_layers - 1}")
    return list(range(n_layers - 1 - k, n_layers - 1))


def speedup_row(ratio: float, timing: Mapping[str, Any]) -> dict[str, Any]:
    """One row of the speed-up table from a :func:`~avss_lib.core.timing.measure_speedup` result at ``ratio``.

    ``theoretical_speedup`` is ``1 / (1 − k/n)`` of the layers actually removed, ``nominal_theoretical_speedup``
    that of the requested ratio, and ``measured_over_theoretical`` the share of the former that was measured.
    """
    n_layers, k = int(timing["n_layers"]), int(timing["n_removed"])
    theory = theoretical_speedup(k / n_layers)
    return {"ratio": ratio, "n_layers": n_layers, "n_removed": k, "removed_fraction": k / n_layers,
            "layers_removed": list(timing["layers_removed"]),
            "batch_shape": "×".join(map(str, timing["batch_shape"])), "repeats": int(timing["repeats"]),
            "seconds_unpruned": timing["seconds_unpruned"], "seconds_pruned": timing["seconds_pruned"],
            "measured_speedup": timing["measured_speedup"], "theoretical_speedup": theory,
            "nominal_theoretical_speedup": theoretical_speedup(ratio),
            "estimated_speedup_params": timing["estimated_speedup_params"],
            "measured_over_theoretical": timing["measured_speedup"] / theory}


def measure_pruning_speedups(model: nn.Module, batch: Mapping[str, Tensor], ratios: Sequence[float], *,
                             repeats: int = 3, rounding: str = "round", progress: bool = False) -> pd.DataFrame:
    """Measured forward speed-up of the model without ``k = layers_for_ratio(n, r)`` layers, for each ratio.

    The layers removed are :func:`speed_layers` (which ones does not change the cost). The theoretical speed-up
    counts decoder layers only; ``estimated_speedup_params`` also counts the LM head, which pruning does not
    shrink. One :func:`speedup_row` per ratio, ratios ascending.
    """
    ratios = check_ratios(ratios)
    repeats = check_positive_int("repeats", repeats)
    n_layers = len(find_layers(model))
    rows = []
    for ratio in tqdm(ratios, desc="pruned models", disable=not progress):
        k = layers_for_ratio(n_layers, ratio, rounding)
        rows.append(speedup_row(ratio, measure_speedup(model, speed_layers(n_layers, k), batch, repeats=repeats)))
    return pd.DataFrame(rows)
