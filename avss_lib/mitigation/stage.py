"""Stage 05 (contrastive mitigation, claim E2) in one call: :func:`run_mitigation` writes every artifact of
``<run_dir>/05_mitigation/`` and returns a :class:`MitigationResult` for the chapter's tables, figures and prose.

The steps, in order: take chapter 04's question split (made before chapter 04 chose any layer) and build the
contrastive training examples from its selection half (:mod:`avss_lib.mitigation.training_data`); choose each arm's layers and plan the runs
(:mod:`avss_lib.mitigation.arms`); train and evaluate every run from the same base weights
(:mod:`avss_lib.mitigation.runs`); score the arms and compare them (:mod:`avss_lib.mitigation.outcomes`);
decide claim E2 (:mod:`avss_lib.mitigation.verdict`). The method is in the book's ``book/method.md``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import pandas as pd
import torch

from avss_lib.core.artifacts import (ANSWERS, ARM_METRICS, ARMS, AVSS_SCORES, COMPARISONS, E2_PRIMARY,
                                     EAVSS_LAYERS, ITI_GRID, PROVENANCE_04, PROVENANCE_05, QUESTION_SPLIT,
                                     RUN_METRICS, STEERING_DIRECTIONS, TRAIN_EXAMPLES, VERDICT_05, RunDir)
from avss_lib.core.models import load_model, model_provenance
from avss_lib.core.verdicts import Verdict, to_records
from avss_lib.core.workers import check_workers, prefill
from avss_lib.hallucination.answers import shots_by_id
from avss_lib.mitigation import prose
from avss_lib.mitigation.arms import MitigationSettings, arm_layers, plan_runs, runs_table
from avss_lib.mitigation.outcomes import arm_table, comparisons, summarise_runs
from avss_lib.mitigation.runs import MitigationRuns, run_all, run_share
from avss_lib.mitigation.tables import data_summary
from avss_lib.mitigation.intervention import tune_strength
from avss_lib.mitigation.training_data import (build_training_frame, eval_benchmarks, load_benchmarks,
                                               hold_out_validation, perplexity_benchmark, selection_questions, split_for,
                                               to_examples)
from avss_lib.mitigation.pooled_effects import examples_needed, primary_table
from avss_lib.mitigation.verdict import CLAIMED, RANDOM_MARGIN, e2_primary_verdict, e2_reading, e2_verdicts

VERDICT_METRICS: tuple[str, ...] = ("accuracy", "ece")
FAMILY_ALPHA = 0.05


def upstream_eval_options(run_dir: RunDir) -> dict[str, Any]:
    """The evaluation options chapter 04 answered with (label convention, SciQ support, WikiQA scoring, the ids
    of the open-QA few-shot examples).

    Read from chapter 04's ``EAVSS_LAYERS`` and ``PROVENANCE_04`` (its ``answer_settings``); the defaults of
    :func:`avss_lib.hallucination.answers.answer_benchmark` fill in whatever they do not record.
    """
    layers = EAVSS_LAYERS.read(run_dir)
    answer_settings = PROVENANCE_04.read(run_dir).get("answer_settings") or {}
    return {"label_convention": layers.get("label_convention", "exact_match"),
            "sciq_with_support": bool((answer_settings.get("sciq") or {}).get("sciq_with_support", False)),
            "wikiqa_scoring": (answer_settings.get("wikiqa") or {}).get("wikiqa_scoring", "pmi"),
            "shot_ids": {name: list(answer_settings[name].get("shots") or []) for name in ("nq_open", "triviaqa")
                         if name in answer_settings}}


def load_upstream(run_dir: RunDir) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any], pd.DataFrame | None]:
    """Chapter 04's answers, question split and EAVSS layers, and chapter 02's AVSS scores (None without 02)."""
    scores = AVSS_SCORES.read(run_dir) if AVSS_SCORES.exists(run_dir) else None
    return ANSWERS.read(run_dir), QUESTION_SPLIT.read(run_dir), EAVSS_LAYERS.read(run_dir), scores


@dataclass
class MitigationResult:
    """What chapter 05 shows: its artifacts' frames, the verdict, and the numbers its prose quotes."""

    settings: MitigationSettings
    split: pd.DataFrame  # chapter 04's QUESTION_SPLIT, this chapter's data sets
    train_frame: pd.DataFrame  # TRAIN_EXAMPLES
    data_table: pd.DataFrame  # per data set: split sizes, training questions used, held-out examples
    arms: pd.DataFrame  # ARMS
    runs: MitigationRuns  # RUNS, MITIGATION_PER_EXAMPLE, TRAIN_LOGS
    table: pd.DataFrame  # ARM_METRICS
    run_metrics: pd.DataFrame  # RUN_METRICS
    comparisons: pd.DataFrame  # COMPARISONS (exploratory, per data set)
    primary: pd.DataFrame  # E2_PRIMARY
    iti_grid: pd.DataFrame | None  # ITI_GRID: the strengths tried on the selection half (None without the arm)
    verdicts: list[Verdict]  # VERDICT_05: the primary verdict, then the exploratory one
    seconds: float  # wall time of the runs
    seed: int
    min_effect: float
    margin: float
    layer_sets: dict[str, list[tuple[int, ...]]] = field(default_factory=dict)

    n_validation: int = 0  # of the usable training questions, held out for early stopping

    @property
    def n_train_examples(self) -> int:
        """Training questions with a negative (the validation slice included)."""
        return int(self.train_frame["usable"].sum())

    @property
    def n_pairs(self) -> int:
        """The (data set, metric) pairs the verdict tests (its Bonferroni family)."""
        return len(self.split["dataset"].unique()) * len(VERDICT_METRICS)

    def power_table(self) -> pd.DataFrame:
        """The primary analysis' power: per metric and comparison, SE, minimum detectable effect and the pooled
        evaluation examples that would bring it down to the paper's magnitude (points reading)."""
        table = self.primary[["metric", "other", "n", "runs", "other_runs", "se", "se_plan", "mde", "mde_rel",
                              "level", "power"]].copy()
        table["claim (points)"] = table["metric"].map(CLAIMED)
        table["n for MDE = claim"] = [examples_needed(r, CLAIMED[r["metric"]]) for _, r in self.primary.iterrows()]
        return table.set_index(["metric", "other"])

    def glue(self) -> dict[str, Any]:
        """The numbers and data-dependent phrases of the chapter's markdown, by glue key."""
        primary, verdict = self.verdicts[0], self.verdicts[1]
        used = self.data_table["train: used (have negatives)"].to_dict()
        return {
            "seed": self.seed, "n_train_examples": self.n_train_examples, "n_validation": self.n_validation,
            "train_used_per_dataset": prose.counts_phrase(used),
            "n_held_out": int(self.data_table["held-out evaluated"].sum()),
            "budget": prose.budget_phrase(self.arms),
            "runs_summary": prose.runs_phrase(self.runs.runs, self.seconds),
            "open_qa": prose.open_qa_phrase(self.table),
            "e2_reading": e2_reading(verdict.conditions), "e2_outcome": primary.outcome,
            **prose.primary_glue(primary, self.primary, self.margin),
            "e2_level_pct": 100 * (1 - FAMILY_ALPHA / self.n_pairs), "e2_n_pairs": self.n_pairs,
            "min_effect": self.min_effect,
            "e2_comparisons": prose.comparison_phrase(verdict),
            "e2_accuracy_magnitude": prose.magnitude_phrase(verdict, "accuracy"),
            "e2_ece_magnitude": prose.magnitude_phrase(verdict, "ece"),
            "e2_never_correct": prose.never_correct_phrase(self.table),
        }


