"""Stage 04 (hallucination-prone layers, claim E1) end to end: what chapter 04 runs.

:func:`run_hallucination` lets the model answer the QA benchmarks (:mod:`avss_lib.hallucination.answers`),
splits every data set by question into a selection half and an evaluation half *before anything is chosen*
(:func:`avss_lib.core.splits.split_datasets`, the ``QUESTION_SPLIT`` artifact that chapter 05 reads), collects
per-example activation statistics of the selection half only (:mod:`avss_lib.hallucination.example_stats`),
analyses EAVSS per data set (:mod:`avss_lib.hallucination.analysis`), compares the pooled layers with
notebook 02's lowest-AVSS layers, decides E1 (:mod:`avss_lib.hallucination.verdict`) and writes every
artifact of the stage (:mod:`avss_lib.core.artifacts`, section 04). The chapter shows the
:class:`HallucinationResult` it returns.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from io import StringIO
from typing import Any

import numpy as np
import pandas as pd
import torch

from avss_lib.core import artifacts as art
from avss_lib.core.answer_matching import LABEL_CONVENTIONS
from avss_lib.core.benchmarks import load_benchmark
from avss_lib.core.errors import ConfigError
from avss_lib.core.harness import encode
from avss_lib.core.models import load_model, model_provenance
from avss_lib.core.splits import SELECTION, side_ids, split_datasets
from avss_lib.core.verdicts import Verdict, to_records
from avss_lib.hallucination import prose
from avss_lib.hallucination.analysis import (
    DatasetAnalysis,
    analyse_dataset,
    pooled_top_k,
    score_table,
    summary_table,
)
from avss_lib.hallucination.answers import (GENERATIVE, answer_benchmarks, answer_summary, hallucination_labels,
                                            shots_by_id)
from avss_lib.hallucination.causal import answer_removed, causal_questions, causal_sets, causal_table
from avss_lib.hallucination.directions import steering_vectors
from avss_lib.hallucination.eavss import EavssConfig
from avss_lib.hallucination.example_stats import ExampleStats, StatItem, collect_example_stats
from avss_lib.hallucination.verdict import MIN_PROBE_RHO, MIN_RHO, e1_level, e1_verdicts
from avss_lib.ranking.agreement import jaccard_matrix
from avss_lib.ranking.avss import lowest_avss_layers


@dataclass
class HallucinationResult:
    """What stage 04 computed: the tables and figures' inputs of chapter 04, and the settings its prose cites."""

    config: EavssConfig
    site: str
    position: str
    label_convention: str
    n_requested: int | None
    k: int
    alpha: float
    avss_variant: str
    avss_rule: str
    answers: pd.DataFrame  # the ANSWERS artifact
    split: pd.DataFrame  # the QUESTION_SPLIT artifact
    answer_summary: pd.DataFrame  # accuracy, CI, class sizes and ECE per data set and convention
    measured: pd.DataFrame  # per data set: answers, measured, dropped (empty answer)
    analyses: dict[str, DatasetAnalysis]
    scores: pd.DataFrame  # the EAVSS_SCORES artifact
    summary: pd.DataFrame  # the E1_SUMMARY artifact (index dataset)
    pooled: list[int]
    pooled_ranks: pd.DataFrame
    excluded: list[str]
    lowest_avss: list[int]
    overlap: pd.DataFrame  # set, layers, jaccard_with_lowest_avss
    verdicts: list[Verdict]  # the primary verdict (at ``position``), then the exploratory one at the secondary
    secondary: PositionAnalysis | None = None  # the exploratory analysis at the secondary position
    length_strata: int = 0  # answer-length bins of the permutation null at the answer position
    open_qa_shots: int = 0  # solved examples before every NQ-open / TriviaQA question
    causal: pd.DataFrame | None = None  # the CAUSAL_CHECK table (None when it was not run)
    conventions: pd.DataFrame | None = None  # the E1_CONVENTIONS table: generative data sets under both labels
    secondary_verdict: Verdict | None = None  # exploratory: the rule at the secondary position
    convention_verdict: Verdict | None = None  # exploratory: the rule with the other label convention
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def verdict(self) -> Verdict:
        """The E1 verdict (the rule gives one per site)."""
        return self.verdicts[0]

    def length_table(self) -> pd.DataFrame:
        """Per position and data set: the best layer's probe AUROC beside the probe on the answer's length alone,
        and the smallest family-wise null p-value (length-stratified at the answer position)."""
        columns = ["usable", "probe_best_layer", "probe_best_auroc", "length_auroc", "min_p_max",
                   "split_half_rho_median"]
        parts = {self.position: self.summary}
        if self.secondary is not None:
            parts[self.secondary.position] = self.secondary.summary
        return pd.concat({pos: s.reindex(columns=columns) for pos, s in parts.items()}, names=["position", "dataset"])

    def glue(self) -> dict[str, Any]:
        """The numbers and phrases chapter 04's prose pastes (see :mod:`avss_lib.book.glue`)."""
        v, c = self.verdict, self.config
        pooled_row = self.overlap[self.overlap["set"] == f"top-{self.k} EAVSS, pooled"]
        return {
            "hal_site": self.site, "hal_where": prose.position_phrase(self.position),
            "hal_variance": f"`{c.variance}`", "hal_sparsity": f"`{c.sparsity}`", "hal_delta": c.delta,
            "hal_contrast": f"`{c.contrast}`", "hal_combine": f"`{c.combine}`", "hal_rank_by": f"`{c.rank_by}`",
            "hal_min_class": c.min_class, "hal_k": self.k, "hal_label_convention": f"`{self.label_convention}`",
            "hal_accuracy_list": prose.accuracy_list(self.answer_summary, self.label_convention),
            "hal_empty_answers": prose.empty_answers_sentence(self.answer_summary, self.label_convention),
            "hal_short_datasets": prose.short_datasets_sentence(self.answer_summary, self.label_convention,
                                                                self.n_requested),
            "hal_class_warnings": prose.class_size_warnings(self.answer_summary, self.label_convention, c.min_class),
            "hal_alpha": self.alpha,
            "hal_min_rho": _threshold(v, "stable", MIN_RHO), "hal_min_probe_rho": _threshold(v, "valid", MIN_PROBE_RHO),
            "hal_level": e1_level(v), "hal_outcome": v.outcome,
            "hal_n_usable": int(v.numbers["n_usable"]), "hal_n_pass_all": int(v.numbers["n_pass_all"]),
            "hal_n_signal": int(v.numbers["n_signal"]),
            "hal_excluded": prose.excluded_sentence(self.summary),
            "hal_dataset_lines": prose.dataset_lines(v, self.summary),
            "hal_pooled": prose.pooled_sentence(
                self.pooled, self.lowest_avss,
                float(pooled_row["jaccard_with_lowest_avss"].iloc[0]) if len(pooled_row) else float("nan")),
            "hal_avss_variant": f"`{self.avss_variant}`", "hal_avss_rule": f"`{self.avss_rule}`",
            "hal_secondary": prose.secondary_sentence(self.secondary_verdict, self.length_strata),
            "hal_conventions": prose.convention_sentence(self.convention_verdict, self.verdict),
            "hal_open_qa_shots": self.open_qa_shots, "hal_causal": prose.causal_sentence(self.causal),
            "hal_power": prose.power_sentence(self.summary),
            **{f"hal_time_{key}": seconds for key, seconds in self.timings.items()},
        }


