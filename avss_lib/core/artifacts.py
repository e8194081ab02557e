"""Every artifact a chapter writes, defined once: where it lives in a run, its format, its columns.

A run folder holds one sub-folder per stage (notebook), e.g. ``data/runs/default/03_pruning/``. Each
:class:`Artifact` below names its stage, its file and, for tables, the columns a reader may rely on; its
:meth:`Artifact.write` and :meth:`Artifact.read` are the only way the library and the notebooks store and load
it. Tables are Parquet or CSV (by suffix); columns that hold lists of layer numbers (``list_columns``) are
written as space-separated integers and read back as ``list[int]``; JSON artifacts are dicts or lists.
Writes are atomic (:func:`avss_lib.core.io.atomic_path`); a missing or damaged artifact is a
:class:`~avss_lib.core.errors.DataError` naming the stage that writes it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from avss_lib.core.errors import DataError
from avss_lib.core.io import read_json, read_table, write_json, write_table

RunDir = str | os.PathLike[str]

#: The stages (notebook folders) in the order the study runs them.
STAGES: tuple[str, ...] = ("01_activations", "02_avss_ranking", "03_pruning", "04_hallucination_layers",
                           "05_mitigation", "06_performance")


def stage_dir(run_dir: RunDir, stage: str) -> Path:
    """The folder of one stage inside a run folder."""
    if stage not in STAGES:
        raise DataError(f"unknown stage {stage!r}: the stages are {', '.join(STAGES)}")
    return Path(run_dir) / stage


def parse_layers(value: Any) -> list[int]:
    """A layer list as written in a table cell ("3 7 12", "", a list, or NaN for none) -> ``[3, 7, 12]``."""
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    if value is None or (isinstance(value, float) and value != value):
        return []
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        listed = value.tolist()
        return [int(v) for v in listed] if isinstance(listed, list) else [int(listed)]
    text = str(value).replace(",", " ").strip()
    return [int(v) for v in text.split()] if text else []


def format_layers(layers: Sequence[int]) -> str:
    """A layer list as stored in a table cell: ``[3, 7, 12]`` -> ``"3 7 12"``."""
    return " ".join(str(int(v)) for v in layers)


@dataclass(frozen=True)
class Artifact:
    """One file a stage writes."""

    stage: str
    filename: str
    description: str
    columns: tuple[str, ...] = ()  # columns every reader may rely on (tables only)
    list_columns: tuple[str, ...] = ()  # columns holding lists of layer indices

    @property
    def is_table(self) -> bool:
        return self.filename.endswith((".parquet", ".csv"))

    def path(self, run_dir: RunDir) -> Path:
        """Where this artifact lives in ``run_dir``."""
        return stage_dir(run_dir, self.stage) / self.filename

    def exists(self, run_dir: RunDir) -> bool:
        return self.path(run_dir).is_file()

    def write(self, value: Any, run_dir: RunDir) -> Path:
        """Write ``value`` (a DataFrame for tables, JSON-ready data otherwise) atomically; return its path."""
        path = self.path(run_dir)
        if not self.is_table:
            return write_json(value, path)
        if not isinstance(value, pd.DataFrame):
            raise TypeError(f"{self.filename} is a table: pass a pandas DataFrame, not {type(value).__name__}")
        self._check_columns(value, "writing")
        frame = value.copy()
        for column in self.list_columns:
            frame[column] = frame[column].map(lambda v: format_layers(parse_layers(v)))
        return write_table(frame, path)

    def read(self, run_dir: RunDir) -> Any:
        """Read the artifact (a DataFrame with list columns decoded, or JSON data), checking its columns."""
        path = self.path(run_dir)
        if not path.is_file():
            raise DataError(f"artifact {path} does not exist: run stage {self.stage} first")
        if not self.is_table:
            return read_json(path)
        frame = (pd.read_csv(path, keep_default_na=False, na_values=[""], dtype={c: str for c in self.list_columns})
                 if path.suffix == ".csv" and self.list_columns else read_table(path))
        self._check_columns(frame, "reading")
        for column in self.list_columns:
            frame[column] = frame[column].map(parse_layers)
        return frame

    def _check_columns(self, frame: pd.DataFrame, doing: str) -> None:
        missing = [c for c in (*self.columns, *self.list_columns) if c not in frame.columns]
        if missing:
            fix = f"re-run stage {self.stage}" if doing == "reading" else "compute them before writing"
            raise DataError(f"{doing} {self.stage}/{self.filename}: columns {missing} are missing: {fix}")


def verdict(stage: str) -> Artifact:
    """The verdict rows a claim-testing stage writes (see :mod:`avss_lib.core.verdicts`)."""
    return Artifact(stage, "verdict.json", "the claim verdicts of this stage, as data")


def provenance(stage: str) -> Artifact:
    """What a stage ran on that is not a parameter: model file and hash, data files and hashes, timings."""
    return Artifact(stage, "provenance.json", "model and data provenance and timings of this stage")


# ------------------------------------------------------------------------------------------ 01 activations

ACTIVATION_STATS = Artifact(
    "01_activations", "stats.parquet",
    "streamed per-(site, layer) activation statistics on the calibration tokens",
    columns=("site", "layer", "hidden", "n_samples", "n_tokens", "n_positions", "pooled_var_padded",
             "pooled_var_masked", "elem_var", "mean_abs"))
CALIBRATION = Artifact(
    "01_activations", "calibration.json",
    "the calibration set: data set, split, samples, seed, tokenisation and the file's hash")
PROVENANCE_01 = provenance("01_activations")

# ------------------------------------------------------------------------------------------ 02 ranking

AVSS_SCORES = Artifact(
    "02_avss_ranking", "avss_scores.parquet", "per-layer variance, sparsity and AVSS of every variant",
    columns=("variant", "layer", "variance", "sparsity", "avss", "avss_norm", "undefined", "rank"))
SELECTIONS = Artifact(
    "02_avss_ranking", "selections.csv", "the layers each selection rule prunes for each variant",
    columns=("variant", "rule", "n_pruned", "n_undefined_scores", "tie_broken_arbitrarily"), list_columns=("layers",))

# ------------------------------------------------------------------------------------------ 03 pruning

METHOD_SCORES = Artifact("03_pruning", "method_scores.parquet", "per-layer score of every ranking method",
                         columns=("method", "layer", "score"))
PRUNED_SETS = Artifact("03_pruning", "pruned_sets.csv", "the layers each method removes at each ratio",
                       columns=("method", "family", "ratio", "k", "fraction_removed", "arbitrary", "set_id"),
                       list_columns=("layers",))
RESULTS = Artifact("03_pruning", "results.parquet", "every metric of every pruned set and task with its CI",
                   columns=("set_id", "task_key", "task", "metric", "value", "low", "high"))
PER_EXAMPLE = Artifact("03_pruning", "per_example.parquet", "the primary metric per example (num / den)",
                       columns=("set_id", "task_key", "task", "id", "num", "den"))
RETENTION = Artifact("03_pruning", "retention.csv",
                     "score, % of the unpruned score and its chance-corrected form per method and task",
                     columns=("method", "task_key", "task", "metric", "value", "low", "high", "retention",
                              "retention_low", "retention_high", "chance", "chance_corrected",
                              "chance_corrected_low", "chance_corrected_high", "informative"))
COMPARISON = Artifact("03_pruning", "comparison.csv",
                      "AVSS minus each baseline per task, paired CI, bootstrap p-value and its Holm adjustment",
                      columns=("avss", "baseline", "task_key", "task", "difference", "low", "high", "p_value",
                               "p_holm", "verdict"))
CURVE = Artifact("03_pruning", "curve.csv", "primary metric against the fraction of layers removed",
                 columns=("method", "task_key", "metric", "fraction_removed", "value"))
SPEARMAN = Artifact("03_pruning", "spearman.csv", "Spearman's rho between the methods' layer scores",
                    columns=("method",))
JACCARD = Artifact("03_pruning", "jaccard.csv", "Jaccard overlap of the methods' pruned sets", columns=("method",))
STABILITY = Artifact("03_pruning", "ranking_stability.csv",
                     "each calibration-dependent ranking recomputed on disjoint calibration folds, pair by pair",
                     columns=("method", "fold_a", "fold_b", "spearman", "jaccard"))
SPEED = Artifact("03_pruning", "speed.json", "forward time of the pruned against the unpruned model")
PRECISION = Artifact("03_pruning", "precision.csv", "the unpruned model in the run's dtype against float32",
                     columns=("task_key", "metric", "value", "value_float32", "difference"))
VERDICT_03 = verdict("03_pruning")
PROVENANCE_03 = provenance("03_pruning")


def pruning_checkpoint_dir(run_dir: RunDir) -> Path:
    """The folder of stage 03's per-set evaluation checkpoints (one file per evaluated layer set, resumable)."""
    return stage_dir(run_dir, "03_pruning") / "_sets"


