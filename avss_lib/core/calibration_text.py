"""Calibration text: which samples the activation statistics are computed on, and how they are batched.

By default the samples are WikiText-2 paragraphs (non-empty lines that are not ``= Heading =`` lines), a
seeded subset kept in file order, each truncated to ``max_length`` tokens. Chapter 01 records the set it used
(:func:`calibration_record`, the ``calibration.json`` artifact) and later chapters rebuild the very same
batches from that record (:func:`calibration_batches`).

Whatever is chosen on calibration text (layer rankings, the removal oracle) must never see the text it is
scored on: :func:`check_disjoint` refuses a calibration source (benchmark and split) that is also evaluated.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor
from transformers import PreTrainedTokenizerBase

from avss_lib.core.benchmarks import load_wikitext2_text, subsample
from avss_lib.core.errors import ConfigError, DataError

PADDING_MODES = ("longest", "max_length")
CALIBRATION_DATASETS = ("wikitext2",)
#: Where calibration text comes from unless a chapter says otherwise: WikiText-2's validation split, so the
#: test split the pruning chapter scores perplexity on is never seen by a ranking.
DEFAULT_CALIBRATION_SOURCE: tuple[str, str] = ("wikitext2", "validation")


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


def text_source(provenance: Mapping[str, Any]) -> tuple[str, str]:
    """The ``(benchmark, split)`` a calibration record or a benchmark's provenance was read from."""
    try:
        return str(provenance["benchmark"]), str(provenance["split"])
    except KeyError as exc:
        raise DataError(f"the provenance {dict(provenance)} does not name its benchmark and split: "
                        "re-run the chapter that wrote it") from exc


def check_disjoint(calibration: Mapping[str, Any], evaluated: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Raise :class:`ConfigError` when the calibration text (a :func:`calibration_record`) comes from the same
    benchmark and split as an evaluated one (``evaluated``: task key -> benchmark provenance); else return the
    evaluated ``benchmark/split`` sources, sorted, for the record."""
    source = text_source(calibration)
    overlapping = sorted(key for key, provenance in evaluated.items() if text_source(provenance) == source)
    if overlapping:
        raise ConfigError(f"chapter 01 calibrated on {source[0]}/{source[1]}, which is also evaluated "
                          f"({', '.join(overlapping)}): the ranking would see the scored text. Calibrate on "
                          f"another split (calibration_split: validation) and re-run chapter 01")
    return sorted({"/".join(text_source(p)) for p in evaluated.values()})


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


def calibration_record(provenance: Mapping[str, Any], batches: Sequence[Mapping[str, Tensor]], *, max_length: int,
                       batch_size: int, padding: str, statistics: Mapping[str, Any]) -> dict[str, Any]:
    """What chapter 01 calibrated on: the texts' provenance (data set, split, samples, seed, file hash), how they
    were tokenised and batched, the token counts, and which ``statistics`` (sites, thresholds) were collected."""
    return {**provenance, "max_length": max_length, "batch_size": batch_size, "padding": padding,
            "n_batches": len(batches), "n_tokens": int(sum(int(b["attention_mask"].sum()) for b in batches)),
            "statistics": dict(statistics)}


def recorded_texts(record: Mapping[str, Any], data_root: str | None) -> list[str]:
    """The calibration samples of a :func:`calibration_record`, reloaded; raises :class:`DataError` when the
    calibration file's sha256 differs from the recorded one."""
    texts, provenance = load_calibration_texts(record["benchmark"], record["split"], record["n_samples"],
                                               record["seed"], data_root)
    expected, found = record.get("sha256"), provenance.get("sha256")
    if expected and found and expected != found:
        raise DataError(f"the calibration file differs from the one chapter 01 used ({found} vs {expected}): "
                        "point data_root at the same data, or re-run chapter 01")
    return texts


def calibration_batches(record: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase, *, data_root: str | None,
                        n_samples: int | None = None) -> list[dict[str, Tensor]]:
    """The batches of a :func:`calibration_record`, rebuilt; ``n_samples`` keeps only the first samples (a prefix
    of the same tokens). Raises :class:`DataError` when the calibration file's sha256 differs from the recorded one.
    """
    texts = recorded_texts(record, data_root)
    if n_samples is not None:
        if not 1 <= n_samples <= len(texts):
            raise ConfigError(f"n_samples={n_samples} but chapter 01 used {len(texts)} calibration samples: "
                              f"choose 1..{len(texts)} (or None for all)")
        texts = texts[:n_samples]
    return make_batches(tokenizer, texts, max_length=record["max_length"], batch_size=record["batch_size"],
                        padding=record["padding"])


def calibration_folds(record: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase, *, data_root: str | None,
                      n_folds: int, n_samples: int | None = None) -> list[list[dict[str, Tensor]]]:
    """The samples of a :func:`calibration_record` dealt into ``n_folds`` disjoint folds (sample ``i`` goes to
    fold ``i mod n_folds``, so each fold spans the file), each batched as chapter 01 batched them;
    ``n_samples`` keeps the first samples of each fold. Raises :class:`ConfigError` for fewer than 2 folds or
    folds without a sample."""
    texts = recorded_texts(record, data_root)
    if not 2 <= n_folds <= len(texts):
        raise ConfigError(f"n_folds={n_folds} disjoint calibration folds are not possible from {len(texts)} samples: "
                          f"choose 2..{len(texts)}")
    folds = [texts[f::n_folds][:n_samples] for f in range(n_folds)]
    return [make_batches(tokenizer, fold, max_length=record["max_length"], batch_size=record["batch_size"],
                         padding=record["padding"]) for fold in folds]
