"""Chapters 01 and 02 as two calls: collect the activation statistics, then score and select layers by AVSS.

:func:`run_activations` loads the model and the calibration texts, runs the streamed statistics pass of
:mod:`avss_lib.core.activation_stats` and writes ``ACTIVATION_STATS``, ``CALIBRATION`` and ``PROVENANCE_01``;
:func:`run_ranking` reads them and writes ``AVSS_SCORES`` and ``SELECTIONS``. Each returns a result object with
the tables the chapter shows and the values its prose glues.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch

from avss_lib.core import artifacts
from avss_lib.core.activation_stats import StatsSpec, collect_activation_stats
from avss_lib.core.artifacts import RunDir
from avss_lib.core.formatting import layer_list
from avss_lib.core.calibration_text import calibration_record, load_calibration_texts, make_batches
from avss_lib.core.layers import find_layers, norm_placement
from avss_lib.core.models import load_model, model_provenance
from avss_lib.ranking.avss import all_variant_scores, selections, variant_by_name
from avss_lib.ranking.faithful import FaithfulFacts, SelectionFacts, faithful_facts, norm_phrase, selection_facts


@dataclass
class ActivationResult:
    """Chapter 01's statistics table, the calibration record and the run's provenance."""

    stats: pd.DataFrame
    calibration: dict[str, Any]
    provenance: dict[str, Any]

    def glue(self) -> dict[str, object]:
        return {"architecture": self.provenance["architecture"], "n_layers": self.provenance["n_layers"],
                "n_texts": self.calibration["n_samples"], "calibration_source":
                    f"{self.calibration['benchmark']}/{self.calibration['split']}",
                "n_tokens": f"{self.calibration['n_tokens']:,}", "n_batches": self.calibration["n_batches"],
                "stats_seconds": self.provenance["timings_s"]["statistics"]}


def run_activations(run_dir: RunDir, *, model: str, device: str, dtype: str, data_root: str | None,
                    calibration_dataset: str, calibration_split: str, n_samples: int, max_length: int,
                    batch_size: int, padding: str, sites: Sequence[str], abs_thresholds: Sequence[float],
                    rel_taus: Sequence[float], seed: int) -> ActivationResult:
    """Collect the statistics of chapter 01 on ``n_samples`` calibration texts and write its artifacts."""
    torch.manual_seed(seed)
    spec = StatsSpec(tuple(sites), tuple(abs_thresholds), tuple(rel_taus))
    texts, data = load_calibration_texts(calibration_dataset, calibration_split, n_samples, seed, data_root)
    start = time.perf_counter()
    lm, tokenizer = load_model(model, device=device, dtype=dtype)
    load_seconds = time.perf_counter() - start
    batches = make_batches(tokenizer, texts, max_length=max_length, batch_size=batch_size, padding=padding)
    start = time.perf_counter()
    stats = collect_activation_stats(lm, batches, spec, total=len(batches))
    seconds = time.perf_counter() - start
    calibration = calibration_record(data, batches, max_length=max_length, batch_size=batch_size, padding=padding,
                                     statistics={"sites": list(spec.sites), "abs_thresholds": list(spec.abs_thresholds),
                                                 "rel_taus": list(spec.rel_taus)})
    provenance = {"model": model_provenance(model), "architecture": type(lm).__name__,
                  "n_layers": len(find_layers(lm)), "norm_placement": norm_placement(lm.config),
                  "torch_threads": torch.get_num_threads(),
                  "timings_s": {"load_model": load_seconds, "statistics": seconds}}
    artifacts.ACTIVATION_STATS.write(stats, run_dir)
    artifacts.CALIBRATION.write(calibration, run_dir)
    artifacts.PROVENANCE_01.write(provenance, run_dir)
    return ActivationResult(stats, calibration, provenance)


@dataclass
class RankingResult:
    """Chapter 02's scores and selections, and the facts its prose states about them."""

    stats: pd.DataFrame
    scores: pd.DataFrame
    selections: pd.DataFrame
    variants: list[str]
    faithful: FaithfulFacts
    selection: SelectionFacts
    norm_placement: str

    def faithful_table(self) -> pd.DataFrame:
        """Per layer: the authors' variance, sparsity, the count of near-zero entries behind it, AVSS, rank."""
        faithful = self.scores[self.scores["variant"] == "authors_code"].set_index("layer")
        block = self.stats[self.stats["site"] == "block_output"].set_index("layer")
        below = (block["sparsity_abs_1e-05_padded"] * block["n_positions"] * block["hidden"]).round().astype(int)
        return faithful.assign(entries_below=below)[["variance", "sparsity", "entries_below", "avss", "avss_norm",
                                                       "rank"]]

    def selection_table(self) -> pd.DataFrame:
        """Variants × rules: the layers each rule prunes."""
        table = self.selections.assign(layers=self.selections["layers"].map(layer_list))
        return table.pivot(index="variant", columns="rule", values="layers").loc[self.variants]

    def glue(self) -> dict[str, object]:
        return {**self.faithful.glue(), **self.selection.glue(),
                "faithful_norm_phrase": norm_phrase(self.norm_placement)}


def run_ranking(run_dir: RunDir, *, variants: Sequence[str], ratio: float, cumulative_threshold: float,
                rounding: str) -> RankingResult:
    """Score every variant on chapter 01's statistics, apply the three selection rules, write the artifacts."""
    stats = artifacts.ACTIVATION_STATS.read(run_dir)
    chosen = tuple(variant_by_name(name) for name in variants)
    scores = all_variant_scores(stats, chosen)
    chosen_selections = selections(scores, ratio=ratio, threshold=cumulative_threshold, rounding=rounding)
    artifacts.AVSS_SCORES.write(scores, run_dir)
    artifacts.SELECTIONS.write(chosen_selections, run_dir)
    placement = artifacts.PROVENANCE_01.read(run_dir)["norm_placement"]
    return RankingResult(stats, scores, chosen_selections, list(variants), faithful_facts(stats, scores),
                         selection_facts(chosen_selections), placement)
