"""Contrastive mitigation on chosen decoder layers, with the same-budget ablation arms that decide claim E2.

The pipeline of notebook 05, in the order the notebook calls it:

1. **Split.** :func:`split_answers` splits every dataset's answers from notebook 04 (``answers.parquet``)
   by question into a train part and a held-out eval part (:func:`avss_lib.core.splits.split_by_question`,
   fixed seed), so no eval question — not even a re-cased or re-punctuated copy — is trained on.
2. **Training examples.** :func:`build_training_frame` turns the *train* part into contrastive examples, one
   per question, with the prompt notebook 04 showed the model (its ``prompt`` column; else the evaluator's
   template, :data:`avss_lib.core.harness.PROMPTS`):

   - ``nq_open`` / ``triviaqa``: positive = the first gold answer (TriviaQA: the most central alias,
     :func:`central_alias`); negative = the model's own greedy answer
     when it is a hallucination (wrong under exact match *and* under alias containment, and not empty —
     an answer one convention accepts is never pushed away);
   - ``sciq`` / ``wikiqa``: positive = the correct option (the first correct sentence for WikiQA); negative =
     the option the model wrongly chose;
   - ``truthfulqa_mc``: positive = TruthfulQA's best answer; negatives = its incorrect answers (from the
     generation view of the same question), whatever the model chose.

   Answers are prefixed with a space, as the evaluator scores them. At most ``max_negatives`` negatives
   are kept per question. Questions without a negative are left out of training (the contrastive term
   needs one); a dataset left with none raises :class:`~avss_lib.core.errors.DataError`.
3. **Arms.** :func:`plan_runs` lists one run per (arm, seed[, random draw]). All arms share the training
   examples, steps, learning rate, batch size and loss (:class:`avss_lib.mitigation.training.TrainConfig`); they
   differ only in the layers trained and, for ``lm_only``, in ``lambda_con = 0``:

   ============== ===============================================================================
   ``base``       untouched model (the "before" of every comparison; not trained)
   ``eavss``      the top-``k`` layers of notebook 04's pooled EAVSS ranking
   ``random``     ``k`` layers drawn uniformly without replacement, ``random_draws`` independent draws
   ``lowest_avss`` the ``k`` lowest-AVSS layers of notebook 02 (rank 1 = lowest), one variant
   ``all``        every decoder layer (more trainable parameters: reported, not matched)
   ``lm_only``    the ``eavss`` layers with the LM term only (``lambda_con = 0``)
   ============== ===============================================================================

4. **Train and evaluate.** :func:`run_all` restores the *same* base weights before every run (an in-memory
   copy of the state dict taken once), trains with :func:`avss_lib.mitigation.training.train` and evaluates on the
   held-out parts of every dataset with :func:`avss_lib.hallucination.answers.answer_benchmark` (notebook 04's evaluation,
   so the untouched model reproduces notebook 04's answers on those questions), plus WikiText-2
   perplexity on a fixed prefix of the test split (the cost of the fine-tune on language modelling).
   Each run's results go to ``<out>/runs/<run_id>/`` and its ``result.json`` is written last, atomically:
   an interrupted notebook resumes from the finished runs, and an interrupted training run from its last
   checkpoint. A finished run whose settings changed is recomputed.

Per-example results carry ``correct`` (notebook 04's label convention: exact match by default for open QA,
the chosen option for SciQ, the top sentence for WikiQA, MC1 for TruthfulQA) and ``confidence``
(length-normalised sequence probability for generation, softmax over the options for multiple choice). The hallucination rate is ``1 − accuracy`` under that label (STUDY.md §3); for the open-QA
tasks the alias-containment label is kept as a second convention.
"""

from __future__ import annotations

import copy
import json
import random
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from avss_lib.core.answer_matching import normalize_answer
from avss_lib.hallucination.answers import answer_benchmark
from avss_lib.core.benchmarks import Benchmark, Example, load_benchmark
from avss_lib.mitigation.contrastive_loss import ContrastiveExample
from avss_lib.core.errors import ConfigError, DataError
from avss_lib.core.harness import PROMPTS, evaluate_task
from avss_lib.core.io import read_json, read_table, write_json, write_table
from avss_lib.core.layers import find_layers
from avss_lib.core.metrics import bootstrap_ci, bootstrap_statistic_ci, expected_calibration_error
from avss_lib.core.models import DTYPES
from avss_lib.core.splits import split_by_question
from avss_lib.mitigation.training import TrainConfig, count_trainable, train

#: The five datasets of claim E2 (names as in notebook 04's ``answers.parquet``).
DATASETS: tuple[str, ...] = ("nq_open", "triviaqa", "sciq", "truthfulqa_mc", "wikiqa")
OPEN_QA: tuple[str, ...] = ("nq_open", "triviaqa")
#: The arms, in the order tables show them.
ARMS: tuple[str, ...] = ("base", "eavss", "random", "lowest_avss", "all", "lm_only")
TRAINED_ARMS: tuple[str, ...] = tuple(a for a in ARMS if a != "base")
ANSWER_COLUMNS = ("dataset", "id", "question", "prediction", "confidence", "correct", "correct_exact_match",
                  "correct_alias_containment")
