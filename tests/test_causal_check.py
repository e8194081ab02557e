"""The causal check of E1: which layers are removed, on which questions, and the pooled table by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from avss_lib.core.errors import ConfigError, DataError
from avss_lib.core.splits import EVALUATION, split_datasets
from avss_lib.hallucination.causal import UNTOUCHED, answer_removed, causal_questions, causal_sets, causal_table
from avss_lib.hallucination.layer_rankings import pool_rankings, top_k_layers
from avss_lib.core.benchmarks import load_benchmark
from avss_lib.testing.tiny_models import tiny_model, tiny_tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "data"


def test_sets_are_the_pooled_top_and_bottom_and_seeded_random_draws() -> None:
    scores = {"a": pd.Series([0.1, 0.9, 0.5, 0.3, 0.0, 0.7]), "b": pd.Series([0.2, 0.8, 0.6, 0.1, 0.05, 0.9])}
    ranks = pool_rankings(scores)
    sets = causal_sets(ranks, 2, 6, draws=3, seed=1)
    assert sets["top-k EAVSS"] == [sorted(top_k_layers(-ranks["mean_rank"], 2))] == [[1, 5]]
    assert sets["bottom-k EAVSS"] == [[0, 4]]
    assert len(sets["k random"]) == 3 and all(len(set(s)) == 2 and set(s) <= set(range(6)) for s in sets["k random"])
    assert causal_sets(ranks, 2, 6, draws=3, seed=1) == sets
    assert causal_sets(pd.DataFrame(), 2, 6, draws=3, seed=1) == {}
    with pytest.raises(ConfigError, match="cannot be removed"):
        causal_sets(ranks, 6, 6, draws=1, seed=0)


def test_table_by_hand() -> None:
    untouched = pd.DataFrame({"dataset": ["d"] * 4, "id": list("abcd"), "correct": [True, False, True, True]})
    removed = pd.DataFrame(
        [{"set": "top-k EAVSS", "draw": 0, "layers": [1, 2], "dataset": "d", "id": i, "correct": c}
         for i, c in zip("abcd", [False, False, True, True])]
        + [{"set": "k random", "draw": d, "layers": [d, 3], "dataset": "d", "id": i, "correct": c}
           for d, cs in enumerate([[True, True, True, True], [True, False, False, True]]) for i, c in zip("abcd", cs)])
    table = causal_table(untouched, removed, n_resamples=500, seed=0).set_index("set")
    assert table.loc[UNTOUCHED, "hallucination_rate"] == pytest.approx(25.0) and np.isnan(table.loc[UNTOUCHED, "change"])
    assert table.loc["top-k EAVSS", "hallucination_rate"] == pytest.approx(50.0)
    assert table.loc["top-k EAVSS", "change"] == pytest.approx(25.0)
    assert table.loc["k random", "hallucination_rate"] == pytest.approx((0 + 50) / 2)
    assert table.loc["k random", "draws"] == 2 and table.loc["k random", "layers"] == "0, 3; 1, 3"
    for name, row in table.iterrows():
        assert row["low"] <= row["hallucination_rate"] <= row["high"]
    with pytest.raises(DataError, match="was not asked every question"):
        causal_table(untouched, removed[removed["id"] != "d"])


def test_questions_come_from_the_evaluation_half_and_the_removed_model_answers_them() -> None:
    bench = load_benchmark("sciq", data_root=FIXTURES)
    answers = pd.DataFrame({"dataset": "sciq", "id": [e.id for e in bench.examples],
                            "question": [e.question for e in bench.examples]})
    split = split_datasets(answers, ["sciq"], seed=0)
    questions = causal_questions(split, ["sciq"], None, seed=0, data_root=FIXTURES)
    held = set(split.loc[split["split"] == EVALUATION, "id"])
    assert {e.id for e in questions["sciq"].examples} == held
    assert len(causal_questions(split, ["sciq"], 1, seed=0, data_root=FIXTURES)["sciq"].examples) == 1
    model = tiny_model("llama", n_layers=3)
    rows = answer_removed(model, tiny_tokenizer(), questions, {"top-k EAVSS": [[1]], "k random": [[0], [2]]}, {},
                          progress=False)
    assert len(rows) == 3 * len(held) and set(rows["id"]) == held
    assert model.config.num_hidden_layers == 3  # the removal works on copies
