"""Parity of this book's harness with lm-evaluation-harness, checked by running both on the same examples.

lm-evaluation-harness's own task definitions (its YAML files for ``sciq``, ``truthfulqa_mc1``,
``truthfulqa_mc2`` and ``sst2``, prompts, choices and metrics included) are pointed at the local copies of
the benchmarks: each raw file is converted to the Hugging Face schema the task expects (:func:`write_local_tasks`)
and a task that ``include``s the harness's YAML reads it with the ``json`` loader. The harness
(:func:`run_lm_eval`, ``HFLM`` around the same model object) and this book's harness
(:func:`run_ours`, :func:`avss_lib.core.tasks.evaluate_task`) then score the first ``n`` examples of each, and
:func:`parity_table` compares them example by example: the same prediction under acc and acc_norm, MC1 and
the MC2 value, and the largest log-likelihood difference over every choice.

SciQ is compared open-book, as the harness defines it; the pruning chapter runs it closed-book on purpose
(the support paragraph contains the answer). The harness defines no WikiQA task; its NQ-Open, TriviaQA and
TruthfulQA-generation tasks are generative and are not compared here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from torch import nn
from transformers import PreTrainedTokenizerBase

from avss_lib.core.benchmarks import Benchmark, load_benchmark
from avss_lib.core.data_root import data_file, resolve_data_root
from avss_lib.core.errors import ConfigError

#: Agreement the parity record requires (issue: |Δ| ≤ 0.5 points at n ≥ 100, log-likelihoods within 1e-3).
MAX_SCORE_GAP = 0.5  # points
MAX_LOGLIK_GAP = 1e-3


@dataclass(frozen=True)
class ParityTask:
    """One harness task pointed at a local file: its YAML in lm-evaluation-harness, the split it scores, the
    file it reads here, and this book's benchmark and evaluator options that define the same task."""

    name: str  # the harness's task name
    harness_yaml: str  # path under lm_eval/tasks
    split_key: str  # the harness config key of the split it scores: test_split or validation_split
    source: str  # the local file, under the data root
    benchmark: str  # this book's benchmark name
    options: Mapping[str, Any]


PARITY_TASKS: tuple[ParityTask, ...] = (
    ParityTask("sciq", "sciq/sciq.yaml", "test_split", "sciq/test.json", "sciq", {"with_support": True}),
    ParityTask("truthfulqa_mc1", "truthfulqa/truthfulqa_mc1.yaml", "validation_split", "truthfulqa/mc_task.json",
               "truthfulqa_mc", {}),
    ParityTask("truthfulqa_mc2", "truthfulqa/truthfulqa_mc2.yaml", "validation_split", "truthfulqa/mc_task.json",
               "truthfulqa_mc", {}),
    ParityTask("sst2", "glue/sst2/default.yaml", "validation_split", "sst2/dev.tsv", "sst2", {}),
)


def _hf_rows(task: ParityTask, path: Path) -> list[dict[str, Any]]:
    """The raw local file as the Hugging Face dataset the harness's task reads (same fields, same order)."""
    if task.benchmark == "sciq":
        return json.loads(path.read_text())
    if task.benchmark == "truthfulqa_mc":
        def targets(mapping: Mapping[str, int]) -> dict[str, list[Any]]:
            return {"choices": list(mapping), "labels": [int(v) for v in mapping.values()]}
        return [{"question": r["question"], "mc1_targets": targets(r["mc1_targets"]),
                 "mc2_targets": targets(r["mc2_targets"])} for r in json.loads(path.read_text())]
    if task.benchmark == "sst2":
        frame = pd.read_csv(path, sep="\t", quoting=3, keep_default_na=False)
        return [{"sentence": s, "label": int(label), "idx": i} for i, (s, label) in
                enumerate(zip(frame["text"], frame["label"]))]
    raise ConfigError(f"no conversion for {task.benchmark!r}")


def write_local_tasks(folder: Path, data_root: str | None, tasks: Sequence[ParityTask] = PARITY_TASKS) -> list[str]:
    """Write, under ``folder``, each task's local data in the harness's schema and a YAML task
    ``<name>_local`` that includes the harness's own definition and reads that data; return the task names."""
    import lm_eval

    harness_tasks = Path(lm_eval.__file__).parent / "tasks"
    root = resolve_data_root(data_root)
    if root is None:
        raise ConfigError("the parity check reads local benchmark files: give a data root, not 'hub'")
    names = []
    for task in tasks:
        data = folder / f"{task.name}.jsonl"
        rows = _hf_rows(task, data_file(root, task.source))
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        split = "test" if task.split_key == "test_split" else "validation"
        config = {"include": str(harness_tasks / task.harness_yaml), "task": f"{task.name}_local", "tag": [],
                  "dataset_path": "json", "dataset_name": None,
                  "dataset_kwargs": {"data_files": {split: str(data)}}, "training_split": None,
                  "validation_split": None, "test_split": None, task.split_key: split}
        (folder / f"{task.name}_local.yaml").write_text(json.dumps(config))  # JSON is YAML
        names.append(f"{task.name}_local")
    return names


