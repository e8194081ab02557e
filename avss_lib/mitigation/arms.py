"""The arms of chapter 05: the shared training budget, the layers each arm trains, and one run per (arm, seed, draw).

All trained arms share the training examples, steps, learning rate, batch size and loss
(:class:`avss_lib.mitigation.training.TrainConfig`); they differ only in the layers trained and, for
``lm_only``, in ``lambda_con = 0``:

============== ===============================================================================
``base``       untouched model (the "before" of every comparison; not trained)
``eavss``      the top-``k`` layers of chapter 04's pooled EAVSS ranking
``random``     ``k`` layers drawn uniformly without replacement, ``random_draws`` independent draws
``lowest_avss`` the ``k`` lowest-AVSS layers of chapter 02 (rank 1 = lowest), one variant
``all``        every decoder layer (more trainable parameters: reported, not matched)
``lm_only``    the ``eavss`` layers with the LM term only (``lambda_con = 0``)
``iti``        the ``eavss`` layers, not trained: shifted at inference along chapter 04's directions
               (:mod:`avss_lib.mitigation.intervention`, strength tuned on the selection half)
============== ===============================================================================
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from torch import nn

from avss_lib.core.benchmarks import Example
from avss_lib.core.errors import ConfigError, DataError
from avss_lib.core.layers import find_layers
from avss_lib.core.models import DTYPES
from avss_lib.mitigation.training import TrainConfig, count_trainable
from avss_lib.ranking.avss import lowest_avss_layers

#: The arms, in the order tables show them.
ARMS: tuple[str, ...] = ("base", "eavss", "random", "lowest_avss", "all", "lm_only", "iti")
UNTRAINED_ARMS: tuple[str, ...] = ("base", "iti")
TRAINED_ARMS: tuple[str, ...] = tuple(a for a in ARMS if a not in UNTRAINED_ARMS)
ARM_LABELS: dict[str, str] = {"base": "untouched", "eavss": "top-k EAVSS", "random": "k random",
                              "lowest_avss": "k lowest AVSS", "all": "all layers",
                              "lm_only": "LM term only (EAVSS layers)",
                              "iti": "ITI-style shift (EAVSS layers, untrained)"}


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
    score: str = "sum"
    batch_size: int = 4
    seeds: tuple[int, ...] = (0,)
    random_draws: int = 3
    arms: tuple[str, ...] = ARMS
    max_negatives: int = 4
    train_max_length: int = 256
    share_prompts: bool = True  # training runs each question's prompt once for all of its answers (same scores)
    grad_clip: float = 1.0
    checkpoint_every: int = 50
    validate_every: int = 0  # steps between validation evaluations (early stopping); 0: train all steps
    patience: int = 3
    eval_batch_size: int = 8
    sciq_with_support: bool = False  # as chapter 04 (closed book by default)
    wikiqa_scoring: str = "pmi"
    label_convention: str = "exact_match"  # which of chapter 04's labels defines "correct"
    ppl_chars: int | None = 20_000  # characters of the WikiText-2 test split scored for perplexity (0 skips, None: all)
    ppl_max_length: int = 512
    ppl_batch_size: int = 1  # WikiText-2 windows per forward (each holds ppl_max_length x vocabulary logits)
    eval_dtype: str | None = None  # evaluate a copy in this dtype (e.g. "bfloat16"); None: the training dtype
    open_qa_shots: Mapping[str, tuple[Example, ...]] = field(default_factory=dict)  # chapter 04's few-shot examples
    iti_vectors: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # chapter 04's steering directions
    iti_alpha: float = 0.0  # the strength tuned on the selection half

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
        if self.ppl_batch_size < 1:
            raise ConfigError(f"ppl_batch_size={self.ppl_batch_size} must be >= 1 (1 on a CPU, e.g. 8 on a GPU)")
        self.train_config((0,), 0, self.lambda_con).validate(n_layers)

    def train_config(self, layers: Sequence[int], seed: int, lambda_con: float) -> TrainConfig:
        """The :class:`TrainConfig` of one run: the shared budget with that run's layers, seed and lambda_con."""
        return TrainConfig(layers=tuple(int(i) for i in layers), steps=self.steps, lr=self.lr,
                           batch_size=self.batch_size, lambda_con=lambda_con, lambda_lm=self.lambda_lm,
                           temperature=self.temperature, loss=self.loss,  # type: ignore[arg-type]
                           score=self.score,  # type: ignore[arg-type]
                           grad_clip=self.grad_clip, seed=seed, checkpoint_every=self.checkpoint_every,
                           max_length=self.train_max_length, validate_every=self.validate_every,
                           patience=self.patience, share_prompts=self.share_prompts)

    def eval_key(self) -> dict[str, Any]:
        """The evaluation options a finished run's results depend on (part of its resume key)."""
        return {"eval_batch_size": self.eval_batch_size, "sciq_with_support": self.sciq_with_support,
                "wikiqa_scoring": self.wikiqa_scoring, "label_convention": self.label_convention,
                "ppl_chars": self.ppl_chars, "ppl_max_length": self.ppl_max_length,
                "ppl_batch_size": self.ppl_batch_size, "eval_dtype": self.eval_dtype,
                "shots": {name: [e.id for e in shots] for name, shots in self.open_qa_shots.items() if shots}}

    def iti_key(self) -> dict[str, Any]:
        """What the intervention arm's results depend on beyond :meth:`eval_key` (part of its resume key only)."""
        return {"alpha": self.iti_alpha,
                "vectors": hashlib.sha256(json.dumps(self.iti_vectors, sort_keys=True).encode()).hexdigest()}