def _threshold(verdict: Verdict, name: str, default: float) -> float:
    """The threshold the rule used for condition ``name`` (the rule's default when no data set was usable)."""
    found = [c.threshold for c in verdict.conditions if c.name == name and c.threshold is not None]
    return found[0] if found else default


def lowest_avss_for_rule(run_dir: art.RunDir, variant: str, rule: str) -> list[int]:
    """Notebook 02's lowest-AVSS layers of ``variant``: as many as its ``rule`` selection prunes."""
    selections = art.SELECTIONS.read(run_dir)
    row = selections[(selections["variant"] == variant) & (selections["rule"] == rule)]
    if len(row) != 1:
        raise ConfigError(f"selections have no single row for variant={variant!r}, rule={rule!r}: choose from "
                          f"{sorted(set(selections['variant']))} and {sorted(set(selections['rule']))}")
    k = len(row["layers"].iloc[0])
    return lowest_avss_layers(art.AVSS_SCORES.read(run_dir), variant, k) if k else []


def answer_lengths(tokenizer: Any, rows: pd.DataFrame) -> pd.Series:
    """Each answer's length in tokens as the harness encodes it (``" " + answer``; 0 for an empty answer), by id."""
    return pd.Series([len(encode(tokenizer, " " + p.strip())) if p.strip() else 0 for p in rows["prediction"]],
                     index=rows["id"].to_numpy(), dtype=float)


