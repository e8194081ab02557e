"""Train and evaluate every run of chapter 05 from the same base weights, resumably, one folder per run.

:func:`run_all` restores the *same* base weights before every run (an in-memory copy of the state dict taken
once), trains with :func:`avss_lib.mitigation.training.train` and evaluates on the held-out parts of every data
set with :func:`avss_lib.hallucination.answers.answer_benchmark` (chapter 04's evaluation, so the untouched
model reproduces chapter 04's answers on those questions), plus WikiText-2 perplexity on a fixed prefix of the
test split. Each run's results go to :func:`avss_lib.core.artifacts.mitigation_run_dir` and its
``RUN_RESULT`` file is written last, atomically: an interrupted chapter resumes from the finished runs, and an
interrupted training run from its last checkpoint. A finished run is recomputed when its key changes
(:func:`run_key`: its settings, data, base weights, or the code that trains and evaluates it) and reused otherwise;
the pipeline keeps the runs' folder when it clears the chapter (:data:`avss_lib.core.artifacts.SELF_KEYED`).

Per-example results carry ``correct`` (chapter 04's label convention: exact match by default for open QA, the
chosen option for SciQ, the top sentence for WikiQA, MC1 for TruthfulQA) and ``confidence`` (length-normalised
sequence probability for generation, softmax over the options for multiple choice); for the open-QA tasks the
alias-containment label is kept as a second convention.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from avss_lib.core.artifacts import (MITIGATION_PER_EXAMPLE, RUN_CHECKPOINT, RUN_KEY, RUN_PER_EXAMPLE, RUN_RESULT,
                                     RUN_TRAIN_LOG, RUNS, TRAIN_LOGS, RunDir, mitigation_run_dir)
from avss_lib.core.benchmarks import Benchmark
from avss_lib.core.errors import DataError
from avss_lib.core.io import read_json, read_table, write_json, write_table
from avss_lib.core.models import DTYPES
from avss_lib.core.source_digest import module_closure, source_digest
from avss_lib.core.tasks import evaluate_task
from avss_lib.hallucination.answers import answer_benchmark
from avss_lib.mitigation.arms import TRAINED_ARMS, ArmRun, MitigationSettings
from avss_lib.mitigation.contrastive_loss import ContrastiveExample
from avss_lib.mitigation.intervention import steer
from avss_lib.mitigation.training import count_trainable, train
from avss_lib.mitigation.training_data import OPEN_QA

LOG_COLUMNS = ["step", "loss", "loss_con", "loss_lm", "grad_norm", "score_pos", "score_neg", "run_id", "arm"]


def evaluate_model(model: nn.Module, tokenizer: PreTrainedTokenizerBase, eval_sets: Mapping[str, Benchmark],
                   ppl: Benchmark | None, settings: MitigationSettings, seed: int = 0
                   ) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Per-example results on every held-out set and the WikiText-2 perplexity (``None`` values when skipped).

    With ``settings.eval_dtype`` set, a copy of ``model`` cast to that dtype is evaluated (the trained weights
    rounded once, the same for every arm); ``model`` itself is left as it is.
    """
    if settings.eval_dtype is not None and next(model.parameters()).dtype != DTYPES[settings.eval_dtype]:
        model = copy.deepcopy(model).to(DTYPES[settings.eval_dtype])
    frames = []
    for name, bench in eval_sets.items():
        answered = answer_benchmark(model, tokenizer, bench, label_convention=settings.label_convention,
                                    batch_size=settings.eval_batch_size, sciq_with_support=settings.sciq_with_support,
                                    wikiqa_scoring=settings.wikiqa_scoring,
                                    shots=settings.open_qa_shots.get(name, ()), seed=seed).answers
        frames.append(pd.DataFrame({
            "dataset": name, "id": answered["id"].astype(str), "correct": answered["correct"].astype(bool),
            "confidence": answered["confidence"].astype(float), "prediction": answered["prediction"].astype(str),
            "alias_containment": (answered["correct_alias_containment"].astype(float) if name in OPEN_QA
                                  else np.nan)}))
    perplexity: dict[str, Any] = {"value": None, "low": None, "high": None, "n_tokens": 0}
    if ppl is not None:
        res = evaluate_task(model, tokenizer, ppl, batch_size=settings.ppl_batch_size,
                            max_length=settings.ppl_max_length, seed=seed)
        value, low, high = res.summary["perplexity"]
        perplexity = {"value": value, "low": low, "high": high, "n_tokens": res.settings["n_tokens"]}
    return pd.concat(frames, ignore_index=True), perplexity


#: The module whose code, with all it imports, makes a run's numbers (training and evaluation, not the report).
RUN_CODE = "avss_lib.mitigation.runs"