RESULT_NAME = "result.json"


# ------------------------------------------------------------------------------------------ settings


@dataclass(frozen=True)
class MitigationSettings:
    """What every trained arm shares (the budget) plus the evaluation options.

    ``train_max_length`` caps each (prompt, answer) pair during training; longer prompts are cut from the left
    (see :mod:`avss_lib.mitigation.contrastive_loss`). Evaluation always uses the full prompts.
    """

    k: int
    steps: int
    lr: float
    lambda_con: float = 1.0
    lambda_lm: float = 1.0
    temperature: float = 1.0
    loss: str = "infonce"
    batch_size: int = 4
    seeds: tuple[int, ...] = (0,)
    random_draws: int = 3
    arms: tuple[str, ...] = ARMS
    max_negatives: int = 4
    train_max_length: int = 256
    grad_clip: float = 1.0
    checkpoint_every: int = 50
    eval_batch_size: int = 8
    sciq_with_support: bool = False  # as notebook 04 (closed book by default)
    wikiqa_scoring: str = "pmi"
    label_convention: str = "exact_match"  # which of notebook 04's labels defines "correct"
    ppl_chars: int | None = 20_000  # characters of the WikiText-2 test split scored for perplexity (0 skips, None: all)
    ppl_max_length: int = 512
    eval_dtype: str | None = None  # evaluate a copy in this dtype (e.g. "bfloat16"); None: the training dtype

    def validate(self, n_layers: int) -> None:
        """Raise :class:`ConfigError` naming the fix for any value the study cannot use."""
        if not 1 <= self.k <= n_layers:
            raise ConfigError(f"k={self.k} layers requested but the model has {n_layers}: use 1 <= k <= {n_layers}")
        if self.lr <= 0:
            raise ConfigError(f"lr={self.lr} must be > 0 (e.g. 5e-5)")
        if self.steps < 1:
            raise ConfigError(f"steps={self.steps} must be a positive integer")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds={list(self.seeds)} must be a non-empty list of distinct integers")
        if self.random_draws < 1:
            raise ConfigError(f"random_draws={self.random_draws} must be >= 1 (the study uses >= 3)")
        if self.max_negatives < 1:
            raise ConfigError(f"max_negatives={self.max_negatives} must be >= 1")
        unknown = [a for a in self.arms if a not in ARMS]
        if unknown or not self.arms:
            raise ConfigError(f"unknown arm(s) {unknown} in arms={list(self.arms)}: choose from {', '.join(ARMS)}")
        if self.eval_dtype is not None and self.eval_dtype not in DTYPES:
            raise ConfigError(f"eval_dtype={self.eval_dtype!r} is not a dtype: use one of {', '.join(DTYPES)} or None")
        if self.ppl_chars is not None and self.ppl_chars < 0:
            raise ConfigError(f"ppl_chars={self.ppl_chars} must be >= 0 (0 skips the perplexity cost)")
        self.train_config((0,), 0, self.lambda_con).validate(n_layers)

    def train_config(self, layers: Sequence[int], seed: int, lambda_con: float) -> TrainConfig:
        """The :class:`TrainConfig` of one run: the shared budget with that run's layers, seed and lambda_con."""
        return TrainConfig(layers=tuple(int(i) for i in layers), steps=self.steps, lr=self.lr,
                           batch_size=self.batch_size, lambda_con=lambda_con, lambda_lm=self.lambda_lm,
                           temperature=self.temperature, loss=self.loss,  # type: ignore[arg-type]
                           grad_clip=self.grad_clip, seed=seed, checkpoint_every=self.checkpoint_every,
                           max_length=self.train_max_length)

    def eval_key(self) -> dict[str, Any]:
        return {"eval_batch_size": self.eval_batch_size, "sciq_with_support": self.sciq_with_support,
                "wikiqa_scoring": self.wikiqa_scoring, "label_convention": self.label_convention,
                "ppl_chars": self.ppl_chars, "ppl_max_length": self.ppl_max_length, "eval_dtype": self.eval_dtype}


# ------------------------------------------------------------------------------------------ upstream


def check_answers(answers: pd.DataFrame, datasets: Sequence[str]) -> pd.DataFrame:
    """Validate notebook 04's ``answers.parquet`` for ``datasets``; return those rows with ``id`` as str."""
    missing = [c for c in ANSWER_COLUMNS if c not in answers.columns]
    if missing:
        raise DataError(f"answers table lacks column(s) {missing}: re-run notebook 04 (it writes {list(ANSWER_COLUMNS)})")
    unknown = [d for d in datasets if d not in DATASETS]
    if unknown:
        raise ConfigError(f"unknown dataset(s) {unknown}: choose from {', '.join(DATASETS)}")
    absent = [d for d in datasets if not (answers["dataset"] == d).any()]
    if absent:
        raise DataError(f"notebook 04's answers have no rows for {absent}: add them to notebook 04's datasets "
                        "or drop them from this notebook's datasets")
    rows = answers[answers["dataset"].isin(list(datasets))].copy()
    rows["id"] = rows["id"].astype(str)
    dup = rows.duplicated(["dataset", "id"])
    if dup.any():
        raise DataError(f"answers table repeats (dataset, id) {rows[dup].iloc[0][['dataset', 'id']].tolist()}: "
                        "each example must be answered once")
    return rows.reset_index(drop=True)


