"""The page of a book of several models that puts them side by side, generated at book-build time.

Layers are compared at *relative depth* (layer index ÷ (layers − 1)), since the models differ in depth. The page
holds the AVSS profile over depth of each model (a figure), the layers each pruning method removes at the
chapter's ratio, the chance-corrected retention of the primary AVSS variant and of the baselines on every task,
the EAVSS layers chapter 04 hands to chapter 05, and chapter 05's mitigation arms pooled over the data sets (claim E2's
primary analysis). Each model's chapters hold the evidence behind each number.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from avss_lib.core.artifacts import (AVSS_SCORES, E2_PRIMARY, EAVSS_LAYERS, PRUNED_SETS, RETENTION, RunDir,
                                    done_record)
from avss_lib.core.formatting import interval, layer_list
from avss_lib.core.io import read_json

FIGURE = "models_compared_avss.png"
UNINFORMATIVE = "— (unpruned not above chance)"


def _pruning_parameters(run: RunDir) -> tuple[str, float]:
    """Chapter 03's primary AVSS variant and ratio in this run (chapter 02's defaults when 03 did not run)."""
    done = done_record(run, "03_pruning")
    params = read_json(done)["parameters"] if done.is_file() else {}
    return params.get("primary_variant", "block_rel"), params.get("ratio", 0.25)


def _n_layers(run: RunDir) -> int:
    return int(AVSS_SCORES.read(run)["layer"].nunique())


def avss_profiles(runs: Mapping[str, RunDir]) -> pd.DataFrame:
    """Each model's primary-variant AVSS (normalised to the model's own maximum) against relative depth."""
    frames = []
    for model, run in runs.items():
        if not AVSS_SCORES.exists(run):
            continue
        variant, _ = _pruning_parameters(run)
        scores = AVSS_SCORES.read(run)
        depth_of = max(scores["layer"].nunique() - 1, 1)
        scores = scores[scores["variant"] == variant]
        depth = scores["layer"] / depth_of
        share = scores["avss_norm"]  # each layer's share of the model's total; its depth decides its number
        frames.append(pd.DataFrame({"model": model, "variant": variant, "layer": scores["layer"],
                                    "relative depth": depth, "AVSS (÷ max)": share / share.max()}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def removed_layers(runs: Mapping[str, RunDir]) -> pd.DataFrame:
    """For each method with one pruned set at the primary ratio: the layers it removes in each model."""
    columns = {}
    for model, run in runs.items():
        if not PRUNED_SETS.exists(run):
            continue
        _, ratio = _pruning_parameters(run)
        sets = PRUNED_SETS.read(run)
        sets = sets[(sets["ratio"] == ratio) & (sets["family"] != "random")]
        n = _n_layers(run)
        columns[model] = {m: f"{layer_list(layers)} (of {n})" for m, layers in zip(sets["method"], sets["layers"])}
    return pd.DataFrame(columns).rename_axis("method").reset_index() if columns else pd.DataFrame()


def retention_side_by_side(runs: Mapping[str, RunDir]) -> pd.DataFrame:
    """Chance-corrected retention (%, 95% CI) of every pruned method on every task, one column per model; a task
    whose unpruned score is not above chance in a model retains nothing measurable there (:data:`UNINFORMATIVE`)."""
    cells = {}
    for model, run in runs.items():
        if not RETENTION.exists(run):
            continue
        table = RETENTION.read(run)
        table = table[table["method"] != "unpruned"]
        cells[model] = {(m, t): interval(v, lo, hi, "{:.1f}") if informative else UNINFORMATIVE
                        for m, t, v, lo, hi, informative in zip(
                            table["method"], table["task_key"], table["chance_corrected"],
                            table["chance_corrected_low"], table["chance_corrected_high"], table["informative"])}
    if not cells:
        return pd.DataFrame()
    frame = pd.DataFrame(cells)
    frame.index.names = ["method", "task"]
    return frame.reset_index()


def eavss_layers_side_by_side(runs: Mapping[str, RunDir]) -> pd.DataFrame:
    """The pooled EAVSS layers and the lowest-AVSS layers of each model (chapter 05's arms)."""
    rows = []
    for model, run in runs.items():
        if EAVSS_LAYERS.exists(run):
            layers = EAVSS_LAYERS.read(run)
            n = _n_layers(run)
            rows.append({"model": model, "EAVSS layers (pooled)": f"{layer_list(sorted(layers['pooled']))} (of {n})",
                         "lowest-AVSS layers": f"{layer_list(sorted(layers['lowest_avss']))} (of {n})",
                         "site, position": f"{layers['site']}, {layers['position']}"})
    return pd.DataFrame(rows)


def mitigation_side_by_side(runs: Mapping[str, RunDir]) -> pd.DataFrame:
    """Claim E2's primary analysis per model (chapter 05's ``E2_PRIMARY``): the pooled accuracy and ECE (%) of the
    EAVSS arm, the untouched model and the random-layer arm with 95% intervals, EAVSS's difference from each, and
    the minimum detectable difference at the run's sizes."""
    rows = []
    for model, run in runs.items():
        if not E2_PRIMARY.exists(run):
            continue
        primary = E2_PRIMARY.read(run)
        for metric, g in primary.groupby("metric", sort=False):
            row: dict[str, object] = {"model": model, "metric": metric}
            for i, r in enumerate(g.itertuples()):
                if i == 0:
                    row["EAVSS arm"] = interval(r.value, r.value_low, r.value_high, "{:.1f}")
                name = "untouched" if r.other == "base" else f"{r.other} layers"
                row[name] = interval(r.other_value, r.other_low, r.other_high, "{:.1f}")
                row[f"EAVSS − {name}"] = interval(r.diff, r.low, r.high, "{:+.1f}")
                row[f"MDE vs {name}"] = f"{r.mde:.1f}"
            rows.append(row)
    return pd.DataFrame(rows)


def comparison_markdown(runs: Mapping[str, RunDir], stage: str | os.PathLike[str]) -> str:
    """The comparison page as MyST Markdown; its figure is written beside it in ``stage``."""
    parts = ["# The models side by side",
             "Generated by the build from the artifacts of each model's run. Layers are compared at relative "
             "depth (layer ÷ (layers − 1)) because the models differ in depth; each model's chapters hold the "
             "evidence behind every number here."]
    profiles = avss_profiles(runs)
    if not profiles.empty:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        sns.lineplot(data=profiles, x="relative depth", y="AVSS (÷ max)", hue="model", marker="o", ax=ax)
        ax.set_title("AVSS over depth (chapter 03's primary variant)")
        fig.tight_layout()
        fig.savefig(Path(stage) / FIGURE, dpi=110)
        plt.close(fig)
        parts.append(f":::{{figure}} {FIGURE}\nEach model's AVSS ({', '.join(sorted(profiles['variant'].unique()))}), "
                     "normalised to its own largest layer score, against relative depth; the lowest-scoring "
                     "quarter is what AVSS prunes.\n:::")
    for title, table, note in (
            ("Layers each method removes", removed_layers(runs), "At chapter 03's ratio; random draws are left out."),
            ("Retention, chance-corrected (%)", retention_side_by_side(runs),
             "Point estimate and 95% paired-bootstrap interval; 100 means the unpruned score, 0 chance."),
            ("Hallucination-prone layers", eavss_layers_side_by_side(runs),
             "The layers chapter 04 selects on its selection half of the questions, which chapter 05 trains."),
            ("Mitigation, pooled over the data sets (%)", mitigation_side_by_side(runs),
             "Claim E2's primary analysis on each model's evaluation half: point estimate and 95% interval; "
             "a difference is EAVSS minus the other arm (higher accuracy and lower ECE are better); MDE is the "
             "smallest difference the run could detect with 80% power at the rule's level.")):
        if not table.empty:
            parts += [f"## {title}", note, table.to_markdown(index=False)]
    return "\n\n".join(parts) + "\n"
