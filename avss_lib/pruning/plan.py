"""Which layers each ranking method removes: per-layer scores of every method, and the pruned sets they give.

1. :func:`method_scores` — one per-layer score per method on the same calibration tokens (higher = more
   important, the :mod:`avss_lib.ranking.baselines` convention): every AVSS variant of chapter 02
   (``avss:<variant>``), ``random:<seed>`` for several seeds, ``last_k``, ``block_influence``,
   ``angular_distance``, the single-layer removal oracle ``delta_ppl`` and, optionally, SLEB's greedy order
   ``sleb``. The oracle runs on chapter 01's calibration batches
   (:func:`avss_lib.core.calibration_text.calibration_batches`).
2. :func:`plan_pruned_sets` — for every method and ratio the ``layers_for_ratio`` lowest-scoring layers
   (:func:`avss_lib.ranking.baselines.select_lowest`: ties by layer index); identical layer sets get one
   ``set_id`` so each is evaluated once (:func:`unique_sets`); methods that choose a set per size directly —
   Gromov et al.'s contiguous block ``gromov_block`` (:func:`block_methods`) — join the plan beside them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from avss_lib.core.errors import ConfigError, DataError
from avss_lib.core.layer_removal import layers_for_ratio
from avss_lib.core.layers import find_layers
from avss_lib.ranking import baselines

BASE_SET = "none"  # set_id of the unpruned model


def method_scores(stats: pd.DataFrame, avss_scores: pd.DataFrame, *, random_seeds: Sequence[int],
                  model: nn.Module | None = None, oracle_batches: Sequence[Mapping[str, torch.Tensor]] | None = None,
                  sleb_layers: int = 0, sleb_batches: Sequence[Mapping[str, torch.Tensor]] | None = None
                  ) -> dict[str, pd.Series]:
    """Per-layer scores (higher = more important, indexed by layer) of every method, in a fixed order.

    ``stats``: chapter 01's table (``block_output`` rows give BI and angular distance); ``avss_scores``:
    chapter 02's table (one ``avss`` column per variant; infinite scores rank last, ties by layer index).
    With ``model`` and ``oracle_batches`` the removal-ΔPPL oracle is added, and with ``sleb_layers > 0``
    SLEB's greedy order of that many layers on ``sleb_batches`` (default: the oracle's; removed first = lowest
    score; the rest keep their oracle order above them). Raises :class:`DataError` when the tables disagree on the number of layers.
    """
    block = stats[stats["site"] == "block_output"].sort_values("layer")
    if block.empty:
        raise DataError("the statistics have no block_output rows: chapter 01 must collect site block_output")
    layers = block["layer"].astype(int).to_numpy()
    n_layers = len(layers)
    if len(set(random_seeds)) != len(random_seeds):
        raise ConfigError(f"random seeds {list(random_seeds)} repeat: give distinct seeds")
    scores: dict[str, pd.Series] = {}
    for variant, group in avss_scores.groupby("variant", sort=False):
        group = group.sort_values("layer")
        if len(group) != n_layers:
            raise DataError(f"AVSS variant {variant} has {len(group)} layers but the statistics have {n_layers}: "
                            "re-run chapters 01 and 02 on the same model")
        scores[f"avss:{variant}"] = pd.Series(group["avss"].to_numpy(dtype=float), index=layers)
    for seed in random_seeds:
        scores[f"random:{seed}"] = pd.Series(baselines.random_scores(n_layers, seed), index=layers)
    scores["last_k"] = pd.Series(baselines.last_k_scores(n_layers), index=layers)
    scores["block_influence"] = pd.Series(baselines.block_influence(block["cos_mean"].to_numpy()), index=layers)
    scores["angular_distance"] = pd.Series(baselines.angular_distance(block["cos_last"].to_numpy()), index=layers)
    if model is not None and oracle_batches is not None:
        if len(find_layers(model)) != n_layers:
            raise DataError(f"the model has {len(find_layers(model))} layers, the statistics {n_layers}: "
                            "use the model chapter 01 ran on")
        delta = baselines.removal_delta_ppl(model, oracle_batches, progress=False)
        scores["delta_ppl"] = pd.Series(delta, index=layers)
        if sleb_layers:
            order = baselines.greedy_removal_order(model, oracle_batches if sleb_batches is None else sleb_batches,
                                                   sleb_layers, progress=False)
            sleb = pd.Series(np.argsort(np.argsort(delta)).astype(float) + n_layers, index=layers)
            sleb[order] = np.arange(len(order), dtype=float)
            scores["sleb"] = sleb
    return scores


def block_methods(model: nn.Module, oracle_batches: Sequence[Mapping[str, torch.Tensor]]
                  ) -> dict[str, Callable[[int], list[int]]]:
    """The methods that choose a set of ``n`` layers directly, from one pass over the oracle's calibration
    batches: ``gromov_block``, the block of ``n`` consecutive layers whose last-token input and output are
    closest in angle (:func:`avss_lib.ranking.baselines.gromov_block`)."""
    inputs, outputs = baselines.last_token_states(model, oracle_batches)
    return {"gromov_block": lambda n: baselines.gromov_block(inputs, outputs, n)}


def method_family(method: str) -> str:
    """``avss``, ``random`` or the baseline's name."""
    return method.split(":", 1)[0]


