"""How numbers and layer sets are written in the book's tables and prose, defined once."""

from __future__ import annotations

import math
from collections.abc import Sequence

EMPTY = "—"


def layer_list(layers: Sequence[int], empty: str = EMPTY) -> str:
    """Layers for a reader: ``[3, 7, 12]`` -> ``"3, 7, 12"``; no layer -> ``empty``."""
    return ", ".join(str(int(v)) for v in layers) if len(layers) else empty


def finite_or_none(x: float | None) -> float | None:
    """A JSON-friendly number: ``None`` for None, NaN and infinities."""
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def interval(value: float, low: float, high: float, fmt: str = "{:.3f}") -> str:
    """``value [low, high]`` with one format for all three (``n/a`` for a missing bound)."""
    def one(x: float) -> str:
        return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)

    return f"{one(value)} [{one(low)}, {one(high)}]"


def percent(value: float) -> str:
    """A percentage with two significant digits below 10 (0.42), none above (63); ``n/a`` for NaN."""
    if value is None or math.isnan(value):
        return "n/a"
    return f"{value:.2g}" if abs(value) < 10 else f"{value:.0f}"
