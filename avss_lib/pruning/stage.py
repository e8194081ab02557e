"""Stage 03 (claim A1): rank the layers by AVSS and every baseline, prune, evaluate, and write the artifacts.

:func:`run_pruning` reads chapter 01's statistics, calibration record and provenance and chapter 02's AVSS
scores and selections, and runs the study in four steps: the rankings and their pruned sets
(:mod:`avss_lib.pruning.plan`), the evaluation of each distinct set (:mod:`avss_lib.pruning.evaluate`), the
retention and comparison tables (:mod:`avss_lib.pruning.retention`) and claim A1's verdicts
(:mod:`avss_lib.pruning.verdict`). It writes every artifact of the ``03 pruning`` section of
:mod:`avss_lib.core.artifacts` and returns a :class:`PruningResult` for the chapter's figures and prose.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from avss_lib.core import artifacts as art
from avss_lib.core.benchmarks import Benchmark
from avss_lib.core.calibration_text import calibration_batches, check_disjoint, text_source
from avss_lib.core.errors import ConfigError
from avss_lib.core.layer_removal import layers_for_ratio
from avss_lib.core.layers import find_layers
from avss_lib.core.models import load_model, model_provenance
from avss_lib.core.timing import measure_speedup
from avss_lib.core.verdicts import Verdict, to_records
from avss_lib.core.workers import check_workers, prefill
from avss_lib.pruning import evaluate, plan as planning, prose, retention as tables
from avss_lib.pruning.stability import ranking_stability
from avss_lib.pruning.tasks import TaskSpec, curve_task_specs, load_task, task_specs
from avss_lib.pruning.verdict import A1_RULE, MEASURES, RETENTION_THRESHOLD, a1_verdicts


@dataclass
class PruningResult:
    """What stage 03 computed: the inputs of the chapter's figures, tables and prose."""

    ratio: float
    k: int
    n_layers: int
    primary: str  # the pre-registered AVSS variant, ``avss:<variant>``
    primary_retention: str  # its pre-registered retention measure, a key of MEASURES
    dtype: str
    scores: dict[str, pd.Series]
    plan: pd.DataFrame  # PRUNED_SETS
    sets: dict[str, list[int]]  # every evaluated set, the unpruned model first
    summary: pd.DataFrame  # RESULTS
    per_example: pd.DataFrame  # PER_EXAMPLE
    retention: pd.DataFrame  # RETENTION
    comparison: pd.DataFrame  # COMPARISON
    curve: pd.DataFrame  # CURVE
    spearman: pd.DataFrame
    jaccard: pd.DataFrame
    stability: pd.DataFrame  # STABILITY (empty when stability_folds is 0)
    speed: dict[str, Any]  # SPEED
    precision: pd.DataFrame | None  # PRECISION (None when every evaluation ran in float32)
    verdicts: list[Verdict]
    table_specs: list[TaskSpec]
    benchmarks: dict[str, tuple[TaskSpec, Benchmark]]
    mismatches: list[str]  # AVSS variants whose set differs from chapter 02's fixed-fraction selection
    timings_s: dict[str, Any]

    def glue(self) -> dict[str, Any]:
        """Every number and phrase the chapter's markdown pastes (see :mod:`avss_lib.book.glue`)."""
        r, used = self.retention, prose.counted_tasks(self.retention)
        column = MEASURES[self.primary_retention]
        holding = prose.holding_variants(r, column)
        per_set = list(self.timings_s["per_set"].values())
        return {
            "n_methods": self.plan["method"].nunique(), "n_ratios": self.plan["ratio"].nunique(),
            "ratios": ", ".join(f"{x:.3g}" for x in sorted(self.plan["ratio"].unique())),
            "n_planned": len(self.plan), "n_distinct": len(self.sets) - 1,
            "shared_sets": prose.shared_sets_sentence(self.plan),
            "table_tasks": prose.task_list(self.table_specs, self.benchmarks),
            "ranking_seconds": self.timings_s["rankings"], "evaluation_seconds": self.timings_s["evaluations"],
            "median_set_seconds": float(np.median(per_set)) if per_set else float("nan"),
            "selection_check": prose.selection_sentence(self.mismatches),
            "agreement": prose.agreement_sentence(self.spearman, self.jaccard, self.primary),
            "stability": prose.stability_sentence(self.stability, self.primary),
            "ratio": self.ratio, "k": self.k, "n_layers": self.n_layers, "threshold": RETENTION_THRESHOLD,
            "counted_tasks": prose.word_list(used), "skipped_tasks": prose.skipped_tasks_sentence(r),
            "n_holds": len(holding), "n_variants": r.loc[r["method"].str.startswith("avss:"), "method"].nunique(),
            "holding_variants": prose.word_list([planning.method_label(m) for m in holding]),
            "primary_label": planning.method_label(self.primary),
            "primary_measure": "chance-corrected" if self.primary_retention == "chance_corrected" else "raw",
            "primary_raw": prose.retention_list(r, self.primary),
            "primary_corrected": prose.retention_list(r, self.primary, "chance_corrected"),
            "primary_worst": prose.worst_task(r, self.primary, column),
            "best_worst_case": prose.best_worst_case(r, column),
            "family": prose.family_sentence(self.comparison, tables.FAMILY_ALPHA),
            "exploratory": prose.exploratory_sentence(self.verdicts),
            "comparison_random": prose.comparison_sentence(self.comparison, r, "random", self.primary),
            "comparison_last_k": prose.comparison_sentence(self.comparison, r, "last_k", self.primary),
            "a1_outcome": prose.outcome_phrase(self.verdicts[0].outcome), "a1_summary": self.verdicts[0].summary,
            "a1_detectable": prose.detectable_phrase(self.verdicts[0].numbers.get("detectable_shortfall")),
            "a1_rule": A1_RULE, "precision": prose.precision_sentence(self.precision, self.dtype),
            **prose.speed_numbers(self.speed),
        }


