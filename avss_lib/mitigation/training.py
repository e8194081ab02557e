"""Fine-tune only a chosen set of decoder layers with the contrastive objective, resumably.

Everything outside the chosen layers is frozen (``requires_grad_(False)``) and stays bit-identical.
The data order is a pure function of ``(seed, step)``: step ``s`` takes positions
``[s·batch_size, (s+1)·batch_size)`` of an endless stream of epoch permutations, epoch ``e`` being a
permutation drawn from a generator seeded with ``seed + e``. A checkpoint holds the trainable parameters,
the optimiser state, the step, the RNG states and the loss log, so an interrupted run resumes from its last
checkpoint and ends with bit-identical parameters to an uninterrupted run (same device, same library
versions). The learning rate is constant (no schedule), so a finished run can also be extended by calling
:func:`train` again with more ``steps``.

**Early stopping.** With ``validate_every > 0`` and ``validation`` examples (questions held out of the training
examples), the objective is evaluated on them every ``validate_every`` steps; training stops once it has not
improved for ``patience`` evaluations, and the trainable parameters of the best evaluation are restored. The
best state travels in the checkpoint, so an interrupted run still resumes exactly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd
import torch
from torch import nn
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from avss_lib.mitigation.contrastive_loss import (LOSS_KINDS, SCORE_KINDS, ContrastiveExample, LossKind, ScoreKind,
                                                  combined_loss, score_examples)
from avss_lib.core.errors import ConfigError, DataError
from avss_lib.core.io import atomic_path
from avss_lib.core.layers import find_layers

CHECKPOINT_NAME = "checkpoint.pt"
RUNNING_WINDOW = 50  # steps averaged in the progress bar


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one fine-tuning run (see :mod:`avss_lib.mitigation.contrastive_loss` for the loss)."""

    layers: tuple[int, ...]  # decoder-layer indices to train; all others are frozen
    steps: int = 100
    lr: float = 1e-5
    batch_size: int = 4
    lambda_con: float = 1.0  # 0 = LM-only ablation
    lambda_lm: float = 1.0
    temperature: float = 1.0
    margin: float = 0.1
    loss: LossKind = "infonce"
    score: ScoreKind = "sum"  # the answer score the contrastive term compares: "sum" (as evaluated) or "mean"
    grad_clip: float = 1.0  # max global L2 norm of the trainable gradients; <= 0 disables clipping
    seed: int = 0
    checkpoint_every: int = 50
    weight_decay: float = 0.0
    max_length: int = 256
    validate_every: int = 0  # steps between evaluations of the validation objective; 0: no early stopping
    patience: int = 3  # evaluations without improvement before training stops
    share_prompts: bool = True  # run each question's prompt once for all of its answers (same scores, fewer tokens)

    def validate(self, n_layers: int) -> None:
        """Raise :class:`ConfigError` naming the fix for any value the run cannot use."""
        _validate_layers(tuple(self.layers), n_layers)
        positives = {"steps": self.steps, "batch_size": self.batch_size, "checkpoint_every": self.checkpoint_every}
        if self.validate_every < 0 or self.patience < 1:
            raise ConfigError(f"validate_every={self.validate_every} must be >= 0 and patience={self.patience} >= 1")
        for name, value in positives.items():
            if value < 1:
                raise ConfigError(f"{name}={value} must be a positive integer")
        if self.lr <= 0:
            raise ConfigError(f"lr={self.lr} must be > 0 (e.g. 1e-5)")
        if self.lambda_con < 0 or self.lambda_lm < 0 or self.lambda_con + self.lambda_lm == 0:
            raise ConfigError(
                f"lambda_con={self.lambda_con}, lambda_lm={self.lambda_lm}: both must be >= 0 and not both 0"
            )
        if self.temperature <= 0:
            raise ConfigError(f"temperature={self.temperature} must be > 0")
        if self.margin < 0 or self.weight_decay < 0:
            raise ConfigError(f"margin={self.margin} and weight_decay={self.weight_decay} must be >= 0")
        if self.loss not in LOSS_KINDS:
            raise ConfigError(f"unknown loss {self.loss!r}: choose one of {LOSS_KINDS}")
        if self.score not in SCORE_KINDS:
            raise ConfigError(f"unknown score {self.score!r}: choose one of {SCORE_KINDS}")
        if self.max_length < 2:
            raise ConfigError(f"max_length={self.max_length} must be >= 2")