def plan_pruned_sets(scores: Mapping[str, pd.Series], ratios: Iterable[float], *, rounding: str = "round",
                     blocks: Mapping[str, Callable[[int], list[int]]] | None = None) -> pd.DataFrame:
    """One row per (method, ratio): ``k`` layers to remove, the ``layers`` (sorted list), ``arbitrary`` (a
    selected layer's score is infinite, so the order among those layers was decided by the tie rule), and a
    ``set_id`` shared by identical sets. ``blocks``: methods that choose a set for each ``k`` directly (e.g.
    :func:`avss_lib.ranking.baselines.gromov_block`), after the ranked ones. Raises :class:`ConfigError` for a
    ratio outside (0, 1)."""
    rows = []
    ratios = list(ratios)
    if not ratios:
        raise ConfigError("no pruning ratio given: give at least one fraction in (0, 1)")
    if not scores:
        raise ConfigError("no ranking to plan: give at least one method's scores")
    n_layers = len(next(iter(scores.values())))
    for ratio in ratios:
        k = layers_for_ratio(n_layers, float(ratio), rounding=rounding)
        for method, score in scores.items():
            layers = baselines.select_lowest(score, k)
            arbitrary = bool(np.isinf(score.loc[layers].to_numpy()).any())
            rows.append({"method": method, "family": method_family(method), "ratio": float(ratio), "k": k,
                         "fraction_removed": k / len(score), "layers": layers, "arbitrary": arbitrary})
        for method, choose in (blocks or {}).items():
            rows.append({"method": method, "family": method_family(method), "ratio": float(ratio), "k": k,
                         "fraction_removed": k / n_layers, "layers": sorted(choose(k)), "arbitrary": False})
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


def selection_mismatches(plan: pd.DataFrame, selections: pd.DataFrame, ratio: float) -> list[str]:
    """AVSS variants whose set at ``ratio`` differs from chapter 02's ``fixed_fraction`` selection
    (``selections``: the :data:`avss_lib.core.artifacts.SELECTIONS` table, ``layers`` decoded)."""
    fixed = selections[selections["rule"] == "fixed_fraction"].set_index("variant")["layers"]
    at = plan[np.isclose(plan["ratio"], ratio) & (plan["family"] == "avss")]
    variants = {row.method.split(":", 1)[1]: list(row.layers) for row in at.itertuples()}
    return [v for v, layers in variants.items() if v in fixed.index and sorted(fixed[v]) != layers]


def method_label(method: str) -> str:
    """A method for a reader: ``"avss:authors_code"`` -> ``"AVSS authors code"``, ``"last_k"`` -> ``"last k"``."""
    return method.replace("avss:", "AVSS ").replace("_", " ")
