r"""The contrastive objective for hallucination mitigation, defined here and stated in the book's ``book/method.md``.

The EAVSS paper does not publish its contrastive loss, so the project defines its own.

**Score of an answer.** For a question prompt :math:`q` and an answer :math:`a = (a_1, \dots, a_{|a|})`
(tokenised after the prompt), the score is the summed log-likelihood (``score="sum"``, the default: what the
evaluation's multiple-choice decisions compare, as lm-evaluation-harness's ``acc`` does) or, with
``score="mean"``, its length-normalised form

.. math::

    s(a) = \sum_{t=1}^{|a|} \log p_\theta(a_t \mid q, a_{<t}) \quad\text{or}\quad
    s(a) = \frac{1}{|a|} \sum_{t=1}^{|a|} \log p_\theta(a_t \mid q, a_{<t}).

**Contrastive term (default, InfoNCE).** For one positive (gold) answer :math:`a^+` and negatives
:math:`a^-_1, \dots, a^-_m` (the model's own hallucinated answers, or TruthfulQA's incorrect answers),
with temperature :math:`T > 0`,

.. math::

    \mathcal{L}_\mathrm{con} = -\log
      \frac{\exp\!\big(s(a^+)/T\big)}
           {\exp\!\big(s(a^+)/T\big) + \sum_{j=1}^{m} \exp\!\big(s(a^-_j)/T\big)}.

**Contrastive term (alternative, margin).** With margin :math:`\mu \ge 0`,

.. math::

    \mathcal{L}_\mathrm{con} = \frac{1}{m} \sum_{j=1}^{m} \max\!\big(0,\; \mu - s(a^+) + s(a^-_j)\big).

**Language-modelling term.** The token-level negative log-likelihood of the gold answers of a batch
:math:`B`, averaged over all their tokens,

.. math::

    \mathcal{L}_\mathrm{lm} = -\frac{1}{\sum_{b \in B} |a^+_b|}
      \sum_{b \in B} \sum_{t=1}^{|a^+_b|} \log p_\theta(a^+_{b,t} \mid q_b, a^+_{b,<t}).

**Total.** :math:`\mathcal{L} = \lambda_\mathrm{con}\,\overline{\mathcal{L}_\mathrm{con}}
+ \lambda_\mathrm{lm}\,\mathcal{L}_\mathrm{lm}`, where :math:`\overline{\mathcal{L}_\mathrm{con}}` is the
mean of the per-question contrastive term over the batch. :math:`\lambda_\mathrm{con} = 0` is the LM-only
ablation. Questions may have different numbers of negatives; absent negatives are masked out of both the
InfoNCE denominator and the margin mean.

**Tokenisation.** Exactly as the evaluation harness encodes a (context, continuation) request
(:func:`avss_lib.core.harness.encode_pair`: the lm-evaluation-harness split, and BOS only where the harness adds
it, :func:`avss_lib.core.harness.default_add_bos`), so training scores an answer the way it is later scored. Batches are right-padded, so padding never precedes or shifts a real token.
When a pair exceeds ``max_length`` tokens the prompt is cut from the left; an answer alone longer than
``max_length - 1`` tokens is cut at the right (its :math:`|a|` is then the kept length). In training
(:func:`score_examples`) all answers of a question keep the same prompt window, the one its longest (kept) answer
leaves, so that the contrastive term compares them on one context, as the evaluation does, where nothing is cut.

**Shared prompts.** A question's gold answer and its negatives follow the same prompt. With ``share_prompts``
(the default) :func:`score_examples` runs each distinct prompt once and scores all of its answers on that
prompt's keys and values, as the harness shares a context among its choices
(:func:`shared_prompt_logprobs`); gradients flow through the shared keys and values, so the scores and their
gradients are those of one full sequence per answer up to float round-off, for fewer token positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from avss_lib.core.errors import ConfigError, DataError
from avss_lib.core.harness import (default_add_bos, encode_pair, fits_sliding_window, forward_with_cache,
                                   logits_from, logits_on_cache, model_device, pad_batch, pad_id)

LossKind = Literal["infonce", "margin"]
LOSS_KINDS: tuple[str, ...] = ("infonce", "margin")
ScoreKind = Literal["sum", "mean"]
SCORE_KINDS: tuple[str, ...] = ("sum", "mean")


@dataclass(frozen=True)
class ContrastiveExample:
    """One training question: its prompt, the gold answer and the negative (hallucinated/incorrect) answers."""

    id: str
    prompt: str
    positive: str
    negatives: tuple[str, ...]


@dataclass(frozen=True)
class PairBatch:
    """A right-padded batch of (prompt, answer) token sequences.

    ``answer_mask[b, t]`` is True where token ``t`` of row ``b`` belongs to the answer; those are the
    tokens whose log-probabilities (predicted from position ``t - 1``) make up :math:`s(a)`.
    """

    input_ids: Tensor  # [B, L] long
    attention_mask: Tensor  # [B, L] long
    answer_mask: Tensor  # [B, L] bool


@dataclass(frozen=True)
class AnswerLogprobs:
    """Per-answer sum of token log-probabilities and token count; ``scores`` is :math:`s(a)`."""

    sums: Tensor  # [B]
    counts: Tensor  # [B]

    @property
    def scores(self) -> Tensor:
        """Length-normalised log-likelihoods (``score="mean"``)."""
        return self.sums / self.counts

    def score(self, kind: str) -> Tensor:
        """:math:`s(a)` of the given kind: ``"sum"`` (summed log-likelihood) or ``"mean"`` (length-normalised)."""
        if kind == "sum":
            return self.sums
        if kind == "mean":
            return self.scores
        raise ConfigError(f"unknown score {kind!r}: choose one of {SCORE_KINDS}")


@dataclass(frozen=True)
class LossParts:
    """The total loss and its two terms (the contrastive term is NaN when it was not computed)."""

    total: Tensor
    con: Tensor
    lm: Tensor


def encode_pairs(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    answers: Sequence[str],
    max_length: int | None = None,
    add_bos: bool = False,
) -> PairBatch:
    """Tokenise (prompt, answer) pairs into a right-padded :class:`PairBatch` (see module docstring)."""
    return _pad_rows(_encode_rows(tokenizer, prompts, answers, max_length, add_bos), pad_id(tokenizer))


def _encode_rows(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], answers: Sequence[str], max_length: int | None,
    add_bos: bool, questions: Sequence[int] | None = None
) -> list[tuple[list[int], int]]:
    """Each pair's ids (prompt, then answer) and its number of answer tokens, unpadded. With ``questions`` (each
    pair's question), the pairs of a question keep one prompt window: the one its longest kept answer leaves."""
    if len(prompts) != len(answers):
        raise DataError(f"{len(prompts)} prompts but {len(answers)} answers: pass one answer per prompt")
    if max_length is not None and max_length < 2:
        raise ConfigError(f"max_length={max_length} leaves no room for a prompt and an answer: use >= 2")
    pairs = [_encode_pair(tokenizer, p, a, max_length, add_bos) for p, a in zip(prompts, answers)]
    if max_length is None:
        return [(prompt_ids + answer_ids, len(answer_ids)) for prompt_ids, answer_ids in pairs]
    room = [max_length - len(answer_ids) for _, answer_ids in pairs]
    if questions is not None:
        window: dict[int, int] = {}
        for q, r in zip(questions, room):
            window[q] = min(window.get(q, r), r)
        room = [window[q] for q in questions]
    return [(prompt_ids[-r:] + answer_ids, len(answer_ids)) for (prompt_ids, answer_ids), r in zip(pairs, room)]