def run_key(run: ArmRun, settings: MitigationSettings, data_key: str) -> dict[str, Any]:
    """Everything a run's results depend on: the run, its settings, its data and the source of the modules that
    train and evaluate it (:data:`RUN_CODE`, transitively). A finished run with another key is recomputed; one with
    the same key is reused, even when the chapter's other code (prose, figures, verdicts) changed."""
    config = (asdict(settings.train_config(run.layers, run.seed or 0, run.lambda_con)) if run.arm in TRAINED_ARMS
              else None)
    evaluation = {**settings.eval_key(), **({"iti": settings.iti_key()} if run.arm == "iti" else {})}
    return json.loads(json.dumps({"run": asdict(run), "train": config, "eval": evaluation, "data": data_key,
                                  "code": source_digest(module_closure([RUN_CODE]))}))


def data_fingerprint(examples: Sequence[ContrastiveExample], eval_sets: Mapping[str, Benchmark]) -> str:
    """A hash of the training examples and the held-out ids: a changed split invalidates finished runs."""
    h = hashlib.sha256()
    h.update(json.dumps([asdict(e) for e in examples], sort_keys=True).encode())
    h.update(json.dumps({k: [e.id for e in b.examples] for k, b in eval_sets.items()}, sort_keys=True).encode())
    return h.hexdigest()[:16]


def base_weights_and_key(model: nn.Module, examples: Sequence[ContrastiveExample], eval_sets: Mapping[str, Benchmark]
                         ) -> tuple[dict[str, torch.Tensor], str]:
    """A copy of the weights every run starts from, and the key of a run's inputs: :func:`data_fingerprint` and a
    hash of those weights (their bytes, so another model or dtype never reuses a run, on whatever device it ran)."""
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    h = hashlib.sha256(data_fingerprint(examples, eval_sets).encode())
    for name, tensor in base_state.items():
        h.update(name.encode())
        h.update(tensor.reshape(-1).cpu().view(torch.uint8).numpy())
    return base_state, h.hexdigest()[:16]


@dataclass
class RunOutput:
    """What one run leaves behind (read back from disk when the run was already finished)."""

    run: ArmRun
    per_example: pd.DataFrame
    log: pd.DataFrame
    result: dict[str, Any]
    reused: bool = False


def run_arm(run: ArmRun, model: nn.Module, tokenizer: PreTrainedTokenizerBase, base_state: Mapping[str, torch.Tensor],
            examples: Sequence[ContrastiveExample], eval_sets: Mapping[str, Benchmark], ppl: Benchmark | None,
            settings: MitigationSettings, run_dir: RunDir, *, data_key: str = "", progress: bool = True,
            keep_checkpoint: bool = False, validation: Sequence[ContrastiveExample] = ()) -> RunOutput:
    """Restore ``base_state``, train ``run`` (unless ``base``), evaluate, and write the run folder atomically."""
    folder = mitigation_run_dir(run_dir, run.run_id)
    key = run_key(run, settings, data_key)
    done = folder / RUN_RESULT
    if done.is_file():
        result = read_json(done)
        if result.get("key") == key:
            return RunOutput(run, read_table(folder / RUN_PER_EXAMPLE), read_table(folder / RUN_TRAIN_LOG), result,
                             reused=True)
    ckpt = folder / RUN_CHECKPOINT
    key_file = folder / RUN_KEY
    if ckpt.exists() and (not key_file.is_file() or read_json(key_file) != key):
        shutil.rmtree(ckpt)  # a checkpoint of other settings cannot be resumed
    write_json(key, key_file)
    model.load_state_dict(base_state)
    train_seconds, log, resumed, best_step, steps_run = 0.0, pd.DataFrame(), 0, None, 0
    if run.arm in TRAINED_ARMS:
        start = time.perf_counter()
        config = settings.train_config(run.layers, run.seed or 0, run.lambda_con)
        trained = train(model, tokenizer, examples, config, dataset="+".join(eval_sets), checkpoint_dir=ckpt,
                        progress=progress, validation=validation)
        train_seconds, log, resumed = time.perf_counter() - start, trained.log, trained.resumed_from_step
        best_step, steps_run = trained.best_step, trained.steps_run
    start = time.perf_counter()
    steering = (steer(model, settings.iti_vectors, run.layers, settings.iti_alpha) if run.arm == "iti"
                else contextlib.nullcontext())
    with steering:
        per_example, perplexity = evaluate_model(model, tokenizer, eval_sets, ppl, settings, seed=run.seed or 0)
    eval_seconds = time.perf_counter() - start
    per_example.insert(0, "run_id", run.run_id)
    per_example.insert(1, "arm", run.arm)
    log = log.assign(run_id=run.run_id, arm=run.arm) if not log.empty else pd.DataFrame(columns=LOG_COLUMNS)
    result = {"key": key, "perplexity": perplexity, "train_seconds": train_seconds, "eval_seconds": eval_seconds,
              "resumed_from_step": resumed, "best_step": best_step, "steps_run": steps_run,
              "trainable_params": count_trainable(model, run.layers) if run.arm in TRAINED_ARMS else 0}
    write_table(per_example, folder / RUN_PER_EXAMPLE)
    write_table(log, folder / RUN_TRAIN_LOG)
    write_json(result, done)  # last: marks the run finished
    if not keep_checkpoint and ckpt.exists():
        shutil.rmtree(ckpt)
    model.load_state_dict(base_state)
    model.eval()
    return RunOutput(run, per_example, log, result)


