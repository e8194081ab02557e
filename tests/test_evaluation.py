"""The evaluation harness on tiny random models with a character-level tokenizer."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerFast

import avss_lib.core.harness as ev
import avss_lib.core.perplexity as perplexity
import avss_lib.core.tasks as tasks
from avss_lib.core.benchmarks import load_benchmark
from avss_lib.core.errors import ConfigError
from avss_lib.core.metrics import choice_lengths, choice_probabilities, mc2_score
from avss_lib.testing.tiny_models import tiny_model, tiny_tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "data"
@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return tiny_tokenizer()


def ids(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def manual_logprob(model: torch.nn.Module, context: list[int], continuation: list[int]) -> float:
    """Unpadded single-sequence reference: sum of log p(continuation token | everything before it)."""
    full = torch.tensor([context + continuation])
    with torch.no_grad():
        logp = F.log_softmax(model(input_ids=full).logits[0].float(), dim=-1)
    return sum(float(logp[len(context) + k - 1, t]) for k, t in enumerate(continuation))


REQUESTS = [
    ("Question: what is a glorp?\nAnswer:", " a made-up animal"),
    ("Q:", " no"),
    ("A fairly long context that is padded the least, ", "end"),
    ("Short", " yes"),
    ("Q:", " no"),  # duplicate: computed once
]


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "opt", "gemma3_text"])
def test_loglikelihood_batched_equals_unbatched_and_manual(tok: PreTrainedTokenizerFast, model_type: str) -> None:
    model = tiny_model(model_type, n_layers=2, seed=1)
    batched = ev.loglikelihood(model, tok, REQUESTS, batch_size=4)
    single = [ev.loglikelihood(model, tok, [r], batch_size=1)[0] for r in REQUESTS]
    add_bos = model_type == "gemma3_text"
    for (context, continuation), b, s in zip(REQUESTS, batched, single):
        ctx_ids, cont_ids = ev.encode_pair(tok, context, continuation, add_bos=add_bos)
        assert b.n_tokens == s.n_tokens == len(cont_ids)
        assert b.logprob == pytest.approx(s.logprob, abs=1e-4)
        assert b.logprob == pytest.approx(manual_logprob(model, ctx_ids, cont_ids), abs=1e-4)
    assert batched[1] == batched[4]


PRIMER = "Q: What colour is a clear sky?\nA: Blue.\n\nQ: "
SHARED = [(PRIMER + q + "\nA:", c) for q in ("How many legs has a cat?", "What is two and two?", "Name a planet.")
          for c in (" Four.", " Five and six.", " Mars.", " I have no comment.")]
LONG_TAILS = [("Q: hi?\nA:", " " + "a long answer sentence that dwarfs its short question " * k) for k in (1, 2)]


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gpt2", "gpt_neox", "opt", "gemma3_text"])
def test_shared_context_scores_equal_one_forward_per_request(tok: PreTrainedTokenizerFast, model_type: str,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model(model_type, n_layers=3, seed=5)
    if model_type == "gemma3_text":
        model.config.sliding_window = 512  # the tiny config's window of 4 would send every chunk down the plain path
    shared_rows = []
    score_shared = ev._score_shared
    monkeypatch.setattr(ev, "_score_shared", lambda m, batch, *a: shared_rows.extend(
        len(reqs) for _, reqs in batch) or score_shared(m, batch, *a))
    requests = SHARED + LONG_TAILS + REQUESTS
    shared = ev.loglikelihood(model, tok, requests, batch_size=2)
    plain = ev.loglikelihood(model, tok, requests, batch_size=2, share_context=False)
    assert sorted(shared_rows) == [4, 4, 4]  # the three questions' choices; the long answers and the rest go plain
    for a, b in zip(shared, plain):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
        assert (a.is_greedy, a.n_tokens) == (b.is_greedy, b.n_tokens)
    add_bos = model_type == "gemma3_text"
    context, continuation = SHARED[5]
    assert shared[5].logprob == pytest.approx(manual_logprob(model, *ev.encode_pair(tok, context, continuation,
                                                                                    add_bos=add_bos)), abs=1e-4)


def test_shared_context_takes_the_common_prefix_once_and_respects_a_sliding_window(
        tok: PreTrainedTokenizerFast, monkeypatch: pytest.MonkeyPatch) -> None:
    contexts = [tuple(ids(tok, PRIMER + q)) for q in ("a?", "bc?", "de?")]
    assert ev._common_prefix(contexts) == tuple(ids(tok, PRIMER))  # one token per character here
    assert ev._common_prefix(contexts[:1]) == () and ev._common_prefix([(1, 2, 3), (1, 2, 4)]) == ()  # < 8 tokens
    encoded = [([0] * 10 + [1], [1]), ([0] * 10 + [2], [2]), ([5] + [3] * 30, [3] * 30), ([5] + [4] * 30, [4] * 30)]
    assert ev._worth_sharing(tuple([0] * 10), [0, 1], encoded)  # 10 context tokens saved, 2 continuation tokens
    assert not ev._worth_sharing((5,), [2, 3], encoded) and not ev._worth_sharing((), [0, 1], encoded)
    prefixes = []
    prefix_cache = ev._prefix_cache
    monkeypatch.setattr(ev, "_prefix_cache", lambda m, p: prefixes.append(len(p)) or prefix_cache(m, p))
    ev.loglikelihood(tiny_model("llama", n_layers=2, seed=1), tok, SHARED, batch_size=2)
    assert prefixes == [len(ids(tok, PRIMER))]  # the primer, computed once for the call's two chunks
    gemma = tiny_model("gemma3_text", n_layers=2, seed=1)  # sliding window 4: every chunk is too wide to share
    windowed = ev.loglikelihood(gemma, tok, SHARED, batch_size=4)
    assert windowed == ev.loglikelihood(gemma, tok, SHARED, batch_size=4, share_context=False)
    assert prefixes == [len(ids(tok, PRIMER))]  # nothing shared, so no prefix computed


def test_encode_pair_moves_trailing_space_and_handles_empty_context(tok: PreTrainedTokenizerFast) -> None:
    context, continuation = ev.encode_pair(tok, "Answer: ", "yes")
    assert context == ids(tok, "Answer:") and continuation == ids(tok, " yes")
    context, continuation = ev.encode_pair(tok, "", "hi")
    assert context == [tok.bos_token_id] and continuation == ids(tok, "hi")
    context, _ = ev.encode_pair(tok, "Q", "x", add_bos=True)
    assert context == [tok.bos_token_id] + ids(tok, "Q")
    with pytest.raises(ConfigError, match="encodes to no tokens"):
        ev.encode_pair(tok, "Q", "")


def test_loglikelihood_truncates_context_from_the_left(tok: PreTrainedTokenizerFast) -> None:
    model = tiny_model("llama", n_layers=2, seed=0)
    context, continuation = "0123456789abcdefghij", " end"
    result = ev.loglikelihood(model, tok, [(context, continuation)], max_length=10)[0]
    whole = ids(tok, context + continuation)  # 24 tokens -> input = the last 11 minus the final one
    kept = whole[-11:]
    assert result.logprob == pytest.approx(manual_logprob(model, kept[:-4], kept[-4:]), abs=1e-4)
    with pytest.raises(ConfigError, match="exceeds max_length"):
        ev.loglikelihood(model, tok, [("a", " a long continuation")], max_length=5)


def test_is_greedy_flag(tok: PreTrainedTokenizerFast) -> None:
    model = tiny_model("gpt2", n_layers=1, seed=0)
    context = ids(tok, "Q:")
    with torch.no_grad():
        best = int(model(input_ids=torch.tensor([context])).logits[0, -1].argmax())
    continuation = tok.decode([best])
    assert ev.loglikelihood(model, tok, [("Q:", continuation)])[0].is_greedy
    other = "a" if continuation != "a" else "b"
    assert not ev.loglikelihood(model, tok, [("Q:", other)])[0].is_greedy


# ------------------------------------------------------------------------------------ multiple choice


def test_sst2_per_example_fields_are_consistent(tok: PreTrainedTokenizerFast) -> None:
    model = tiny_model("llama", n_layers=2, seed=0)
    bench = load_benchmark("sst2", data_root=FIXTURES)
    result = tasks.evaluate_task(model, tok, bench, batch_size=3)
    frame = result.per_example
    assert list(frame["id"]) == [e.id for e in bench.examples]
    for e, row in zip(bench.examples, frame.itertuples()):
        context = f"{e.text}\nQuestion: Is this sentence positive or negative?\nAnswer:"
        expected = [r.logprob for r in ev.loglikelihood(model, tok, [(context, " negative"), (context, " positive")])]
        np.testing.assert_allclose(row.logliks, expected, atol=1e-4)
        assert row.prediction == int(np.argmax(expected)) and row.correct == (row.prediction == e.label)
        assert row.confidence == pytest.approx(choice_probabilities(expected).max())
    assert result.summary["acc"][0] == pytest.approx(frame["correct"].mean())
    assert set(result.summary) == {"acc", "acc_norm", "ece"}
    low, high = result.summary["acc"][1:]
    assert low <= result.summary["acc"][0] <= high


@pytest.mark.parametrize("with_support", [True, False])
def test_sciq_prompt_and_length_normalisation(tok: PreTrainedTokenizerFast, with_support: bool) -> None:
    model = tiny_model("qwen2", n_layers=2, seed=0)
    bench = load_benchmark("sciq", data_root=FIXTURES, split="test")
    result = tasks.evaluate_task(model, tok, bench, with_support=with_support)
    first = bench.examples[0]
    prompt = ("Moss-stones release oxygen.\n" if with_support else "") + \
        "Question: What gas do invented moss-stones release?\nAnswer:"
    assert result.settings["with_support"] is with_support
    expected = [ev.loglikelihood(model, tok, [(prompt, " " + c)])[0].logprob for c in first.choices]
    row = result.per_example.iloc[0]
    np.testing.assert_allclose(row["logliks"], expected, atol=1e-4)
    norm = np.array(expected) / np.array([4, 5, 5, 6])  # "neon", "argon", "xenon", "oxygen": no delimiter
    assert row["prediction_norm"] == int(np.argmax(norm))
    assert row["correct_norm"] == (row["prediction_norm"] == 3)


def test_acc_norm_divides_by_the_choice_length_without_the_delimiter() -> None:
    """lm-evaluation-harness: argmax(ll / len(choice)); the scored " " delimiter is not counted."""
    row = tasks._choice_row("x", ["a", "abc"], np.array([-2.0, -5.0]), gold=1)
    assert row["prediction"] == 0  # -2 > -5
    assert row["prediction_norm"] == 1  # -2/1 < -5/3; with the delimiter counted it would be -2/2 > -5/4 -> 0
    assert row["correct_norm"] and not row["correct"]


def test_truthfulqa_mc_scores(tok: PreTrainedTokenizerFast) -> None:
    model = tiny_model("gpt_neox", n_layers=2, seed=0)
    bench = load_benchmark("truthfulqa_mc", data_root=FIXTURES)
    result = tasks.evaluate_task(model, tok, bench, max_length=128)
    assert set(result.summary) == {"mc1", "mc2", "ece"}
    for e, row in zip(bench.examples, result.per_example.itertuples()):
        prompt = tasks.TRUTHFULQA_PRIMER + f"\n\nQ: {e.question}\nA:"
        mc2_ll = [r.logprob for r in ev.loglikelihood(model, tok, [(prompt, " " + c) for c in e.mc2_choices],
                                                      max_length=128)]
        np.testing.assert_allclose(row.mc2_logliks, mc2_ll, atol=1e-4)
        assert row.mc2 == pytest.approx(mc2_score(mc2_ll, e.mc2_labels))
        assert row.correct == (int(np.argmax(row.logliks)) == e.label)


def test_truthfulqa_primer_is_the_six_shot_prefix() -> None:
    assert tasks.TRUTHFULQA_PRIMER.count("Q: ") == 6 and tasks.TRUTHFULQA_PRIMER.count("\nA: ") == 6
    assert "Q: What is the square root of banana?\nA: I have no comment." in tasks.TRUTHFULQA_PRIMER
    assert tasks.TRUTHFULQA_PRIMER.endswith("A: The 1992 Olympics were held in Barcelona, Spain.")


@pytest.mark.parametrize("scoring", ["pmi", "loglik_norm"])
def test_wikiqa_ranking(tok: PreTrainedTokenizerFast, scoring: str) -> None:
    model = tiny_model("llama", n_layers=2, seed=2)
    bench = load_benchmark("wikiqa", data_root=FIXTURES, split="validation")
    result = tasks.evaluate_task(model, tok, bench, scoring=scoring)
    frame = result.per_example
    assert list(frame["id"]) == ["Q1", "Q2"]  # Q3 has no correct sentence
    assert result.settings["questions_without_correct_sentence_excluded"] == 1
    q1 = bench.examples[0]
    cond = [ev.loglikelihood(model, tok, [(f"Question: {q1.question}\nAnswer:", " " + s)])[0].logprob
            for s in q1.choices]
    if scoring == "pmi":
        prior = [ev.loglikelihood(model, tok, [("Answer:", " " + s)])[0].logprob for s in q1.choices]
        expected = np.array(cond) - np.array(prior)
    else:
        expected = np.array(cond) / choice_lengths(q1.choices)
    np.testing.assert_allclose(frame.loc[0, "scores"], expected, atol=1e-4)
    rank_of_first_correct = 1 + int(np.sum(expected > expected[[1, 2]].max()))
    assert frame.loc[0, "reciprocal_rank"] == pytest.approx(1 / rank_of_first_correct)
    assert frame.loc[1, "correct"] and frame.loc[1, "reciprocal_rank"] == 1.0  # a single candidate
    assert result.summary["mrr"][0] == pytest.approx(frame["reciprocal_rank"].mean())


# ------------------------------------------------------------------------------------ generation


def _token_logp(values: list[float]) -> torch.Tensor:
    return torch.tensor(values)


def test_cut_answer_at_stop_string(tok: PreTrainedTokenizerFast) -> None:
    tokens = ids(tok, "Zebin, the end")
    logp = _token_logp([-0.1, -0.2, -0.3, -0.4, -0.5] + [-9.0] * (len(tokens) - 5))
    gen = ev._cut_answer(tok, tokens, logp, ev.QA_STOP)
    assert gen.text == "Zebin" and gen.n_tokens == 5
    assert gen.mean_logprob == pytest.approx(-0.3) and gen.confidence == pytest.approx(math.exp(-0.3))


def test_cut_answer_empty_answer_and_eos(tok: PreTrainedTokenizerFast) -> None:
    gen = ev._cut_answer(tok, ids(tok, "\nabc"), _token_logp([-2.0, -1.0, -1.0, -1.0]), ("\n",))
    assert gen.text == "" and gen.n_tokens == 0 and gen.confidence == pytest.approx(math.exp(-2.0))
    tokens = ids(tok, " ab") + [tok.eos_token_id] + ids(tok, "xy")
    gen = ev._cut_answer(tok, tokens, _token_logp([-1.0, -2.0, -3.0, -4.0, -5.0, -6.0]), ("\n",))
    assert gen.text == "ab" and gen.n_tokens == 3 and gen.mean_logprob == pytest.approx(-2.0)


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "opt"])
def test_generate_left_padding_matches_single_and_manual_scores(tok: PreTrainedTokenizerFast, model_type: str) -> None:
    model = tiny_model(model_type, n_layers=2, seed=3)
    prompts = ["Q: where is the toy city?\nA:", "Question: hi?\nAnswer:", "Q: x?\nA:"]
    batched = ev.generate_until(model, tok, prompts, stop=(), max_new_tokens=6, batch_size=3)
    for prompt, b in zip(prompts, batched):
        single = ev.generate_until(model, tok, [prompt], stop=(), max_new_tokens=6, batch_size=1)[0]
        assert b.text == single.text and b.n_tokens == single.n_tokens
        assert b.mean_logprob == pytest.approx(single.mean_logprob, abs=1e-4)
        # recompute the greedy continuation and its mean log-prob from an unpadded forward
        context, new = ids(tok, prompt), []
        with torch.no_grad():
            for _ in range(b.n_tokens):
                new.append(int(model(input_ids=torch.tensor([context + new])).logits[0, -1].argmax()))
        assert b.mean_logprob == pytest.approx(manual_logprob(model, context, new) / len(new), abs=1e-4)


def test_open_qa_scoring_path(tok: PreTrainedTokenizerFast, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fixed answers through the real scoring code: exact match, alias containment, confidence, ECE."""
    answers = [ev.Generation("the Lumo Isle.", 0.8, math.log(0.8), 3),
               ev.Generation("It is Blue Band", 0.5, math.log(0.5), 4),
               ev.Generation("Paris", 0.2, math.log(0.2), 2)]
    seen: list[str] = []

    def fake_generate(model, tokenizer, prompts, **kwargs):  # noqa: ANN001, ANN003, ANN202
        seen.extend(prompts)
        return answers

    monkeypatch.setattr(tasks, "generate_until", fake_generate)
    bench = load_benchmark("triviaqa", data_root=FIXTURES)
    result = tasks.evaluate_task(tiny_model("llama", 1), tok, bench)
    assert seen[0] == "Question: Which made-up island has the tallest lighthouse??\nAnswer:"
    frame = result.per_example
    assert frame["correct"].tolist() == [True, False, False]
    assert frame["alias_containment"].tolist() == [True, True, False]
    assert result.summary["exact_match"][0] == pytest.approx(1 / 3)
    assert result.summary["alias_containment"][0] == pytest.approx(2 / 3)
    # ECE: bins hold one answer each: |1-0.8| + |0-0.5| + |0-0.2| = 0.9 over 3 answers = 30%
    assert result.summary["ece"][0] == pytest.approx(30.0)