def eavss_top_k(eavss_layers: Mapping[str, Any], k: int, n_layers: int, source: str = "pooled") -> list[int]:
    """The first ``k`` layers of notebook 04's ``eavss_layers.json`` list ``source`` ('pooled' or a dataset)."""
    if not 1 <= k <= n_layers:
        raise ConfigError(f"k={k} layers requested but the model has {n_layers}: use 1 <= k <= {n_layers}")
    ranked = eavss_layers.get(source) if source == "pooled" else (eavss_layers.get("per_dataset") or {}).get(source)
    if ranked is None:
        raise DataError(f"eavss_layers.json has no layer list {source!r}: use 'pooled' or one of "
                        f"{sorted(eavss_layers.get('per_dataset') or {})}")
    layers = [int(i) for i in ranked]
    if len(layers) < k:
        raise ConfigError(f"k={k} but notebook 04 selected only {len(layers)} {source} EAVSS layers ({layers}; "
                          f"data sets excluded there: {eavss_layers.get('excluded', [])}): lower k to <= "
                          f"{len(layers)} or re-run notebook 04 with k >= {k} and enough examples per class")
    bad = [i for i in layers[:k] if not 0 <= i < n_layers]
    if bad:
        raise DataError(f"EAVSS layers {bad} do not exist in a {n_layers}-layer model: was notebook 04 run on another model?")
    return layers[:k]


def lowest_avss_layers(avss_scores: pd.DataFrame, variant: str, k: int, n_layers: int) -> list[int]:
    """The ``k`` layers with the lowest AVSS (pruning rank 1..k) of one notebook-02 ``variant``."""
    rows = avss_scores[avss_scores["variant"] == variant]
    if rows.empty:
        raise ConfigError(f"notebook 02 computed no AVSS variant {variant!r}: choose one of "
                          f"{sorted(avss_scores['variant'].unique())}")
    if len(rows) != n_layers:
        raise DataError(f"notebook 02 scored {len(rows)} layers but the model has {n_layers}: re-run 01-02 on this model")
    if not 1 <= k <= n_layers:
        raise ConfigError(f"k={k} layers requested but the model has {n_layers}: use 1 <= k <= {n_layers}")
    return sorted(int(i) for i in rows.sort_values("rank")["layer"].head(k))


def random_layers(n_layers: int, k: int, draw: int, seed: int = 0) -> list[int]:
    """Draw ``draw`` of ``k`` distinct layers out of ``n_layers``, uniformly; a pure function of its arguments."""
    if not 1 <= k <= n_layers:
        raise ConfigError(f"k={k} layers requested but the model has {n_layers}: use 1 <= k <= {n_layers}")
    return sorted(random.Random(f"random-layers-{seed}-{draw}").sample(range(n_layers), k))


# ------------------------------------------------------------------------------------------ split & data


def split_answers(answers: pd.DataFrame, datasets: Sequence[str], *, eval_fraction: float = 0.5,
                  seed: int = 0) -> pd.DataFrame:
    """Question-disjoint train/eval split of each dataset's answers: ``dataset, id, question, split, group``."""
    rows = check_answers(answers, datasets)
    parts = []
    for name in datasets:
        sub = rows[rows["dataset"] == name]
        split = split_by_question(sub["id"].tolist(), sub["question"].tolist(), eval_fraction=eval_fraction, seed=seed)
        parts.append(split.frame.assign(dataset=name)[["dataset", "id", "question", "question_norm", "group", "split"]])
    return pd.concat(parts, ignore_index=True)


def load_benchmarks(datasets: Sequence[str], data_root: str | None, splits: Mapping[str, str] | None = None
                    ) -> dict[str, Benchmark]:
    """Every benchmark the notebook needs, in full (``truthfulqa_gen`` too when ``truthfulqa_mc`` is used)."""
    names = list(datasets) + (["truthfulqa_gen"] if "truthfulqa_mc" in datasets else [])
    splits = dict(splits or {})
    return {name: load_benchmark(name, data_root=data_root, split=splits.get(name)) for name in names}


def _by_id(benchmark: Benchmark, ids: Sequence[str], dataset: str) -> dict[str, Example]:
    index = {e.id: e for e in benchmark.examples}
    missing = [i for i in ids if i not in index]
    if missing:
        raise DataError(f"{len(missing)} {dataset} ids of notebook 04 (first: {missing[:3]}) are not in benchmark "
                        f"{benchmark.name!r} split {benchmark.provenance.get('split')!r}: load the split notebook 04 used")
    return index