def _validate_layers(layers: tuple[int, ...], n_layers: int) -> None:
    if not layers:
        raise ConfigError("layers is empty: choose at least one decoder layer to train")
    if len(layers) > n_layers:
        raise ConfigError(f"k={len(layers)} layers requested but the model has only {n_layers}: lower k")
    if len(set(layers)) != len(layers):
        raise ConfigError(f"layers {list(layers)} contain duplicates: list each layer once")
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad:
        raise ConfigError(f"layer indices {bad} are outside 0..{n_layers - 1}: the model has {n_layers} layers")


@dataclass(frozen=True)
class TrainResult:
    """The loss log (one row per step, resumed steps included) and where the run started from."""

    log: pd.DataFrame
    resumed_from_step: int  # 0 for a fresh run
    checkpoint: Path | None
    best_step: int | None = None  # the step whose parameters were kept (early stopping), None without it
    steps_run: int = 0


@dataclass
class EarlyStopping:
    """The validation state of a run: best objective so far, its step and trainable parameters."""

    best_loss: float = float("inf")
    best_step: int = 0
    best_state: dict[str, torch.Tensor] | None = None
    since_best: int = 0
    stopped: bool = False

    def update(self, loss: float, step: int, trainable: dict[str, nn.Parameter], patience: int) -> None:
        if loss < self.best_loss:
            self.best_loss, self.best_step, self.since_best = loss, step, 0
            self.best_state = {name: p.detach().cpu().clone() for name, p in trainable.items()}
        else:
            self.since_best += 1
        self.stopped = self.since_best >= patience


def freeze_all_but(model: nn.Module, layers: Sequence[int]) -> dict[str, nn.Parameter]:
    """Set ``requires_grad`` on exactly the parameters of ``layers``; return them by qualified name."""
    decoder = find_layers(model)
    _validate_layers(tuple(layers), len(decoder))
    model.requires_grad_(False)
    for i in layers:
        decoder.layers[i].requires_grad_(True)
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def count_trainable(model: nn.Module, layers: Sequence[int]) -> int:
    """Number of scalar parameters in decoder ``layers`` (for matching budgets across ablation arms)."""
    decoder = find_layers(model)
    _validate_layers(tuple(layers), len(decoder))
    unique = {id(p): p for i in layers for p in decoder.layers[i].parameters()}
    return sum(p.numel() for p in unique.values())


