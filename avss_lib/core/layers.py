"""Find the decoder layers of a causal language model, and their MLP and attention parts.

One table, :data:`ARCHITECTURES`, says where each supported family keeps its layers. Everything that
needs layers (activation hooks, pruning, fine-tuning) goes through :func:`find_layers`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from avss_lib.core.errors import ModelSpecError


@dataclass(frozen=True)
class ArchitectureLayout:
    """Attribute paths, relative to the causal-LM module (layers) or to one layer (the rest)."""

    layers: str  # the nn.ModuleList of decoder layers
    attention: str  # the self-attention module; its first output is the attention output
    down_proj: str  # the MLP's output projection; its input is act(gate) * up (or act(fc1))
    layer_count_attr: str  # config attribute holding the number of layers


_LLAMA_LIKE = ArchitectureLayout("model.layers", "self_attn", "mlp.down_proj", "num_hidden_layers")

#: model_type (config.model_type) -> layout
ARCHITECTURES: dict[str, ArchitectureLayout] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,
    "phi": ArchitectureLayout("model.layers", "self_attn", "mlp.fc2", "num_hidden_layers"),
    "gpt2": ArchitectureLayout("transformer.h", "attn", "mlp.c_proj", "n_layer"),
    "gpt_neox": ArchitectureLayout("gpt_neox.layers", "attention", "mlp.dense_4h_to_h", "num_hidden_layers"),
    "opt": ArchitectureLayout("model.decoder.layers", "self_attn", "fc2", "num_hidden_layers"),
}


@dataclass(frozen=True)
class DecoderLayers:
    """The decoder layers of one model, with accessors for their sub-modules."""

    model_type: str
    layout: ArchitectureLayout
    layers: nn.ModuleList

    def __len__(self) -> int:
        return len(self.layers)

    def attention(self, i: int) -> nn.Module:
        """Self-attention module of layer ``i``."""
        return _get(self.layers[i], self.layout.attention)

    def down_proj(self, i: int) -> nn.Module:
        """MLP output projection of layer ``i`` (its input is the MLP activation)."""
        return _get(self.layers[i], self.layout.down_proj)


def _get(root: nn.Module, path: str) -> nn.Module:
    obj: nn.Module = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


#: Where each family normalises inside a decoder block. "pre": a norm before attention and before the MLP, so
#: the block output is the un-normalised residual stream; "pre+post": Gemma-2/3 also normalise each
#: sub-layer's output before adding it to the residual stream; "post": a norm after each residual addition.
NORM_PLACEMENT: dict[str, str] = {
    "llama": "pre", "mistral": "pre", "qwen2": "pre", "qwen3": "pre", "gemma": "pre", "phi3": "pre", "phi": "pre",
    "gpt2": "pre", "gpt_neox": "pre", "gemma2": "pre+post", "gemma3_text": "pre+post",
}


def norm_placement(config: object) -> str:
    """``"pre"``, ``"pre+post"`` or ``"post"`` for a supported config (OPT: by its ``do_layer_norm_before``)."""
    model_type = getattr(config, "model_type", "")
    if model_type == "opt":
        return "pre" if getattr(config, "do_layer_norm_before", True) else "post"
    if model_type not in NORM_PLACEMENT:
        raise ModelSpecError(f"no norm placement recorded for model_type={model_type!r}: add it to "
                             "avss_lib.core.layers.NORM_PLACEMENT")
    return NORM_PLACEMENT[model_type]


def find_layers(model: nn.Module) -> DecoderLayers:
    """Return the decoder layers of a Hugging Face causal LM.

    Raises :class:`ModelSpecError` naming the class when the architecture is not supported.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    layout = ARCHITECTURES.get(model_type or "")
    if layout is None:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise ModelSpecError(
            f"unsupported architecture {type(model).__name__} (model_type={model_type!r}): "
            f"supported model types are {supported}; add its layout to avss_lib.core.layers.ARCHITECTURES"
        )
    try:
        layers = _get(model, layout.layers)
    except AttributeError as exc:
        raise ModelSpecError(
            f"{type(model).__name__} has model_type={model_type!r} but no '{layout.layers}': "
            "load it with AutoModelForCausalLM (a causal-LM head model)"
        ) from exc
    if not isinstance(layers, nn.ModuleList):
        raise ModelSpecError(f"{type(model).__name__}.{layout.layers} is not a ModuleList of layers")
    return DecoderLayers(model_type=model_type, layout=layout, layers=layers)