def _prompt(dataset: str, example: Example, sciq_with_support: bool) -> str:
    if dataset == "sciq":
        key = "sciq" if sciq_with_support else "sciq_closed_book"
        return PROMPTS[key].format(support=(example.context or "").lstrip(), question=example.question)
    key = "truthfulqa" if dataset == "truthfulqa_mc" else dataset
    return PROMPTS[key].format(question=example.question)


def _row_prompt(row: Any, dataset: str, example: Example, sciq_with_support: bool) -> str:
    """The exact context notebook 04 showed the model (its ``prompt`` column), else the evaluator's template."""
    prompt = getattr(row, "prompt", None)
    return prompt if isinstance(prompt, str) and prompt else _prompt(dataset, example, sciq_with_support)


def central_alias(aliases: Sequence[str]) -> str:
    """The alias most similar to the others (sum of word-set Jaccard after answer normalisation; ties: first).

    TriviaQA's alias lists put misspellings and page titles first ("Woody Harelson", ..., "Woody Harrelson"),
    so the first alias is a poor training target; the central one is usually the canonical name.
    """
    words = [set(normalize_answer(a).split()) for a in aliases]

    def score(i: int) -> float:
        return sum(len(words[i] & w) / len(words[i] | w) for j, w in enumerate(words) if j != i and words[i] | w)

    return aliases[max(range(len(aliases)), key=lambda i: (score(i), -i))]


def _positive_and_negatives(dataset: str, row: Any, example: Example, tqa_gen: Mapping[str, Example] | None
                            ) -> tuple[str | None, list[str]]:
    """Gold answer and negative answers (without the leading space) of one answers row."""
    prediction = str(row.prediction).strip()
    if dataset in OPEN_QA:
        wrong = not bool(row.correct_exact_match) and not bool(row.correct_alias_containment) and prediction != ""
        gold = (central_alias(example.answers) if dataset == "triviaqa" else example.answers[0]) if example.answers else None
        return gold, ([prediction] if wrong else [])
    if dataset == "sciq":
        gold = example.choices[example.label]  # type: ignore[index]
        return gold, ([prediction] if not bool(row.correct) and prediction != gold else [])
    if dataset == "wikiqa":
        if not example.correct_choices:
            return None, []
        golds = [example.choices[i] for i in example.correct_choices]  # type: ignore[index]
        return golds[0], ([prediction] if not bool(row.correct) and prediction not in golds else [])
    gen = (tqa_gen or {}).get(example.id)  # truthfulqa_mc
    if gen is None:
        raise DataError(f"TruthfulQA question {example.id} has no generation-view record: load truthfulqa_gen too")
    return gen.answers[0], list(gen.incorrect_answers)


def build_training_frame(answers: pd.DataFrame, split: pd.DataFrame, benchmarks: Mapping[str, Benchmark], *,
                         max_negatives: int = 4, sciq_with_support: bool = False) -> pd.DataFrame:
    """One row per train-side question: ``dataset, id, question, prompt, positive, negatives, hallucinated``.

    ``negatives`` is a list (possibly empty: such rows are kept, flagged ``usable = False``, so the notebook can
    count them). Raises :class:`DataError` for a dataset with no usable negative on the train side.
    """
    if max_negatives < 1:
        raise ConfigError(f"max_negatives={max_negatives} must be >= 1")
    train_ids = split[split["split"] == "train"][["dataset", "id"]]
    rows = answers.assign(id=answers["id"].astype(str)).merge(train_ids, on=["dataset", "id"], how="inner")
    records = []
    for name in split["dataset"].unique():
        sub = rows[rows["dataset"] == name]
        index = _by_id(benchmarks[name], sub["id"].tolist(), name)
        tqa_gen = ({e.id: e for e in benchmarks["truthfulqa_gen"].examples}
                   if name == "truthfulqa_mc" and "truthfulqa_gen" in benchmarks else None)
        for row in sub.itertuples(index=False):
            example = index[row.id]
            positive, negatives = _positive_and_negatives(name, row, example, tqa_gen)
            negatives = list(dict.fromkeys(n for n in negatives if n and n != positive))[:max_negatives]
            records.append({"dataset": name, "id": row.id, "question": row.question,
                            "prompt": _row_prompt(row, name, example, sciq_with_support),
                            "positive": None if positive is None else " " + positive.strip(),
                            "negatives": [" " + n.strip() for n in negatives],
                            "hallucinated": not bool(row.correct),
                            "usable": positive is not None and bool(negatives)})
    frame = pd.DataFrame(records)
    empty = [d for d in split["dataset"].unique() if frame.empty or not frame[frame["dataset"] == d]["usable"].any()]
    if empty:
        raise DataError(f"dataset(s) {empty} have no hallucinated answer on the train side to use as a negative: "
                        "the contrastive term needs one; drop them from datasets or give notebook 04 more examples")
    return frame


