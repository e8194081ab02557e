"""Per-layer linear probe AUROC on synthetic separable and non-separable data."""

from __future__ import annotations

import numpy as np
import pytest

from avss_lib.core.errors import ConfigError, DataError
from avss_lib.hallucination.group_stats import SmallClassWarning
from avss_lib.hallucination.probes import probe_auroc


def _data(n: int = 120, hidden: int = 16, seed: int = 0) -> tuple[dict[int, np.ndarray], np.ndarray]:
    """Layer 0: pure noise. Layer 1: label shifts feature 3 by 6 sd (linearly separable)."""
    rng = np.random.default_rng(seed)
    y = np.array([1, 0] * (n // 2))
    separable = rng.normal(size=(n, hidden))
    separable[:, 3] += 6.0 * y
    return {0: rng.normal(size=(n, hidden)), 1: separable}, y


def test_probe_separates_informative_layer_only() -> None:
    features, y = _data()
    result = probe_auroc(features, y)
    assert list(result.index) == [0, 1]
    # a 6-sd shift of one feature separates the classes in every fold: AUROC exactly 1, no spread
    assert result.loc[1, "auroc_mean"] == 1.0 and result.loc[1, "auroc_sd"] == 0.0
    assert abs(result.loc[0, "auroc_mean"] - 0.5) < 0.15
    assert (result["n_folds"] == 5).all() and not result["small_class"].any()
    assert result.loc[0, ["n_hallucinated", "n_correct"]].tolist() == [60, 60]


def test_auroc_is_the_mean_over_the_stratified_folds() -> None:
    """Against a hand-run of the same folds (seed 0) with sklearn's AUROC on each held-out fold."""
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold

    from avss_lib.hallucination.probes import make_probe

    features, y = _data(n=60)
    result = probe_auroc(features, y, n_splits=3, seed=0, min_class=10)
    folds = StratifiedKFold(n_splits=3, shuffle=True, random_state=0).split(features[0], y)
    aucs = []
    for train, test in folds:
        probe = make_probe().fit(features[0][train], y[train])
        aucs.append(roc_auc_score(y[test], probe.predict_proba(features[0][test])[:, 1]))
    assert result.loc[0, "auroc_mean"] == pytest.approx(np.mean(aucs), abs=1e-12)
    assert result.loc[0, "auroc_sd"] == pytest.approx(np.std(aucs, ddof=1), abs=1e-12)


def test_random_labels_give_chance_auroc() -> None:
    features, _ = _data(n=200)
    shuffled = np.random.default_rng(1).permutation(np.array([1, 0] * 100))
    result = probe_auroc(features, shuffled)
    assert (result["auroc_mean"] - 0.5).abs().max() < 0.15


def test_probe_is_deterministic_given_seed() -> None:
    features, y = _data()
    first, second = probe_auroc(features, y, seed=3), probe_auroc(features, y, seed=3)
    assert first.equals(second)


def test_tiny_classes() -> None:
    features, y = _data(n=40)
    with pytest.warns(SmallClassWarning, match="20 hallucinated vs 20 correct"):
        flagged = probe_auroc(features, y)  # min_class = 30 by default
    assert flagged["small_class"].all()
    y_tiny = np.zeros(40, dtype=int)
    y_tiny[:3] = 1
    with pytest.raises(DataError, match="fewer than n_splits=5"):
        probe_auroc(features, y_tiny)
    with pytest.raises(DataError, match="shape"):
        probe_auroc({0: features[0][:10]}, y)
    with pytest.raises(DataError, match="0/1"):
        probe_auroc(features, y * 2)
    with pytest.raises(ConfigError, match="n_splits"):
        probe_auroc(features, y, n_splits=1)
