"""Remove decoder layers from a causal LM, or make a model skip them, and turn a ratio into a layer count.

:func:`remove_layers` returns a smaller, working model: the layers are deleted from the layer list, the
remaining attention modules are re-indexed (their ``layer_idx`` addresses the KV cache), and the config's
layer count and per-layer lists (e.g. Gemma-3's ``layer_types``) are cut to match, so that ``forward`` and
``generate`` with a KV cache work. :func:`skip_layers` makes the *original* model treat the given layers as
the identity (used to score layer removal without copying the model, and as the reference that
:func:`remove_layers` must reproduce).
"""

from __future__ import annotations

import copy
import math
import operator
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

from avss_lib.core.errors import ConfigError, ModelSpecError
from avss_lib.core.layers import find_layers

#: Config attributes that count the first ``k`` layers (Qwen2: layers below it use full attention).
_LAYER_THRESHOLD_ATTRS = ("max_window_layers",)


def checked_layer_indices(layers: Sequence[int], n_layers: int) -> list[int]:
    """Return ``layers`` as sorted plain ints after checking each is in ``[0, n_layers)`` and unique.

    Raises :class:`ConfigError` for a non-integer, out-of-range (negative indices included) or repeated index.
    """
    indices = []
    for layer in layers:
        try:
            index = operator.index(layer)
        except TypeError as exc:
            raise ConfigError(f"layer index {layer!r} is not an integer: pass layer numbers 0..{n_layers - 1}") from exc
        if not 0 <= index < n_layers:
            raise ConfigError(
                f"layer index {index} is out of range: the model has {n_layers} layers, use indices 0..{n_layers - 1}"
            )
        indices.append(index)
    repeated = sorted({i for i in indices if indices.count(i) > 1})
    if repeated:
        raise ConfigError(f"layer indices {repeated} are given more than once: list each layer at most once")
    return sorted(indices)


def remove_layers(model: nn.Module, layers_to_remove: Sequence[int], *, inplace: bool = False) -> nn.Module:
    """Return ``model`` without the decoder layers ``layers_to_remove`` (a deep copy unless ``inplace``).

    The kept layers keep their weights and their attention type; their ``layer_idx`` (on every sub-module
    that has one) becomes their new position, the config's layer count becomes the number kept, every
    config list named ``*layer*`` with one entry per layer is cut to the kept entries, and Qwen2's
    ``max_window_layers`` counts the kept layers below it. Raises :class:`ConfigError` for bad indices or
    when every layer would be removed, :class:`ModelSpecError` for a heterogeneous (per-layer) config.
    The pruned model can be saved and reloaded, except a GPT-2 with ``scale_attn_by_inverse_layer_idx``,
    whose attention scale is fixed from ``layer_idx`` when built (right in memory, wrong after reload).
    """
    n_layers = len(find_layers(model))
    removed = checked_layer_indices(layers_to_remove, n_layers)
    if len(removed) == n_layers:
        raise ConfigError(f"cannot remove all {n_layers} layers: keep at least one (remove at most {n_layers - 1})")
    if getattr(model.config, "is_heterogeneous", False):
        raise ModelSpecError(
            "the model config has per_layer_config overrides (heterogeneous layers), which pruning does not "
            "re-index: prune a model built from a homogeneous config"
        )
    pruned = model if inplace else copy.deepcopy(model)
    decoder = find_layers(pruned)
    for index in reversed(removed):
        del decoder.layers[index]
    _reindex(decoder.layers)
    kept = sorted(set(range(n_layers)) - set(removed))
    _cut_config(pruned.config, decoder.layout.layer_count_attr, kept, n_layers)
    return pruned


def _reindex(layers: nn.ModuleList) -> None:
    """Set ``layer_idx`` of every sub-module of layer ``j`` (attention, sometimes the layer itself) to ``j``."""
    for position, layer in enumerate(layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = position


def _cut_config(config: PretrainedConfig, count_attr: str, kept: list[int], n_layers: int) -> None:
    """Update the layer count, per-layer lists and layer-count thresholds of ``config`` to the ``kept`` layers."""
    setattr(config, count_attr, len(kept))
    for name, value in list(vars(config).items()):
        if "layer" in name and isinstance(value, (list, tuple)) and len(value) == n_layers:
            setattr(config, name, type(value)(value[i] for i in kept))
    for name in _LAYER_THRESHOLD_ATTRS:
        threshold = getattr(config, name, None)
        if isinstance(threshold, int):
            setattr(config, name, sum(1 for i in kept if i < threshold))


@contextmanager
def skip_layers(model: nn.Module, layers: Sequence[int]) -> Iterator[nn.Module]:
    """Within the ``with`` block, make ``model``'s decoder layers ``layers`` return their input unchanged.

    A forward hook (run before any other hook on the layer) replaces the layer's hidden-state output with
    its input hidden states; a tuple output keeps its other entries. The layer still runs, so it still
    fills its own KV-cache slot, which no other layer reads: cached generation stays correct. Hooks are
    removed on exit, also after an error. Raises :class:`ConfigError` for bad indices.
    """
    decoder = find_layers(model)
    handles = [
        decoder.layers[i].register_forward_hook(_identity_hook, with_kwargs=True, prepend=True)
        for i in checked_layer_indices(layers, len(decoder))
    ]
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()


def _identity_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
    """Forward hook: replace the layer's hidden-state output by its hidden-state input."""
    hidden_in = args[0] if args else kwargs["hidden_states"]
    if isinstance(output, torch.Tensor):
        return hidden_in
    if isinstance(output, tuple):
        return (hidden_in, *output[1:])
    raise ModelSpecError(
        f"{type(module).__name__} returned {type(output).__name__}; skip_layers handles a tensor or a tuple "
        "whose first entry is the hidden states"
    )


def layers_for_ratio(n_layers: int, ratio: float, rounding: str = "round") -> int:
    """Number of layers to remove for a fraction ``ratio`` of ``n_layers``, clipped to ``[1, n_layers - 1]``.

    ``rounding``: ``"round"`` (default) rounds ``ratio * n_layers`` half up (7.5 -> 8, 7.4 -> 7),
    ``"floor"`` and ``"ceil"`` round down and up. The result is at least 1 and at most ``n_layers - 1``.
    Raises :class:`ConfigError` for ``ratio`` outside (0, 1), fewer than 2 layers or an unknown rounding.
    """
    if not 0 < ratio < 1:
        raise ConfigError(f"ratio {ratio} is outside (0, 1): give the fraction of layers to remove, e.g. 0.25")
    if n_layers < 2:
        raise ConfigError(f"a model with {n_layers} layer(s) cannot be pruned: it needs at least 2 layers")
    rounders = {"round": lambda x: math.floor(x + 0.5), "floor": math.floor, "ceil": math.ceil}
    if rounding not in rounders:
        raise ConfigError(f"unknown rounding {rounding!r}: choose one of {sorted(rounders)}")
    # round(..., 9) removes float noise such as 0.3 * 10 = 3.0000000000000004 before floor/ceil
    count = rounders[rounding](round(ratio * n_layers, 9))
    return min(max(count, 1), n_layers - 1)
