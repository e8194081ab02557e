"""The evaluation harness's building blocks for any Hugging Face causal LM, following lm-evaluation-harness.

- :func:`loglikelihood` — summed log-probability of each continuation given its context. As in the
  harness, trailing spaces of the context move to the continuation, ``context + continuation`` is encoded
  once and the continuation tokens are what follows the context's tokens; no special tokens are added
  except a BOS (``add_bos``, default on for Gemma only, as the harness does). Requests are deduplicated,
  sorted by length and scored in right-padded batches under an attention mask; padding never changes a
  score. Inputs longer than ``max_length`` are cut from the left. Unlike the harness, a context shared by
  several choices (and a prefix shared by every context) is run once and its KV cache reused.
- :func:`score_multiple_choice` — the log-likelihood of ``" " + choice`` after each context.
- :func:`generate_until` — greedy decoding in left-padded batches, cut at the first stop string. The
  confidence of an answer is its length-normalised sequence probability: ``exp`` of the mean log-prob
  (under the unprocessed model distribution) of the generated tokens before the first token that
  contains a stop string or EOS. An empty answer gets the probability of that first token.

Perplexity is in :mod:`avss_lib.core.perplexity`; the benchmark tasks built on both are in
:mod:`avss_lib.core.tasks`.
"""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm
from transformers import GenerationConfig, PreTrainedTokenizerBase, StopStringCriteria, StoppingCriteriaList

from avss_lib.core.errors import ConfigError

QA_STOP: tuple[str, ...] = ("\n", ".", ",")
DEFAULT_MAX_NEW_TOKENS = 24
MIN_SHARED_PREFIX = 8  # tokens: a shorter prefix common to a call's contexts is not worth its own forward


@dataclass(frozen=True)
class LoglikResult:
    """Log-likelihood of one continuation."""

    logprob: float  # summed log-probability of the continuation tokens
    is_greedy: bool  # every continuation token was the argmax
    n_tokens: int


@dataclass(frozen=True)
class Generation:
    """One greedy answer and its confidence."""

    text: str  # cut at the first stop string, surrounding whitespace removed
    confidence: float  # exp(mean_logprob)
    mean_logprob: float
    n_tokens: int  # answer tokens (before the stop)


# ------------------------------------------------------------------------------------ model helpers


def model_max_length(model: nn.Module) -> int:
    """The longest input the model's position scheme allows (2048 when the config does not say)."""
    config = model.config
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def default_add_bos(model: nn.Module) -> bool:
    """Whether to start every input with BOS: the harness does so for Gemma models only."""
    return str(getattr(model.config, "model_type", "")).startswith("gemma")


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    raise ConfigError("the tokenizer has neither a pad nor an eos token: set tokenizer.pad_token first")


def bos_prefix(tokenizer: PreTrainedTokenizerBase, add_bos: bool) -> list[int]:
    return [tokenizer.bos_token_id] if add_bos and tokenizer.bos_token_id is not None else []


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def pad_batch(batch: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ids and attention mask of a batch, padded on the left (generation) or right (scoring)."""
    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for b, ids in enumerate(batch):
        cols = slice(width - len(ids), width) if left else slice(0, len(ids))
        input_ids[b, cols] = torch.tensor(ids, dtype=torch.long)
        attention_mask[b, cols] = 1
    return input_ids, attention_mask


# ------------------------------------------------------------------------------------ log-likelihood


def encode_pair(
    tokenizer: PreTrainedTokenizerBase, context: str, continuation: str, *, add_bos: bool = False
) -> tuple[list[int], list[int]]:
    """Context and continuation token ids, split the way lm-evaluation-harness splits them."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = encode(tokenizer, context + continuation)
    n_context = len(encode(tokenizer, context))
    context_ids, continuation_ids = bos_prefix(tokenizer, add_bos) + whole[:n_context], whole[n_context:]
    if not context_ids:  # nothing to condition on: start from BOS, or EOS as the harness does
        context_ids = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else pad_id(tokenizer)]
    if not continuation_ids:
        raise ConfigError(f"continuation {continuation!r} encodes to no tokens: every choice must be non-empty")
    return context_ids, continuation_ids