LENGTH_STRATA = 4  # answer-length quartiles: the permutation null's strata at the answer position


@dataclass
class PositionAnalysis:
    """The E1 analysis at one token position: statistics, per-data-set analyses, their summary, what was measured."""

    position: str
    collected: dict[str, ExampleStats]
    analyses: dict[str, DatasetAnalysis]
    summary: pd.DataFrame
    measured: pd.DataFrame
    timings: dict[str, float]


def analyse_position(lm: Any, tokenizer: Any, answers: pd.DataFrame, split: pd.DataFrame, datasets: Sequence[str], *,
                     position: str, site: str, config: EavssConfig, k: int, seeds: Sequence[int],
                     seed_fraction: float, n_perm: int, n_splits: int, length_strata: int, alpha: float,
                     batch_size: int, seed: int) -> PositionAnalysis:
    """Collect the selection half's per-example statistics at ``position`` and analyse every data set there.

    The answer-length probe is fitted at every position; the length-stratified null only at ``answer`` (the
    position whose statistics pool over the answer's tokens, so that length alone moves them).
    """
    sites = sorted({site, "block_output"})  # block_output: the probes' features
    sparsity = config.sparsity
    abs_eps = sorted({1e-5} | ({float(sparsity.removeprefix("sparsity_abs_"))}
                               if sparsity.startswith("sparsity_abs_") else set()))
    rel_taus = [float(sparsity.removeprefix("sparsity_rel_"))] if sparsity.startswith("sparsity_rel_") else []
    collected: dict[str, ExampleStats] = {}
    timings: dict[str, float] = {}
    start = time.perf_counter()
    for name in datasets:
        items = [StatItem(r.id, r.prompt, r.prediction) for r in selection_rows(answers, split, name).itertuples()]
        collected[name] = collect_example_stats(lm, tokenizer, items, position=position, sites=sites,
                                                abs_thresholds=abs_eps, rel_taus=rel_taus, batch_size=batch_size)
    timings["example_stats"] = time.perf_counter() - start
    measured = pd.DataFrame([{"dataset": name, "answers": int((answers["dataset"] == name).sum()),
                              "selection half": len(side_ids(split, name, SELECTION)),
                              "measured": len(c.example_ids), "dropped (empty answer)": len(c.dropped)}
                             for name, c in collected.items()]).set_index("dataset")
    start = time.perf_counter()
    analyses = analyse_collected(collected, answers, split, tokenizer, None, position=position, site=site,
                                 config=config, k=k, seeds=seeds, seed_fraction=seed_fraction, n_perm=n_perm,
                                 n_splits=n_splits, length_strata=length_strata, seed=seed)
    timings["analysis"] = time.perf_counter() - start
    return PositionAnalysis(position, collected, analyses, summary_table(analyses, alpha=alpha), measured, timings)