def run_share(model: nn.Module, tokenizer: PreTrainedTokenizerBase, share: Sequence[ArmRun], *,
              examples: Sequence[ContrastiveExample], eval_sets: Mapping[str, Benchmark], ppl: Benchmark | None,
              settings: MitigationSettings, run_dir: RunDir, validation: Sequence[ContrastiveExample] = ()) -> None:
    """A worker's share of :func:`run_all` (:func:`avss_lib.core.workers.prefill`): its runs trained and evaluated
    from the freshly loaded ``model``'s weights into their run folders, where the serial pass finds them."""
    base_state, data_key = base_weights_and_key(model, [*examples, *validation], eval_sets)
    for run in share:
        run_arm(run, model, tokenizer, base_state, examples, eval_sets, ppl, settings, run_dir, data_key=data_key,
                progress=False, validation=validation)


@dataclass
class MitigationRuns:
    """All runs' per-example results, training logs and summaries."""

    runs: pd.DataFrame  # the RUNS artifact: one row per run (arm, layers, params, perplexity, seconds, reused)
    per_example: pd.DataFrame  # run_id, arm, dataset, id, correct, confidence, prediction, alias_containment
    logs: pd.DataFrame  # run_id, arm, step, loss, loss_con, loss_lm, ...
    outputs: list[RunOutput] = field(default_factory=list)


def run_all(model: nn.Module, tokenizer: PreTrainedTokenizerBase, runs: Sequence[ArmRun],
            examples: Sequence[ContrastiveExample], eval_sets: Mapping[str, Benchmark], ppl: Benchmark | None,
            settings: MitigationSettings, run_dir: RunDir, *, progress: bool = True,
            on_run: Callable[[RunOutput], None] | None = None,
            validation: Sequence[ContrastiveExample] = ()) -> MitigationRuns:
    """Run every arm from the same base weights (restored before each run), resuming finished runs from disk.

    Writes the ``MITIGATION_PER_EXAMPLE``, ``TRAIN_LOGS`` and ``RUNS`` artifacts of ``run_dir``.
    """
    if not examples:
        raise DataError("no training examples: check the split and build_training_frame")
    base_state, data_key = base_weights_and_key(model, [*examples, *validation], eval_sets)
    outputs = []
    for run in runs:
        output = run_arm(run, model, tokenizer, base_state, examples, eval_sets, ppl, settings, run_dir,
                         data_key=data_key, progress=progress, validation=validation)
        outputs.append(output)
        if on_run is not None:
            on_run(output)
    collected = collect(outputs)
    MITIGATION_PER_EXAMPLE.write(collected.per_example, run_dir)
    TRAIN_LOGS.write(collected.logs, run_dir)
    RUNS.write(collected.runs, run_dir)
    return collected


def collect(outputs: Sequence[RunOutput]) -> MitigationRuns:
    """Combine run outputs into one runs table, one per-example table and one log."""
    rows = []
    for o in outputs:
        p = o.result["perplexity"]
        rows.append({"run_id": o.run.run_id, "arm": o.run.arm, "seed": o.run.seed, "draw": o.run.draw,
                     "layers": list(o.run.layers), "trainable_params": o.result["trainable_params"],
                     "lambda_con": o.run.lambda_con if o.run.arm in TRAINED_ARMS else float("nan"),
                     "perplexity": p["value"], "perplexity_low": p["low"], "perplexity_high": p["high"],
                     "train_seconds": o.result["train_seconds"], "eval_seconds": o.result["eval_seconds"],
                     "steps_run": o.result.get("steps_run", 0), "best_step": o.result.get("best_step"),
                     "reused": o.reused})
    runs = pd.DataFrame(rows)
    per_example = pd.concat([o.per_example for o in outputs], ignore_index=True)
    logs = [o.log for o in outputs if not o.log.empty]
    log = pd.concat(logs, ignore_index=True) if logs else pd.DataFrame(columns=["run_id", "arm", "step"])
    return MitigationRuns(runs=runs, per_example=per_example, logs=log, outputs=list(outputs))