def run_lm_eval(model: nn.Module, tokenizer: PreTrainedTokenizerBase, folder: Path, names: Sequence[str], n: int,
                batch_size: int = 8) -> dict[str, list[dict[str, Any]]]:
    """lm-evaluation-harness's per-sample records (``log_samples``) of ``names`` on their first ``n`` documents."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    out = simple_evaluate(model=lm, tasks=list(names), task_manager=TaskManager(include_path=str(folder)),
                          limit=n, log_samples=True, bootstrap_iters=0, num_fewshot=0)
    return {name: out["samples"][name] for name in names}


def run_ours(model: nn.Module, tokenizer: PreTrainedTokenizerBase, data_root: str | None, n: int,
             tasks: Sequence[ParityTask] = PARITY_TASKS, batch_size: int = 8) -> dict[str, pd.DataFrame]:
    """This harness's per-example frames on the first ``n`` examples of each benchmark, in file order."""
    from avss_lib.core.tasks import evaluate_task

    frames: dict[str, pd.DataFrame] = {}
    for task in tasks:
        if task.benchmark in frames:
            continue
        split = "test" if task.split_key == "test_split" else "validation"
        bench = load_benchmark(task.benchmark, data_root=data_root, split=split)
        first = Benchmark(bench.name, bench.examples[:n], bench.provenance)
        result = evaluate_task(model, tokenizer, first, batch_size=batch_size, **dict(task.options))
        frames[task.benchmark] = result.per_example.assign(question=[e.question or e.text for e in first.examples],
                                                           choices=[list(e.choices or ()) for e in first.examples],
                                                           mc2_choices=[list(e.mc2_choices or ())
                                                                        for e in first.examples])
    return frames


def _their_choices(task: ParityTask, doc: Mapping[str, Any]) -> list[str]:
    if task.benchmark == "sciq":
        return [doc["distractor1"], doc["distractor2"], doc["distractor3"], doc["correct_answer"]]
    if task.benchmark == "sst2":
        return ["negative", "positive"]
    return list(doc["mc1_targets" if task.name == "truthfulqa_mc1" else "mc2_targets"]["choices"])


def compare_task(task: ParityTask, samples: Sequence[Mapping[str, Any]], ours: pd.DataFrame) -> pd.DataFrame:
    """One row per example of ``task``: each harness's metric value(s) and the largest |Δ log-likelihood| over
    the choices, matched by choice text (the two harnesses may order the choices differently)."""
    rows = []
    for sample, (_, mine) in zip(samples, ours.iterrows()):
        doc = sample["doc"]
        question = doc.get("question", doc.get("sentence", ""))
        if str(question).strip() != str(mine["question"]).strip():
            raise ConfigError(f"{task.name} example {sample['doc_id']}: the harnesses read different examples "
                              f"({question!r} vs {mine['question']!r}): the local files are not aligned")
        choices = _their_choices(task, doc)
        theirs = dict(zip(choices, (float(r[0]) for r in sample["filtered_resps"])))
        if task.name == "truthfulqa_mc2":
            our_choices, our_ll = mine["mc2_choices"], mine["mc2_logliks"]
        else:
            our_choices, our_ll = mine["choices"], mine["logliks"][: len(mine["choices"])]
        if sorted(our_choices) != sorted(choices):
            raise ConfigError(f"{task.name} example {sample['doc_id']}: the harnesses read different choices "
                              f"({choices} vs {list(our_choices)}): the local files are not aligned")
        gap = max(abs(theirs[c] - float(ll)) for c, ll in zip(our_choices, our_ll))
        row = {"task": task.name, "doc_id": int(sample["doc_id"]), "max_loglik_gap": gap}
        if task.name == "truthfulqa_mc2":
            row.update(lm_eval=float(sample["acc"]), ours=float(mine["mc2"]))
        elif task.name == "truthfulqa_mc1":
            row.update(lm_eval=float(sample["acc"]), ours=float(mine["correct"]))
        else:
            row.update(lm_eval=float(sample["acc"]), ours=float(mine["correct"]))
            if "acc_norm" in sample:  # the harness's SST-2 defines acc alone
                row.update(lm_eval_norm=float(sample["acc_norm"]), ours_norm=float(mine["correct_norm"]))
        rows.append(row)
    return pd.DataFrame(rows)


def parity_table(per_example: pd.DataFrame) -> pd.DataFrame:
    """Per task and metric: n, each harness's score (points), |Δ| and the share of examples that agree, and the
    largest log-likelihood gap; ``agrees`` when |Δ| ≤ :data:`MAX_SCORE_GAP` and the gap ≤ :data:`MAX_LOGLIK_GAP`."""
    rows = []
    for task, g in per_example.groupby("task", sort=False):
        pairs = [("acc" if task != "truthfulqa_mc2" else "mc2", "lm_eval", "ours")]
        if "lm_eval_norm" in g and g["lm_eval_norm"].notna().any():
            pairs.append(("acc_norm", "lm_eval_norm", "ours_norm"))
        for metric, theirs, mine in pairs:
            a, b = 100 * g[theirs].mean(), 100 * g[mine].mean()
            same = float(np.mean(np.isclose(g[theirs], g[mine], atol=1e-4)))
            gap = float(g["max_loglik_gap"].max())
            rows.append({"task": task, "metric": metric, "n": len(g), "lm_eval": a, "ours": b, "abs_diff": abs(a - b),
                         "same_per_example": same, "max_loglik_gap": gap,
                         "agrees": bool(abs(a - b) <= MAX_SCORE_GAP and gap <= MAX_LOGLIK_GAP)})
    return pd.DataFrame(rows)


def run_parity(model: nn.Module, tokenizer: PreTrainedTokenizerBase, *, data_root: str | None, n: int,
               folder: Path, batch_size: int = 8) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Both harnesses on the first ``n`` examples of every :data:`PARITY_TASKS` task: (per-example, table)."""
    if n < 1:
        raise ConfigError(f"n={n}: compare at least one example per task")
    names = write_local_tasks(folder, data_root)
    samples = run_lm_eval(model, tokenizer, folder, names, n, batch_size=batch_size)
    ours = run_ours(model, tokenizer, data_root, n, batch_size=batch_size)
    per_example = pd.concat([compare_task(t, samples[f"{t.name}_local"], ours[t.benchmark]) for t in PARITY_TASKS],
                            ignore_index=True)
    return per_example, parity_table(per_example)