def run_mitigation(run_dir: RunDir, *, model: str, device: str = "cpu", dtype: str = "float32",
                   data_root: str | None = None, datasets: Sequence[str], n_eval: int | None = None, k: int,
                   eavss_source: str = "pooled", avss_variant: str = "block_rel", arms: Sequence[str], steps: int,
                   lr: float, batch_size: int = 4, lambda_con: float = 1.0, lambda_lm: float = 1.0,
                   temperature: float = 1.0, loss: str = "infonce", score: str = "sum", max_negatives: int = 4,
                   train_max_length: int = 256, share_prompts: bool = True, seeds: Sequence[int] = (0,),
                   random_draws: int = 3, eval_batch_size: int = 8, eval_dtype: str | None = None,
                   ppl_chars: int | None = 20_000,
                   ppl_max_length: int = 512, ppl_batch_size: int = 1, n_bootstrap: int = 1000,
                   min_effect: float = 0.5,
                   random_margin: float = RANDOM_MARGIN, power: float = 0.8, iti_tune_n: int | None = 24,
                   epochs: float = 0.0, validation_fraction: float = 0.0, validate_every: int = 0, patience: int = 3,
                   seed: int = 0, workers: int = 1,
                   progress: bool = True) -> MitigationResult:
    """Run stage 05 on ``run_dir`` (which holds stages 02 and 04) and write all of its artifacts.

    With ``workers`` > 1 the runs are trained that many at a time in worker processes
    (:func:`avss_lib.core.workers.prefill`; for a GPU) before the serial pass reads their folders."""
    started = time.perf_counter()
    torch.manual_seed(seed)
    answers, question_split, eavss_layers, avss_scores = load_upstream(run_dir)
    eval_options = upstream_eval_options(run_dir)
    benchmarks = load_benchmarks(datasets, data_root)
    shot_ids = {name: ids for name, ids in eval_options["shot_ids"].items() if name in benchmarks}
    settings = MitigationSettings(
        k=k, steps=steps, lr=lr, lambda_con=lambda_con, lambda_lm=lambda_lm, temperature=temperature, loss=loss,
        score=score, batch_size=batch_size, seeds=tuple(seeds), random_draws=random_draws, arms=tuple(arms),
        max_negatives=max_negatives, train_max_length=train_max_length, share_prompts=share_prompts,
        eval_batch_size=eval_batch_size, eval_dtype=eval_dtype, ppl_chars=ppl_chars, ppl_max_length=ppl_max_length,
        ppl_batch_size=ppl_batch_size,
        label_convention=eval_options["label_convention"], sciq_with_support=eval_options["sciq_with_support"],
        wikiqa_scoring=eval_options["wikiqa_scoring"],
        open_qa_shots={name: shots_by_id(benchmarks[name], ids) for name, ids in shot_ids.items()})
    split = split_for(question_split, answers, datasets)
    train_frame = build_training_frame(answers, split, benchmarks, max_negatives=max_negatives)
    TRAIN_EXAMPLES.write(train_frame, run_dir)
    examples, validation = hold_out_validation(to_examples(train_frame), validation_fraction, seed=seed)
    if epochs > 0:  # the budget as passes over the training questions (the same for every arm)
        settings = replace(settings, steps=max(1, math.ceil(epochs * len(examples) / batch_size)))
    if validation:
        settings = replace(settings, validate_every=validate_every or max(1, settings.steps // 10),
                           patience=patience)
    eval_sets = eval_benchmarks(split, benchmarks, n_eval=n_eval, seed=seed)
    ppl = perplexity_benchmark(data_root, ppl_chars)

    lm, tokenizer = load_model(model, device=device, dtype=dtype)
    layer_sets = arm_layers(settings, lm.config.num_hidden_layers, eavss_layers, avss_scores, avss_variant,
                            eavss_source, layer_seed=seed)
    iti_grid = None
    if "iti" in settings.arms:
        vectors = STEERING_DIRECTIONS.read(run_dir)
        tuning = selection_questions(split, benchmarks, n=iti_tune_n, seed=seed)
        alpha, iti_grid = tune_strength(lm, tokenizer, tuning, vectors, layer_sets["iti"][0],
                                        shots=settings.open_qa_shots, label_convention=settings.label_convention,
                                        batch_size=eval_batch_size, sciq_with_support=settings.sciq_with_support,
                                        wikiqa_scoring=settings.wikiqa_scoring, seed=seed)
        ITI_GRID.write(iti_grid, run_dir)
        settings = replace(settings, iti_vectors=vectors, iti_alpha=alpha)
    runs = plan_runs(settings, layer_sets)
    budget = runs_table(runs, lm)
    ARMS.write(budget, run_dir)
    start = time.perf_counter()
    for failure in prefill(partial(run_share, examples=examples, eval_sets=eval_sets, ppl=ppl, settings=settings,
                                   run_dir=run_dir, validation=validation),
                           runs, workers=check_workers(workers), model=model, device=device, dtype=dtype):
        print(f"{failure}: its runs are trained below")
    results = run_all(lm, tokenizer, runs, examples, eval_sets, ppl, settings, run_dir, progress=progress,
                      validation=validation)
    seconds = time.perf_counter() - start

    table = arm_table(results.per_example, n_resamples=n_bootstrap, seed=seed)
    ARM_METRICS.write(table, run_dir)
    run_metrics = summarise_runs(results.per_example, seed=seed, n_resamples=n_bootstrap)
    RUN_METRICS.write(run_metrics, run_dir)
    comp = comparisons(results.per_example, metrics=VERDICT_METRICS, family_alpha=FAMILY_ALPHA,
                       min_effect=min_effect, n_resamples=n_bootstrap, seed=seed)
    COMPARISONS.write(comp, run_dir)
    primary = primary_table(results.per_example, level=1 - FAMILY_ALPHA / len(CLAIMED), power=power,
                            n_resamples=n_bootstrap, seed=seed)
    E2_PRIMARY.write(primary, run_dir)
    verdicts = [e2_primary_verdict(primary, margin=random_margin), *e2_verdicts(comp, table)]
    VERDICT_05.write(to_records(verdicts), run_dir)

    data = {name: bench.provenance for name, bench in eval_sets.items()}
    if "truthfulqa_gen" in benchmarks:  # the source of TruthfulQA's negatives
        data["truthfulqa_gen"] = benchmarks["truthfulqa_gen"].provenance
    if ppl is not None:
        data["wikitext2"] = ppl.provenance
    PROVENANCE_05.write({
        "model": model_provenance(model), "data": data, "eval_options": eval_options,
        "layers": {arm: [list(s) for s in sets] for arm, sets in layer_sets.items()},
        "n_train_examples": len(examples), "n_validation_examples": len(validation),
        "torch_threads": torch.get_num_threads(),
        "timings_s": {"runs": seconds, "stage": time.perf_counter() - started}}, run_dir)
    return MitigationResult(settings=settings, split=split, train_frame=train_frame,
                            data_table=data_summary(train_frame, split, eval_sets), arms=budget, runs=results,
                            table=table, run_metrics=run_metrics, comparisons=comp, primary=primary, iti_grid=iti_grid,
                            verdicts=verdicts, seconds=seconds, seed=seed, min_effect=min_effect,
                            margin=random_margin, layer_sets=layer_sets, n_validation=len(validation))