#: Sub-folders of a stage whose files name their own validity key (a hash of the inputs and the scoring code of a
#: pruned set; a mitigation run's key, :func:`avss_lib.mitigation.runs.run_key`): the pipeline keeps them when it
#: clears a stage for a run of other parameters or code.
SELF_KEYED: dict[str, tuple[str, ...]] = {"03_pruning": ("_sets",), "05_mitigation": ("runs",)}

# ------------------------------------------------------------------------------------------ 04 hallucination

ANSWERS = Artifact("04_hallucination_layers", "answers.parquet", "the model's answers, labelled",
                   columns=("dataset", "id", "question", "prediction", "confidence", "correct",
                            "correct_exact_match", "correct_alias_containment", "prompt", "choice", "gold"))
QUESTION_SPLIT = Artifact("04_hallucination_layers", "question_split.parquet",
                          "the question-disjoint selection / evaluation split, made before any layer is chosen",
                          columns=("dataset", "id", "question", "question_norm", "group", "split"))
EXAMPLE_STATS = Artifact("04_hallucination_layers", "example_stats.parquet",
                         "per-example sufficient statistics per (site, layer)",
                         columns=("dataset", "example_id", "site", "layer", "n", "sum", "m2", "sum_abs",
                                  "n_tokens", "pooled_var"))