def loglikelihood(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[tuple[str, str]],
    *,
    batch_size: int = 8,
    max_length: int | None = None,
    add_bos: bool | None = None,
    share_context: bool = True,
    desc: str = "loglikelihood",
) -> list[LoglikResult]:
    """Score each (context, continuation) request; identical requests are computed once.

    With ``share_context`` (the default) a distinct context whose continuations are short beside it
    (:func:`_worth_sharing`) is run once and its keys and values serve all of its continuations, and the token
    prefix that all those contexts start with (e.g. TruthfulQA's six-shot primer) is run once for the whole call
    (:func:`_score_shared`): the same scores as one forward per request (``share_context=False``) up to float
    round-off, at a fraction of the cost when choices share a long context.
    """
    max_length = max_length or model_max_length(model)
    add_bos = default_add_bos(model) if add_bos is None else add_bos
    unique = list(dict.fromkeys(requests))
    encoded = [_window(*encode_pair(tokenizer, c, x, add_bos=add_bos), max_length) for c, x in unique]
    scored: dict[int, LoglikResult] = {}
    pad = pad_id(tokenizer)
    by_context: dict[tuple[int, ...], list[int]] = {}
    for i, (inp, cont) in enumerate(encoded):
        by_context.setdefault(tuple(inp[: len(inp) - len(cont)]), []).append(i)  # the tokens before the first scored
    groups = {c: idx for c, idx in by_context.items() if share_context and _worth_sharing(c, idx, encoded)}
    plain = [i for c, idx in by_context.items() if c not in groups for i in idx]
    if groups:
        contexts = sorted(groups, key=len, reverse=True)
        common = _common_prefix(contexts)
        base = None
        chunks = _context_chunks(contexts, groups, batch_size)
        for chunk in tqdm(chunks, desc=desc, disable=len(chunks) <= 1):
            batch = [(context, [encoded[i] for i in groups[context]]) for context in chunk]
            if _fits_window(model, batch):
                if common and base is None:
                    base = _prefix_cache(model, common)
                for context, results in zip(chunk, _score_shared(model, batch, pad, common, base, 4 * batch_size)):
                    scored.update(zip(groups[context], results))
            else:
                plain += [i for context in chunk for i in groups[context]]
    order = sorted(plain, key=lambda i: -len(encoded[i][0]))
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=len(order) <= batch_size):
        idx = order[start:start + batch_size]
        scored.update(zip(idx, _score_batch(model, [encoded[i] for i in idx], pad)))
    position = {request: i for i, request in enumerate(unique)}
    return [scored[position[r]] for r in requests]


def _worth_sharing(context: tuple[int, ...], idx: Sequence[int], encoded: Sequence[tuple[list[int], list[int]]]
                   ) -> bool:
    """Whether running ``context`` once for its continuations saves more tokens than its continuations hold (a
    second forward costs about that much): e.g. SciQ's and TruthfulQA's choices after a long context, not
    WikiQA's long answer sentences after a short question."""
    return bool(context) and (len(idx) - 1) * len(context) >= sum(len(encoded[i][1]) for i in idx)


def _common_prefix(contexts: Sequence[tuple[int, ...]]) -> tuple[int, ...]:
    """The longest token prefix of every context that leaves each at least one token of its own (empty for one
    context or fewer than :data:`MIN_SHARED_PREFIX` tokens in common)."""
    if len(contexts) < 2:
        return ()
    first, n = contexts[0], min(len(c) for c in contexts) - 1
    for c in contexts[1:]:
        n = next((k for k in range(n) if c[k] != first[k]), n)
    return first[:n] if n >= MIN_SHARED_PREFIX else ()