def test_nq_open_end_to_end_on_tiny_model(tok: PreTrainedTokenizerFast) -> None:
    bench = load_benchmark("nq_open", data_root=FIXTURES)
    result = tasks.evaluate_task(tiny_model("llama", 2), tok, bench, batch_size=2, max_new_tokens=5)
    frame = result.per_example
    assert len(frame) == 4 and frame["confidence"].between(0, 1).all()
    assert (frame["n_tokens"] <= 5).all()
    assert not frame["prediction"].str.contains("[\n.,]").any()
    assert result.settings["prompt"] == "Answer these questions:\nQ: {question}?\nA:"


def test_truthfulqa_gen_rouge_scoring(tok: PreTrainedTokenizerFast, monkeypatch: pytest.MonkeyPatch) -> None:
    answers = [ev.Generation("Nothing happens", 0.9, math.log(0.9), 15),
               ev.Generation("In the sky", 0.6, math.log(0.6), 10),
               ev.Generation("", 0.1, math.log(0.1), 0)]
    abstain = [ev.Generation(" i have no comment. ", 0.5, math.log(0.5), 6)] * 3
    monkeypatch.setattr(tasks, "generate_until", lambda *a, **k: answers)
    result = tasks.evaluate_task(tiny_model("llama", 1), tok, load_benchmark("truthfulqa_gen", data_root=FIXTURES))
    frame = result.per_example
    assert frame["rougeL_max_true"].tolist()[:2] == pytest.approx([1.0, 0.0])
    assert frame["rougeL_max_false"].tolist()[:2] == pytest.approx([0.0, 1.0])
    assert frame["correct"].tolist() == [True, False, False]  # an empty answer matches nothing
    assert result.summary["rougeL_acc"][0] == pytest.approx(1 / 3)
    assert frame["no_comment"].tolist() == [False] * 3 and result.summary["no_comment_rate"][0] == 0.0
    # always abstaining: the harness's extra true reference makes every answer "true", and the rate shows it
    monkeypatch.setattr(tasks, "generate_until", lambda *a, **k: abstain)
    gamed = tasks.evaluate_task(tiny_model("llama", 1), tok, load_benchmark("truthfulqa_gen", data_root=FIXTURES))
    assert gamed.summary["rougeL_acc"][0] == 1.0 and gamed.summary["no_comment_rate"][0] == 1.0
    assert gamed.summary["no_comment_rate"][1] < 1.0  # Wilson's interval does not collapse at 3 of 3
    assert tasks.truthfulqa_constant_answer_score(load_benchmark("truthfulqa_gen", data_root=FIXTURES)) == 1.0
    assert tasks.truthfulqa_constant_answer_score(load_benchmark("truthfulqa_gen", data_root=FIXTURES),
                                                  "In the sky") == pytest.approx(0.0)