def _check_k(k: int, n_layers: int) -> None:
    if not 1 <= k <= n_layers:
        raise ConfigError(f"k={k} layers requested but the model has {n_layers}: use 1 <= k <= {n_layers}")


def eavss_top_k(eavss_layers: Mapping[str, Any], k: int, n_layers: int, source: str = "pooled") -> list[int]:
    """The first ``k`` layers of chapter 04's ``EAVSS_LAYERS`` list ``source`` ('pooled' or a data set)."""
    _check_k(k, n_layers)
    ranked = eavss_layers.get(source) if source == "pooled" else (eavss_layers.get("per_dataset") or {}).get(source)
    if ranked is None:
        raise DataError(f"chapter 04's EAVSS layers have no list {source!r}: use 'pooled' or one of "
                        f"{sorted(eavss_layers.get('per_dataset') or {})}")
    layers = [int(i) for i in ranked]
    if len(layers) < k:
        raise ConfigError(f"k={k} but chapter 04 selected only {len(layers)} {source} EAVSS layers ({layers}; "
                          f"data sets excluded there: {eavss_layers.get('excluded', [])}): lower k to <= "
                          f"{len(layers)} or re-run chapter 04 with k >= {k} and enough examples per class")
    bad = [i for i in layers[:k] if not 0 <= i < n_layers]
    if bad:
        raise DataError(f"EAVSS layers {bad} do not exist in a {n_layers}-layer model: was chapter 04 run on another model?")
    return layers[:k]


def lowest_avss_arm_layers(avss_scores: pd.DataFrame, variant: str, k: int, n_layers: int) -> list[int]:
    """:func:`avss_lib.ranking.avss.lowest_avss_layers` of a ranking checked to score this model's layers."""
    _check_k(k, n_layers)
    scored = int((avss_scores["variant"] == variant).sum())
    if scored and scored != n_layers:
        raise DataError(f"chapter 02 scored {scored} layers but the model has {n_layers}: re-run 01-02 on this model")
    return lowest_avss_layers(avss_scores, variant, k)


def random_layers(n_layers: int, k: int, draw: int, seed: int = 0) -> list[int]:
    """Draw ``draw`` of ``k`` distinct layers out of ``n_layers``, uniformly; a pure function of its arguments."""
    _check_k(k, n_layers)
    return sorted(random.Random(f"random-layers-{seed}-{draw}").sample(range(n_layers), k))


def arm_layers(settings: MitigationSettings, n_layers: int, eavss_layers: Mapping[str, Any] | None,
               avss_scores: pd.DataFrame | None, avss_variant: str, eavss_source: str = "pooled",
               layer_seed: int = 0) -> dict[str, list[tuple[int, ...]]]:
    """The layer set(s) of every arm in ``settings.arms`` (``random`` has one per draw)."""
    settings.validate(n_layers)
    k, out = settings.k, {}
    for arm in settings.arms:
        if arm == "base":
            out[arm] = [()]
        elif arm in ("eavss", "lm_only", "iti"):
            if eavss_layers is None:
                raise DataError(f"arm {arm!r} needs chapter 04's EAVSS layers")
            out[arm] = [tuple(eavss_top_k(eavss_layers, k, n_layers, eavss_source))]
        elif arm == "random":
            out[arm] = [tuple(random_layers(n_layers, k, d, layer_seed)) for d in range(settings.random_draws)]
        elif arm == "lowest_avss":
            if avss_scores is None:
                raise DataError("arm 'lowest_avss' needs chapter 02's AVSS scores")
            out[arm] = [tuple(lowest_avss_arm_layers(avss_scores, avss_variant, k, n_layers))]
        elif arm == "all":
            out[arm] = [tuple(range(n_layers))]
    return out


@dataclass(frozen=True)
class ArmRun:
    """One training run (or the untouched model): which arm, layers, seed and contrastive weight."""

    run_id: str
    arm: str
    layers: tuple[int, ...]
    seed: int | None
    draw: int | None
    lambda_con: float


def plan_runs(settings: MitigationSettings, layers: Mapping[str, list[tuple[int, ...]]]) -> list[ArmRun]:
    """One :class:`ArmRun` per (arm, seed, draw); ``base`` runs once."""
    runs = []
    for arm in settings.arms:
        if arm == "base":
            runs.append(ArmRun("base", "base", (), None, None, settings.lambda_con))
            continue
        if arm == "iti":  # untrained: one run, whatever the seeds
            runs.append(ArmRun("iti", "iti", tuple(layers[arm][0]), None, None, 0.0))
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
    """Arms, layers and trainable-parameter counts (the ``ARMS`` artifact: the budget the book reports)."""
    n_layers = len(find_layers(model))
    rows = []
    for r in runs:
        rows.append({"run_id": r.run_id, "arm": r.arm, "seed": r.seed, "draw": r.draw,
                     "layers": list(r.layers), "n_layers_trained": len(r.layers) if r.arm in TRAINED_ARMS else 0,
                     "trainable_params": count_trainable(model, r.layers) if r.arm in TRAINED_ARMS else 0,
                     "lambda_con": r.lambda_con if r.arm in TRAINED_ARMS else float("nan"),
                     "model_layers": n_layers})
    return pd.DataFrame(rows)
