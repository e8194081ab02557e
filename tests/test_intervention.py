"""The inference-time intervention of chapter 05: directions by hand, a shift that acts only while active, and a
strength chosen on the tuning questions with ties to the smaller strength."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from avss_lib.core.benchmarks import load_benchmark
from avss_lib.core.errors import ConfigError, DataError
from avss_lib.hallucination.directions import steering_vectors
from avss_lib.mitigation import intervention as iti
from avss_lib.testing.tiny_models import tiny_model, tiny_tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "data"


def test_direction_is_the_normalised_mean_shift_and_sigma_the_projection_spread() -> None:
    x = np.array([[1.0, 0.0], [3.0, 0.0], [0.0, 1.0], [0.0, 3.0]])
    hallucinated = np.array([False, False, True, True])
    v = steering_vectors({2: x}, hallucinated)["2"]
    expected = np.array([2.0, -2.0]) / np.sqrt(8)  # mean correct (2, 0) minus mean hallucinated (0, 2)
    np.testing.assert_allclose(v["direction"], expected)
    assert v["sigma"] == pytest.approx(np.std(x @ expected))
    with pytest.raises(DataError, match="both correct and hallucinated"):
        steering_vectors({2: x}, np.ones(4, dtype=bool))


def test_the_shift_acts_only_inside_the_context() -> None:
    model, tok = tiny_model("llama", n_layers=3, seed=0), tiny_tokenizer()
    ids = tok("Q: hi?\nA:", return_tensors="pt")["input_ids"]
    vectors = {str(layer): {"direction": [1.0] + [0.0] * 15, "sigma": 1.0} for layer in range(3)}
    with torch.no_grad():
        before = model(input_ids=ids).logits
        with iti.steer(model, vectors, [1], 4.0):
            shifted = model(input_ids=ids).logits
        with iti.steer(model, vectors, [1], 0.0):
            unshifted = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
    assert not torch.allclose(before, shifted)
    assert torch.equal(before, unshifted) and torch.equal(before, after)
    with pytest.raises(DataError, match="no steering direction"):
        with iti.steer(model, vectors, [5], 1.0):
            pass


def test_strength_is_tuned_on_the_given_questions_with_ties_to_the_smaller(monkeypatch) -> None:
    bench = load_benchmark("sciq", data_root=FIXTURES)
    seen = []

    def fake_answer(model, tokenizer, benchmark, *, shots=(), **options):
        seen.append([e.id for e in benchmark.examples])
        alpha = model.alpha_now
        correct = [alpha in (2.0, 4.0)] * len(benchmark.examples)  # 2 and 4 tie at the best accuracy
        return type("A", (), {"answers": pd.DataFrame({"correct": correct})})()

    class Stub(torch.nn.Module):
        alpha_now = 0.0

    stub = Stub()

    def fake_steer(model, vectors, layers, alpha):
        import contextlib
        model.alpha_now = alpha
        return contextlib.nullcontext(model)

    monkeypatch.setattr(iti, "answer_benchmark", fake_answer)
    monkeypatch.setattr(iti, "steer", fake_steer)
    alpha, grid = iti.tune_strength(stub, None, {"sciq": bench}, {}, [0], shots={}, alphas=(8.0, 4.0, 0.0, 2.0))
    assert alpha == 2.0 and grid["alpha"].tolist() == [0.0, 2.0, 4.0, 8.0]
    assert grid["accuracy"].tolist() == [0.0, 100.0, 100.0, 0.0]
    assert all(ids == [e.id for e in bench.examples] for ids in seen)
    with pytest.raises(ConfigError, match="alphas"):
        iti.tune_strength(stub, None, {"sciq": bench}, {}, [0], shots={}, alphas=(-1.0,))