# ------------------------------------------------------------------------------------ perplexity

TEXT = " = Toy Town = \n Toy Town is an invented place . It has 3 parks and a river . \n"


def test_perplexity_single_window_equals_exp_mean_nll(tok: PreTrainedTokenizerFast) -> None:
    model = tiny_model("gpt2", n_layers=2, seed=0)
    frame = perplexity.wikitext_perplexity(model, tok, TEXT, max_length=128, stride=128)
    token_ids = ids(tok, TEXT)
    with torch.no_grad():
        logp = F.log_softmax(model(input_ids=torch.tensor([token_ids])).logits[0], dim=-1)
    nll = -sum(float(logp[i - 1, t]) for i, t in enumerate(token_ids) if i > 0)
    assert len(frame) == 1 and int(frame["n_tokens"].sum()) == len(token_ids) - 1
    assert float(frame["nll_sum"].sum()) == pytest.approx(nll, rel=1e-5)
    ppl = tasks.evaluate_task(model, tok, _text_benchmark(), max_length=128, stride=128).summary["perplexity"][0]
    assert ppl == pytest.approx(math.exp(nll / (len(token_ids) - 1)), rel=1e-5)


def _text_benchmark():  # noqa: ANN202
    bench = load_benchmark("wikitext2", data_root=FIXTURES)
    return type(bench)(bench.name, [type(bench.examples[0])(id="t", text=TEXT)], bench.provenance)


