"""Per-example activation statistics against a numpy reference on single, unpadded examples."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from avss_lib.core.activation_stats import site_hooks
from avss_lib.core.errors import ConfigError, DataError
from avss_lib.core.harness import encode_pair
from avss_lib.hallucination.eavss import EavssConfig, eavss_table
from avss_lib.hallucination.example_stats import StatItem, collect_example_stats, encode_items
from avss_lib.hallucination.group_stats import SUFFICIENT_STAT_COLUMNS, group_stats
from avss_lib.testing.tiny_models import tiny_model, tiny_tokenizer

ITEMS = [
    StatItem("a", "Q: who made the glorp?\nA:", "Anna Berg"),
    StatItem("b", "Q: how many legs?\nA:", "six"),
    StatItem("c", "Question: what colour is the sky stone, really?\nAnswer:", "green, I think"),
    StatItem("d", "Q: when?\nA:", "1901"),
    StatItem("e", "Q: where do cloud-whales sleep?\nA:", "In the sky above the sea"),
]
SITES = ("block_output", "mlp_activation", "attn_output")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def reference(model, tok, items, position, sites=SITES):
    """{(id, site, layer): float64 array (chosen tokens, d)} from one unpadded forward per item."""
    out = {}
    for item in items:
        if position == "answer":
            ctx, ans = encode_pair(tok, item.context, " " + item.answer.strip())
            ids, chosen = ctx + ans, list(range(len(ctx), len(ctx) + len(ans)))
        else:
            ids = tok(item.context, add_special_tokens=False)["input_ids"]
            chosen = [len(ids) - 1]
        captured = {}

        def grab(site, layer, x, h_in):
            captured[(site, layer)] = x.detach().reshape(1, len(ids), -1)[0, chosen].double().numpy()

        with site_hooks(model, sites, grab), torch.no_grad():
            model(input_ids=torch.tensor([ids]))
        for key, value in captured.items():
            out[(item.example_id, *key)] = value
    return out


def numpy_row(a: np.ndarray) -> dict[str, float]:
    return {"n": a.size, "sum": a.sum(), "m2": ((a - a.mean()) ** 2).sum(), "sum_abs": np.abs(a).sum(),
            "n_tokens": a.shape[0], "pooled_var": a.mean(axis=0).var(ddof=1)}


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize("position", ["answer", "question_last"])
def test_statistics_match_numpy_reference(tok, model_type, position):
    model = tiny_model(model_type, n_layers=3)
    taus, eps = (0.05, 0.5), (1e-3, 0.05)
    got = collect_example_stats(model, tok, ITEMS, position=position, abs_thresholds=eps, rel_taus=taus, batch_size=2)
    ref = reference(model, tok, ITEMS, position)
    assert len(got.table) == len(ITEMS) * 3 * len(SITES)
    assert set(SUFFICIENT_STAT_COLUMNS) <= set(got.table.columns)
    table = got.table.set_index(["example_id", "site", "layer"])
    for (ex, site, layer), a in ref.items():
        row = table.loc[(ex, site, layer)]
        for column, value in numpy_row(a).items():
            assert row[column] == pytest.approx(value, rel=1e-4, abs=1e-6), (ex, site, layer, column)
        for e in eps:
            assert row[f"below_abs_{e:g}"] == (np.abs(a) < e).sum()
    # sigma_ref: element std (ddof 0) over every example's chosen entries, label-free
    for site in SITES:
        for layer in range(3):
            pooled = np.concatenate([ref[(i.example_id, site, layer)].ravel() for i in ITEMS])
            sigma = pooled.std()
            assert got.sigma_ref.loc[(site, layer)] == pytest.approx(sigma, rel=1e-5)
            for i in ITEMS:
                a = np.abs(ref[(i.example_id, site, layer)])
                for tau in taus:
                    assert table.loc[(i.example_id, site, layer), f"below_rel_{tau:g}"] == (a < tau * sigma).sum()
    if position == "question_last":
        assert (got.table["n_tokens"] == 1).all()


def test_features_are_mean_block_output_in_item_order(tok):
    model = tiny_model("llama", n_layers=3)
    got = collect_example_stats(model, tok, ITEMS, rel_taus=(), batch_size=3)
    ref = reference(model, tok, ITEMS, "answer", sites=("block_output",))
    assert got.example_ids == [i.example_id for i in ITEMS]
    for layer in range(3):
        assert got.features[layer].dtype == np.float32
        expected = np.stack([ref[(i.example_id, "block_output", layer)].mean(axis=0) for i in ITEMS])
        np.testing.assert_allclose(got.features[layer], expected, rtol=1e-5, atol=1e-6)
    assert not [c for c in got.table.columns if c.startswith("below_rel_")]


def test_batch_size_and_padding_do_not_change_statistics(tok):
    model = tiny_model("qwen2", n_layers=2)
    one = collect_example_stats(model, tok, ITEMS, batch_size=1).table
    many = collect_example_stats(model, tok, ITEMS, batch_size=5).table
    key = ["site", "layer", "example_id"]
    pd.testing.assert_frame_equal(one.sort_values(key).reset_index(drop=True),
                                  many.sort_values(key).reset_index(drop=True), rtol=1e-5, atol=1e-6)


def test_question_last_ignores_the_answer_and_empty_answers_are_dropped(tok):
    model = tiny_model("llama", n_layers=2)
    items = [StatItem("x", "Q: one?\nA:", "yes"), StatItem("y", "Q: two?\nA:", "")]
    other = [StatItem("x", "Q: one?\nA:", "a completely different answer"), StatItem("y", "Q: two?\nA:", "no")]
    q1 = collect_example_stats(model, tok, items, position="question_last").table
    q2 = collect_example_stats(model, tok, other, position="question_last").table
    pd.testing.assert_frame_equal(q1, q2)
    got = collect_example_stats(model, tok, items, position="answer")
    assert got.dropped == ["y"] and got.example_ids == ["x"]
    assert set(got.table["example_id"]) == {"x"}


def test_group_statistics_equal_pooled_numpy(tok):
    """The per-example table feeds group_stats: H's element variance = variance of H's entries."""
    model = tiny_model("llama", n_layers=2)
    got = collect_example_stats(model, tok, ITEMS, sites=("mlp_activation",), feature_site=None, rel_taus=(0.5,))
    ref = reference(model, tok, ITEMS, "answer", sites=("mlp_activation",))
    labels = pd.Series([True, False, True, False, True], index=[i.example_id for i in ITEMS], dtype=bool)
    h, c = group_stats(got.table, labels)
    for layer in range(2):
        entries = np.concatenate([ref[(i, "mlp_activation", layer)].ravel() for i in labels.index[labels]])
        row = h[h["layer"] == layer].iloc[0]
        assert row["elem_var"] == pytest.approx(entries.var(), rel=1e-5)
        assert row["pooled_var_masked"] == pytest.approx(
            np.mean([ref[(i, "mlp_activation", layer)].mean(axis=0).var(ddof=1) for i in labels.index[labels]]), rel=1e-5)
        sigma = got.sigma_ref.loc[("mlp_activation", layer)]
        assert row["sparsity_rel_0.5"] == pytest.approx((np.abs(entries) < 0.5 * sigma).mean())
    assert eavss_table(got.table, labels, EavssConfig(sparsity="sparsity_rel_0.5", min_class=2)).usable


def test_errors(tok):
    model = tiny_model("llama", n_layers=2)
    with pytest.raises(ConfigError, match="position"):
        collect_example_stats(model, tok, ITEMS, position="everywhere")
    with pytest.raises(DataError, match="repeat"):
        collect_example_stats(model, tok, [ITEMS[0], ITEMS[0]])
    with pytest.raises(DataError, match="empty"):
        collect_example_stats(model, tok, [StatItem("z", "Q:", " ")])
    with pytest.raises(ConfigError, match="site"):
        collect_example_stats(model, tok, ITEMS, sites=("residual",))


def test_long_inputs_are_cut_from_the_left_keeping_the_answer(tok):
    encoded, _ = encode_items(tok, [StatItem("l", "x" * 50 + "\nA:", "abc")], "answer", max_length=10)
    assert len(encoded[0].ids) == 10
    assert encoded[0].chosen == list(range(6, 10))  # " abc" = 4 character tokens at the end


@pytest.mark.parametrize("model_type", ["llama", "opt"])
def test_cached_relative_counts_equal_the_second_pass(tok, model_type):
    model = tiny_model(model_type, n_layers=2)
    taus = (0.05, 0.3, 1.0)
    cached = collect_example_stats(model, tok, ITEMS, rel_taus=taus, batch_size=2)
    two_pass = collect_example_stats(model, tok, ITEMS, rel_taus=taus, batch_size=2, cache_mb=0)
    tiny_budget = collect_example_stats(model, tok, ITEMS, rel_taus=taus, batch_size=2, cache_mb=1e-3)
    assert cached.settings["forward_passes"] == 1
    assert two_pass.settings["forward_passes"] == 2 and tiny_budget.settings["forward_passes"] == 2
    pd.testing.assert_frame_equal(cached.table, two_pass.table)
    pd.testing.assert_frame_equal(cached.table, tiny_budget.table)
    assert cached.table["below_rel_1"].sum() > 0  # the comparison is not vacuous
