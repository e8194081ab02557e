"""Activation statistics: hand-computed values, streaming equals one shot, padding is masked, hooks are removed."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from avss_lib.core.activation_stats import (
    SITES,
    ActivationStatsCollector,
    StatsSpec,
    _SiteLayerStats,
    abs_column,
    collect_activation_stats,
    rel_column,
    site_hooks,
)
from avss_lib.core.errors import ConfigError
from avss_lib.core.layers import find_layers
from avss_lib.testing.tiny_models import TINY_TYPES, tiny_model


def _stats(x: torch.Tensor, valid: torch.Tensor, spec: StatsSpec | None = None) -> dict:
    st = _SiteLayerStats(spec or StatsSpec(abs_thresholds=(1e-5, 0.5), rel_taus=(0.5,)))
    st.update(x, valid)
    return st.row()


def test_hand_computed_values():
    # one sample, three tokens, two hidden units; the third token is padding
    x = torch.tensor([[[1.0, 3.0], [0.0, -2.0], [10.0, 10.0]]])
    valid = torch.tensor([[True, True, False]])
    row = _stats(x, valid)
    # valid entries: 1, 3, 0, -2 -> mean 0.5, population variance ((0.5)^2+(2.5)^2+(0.5)^2+(2.5)^2)/4 = 3.25
    assert row["elem_mean"] == pytest.approx(0.5)
    assert row["elem_var"] == pytest.approx(3.25)
    assert row["mean_abs"] == pytest.approx(6 / 4)
    # masked pooling: mean over the two valid tokens = [0.5, 0.5] -> unbiased variance 0
    assert row["pooled_var_masked"] == pytest.approx(0.0)
    # authors' pooling includes the padding token: mean = [11/3, 11/3] -> variance 0; change one value to check
    x2 = x.clone()
    x2[0, 2, 1] = 16.0  # pooled = [11/3, 17/3] -> unbiased variance over 2 units = (1^2 + 1^2) / 1 = 2
    assert _stats(x2, valid)["pooled_var_padded"] == pytest.approx(2.0)
    # |a| < 1e-5: one valid entry (the 0.0); over all positions: still one out of 6
    assert row[abs_column(1e-5)] == pytest.approx(1 / 4)
    assert row[abs_column(1e-5, padded=True)] == pytest.approx(1 / 6)
    # |a| < 0.5 std: std = sqrt(3.25) = 1.803, threshold 0.901 -> only the 0.0 entry
    assert row[rel_column(0.5)] == pytest.approx(1 / 4, abs=0.01)
    assert row["n_tokens"] == 2 and row["n_positions"] == 3 and row["n_samples"] == 1


def test_cosine_hand_computed():
    st = _SiteLayerStats(StatsSpec())
    h_in = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]])
    h_out = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]])
    valid = torch.tensor([[True, True, False]])
    st.update(h_out, valid)
    st.update_cosine(h_in, h_out, valid)
    row = st.row()
    assert row["cos_mean"] == pytest.approx((1.0 + 0.0) / 2)  # padding (cos = -1) excluded
    assert row["cos_last"] == pytest.approx(0.0)  # last valid token is the second


def test_streaming_equals_one_shot():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 9, 5, generator=g) * 3 + 1
    valid = torch.rand(12, 9, generator=g) > 0.3
    valid[:, 0] = True
    spec = StatsSpec(abs_thresholds=(1e-5, 0.1, 1.0), rel_taus=(0.05, 0.5))
    one = _SiteLayerStats(spec)
    one.update(x, valid)
    streamed = _SiteLayerStats(spec)
    for chunk in (slice(0, 1), slice(1, 5), slice(5, 12)):
        streamed.update(x[chunk], valid[chunk])
    a, b = one.row(), streamed.row()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-12), key  # per-batch moments are float32
    # and the element variance equals numpy's population variance of the valid entries
    assert a["elem_var"] == pytest.approx(np.var(x[valid].numpy().astype(np.float64)), rel=1e-6)


def test_padding_is_masked():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 3, generator=g)
    valid = torch.ones(2, 4, dtype=torch.bool)
    padded_x = torch.cat([x, torch.full((2, 3, 3), 1e3)], dim=1)
    padded_valid = torch.cat([valid, torch.zeros(2, 3, dtype=torch.bool)], dim=1)
    plain, padded = _stats(x, valid), _stats(padded_x, padded_valid)
    for key in ("elem_var", "elem_mean", "pooled_var_masked", "mean_abs", abs_column(0.5), rel_column(0.5)):
        assert plain[key] == pytest.approx(padded[key], rel=1e-9), key
    assert padded["pooled_var_padded"] != pytest.approx(plain["pooled_var_padded"])


def test_relative_sparsity_within_histogram_resolution():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 50, 40, generator=g)
    valid = torch.ones(4, 50, dtype=torch.bool)
    row = _stats(x, valid, StatsSpec(rel_taus=(0.1, 1.0)))
    std = x.double().std(unbiased=False)
    for tau in (0.1, 1.0):
        exact = float((x.abs() < tau * std).double().mean())
        assert row[rel_column(tau)] == pytest.approx(exact, rel=0.03)


@pytest.mark.parametrize("model_type", TINY_TYPES)
def test_collector_matches_hidden_states(model_type):
    model = tiny_model(model_type, n_layers=3)
    ids = torch.randint(3, 90, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    stats = collect_activation_stats(model, [{"input_ids": ids, "attention_mask": mask}], progress=False)
    assert set(stats["site"]) == set(SITES) and len(stats) == 3 * len(SITES)
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    block = stats[stats["site"] == "block_output"].set_index("layer")
    valid = mask.bool()
    for layer in range(2):  # the last entry of hidden_states has the final norm applied
        expected = hidden[layer + 1][valid].double()
        assert block.loc[layer, "elem_var"] == pytest.approx(float(expected.var(unbiased=False)), rel=1e-5)
        cos = torch.nn.functional.cosine_similarity(hidden[layer], hidden[layer + 1], dim=-1)[valid]
        assert block.loc[layer, "cos_mean"] == pytest.approx(float(cos.mean()), rel=1e-5)
    mlp = stats[stats["site"] == "mlp_activation"]
    assert (mlp["hidden"] == 32 if model_type not in ("gpt2",) else mlp["hidden"] == 64).all()


def test_hooks_removed_on_error():
    model = tiny_model("llama", n_layers=2)

    def boom(*args):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with site_hooks(model, SITES, boom):
            model(input_ids=torch.tensor([[3, 4]]))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    collector = ActivationStatsCollector(2, StatsSpec())
    with pytest.raises(RuntimeError, match="boom"):
        with site_hooks(model, SITES, collector):
            collector.set_mask(torch.ones(1, 2, dtype=torch.bool))
            raise RuntimeError("boom")
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_stat_mask_selects_tokens():
    model = tiny_model("llama", n_layers=2)
    ids = torch.randint(3, 90, (1, 6))
    mask = torch.ones(1, 6, dtype=torch.long)
    select = torch.tensor([[False, False, False, True, True, True]])
    stats = collect_activation_stats(model, [{"input_ids": ids, "attention_mask": mask, "stat_mask": select}],
                                     StatsSpec(sites=("block_output",)), progress=False)
    assert (stats["n_tokens"] == 3).all()
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    assert stats.loc[0, "elem_var"] == pytest.approx(float(hidden[1][0, 3:].double().var(unbiased=False)), rel=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"sites": ("block_outptu",)}, "unknown activation site"),
     ({"abs_thresholds": (0.0,)}, "positive"),
     ({"rel_taus": (-1.0,)}, "positive"),
     ({"abs_thresholds": (math.inf,)}, "positive")],
)
def test_bad_spec(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        StatsSpec(**kwargs)


def test_empty_calibration_set():
    with pytest.raises(ConfigError, match="calibration set is empty"):
        collect_activation_stats(tiny_model("llama", 2), [], progress=False)


def test_find_layers_unknown_architecture():
    from avss_lib.core.errors import ModelSpecError

    with pytest.raises(ModelSpecError, match="unsupported architecture Linear"):
        find_layers(torch.nn.Linear(2, 2))