def test_perplexity_sliding_window_matches_hf_recipe(tok: PreTrainedTokenizerFast) -> None:
    model = tiny_model("llama", n_layers=2, seed=0)
    max_length, stride = 32, 12
    frame = perplexity.wikitext_perplexity(model, tok, TEXT, max_length=max_length, stride=stride, batch_size=3)
    token_ids = torch.tensor([ids(tok, TEXT)])
    seq_len, nll_sum, n_tokens, prev_end = token_ids.size(1), 0.0, 0, 0
    for begin in range(0, seq_len, stride):  # the Hugging Face perplexity guide, verbatim in spirit
        end = min(begin + max_length, seq_len)
        trg_len = end - prev_end
        input_ids = token_ids[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss
        n_valid = int((target_ids[:, 1:] != -100).sum())
        nll_sum += float(loss) * n_valid
        n_tokens += n_valid
        prev_end = end
        if end == seq_len:
            break
    assert int(frame["n_tokens"].sum()) == n_tokens == seq_len - 1
    assert float(frame["nll_sum"].sum()) == pytest.approx(nll_sum, rel=1e-5)
    single = perplexity.wikitext_perplexity(model, tok, TEXT, max_length=max_length, stride=stride, batch_size=1)
    np.testing.assert_allclose(frame["nll_sum"], single["nll_sum"], rtol=1e-5)


def test_perplexity_rejects_bad_stride(tok: PreTrainedTokenizerFast) -> None:
    with pytest.raises(ConfigError, match="stride"):
        perplexity.wikitext_perplexity(tiny_model("gpt2", 1), tok, TEXT, max_length=16, stride=32)


# ------------------------------------------------------------------------------------ dispatcher


def test_evaluate_task_rejects_unknown_options_and_restores_mode(tok: PreTrainedTokenizerFast) -> None:
    model = tiny_model("llama", 1).train()
    bench = load_benchmark("sst2", data_root=FIXTURES)
    with pytest.raises(ConfigError, match=r"\['with_support'\] do not apply to sst2"):
        tasks.evaluate_task(model, tok, bench, with_support=False)
    tasks.evaluate_task(model, tok, bench)
    assert model.training
    with pytest.raises(ConfigError, match="unknown WikiQA scoring"):
        tasks.evaluate_task(model, tok, load_benchmark("wikiqa", data_root=FIXTURES), scoring="yes_no")


def test_evaluate_task_on_wikitext2_fixture(tok: PreTrainedTokenizerFast) -> None:
    model = tiny_model("opt", 2)
    result = tasks.evaluate_task(model, tok, load_benchmark("wikitext2", data_root=FIXTURES), max_length=64)
    value, low, high = result.summary["perplexity"]
    assert low <= value <= high and value > 1
    assert result.settings["benchmark"]["split"] == "test" and result.settings["stride"] == 32
