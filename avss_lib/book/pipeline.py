"""Run the study's notebooks in order with papermill, reuse finished ones, and build the Jupyter Book.

A *profile* (``avss_lib/book/profiles/<name>.yaml`` or any YAML file of the same shape) gives ``common``
parameters, passed to every notebook that declares them, and per-notebook parameters under ``notebooks``;
the notebooks listed there are the ones the profile runs.
Every notebook writes its artifacts to ``<run_dir>/<notebook>/`` and the executed copy to
``<run_dir>/executed/<notebook>.ipynb``. A notebook whose parameters, source and upstream artifacts are
unchanged is reused (its fingerprint is in ``<run_dir>/<notebook>/_done.json``) unless ``force`` is set.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from avss_lib.core.artifacts import SELF_KEYED, done_record, read_models, started_record
from avss_lib.core.errors import AvssError, ConfigError
from avss_lib.book.claims import claims_markdown, models_claims_markdown
from avss_lib.book.model_comparison import comparison_markdown
from avss_lib.book.model_runs import COMPARISON_PAGE, models_toc
from avss_lib.core.io import atomic_path, read_json, write_json
from avss_lib.core.source_digest import imported_modules, module_closure, source_digest
from avss_lib.book.reproducibility import appendix_markdown

REPO_ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK_DIR = REPO_ROOT / "notebooks"
PROFILE_DIR = Path(__file__).resolve().parent / "profiles"
#: Notebooks in execution order, each with the notebooks whose artifacts it reads.
NOTEBOOKS: dict[str, tuple[str, ...]] = {
    "01_activations": (),
    "02_avss_ranking": ("01_activations",),
    "03_pruning": ("01_activations", "02_avss_ranking"),
    "04_hallucination_layers": ("01_activations", "02_avss_ranking"),
    "05_mitigation": ("01_activations", "02_avss_ranking", "04_hallucination_layers"),
    "06_performance": ("01_activations",),
}
#: Notebooks that also read the artifacts of these ones *when the run has them* (the performance appendix
#: tabulates the wall time of every notebook that ran before it).
OPTIONAL_UPSTREAM: dict[str, tuple[str, ...]] = {
    "06_performance": ("02_avss_ranking", "03_pruning", "04_hallucination_layers", "05_mitigation"),
}
BOOK_SOURCES = ("_config.yml", "_toc.yml", "references.bib", "book")


class NotebookFailed(AvssError):
    """A notebook raised while executing; the message names the partly executed copy to inspect."""


@dataclass(frozen=True)
class NotebookRun:
    """What happened to one notebook: ``status`` is 'ran' or 'reused'."""

    name: str
    status: str
    seconds: float


def profile_names() -> list[str]:
    """Names of the bundled profiles."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def load_profile(profile: str | os.PathLike[str], _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """Load a bundled profile by name, or a YAML file by path; validate its shape.

    A profile may name another in ``extends``: it then starts from that profile's ``common`` values and
    notebooks, and its own values replace the inherited ones key by key (a notebook listed as ``null`` is
    dropped from the inherited set). An optional ``models`` list makes the run cover several models, one run
    folder each (:mod:`avss_lib.book.model_runs`); without it the run covers ``common.model``.
    """
    path = Path(profile)
    if not path.suffix:
        path = PROFILE_DIR / f"{profile}.yaml"
        if not path.is_file():
            raise ConfigError(f"unknown profile {str(profile)!r}: choose one of {', '.join(profile_names())} or give a YAML file")
    elif not path.is_file():
        raise ConfigError(f"parameters file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict) or set(data) - {"common", "notebooks", "extends", "models"}:
        raise ConfigError(f"{path}: a profile has only the keys 'extends', 'common', 'notebooks' and 'models'")
    models = data.get("models")
    if models is not None and (not isinstance(models, list) or not all(isinstance(m, str) for m in models)):
        raise ConfigError(f"{path}: 'models' is a list of model specs (bundled names, Hub ids or paths), got {models!r}")
    notebooks = data.get("notebooks") or {}
    unknown = set(notebooks) - set(NOTEBOOKS)
    if unknown:
        raise ConfigError(f"{path}: unknown notebook(s) {sorted(unknown)}: choose from {', '.join(NOTEBOOKS)}")
    if "extends" not in data:
        return {"common": data.get("common") or {}, "notebooks": {k: v or {} for k, v in notebooks.items()},
                "models": models}
    if str(data["extends"]) in _seen:
        raise ConfigError(f"{path}: profiles extend each other in a cycle: {' -> '.join([*_seen, str(data['extends'])])}")
    base = load_profile(data["extends"], (*_seen, str(data["extends"])))
    merged = {"common": {**base["common"], **(data.get("common") or {})}, "notebooks": dict(base["notebooks"]),
              "models": base["models"] if models is None else models}
    for name, values in notebooks.items():
        if values is None:
            merged["notebooks"].pop(name, None)
        else:
            merged["notebooks"][name] = {**merged["notebooks"].get(name, {}), **values}
    return merged


@dataclass(frozen=True)
class Parameter:
    """One parameter of a notebook's ``parameters`` cell: its default value and its inline comment."""

    name: str
    default: Any
    help: str