def to_examples(frame: pd.DataFrame) -> list[ContrastiveExample]:
    """The usable rows of :func:`build_training_frame` as :class:`ContrastiveExample` records (id ``dataset:id``)."""
    used = frame[frame["usable"]]
    return [ContrastiveExample(f"{r.dataset}:{r.id}", r.prompt, r.positive, tuple(r.negatives))
            for r in used.itertuples(index=False)]


def eval_benchmarks(split: pd.DataFrame, benchmarks: Mapping[str, Benchmark], *, n_eval: int | None = None,
                    seed: int = 0) -> dict[str, Benchmark]:
    """The held-out part of each dataset as a :class:`Benchmark` (at most ``n_eval`` examples, seeded)."""
    out = {}
    for name in split["dataset"].unique():
        ids = split[(split["dataset"] == name) & (split["split"] == "eval")]["id"].tolist()
        index = _by_id(benchmarks[name], ids, name)
        examples = [index[i] for i in ids]
        if name == "wikiqa":  # the evaluator scores only questions with a correct sentence
            examples = [e for e in examples if e.correct_choices]
        if n_eval is not None and len(examples) > n_eval:
            keep = np.sort(np.random.default_rng(seed).permutation(len(examples))[:n_eval])
            examples = [examples[i] for i in keep]
        if not examples:
            raise DataError(f"the held-out part of {name} is empty: give notebook 04 more {name} examples")
        provenance = {**benchmarks[name].provenance, "held_out": len(examples), "n_eval": n_eval, "split_seed": seed}
        out[name] = Benchmark(name=name, examples=examples, provenance=provenance)
    return out


def perplexity_benchmark(data_root: str | None, n_chars: int | None) -> Benchmark | None:
    """The first ``n_chars`` characters of the WikiText-2 test split as a one-example benchmark.

    ``n_chars=None`` takes the whole split; ``0`` returns None (perplexity skipped).
    """
    if n_chars == 0:
        return None
    full = load_benchmark("wikitext2", data_root=data_root)
    text = (full.examples[0].text or "")[:n_chars]
    return Benchmark("wikitext2", [Example(id="wikitext2-test-prefix", text=text)],
                     {**full.provenance, "chars": len(text)})


# ------------------------------------------------------------------------------------------ runs


@dataclass(frozen=True)
class ArmRun:
    """One training run (or the untouched model): which arm, layers, seed and contrastive weight."""

    run_id: str
    arm: str
    layers: tuple[int, ...]
    seed: int | None
    draw: int | None
    lambda_con: float


def arm_layers(settings: MitigationSettings, n_layers: int, eavss_layers: Mapping[str, Any] | None,
               avss_scores: pd.DataFrame | None, avss_variant: str, eavss_source: str = "pooled",
               layer_seed: int = 0) -> dict[str, list[tuple[int, ...]]]:
    """The layer set(s) of every arm in ``settings.arms`` (``random`` has one per draw)."""
    settings.validate(n_layers)
    k, out = settings.k, {}
    for arm in settings.arms:
        if arm == "base":
            out[arm] = [()]
        elif arm in ("eavss", "lm_only"):
            if eavss_layers is None:
                raise DataError(f"arm {arm!r} needs notebook 04's eavss_layers.json")
            out[arm] = [tuple(eavss_top_k(eavss_layers, k, n_layers, eavss_source))]
        elif arm == "random":
            out[arm] = [tuple(random_layers(n_layers, k, d, layer_seed)) for d in range(settings.random_draws)]
        elif arm == "lowest_avss":
            if avss_scores is None:
                raise DataError("arm 'lowest_avss' needs notebook 02's avss_scores.parquet")
            out[arm] = [tuple(lowest_avss_layers(avss_scores, avss_variant, k, n_layers))]
        elif arm == "all":
            out[arm] = [tuple(range(n_layers))]
    return out


def plan_runs(settings: MitigationSettings, layers: Mapping[str, list[tuple[int, ...]]]) -> list[ArmRun]:
    """One :class:`ArmRun` per (arm, seed, draw); ``base`` runs once."""
    runs = []
    for arm in settings.arms:
        if arm == "base":
            runs.append(ArmRun("base", "base", (), None, None, settings.lambda_con))
            continue
        lambda_con = 0.0 if arm == "lm_only" else settings.lambda_con
        if arm != "lm_only" and lambda_con == 0:
            raise ConfigError(f"lambda_con=0 leaves arm {arm!r} identical to lm_only: use lambda_con > 0")
        for seed in settings.seeds:
            for d, layer_set in enumerate(layers[arm]):
                draw = d if arm == "random" else None
                name = f"{arm}-d{d}-s{seed}" if arm == "random" else f"{arm}-s{seed}"
                runs.append(ArmRun(name, arm, tuple(layer_set), seed, draw, lambda_con))
    return runs


