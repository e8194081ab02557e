"""Chapter 02's facts about the authors' AVSS, on hand-made statistics, and the phrases they choose (both ways)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from avss_lib.core.errors import ConfigError
from avss_lib.core.layers import norm_placement
from avss_lib.ranking import faithful
from avss_lib.ranking.avss import DEFAULT_VARIANTS, avss_scores, lowest_avss_layers, selections
from avss_lib.testing.tiny_models import tiny_config


def _stats(pooled, elem, below_counts, positions=10, hidden=4) -> pd.DataFrame:
    n = len(pooled)
    entries = positions * hidden
    return pd.DataFrame({"site": "block_output", "layer": range(n), "hidden": hidden, "n_positions": positions,
                         "pooled_var_padded": pooled, "elem_var": elem,
                         "sparsity_abs_1e-05_padded": np.asarray(below_counts, dtype=float) / entries})


def test_facts_of_a_growing_profile_with_one_jump():
    # pooled variance 1, 2, 40, 80: largest step x20 from layer 1 to 2; element variance x25 at that step
    stats = _stats([1.0, 2.0, 40.0, 80.0], [1.0, 2.0, 50.0, 90.0], [4, 0, 1, 16])
    scores = avss_scores(stats, DEFAULT_VARIANTS[0])  # authors_code
    facts = faithful.faithful_facts(stats, scores)
    assert (facts.n_layers, facts.entries_per_layer, facts.below_min, facts.below_max) == (4, 40, 0, 16)
    assert facts.zero_layers == [1] and facts.n_infinite == 1
    assert (facts.jump_layer, facts.jump_pooled, facts.elem_jump) == (1, 20.0, 25.0)
    assert facts.poisson_se_min == pytest.approx(100 / 4) and facts.poisson_se_max == pytest.approx(100.0)
    assert facts.depth_rho == pytest.approx(1.0)
    # finite layers 0, 2, 3: AVSS = var/S = (1/173)/0.1, (40/173)/0.025, (80/173)/0.4 -> ranks 1, 3, 2; var 1, 2, 3
    assert facts.rho_with_variance == pytest.approx(0.5)
    assert faithful.depth_phrase(facts.depth_rho) == "grows with depth"
    assert faithful.jump_phrase(facts.elem_jump).startswith("a jump of this size")
    assert faithful.scale_reading(facts.rho_with_variance).startswith("the faithful AVSS therefore mixes")


def test_phrases_follow_the_numbers_the_other_way():
    assert faithful.depth_phrase(-0.9) == "shrinks with depth"
    assert faithful.depth_phrase(0.3) == "does not change monotonically with depth"
    assert faithful.jump_phrase(2.0) == "a step too small to single out one layer"
    assert faithful.scale_reading(0.95).startswith("the faithful AVSS is therefore a ranking by activation scale")
    assert faithful.scale_reading(float("nan")).startswith("with fewer than three")
    assert faithful.infinite_phrase(0) == "No layer has $S = 0$, so every faithful score is finite."
    assert faithful.infinite_phrase(3).startswith("For those 3 layer(s)")
    assert faithful.poisson_phrase(float("nan"), float("nan")) == "" and faithful.rho_phrase(float("nan")) == ""


def test_selection_facts_find_the_prefix_and_the_empty_rule():
    stats = _stats([1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0], [20, 4, 24, 8])
    scores = pd.concat([avss_scores(stats, v) for v in DEFAULT_VARIANTS[:1]])
    table = selections(scores, ratio=0.25, threshold=0.25)
    facts = faithful.selection_facts(table)
    assert facts.n_variants == 1 and facts.common == [0] and facts.empty_variants == []
    assert facts.prefix_variants == ["authors_code"]  # the cumulative sum in layer order prunes layer 0 first
    assert faithful.authors_rule_phrase([], []).startswith("The authors' published rule selects neither")


def test_lowest_avss_layers_is_the_fixed_fraction_selection():
    stats = _stats([1.0, 2.0, 3.0, 4.0, 5.0], [1.0] * 5, [5, 1, 2, 30, 3])
    scores = avss_scores(stats, DEFAULT_VARIANTS[0])
    fixed = selections(scores, ratio=0.4).set_index("rule").loc["fixed_fraction", "layers"]
    assert lowest_avss_layers(scores, "authors_code", len(fixed)) == fixed == [0, 3]
    with pytest.raises(ConfigError, match="no AVSS variant 'nope'"):
        lowest_avss_layers(scores, "nope", 2)
    with pytest.raises(ConfigError, match="k=6"):
        lowest_avss_layers(scores, "authors_code", 6)


@pytest.mark.parametrize("model_type, expected", [("llama", "pre"), ("gemma3_text", "pre+post"), ("gpt2", "pre")])
def test_norm_placement(model_type, expected):
    assert norm_placement(tiny_config(model_type)) == expected
    assert faithful.norm_phrase(expected).startswith("On this")


def test_glue_values_are_the_facts():
    stats = _stats([1.0, 2.0, 40.0, 80.0], [1.0, 2.0, 50.0, 90.0], [4, 0, 1, 16])
    glued = faithful.faithful_facts(stats, avss_scores(stats, DEFAULT_VARIANTS[0])).glue()
    assert glued["faithful_zero_layers"] == "1" and glued["faithful_jump_next"] == 2
    assert glued["faithful_threshold"] == "$|a| < 1e-05$" and not any(isinstance(v, bool) for v in glued.values())
    assert all(not (isinstance(v, float) and math.isnan(v)) for v in glued.values())


@pytest.mark.parametrize(("model_type", "extra", "opening"), [
    ("llama", {}, "On this pre-norm model"), ("gemma3_text", {}, "On this model with pre- and post-norms"),
    ("opt", {"do_layer_norm_before": False}, "On this post-norm model")])
def test_norm_phrase_follows_the_models_config(model_type, extra, opening):
    from types import SimpleNamespace

    assert faithful.norm_phrase(norm_placement(SimpleNamespace(model_type=model_type, **extra))).startswith(opening)
