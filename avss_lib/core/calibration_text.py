"""Calibration text: which samples the activation statistics are computed on, and how they are batched.

By default the samples are WikiText-2 paragraphs (non-empty lines that are not ``= Heading =`` lines), a
seeded subset kept in file order, each truncated to ``max_length`` tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor
from transformers import PreTrainedTokenizerBase

from avss_lib.core.benchmarks import load_wikitext2_text, subsample
from avss_lib.core.errors import ConfigError

PADDING_MODES = ("longest", "max_length")
CALIBRATION_DATASETS = ("wikitext2",)


def wikitext_paragraphs(text: str) -> list[str]:
    """Non-empty, non-heading lines of a tokenized WikiText file, stripped."""
    lines = (line.strip() for line in text.splitlines())
    return [ln for ln in lines if ln and not (ln.startswith("=") and ln.endswith("="))]


def load_calibration_texts(
    dataset: str, split: str, n_samples: int, seed: int, data_root: str | None = None
) -> tuple[list[str], dict[str, Any]]:
    """A seeded subset of ``n_samples`` calibration samples (kept in file order) and its provenance."""
    if dataset not in CALIBRATION_DATASETS:
        raise ConfigError(f"unknown calibration dataset {dataset!r}: choose one of {', '.join(CALIBRATION_DATASETS)}")
    if n_samples <= 0:
        raise ConfigError(f"the calibration set is empty (n_samples={n_samples}): use n_samples >= 1")
    text, provenance = load_wikitext2_text(split, data_root)
    samples = wikitext_paragraphs(text)
    if n_samples > len(samples):
        raise ConfigError(f"n_samples={n_samples} but {dataset}/{split} has only {len(samples)} paragraphs: lower n_samples")
    chosen = subsample(samples, n_samples, seed)
    return chosen, {**provenance, "unit": "paragraph", "n_available": len(samples), "n_samples": n_samples, "seed": seed}


def make_batches(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    max_length: int = 128,
    batch_size: int = 8,
    padding: str = "max_length",
) -> list[dict[str, Tensor]]:
    """Tokenize ``texts`` into right-padded batches with attention masks.

    ``padding='max_length'`` pads every sample to ``max_length`` (the authors' convention, which makes the
    padded pooled variance depend on it); ``'longest'`` pads to the longest sample of each batch.
    """
    if padding not in PADDING_MODES:
        raise ConfigError(f"unknown padding {padding!r}: use one of {', '.join(PADDING_MODES)}")
    if max_length < 2 or batch_size < 1:
        raise ConfigError(f"max_length must be >= 2 and batch_size >= 1 (got {max_length}, {batch_size})")
    if not texts:
        raise ConfigError("the calibration set is empty: give at least one non-empty text")
    side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        return [
            dict(tokenizer(list(texts[i : i + batch_size]), return_tensors="pt", padding=padding,
                           truncation=True, max_length=max_length))
            for i in range(0, len(texts), batch_size)
        ]
    finally:
        tokenizer.padding_side = side