def runs_table(runs: Sequence[ArmRun], model: nn.Module) -> pd.DataFrame:
    """Arms, layers and trainable-parameter counts (the budget comparison the book reports)."""
    n_layers = len(find_layers(model))
    rows = []
    for r in runs:
        rows.append({"run_id": r.run_id, "arm": r.arm, "seed": r.seed, "draw": r.draw,
                     "layers": ", ".join(map(str, r.layers)) or "—", "n_layers_trained": len(r.layers),
                     "trainable_params": count_trainable(model, r.layers) if r.layers else 0,
                     "lambda_con": r.lambda_con if r.layers else float("nan"),
                     "model_layers": n_layers})
    return pd.DataFrame(rows)


def evaluate_model(model: nn.Module, tokenizer: PreTrainedTokenizerBase, eval_sets: Mapping[str, Benchmark],
                   ppl: Benchmark | None, settings: MitigationSettings, seed: int = 0
                   ) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Per-example results on every held-out set and the WikiText-2 perplexity (``None`` when skipped).

    With ``settings.eval_dtype`` set, a copy of ``model`` cast to that dtype is evaluated (the trained weights
    rounded once, the same for every arm); ``model`` itself is left as it is.
    """
    if settings.eval_dtype is not None and next(model.parameters()).dtype != DTYPES[settings.eval_dtype]:
        model = copy.deepcopy(model).to(DTYPES[settings.eval_dtype])
    frames = []
    for name, bench in eval_sets.items():
        answered = answer_benchmark(model, tokenizer, bench, label_convention=settings.label_convention,
                                    batch_size=settings.eval_batch_size, sciq_with_support=settings.sciq_with_support,
                                    wikiqa_scoring=settings.wikiqa_scoring, seed=seed).answers
        frames.append(pd.DataFrame({
            "dataset": name, "id": answered["id"].astype(str), "correct": answered["correct"].astype(bool),
            "confidence": answered["confidence"].astype(float), "prediction": answered["prediction"].astype(str),
            "alias_containment": (answered["correct_alias_containment"].astype(float) if name in OPEN_QA
                                  else np.nan)}))
    perplexity: dict[str, Any] = {"value": None, "low": None, "high": None, "n_tokens": 0}
    if ppl is not None:
        res = evaluate_task(model, tokenizer, ppl, batch_size=1, max_length=settings.ppl_max_length, seed=seed)
        value, low, high = res.summary["perplexity"]
        perplexity = {"value": value, "low": low, "high": high, "n_tokens": res.settings["n_tokens"]}
    return pd.concat(frames, ignore_index=True), perplexity


def _run_key(run: ArmRun, settings: MitigationSettings, data_key: str) -> dict[str, Any]:
    config = asdict(settings.train_config(run.layers or (0,), run.seed or 0, run.lambda_con)) if run.layers else None
    return {"run": asdict(run), "train": config, "eval": settings.eval_key(), "data": data_key}


def data_fingerprint(examples: Sequence[ContrastiveExample], eval_sets: Mapping[str, Benchmark]) -> str:
    """A hash of the training examples and the held-out ids: a changed split invalidates finished runs."""
    import hashlib

    h = hashlib.sha256()
    h.update(json.dumps([asdict(e) for e in examples], sort_keys=True).encode())
    h.update(json.dumps({k: [e.id for e in b.examples] for k, b in eval_sets.items()}, sort_keys=True).encode())
    return h.hexdigest()[:16]


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
            settings: MitigationSettings, out_dir: str | Path, *, data_key: str = "", progress: bool = True,
            keep_checkpoint: bool = False) -> RunOutput:
    """Restore ``base_state``, train ``run`` (unless ``base``), evaluate, and write the run folder atomically."""
    folder = Path(out_dir) / "runs" / run.run_id
    key = _run_key(run, settings, data_key)
    done = folder / RESULT_NAME
    if done.is_file():
        result = read_json(done)
        if result.get("key") == json.loads(json.dumps(key)):
            return RunOutput(run, read_table(folder / "per_example.parquet"), read_table(folder / "train_log.parquet"),
                             result, reused=True)
    ckpt = folder / "checkpoint"
    key_file = folder / "key.json"
    if ckpt.exists() and (not key_file.is_file() or read_json(key_file) != json.loads(json.dumps(key))):
        shutil.rmtree(ckpt)  # a checkpoint of other settings cannot be resumed
    write_json(key, key_file)
    model.load_state_dict(base_state)
    train_seconds, log, resumed = 0.0, pd.DataFrame(), 0
    if run.layers:
        start = time.perf_counter()
        config = settings.train_config(run.layers, run.seed or 0, run.lambda_con)
        trained = train(model, tokenizer, examples, config, dataset="+".join(eval_sets), checkpoint_dir=ckpt,
                        progress=progress)
        train_seconds, log, resumed = time.perf_counter() - start, trained.log, trained.resumed_from_step
    start = time.perf_counter()
    per_example, perplexity = evaluate_model(model, tokenizer, eval_sets, ppl, settings, seed=run.seed or 0)
    eval_seconds = time.perf_counter() - start
    per_example.insert(0, "run_id", run.run_id)
    per_example.insert(1, "arm", run.arm)
    log = log.assign(run_id=run.run_id, arm=run.arm) if not log.empty else pd.DataFrame(
        columns=["step", "loss", "loss_con", "loss_lm", "grad_norm", "score_pos", "score_neg", "run_id", "arm"])
    result = {"key": key, "perplexity": perplexity, "train_seconds": train_seconds, "eval_seconds": eval_seconds,
              "resumed_from_step": resumed,
              "trainable_params": count_trainable(model, run.layers) if run.layers else 0}
    write_table(per_example, folder / "per_example.parquet")
    write_table(log, folder / "train_log.parquet")
    write_json(result, done)  # last: marks the run finished
    if not keep_checkpoint and ckpt.exists():
        shutil.rmtree(ckpt)
    model.load_state_dict(base_state)
    model.eval()
    return RunOutput(run, per_example, log, result)


@dataclass
class MitigationResults:
    """All runs' per-example results, training logs and summaries."""

    runs: pd.DataFrame  # one row per run: arm, layers, params, perplexity, seconds, reused
    per_example: pd.DataFrame  # run_id, arm, dataset, id, correct, confidence, prediction, alias_containment
    logs: pd.DataFrame  # run_id, arm, step, loss, loss_con, loss_lm, ...
    outputs: list[RunOutput] = field(default_factory=list)