def declared_parameters(notebook: str) -> dict[str, Parameter]:
    """The parameters a notebook declares in its ``parameters`` cell."""
    import papermill

    params = papermill.inspect_notebook(str(NOTEBOOK_DIR / f"{notebook}.ipynb"))
    return {name: Parameter(name, ast.literal_eval(spec["default"]), spec["help"]) for name, spec in params.items()}


def _check_type(notebook: str, param: Parameter, value: Any) -> None:
    default = param.default
    if default is None or value is None:
        return
    numeric = (int, float)
    ok = (isinstance(value, bool) == isinstance(default, bool)) and (
        isinstance(value, type(default)) or (isinstance(default, float) and isinstance(value, numeric)))
    if not ok:
        raise ConfigError(f"parameter {param.name} of {notebook} must be of type {type(default).__name__} "
                          f"(like {default!r}), got {value!r}")


def notebook_parameters(profile: dict[str, Any], notebook: str, run_dir: Path) -> dict[str, Any]:
    """The parameters papermill injects into ``notebook``: the profile's common and own values, and the run folder."""
    declared = declared_parameters(notebook)
    own = profile["notebooks"].get(notebook) or {}
    unknown = set(own) - set(declared)
    if unknown:
        raise ConfigError(f"notebook {notebook} has no parameter(s) {sorted(unknown)}: it declares {', '.join(declared)}")
    params = {k: v for k, v in profile["common"].items() if k in declared}
    params.update(own)
    params.update({k: v for k, v in profile.get("overrides", {}).items() if k in declared})
    for key, value in params.items():
        _check_type(notebook, declared[key], value)
    params["run_dir"] = str(run_dir)
    for key in ("data_root",):
        if key in params and params[key] != "hub":
            params[key] = str((REPO_ROOT / params[key]).resolve())
    return params


def library_modules(notebook: str) -> list[Path]:
    """The ``avss_lib`` source files a notebook depends on: those its cells import, and theirs, transitively."""
    cells = json.loads((NOTEBOOK_DIR / f"{notebook}.ipynb").read_text())["cells"]
    code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    lines = [line for line in code.splitlines() if not line.lstrip().startswith(("%", "!"))]
    return module_closure(imported_modules(ast.parse("\n".join(lines))))


def _fingerprint(notebook: str, params: dict[str, Any], run_dir: Path) -> str:
    """Hash of the parameters, the notebook, the library modules it uses and its upstream notebooks' fingerprints."""
    h = hashlib.sha256()
    h.update(json.dumps(params, sort_keys=True).encode())
    h.update((NOTEBOOK_DIR / f"{notebook}.ipynb").read_bytes())
    h.update(source_digest(library_modules(notebook)).encode())
    for upstream in NOTEBOOKS[notebook]:
        h.update(read_json(done_record(run_dir, upstream))["fingerprint"].encode())
    for upstream in OPTIONAL_UPSTREAM.get(notebook, ()):
        done = done_record(run_dir, upstream)
        if done.is_file():
            h.update(upstream.encode() + read_json(done)["fingerprint"].encode())
    return h.hexdigest()