EAVSS_SCORES = Artifact("04_hallucination_layers", "eavss_scores.parquet",
                        "HSAV, HSS, EAVSS, null p-values and probe AUROC per data set and layer",
                        columns=("dataset", "layer", "hsav", "hss", "eavss", "score", "rank", "p_value",
                                 "p_value_max", "probe_auroc"))
E1_SUMMARY = Artifact("04_hallucination_layers", "e1_summary.parquet",
                      "per data set: class sizes, top-k layers, null, stability and probe agreement (E1's inputs)",
                      columns=("dataset", "n_hallucinated", "n_correct", "usable", "max_abs_eavss"),
                      list_columns=("top_k",))
E1_SECONDARY = Artifact("04_hallucination_layers", "e1_secondary.parquet",
                        "E1's inputs at the secondary (exploratory) token position, with the length controls",
                        columns=("dataset", "n_hallucinated", "n_correct", "usable", "max_abs_eavss", "position"),
                        list_columns=("top_k",))
CAUSAL_ANSWERS = Artifact("04_hallucination_layers", "causal_answers.parquet",
                          "the causal check's answers: evaluation-half questions asked with layers removed",
                          columns=("set", "draw", "dataset", "id", "correct"), list_columns=("layers",))
CAUSAL_CHECK = Artifact("04_hallucination_layers", "causal_check.csv",
                        "hallucination rate with the top-k, bottom-k or k random EAVSS layers removed",
                        columns=("set", "layers", "draws", "n", "hallucination_rate", "low", "high", "change"))
