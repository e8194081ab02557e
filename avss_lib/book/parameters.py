"""A chapter notebook's parameters cell is its stage's keyword list: one call passes them all.

Each notebook calls its wing's stage as ``run_x(**stage_arguments(run_x, globals()))``. The stage's signature
is the one list of the chapter's knobs; the parameters cell gives each its default and comment, papermill
overrides them, and a test keeps the two lists equal but for the stage's few keywords that are no chapter knobs
(``tests/test_notebooks.py``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from avss_lib.core.errors import ConfigError


def stage_arguments(stage: Callable[..., Any], namespace: Mapping[str, Any]) -> dict[str, Any]:
    """The values in ``namespace`` (a notebook's globals) of the parameters of ``stage``, by name.

    A parameter with a default that ``namespace`` lacks keeps it (the few keywords that are not chapter knobs,
    such as ``progress``; the test lists them per stage). Raises :class:`ConfigError` naming the required
    parameters that ``namespace`` lacks.
    """
    params = [p for p in inspect.signature(stage).parameters.values()
              if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    missing = [p.name for p in params if p.name not in namespace and p.default is p.empty]
    if missing:
        raise ConfigError(f"{stage.__name__} needs parameter(s) {', '.join(missing)}: declare them in the "
                          "notebook's parameters cell")
    return {p.name: namespace[p.name] for p in params if p.name in namespace}
