"""Checks of the performance appendix's list and count parameters, defined once for every measurement."""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from avss_lib.core.errors import ConfigError


def check_positive_int(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an int after checking it is an integer (not a bool) of at least ``minimum``."""
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    try:
        number = operator.index(value)
    except TypeError as exc:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}") from exc
    if number < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {number}")
    return number


def _checked_list(name: str, values: Any, what: str, example: str, check_item: Callable[[Any], None]) -> list[Any]:
    """``values`` as a non-empty list (not a string) of items that pass ``check_item`` and are not repeated."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise ConfigError(f"{name} must be a list of {what}, e.g. {example}; got {values!r}")
    items = list(values)
    if not items:
        raise ConfigError(f"{name} is empty: give at least one, e.g. {example}")
    for item in items:
        check_item(item)
    if len(set(items)) != len(items):
        raise ConfigError(f"{name} {items} repeat a value: list each once")
    return items


def _check_multiple(m: Any) -> None:
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1:
        raise ConfigError(f"token multiple {m!r} is not an integer >= 1: each multiple repeats the base batches "
                          "that many times, e.g. [1, 4, 10]")


def _check_ratio(r: Any) -> None:
    if isinstance(r, bool) or not isinstance(r, (int, float, np.number)) or not 0 < r < 1:
        raise ConfigError(f"ratio {r!r} is outside (0, 1): give the fraction of decoder layers to remove, e.g. 0.25")


def check_token_multiples(multiples: Sequence[int]) -> list[int]:
    """Sorted, unique token multiples after checking each is an integer >= 1 (1 = the base batches once)."""
    values = _checked_list("token_multiples", multiples, "integers >= 1", "[1, 4, 10]", _check_multiple)
    return sorted(int(m) for m in values)


def check_ratios(ratios: Sequence[float]) -> list[float]:
    """Sorted, unique removal ratios after checking each is a number in the open interval (0, 1)."""
    values = _checked_list("prune_ratios", ratios, "fractions of layers to remove in (0, 1)", "[0.25, 0.5]",
                           _check_ratio)
    return sorted(float(r) for r in values)
