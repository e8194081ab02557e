"""Layer removal equals layer skipping, keeps cached generation working, and validates its input."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from avss_lib.core.errors import ConfigError, ModelSpecError
from avss_lib.core.layers import find_layers
from avss_lib.core.layer_removal import _identity_hook, layers_for_ratio, remove_layers, skip_layers
from avss_lib.testing.tiny_models import TINY_TYPES, tiny_model

N_LAYERS = 6  # Gemma-3's default pattern makes layers 0-4 sliding and layer 5 full attention
REMOVED = [1, 3]
KEPT = [0, 2, 4, 5]
# 9 tokens > Gemma-3's tiny sliding window of 4, so a wrong layer type would change the logits
IDS = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 13], [0, 0, 0, 20, 21, 22, 23, 24, 25]])
MASK = (IDS != 0).long()  # left padding on row 1, as for generation


@pytest.fixture(scope="module", params=TINY_TYPES)
def model_and_pruned(request):
    """A tiny 6-layer model of each architecture and its copy without layers 1 and 3."""
    model = tiny_model(request.param, N_LAYERS, seed=3)
    return model, remove_layers(model, REMOVED)


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=MASK).logits


def _generate(model: torch.nn.Module, use_cache: bool) -> torch.Tensor:
    return model.generate(input_ids=IDS, attention_mask=MASK, max_new_tokens=5, do_sample=False,
                          use_cache=use_cache, pad_token_id=0)


def test_pruned_logits_equal_skipped_original(model_and_pruned):
    model, pruned = model_and_pruned
    with skip_layers(model, REMOVED):
        expected = _logits(model)
    assert torch.allclose(_logits(pruned), expected, atol=1e-5)
    assert not torch.allclose(_logits(model), expected, atol=1e-3)  # skipping changed something


def test_pruned_cached_generation_equals_uncached(model_and_pruned):
    _, pruned = model_and_pruned
    assert torch.equal(_generate(pruned, use_cache=True), _generate(pruned, use_cache=False))


def test_pruned_generation_equals_skipped_original(model_and_pruned):
    model, pruned = model_and_pruned
    with skip_layers(model, REMOVED):
        expected = _generate(model, use_cache=True)
    assert torch.equal(_generate(pruned, use_cache=True), expected)


def test_pruned_structure_and_config(model_and_pruned):
    model, pruned = model_and_pruned
    decoder, original = find_layers(pruned), find_layers(model)
    assert len(decoder) == 4 and len(original) == N_LAYERS  # the original is untouched (deep copy)
    assert getattr(pruned.config, decoder.layout.layer_count_attr) == 4
    assert pruned.config.num_hidden_layers == 4
    for new, old in enumerate(KEPT):
        assert torch.equal(decoder.down_proj(new).weight, original.down_proj(old).weight)
        assert decoder.attention(new).layer_idx == new
        assert all(m.layer_idx == new for m in decoder.layers[new].modules() if hasattr(m, "layer_idx"))


def test_pruned_model_survives_save_and_reload(model_and_pruned, tmp_path):
    _, pruned = model_and_pruned
    pruned.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.num_hidden_layers == 4
    assert torch.allclose(_logits(reloaded), _logits(pruned), atol=1e-6)


def test_gemma3_layer_types_follow_kept_layers():
    model = tiny_model("gemma3_text", N_LAYERS)
    assert model.config.layer_types == ["sliding_attention"] * 5 + ["full_attention"]
    pruned = remove_layers(model, [0, 5])
    assert pruned.config.layer_types == ["sliding_attention"] * 4
    pruned = remove_layers(model, REMOVED)
    assert pruned.config.layer_types == ["sliding_attention"] * 3 + ["full_attention"]
    assert [layer.self_attn.is_sliding for layer in find_layers(pruned).layers] == [True, True, True, False]


def test_qwen2_max_window_layers_counts_kept_layers():
    model = tiny_model("qwen2", N_LAYERS)
    model.config.max_window_layers = 3  # layers 0, 1, 2 below the threshold
    pruned = remove_layers(model, [1, 4])  # keeps 0, 2 below it and 3, 5 above
    assert pruned.config.max_window_layers == 2
    assert len(pruned.config.layer_types) == 4


def test_inplace_modifies_and_returns_the_same_model():
    model = tiny_model("llama", 4)
    assert remove_layers(model, [0], inplace=True) is model
    assert len(find_layers(model)) == 3 and model.config.num_hidden_layers == 3


@pytest.mark.parametrize("bad", [[6], [-1], [2, 2], [1.5]])
def test_bad_indices_raise_config_error(bad):
    model = tiny_model("llama", N_LAYERS)
    with pytest.raises(ConfigError):
        remove_layers(model, bad)
    with pytest.raises(ConfigError):
        with skip_layers(model, bad):
            pass


def test_removing_every_layer_raises():
    with pytest.raises(ConfigError, match="keep at least one"):
        remove_layers(tiny_model("llama", 3), [2, 0, 1])


def test_heterogeneous_config_is_refused():
    model = tiny_model("llama", 4)
    model.config.per_layer_config = {1: {"rms_norm_eps": 1e-3}}
    with pytest.raises(ModelSpecError, match="per_layer_config"):
        remove_layers(model, [0])


def test_skipped_layer_outputs_its_input_and_hooks_are_removed():
    model = tiny_model("llama", 4)
    seen = {}

    def record(module, args, kwargs, output):
        seen["in"], seen["out"] = args[0], output

    later_hook = find_layers(model).layers[2].register_forward_hook(record, with_kwargs=True)
    before = _logits(model)
    assert not torch.equal(seen["in"], seen["out"])
    with skip_layers(model, [2]):
        _logits(model)
        assert torch.equal(seen["in"], seen["out"])  # other hooks see the skipped output
    later_hook.remove()
    assert torch.equal(_logits(model), before)


def test_skip_hooks_are_removed_after_an_error():
    model = tiny_model("llama", 4)
    before = _logits(model)
    with pytest.raises(RuntimeError):
        with skip_layers(model, [0, 1]):
            raise RuntimeError("boom")
    assert torch.equal(_logits(model), before)


def test_skip_handles_hidden_states_passed_by_keyword():
    model = tiny_model("opt", 2)
    hidden = torch.randn(1, 3, 16)
    with skip_layers(model, [0]), torch.no_grad():
        assert torch.equal(find_layers(model).layers[0](hidden_states=hidden), hidden)


def test_identity_hook_keeps_the_rest_of_a_tuple_output():
    hidden_in, hidden_out, extra = torch.zeros(2), torch.ones(2), object()
    layer = torch.nn.Identity()
    result = _identity_hook(layer, (hidden_in,), {}, (hidden_out, extra))
    assert result[0] is hidden_in and result[1] is extra and len(result) == 2
    with pytest.raises(ModelSpecError, match="returned dict"):
        _identity_hook(layer, (hidden_in,), {}, {"hidden_states": hidden_out})


@pytest.mark.parametrize(("n", "ratio", "rounding", "expected"), [
    (30, 0.25, "round", 8),  # 7.5 rounds half up
    (30, 0.24, "round", 7),  # 7.2
    (10, 0.25, "round", 3),  # 2.5 rounds half up
    (10, 0.25, "floor", 2),
    (10, 0.21, "ceil", 3),
    (10, 0.3, "ceil", 3),  # 0.3 * 10 = 3.0000000000000004 in floats
    (10, 0.01, "round", 1),  # at least one layer
    (10, 0.99, "round", 9),  # at most n - 1
])
def test_layers_for_ratio(n, ratio, rounding, expected):
    assert layers_for_ratio(n, ratio, rounding) == expected


@pytest.mark.parametrize(("n", "ratio", "rounding"), [(10, 0.0, "round"), (10, 1.0, "round"), (10, -0.2, "round"),
                                                      (1, 0.5, "round"), (10, 0.25, "nearest")])
def test_layers_for_ratio_rejects_bad_input(n, ratio, rounding):
    with pytest.raises(ConfigError):
        layers_for_ratio(n, ratio, rounding)