E1_CONVENTIONS = Artifact("04_hallucination_layers", "e1_conventions.parquet",
                          "E1's inputs for the generative data sets under both label conventions",
                          columns=("dataset", "convention", "n_hallucinated", "n_correct", "usable", "max_abs_eavss"),
                          list_columns=("top_k",))
STEERING_DIRECTIONS = Artifact("04_hallucination_layers", "steering_directions.json",
                               "per layer: the selection half's correct-minus-hallucinated direction and its scale")
EAVSS_LAYERS = Artifact("04_hallucination_layers", "eavss_layers.json",
                        "the top-k EAVSS layers per data set and pooled, and the lowest-AVSS layers")
VERDICT_04 = verdict("04_hallucination_layers")
PROVENANCE_04 = provenance("04_hallucination_layers")

# ------------------------------------------------------------------------------------------ 05 mitigation

TRAIN_EXAMPLES = Artifact("05_mitigation", "train_examples.parquet", "the contrastive training examples",
                          columns=("dataset", "id", "question", "prompt", "positive", "negatives", "hallucinated",
                                   "usable"))
ARMS = Artifact("05_mitigation", "arms.csv", "every run's arm, layers and trainable parameters",
                columns=("run_id", "arm", "seed", "draw", "n_layers_trained", "trainable_params"),
                list_columns=("layers",))
MITIGATION_PER_EXAMPLE = Artifact("05_mitigation", "per_example.parquet", "every run's held-out answers",
                                  columns=("run_id", "arm", "dataset", "id", "correct", "confidence"))
TRAIN_LOGS = Artifact("05_mitigation", "train_logs.parquet", "the loss per step of every trained run",
                      columns=("run_id", "arm", "step"))
RUNS = Artifact("05_mitigation", "runs.csv", "every run's perplexity and seconds",
                columns=("run_id", "arm", "seed", "draw", "trainable_params", "perplexity", "train_seconds",
                         "eval_seconds", "reused"), list_columns=("layers",))
ARM_METRICS = Artifact("05_mitigation", "arm_metrics.csv", "each arm's metrics with CIs and change from base",
                       columns=("arm", "dataset", "metric", "value", "low", "high", "diff", "diff_low", "diff_high"))
RUN_METRICS = Artifact("05_mitigation", "run_metrics.csv", "each run's metrics with CIs",
                       columns=("run_id", "arm", "dataset", "metric", "value", "low", "high"))
COMPARISONS = Artifact("05_mitigation", "comparisons.csv", "EAVSS arm against the control arms",
                       columns=("dataset", "metric", "other", "diff", "low", "high", "beats", "beaten"))
ITI_GRID = Artifact("05_mitigation", "iti_grid.csv", "the intervention strengths tried on the selection half",
                    columns=("alpha", "accuracy", "n"))
E2_PRIMARY = Artifact("05_mitigation", "e2_primary.csv",
                      "claim E2's primary analysis: EAVSS against the untouched and random arms, pooled, with power",
                      columns=("metric", "other", "value", "other_value", "diff", "low", "high", "rel_change", "se",
                               "mde", "n"))
VERDICT_05 = verdict("05_mitigation")
PROVENANCE_05 = provenance("05_mitigation")


def mitigation_run_dir(run_dir: RunDir, run_id: str) -> Path:
    """The folder of one training run of stage 05 (its results, log and resumable checkpoint)."""
    return stage_dir(run_dir, "05_mitigation") / "runs" / run_id


RUN_PER_EXAMPLE = "per_example.parquet"  # inside mitigation_run_dir
RUN_TRAIN_LOG = "train_log.parquet"
RUN_RESULT = "result.json"  # written last: marks the run finished
RUN_KEY = "key.json"  # the settings of the run a checkpoint belongs to
RUN_CHECKPOINT = "checkpoint"  # the folder of an unfinished run's resumable training checkpoint


