"""Runs that cover several models: one run folder per model, one book with a part per model.

``avss run --models A B`` (or a profile's ``models`` list) runs the profile once per model, each into its own
sub-folder ``<run_dir>/<folder>/`` (:func:`model_folder`), and records the list in ``<run_dir>/models.json``
(:func:`avss_lib.core.artifacts.write_models`). The book built from such a run keeps the study's own pages
(introduction, method, claims, limitations) once and gives each model a part holding its executed chapters and
its reproducibility appendix; a page puts the models side by side (:mod:`avss_lib.book.model_comparison`), and
the claims chapter gives one verdict per claim per model and says whether the models agree
(:func:`avss_lib.book.claims.models_claims_markdown`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from avss_lib.core.artifacts import write_models
from avss_lib.core.errors import ConfigError

#: Chapters of the table of contents that a run of several models repeats, once per model.
PER_MODEL_PAGES = ("book/reproducibility",)
#: The page that puts the models side by side (:mod:`avss_lib.book.model_comparison`), first among the verdicts.
COMPARISON_PAGE = "models_compared"


def model_folder(spec: str) -> str:
    """The run sub-folder of a model: its bundled name, Hub id (``/`` -> ``--``) or file/folder name, made safe."""
    path = Path(spec)
    name = path.stem if spec.endswith(".gguf") else path.name if path.exists() else spec.replace("/", "--")
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "model"


def model_folders(models: Sequence[str]) -> dict[str, str]:
    """``{folder: spec}`` for the models of a run, refusing an empty list, repeats and clashing folders."""
    if not models:
        raise ConfigError("--models needs at least one model: a bundled name, Hub id, local folder or .gguf path")
    folders: dict[str, str] = {}
    for spec in models:
        folder = model_folder(spec)
        if folder in folders:
            raise ConfigError(f"models {folders[folder]!r} and {spec!r} would share the run folder {folder!r}: "
                              "list each model once (rename a local file if two differ only in their folder)")
        folders[folder] = spec
    return folders


def run_models(run: Callable[..., Any], models: Sequence[str], run_dir: str | os.PathLike[str],
               overrides: dict[str, Any] | None = None, **options: Any) -> dict[str, list[Any]]:
    """Run ``run`` (the pipeline) once per model into ``<run_dir>/<folder>``; return each model's notebook runs.

    The list of models is recorded first, so a book can be built from the models that finished so far.
    """
    folders = model_folders(models)
    write_models(run_dir, folders)
    results = {}
    for folder, spec in folders.items():
        print(f"[avss] model {spec} -> {Path(run_dir) / folder}", flush=True)
        results[spec] = run(run_dir=Path(run_dir) / folder, overrides={**(overrides or {}), "model": spec}, **options)
    return results


def models_toc(toc: dict[str, Any], folders: Sequence[str], has_page: Callable[[str], bool]) -> dict[str, Any]:
    """The table of contents of a book of several models, from the one-model ``toc``.

    The pages before the first executed chapter form the part "The study", each model's executed chapters and
    per-model pages (its reproducibility appendix) a part of their own, and the comparison page with the pages
    after them "Verdicts";
    a page is kept only where ``has_page(file)`` (a model that has not run a chapter leaves it out).
    """
    def per_model(file: str) -> bool:
        return file.startswith("executed/") or file in PER_MODEL_PAGES

    chapters = [c["file"] for c in toc["chapters"]]
    first = next((i for i, f in enumerate(chapters) if per_model(f)), len(chapters))
    head = [f for f in chapters[:first] if not per_model(f)]
    tail = [COMPARISON_PAGE, *(f for f in chapters[first:] if not per_model(f))]
    own = [f for f in chapters if per_model(f)]
    parts = [{"caption": "The study", "chapters": [{"file": f} for f in head if has_page(f)]}]
    for folder in folders:
        pages = [f"executed/{folder}/{Path(f).name}" for f in own]
        parts.append({"caption": folder, "chapters": [{"file": f} for f in pages if has_page(f)]})
    parts.append({"caption": "Verdicts", "chapters": [{"file": f} for f in tail if has_page(f)]})
    return {k: v for k, v in toc.items() if k != "chapters"} | {"parts": [p for p in parts if p["chapters"]]}
