"""The contrastive objective: hand-computed losses, gradient signs, and masked sequence scoring."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from avss_lib.mitigation.contrastive_loss import (
    AnswerLogprobs,
    ContrastiveExample,
    combined_loss,
    encode_pairs,
    infonce_loss,
    lm_loss,
    margin_loss,
    score_examples,
    sequence_logprobs,
    shared_prompt_logprobs,
)
from avss_lib.core.errors import ConfigError, DataError
from avss_lib.testing.tiny_models import TINY_TYPES, tiny_model, tiny_tokenizer

TOK = tiny_tokenizer()


# --- losses on hand-computed inputs -------------------------------------------------------------


def test_infonce_hand_computed() -> None:
    pos, neg = torch.tensor([0.0]), torch.tensor([[-1.0, -2.0]])
    expected = -math.log(1 / (1 + math.exp(-1) + math.exp(-2)))  # 0.40760...
    assert infonce_loss(pos, neg, temperature=1.0).item() == pytest.approx(expected, rel=1e-6)
    expected_t2 = -math.log(1 / (1 + math.exp(-0.5) + math.exp(-1)))
    assert infonce_loss(pos, neg, temperature=2.0).item() == pytest.approx(expected_t2, rel=1e-6)


def test_infonce_masked_negative_is_ignored() -> None:
    pos = torch.tensor([0.0, 0.0])
    neg = torch.tensor([[-1.0, 5.0], [-1.0, -2.0]])
    mask = torch.tensor([[True, False], [True, True]])
    out = infonce_loss(pos, neg, neg_mask=mask)
    assert out[0].item() == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-6)
    assert out[1].item() == pytest.approx(math.log(1 + math.exp(-1) + math.exp(-2)), rel=1e-6)


@pytest.mark.parametrize("kind", ["infonce", "margin"])
def test_gradient_pulls_positive_up_and_negatives_down(kind: str) -> None:
    pos = torch.tensor([-1.0], requires_grad=True)
    neg = torch.tensor([[-0.5, -1.2]], requires_grad=True)
    loss = infonce_loss(pos, neg) if kind == "infonce" else margin_loss(pos, neg, margin=0.5)
    loss.sum().backward()
    assert pos.grad.item() < 0
    assert (neg.grad > 0).all()


def test_margin_hand_computed_and_zero_when_separated() -> None:
    pos, neg = torch.tensor([0.0]), torch.tensor([[-1.0, -0.05]])
    # hinges: max(0, 0.1 - 0 - 1) = 0 and max(0, 0.1 - 0 - 0.05) = 0.05; mean 0.025
    assert margin_loss(pos, neg, margin=0.1).item() == pytest.approx(0.025, rel=1e-6)
    assert margin_loss(pos, torch.tensor([[-1.0, -0.5]]), margin=0.1).item() == 0.0
    masked = margin_loss(pos, neg, margin=0.1, neg_mask=torch.tensor([[True, False]]))
    assert masked.item() == 0.0


def test_lm_loss_is_token_level_mean() -> None:
    pos = AnswerLogprobs(sums=torch.tensor([-2.0, -3.0]), counts=torch.tensor([2.0, 4.0]))
    assert lm_loss(pos).item() == pytest.approx(5 / 6)  # not the mean of per-answer means (0.875)


def test_combined_loss_weights_and_lm_only_ablation() -> None:
    pos = AnswerLogprobs(sums=torch.tensor([0.0]), counts=torch.tensor([1.0]))
    neg = torch.tensor([[-1.0, -2.0]])
    con = math.log(1 + math.exp(-1) + math.exp(-2))
    parts = combined_loss(pos, neg, None, lambda_con=2.0, lambda_lm=3.0)
    assert parts.total.item() == pytest.approx(2 * con + 3 * 0.0, rel=1e-6)
    lm_only = combined_loss(AnswerLogprobs(torch.tensor([-4.0]), torch.tensor([2.0])), None, None, lambda_con=0.0)
    assert lm_only.total.item() == pytest.approx(2.0)
    assert math.isnan(lm_only.con.item())
    margin = combined_loss(pos, neg, None, loss="margin", margin=1.5, lambda_lm=0.0)
    assert margin.total.item() == pytest.approx(((1.5 - 1) + 0.0) / 2)


def test_loss_input_errors() -> None:
    with pytest.raises(ConfigError, match="temperature"):
        infonce_loss(torch.zeros(1), torch.zeros(1, 2), temperature=0.0)
    with pytest.raises(ConfigError, match="pos \\[B\\]"):
        infonce_loss(torch.zeros(2), torch.zeros(3, 2))
    with pytest.raises(DataError, match="no negative"):
        margin_loss(torch.zeros(1), torch.zeros(1, 2), neg_mask=torch.zeros(1, 2, dtype=torch.bool))
    with pytest.raises(ConfigError, match="unknown contrastive loss"):
        combined_loss(AnswerLogprobs(torch.zeros(1), torch.ones(1)), torch.zeros(1, 1), None, loss="hinge")


# --- tokenisation and sequence scores ----------------------------------------------------------


def test_encode_pairs_masks_answer_tokens_and_right_pads() -> None:
    batch = encode_pairs(TOK, ["Q:ab", "Q:a"], ["xy", "zzzz"])
    assert batch.input_ids.shape == (2, 7)
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1]]
    assert batch.answer_mask.int().tolist() == [[0, 0, 0, 0, 1, 1, 0], [0, 0, 0, 1, 1, 1, 1]]
    assert batch.input_ids[0, 6].item() == TOK.pad_token_id


def test_encode_pairs_pads_with_the_eos_token_without_a_pad_token() -> None:
    tok = tiny_tokenizer()
    tok.pad_token = None
    batch = encode_pairs(tok, ["Q:ab", "Q:a"], ["x", "y"])
    assert batch.input_ids[1, -1].item() == tok.eos_token_id == 2
    tok.eos_token = None
    with pytest.raises(ConfigError, match="neither a pad nor an eos token"):
        encode_pairs(tok, ["Q:ab", "Q:a"], ["x", "y"])


def test_encode_pairs_truncates_prompt_from_the_left() -> None:
    batch = encode_pairs(TOK, ["abcdef"], ["xyz"], max_length=5)
    assert "".join(TOK.convert_ids_to_tokens(batch.input_ids[0].tolist())) == "efxyz"
    assert batch.answer_mask.int().tolist() == [[0, 0, 1, 1, 1]]


def test_empty_answer_raises() -> None:
    with pytest.raises(DataError, match="no tokens"):
        encode_pairs(TOK, ["Q:"], [""])


def _manual_score(model: torch.nn.Module, prompt: str, answer: str) -> float:
    """Mean over answer tokens of log p(token | everything before it), one unpadded sequence."""
    p_ids = TOK(prompt)["input_ids"]
    a_ids = TOK(answer, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p_ids + a_ids])
    with torch.no_grad():
        logp = F.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    total = sum(logp[len(p_ids) + t - 1, a_ids[t]].item() for t in range(len(a_ids)))
    return total / len(a_ids)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_sequence_logprobs_matches_manual_computation(model_type: str) -> None:
    model = tiny_model(model_type, n_layers=2, seed=3)
    with torch.no_grad():
        scores = sequence_logprobs(model, TOK, ["Q: hi?\nA:"], [" yes"])
    assert scores.shape == (1,)
    assert scores.item() == pytest.approx(_manual_score(model, "Q: hi?\nA:", " yes"), abs=1e-5)


@pytest.mark.parametrize("model_type", TINY_TYPES)
def test_padding_does_not_change_scores(model_type: str) -> None:
    model = tiny_model(model_type, n_layers=2, seed=1)
    short = ("Q: a?\nA:", " b")
    long = ("Q: a much longer question here?\nA:", " and a longer answer too")
    with torch.no_grad():
        alone = sequence_logprobs(model, TOK, [short[0]], [short[1]])
        batched = sequence_logprobs(model, TOK, [short[0], long[0]], [short[1], long[1]])
        pre_tokenised = sequence_logprobs(model, encode_pairs(TOK, [long[0], short[0]], [long[1], short[1]]))
    assert batched[0].item() == pytest.approx(alone.item(), abs=1e-5)
    assert pre_tokenised[1].item() == pytest.approx(alone.item(), abs=1e-5)


def test_score_examples_arranges_negatives_with_mask() -> None:
    model = tiny_model("llama", n_layers=2, seed=0)
    examples = [
        ContrastiveExample("a", "Q: x?\nA:", " yes", (" no",)),
        ContrastiveExample("b", "Q: y?\nA:", " up", (" down", " left")),
    ]
    with torch.no_grad():
        scored = score_examples(model, TOK, examples, score="mean")
        lm_only = score_examples(model, TOK, examples, with_negatives=False)
    assert scored.neg_mask.tolist() == [[True, False], [True, True]]
    assert scored.neg_scores[1, 1].item() == pytest.approx(_manual_score(model, "Q: y?\nA:", " left"), abs=1e-5)
    assert scored.neg_scores[0, 0].item() == pytest.approx(_manual_score(model, "Q: x?\nA:", " no"), abs=1e-5)
    assert scored.pos.counts.tolist() == [4.0, 3.0]
    assert torch.allclose(scored.pos.scores, lm_only.pos.scores, atol=1e-6)
    assert lm_only.neg_scores is None


def test_a_questions_answers_keep_one_prompt_window_under_max_length() -> None:
    """Cut to 8 tokens (a token a char), "abcdefgh" keeps the 4 characters its longest answer " zzz" leaves before
    each of its answers (the pair with " x" alone would keep 6); "Q:ijklmn" keeps the 5 that " yy" leaves."""
    model = tiny_model("llama", n_layers=2, seed=0)
    examples = [ContrastiveExample("a", "abcdefgh", " x", (" zzz",)),
                ContrastiveExample("b", "Q:ijklmn", " yy", (" w",))]
    with torch.no_grad():
        scored = score_examples(model, TOK, examples, max_length=8, score="mean")
        plain = score_examples(model, TOK, examples, max_length=8, score="mean", share_prompts=False)
    assert scored.pos.counts.tolist() == [2.0, 3.0]
    assert scored.pos.scores[0].item() == pytest.approx(_manual_score(model, "efgh", " x"), abs=1e-5)
    assert scored.neg_scores[0, 0].item() == pytest.approx(_manual_score(model, "efgh", " zzz"), abs=1e-5)
    assert scored.pos.scores[1].item() == pytest.approx(_manual_score(model, "jklmn", " yy"), abs=1e-5)
    assert scored.neg_scores[1, 0].item() == pytest.approx(_manual_score(model, "jklmn", " w"), abs=1e-5)
    assert torch.allclose(scored.neg_scores, plain.neg_scores, atol=1e-5)
    single = encode_pairs(TOK, ["abcdefgh"], [" x"], max_length=8)  # one pair alone: its own window
    assert "".join(TOK.convert_ids_to_tokens(single.input_ids[0].tolist())) == "cdefgh x"


# --- each prompt run once for all of its answers ---------------------------------------------------

SHARED_EXAMPLES = [
    ContrastiveExample("a", "Q: what is x?\nA:", " yes", (" no", " maybe not")),
    ContrastiveExample("b", "Q: y?\nA:", " up", (" down",)),
    ContrastiveExample("c", "Some longer prompt here. Q: z?\nA:", " left side", (" right", " centre", " top")),
]


def _input_positions(model: torch.nn.Module) -> list[int]:
    """Token positions fed to ``model`` per forward, recorded by a hook on its input embedding."""
    seen: list[int] = []
    model.get_input_embeddings().register_forward_hook(lambda _m, args, _out: seen.append(args[0].numel()))
    return seen


@pytest.mark.parametrize("model_type", TINY_TYPES)
def test_shared_prompts_give_the_scores_and_gradients_of_one_sequence_per_answer(model_type: str) -> None:
    """Scoring a question's answers on its prompt's shared keys and values gives the scores and the gradients of
    scoring each answer as a full sequence, for fewer token positions."""
    model = tiny_model(model_type, n_layers=2, seed=4)
    if model_type == "gemma3_text":
        model.config.sliding_window = 512  # the tiny config's window of 4 would send the batch down the plain path
    positions = _input_positions(model)
    results = {}
    for share in (False, True):
        model.zero_grad()
        positions.clear()
        scored = score_examples(model, TOK, SHARED_EXAMPLES, share_prompts=share)
        combined_loss(scored.pos, scored.neg_scores, scored.neg_mask).total.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        results[share] = scored, grads, sum(positions)
    (plain, plain_grads, plain_positions), (shared, shared_grads, shared_positions) = results[False], results[True]
    assert torch.allclose(shared.pos.sums, plain.pos.sums, atol=1e-5)
    assert torch.allclose(shared.pos.counts, plain.pos.counts)
    assert torch.allclose(shared.neg_scores, plain.neg_scores, atol=1e-5)
    assert len(shared_grads) == len(plain_grads) > 0
    assert all(torch.allclose(g, h, atol=1e-5) for g, h in zip(shared_grads, plain_grads))
    bos = int(model_type == "gemma3_text")  # the harness adds BOS for Gemma only
    longest = max(len(ex.prompt) + max(len(a) for a in (ex.positive, *ex.negatives)) for ex in SHARED_EXAMPLES)
    assert plain_positions == 9 * (bos + longest)  # nine answers right-padded to the longest pair, a token a char
    assert shared_positions < plain_positions / 2


def test_shared_prompts_fall_back_where_sharing_is_impossible_or_useless() -> None:
    """No shared prompt, a one-token prompt, or a padded width past a sliding window: the plain path scores."""
    llama = tiny_model("llama", n_layers=2, seed=0)
    two_answers = [(list(TOK("Q: x?A: yes")["input_ids"]), 4), (list(TOK("Q: x?A: no")["input_ids"]), 3)]
    assert shared_prompt_logprobs(llama, two_answers, pad=0) is not None
    assert shared_prompt_logprobs(llama, two_answers[:1], pad=0) is None  # a prompt with one answer
    assert shared_prompt_logprobs(llama, [([5, 6, 7], 2), ([5, 8], 1)], pad=0) is None  # a one-token prompt
    gemma = tiny_model("gemma3_text", n_layers=2, seed=0)  # sliding window 4
    assert shared_prompt_logprobs(gemma, two_answers, pad=0) is None
    with torch.no_grad():
        windowed = score_examples(gemma, TOK, SHARED_EXAMPLES)
        plain = score_examples(gemma, TOK, SHARED_EXAMPLES, share_prompts=False)
    assert torch.equal(windowed.pos.sums, plain.pos.sums) and torch.equal(windowed.neg_scores, plain.neg_scores)


# --- training scores answers the way the evaluation harness does -----------------------------------


def _bos_tokenizer():
    """The tiny tokenizer with a post-processor that prepends BOS, as Llama-family tokenizers do."""
    from tokenizers import processors

    tok = tiny_tokenizer()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    assert tok("ab")["input_ids"][0] == tok.bos_token_id
    return tok


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_training_scores_equal_the_harness_loglikelihood(model_type: str) -> None:
    """The summed training score of an answer is the harness's log-likelihood of the same request: the same
    context/continuation split and BOS only where the harness adds it (Gemma), even with a tokenizer that would
    add BOS itself; the mean score is that divided by the answer's tokens."""
    from avss_lib.core.harness import default_add_bos, loglikelihood

    tok = _bos_tokenizer()
    model = tiny_model(model_type, n_layers=2, seed=2)
    example = ContrastiveExample("q", "Q: what is it?\nA:", " a cat", (" a dog", " none"))
    with torch.no_grad():
        scored = score_examples(model, tok, [example], score="sum")
        mean = score_examples(model, tok, [example], score="mean")
    requests = [(example.prompt, a) for a in (example.positive, *example.negatives)]
    harness = loglikelihood(model, tok, requests)
    assert scored.pos.sums.item() == pytest.approx(harness[0].logprob, abs=1e-5)
    assert scored.neg_scores[0].tolist() == pytest.approx([r.logprob for r in harness[1:]], abs=1e-5)
    assert mean.neg_scores[0].tolist() == pytest.approx([r.logprob / r.n_tokens for r in harness[1:]], abs=1e-5)
    batch = encode_pairs(tok, [example.prompt], [example.positive], add_bos=default_add_bos(model))
    assert (int(batch.input_ids[0, 0]) == tok.bos_token_id) == (model_type == "gemma3_text")


def test_unknown_score_kind_raises() -> None:
    with pytest.raises(ConfigError, match="unknown score"):
        AnswerLogprobs(sums=torch.tensor([1.0]), counts=torch.tensor([1.0])).score("max")
