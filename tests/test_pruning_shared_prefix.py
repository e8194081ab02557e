"""TruthfulQA on a model that encodes the shared primer once gives the plain model's numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from avss_lib.core.benchmarks import load_benchmark
from avss_lib.core.errors import ConfigError
from avss_lib.core.tasks import PROMPTS, TRUTHFULQA_PRIMER, evaluate_task
from avss_lib.pruning.shared_prefix import SharedPrefixLM, truthfulqa_prefix_ids
from avss_lib.testing.tiny_models import tiny_model, tiny_tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "data"


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_shared_prefix_logits_equal_plain_model(tok, model_type):
    model = tiny_model(model_type, 3, seed=4)
    prefix = tok("Q: a shared primer.\n\n", add_special_tokens=False)["input_ids"]
    rows = [prefix + tok("Q: one?", add_special_tokens=False)["input_ids"], prefix + [10, 11]]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    wrapped = SharedPrefixLM(model, prefix)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        got = wrapped(input_ids=ids, attention_mask=mask).logits
        other = torch.tensor([[5, 6, 7, 8]])
        fallback = wrapped(input_ids=other, attention_mask=torch.ones_like(other)).logits
    assert wrapped.hits == 1
    assert got.shape == expected.shape
    assert torch.allclose(got[mask.bool()], expected[mask.bool()], atol=1e-5)
    assert torch.allclose(fallback, model(input_ids=other).logits, atol=1e-6)
    assert wrapped.hits == 1  # the non-prefixed batch went to the plain model


def test_truthfulqa_mc_with_shared_prefix_matches_plain_evaluation(tok):
    llama = tiny_model("llama", 6, seed=2)
    bench = load_benchmark("truthfulqa_mc", data_root=FIXTURES)
    wrapped = SharedPrefixLM(llama, truthfulqa_prefix_ids(tok))
    plain = evaluate_task(llama, tok, bench, batch_size=3)
    shared = evaluate_task(wrapped, tok, bench, batch_size=3)
    assert wrapped.hits > 0  # the scoring went through the cached primer
    for a, b in zip(plain.per_example["logliks"], shared.per_example["logliks"]):
        assert np.allclose(a, b, atol=1e-4)
    assert np.allclose(plain.per_example["mc2"], shared.per_example["mc2"], atol=1e-5)


def test_truthfulqa_prefix_is_the_primer_but_its_last_token(tok):
    prefix = truthfulqa_prefix_ids(tok)
    # one token per character, no merge across the boundary: the primer minus its last token (kept in the scored part)
    assert tok.decode(prefix) == TRUTHFULQA_PRIMER[:-1]
    for question in ("What is it?", "Why?"):
        ids = tok(PROMPTS["truthfulqa"].format(question=question) + " An answer", add_special_tokens=False)["input_ids"]
        assert ids[:len(prefix)] == prefix and len(ids) > len(prefix)


def test_shared_prefix_rejects_empty_prefix():
    with pytest.raises(ConfigError, match="empty"):
        SharedPrefixLM(tiny_model("llama", 2), [])
