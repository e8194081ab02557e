"""What a result's code is: the ``avss_lib`` modules a source imports, transitively, and a hash of their text.

The pipeline hashes a notebook's modules into its fingerprint (:func:`avss_lib.book.pipeline.run_notebook`), and
chapter 05 hashes the modules that train and evaluate a run into the run's key
(:func:`avss_lib.mitigation.runs.run_key`), so a finished run is reused across changes of prose, figures or
verdicts, and recomputed when the code that made its numbers changed.
"""

from __future__ import annotations

import ast
import hashlib
from collections.abc import Iterable
from pathlib import Path

PACKAGE = "avss_lib"
PACKAGE_ROOT = Path(__file__).resolve().parents[1]


def module_file(dotted: str) -> Path | None:
    """The source file of an ``avss_lib`` module or package (its ``__init__.py``), or None."""
    base = PACKAGE_ROOT.parent / Path(*dotted.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def imported_modules(tree: ast.AST) -> set[str]:
    """Dotted names of the ``avss_lib`` modules a parsed source imports (absolute imports, as the library uses).

    ``from avss_lib.core import io`` names ``avss_lib.core.io`` when that is a module, else ``avss_lib.core``.
    """
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.startswith(f"{PACKAGE}.")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and \
                (node.module == PACKAGE or node.module.startswith(f"{PACKAGE}.")):
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names if module_file(f"{node.module}.{a.name}")}
    return {n for n in names if module_file(n)}


def module_closure(modules: Iterable[str]) -> list[Path]:
    """The source files of ``modules`` and of every ``avss_lib`` module they import, transitively, sorted."""
    todo, seen = set(modules), set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo |= imported_modules(ast.parse(module_file(name).read_text())) - seen  # type: ignore[union-attr]
    return sorted(module_file(name) for name in seen)  # type: ignore[type-var]


def source_digest(paths: Iterable[Path]) -> str:
    """sha256 of the files' paths (relative to the repository) and text."""
    h = hashlib.sha256()
    for path in paths:
        h.update(str(path.relative_to(PACKAGE_ROOT.parent)).encode() + path.read_bytes())
    return h.hexdigest()