def finished_mitigation_runs(run_dir: RunDir) -> dict[str, dict[str, Any]]:
    """Each finished training run of stage 05 (its :data:`RUN_RESULT`: seconds, steps, perplexity), by run id in
    name order, also while the stage itself is unfinished; runs still training are absent."""
    runs = stage_dir(run_dir, "05_mitigation") / "runs"
    return {p.parent.name: read_json(p) for p in sorted(runs.glob(f"*/{RUN_RESULT}"))}


# ------------------------------------------------------------------------------------------ 06 performance

OVERHEAD = Artifact("06_performance", "overhead.json", "statistics pass against a plain forward")
MEMORY = Artifact("06_performance", "memory.csv", "peak RSS of each collector at each token multiple",
                  columns=("collector", "multiple", "tokens", "positions", "status", "peak_rss_mib", "seconds",
                           "naive_estimate_mib"))
VARIANCE_AGREEMENT = Artifact("06_performance", "variance_agreement.csv", "streaming against naive variances",
                              columns=("layer", "statistic", "streaming", "naive", "relative_gap"))
LOAD = Artifact("06_performance", "load.json", "first against cached model load")
SPEEDUP = Artifact("06_performance", "speedup.csv", "pruned-model speed-up against 1/(1-k/n)",
                   columns=("ratio", "n_layers", "n_removed", "removed_fraction", "batch_shape", "repeats",
                            "seconds_unpruned", "seconds_pruned", "measured_speedup", "theoretical_speedup",
                            "nominal_theoretical_speedup", "estimated_speedup_params", "measured_over_theoretical"),
                   list_columns=("layers_removed",))
NOTEBOOK_TIMES = Artifact("06_performance", "notebook_times.csv", "wall time and peak RSS per notebook",
                          columns=("notebook", "seconds", "share", "peak_rss_mib", "finished", "sizes"))
PROVENANCE_06 = provenance("06_performance")

# ------------------------------------------------------------------------------------------ the pipeline's own

DONE = "_done.json"  # the pipeline's record of a finished stage: fingerprint, parameters, seconds, peak RSS
STARTED = "_started.json"  # the fingerprint of the run that may have left checkpoints
MODELS = "models.json"  # in a run covering several models: each model's sub-folder and spec, in the run's order


def done_record(run_dir: RunDir, stage: str) -> Path:
    """Where the pipeline records that ``stage`` finished (its parameters, wall time and peak memory)."""
    return stage_dir(run_dir, stage) / DONE


def finished_stages(run_dir: RunDir) -> dict[str, dict[str, Any]]:
    """Each finished stage's record (:func:`done_record`: parameters, seconds, peak memory, finish time), in stage
    order; stages that have not finished are absent."""
    return {stage: read_json(path) for stage in STAGES if (path := done_record(run_dir, stage)).is_file()}


def started_record(run_dir: RunDir, stage: str) -> Path:
    """Where the pipeline records the fingerprint of a started run of ``stage`` (whose checkpoints may resume)."""
    return stage_dir(run_dir, stage) / STARTED


def write_models(run_dir: RunDir, models: dict[str, str]) -> Path:
    """Record that ``run_dir`` covers several models, one run folder each: ``{sub-folder: model spec}``."""
    return write_json({"models": [{"folder": folder, "spec": spec} for folder, spec in models.items()]},
                      Path(run_dir) / MODELS)


def read_models(run_dir: RunDir) -> dict[str, str] | None:
    """``{sub-folder: model spec}`` of a run covering several models, or None for a one-model run."""
    path = Path(run_dir) / MODELS
    if not path.is_file():
        return None
    try:
        return {m["folder"]: m["spec"] for m in read_json(path)["models"]}
    except (KeyError, TypeError) as exc:
        raise DataError(f"{path} is damaged ({exc!r}): re-run `avss run --models ...` to rewrite it") from exc


def all_artifacts() -> list[Artifact]:
    """Every artifact defined in this module, in stage order."""
    found = [v for v in globals().values() if isinstance(v, Artifact)]
    return sorted(found, key=lambda a: (STAGES.index(a.stage), a.filename))
