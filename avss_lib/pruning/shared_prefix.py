"""TruthfulQA-MC on a model that encodes the prompts' shared 6-shot primer once.

Every TruthfulQA prompt starts with the same primer (:data:`avss_lib.core.tasks.TRUTHFULQA_PRIMER`), so the
pruning chapter scores that task on a :class:`SharedPrefixLM`, which computes the primer's keys and values once
per model and gives the same logits as the plain model (up to float round-off).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase
from transformers.modeling_outputs import CausalLMOutputWithPast

from avss_lib.core.errors import ConfigError
from avss_lib.core.tasks import PROMPTS

class SharedPrefixLM(nn.Module):
    """A causal LM that encodes a fixed token prefix once and reuses its keys and values.

    ``forward(input_ids, attention_mask)`` on a batch whose rows all start with ``prefix_ids`` (unmasked) runs
    the model only on the rest, with a copy of the cached prefix, and returns logits for the whole width (the
    prefix's own logits are cached too): the same numbers as the wrapped model up to float round-off. Any other
    call, and ``generate``, goes to the wrapped model unchanged. Inputs must be right padded (position ids
    continue from the prefix), as :func:`avss_lib.core.harness.loglikelihood` pads them.
    """

    def __init__(self, model: nn.Module, prefix_ids: Sequence[int]) -> None:
        super().__init__()
        if len(prefix_ids) < 1:
            raise ConfigError("the shared prefix is empty: give at least one token")
        self.model = model
        self.config = model.config
        self.register_buffer("prefix", torch.tensor(list(prefix_ids), dtype=torch.long), persistent=False)
        self._cache: Any = None
        self.hits = 0

    def _prefix_state(self) -> tuple[Any, torch.Tensor]:
        if self._cache is None:
            device = next(self.model.parameters()).device
            with torch.inference_mode():
                out = self.model(input_ids=self.prefix[None].to(device), use_cache=True)
            self._cache = (out.past_key_values, out.logits)
        return self._cache

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        width = len(self.prefix)
        shared = (not kwargs and input_ids.shape[1] > width
                  and bool((input_ids[:, :width] == self.prefix.to(input_ids.device)).all())
                  and (attention_mask is None or bool((attention_mask[:, :width] == 1).all())))
        if not shared:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        cache, prefix_logits = self._prefix_state()
        batch = input_ids.shape[0]
        past = copy.deepcopy(cache)
        past.batch_repeat_interleave(batch)
        out = self.model(input_ids=input_ids[:, width:], attention_mask=attention_mask, past_key_values=past,
                         use_cache=True)
        self.hits += 1
        logits = torch.cat([prefix_logits.expand(batch, -1, -1), out.logits], dim=1)
        return CausalLMOutputWithPast(logits=logits)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.model.generate(*args, **kwargs)


def truthfulqa_prefix_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Tokens of the TruthfulQA primer that every TruthfulQA prompt starts with (checked, not assumed)."""
    primer = PROMPTS["truthfulqa"].split("{question}")[0]
    stable = primer.rsplit("\n\n", 1)[0]  # stop before the "\n\nQ:" that joins the question
    ids = list(tokenizer(stable, add_special_tokens=False)["input_ids"])
    probe = list(tokenizer(PROMPTS["truthfulqa"].format(question="Is this a probe?") + " Yes",
                           add_special_tokens=False)["input_ids"])
    while ids and probe[:len(ids)] != ids:  # a merge across the boundary: back off one token
        ids = ids[:-1]
    return ids[:-1] if len(ids) > 1 else ids  # keep the last primer token in the scored part
