"""Wall-clock timing of a pruned model against the unpruned one, defined once for chapters 03 and 06."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from avss_lib.core.errors import ConfigError
from avss_lib.core.layer_removal import remove_layers
from avss_lib.core.layers import find_layers
from avss_lib.core.models import synchronize


def measure_speedup(model: nn.Module, layers: Sequence[int], batch: Mapping[str, torch.Tensor], *,
                    repeats: int = 5, warmup: int = 1) -> dict[str, Any]:
    """Forward time of ``model`` and of its copy without ``layers`` on the same batch, in the same process.

    Runs alternate (unpruned, pruned) ``repeats`` times after ``warmup`` untimed pairs. Reports the best
    (shortest) run of each, the run least disturbed by the rest of the machine, their ratio (the measured
    speed-up), the decoder-layer theoretical ``1 / (1 − k/n)`` and a parameter-count estimate that includes the
    parts that are never removed (embeddings, final norm, LM head).
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
    t_full, t_pruned = min(times["unpruned"]), min(times["pruned"])
    del pruned
    return {"n_layers": n_layers, "n_removed": len(layers), "layers_removed": list(layers),
            "batch_shape": list(inputs["input_ids"].shape), "repeats": repeats,
            "seconds_unpruned": t_full, "seconds_pruned": t_pruned, "measured_speedup": t_full / t_pruned,
            "theoretical_speedup_layers": 1.0 / (1.0 - len(layers) / n_layers),
            "estimated_speedup_params": compute_full / compute_pruned,
            "total_params": total_params, "torch_threads": torch.get_num_threads(),
            "times_unpruned": times["unpruned"], "times_pruned": times["pruned"]}
