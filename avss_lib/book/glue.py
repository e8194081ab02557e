"""Numbers and data-dependent phrases for the chapters' prose, glued with myst-nb.

A chapter's sentences live in its notebook's markdown cells; the numbers in them are glued here from the
computed results and pasted with ``{glue:text}`key:.1f``` (numbers) or ``{glue:md}`key:myst``` (phrases, which
may carry Markdown). A key that was never glued fails the book build (it is built with warnings as errors),
so prose cannot silently lose its number.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from IPython.display import Markdown
from myst_nb import glue as _glue


def glue_values(values: Mapping[str, Any]) -> None:
    """Glue every value under its key, without displaying it.

    Numbers are glued as numbers (``{glue:text}`key:.2f```); NaN and infinities as the words "n/a" and "∞"
    (``{glue:md}``); strings as Markdown (``{glue:md}`key:myst```). Booleans are refused: prose should glue the
    words a condition chooses, not ``True``.
    """
    for key, value in values.items():
        if isinstance(value, bool):
            raise TypeError(f"glue value {key!r} is a bool: glue the phrase it selects instead")
        if isinstance(value, (int, float)) and not math.isfinite(value):
            value = Markdown("n/a" if math.isnan(value) else ("∞" if value > 0 else "−∞"))
        elif isinstance(value, str):
            value = Markdown(value)
        _glue(key, value, display=False)
