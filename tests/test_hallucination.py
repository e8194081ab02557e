"""HSAV / HSS / EAVSS, group statistics, permutation null, split halves, class-size guard and rankings."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from avss_lib.core.errors import ConfigError, DataError
from avss_lib.hallucination.eavss import EavssConfig, eavss_from_groups, eavss_table, hsav, hss
from avss_lib.hallucination.group_stats import ClassSizeCheck, SmallClassWarning, check_class_sizes, group_stats
from avss_lib.hallucination.layer_rankings import pool_rankings, rank_scores, top_k_layers
from avss_lib.hallucination.analysis import length_bins
from avss_lib.hallucination.null_and_stability import permutation_eavss, spearman_rho, split_half_stability

EPS = 1e-5
TAU = 0.5


def _row(example_id: int, site: str, layer: int, acts: np.ndarray, sigma_ref: float) -> dict:
    """Per-example sufficient statistics of a (tokens x hidden) activation array, as a collector emits."""
    return {
        "example_id": example_id, "site": site, "layer": layer,
        "n": acts.size, "sum": acts.sum(), "m2": ((acts - acts.mean()) ** 2).sum(),
        "sum_abs": np.abs(acts).sum(), "n_tokens": acts.shape[0], "pooled_var": acts.mean(axis=0).var(ddof=1),
        f"below_abs_{EPS:g}": int((np.abs(acts) < EPS).sum()),
        f"below_rel_{TAU:g}": int((np.abs(acts) < TAU * sigma_ref).sum()),
    }


def _table(acts: dict[tuple[str, int], list[np.ndarray]]) -> pd.DataFrame:
    """Per-example statistics for {(site, layer): [acts of example 0, 1, ...]} (label-free sigma_ref)."""
    rows = []
    for (site, layer), per_example in acts.items():
        sigma_ref = np.concatenate([a.ravel() for a in per_example]).std()
        rows += [_row(i, site, layer, a, sigma_ref) for i, a in enumerate(per_example)]
    return pd.DataFrame(rows)


def _labels(flags: list[bool] | np.ndarray) -> pd.Series:
    return pd.Series(np.asarray(flags, dtype=bool), index=range(len(flags)))


def _random_acts(rng: np.random.Generator, n_examples: int, scale_h: float, labels: np.ndarray,
                 zero_frac_h: float = 0.0) -> list[np.ndarray]:
    """Variable-length examples; hallucinated ones scaled by ``scale_h`` with a share of exact zeros."""
    out = []
    for is_h in labels[:n_examples]:
        a = rng.normal(size=(int(rng.integers(2, 6)), 8)) * (scale_h if is_h else 1.0)
        if is_h and zero_frac_h:
            a[rng.random(a.shape) < zero_frac_h] = 0.0
        out.append(a)
    return out


# ------------------------------------------------------------------------------ hand-computed formulas


def _groups() -> tuple[pd.DataFrame, pd.DataFrame]:
    h = pd.DataFrame({"site": "block_output", "layer": [0, 1, 2],
                      "pooled_var_masked": [2.0, 8.0, 1.0], "sparsity_abs_1e-05": [0.0, 0.1, 0.2]})
    c = pd.DataFrame({"site": "block_output", "layer": [2, 1, 0],  # other row order on purpose
                      "pooled_var_masked": [1.0, 2.0, 2.0], "sparsity_abs_1e-05": [0.0, 0.3, 0.0]})
    return h, c


def test_hsav_hss_eavss_log_ratio_by_hand() -> None:
    h, c = _groups()
    assert hsav(h, c).tolist() == pytest.approx([0.0, math.log(4.0), 0.0])
    assert hss(h, c, delta=1e-3).tolist() == pytest.approx([0.0, math.log(0.101 / 0.301), math.log(0.201 / 0.001)])
    table = eavss_from_groups(h, c)
    # EAVSS = log(AVSS_H / AVSS_C) with AVSS_g = V_g / (S_g + delta)
    expected = [0.0, math.log((8.0 / 0.101) / (2.0 / 0.301)), math.log((1.0 / 0.201) / (1.0 / 0.001))]
    assert table["eavss"].tolist() == pytest.approx(expected)
    assert expected[1] == pytest.approx(2.4783, abs=1e-4) and expected[2] == pytest.approx(-5.3033, abs=1e-4)
    assert table["score"].tolist() == pytest.approx([abs(e) for e in expected])
    assert table["rank"].tolist() == [3.0, 2.0, 1.0]
    assert top_k_layers(table["score"], 2) == [("block_output", 2), ("block_output", 1)]


def test_eavss_alternatives_by_hand() -> None:
    h, c = _groups()
    summed = eavss_from_groups(h, c, EavssConfig(combine="sum_abs"))
    assert summed["eavss"].iloc[1] == pytest.approx(math.log(4.0) + abs(math.log(0.101 / 0.301)))
    signed = eavss_from_groups(h, c, EavssConfig(rank_by="signed"))
    assert signed["rank"].tolist() == [2.0, 1.0, 3.0]  # largest positive EAVSS first


def test_zero_sparsity_everywhere_reduces_eavss_to_hsav() -> None:
    h, c = _groups()
    h["sparsity_abs_1e-05"] = 0.0
    c["sparsity_abs_1e-05"] = 0.0
    table = eavss_from_groups(h, c)
    assert np.isfinite(table["eavss"]).all()
    assert table["eavss"].tolist() == pytest.approx(hsav(h, c).tolist())


def test_contrast_errors_are_readable() -> None:
    h, c = _groups()
    c.loc[c["layer"] == 0, "pooled_var_masked"] = 0.0
    with pytest.raises(DataError, match="log-ratio is undefined"):
        hsav(h, c)
    with pytest.raises(DataError, match="std_diff"):
        hsav(*_groups(), contrast="std_diff")  # group frames without per-example columns
    with pytest.raises(ConfigError, match="contrast"):
        EavssConfig(contrast="ratio")
    with pytest.raises(ConfigError, match="delta"):
        EavssConfig(delta=0.0)
    with pytest.raises(DataError, match="same"):
        hsav(h, c.iloc[:2])


# ------------------------------------------------------------------------------ sufficient statistics


def test_group_stats_by_hand() -> None:
    # one layer; example 0 and 1 hallucinated, example 2 correct
    acts = [np.array([[1.0, 3.0]]), np.array([[-1.0, 1.0], [-1.0, 1.0]]), np.array([[0.0, 2.0]])]
    h, c = group_stats(_table({("mlp", 0): acts}), _labels([True, True, False]))
    # H entries: 1, 3, -1, 1, -1, 1 -> mean 2/3, var = mean(a^2) - mean^2 = 14/6 - 4/9 = 17/9
    assert h["elem_mean"].item() == pytest.approx(2 / 3)
    assert h["elem_var"].item() == pytest.approx(17 / 9)
    assert h["pooled_var_masked"].item() == pytest.approx((2.0 + 2.0) / 2)  # ddof-1 over 2 hidden units
    assert h["mean_abs"].item() == pytest.approx(8 / 6)
    assert h["n_tokens"].item() == 3 and h["n_examples"].item() == 2
    assert c["sparsity_abs_1e-05"].item() == pytest.approx(0.5)
    assert h["sparsity_abs_1e-05"].item() == 0.0
    # per-example elem variances of H: var([1,3]) = 1, var([-1,1,-1,1]) = 1 -> mean 1, ddof-1 variance 0
    assert h["elem_var_ex_mean"].item() == pytest.approx(1.0)
    assert h["elem_var_ex_var"].item() == pytest.approx(0.0)


def test_group_stats_equal_direct_statistics_on_concatenated_values() -> None:
    rng = np.random.default_rng(0)
    flags = rng.random(25) < 0.4
    acts = {("block_output", 0): _random_acts(rng, 25, 1.0, flags),
            ("block_output", 1): [a + 50.0 for a in _random_acts(rng, 25, 3.0, flags, zero_frac_h=0.3)],
            ("mlp", 0): _random_acts(rng, 25, 2.0, flags, zero_frac_h=0.5)}
    stats = _table(acts)
    h, c = group_stats(stats, _labels(flags))
    for (site, layer), per_example in acts.items():
        sigma_ref = np.concatenate([a.ravel() for a in per_example]).std()
        for frame, members in ((h, flags), (c, ~flags)):
            group = [a for a, m in zip(per_example, members) if m]
            flat = np.concatenate([a.ravel() for a in group])
            row = frame[(frame["site"] == site) & (frame["layer"] == layer)].iloc[0]
            assert row["elem_mean"] == pytest.approx(flat.mean(), rel=1e-12)
            assert row["elem_var"] == pytest.approx(flat.var(), rel=1e-10)
            assert row["mean_abs"] == pytest.approx(np.abs(flat).mean(), rel=1e-12)
            assert row["pooled_var_masked"] == pytest.approx(np.mean([a.mean(axis=0).var(ddof=1) for a in group]))
            assert row["sparsity_abs_1e-05"] == pytest.approx((np.abs(flat) < EPS).mean())
            assert row["sparsity_rel_0.5"] == pytest.approx((np.abs(flat) < TAU * sigma_ref).mean())
            per_ex_sparsity = [(np.abs(a) < EPS).mean() for a in group]
            assert row["sparsity_abs_1e-05_ex_mean"] == pytest.approx(np.mean(per_ex_sparsity))
            assert row["sparsity_abs_1e-05_ex_var"] == pytest.approx(np.var(per_ex_sparsity, ddof=1))


def test_std_diff_is_cohens_d_of_per_example_values() -> None:
    rng = np.random.default_rng(1)
    flags = np.array([True] * 10 + [False] * 12)
    stats = _table({("mlp", 0): _random_acts(rng, 22, 2.0, flags)})
    h, c = group_stats(stats, _labels(flags))
    values = stats["pooled_var"].to_numpy()
    x_h, x_c = values[flags], values[~flags]
    pooled = math.sqrt((9 * x_h.var(ddof=1) + 11 * x_c.var(ddof=1)) / 20)
    assert hsav(h, c, contrast="std_diff").item() == pytest.approx((x_h.mean() - x_c.mean()) / pooled)
    # per-example sparsity is 0 everywhere: no difference rather than 0/0
    assert hss(h, c, contrast="std_diff").item() == 0.0


def test_malformed_tables_are_rejected() -> None:
    rng = np.random.default_rng(2)
    flags = np.array([True, False, True, False])
    stats = _table({("mlp", 0): _random_acts(rng, 4, 1.0, flags), ("mlp", 1): _random_acts(rng, 4, 1.0, flags)})
    with pytest.raises(DataError, match="one row per"):
        group_stats(stats.iloc[1:], _labels(flags))
    with pytest.raises(DataError, match="lack columns"):
        group_stats(stats.drop(columns="m2"), _labels(flags))
    with pytest.raises(DataError, match="label every example"):
        group_stats(stats, _labels(flags[:3]))
    with pytest.raises(DataError, match="one class is empty"):
        group_stats(stats, _labels([False] * 4))
    with pytest.raises(DataError, match="boolean"):
        group_stats(stats, pd.Series([1, 0, 1, 0]))


# ------------------------------------------------------------------------------ permutation null


def _effect_table(n_per_class: int, seed: int) -> tuple[pd.DataFrame, pd.Series]:
    """Layer 0: no H/C difference. Layer 1: H activations 3x larger. Layer 2: 1.5x larger."""
    rng = np.random.default_rng(seed)
    flags = np.array([True, False] * n_per_class)
    acts = {("block_output", 0): _random_acts(rng, len(flags), 1.0, flags),
            ("block_output", 1): _random_acts(rng, len(flags), 3.0, flags),
            ("block_output", 2): _random_acts(rng, len(flags), 1.5, flags)}
    return _table(acts), _labels(flags)


def test_permutation_null_p_values() -> None:
    stats, labels = _effect_table(n_per_class=40, seed=3)
    result = permutation_eavss(stats, labels, n_perm=199, seed=0)
    p = result.p_value.xs("block_output", level="site")
    assert p[1] == pytest.approx(1 / 200)  # large effect: no permutation reaches it; +1 correction
    assert result.null.shape == (199, 3)
    again = permutation_eavss(stats, labels, n_perm=199, seed=0)
    pd.testing.assert_frame_equal(result.null, again.null)


def test_permutation_null_equals_eavss_of_each_shuffled_labelling() -> None:
    """The matrix-product null against a brute-force one: eavss_table of every shuffled labelling."""
    stats, labels = _effect_table(n_per_class=6, seed=7)
    n_perm = 15
    result = permutation_eavss(stats, labels, EavssConfig(min_class=2), n_perm=n_perm, seed=3)
    rng = np.random.default_rng(3)  # the same shuffles: rng.permutation of the labels in example-id order
    brute = []
    for _ in range(n_perm):
        shuffled = pd.Series(rng.permutation(labels.sort_index().to_numpy()), index=labels.sort_index().index)
        brute.append(eavss_table(stats, shuffled, EavssConfig(min_class=2)).table["score"].to_numpy())
    brute = np.array(brute)
    np.testing.assert_allclose(result.null.to_numpy(), brute, rtol=1e-9)
    observed = eavss_table(stats, labels, EavssConfig(min_class=2)).table["score"].to_numpy()
    np.testing.assert_allclose(result.observed.to_numpy(), observed, rtol=1e-12)
    counts = (brute >= observed - 1e-12).sum(axis=0)
    np.testing.assert_allclose(result.p_value.to_numpy(), (1 + counts) / (n_perm + 1))
    max_counts = (brute.max(axis=1)[:, None] >= observed - 1e-12).sum(axis=0)  # one site: max over all layers
    np.testing.assert_allclose(result.p_value_max.to_numpy(), (1 + max_counts) / (n_perm + 1))


def test_permutation_preserves_class_sizes_in_null() -> None:
    stats, labels = _effect_table(n_per_class=5, seed=4)
    with pytest.warns(SmallClassWarning):
        result = permutation_eavss(stats, labels, EavssConfig(min_class=6), n_perm=20)
    assert not result.class_sizes.ok
    with pytest.raises(DataError, match="at least 2"):
        permutation_eavss(stats, _labels([True] + [False] * 9), n_perm=5)


def test_split_half_stability_high_for_graded_effect() -> None:
    stats, labels = _effect_table(n_per_class=40, seed=5)
    rho = split_half_stability(stats, labels, n_splits=5, seed=0)
    assert list(rho.columns) == ["split", "site", "rho"] and len(rho) == 5
    assert (rho["rho"] == 1.0).all()  # 3x > 1.5x > none in every half


def test_split_half_rho_is_spearman_of_the_two_halves_scores() -> None:
    from sklearn.model_selection import StratifiedShuffleSplit
    from scipy.stats import spearmanr

    rng = np.random.default_rng(8)
    flags = np.array([True, False] * 12)
    acts = {("mlp", layer): _random_acts(rng, len(flags), 1.0 + 0.1 * layer, flags) for layer in range(5)}
    stats, labels = _table(acts), _labels(flags)
    got = split_half_stability(stats, labels, EavssConfig(min_class=2), n_splits=3, seed=4)
    halves = StratifiedShuffleSplit(n_splits=3, test_size=0.5, random_state=4)
    for split, (first, second) in enumerate(halves.split(np.zeros(len(flags)), flags)):
        a, b = (eavss_table(stats[stats["example_id"].isin(part)], labels.iloc[part], EavssConfig(min_class=2))
                .table["score"].to_numpy() for part in (first, second))
        assert got.loc[split, "rho"] == pytest.approx(spearmanr(a, b).statistic, abs=1e-12)


# ------------------------------------------------------------------------------ class sizes and pooling


def test_class_size_guard_flags_without_crashing() -> None:
    stats, labels = _effect_table(n_per_class=10, seed=6)
    assert check_class_sizes(labels, 10).ok and not check_class_sizes(labels, 11).ok
    assert check_class_sizes(labels, 11) == ClassSizeCheck(n_hallucinated=10, n_correct=10, min_class=11)
    with pytest.warns(SmallClassWarning, match="10 hallucinated vs 10 correct"):
        result = eavss_table(stats, labels)  # default min_class = 30
    assert not result.usable and np.isfinite(result.table["score"]).all()
    one = labels.copy()
    one[:] = False
    one.iloc[0] = True
    with pytest.warns(SmallClassWarning):
        tiny = eavss_table(stats, one)
    assert not tiny.usable and tiny.table["score"].isna().all() and len(tiny.table) == 3


def test_pool_rankings_excludes_flagged_datasets() -> None:
    layers = pd.Index([0, 1, 2], name="layer")
    scores = {"nq": pd.Series([0.1, 0.9, 0.5], index=layers),
              "triviaqa": pd.Series([0.2, 0.8, 0.6], index=layers),
              "sciq": pd.Series([9.0, 0.0, 0.1], index=layers)}  # flagged: would overturn the pooled order
    pooled = pool_rankings(scores, excluded=["sciq"])
    assert list(pooled.index) == [1, 2, 0]
    assert pooled["mean_rank"].tolist() == [1.0, 2.0, 3.0]
    assert "sciq" not in pooled.columns and (pooled["n_datasets"] == 2).all()
    everything = pool_rankings(scores)
    assert everything.loc[0, "mean_rank"] == pytest.approx((3 + 3 + 1) / 3)
    with pytest.raises(ConfigError, match="not among"):
        pool_rankings(scores, excluded=["wikiqa"])
    with pytest.raises(DataError, match="every data set"):
        pool_rankings(scores, excluded=list(scores))


def test_spearman_rho_rank_scores_and_top_k() -> None:
    a = pd.Series([1.0, 2.0, 3.0, 4.0], index=[0, 1, 2, 3])
    assert spearman_rho(a, a[::-1]) == pytest.approx(1.0)  # aligned on the index, not position
    assert spearman_rho(a, pd.Series([4.0, 3.0, 2.0, 1.0], index=[0, 1, 2, 3])) == pytest.approx(-1.0)
    assert spearman_rho(a, pd.Series([1.0, 3.0, 2.0, 4.0], index=[0, 1, 2, 3])) == pytest.approx(0.8)  # 1 - 6*2/60
    assert math.isnan(spearman_rho(a, pd.Series(1.0, index=[0, 1, 2, 3])))  # a constant score has no order
    with pytest.raises(DataError, match="different layers"):
        spearman_rho(a, a.iloc[:3])
    two_sites = pd.Series([0.1, 0.3, 0.2, 5.0, 4.0], index=pd.MultiIndex.from_tuples(
        [("mlp", 0), ("mlp", 1), ("mlp", 2), ("attn", 0), ("attn", 1)], names=["site", "layer"]))
    assert rank_scores(two_sites).tolist() == [3.0, 1.0, 2.0, 1.0, 2.0]  # within each site
    assert rank_scores(pd.Series([0.5, 0.9, 0.5])).tolist() == [2.5, 1.0, 2.5]  # ties averaged
    assert top_k_layers(pd.Series([0.5, 0.9, 0.5], index=[0, 1, 2]), 2) == [1, 0]  # tie -> lower index
    assert top_k_layers(a, 4) == [3, 2, 1, 0]
    for bad_k in (0, 5):
        with pytest.raises(ConfigError, match=f"k={bad_k}"):
            top_k_layers(a, bad_k)


def test_length_stratified_null_does_not_pass_a_pure_length_effect() -> None:
    """Hallucinated answers 1 token long, correct ones 8 tokens, activations i.i.d. with no label effect: the mean
    over an answer's tokens varies less for long answers, so HSAV passes the plain null in every layer; shuffling
    the labels only within length bins keeps the confound in the null, which then never rejects."""
    rng = np.random.default_rng(0)
    flags = np.array([True, False] * 30)
    acts = {("block_output", layer): [rng.normal(size=(1 if h else 8, 16)) for h in flags] for layer in range(3)}
    stats, labels = _table(acts), _labels(flags)
    config = EavssConfig(min_class=2)
    plain = permutation_eavss(stats, labels, config, n_perm=199, seed=0)
    assert (plain.p_value_max < 0.01).all()
    lengths = pd.Series(np.where(flags, 1, 8), index=labels.index)
    stratified = permutation_eavss(stats, labels, config, n_perm=199, seed=0, strata=length_bins(lengths, 4))
    assert (stratified.p_value_max == 1.0).all()
    with pytest.raises(DataError, match="strata lack"):
        permutation_eavss(stats, labels, config, n_perm=5, strata=lengths.iloc[:-1])


def test_length_bins_are_quantiles_with_ties_kept_together() -> None:
    lengths = pd.Series([0, 1, 1, 2, 5, 7, 7, 9], index=list("abcdefgh"))
    assert length_bins(lengths, 4).tolist() == [0, 0, 0, 1, 2, 2, 2, 3]
    assert length_bins(pd.Series([3, 3, 3], index=list("xyz")), 4).tolist() == [0, 0, 0]
