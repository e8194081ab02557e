"""Per-layer linear probes for hallucination (the SAPLMA / ITI-style baseline for EAVSS rankings).

For each layer, a standardised L2-regularised logistic regression predicts the hallucination label from
that layer's per-example features (e.g. the mean-pooled or last-token activation); its quality is the
cross-validated AUROC over stratified folds with a fixed seed. A layer whose activations carry
hallucination information gets an AUROC well above 0.5; agreement between the probe's layer ranking and
the EAVSS ranking is Spearman's rho over layers (``probe_eavss_rho`` of
:func:`avss_lib.hallucination.analysis.summary_table`).
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Mapping

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from avss_lib.core.errors import ConfigError, DataError
from avss_lib.hallucination.group_stats import SmallClassWarning


def make_probe(c: float = 1.0, max_iter: int = 2000) -> Pipeline:
    """StandardScaler followed by L2 logistic regression with inverse regularisation strength ``c``."""
    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter))


def _check_inputs(features: Mapping[Hashable, np.ndarray], labels: np.ndarray, n_splits: int) -> np.ndarray:
    """Validate shapes and class sizes; return the labels as a boolean array."""
    if n_splits < 2:
        raise ConfigError(f"n_splits={n_splits} must be at least 2")
    y = np.asarray(labels)
    if y.ndim != 1 or not np.isin(y, [0, 1]).all():
        raise DataError("labels must be a 1-D array of 0/1 or booleans (1 = hallucinated)")
    if not features:
        raise DataError("no layers given: pass {layer: (n_examples x hidden) array}")
    for layer, x in features.items():
        if np.ndim(x) != 2 or len(x) != len(y):
            raise DataError(f"features of layer {layer!r} have shape {np.shape(x)}, expected "
                            f"({len(y)}, hidden): one row per labelled example")
    smallest = int(min(y.sum(), len(y) - y.sum()))
    if smallest < n_splits:
        raise DataError(f"the smaller class has {smallest} examples, fewer than n_splits={n_splits}: "
                        "lower n_splits or label more examples")
    return y.astype(bool)


def probe_auroc(features: Mapping[Hashable, np.ndarray], labels: np.ndarray, *, n_splits: int = 5,
                seed: int = 0, c: float = 1.0, min_class: int = 30) -> pd.DataFrame:
    """Cross-validated AUROC of a linear probe per layer.

    Args:
        features: ``{layer: (n_examples, hidden) array}``, rows aligned with ``labels``.
        labels: 0/1 or boolean per example, 1 = hallucinated.
        n_splits: stratified folds (shuffled with ``seed``; the same folds for every layer).
        seed: fold seed.
        c: inverse L2 regularisation strength of the logistic regression.
        min_class: below this many examples in a class the rows are flagged ``small_class`` and a
            :class:`SmallClassWarning` is issued (AUROC over so few examples is noisy).

    Returns:
        One row per layer (index ``layer``): ``auroc_mean``, ``auroc_sd`` (ddof 1, across folds),
        ``n_folds``, ``n_hallucinated``, ``n_correct``, ``small_class``.

    Raises:
        DataError: when shapes disagree or the smaller class has fewer examples than ``n_splits``.
    """
    y = _check_inputs(features, labels, n_splits)
    n_h = int(y.sum())
    small = min(n_h, len(y) - n_h) < min_class
    if small:
        warnings.warn(f"{n_h} hallucinated vs {len(y) - n_h} correct examples, below {min_class} per class: "
                      "probe AUROCs are noisy; label more examples", SmallClassWarning, stacklevel=2)
    folds = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    rows = []
    for layer, x in features.items():
        aucs = cross_val_score(make_probe(c), np.asarray(x, dtype=np.float64), y, cv=folds, scoring="roc_auc")
        rows.append({"layer": layer, "auroc_mean": aucs.mean(), "auroc_sd": aucs.std(ddof=1),
                     "n_folds": n_splits, "n_hallucinated": n_h, "n_correct": len(y) - n_h,
                     "small_class": small})
    return pd.DataFrame(rows).set_index("layer")
