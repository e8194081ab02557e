"""AVSS scores and selection rules on a worked example, including the authors' bugged rule and S = 0."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from avss_lib.ranking.avss import (
    AvssVariant,
    avss_scores,
    select_authors_code,
    select_cumulative_sorted,
    select_fixed_fraction,
    selections,
    sparsity_column,
    variant_by_name,
)
from avss_lib.core.errors import ConfigError

FAITHFUL = AvssVariant("authors_code", "block_output", "pooled_padded", "abs_padded:1e-05")


def _stats(variance, sparsity) -> pd.DataFrame:
    return pd.DataFrame({"site": "block_output", "layer": range(len(variance)),
                         "pooled_var_padded": variance, "sparsity_abs_1e-05_padded": sparsity})


# variance [1, 2, 3, 4] -> normalised [.1, .2, .3, .4]; sparsity [.5, .1, .6, .2]
# AVSS = [0.2, 2.0, 0.5, 2.0]; sum 4.7; normalised [0.04255, 0.42553, 0.10638, 0.42553]
WORKED = _stats([1.0, 2.0, 3.0, 4.0], [0.5, 0.1, 0.6, 0.2])


def test_worked_scores():
    s = avss_scores(WORKED, FAITHFUL)
    np.testing.assert_allclose(s["avss"], [0.2, 2.0, 0.5, 2.0])
    np.testing.assert_allclose(s["avss_norm"], np.array([0.2, 2.0, 0.5, 2.0]) / 4.7)
    assert s["rank"].tolist() == [1, 3, 2, 4]  # the tie between layers 1 and 3 goes to the lower index
    assert not s["undefined"].any()


def test_worked_selections():
    s = avss_scores(WORKED, FAITHFUL)
    score, norm = s["avss"].to_numpy(), s["avss_norm"].to_numpy()
    assert select_fixed_fraction(score, 0.25) == [0]
    assert select_fixed_fraction(score, 0.5) == [0, 2]
    assert select_cumulative_sorted(norm, 0.25) == [0, 2]  # 0.0426 + 0.1064 = 0.149 <= 0.25
    assert select_cumulative_sorted(norm, 0.5) == [0, 2]  # + 0.4255 would exceed 0.5
    # The published code sums in layer order before sorting: 0.0426, 0.468, ... so at 0.5 it prunes layer 1,
    # one of the two MOST important layers, and keeps layer 2, the second least important.
    variance, sparsity = s["variance"].to_numpy(), s["sparsity"].to_numpy()
    assert select_authors_code(variance, sparsity, 0.25) == [0]
    assert select_authors_code(variance, sparsity, 0.5) == [0, 1]


def test_zero_sparsity_is_reported_not_hidden():
    stats = _stats([1.0, 2.0, 3.0, 4.0], [0.0, 0.1, 0.6, 0.2])
    s = avss_scores(stats, FAITHFUL)
    assert np.isinf(s["avss"].iloc[0]) and s["undefined"].tolist() == [True, False, False, False]
    assert s["avss_norm"].isna().all()
    table = selections(s, ratio=0.25, threshold=0.25).set_index("rule")
    assert table.loc["fixed_fraction", "layers"] == [2]  # AVSS = [inf, 2.0, 0.5, 2.0]
    assert table.loc["cumulative_sorted", "layers"] == []
    # The authors' pandas script: AVSS = [inf, 20, 5, 20], sum inf, normalised [NaN, 0, 0, 0], cumsum skips
    # NaN -> [NaN, 0, 0, 0] <= 0.25: it prunes every layer with a non-zero sparsity and keeps layer 0.
    assert table.loc["authors_code", "layers"] == [1, 2, 3]
    assert (table["n_undefined_scores"] == 1).all()
    smoothed = avss_scores(stats, AvssVariant("s", "block_output", "pooled_padded", "abs_padded:1e-05", delta=0.1))
    np.testing.assert_allclose(smoothed["avss"], np.array([0.1, 0.2, 0.3, 0.4]) / (np.array([0.0, 0.1, 0.6, 0.2]) + 0.1))


def test_authors_rule_on_a_hand_made_table():
    """Expected selections written out by hand from the script's pandas arithmetic."""
    # AVSS = [2, 20, 5, 20] / 47 -> cumulative in layer order [.043, .468, .574, 1.0]: only layer 0 <= 0.25.
    assert select_authors_code(np.array([1.0, 2.0, 3.0, 4.0]), np.array([0.5, 0.1, 0.6, 0.2])) == [0]
    # Two zero sparsities: inf/inf = NaN for both, 0 for the rest -> the two finite layers are pruned.
    assert select_authors_code(np.array([1.0, 1.0, 1.0, 1.0]), np.array([0.0, 0.2, 0.0, 0.5])) == [1, 3]
    # Variance and sparsity both 0: 0/0 = NaN is skipped by sum and cumsum; the rest is an ordinary prefix:
    # AVSS [NaN, 2, 2, 4] / 8 -> cumulative [NaN, .25, .5, 1.0] -> layer 1 only.
    assert select_authors_code(np.array([0.0, 1.0, 1.0, 2.0]), np.array([0.0, 0.5, 0.5, 0.5])) == [1]


def test_fixed_fraction_flags_arbitrary_ties_at_infinity():
    stats = _stats([1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.2])
    table = selections(avss_scores(stats, FAITHFUL), ratio=0.5).set_index("rule")
    assert table.loc["fixed_fraction", "layers"] == [0, 3]
    assert bool(table.loc["fixed_fraction", "tie_broken_arbitrarily"])


def test_sparsity_specs_and_errors():
    assert sparsity_column("abs:1e-05") == "sparsity_abs_1e-05"
    assert sparsity_column("abs_padded:0.001") == "sparsity_abs_0.001_padded"
    assert sparsity_column("rel:0.01") == "sparsity_rel_0.01"
    for bad in ("abs", "abs:0", "rel:-1", "foo:1"):
        with pytest.raises(ConfigError):
            sparsity_column(bad)
    with pytest.raises(ConfigError, match="no statistics for site"):
        avss_scores(WORKED, AvssVariant("m", "mlp_activation", "element", "abs:1e-05"))
    with pytest.raises(ConfigError, match="lack column"):
        avss_scores(WORKED, AvssVariant("r", "block_output", "pooled_padded", "rel:0.5"))
    with pytest.raises(ConfigError, match="unknown AVSS variant"):
        variant_by_name("nope")
    with pytest.raises(ConfigError, match=r"outside \(0, 1\)"):
        select_fixed_fraction(np.ones(4), 1.0)
    with pytest.raises(ConfigError, match=r"in \(0, 1\)"):
        select_cumulative_sorted(np.ones(4) / 4, 0.0)