def _context_chunks(contexts: Sequence[tuple[int, ...]], groups: dict[tuple[int, ...], list[int]], batch_size: int
                    ) -> list[list[tuple[int, ...]]]:
    """Consecutive contexts, at most ``batch_size`` of them and ``4 × batch_size`` continuations per chunk (a
    context with more continuations is a chunk of its own)."""
    chunks: list[list[tuple[int, ...]]] = []
    rows = 0
    for context in contexts:
        n = len(groups[context])
        if chunks and len(chunks[-1]) < batch_size and rows + n <= 4 * batch_size:
            chunks[-1].append(context)
            rows += n
        else:
            chunks.append([context])
            rows = n
    return chunks


def _fits_window(model: nn.Module, batch: Sequence[tuple[tuple[int, ...], list[tuple[list[int], list[int]]]]]) -> bool:
    """Whether the padded context and continuations fit inside the model's sliding attention window (Gemma-3's
    local layers), where a padded position would count against the window: otherwise the chunk is scored plainly."""
    width = max(len(c) for c, _ in batch) + max(len(cont) for _, reqs in batch for _, cont in reqs)
    return fits_sliding_window(model, width)


def fits_sliding_window(model: nn.Module, width: int) -> bool:
    """Whether ``width`` cache positions (padding included) stay inside the model's sliding attention window, if
    it has one: a cached context padded on the right puts its padding between the context and what follows it."""
    window = getattr(model.config, "sliding_window", None)
    return not isinstance(window, int) or window <= 0 or width < window


@torch.inference_mode()
def _prefix_cache(model: nn.Module, prefix: Sequence[int]) -> Any:
    """Keys and values of ``prefix`` (one row), to be copied into every context batch of a call."""
    ids = torch.tensor([list(prefix)], dtype=torch.long, device=model_device(model))
    return forward_with_cache(model, ids, torch.ones_like(ids), keep=1).past_key_values


def forward_with_cache(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                       keep: int | None = None, **kwargs: Any) -> Any:
    """``model(...)`` with a KV cache, computing logits only for the last ``keep`` positions where supported."""
    if keep is not None and "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = keep
    return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True, **kwargs)


@torch.inference_mode()
def _score_shared(model: nn.Module, batch: Sequence[tuple[tuple[int, ...], list[tuple[list[int], list[int]]]]],
                  pad_id: int, common: tuple[int, ...], base: Any, max_rows: int) -> list[list[LoglikResult]]:
    """Score the continuations of a chunk of contexts: one forward over the (right-padded) contexts after the
    common prefix, whose cache ``base`` it extends, then one over every continuation's scored positions (its
    context's last token and all but the last continuation token) on its context's cache, in batches of at most
    ``max_rows`` continuations of like length."""
    device = model_device(model)
    rests = [list(context[len(common):]) for context, _ in batch]
    ids, mask = pad_batch(rests, pad_id, left=False)
    if base is not None:
        past = _cache_rows(base, torch.zeros(len(batch), dtype=torch.long, device=device))
        mask = torch.cat([torch.ones((len(batch), len(common)), dtype=torch.long), mask], dim=1)
        cache = forward_with_cache(model, ids.to(device), mask.to(device), keep=1, past_key_values=past).past_key_values
    else:
        cache = forward_with_cache(model, ids.to(device), mask.to(device), keep=1).past_key_values
    rows = [(g, inp[len(inp) - len(cont):], cont) for g, (_, requests) in enumerate(batch) for inp, cont in requests]
    order = sorted(range(len(rows)), key=lambda r: -len(rows[r][1]))  # continuations of like length together
    results: list[list[LoglikResult | None]] = [[None] * len(requests) for _, requests in batch]
    slot = [(g, j) for g, (_, requests) in enumerate(batch) for j in range(len(requests))]
    for start in range(0, len(order), max_rows):
        part = [rows[r] for r in order[start:start + max_rows]]
        index = torch.tensor([g for g, _, _ in part], dtype=torch.long)
        logits, _ = logits_on_cache(model, cache, mask, index, [tail for _, tail, _ in part], pad_id)
        for k, r in enumerate(order[start:start + max_rows]):
            g, j = slot[r]
            results[g][j] = _continuation_result(logits[k, : len(rows[r][2])], rows[r][2])
    return results  # type: ignore[return-value]