def check_upstream(provenance01: Mapping[str, Any], model_spec: str, model: nn.Module) -> None:
    """Raise :class:`ConfigError` when chapter 01 (its ``PROVENANCE_01``) ran on another model than ``model_spec``
    / ``model``: another spec, or another number of decoder layers."""
    ran = provenance01.get("model", {}).get("spec")
    n_layers = len(find_layers(model))
    if ran is not None and ran != model_spec:
        raise ConfigError(f"chapter 01 collected statistics on model {ran!r}, this chapter loads {model_spec!r}: "
                          "use the same model parameter for chapters 01-03")
    if provenance01.get("n_layers") not in (None, n_layers):
        raise ConfigError(f"chapter 01's model has {provenance01['n_layers']} layers, this one {n_layers}: "
                          "re-run chapter 01")


def run_pruning(run_dir: art.RunDir, *, model: str, device: str, dtype: str, data_root: str | None, seed: int,
                ratio: float, rounding: str, tasks: Mapping[str, int | None],
                task_options: Mapping[str, Mapping[str, Any]], primary_variant: str, primary_retention: str,
                random_seeds: Sequence[int],
                oracle_samples: int | None, sleb_samples: int, curve_ratios: Sequence[float], curve_methods: Sequence[str],
                curve_tasks: Mapping[str, int | None], curve_random_seeds: int, batch_size: int,
                precision_check: bool, speed_repeats: int, n_bootstrap: int, stability_folds: int,
                stability_oracle_samples: int | None, workers: int = 1) -> PruningResult:
    """Run stage 03 with the chapter's parameters (see the notebook's ``parameters`` cell) and write its artifacts.

    With ``workers`` > 1 the pruned sets are evaluated that many at a time in worker processes
    (:func:`avss_lib.core.workers.prefill`; for a GPU) before the serial pass reads their checkpoints."""
    torch.manual_seed(seed)
    started = time.perf_counter()
    stats_01 = art.ACTIVATION_STATS.read(run_dir)
    calibration = art.CALIBRATION.read(run_dir)
    provenance01 = art.PROVENANCE_01.read(run_dir)
    avss_scores = art.AVSS_SCORES.read(run_dir)
    selections = art.SELECTIONS.read(run_dir)
    primary = f"avss:{primary_variant}"
    if primary_retention not in MEASURES:
        raise ConfigError(f"primary_retention {primary_retention!r} is not a retention measure: use one of "
                          f"{sorted(MEASURES)}")
    table_specs = task_specs(tasks, task_options)
    curve_specs = curve_task_specs(table_specs, curve_tasks, task_options)
    lm, tokenizer = load_model(model, device=device, dtype=dtype)
    check_upstream(provenance01, model, lm)
    n_layers = lm.config.num_hidden_layers
    k = layers_for_ratio(n_layers, ratio, rounding)
    benchmarks = {s.key: (s, load_task(s, tokenizer, data_root, seed)) for s in [*table_specs, *curve_specs]}
    evaluated_sources = check_disjoint(calibration, {key: bench.provenance for key, (_, bench) in benchmarks.items()})

    t0 = time.perf_counter()
    oracle_batches = calibration_batches(calibration, tokenizer, data_root=data_root, n_samples=oracle_samples)
    sleb_ratios = [ratio, *(curve_ratios if "sleb" in curve_methods else [])]  # its greedy steps cost a pass each
    sleb_layers = max(layers_for_ratio(n_layers, r, rounding) for r in sleb_ratios) if sleb_samples else 0
    sleb_batches = (calibration_batches(calibration, tokenizer, data_root=data_root, n_samples=sleb_samples)
                    if sleb_samples else None)
    scores = planning.method_scores(stats_01, avss_scores, random_seeds=random_seeds, model=lm,
                                    oracle_batches=oracle_batches, sleb_layers=sleb_layers, sleb_batches=sleb_batches)
    if primary not in scores:
        raise ConfigError(f"primary_variant {primary_variant!r} is not among chapter 02's variants: {sorted(scores)}")
    blocks = planning.block_methods(lm, oracle_batches)
    ranking_seconds = time.perf_counter() - t0
    plan = planning.plan_pruned_sets(scores, sorted({ratio, *curve_ratios}), rounding=rounding, blocks=blocks)
    table_plan = plan[np.isclose(plan["ratio"], ratio)]
    curve_plan = planning.subplan(plan, curve_methods, curve_ratios, curve_random_seeds)
    table_keys = [s.key for s in table_specs]
    curve_keys = list(dict.fromkeys(s.key for s in curve_specs))
    needs = planning.task_needs((table_plan, table_keys), (curve_plan, curve_keys))
    sets = {planning.BASE_SET: [], **planning.unique_sets(pd.concat([table_plan, curve_plan]))}

    t0 = time.perf_counter()
    checkpoints = art.pruning_checkpoint_dir(run_dir)
    for failure in prefill(partial(evaluate.evaluate_share, needs=needs, tasks=benchmarks, batch_size=batch_size,
                                   seed=seed, checkpoint_dir=checkpoints),
                           list(sets.items()), workers=check_workers(workers), model=model, device=device, dtype=dtype):
        print(f"{failure}: its sets are evaluated below")
    evaluations = evaluate.evaluate_sets(lm, tokenizer, sets, needs, benchmarks, batch_size=batch_size, seed=seed,
                                         checkpoint_dir=checkpoints, log=print)
    evaluation_seconds = time.perf_counter() - t0
    precision = None
    t0 = time.perf_counter()
    if dtype != "float32" and precision_check:
        reference, _ = load_model(model, device=device, dtype="float32")
        precision = evaluate.precision_check(reference, tokenizer, evaluations,
                                             {key: benchmarks[key] for key in curve_keys}, batch_size=batch_size,
                                             seed=seed)
        del reference
    precision_seconds = time.perf_counter() - t0

    summary = evaluations.summary_table()
    per_example = evaluations.per_example_table()
    chance = {key: tables.chance_level(spec.name, bench, seed=seed) for key, (spec, bench) in benchmarks.items()}
    retention = tables.retention_table(plan, summary, per_example, ratio, table_keys, n_resamples=n_bootstrap,
                                      seed=seed, chance=chance)
    comparison = tables.comparison_table(plan, per_example, summary, ratio, table_keys, n_resamples=n_bootstrap,
                                        seed=seed)
    curve = tables.curve_table(curve_plan, summary, curve_methods, curve_keys)
    spearman, jaccard = tables.agreement(scores, plan, ratio)
    t0 = time.perf_counter()
    variants = [m.split(":", 1)[1] for m in scores if m.startswith("avss:")]
    stability = (ranking_stability(lm, tokenizer, calibration, variants, data_root=data_root, n_folds=stability_folds,
                                   oracle_samples=stability_oracle_samples, ratio=ratio, rounding=rounding)
                 if stability_folds else pd.DataFrame(columns=list(art.STABILITY.columns)))
    stability_seconds = time.perf_counter() - t0
    speed = measure_speedup(lm, table_plan.set_index("method").loc[primary, "layers"], oracle_batches[0],
                            repeats=speed_repeats)
    held_out = tables.held_out_best(plan, summary, per_example, ratio, table_keys, chance=chance,
                                    column=MEASURES[primary_retention], n_resamples=n_bootstrap, seed=seed)
    verdicts = a1_verdicts(retention, plan, primary, measure=primary_retention, ratio=ratio, k=k, n_layers=n_layers,
                           held_out=held_out)
    timings = {"rankings": ranking_seconds, "evaluations": evaluation_seconds, "per_set": dict(evaluations.seconds),
               "precision_check": precision_seconds, "stability": stability_seconds,
               "total": time.perf_counter() - started}

    score_table = pd.concat([pd.DataFrame({"method": m, "layer": s.index, "score": s.to_numpy()})
                             for m, s in scores.items()])
    art.METHOD_SCORES.write(score_table, run_dir)
    art.PRUNED_SETS.write(plan, run_dir)
    art.RESULTS.write(summary, run_dir)
    art.PER_EXAMPLE.write(per_example, run_dir)
    art.RETENTION.write(retention, run_dir)
    art.COMPARISON.write(comparison, run_dir)
    art.CURVE.write(curve, run_dir)
    art.SPEARMAN.write(spearman.reset_index(names="method"), run_dir)
    art.JACCARD.write(jaccard.reset_index(names="method"), run_dir)
    art.STABILITY.write(stability, run_dir)
    art.SPEED.write(speed, run_dir)
    if precision is not None:
        art.PRECISION.write(precision, run_dir)
    art.VERDICT_03.write(to_records(verdicts), run_dir)
    art.PROVENANCE_03.write({
        "model": model_provenance(model), "n_layers": n_layers, "k": k,
        "benchmarks": {key: bench.provenance for key, (_, bench) in benchmarks.items()},
        "oracle_calibration": {"source": "/".join(text_source(calibration)), "disjoint_from": evaluated_sources,
                               "n_batches": len(oracle_batches),
                               "n_tokens": int(sum(int(b["attention_mask"].sum()) for b in oracle_batches))},
        "unique_sets": len(sets), "torch_threads": torch.get_num_threads(), "timings_s": timings,
    }, run_dir)
    return PruningResult(ratio=ratio, k=k, n_layers=n_layers, primary=primary,
                         primary_retention=primary_retention, dtype=dtype, scores=scores, plan=plan,
                         sets=sets, summary=summary, per_example=per_example, retention=retention,
                         comparison=comparison, curve=curve, spearman=spearman, jaccard=jaccard, stability=stability, speed=speed,
                         precision=precision, verdicts=verdicts, table_specs=table_specs, benchmarks=benchmarks,
                         mismatches=planning.selection_mismatches(plan, selections, ratio), timings_s=timings)