def analyse_collected(collected: dict[str, ExampleStats], answers: pd.DataFrame, split: pd.DataFrame, tokenizer: Any,
                      label_convention: str | None, *, position: str, site: str, config: EavssConfig, k: int,
                      seeds: Sequence[int], seed_fraction: float, n_perm: int, n_splits: int, length_strata: int,
                      seed: int) -> dict[str, DatasetAnalysis]:
    """Analyse every collected data set with the labels of ``label_convention`` (None: the answers' ``correct``)."""
    analyses = {}
    for name, c in collected.items():
        rows = selection_rows(answers, split, name)
        labels = hallucination_labels(rows, name, label_convention).loc[c.example_ids]
        analyses[name] = analyse_dataset(name, c.table, labels, site, k, config=config, features=c.features,
                                         feature_ids=c.example_ids, seeds=seeds, seed_fraction=seed_fraction,
                                         n_perm=n_perm, n_splits=n_splits,
                                         answer_lengths=answer_lengths(tokenizer, rows),
                                         length_strata=length_strata if position == "answer" else 0, seed=seed)
    return analyses


def pooled_directions(collected: Mapping[str, ExampleStats], answers: pd.DataFrame, split: pd.DataFrame
                      ) -> dict[str, dict[str, Any]]:
    """Every layer's steering direction (:mod:`avss_lib.hallucination.directions`) from the block-output features
    of the selection half, pooled over the data sets (chapter 05's inference-time intervention)."""
    layers = sorted(next(iter(collected.values())).features)
    features = {layer: np.concatenate([c.features[layer] for c in collected.values()]) for layer in layers}
    hallucinated = np.concatenate([hallucination_labels(selection_rows(answers, split, name), name)
                                   .loc[c.example_ids].to_numpy(dtype=bool) for name, c in collected.items()])
    return steering_vectors(features, hallucinated)


def selection_rows(answers: pd.DataFrame, split: pd.DataFrame, dataset: str) -> pd.DataFrame:
    """The answers of ``dataset``'s selection half: the only labels that choose layers (the evaluation half's
    labels never reach this stage's statistics, probes or rankings)."""
    keep = set(side_ids(split, dataset, SELECTION))
    rows = answers[answers["dataset"] == dataset]
    return rows[rows["id"].astype(str).isin(keep)]


def overlap_table(analyses: dict[str, DatasetAnalysis], pooled: Sequence[int], lowest_avss: Sequence[int], k: int,
                  lowest_label: str) -> pd.DataFrame:
    """Each top-k set (per data set, pooled) and the lowest-AVSS set, with its Jaccard overlap with the latter.

    The overlap is NaN for an empty top-k set (a data set whose scores are undefined, or no pooled ranking).
    """
    sets = {f"top-{k} EAVSS, {name}": list(a.top_k) for name, a in analyses.items()}
    sets[f"top-{k} EAVSS, pooled"] = list(pooled)
    sets[lowest_label] = list(lowest_avss)
    jaccard = jaccard_matrix({name: set(layers) for name, layers in sets.items()})[lowest_label]
    return pd.DataFrame([{"set": name, "layers": layers,
                          "jaccard_with_lowest_avss": float(jaccard[name]) if layers or name == lowest_label
                          else float("nan")} for name, layers in sets.items()])