def logits_on_cache(model: nn.Module, cache: Any, context_mask: torch.Tensor, index: torch.Tensor,
                    tails: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of each row's ``tails`` right after context ``index[row]`` of ``cache``, whose right-padded
    contexts have attention mask ``context_mask`` (on the CPU), and the tails' own mask: positions continue each
    context's real tokens, and the padding between a context and its tail is masked."""
    device = model_device(model)
    tail_ids, tail_mask = pad_batch([list(t) for t in tails], pad_id, left=False)
    positions = context_mask.sum(dim=1)[index][:, None] + torch.arange(tail_ids.shape[1])[None, :]
    attention_mask = torch.cat([context_mask[index], tail_mask], dim=1)
    logits = model(input_ids=tail_ids.to(device), attention_mask=attention_mask.to(device),
                   position_ids=positions.to(device), past_key_values=_cache_rows(cache, index.to(device)),
                   use_cache=True).logits
    return logits, tail_mask


def _cache_rows(cache: Any, index: torch.Tensor) -> Any:
    """A cache holding rows ``index`` of ``cache`` (repeats allowed), leaving ``cache`` as it was: each layer is a
    shallow copy whose key and value tensors are re-indexed."""
    rows = copy.copy(cache)
    rows.layers = [copy.copy(layer) for layer in cache.layers]
    rows.batch_select_indices(index)
    return rows


def _continuation_result(logits: torch.Tensor, continuation: Sequence[int]) -> LoglikResult:
    """Summed log-probability and greedy flag of ``continuation`` from the logits that predict its tokens."""
    logp = F.log_softmax(logits.float(), dim=-1)
    target = torch.tensor(list(continuation), device=logits.device)
    token_logp = logp.gather(-1, target[:, None]).squeeze(-1)
    return LoglikResult(float(token_logp.sum()), bool((logp.argmax(-1) == target).all()), len(continuation))


def _window(context: list[int], continuation: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Model input (all but the last token, cut from the left to ``max_length``) and the target tokens."""
    if len(continuation) > max_length:
        raise ConfigError(f"a continuation of {len(continuation)} tokens exceeds max_length={max_length}: "
                          f"raise max_length or shorten the choice")
    return (context + continuation)[-(max_length + 1):][:-1], continuation


def logits_from(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, first: int
                ) -> tuple[torch.Tensor, int]:
    """The model's logits from position ``first`` on, and that offset: the language-model head is applied only
    where scores are read (Hugging Face's ``logits_to_keep``), the rest of the forward is unchanged."""
    keep = input_ids.shape[1] - first
    if "logits_to_keep" not in inspect.signature(model.forward).parameters:
        return model(input_ids=input_ids, attention_mask=attention_mask).logits, 0
    return model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep).logits, first


@torch.inference_mode()
def _score_batch(model: nn.Module, batch: list[tuple[list[int], list[int]]], pad_id: int) -> list[LoglikResult]:
    """Score one right-padded batch of (input ids, continuation ids)."""
    input_ids, attention_mask = pad_batch([inp for inp, _ in batch], pad_id, left=False)
    device = model_device(model)
    first = min(len(inp) - len(cont) for inp, cont in batch)
    logits, offset = logits_from(model, input_ids.to(device), attention_mask.to(device), first)
    return [_continuation_result(logits[b, len(inp) - len(cont) - offset: len(inp) - offset], cont)
            for b, (inp, cont) in enumerate(batch)]


# ------------------------------------------------------------------------------------ generation


def generate_until(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    stop: Sequence[str] = QA_STOP,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = 8,
    max_length: int | None = None,
    add_bos: bool | None = None,
    desc: str = "generate",
) -> list[Generation]:
    """Greedy answers for ``prompts`` in left-padded batches (longest first), cut at the first stop string."""
    max_length = max_length or model_max_length(model)
    if max_new_tokens >= max_length:
        raise ConfigError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in max_length={max_length}")
    add_bos = default_add_bos(model) if add_bos is None else add_bos
    encoded = [(bos_prefix(tokenizer, add_bos) + encode(tokenizer, p))[-(max_length - max_new_tokens):] for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    results: dict[int, Generation] = {}
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=len(order) <= batch_size):
        idx = order[start:start + batch_size]
        results.update(zip(idx, _generate_batch(model, tokenizer, [encoded[i] for i in idx], stop, max_new_tokens)))
    return [results[i] for i in range(len(prompts))]


@functools.lru_cache(maxsize=8)
def stop_criterion(tokenizer: PreTrainedTokenizerBase, stop: tuple[str, ...]) -> StopStringCriteria:
    """Hugging Face's stop-string criterion for ``tokenizer``, built once per tokenizer and stop strings (building
    it walks the whole vocabulary, about 0.35 s for SmolLM2's; it holds no state between calls)."""
    return StopStringCriteria(tokenizer, list(stop))


@torch.inference_mode()
def _generate_batch(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, batch: list[list[int]], stop: Sequence[str],
    max_new_tokens: int,
) -> list[Generation]:
    """Greedy-decode one left-padded batch of prompt ids."""
    pad = pad_id(tokenizer)
    input_ids, attention_mask = pad_batch(batch, pad, left=True)
    width = input_ids.shape[1]
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad,
                              eos_token_id=tokenizer.eos_token_id, output_logits=True, return_dict_in_generate=True)
    device = model_device(model)
    criteria = StoppingCriteriaList([stop_criterion(tokenizer, tuple(stop))] if stop else [])
    out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                         generation_config=config, stopping_criteria=criteria)
    new_tokens = out.sequences[:, width:].cpu()
    logp = F.log_softmax(torch.stack(out.logits, dim=1).float(), dim=-1).cpu()
    token_logp = logp.gather(-1, new_tokens[..., None]).squeeze(-1)
    return [_cut_answer(tokenizer, new_tokens[b].tolist(), token_logp[b], stop) for b in range(len(batch))]


