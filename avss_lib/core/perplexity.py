"""Token perplexity of a text with the Hugging Face sliding-window recipe (the pruning chapter's WikiText-2 score).

:func:`wikitext_perplexity` returns each window's summed NLL and scored tokens; perplexity is
``exp(sum nll / sum n_tokens)`` over them (:func:`avss_lib.core.metrics.perplexity`). Inputs are encoded as the
harness encodes them (:mod:`avss_lib.core.harness`: BOS for Gemma only).
"""

from __future__ import annotations

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from avss_lib.core.errors import ConfigError
from avss_lib.core.harness import bos_prefix, default_add_bos, encode, model_device, model_max_length, pad_batch, pad_id

DEFAULT_PPL_MAX_LENGTH = 1024


def wikitext_perplexity(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    *,
    max_length: int | None = DEFAULT_PPL_MAX_LENGTH,
    stride: int | None = None,
    batch_size: int = 1,
    add_bos: bool | None = None,
) -> pd.DataFrame:
    """Per-window summed NLL and scored-token counts, with the Hugging Face sliding-window recipe.

    Windows of ``max_length`` tokens (capped at the model's limit) start every ``stride`` tokens (default
    ``max_length // 2``, the guide's 1024/512); each scores only the tokens the previous window did not
    (the first token of the text is never scored). Perplexity = ``exp(sum nll / sum n_tokens)`` over the
    rows (:func:`avss_lib.core.metrics.perplexity`).
    """
    max_length, stride = perplexity_window(model, max_length, stride)
    add_bos = default_add_bos(model) if add_bos is None else add_bos
    ids = bos_prefix(tokenizer, add_bos) + encode(tokenizer, text)
    if len(ids) < 2:
        raise ConfigError("the text encodes to fewer than 2 tokens: nothing to score")
    windows = _sliding_windows(len(ids), max_length, stride)
    rows = []
    for start in tqdm(range(0, len(windows), batch_size), desc="perplexity", disable=len(windows) <= batch_size):
        chunk = windows[start:start + batch_size]
        rows.extend(_window_nll(model, [ids[b:e] for b, e, _ in chunk], [t for _, _, t in chunk], pad_id(tokenizer)))
    frame = pd.DataFrame(windows, columns=["begin", "end", "target_len"])
    frame[["nll_sum", "n_tokens"]] = pd.DataFrame(rows, columns=["nll_sum", "n_tokens"])
    return frame


def perplexity_window(model: nn.Module, max_length: int | None, stride: int | None) -> tuple[int, int]:
    """The effective (max_length, stride) of :func:`wikitext_perplexity`."""
    max_length = min(max_length or model_max_length(model), model_max_length(model))
    stride = stride or max(1, max_length // 2)
    if not 0 < stride <= max_length:
        raise ConfigError(f"stride={stride} must be in 1..max_length={max_length}")
    return max_length, stride


def _sliding_windows(seq_len: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, number of new target tokens) per window, as in the Hugging Face perplexity guide."""
    windows, prev_end = [], 0
    for begin in range(0, seq_len, stride):
        end = min(begin + max_length, seq_len)
        windows.append((begin, end, end - prev_end))
        prev_end = end
        if end == seq_len:
            break
    return windows


@torch.inference_mode()
def _window_nll(
    model: nn.Module, inputs: list[list[int]], target_lens: list[int], pad_id: int
) -> list[tuple[float, int]]:
    """(summed NLL, scored tokens) of each window's last ``target_len`` tokens, in one right-padded batch."""
    input_ids, attention_mask = pad_batch(inputs, pad_id, left=False)
    device = model_device(model)
    logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
    out = []
    for b, (x, t) in enumerate(zip(inputs, target_lens)):
        n = min(t, len(x) - 1)  # a window's first token has no prediction
        logp = F.log_softmax(logits[b, len(x) - 1 - n: len(x) - 1].float(), dim=-1)
        target = input_ids[b, len(x) - n: len(x)].to(device)
        out.append((-float(logp.gather(-1, target[:, None]).sum()), n))
    return out