def run_hallucination(run_dir: art.RunDir, *, model: str, device: str, dtype: str, data_root: Any,
                      datasets: Sequence[str], n: int | None, label_convention: str, site: str, position: str,
                      variance: str, sparsity: str, k: int, min_class: int, seeds: Sequence[int],
                      seed_fraction: float, n_perm: int, n_splits: int, alpha: float, sciq_with_support: bool,
                      wikiqa_scoring: str, avss_variant: str, avss_rule: str, batch_size: int,
                      seed: int, evaluation_fraction: float = 0.5, secondary_position: str | None = None,
                      length_strata: int = LENGTH_STRATA, open_qa_shots: int = 0, causal_n: int | None = 0,
                      causal_random_draws: int = 3) -> HallucinationResult:
    """Run stage 04 with chapter 04's parameters and write its artifacts to ``run_dir``.

    Reads notebook 02's ``SELECTIONS`` and ``AVSS_SCORES``; writes ``ANSWERS``, ``QUESTION_SPLIT``,
    ``EXAMPLE_STATS``, ``EAVSS_SCORES``, ``E1_SUMMARY``, ``EAVSS_LAYERS``, ``VERDICT_04`` and ``PROVENANCE_04``.
    Everything that chooses (EAVSS, its null and stability checks, the probes, the pooled top-k) sees the
    selection half of ``QUESTION_SPLIT`` only; the evaluation half is kept for chapter 05's scores. With a
    ``secondary_position`` the analysis is repeated there as an exploratory reading (``E1_SECONDARY``); at the
    ``answer`` position the permutation null shuffles labels within ``length_strata`` answer-length bins.
    With ``causal_n`` (questions per data set of the evaluation half; None: all, 0: skip) the causal check of
    :mod:`avss_lib.hallucination.causal` removes the pooled top-k, bottom-k and ``causal_random_draws`` random
    sets of k layers and asks those questions again (``CAUSAL_CHECK``).
    """
    lowest_avss = lowest_avss_for_rule(run_dir, avss_variant, avss_rule)
    config = EavssConfig(variance=variance, sparsity=sparsity, min_class=min_class)
    torch.manual_seed(seed)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    lm, tokenizer = load_model(model, device=device, dtype=dtype)
    timings["load_model"] = time.perf_counter() - start
    start = time.perf_counter()
    with contextlib.redirect_stderr(StringIO()):  # the harness's progress bars
        answers, answer_settings = answer_benchmarks(
            lm, tokenizer, datasets, n=n, seed=seed, data_root=data_root, label_convention=label_convention,
            batch_size=batch_size, sciq_with_support=sciq_with_support, wikiqa_scoring=wikiqa_scoring,
            open_qa_shots=open_qa_shots)
    timings["answers"] = time.perf_counter() - start
    art.ANSWERS.write(answers, run_dir)
    accuracy = answer_summary(answers, min_class=min_class, seed=seed)
    split = split_datasets(answers, datasets, evaluation_fraction=evaluation_fraction, seed=seed)
    art.QUESTION_SPLIT.write(split, run_dir)

    main = analyse_position(lm, tokenizer, answers, split, datasets, position=position, site=site, config=config,
                            k=k, seeds=seeds, seed_fraction=seed_fraction, n_perm=n_perm, n_splits=n_splits,
                            length_strata=length_strata, alpha=alpha, batch_size=batch_size, seed=seed)
    timings.update(main.timings)
    collected, analyses, summary, measured = main.collected, main.analyses, main.summary, main.measured
    example_stats = pd.concat([c.table.assign(dataset=name) for name, c in collected.items()], ignore_index=True)
    art.EXAMPLE_STATS.write(example_stats, run_dir)
    scores = score_table(analyses)
    art.EAVSS_SCORES.write(scores, run_dir)
    art.E1_SUMMARY.write(summary.reset_index(), run_dir)
    secondary = None
    if secondary_position and secondary_position != position:
        secondary = analyse_position(
            lm, tokenizer, answers, split, datasets, position=secondary_position, site=site, config=config, k=k,
            seeds=seeds, seed_fraction=seed_fraction, n_perm=n_perm, n_splits=n_splits, length_strata=length_strata,
            alpha=alpha, batch_size=batch_size, seed=seed)
        timings.update({f"secondary_{key}": seconds for key, seconds in secondary.timings.items()})
        art.E1_SECONDARY.write(secondary.summary.reset_index().assign(position=secondary_position), run_dir)

    pooled, pooled_ranks, excluded = pooled_top_k(analyses, k)
    overlap = overlap_table(analyses, pooled, lowest_avss, k, f"lowest AVSS ({avss_variant}, {avss_rule})")
    art.EAVSS_LAYERS.write({"k": k, "site": site, "position": position, "label_convention": label_convention,
                            "per_dataset": {name: a.top_k for name, a in analyses.items()}, "pooled": pooled,
                            "excluded": excluded, "lowest_avss": lowest_avss, "avss_variant": avss_variant,
                            "avss_rule": avss_rule}, run_dir)
    verdicts = e1_verdicts(summary, alpha=alpha, min_class=min_class, site=site, position=position)
    secondary_verdict = convention_verdict = None
    if secondary is not None:
        secondary_verdict = replace(e1_verdicts(secondary.summary, alpha=alpha, min_class=min_class, site=site,
                                                position=secondary_position)[0], analysis="exploratory")
        verdicts.append(secondary_verdict)
    art.STEERING_DIRECTIONS.write(pooled_directions(collected, answers, split), run_dir)
    other = [c for c in LABEL_CONVENTIONS if c != label_convention]
    generative = {name: c for name, c in collected.items() if name in GENERATIVE}
    conventions = None
    if other and generative:
        start = time.perf_counter()
        alternative = analyse_collected(generative, answers, split, tokenizer, other[0], position=position, site=site,
                                        config=config, k=k, seeds=seeds, seed_fraction=seed_fraction, n_perm=n_perm,
                                        n_splits=n_splits, length_strata=length_strata, seed=seed)
        timings["other_convention_analysis"] = time.perf_counter() - start
        alt_summary = summary_table(alternative, alpha=alpha)
        conventions = pd.concat([summary.loc[list(generative)].assign(convention=label_convention),
                                 alt_summary.assign(convention=other[0])]).reset_index()
        art.E1_CONVENTIONS.write(conventions, run_dir)
        mixed = pd.concat([summary.drop(index=list(generative)), alt_summary]).loc[list(summary.index)]
        v = e1_verdicts(mixed, alpha=alpha, min_class=min_class, site=site, position=position)[0]
        convention_verdict = replace(v, analysis="exploratory", subject=f"{v.subject}, {other[0]} labels")
        verdicts.append(convention_verdict)
    causal = None
    sets = causal_sets(pooled_ranks, k, lm.config.num_hidden_layers, draws=causal_random_draws, seed=seed)
    if causal_n != 0 and sets:
        start = time.perf_counter()
        questions = causal_questions(split, datasets, causal_n, seed, data_root)
        shots = {name: shots_by_id(load_benchmark(name, data_root=data_root), answer_settings[name].get("shots") or [])
                 for name in datasets if name in GENERATIVE}
        removed = answer_removed(lm, tokenizer, questions, sets, shots, label_convention=label_convention,
                                 batch_size=batch_size, sciq_with_support=sciq_with_support,
                                 wikiqa_scoring=wikiqa_scoring, seed=seed, progress=False)
        asked = pd.concat([answers[(answers["dataset"] == name) & answers["id"].astype(str).isin(
            {e.id for e in q.examples})] for name, q in questions.items()], ignore_index=True)
        causal = causal_table(asked[["dataset", "id", "correct"]], removed, seed=seed)
        art.CAUSAL_ANSWERS.write(removed, run_dir)
        art.CAUSAL_CHECK.write(causal, run_dir)
        timings["causal_check"] = time.perf_counter() - start
    art.VERDICT_04.write(to_records(verdicts), run_dir)
    art.PROVENANCE_04.write({"model": model_provenance(model), "answer_settings": answer_settings,
                             "example_stats": {name: {**c.settings, "dropped": c.dropped}
                                               for name, c in collected.items()},
                             "secondary_example_stats": None if secondary is None else {
                                 name: {**c.settings, "dropped": c.dropped} for name, c in secondary.collected.items()},
                             "timings_s": timings}, run_dir)
    return HallucinationResult(
        config=config, site=site, position=position, label_convention=label_convention, n_requested=n, k=k,
        alpha=alpha, avss_variant=avss_variant, avss_rule=avss_rule, answers=answers, split=split,
        answer_summary=accuracy, measured=measured,
        analyses=analyses, scores=scores, summary=summary, pooled=pooled, pooled_ranks=pooled_ranks,
        excluded=excluded, lowest_avss=lowest_avss, overlap=overlap, verdicts=verdicts, secondary=secondary,
        length_strata=length_strata, open_qa_shots=open_qa_shots, causal=causal, conventions=conventions,
        secondary_verdict=secondary_verdict, convention_verdict=convention_verdict, timings=timings)