def _cut_answer(
    tokenizer: PreTrainedTokenizerBase, tokens: list[int], token_logp: torch.Tensor, stop: Sequence[str]
) -> Generation:
    """Answer text and confidence from the generated tokens (see the module docstring)."""
    eos = tokenizer.eos_token_id
    n_generated = tokens.index(eos) if eos in tokens else len(tokens)
    n_answer = next((k for k in range(n_generated)
                     if any(s in tokenizer.decode(tokens[: k + 1]) for s in stop)), n_generated)
    text = tokenizer.decode(tokens[:n_generated], skip_special_tokens=True)
    for s in stop:
        text = text.split(s, 1)[0]
    scored = token_logp[:n_answer] if n_answer else token_logp[:1]
    mean = float(scored.mean())
    return Generation(text=text.strip(), confidence=float(np.exp(mean)), mean_logprob=mean, n_tokens=n_answer)


# ------------------------------------------------------------------------------------ multiple choice


def score_multiple_choice(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    contexts: Sequence[str],
    choices: Sequence[Sequence[str]],
    *,
    batch_size: int = 8,
    max_length: int | None = None,
    add_bos: bool | None = None,
    desc: str = "choices",
) -> list[np.ndarray]:
    """Summed log-likelihood of ``" " + choice`` after each context, one array per example."""
    requests = [(ctx, " " + c) for ctx, cs in zip(contexts, choices) for c in cs]
    flat = loglikelihood(model, tokenizer, requests, batch_size=batch_size, max_length=max_length,
                         add_bos=add_bos, desc=desc)
    out, pos = [], 0
    for cs in choices:
        out.append(np.array([r.logprob for r in flat[pos:pos + len(cs)]]))
        pos += len(cs)
    return out