def clear_stage(out_dir: Path, keep: Sequence[str] = ()) -> None:
    """Remove a stage's files before a run of other parameters or code, except the self-keyed folders ``keep``."""
    for entry in out_dir.iterdir():
        if entry.name in keep and entry.is_dir():
            continue
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def run_notebook(notebook: str, params: dict[str, Any], run_dir: Path, *, force: bool = False) -> NotebookRun:
    """Execute one notebook with papermill unless an identical finished run exists.

    A notebook may leave checkpoints in its folder so that an interrupted run resumes (``_started.json``
    holds the fingerprint of the run that wrote them). Before a run, the folder is emptied unless it was
    started with the same fingerprint and ``force`` is not set: results of other parameters, code or inputs
    are never resumed — except the self-keyed folders of :data:`avss_lib.core.artifacts.SELF_KEYED`, whose files
    carry a hash of exactly what they depend on (kept unless ``force``).
    """
    out_dir = run_dir / notebook
    executed = run_dir / "executed" / f"{notebook}.ipynb"
    done_file = done_record(run_dir, notebook)
    started_file = started_record(run_dir, notebook)
    fingerprint = _fingerprint(notebook, params, run_dir)
    if not force and done_file.is_file() and executed.is_file():
        if read_json(done_file).get("fingerprint") == fingerprint:
            return NotebookRun(notebook, "reused", 0.0)
    resumable = not force and started_file.is_file() and read_json(started_file).get("fingerprint") == fingerprint
    if out_dir.exists() and not resumable:
        clear_stage(out_dir, keep=() if force else SELF_KEYED.get(notebook, ()))
    out_dir.mkdir(parents=True, exist_ok=True)
    done_file.unlink(missing_ok=True)
    write_json({"fingerprint": fingerprint, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, started_file)
    start = time.perf_counter()
    with atomic_path(executed) as tmp, tempfile.NamedTemporaryFile("w", suffix=".yaml") as param_file:
        yaml.safe_dump(params, param_file)
        param_file.flush()
        cmd = [sys.executable, "-m", "papermill", str(NOTEBOOK_DIR / f"{notebook}.ipynb"), str(tmp),
               "-f", param_file.name, "--cwd", str(REPO_ROOT), "-k", "python3", "--log-output", "--no-progress-bar"]
        # tqdm.auto (used by dependencies) warns in a kernel without ipywidgets; plain bars are what we want
        env = {**os.environ, "PYTHONWARNINGS": "ignore:IProgress not found"}
        process = subprocess.Popen(cmd, env=env)
        _, status, usage = os.wait4(process.pid, 0)  # rusage of papermill and its kernel: per-notebook peak RSS
        if os.waitstatus_to_exitcode(status) != 0:
            failed = executed.with_suffix(".failed.ipynb")
            if tmp.exists():
                shutil.copy2(tmp, failed)
            raise NotebookFailed(f"notebook {notebook} failed; the partly executed copy is {failed}")
    seconds = time.perf_counter() - start
    write_json({"fingerprint": fingerprint, "parameters": params, "seconds": seconds,
                "peak_rss_mib": usage.ru_maxrss / 1024, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "python": sys.version.split()[0], "machine": platform.platform()}, done_file)
    return NotebookRun(notebook, "ran", seconds)


def run_pipeline(
    profile: str | os.PathLike[str] = "default",
    *,
    run_dir: str | os.PathLike[str] | None = None,
    only: Sequence[str] | None = None,
    force: bool = False,
    overrides: dict[str, Any] | None = None,
) -> list[NotebookRun]:
    """Run the profile's notebooks in order (or only ``only``), reusing unchanged finished ones."""
    prof = load_profile(profile)
    name = Path(profile).stem
    run_path = Path(run_dir) if run_dir else REPO_ROOT / "data" / "runs" / name
    in_profile = [n for n in NOTEBOOKS if n in prof["notebooks"]]
    selected = in_profile if not only else [_notebook_name(n) for n in only]
    declared = {key for notebook in selected for key in declared_parameters(notebook)}
    unknown = set(overrides or {}) - declared
    if unknown:
        raise ConfigError(f"unknown parameter(s) {sorted(unknown)}: the selected notebooks declare {', '.join(sorted(declared))}")
    prof["overrides"] = dict(overrides or {})
    runs = []
    for notebook in NOTEBOOKS:
        if notebook in selected:
            params = notebook_parameters(prof, notebook, run_path)
            run = run_notebook(notebook, params, run_path, force=force)
            runs.append(run)
            print(f"[avss] {notebook}: {run.status} ({run.seconds:.0f} s)", flush=True)
    return runs


def _has_page(stage: Path, file: str) -> bool:
    return (stage / f"{file}.ipynb").is_file() or (stage / f"{file}.md").is_file()


def _notebook_name(key: str) -> str:
    matches = [n for n in NOTEBOOKS if n == key or n.split("_", 1)[0] == key.zfill(2)]
    if len(matches) != 1:
        raise ConfigError(f"unknown notebook {key!r}: choose from {', '.join(NOTEBOOKS)} (or their numbers)")
    return matches[0]


def build_book(run_dir: str | os.PathLike[str], output_dir: str | os.PathLike[str] | None = None) -> Path:
    """Stage the book sources with the executed notebooks of ``run_dir`` and build HTML (warnings are errors).

    Chapters whose notebook has not been executed in ``run_dir`` are left out of the table of contents. A run
    covering several models (:mod:`avss_lib.book.model_runs`) gets a part per model and a claims chapter with
    one verdict per claim per model.
    Returns the folder of the built HTML (``<output_dir>/_build/html``; ``output_dir`` defaults to the repo).
    """
    run_path = Path(run_dir)
    out = Path(output_dir) if output_dir else REPO_ROOT
    stage = out / "_build" / "stage"
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    for item in BOOK_SOURCES:
        src = REPO_ROOT / item
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, stage / item)
    skip = shutil.ignore_patterns("*.failed.ipynb", ".*")
    toc = yaml.safe_load((stage / "_toc.yml").read_text())
    models = read_models(run_path)
    if models is None:
        shutil.copytree(run_path / "executed", stage / "executed", ignore=skip)
        (stage / "book" / "reproducibility.md").write_text(appendix_markdown(run_path))
        (stage / "claims.md").write_text(claims_markdown(run_path))
        toc["chapters"] = [c for c in toc["chapters"] if _has_page(stage, c["file"])]
    else:
        runs = {folder: run_path / folder for folder in models if (run_path / folder / "executed").is_dir()}
        for folder, model_run in runs.items():
            shutil.copytree(model_run / "executed", stage / "executed" / folder, ignore=skip)
            (stage / "executed" / folder / "reproducibility.md").write_text(appendix_markdown(model_run))
        (stage / "claims.md").write_text(models_claims_markdown(runs))
        (stage / f"{COMPARISON_PAGE}.md").write_text(comparison_markdown(runs, stage))
        toc = models_toc(toc, list(runs), lambda file: _has_page(stage, file))
    (stage / "_toc.yml").write_text(yaml.safe_dump(toc, sort_keys=False))
    html = out / "_build" / "html"
    if html.exists():
        shutil.rmtree(html)
    cmd = [str(Path(sys.executable).parent / "jupyter-book"), "build", str(stage), "--path-output", str(out), "-W", "--keep-going"]
    result = subprocess.run(cmd, text=True, capture_output=True)
    if result.returncode != 0:
        raise RuntimeError(f"jupyter-book build failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return html