def run_all(model: nn.Module, tokenizer: PreTrainedTokenizerBase, runs: Sequence[ArmRun],
            examples: Sequence[ContrastiveExample], eval_sets: Mapping[str, Benchmark], ppl: Benchmark | None,
            settings: MitigationSettings, out_dir: str | Path, *, progress: bool = True,
            on_run: Callable[[RunOutput], None] | None = None) -> MitigationResults:
    """Run every arm from the same base weights (restored before each run), resuming finished runs from disk."""
    if not examples:
        raise DataError("no training examples: check the split and build_training_frame")
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    data_key = data_fingerprint(examples, eval_sets)
    outputs = []
    for run in runs:
        output = run_arm(run, model, tokenizer, base_state, examples, eval_sets, ppl, settings, out_dir,
                         data_key=data_key, progress=progress)
        outputs.append(output)
        if on_run is not None:
            on_run(output)
    return collect(outputs, out_dir)


def collect(outputs: Sequence[RunOutput], out_dir: str | Path | None = None) -> MitigationResults:
    """Combine run outputs; with ``out_dir``, also write ``per_example.parquet``, ``train_logs.parquet``, ``runs.csv``."""
    rows = []
    for o in outputs:
        p = o.result["perplexity"]
        rows.append({"run_id": o.run.run_id, "arm": o.run.arm, "seed": o.run.seed, "draw": o.run.draw,
                     "layers": ", ".join(map(str, o.run.layers)) or "—", "trainable_params": o.result["trainable_params"],
                     "lambda_con": o.run.lambda_con if o.run.layers else float("nan"),
                     "perplexity": p["value"], "perplexity_low": p["low"], "perplexity_high": p["high"],
                     "train_seconds": o.result["train_seconds"], "eval_seconds": o.result["eval_seconds"],
                     "reused": o.reused})
    runs = pd.DataFrame(rows)
    per_example = pd.concat([o.per_example for o in outputs], ignore_index=True)
    logs = [o.log for o in outputs if not o.log.empty]
    log = pd.concat(logs, ignore_index=True) if logs else pd.DataFrame(columns=["run_id", "arm", "step"])
    if out_dir is not None:
        write_table(per_example, Path(out_dir) / "per_example.parquet")
        write_table(log, Path(out_dir) / "train_logs.parquet")
        write_table(runs, Path(out_dir) / "runs.csv")
    return MitigationResults(runs=runs, per_example=per_example, logs=log, outputs=list(outputs))


# ------------------------------------------------------------------------------------------ metrics


METRICS: tuple[str, ...] = ("accuracy", "hallucination_rate", "ece")


def metric_value(metric: str, correct: np.ndarray, confidence: np.ndarray) -> float:
    """One metric of one run on one set of examples (accuracy and hallucination rate in %, ECE in %)."""
    if metric == "accuracy":
        return 100.0 * float(np.mean(correct))
    if metric == "hallucination_rate":
        return 100.0 * (1.0 - float(np.mean(correct)))
    if metric == "ece":
        return expected_calibration_error(confidence, correct.astype(bool))
    raise ConfigError(f"unknown metric {metric!r}: choose one of {METRICS}")