def batch_indices(n_examples: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Example indices of (0-based) ``step``: a pure function of its arguments (see module docstring)."""
    start = step * batch_size
    epoch, offset = divmod(start, n_examples)
    indices: list[int] = []
    while len(indices) < batch_size:
        order = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        indices.extend(order[offset: offset + batch_size - len(indices)])
        epoch, offset = epoch + 1, 0
    return indices


def train(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[ContrastiveExample],
    config: TrainConfig,
    *,
    dataset: str,
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
    on_step: Callable[[dict[str, float]], None] | None = None,
    validation: Sequence[ContrastiveExample] = (),
) -> TrainResult:
    """Fine-tune ``config.layers`` of ``model`` in place on ``examples`` (named ``dataset`` in errors).

    With ``config.validate_every > 0`` the objective on ``validation`` decides early stopping (module docstring).

    With ``checkpoint_dir``, a checkpoint is written atomically every ``checkpoint_every`` steps and at the
    end, and a run finds and resumes from the checkpoint already there. ``on_step`` receives each log row
    (e.g. to stream a loss plot). Seeds torch's global RNG with ``config.seed`` (dropout draws from it;
    a resumed run restores the checkpoint's RNG state instead). The model is left in the mode it came in, with only the chosen layers
    requiring gradients.
    """
    config.validate(len(find_layers(model)))
    _check_examples(examples, config, dataset)
    if config.validate_every > 0:
        _check_examples(validation, config, f"{dataset} (validation)")
    trainable = freeze_all_but(model, config.layers)
    optimizer = torch.optim.AdamW(list(trainable.values()), lr=config.lr, weight_decay=config.weight_decay)
    path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    torch.manual_seed(config.seed)
    log: list[dict[str, float]] = []
    start = 0
    early = EarlyStopping()
    if path is not None and path.is_file():
        start, log, early = _load_checkpoint(path, trainable, optimizer, config)
    was_training = model.training
    model.train()
    try:
        _run_steps(model, tokenizer, examples, config, trainable, optimizer, log, start, path, progress, on_step,
                   validation, early)
    finally:
        model.train(was_training)
    best_step = None
    if config.validate_every > 0 and early.best_state is not None:
        with torch.no_grad():
            for name, p in trainable.items():
                p.copy_(early.best_state[name].to(p.device))
        best_step = early.best_step
    return TrainResult(log=pd.DataFrame(log), resumed_from_step=start, checkpoint=path, best_step=best_step,
                       steps_run=int(log[-1]["step"]) if log else 0)


def _check_examples(examples: Sequence[ContrastiveExample], config: TrainConfig, dataset: str) -> None:
    if not examples:
        raise DataError(f"dataset {dataset!r} has no training examples: check the split and the filters")
    if config.lambda_con > 0:
        missing = [ex.id for ex in examples if not ex.negatives]
        if missing:
            raise ConfigError(
                f"dataset {dataset!r}: {len(missing)} training examples have no negative answers "
                f"(first: {missing[:3]}) but lambda_con={config.lambda_con} > 0; drop them, supply negatives, "
                "or set lambda_con=0 for the LM-only ablation"
            )


def _run_steps(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[ContrastiveExample],
    config: TrainConfig,
    trainable: dict[str, nn.Parameter],
    optimizer: torch.optim.Optimizer,
    log: list[dict[str, float]],
    start: int,
    path: Path | None,
    progress: bool,
    on_step: Callable[[dict[str, float]], None] | None,
    validation: Sequence[ContrastiveExample],
    early: EarlyStopping,
) -> None:
    bar = tqdm(total=config.steps, initial=start, desc="train", disable=not progress)
    for step in range(start, config.steps):
        if early.stopped:
            break
        batch = [examples[i] for i in batch_indices(len(examples), config.batch_size, config.seed, step)]
        row = _train_step(model, tokenizer, batch, config, trainable, optimizer, step)
        if config.validate_every > 0 and (step + 1) % config.validate_every == 0:
            row["val_loss"] = validation_loss(model, tokenizer, validation, config)
            early.update(row["val_loss"], step + 1, trainable, config.patience)
        log.append(row)
        bar.update(1)
        bar.set_postfix(_running_means(log))
        last = step + 1 == config.steps or early.stopped
        if path is not None and ((step + 1) % config.checkpoint_every == 0 or last):
            _save_checkpoint(path, step + 1, trainable, optimizer, config, log, early)
        if on_step is not None:
            on_step(row)
    bar.close()


def validation_loss(model: nn.Module, tokenizer: PreTrainedTokenizerBase, validation: Sequence[ContrastiveExample],
                    config: TrainConfig) -> float:
    """The training objective on ``validation``, without gradients, averaged over its examples."""
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(validation), config.batch_size):
            batch = list(validation[start:start + config.batch_size])
            scored = score_examples(model, tokenizer, batch, with_negatives=config.lambda_con > 0,
                                    max_length=config.max_length, score=config.score,
                                    share_prompts=config.share_prompts)
            parts = combined_loss(scored.pos, scored.neg_scores, scored.neg_mask, loss=config.loss,
                                  lambda_con=config.lambda_con, lambda_lm=config.lambda_lm,
                                  temperature=config.temperature, margin=config.margin, score=config.score)
            total += parts.total.item() * len(batch)
    return total / len(validation)


def _train_step(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    batch: list[ContrastiveExample],
    config: TrainConfig,
    trainable: dict[str, nn.Parameter],
    optimizer: torch.optim.Optimizer,
    step: int,
) -> dict[str, float]:
    """One optimiser step; returns its log row."""
    optimizer.zero_grad(set_to_none=True)
    scored = score_examples(
        model, tokenizer, batch, with_negatives=config.lambda_con > 0, max_length=config.max_length,
        score=config.score, share_prompts=config.share_prompts)
    parts = combined_loss(
        scored.pos, scored.neg_scores, scored.neg_mask, loss=config.loss, lambda_con=config.lambda_con,
        lambda_lm=config.lambda_lm, temperature=config.temperature, margin=config.margin, score=config.score)
    parts.total.backward()
    max_norm = config.grad_clip if config.grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(list(trainable.values()), max_norm)
    optimizer.step()
    return {
        "step": step + 1,
        "loss": parts.total.item(),
        "loss_con": parts.con.item(),
        "loss_lm": parts.lm.item(),
        "grad_norm": grad_norm.item(),
        "score_pos": scored.pos.score(config.score).mean().item(),
        "score_neg": _mean_negative(scored.neg_scores, scored.neg_mask),
    }


def _mean_negative(neg_scores: torch.Tensor | None, neg_mask: torch.Tensor | None) -> float:
    if neg_scores is None or neg_mask is None:
        return float("nan")
    return neg_scores.detach()[neg_mask].mean().item()


def _running_means(log: list[dict[str, float]]) -> dict[str, str]:
    """Progress-bar postfix: mean of each loss over the last :data:`RUNNING_WINDOW` steps."""
    recent = log[-RUNNING_WINDOW:]
    return {k: f"{sum(r[k] for r in recent) / len(recent):.4f}" for k in ("loss", "loss_con", "loss_lm")}


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _resume_key(config: TrainConfig) -> dict[str, Any]:
    """Config fields that must match for a resume to continue the same run (``steps`` may grow)."""
    key = asdict(config)
    key.pop("steps")
    key["layers"] = list(config.layers)
    return key


def _save_checkpoint(
    path: Path,
    step: int,
    trainable: dict[str, nn.Parameter],
    optimizer: torch.optim.Optimizer,
    config: TrainConfig,
    log: list[dict[str, float]],
    early: EarlyStopping,
) -> None:
    state = {
        "early": asdict(early),
        "step": step,
        "trainable": {name: p.detach().cpu().clone() for name, p in trainable.items()},
        "optimizer": optimizer.state_dict(),
        "rng": _rng_state(),
        "log": list(log),
        "config": _resume_key(config),
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _load_checkpoint(
    path: Path,
    trainable: dict[str, nn.Parameter],
    optimizer: torch.optim.Optimizer,
    config: TrainConfig,
) -> tuple[int, list[dict[str, float]], EarlyStopping]:
    """Restore parameters, optimiser and RNG state from ``path``; return the step, the loss log and the
    early-stopping state."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    if int(state["step"]) > config.steps:
        raise ConfigError(
            f"checkpoint {path} is at step {state['step']}, beyond steps={config.steps}: "
            "raise steps or delete the checkpoint directory to start afresh"
        )
    if state["config"] != _resume_key(config):
        raise ConfigError(
            f"checkpoint {path} was written with a different configuration ({state['config']}): "
            "use the same config (only steps may change) or delete the checkpoint directory to start afresh"
        )
    if set(state["trainable"]) != set(trainable):
        raise ConfigError(
            f"checkpoint {path} holds parameters of a different model: delete it or pass the model it was trained on"
        )
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(state["trainable"][name])
    optimizer.load_state_dict(state["optimizer"])
    _set_rng_state(state["rng"])
    return int(state["step"]), list(state["log"]), EarlyStopping(**state.get("early", {}))
