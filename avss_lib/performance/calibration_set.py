"""The appendix's base calibration set: chapter 01's data set, padding and statistics, its own sizes.

The appendix draws its own, smaller set of calibration paragraphs (its ``n_samples``, ``seed``, ``max_length``
and ``batch_size``) from the data set and split chapter 01 calibrated on, padded as chapter 01 padded, and
collects the statistics chapter 01 collected. Those settings come from chapter 01's ``CALIBRATION`` artifact
(:data:`avss_lib.core.artifacts.CALIBRATION`); without it, from the defaults.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from torch import Tensor

from avss_lib.core import activation_stats as activations
from avss_lib.core import calibration_text as calibration
from avss_lib.core.artifacts import CALIBRATION
from avss_lib.performance.parameter_checks import check_positive_int

#: Where the settings come from when the run has no chapter 01 calibration record.
DEFAULTS_SOURCE = "defaults"
DEFAULT_DATASET, DEFAULT_SPLIT = calibration.DEFAULT_CALIBRATION_SOURCE


def calibration_settings(record: Mapping[str, Any] | None) -> dict[str, Any]:
    """Data set, split, padding and statistics spec of chapter 01's calibration record, or the defaults.

    ``record`` is the ``CALIBRATION`` artifact (data set in ``benchmark``, ``split``, ``padding`` and
    ``statistics: {sites, abs_thresholds, rel_taus}``); a missing key takes its default. Returns a dict with
    ``dataset``, ``split``, ``padding``, ``spec`` (a :class:`~avss_lib.core.activation_stats.StatsSpec`) and
    ``source`` (the artifact's ``<stage>/<file>``, or :data:`DEFAULTS_SOURCE`).
    """
    if not record:
        return {"dataset": DEFAULT_DATASET, "split": DEFAULT_SPLIT, "padding": "max_length", "spec": activations.StatsSpec(),
                "source": DEFAULTS_SOURCE}
    statistics = record.get("statistics") or {}
    default = activations.StatsSpec()
    spec = activations.StatsSpec(tuple(statistics.get("sites", default.sites)),
                                 tuple(statistics.get("abs_thresholds", default.abs_thresholds)),
                                 tuple(statistics.get("rel_taus", default.rel_taus)))
    return {"dataset": record.get("benchmark", DEFAULT_DATASET), "split": record.get("split", DEFAULT_SPLIT),
            "padding": record.get("padding", "max_length"), "spec": spec,
            "source": f"{CALIBRATION.stage}/{CALIBRATION.filename}"}


def base_batches(tokenizer: Any, *, data_root: str | None, n_samples: int, seed: int, max_length: int,
                 batch_size: int, dataset: str = DEFAULT_DATASET, split: str = DEFAULT_SPLIT,
                 padding: str = "max_length") -> tuple[list[dict[str, Tensor]], dict[str, Any]]:
    """The base calibration batches (``n_samples`` seeded paragraphs, padded) and their data provenance."""
    check_positive_int("n_samples", n_samples)
    texts, provenance = calibration.load_calibration_texts(dataset, split, n_samples, seed, data_root)
    batches = calibration.make_batches(tokenizer, texts, max_length=max_length, batch_size=batch_size, padding=padding)
    return batches, provenance


def token_counts(batches: Sequence[Mapping[str, Tensor]]) -> tuple[int, int]:
    """(non-padding tokens, all positions including padding) of ``batches``."""
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    positions = sum(int(b["attention_mask"].numel()) for b in batches)
    return tokens, positions


def repeat_batches(batches: Sequence[Mapping[str, Tensor]], multiple: int) -> Iterator[Mapping[str, Tensor]]:
    """The batches ``multiple`` times in a row (the same tensor objects: no extra memory)."""
    for _ in range(check_positive_int("token multiple", multiple)):
        yield from batches