def summarise_runs(per_example: pd.DataFrame, *, seed: int = 0, n_resamples: int = 1000) -> pd.DataFrame:
    """Per run and dataset: accuracy, hallucination rate and ECE (%), each with a 95% bootstrap CI.

    Also ``alias_hallucination_rate`` for open QA (wrong under alias containment).
    """
    rows = []
    for (run_id, arm, dataset), g in per_example.groupby(["run_id", "arm", "dataset"], sort=False):
        correct = g["correct"].to_numpy(dtype=float)
        conf = g["confidence"].to_numpy(dtype=float)
        cis = {"accuracy": tuple(100 * v for v in bootstrap_ci(correct, seed=seed)),
               "hallucination_rate": tuple(100 * v for v in bootstrap_ci(1 - correct, seed=seed)),
               "ece": bootstrap_statistic_ci([conf, correct], expected_calibration_error, seed=seed,
                                             n_resamples=n_resamples)}
        if g["alias_containment"].notna().all():
            cis["alias_hallucination_rate"] = tuple(
                100 * v for v in bootstrap_ci(1 - g["alias_containment"].to_numpy(dtype=float), seed=seed))
        for metric, (value, low, high) in cis.items():
            rows.append({"run_id": run_id, "arm": arm, "dataset": dataset, "metric": metric, "value": value,
                         "low": low, "high": high, "n": len(g)})
    return pd.DataFrame(rows)


def arm_matrices(per_example: pd.DataFrame, arm: str, dataset: str, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(correct, confidence) as ``[n_examples, n_runs]`` arrays of one arm's runs, rows in ``ids`` order."""
    sub = per_example[(per_example["arm"] == arm) & (per_example["dataset"] == dataset)]
    if sub.empty:
        raise DataError(f"no results for arm {arm!r} on {dataset}: add it to arms")
    correct = sub.pivot(index="id", columns="run_id", values="correct").reindex(list(ids))
    conf = sub.pivot(index="id", columns="run_id", values="confidence").reindex(list(ids))
    if correct.isna().any().any():
        raise DataError(f"arm {arm!r} was evaluated on other {dataset} examples than the comparison arm: re-run it")
    return correct.to_numpy(dtype=float), conf.to_numpy(dtype=float)


def arm_metric(correct: np.ndarray, confidence: np.ndarray, metric: str) -> float:
    """The metric averaged over an arm's runs (columns): seeds and random draws count equally."""
    return float(np.mean([metric_value(metric, correct[:, j], confidence[:, j]) for j in range(correct.shape[1])]))


def paired_difference(per_example: pd.DataFrame, arm_a: str, arm_b: str, dataset: str, metric: str, *,
                      confidence_level: float = 0.95, n_resamples: int = 1000, seed: int = 0
                      ) -> tuple[float, float, float]:
    """``metric(arm_a) − metric(arm_b)`` on the same held-out examples, with a paired bootstrap CI.

    Each resample draws examples with replacement and recomputes both arms' metric (each averaged over the
    arm's runs) on the same drawn examples, so the interval reflects the example-level pairing.
    """
    ids = sorted(per_example[(per_example["arm"] == arm_a) & (per_example["dataset"] == dataset)]["id"].unique())
    ca, fa = arm_matrices(per_example, arm_a, dataset, ids)
    cb, fb = arm_matrices(per_example, arm_b, dataset, ids)

    def statistic(index: np.ndarray) -> float:
        i = index.astype(int)
        return arm_metric(ca[i], fa[i], metric) - arm_metric(cb[i], fb[i], metric)

    return bootstrap_statistic_ci([np.arange(len(ids), dtype=float)], statistic, confidence_level=confidence_level,
                                  n_resamples=n_resamples, seed=seed)


def load_upstream(run_dir: str | Path) -> tuple[pd.DataFrame, dict[str, Any], pd.DataFrame | None]:
    """Notebook 04's answers and EAVSS layers, and notebook 02's AVSS scores (None when 02 was not run)."""
    root = Path(run_dir)
    answers = read_table(root / "04_hallucination_layers" / "answers.parquet")
    eavss = read_json(root / "04_hallucination_layers" / "eavss_layers.json")
    scores_path = root / "02_avss_ranking" / "avss_scores.parquet"
    scores = read_table(scores_path) if scores_path.is_file() else None
    return answers, eavss, scores


def settings_dict(settings: MitigationSettings) -> dict[str, Any]:
    """The settings as JSON-ready data."""
    return json.loads(json.dumps(asdict(settings)))


def upstream_eval_options(run_dir: str | Path) -> dict[str, Any]:
    """The evaluation options notebook 04 answered with (label convention, SciQ support, WikiQA scoring).

    Read from ``eavss_layers.json`` and ``meta.json`` of notebook 04; the defaults of
    :func:`avss_lib.hallucination.answers.answer_benchmark` fill in whatever they do not record.
    """
    folder = Path(run_dir) / "04_hallucination_layers"
    layers = read_json(folder / "eavss_layers.json")
    meta = read_json(folder / "meta.json") if (folder / "meta.json").is_file() else {}
    answer_settings = meta.get("answer_settings") or {}
    return {"label_convention": layers.get("label_convention", "exact_match"),
            "sciq_with_support": bool((answer_settings.get("sciq") or {}).get("sciq_with_support", False)),
            "wikiqa_scoring": (answer_settings.get("wikiqa") or {}).get("wikiqa_scoring", "pmi")}
