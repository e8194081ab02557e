"""Layer-importance baselines, pruning selection and ranking comparison against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from avss_lib.ranking.baselines import (
    angular_distance,
    block_angular_distances,
    block_influence,
    calibration_nll,
    greedy_removal_order,
    gromov_block,
    last_k_scores,
    last_token_states,
    prune_order,
    random_scores,
    removal_delta_ppl,
    select_lowest,
)
from avss_lib.core.errors import ConfigError, DataError
from avss_lib.core.layer_removal import remove_layers
from avss_lib.ranking.agreement import jaccard_matrix, spearman_matrix
from avss_lib.testing.tiny_models import tiny_model

SEQUENCES = [[1, 17, 33, 4, 58, 9, 71, 12], [1, 40, 41, 7, 90]]


def _right_padded(sequences: list[list[int]]) -> dict[str, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.tensor([s + [0] * (width - len(s)) for s in sequences])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
    return {"input_ids": ids, "attention_mask": mask}


def _manual_nll(model: torch.nn.Module, sequences: list[list[int]]) -> tuple[float, int]:
    """Sum of -log p(token t+1 | tokens <= t), one unpadded sequence at a time, token by token."""
    total, count = 0.0, 0
    for seq in sequences:
        with torch.no_grad():
            log_probs = torch.log_softmax(model(torch.tensor([seq])).logits[0].double(), dim=-1)
        for t in range(len(seq) - 1):
            total -= log_probs[t, seq[t + 1]].item()
            count += 1
    return total, count


def _manual_ppl(model: torch.nn.Module) -> float:
    total, count = _manual_nll(model, SEQUENCES)
    return math.exp(total / count)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_model("llama", 4, seed=1)


# --- score definitions ---------------------------------------------------------------------------

def test_block_influence_is_one_minus_cosine():
    assert np.allclose(block_influence([1.0, 0.5, -0.25, 0.9]), [0.0, 0.5, 1.25, 0.1])


def test_block_influence_keeps_series_layer_index():
    bi = block_influence(pd.Series([0.8, 0.2], index=[3, 7]))
    assert list(bi.index) == [3, 7] and np.allclose(bi.to_numpy(), [0.2, 0.8])


def test_angular_distance_hand_values():
    cos = [1.0, 0.0, -1.0, 0.5, math.sqrt(0.5), 1.00001]  # last: round-off above 1 is clipped
    assert np.allclose(angular_distance(cos), [0.0, 0.5, 1.0, 1 / 3, 0.25, 0.0])


@pytest.mark.parametrize("bad", [[0.5, 1.5], [0.5, float("nan")]])
def test_cosines_outside_range_or_nan_raise(bad):
    with pytest.raises(DataError):
        block_influence(bad)
    with pytest.raises(DataError):
        angular_distance(bad)


def test_last_k_order_on_six_layers():
    scores = last_k_scores(6)
    assert scores.tolist() == [5, 4, 3, 2, 1, 6]
    assert prune_order(scores) == [4, 3, 2, 1, 0, 5]
    assert select_lowest(scores, 2) == [3, 4]


def test_random_scores_reproducible_and_seed_dependent():
    first = random_scores(12, seed=0)
    assert np.array_equal(first, random_scores(12, seed=0))
    assert not np.array_equal(first, random_scores(12, seed=1))
    assert sorted(first.tolist()) == list(range(12))


# --- selection -----------------------------------------------------------------------------------

def test_prune_order_breaks_ties_by_layer_index_and_puts_inf_last():
    assert prune_order(np.array([0.5, 0.1, np.inf, 0.5, 0.1])) == [1, 4, 0, 3, 2]


def test_prune_order_uses_series_index():
    assert prune_order(pd.Series([3.0, 1.0, 2.0], index=[10, 11, 12])) == [11, 12, 10]


def test_prune_order_rejects_nan():
    with pytest.raises(DataError, match=r"\[1\]"):
        prune_order([0.2, float("nan"), 0.3])


def test_select_lowest():
    assert select_lowest([0.3, 0.1, 0.2, 0.9], 2) == [1, 2]
    assert select_lowest([0.3, 0.1, 0.2, 0.9], 0) == []
    with pytest.raises(ConfigError):
        select_lowest([0.3, 0.1], 3)


# --- calibration perplexity ----------------------------------------------------------------------

def test_calibration_nll_equals_token_by_token_sum(model):
    total, count = calibration_nll(model, [_right_padded(SEQUENCES)])
    expected_total, expected_count = _manual_nll(model, SEQUENCES)
    assert count == expected_count == 7 + 4
    assert total == pytest.approx(expected_total, rel=1e-5)


def test_calibration_nll_ignores_padding(model):
    # the masked-out tail holds real token ids, so counting it would change the sum
    padded_batch = {"input_ids": torch.tensor([SEQUENCES[1] + [55, 66, 77]]),
                    "attention_mask": torch.tensor([[1] * 5 + [0] * 3])}
    padded = calibration_nll(model, [padded_batch])
    unpadded = calibration_nll(model, [_right_padded([SEQUENCES[1]])])
    assert padded[1] == unpadded[1] == 4
    assert padded[0] == pytest.approx(unpadded[0], rel=1e-6)


def test_calibration_nll_rejects_left_padding(model):
    batch = {"input_ids": torch.tensor([[0, 0, 5, 6]]), "attention_mask": torch.tensor([[0, 0, 1, 1]])}
    with pytest.raises(DataError, match="right padded"):
        calibration_nll(model, [batch])


def test_removal_delta_ppl_equals_manual_difference(model):
    batches = iter([_right_padded(SEQUENCES[:1]), _right_padded(SEQUENCES[1:])])  # a one-shot iterator
    deltas = removal_delta_ppl(model, batches, progress=False)
    baseline = _manual_ppl(model)
    expected = [_manual_ppl(remove_layers(model, [layer])) - baseline for layer in range(4)]
    assert np.allclose(deltas, expected, rtol=0, atol=1e-4)  # float32 perplexities near 96 differ by ~1e-5
    assert np.ptp(deltas) > 1e-3  # the layers differ, so the test can tell them apart


def test_greedy_removal_order_matches_brute_force(model):
    batches = [_right_padded(SEQUENCES)]
    order = greedy_removal_order(model, batches, 2, progress=False)
    first = min(range(4), key=lambda c: _manual_ppl(remove_layers(model, [c])))
    second = min((c for c in range(4) if c != first), key=lambda c: _manual_ppl(remove_layers(model, [first, c])))
    assert order == [first, second]
    assert greedy_removal_order(model, batches, 0, progress=False) == []
    with pytest.raises(ConfigError):
        greedy_removal_order(model, batches, 4, progress=False)


# --- ranking comparison --------------------------------------------------------------------------

def test_spearman_matrix_hand_values():
    rho = spearman_matrix({
        "a": np.array([1.0, 2.0, 3.0, 4.0]),
        "reversed": np.array([40.0, 30.0, 20.0, 10.0]),
        "swap": np.array([2.0, 1.0, 3.0, 4.0]),  # d = (1, -1, 0, 0): rho = 1 - 6*2/(4*15) = 0.8
    })
    assert rho.loc["a", "a"] == pytest.approx(1.0)
    assert rho.loc["a", "reversed"] == pytest.approx(-1.0)
    assert rho.loc["a", "swap"] == pytest.approx(0.8)
    assert rho.loc["swap", "reversed"] == pytest.approx(-0.8)
    assert np.allclose(rho.to_numpy(), rho.to_numpy().T)


def test_spearman_matrix_aligns_series_and_handles_inf_and_constant():
    rho = spearman_matrix({
        "array": np.array([0.1, 0.2, 0.3]),
        "shuffled_series": pd.Series([0.3, 0.1, 0.2], index=[2, 0, 1]),  # same order once aligned
        "with_inf": np.array([1.0, 2.0, np.inf]),
        "constant": np.array([5.0, 5.0, 5.0]),
    })
    assert rho.loc["array", "shuffled_series"] == pytest.approx(1.0)
    assert rho.loc["array", "with_inf"] == pytest.approx(1.0)
    assert np.isnan(rho.loc["array", "constant"])


def test_spearman_matrix_rejects_different_layers():
    with pytest.raises(DataError):
        spearman_matrix({"a": np.arange(4.0), "b": np.arange(5.0)})


def test_jaccard_matrix_hand_values():
    jac = jaccard_matrix({"x": {1, 2, 3}, "y": {2, 3, 4, 5}, "z": set(), "w": set()})
    assert jac.loc["x", "y"] == pytest.approx(2 / 5)
    assert jac.loc["y", "x"] == pytest.approx(2 / 5)
    assert jac.loc["x", "x"] == 1.0
    assert jac.loc["x", "z"] == 0.0
    assert jac.loc["z", "w"] == 1.0


# --- Gromov et al.'s contiguous block ------------------------------------------------------------


def test_block_angular_distances_and_the_chosen_block_by_hand():
    # 4 layers, one sample in 2-D; the residual turns by 10° in layers 0 and 3 and by 60° in layers 1 and 2
    turns = np.radians([10.0, 60.0, 60.0, 10.0])
    angles = np.concatenate([[0.0], np.cumsum(turns)])
    states = np.stack([np.cos(angles), np.sin(angles)], axis=-1)[:, None, :]  # (5, 1, 2)
    inputs, outputs = states[:-1], states[1:]
    assert block_angular_distances(inputs, outputs, 1) == pytest.approx([10 / 180, 60 / 180, 60 / 180, 10 / 180])
    assert block_angular_distances(inputs, outputs, 2) == pytest.approx([70 / 180, 120 / 180, 70 / 180])
    assert gromov_block(inputs, outputs, 1) == [0]  # a tie with layer 3: the shallower block
    assert gromov_block(inputs, outputs, 3) == [0, 1, 2]  # 130° for both blocks of 3
    assert gromov_block(inputs, outputs, 0) == []
    # averaged over samples: a second sample that turns only in layers 1-2 moves the best pair to 2-3
    other = np.stack([np.cos(a := np.concatenate([[0.0], np.cumsum(np.radians([90.0, 0, 0, 90.0]))])),
                      np.sin(a)], axis=-1)[:, None, :]
    both = np.concatenate([states, other], axis=1)
    assert block_angular_distances(both[:-1], both[1:], 2) == pytest.approx([(70 + 90) / 360, 120 / 360,
                                                                             (70 + 90) / 360])
    with pytest.raises(ConfigError, match="block of 5"):
        block_angular_distances(inputs, outputs, 5)


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "opt"])
def test_last_token_states_are_the_models_hidden_states_at_the_last_real_token(model_type):
    model = tiny_model(model_type, 3, seed=2)
    batch = _right_padded(SEQUENCES)
    inputs, outputs = last_token_states(model, [batch])
    assert inputs.shape == outputs.shape == (3, 2, 16)
    with torch.no_grad():
        for row, seq in enumerate(SEQUENCES):  # unpadded, one at a time: HF's hidden_states[i] is layer i's input
            hidden = model(torch.tensor([seq]), output_hidden_states=True).hidden_states
            for layer in range(3):
                assert inputs[layer, row] == pytest.approx(hidden[layer][0, len(seq) - 1].double().numpy(), abs=1e-5)
            for layer in range(2):  # the last entry of hidden_states is after the final norm
                assert outputs[layer, row] == pytest.approx(inputs[layer + 1, row])
    with pytest.raises(DataError, match="no calibration batch"):
        last_token_states(model, [])
