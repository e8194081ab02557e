"""Tiny randomly initialised causal LMs of several architectures, built in memory (for tests and demos)."""

from __future__ import annotations

import string

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTNeoXConfig,
    Gemma3TextConfig,
    LlamaConfig,
    OPTConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

VOCAB = 96
_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0, 1, 2, 3 = the tiny configs' pad, bos, eos ids
_CHARS = string.ascii_letters + string.digits + " \n" + "".join(c for c in string.punctuation if c not in "{|}~")


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer with exactly the tiny models' 96 ids (one token per character)."""
    vocab = {tok: i for i, tok in enumerate(_SPECIALS + list(_CHARS))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", clean_up_tokenization_spaces=False)


def tiny_config(model_type: str, n_layers: int = 4) -> PretrainedConfig:
    """A config with hidden size 16 and ``n_layers`` layers for one supported ``model_type``."""
    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if model_type == "llama":
        return LlamaConfig(num_hidden_layers=n_layers, hidden_size=16, intermediate_size=32,
                           num_attention_heads=4, num_key_value_heads=2, **common)
    if model_type == "qwen2":
        return Qwen2Config(num_hidden_layers=n_layers, hidden_size=16, intermediate_size=32,
                           num_attention_heads=4, num_key_value_heads=2, **common)
    if model_type == "gemma3_text":
        return Gemma3TextConfig(num_hidden_layers=n_layers, hidden_size=16, intermediate_size=32,
                                num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                sliding_window=4, **common)
    if model_type == "gpt2":
        return GPT2Config(n_layer=n_layers, n_embd=16, n_head=2, n_positions=128, **common)
    if model_type == "gpt_neox":
        return GPTNeoXConfig(num_hidden_layers=n_layers, hidden_size=16, intermediate_size=32,
                             num_attention_heads=2, **common)
    if model_type == "opt":
        return OPTConfig(num_hidden_layers=n_layers, hidden_size=16, ffn_dim=32, num_attention_heads=2,
                         word_embed_proj_dim=16, max_position_embeddings=128, **common)
    raise ValueError(f"no tiny config for {model_type!r}; choose one of {TINY_TYPES}")


TINY_TYPES = ("llama", "qwen2", "gemma3_text", "gpt2", "gpt_neox", "opt")


def tiny_model(model_type: str, n_layers: int = 4, seed: int = 0) -> torch.nn.Module:
    """A tiny random causal LM in eval mode, deterministic given ``seed``."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, n_layers))
    return model.eval()