def _encode_pair(
    tokenizer: PreTrainedTokenizerBase, prompt: str, answer: str, max_length: int | None, add_bos: bool
) -> tuple[list[int], list[int]]:
    """The prompt's ids, whole, and the answer's, cut to ``max_length - 1``."""
    if not prompt:
        raise DataError(f"prompt {prompt!r} encodes to no tokens: the first answer token needs a context")
    if not answer.strip():
        raise DataError(f"answer {answer!r} (prompt {prompt!r}) encodes to no tokens: drop empty answers")
    prompt_ids, answer_ids = encode_pair(tokenizer, prompt, answer, add_bos=add_bos)
    return prompt_ids, answer_ids[: max_length - 1] if max_length is not None else answer_ids


def _pad_rows(rows: list[tuple[list[int], int]], pad: int) -> PairBatch:
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    answer_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for b, (ids, n_answer) in enumerate(rows):
        input_ids[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[b, : len(ids)] = 1
        answer_mask[b, len(ids) - n_answer: len(ids)] = True
    return PairBatch(input_ids=input_ids, attention_mask=attention_mask, answer_mask=answer_mask)


def shared_prompt_logprobs(model: nn.Module, rows: Sequence[tuple[list[int], int]], pad: int
                           ) -> AnswerLogprobs | None:
    """:func:`answer_logprobs` of ``rows`` (each the ids of prompt and answer and its number of answer tokens) with
    every distinct prompt run once: one forward over the distinct prompts but their last token (right-padded),
    then one over each row's scored positions (its prompt's last token and all but the last answer token) on its
    prompt's cache. Differentiable. None where nothing is shared, a prompt is a single token, or the padded width
    would cross the model's sliding attention window: score those rows with :func:`answer_logprobs`."""
    contexts: dict[tuple[int, ...], int] = {}
    owners = [contexts.setdefault(tuple(ids[: len(ids) - n - 1]), len(contexts)) for ids, n in rows]
    tails = [ids[len(ids) - n - 1: len(ids) - 1] for ids, n in rows]
    width = max(len(c) for c in contexts) + max(len(t) for t in tails)
    if len(contexts) == len(rows) or not all(contexts) or not fits_sliding_window(model, width):
        return None
    device = model_device(model)
    context_ids, context_mask = pad_batch([list(c) for c in contexts], pad, left=False)
    cache = forward_with_cache(model, context_ids.to(device), context_mask.to(device), keep=1).past_key_values
    logits, tail_mask = logits_on_cache(model, cache, context_mask, torch.tensor(owners, dtype=torch.long), tails, pad)
    targets, _ = pad_batch([ids[len(ids) - n:] for ids, n in rows], pad, left=False)
    token_logp = F.log_softmax(logits.float(), dim=-1).gather(-1, targets.to(device).unsqueeze(-1)).squeeze(-1)
    mask = tail_mask.bool().to(device)
    sums = torch.where(mask, token_logp, torch.zeros_like(token_logp)).sum(dim=1)
    return AnswerLogprobs(sums=sums, counts=mask.sum(dim=1).to(sums.dtype))


def answer_logprobs(model: nn.Module, batch: PairBatch) -> AnswerLogprobs:
    """Sum of answer-token log-probabilities and answer length per row, in float32, differentiable."""
    device = next(model.parameters()).device
    # the head only from the first position that predicts an answer token (the one before it) on
    first = max(int(batch.answer_mask.float().argmax(dim=1).min()) - 1, 0)
    logits, offset = logits_from(model, batch.input_ids.to(device), batch.attention_mask.to(device), first)
    logp = F.log_softmax(logits[:, : logits.shape[1] - 1].float(), dim=-1)  # positions offset .. L-2
    targets = batch.input_ids[:, offset + 1:].to(device)
    token_logp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    mask = batch.answer_mask[:, offset + 1:].to(device)
    sums = torch.where(mask, token_logp, torch.zeros_like(token_logp)).sum(dim=1)
    return AnswerLogprobs(sums=sums, counts=mask.sum(dim=1).to(sums.dtype))


def sequence_logprobs(
    model: nn.Module,
    tokenizer_or_batch: PreTrainedTokenizerBase | PairBatch,
    prompts: Sequence[str] | None = None,
    answers: Sequence[str] | None = None,
    *,
    max_length: int | None = None,
    add_bos: bool | None = None,
) -> Tensor:
    """Length-normalised log-likelihood of each answer given its prompt, shape ``[B]``.

    Pass either a tokenizer with ``prompts`` and ``answers`` (BOS as the harness adds it for ``model`` unless
    ``add_bos`` says otherwise), or a pre-tokenised :class:`PairBatch`. Gradients flow; wrap the call in
    ``torch.no_grad()`` for scoring only.
    """
    if isinstance(tokenizer_or_batch, PairBatch):
        batch = tokenizer_or_batch
    elif prompts is None or answers is None:
        raise ConfigError("sequence_logprobs with a tokenizer needs prompts= and answers=")
    else:
        batch = encode_pairs(tokenizer_or_batch, prompts, answers, max_length,
                             default_add_bos(model) if add_bos is None else add_bos)
    return answer_logprobs(model, batch).scores


def _check_scores(pos: Tensor, neg: Tensor, neg_mask: Tensor | None) -> Tensor:
    """Validate shapes and return a boolean negative mask (all True when none is given)."""
    if pos.dim() != 1 or neg.dim() != 2 or neg.shape[0] != pos.shape[0]:
        raise ConfigError(f"scores must be pos [B] and neg [B, m]; got {tuple(pos.shape)} and {tuple(neg.shape)}")
    mask = torch.ones_like(neg, dtype=torch.bool) if neg_mask is None else neg_mask.bool()
    if mask.shape != neg.shape:
        raise ConfigError(f"neg_mask shape {tuple(mask.shape)} must equal neg shape {tuple(neg.shape)}")
    if not bool(mask.any(dim=1).all()):
        raise DataError("a question has no negative answer: every question needs at least one negative")
    return mask


def infonce_loss(pos: Tensor, neg: Tensor, temperature: float = 1.0, neg_mask: Tensor | None = None) -> Tensor:
    r"""Per-question InfoNCE :math:`-\log\frac{e^{s^+/T}}{e^{s^+/T}+\sum_j e^{s^-_j/T}}`, shape ``[B]``.

    ``pos`` is ``[B]``, ``neg`` is ``[B, m]``; ``neg_mask`` (``[B, m]``, bool) marks real negatives.
    """
    if temperature <= 0:
        raise ConfigError(f"temperature={temperature} must be > 0")
    mask = _check_scores(pos, neg, neg_mask)
    neg_logits = (neg / temperature).masked_fill(~mask, float("-inf"))
    logits = torch.cat([(pos / temperature).unsqueeze(1), neg_logits], dim=1)
    return -torch.log_softmax(logits, dim=1)[:, 0]


def margin_loss(pos: Tensor, neg: Tensor, margin: float = 0.1, neg_mask: Tensor | None = None) -> Tensor:
    r"""Per-question margin loss :math:`\frac1m\sum_j \max(0, \mu - s^+ + s^-_j)` over real negatives, ``[B]``."""
    if margin < 0:
        raise ConfigError(f"margin={margin} must be >= 0")
    mask = _check_scores(pos, neg, neg_mask)
    hinge = torch.clamp(margin - pos.unsqueeze(1) + neg, min=0.0)
    hinge = torch.where(mask, hinge, torch.zeros_like(hinge))
    return hinge.sum(dim=1) / mask.sum(dim=1)


def lm_loss(pos: AnswerLogprobs) -> Tensor:
    """Token-level NLL of the gold answers: minus total log-probability over total answer tokens."""
    return -pos.sums.sum() / pos.counts.sum()


def combined_loss(
    pos: AnswerLogprobs,
    neg_scores: Tensor | None,
    neg_mask: Tensor | None,
    *,
    loss: LossKind = "infonce",
    lambda_con: float = 1.0,
    lambda_lm: float = 1.0,
    temperature: float = 1.0,
    margin: float = 0.1,
    score: ScoreKind = "sum",
) -> LossParts:
    r""":math:`\lambda_\mathrm{con}\overline{\mathcal{L}_\mathrm{con}} + \lambda_\mathrm{lm}\mathcal{L}_\mathrm{lm}`.

    With ``lambda_con == 0`` the negatives may be ``None`` (LM-only ablation); the contrastive part is NaN.
    """
    lm = lm_loss(pos)
    if lambda_con == 0:
        return LossParts(total=lambda_lm * lm, con=torch.full_like(lm, float("nan")), lm=lm)
    if neg_scores is None:
        raise ConfigError(f"lambda_con={lambda_con} > 0 needs negative scores")
    if loss == "infonce":
        con = infonce_loss(pos.score(score), neg_scores, temperature, neg_mask).mean()
    elif loss == "margin":
        con = margin_loss(pos.score(score), neg_scores, margin, neg_mask).mean()
    else:
        raise ConfigError(f"unknown contrastive loss {loss!r}: choose one of {LOSS_KINDS}")
    return LossParts(total=lambda_con * con + lambda_lm * lm, con=con, lm=lm)


@dataclass(frozen=True)
class ScoredBatch:
    """Scores of one batch of examples: the gold answers and the (padded) negatives."""

    pos: AnswerLogprobs
    neg_scores: Tensor | None  # [B, m_max], None when negatives were not scored
    neg_mask: Tensor | None  # [B, m_max] bool


def score_examples(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[ContrastiveExample],
    *,
    with_negatives: bool = True,
    max_length: int | None = None,
    score: ScoreKind = "sum",
    add_bos: bool | None = None,
    share_prompts: bool = True,
) -> ScoredBatch:
    """Score every gold answer and (optionally) every negative of ``examples`` in one batch.

    The negatives' scores are of kind ``score``; a question's answers share one prompt window under
    ``max_length`` (module docstring); inputs start with BOS where the harness adds it for ``model``
    (:func:`avss_lib.core.harness.default_add_bos`) unless ``add_bos`` says otherwise. With ``share_prompts``
    each question's prompt is run once for all of its answers (:func:`shared_prompt_logprobs`)."""
    prompts = [ex.prompt for ex in examples]
    answers = [ex.positive for ex in examples]
    owners: list[int] = []
    if with_negatives:
        for b, ex in enumerate(examples):
            prompts.extend([ex.prompt] * len(ex.negatives))
            answers.extend(ex.negatives)
            owners.extend([b] * len(ex.negatives))
    add_bos = default_add_bos(model) if add_bos is None else add_bos
    rows = _encode_rows(tokenizer, prompts, answers, max_length, add_bos, questions=list(range(len(examples))) + owners)
    pad = pad_id(tokenizer)
    shared = shared_prompt_logprobs(model, rows, pad) if share_prompts else None
    scored = shared if shared is not None else answer_logprobs(model, _pad_rows(rows, pad))
    n = len(examples)
    pos = AnswerLogprobs(sums=scored.sums[:n], counts=scored.counts[:n])
    if not with_negatives:
        return ScoredBatch(pos=pos, neg_scores=None, neg_mask=None)
    neg_scores, neg_mask = _scatter_negatives(scored.score(score)[n:], owners, n)
    return ScoredBatch(pos=pos, neg_scores=neg_scores, neg_mask=neg_mask)


def _scatter_negatives(flat: Tensor, owners: list[int], n: int) -> tuple[Tensor, Tensor]:
    """Arrange a flat vector of negative scores into ``[n, m_max]`` with a mask of real entries."""
    counts = [owners.count(b) for b in range(n)]
    width = max(counts, default=0)
    rows = torch.tensor(owners, dtype=torch.long, device=flat.device)
    cols = torch.tensor([j for c in counts for j in range(c)], dtype=torch.long, device=flat.device)
    scores = torch.zeros((n, width), dtype=flat.dtype, device=flat.device).index_put((rows, cols), flat)
    mask = torch.zeros((n, width), dtype=torch.bool, device=flat.device).index_put(
        (rows, cols), torch.ones_like(flat, dtype=torch.bool)
    )
    return scores, mask
