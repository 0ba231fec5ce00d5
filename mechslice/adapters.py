"""Architecture adapters: where each family keeps the weights that read and write the residual stream.

Slicing, norm fusion and tracing are written once against `BlockView`/`ArchAdapter`; nothing else in the
toolkit names a Hugging Face attribute of a particular family.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from mechslice.errors import MechsliceError


@dataclass(frozen=True)
class BlockView:
    """The modules of one pre-norm decoder block that touch the residual stream (paper notation in comments).

    Readers and writers are nn.Linear layers, seen through TransformerLens's LinearBridge on a bridged model.
    """

    input_norm: nn.Module  # W_norm before attention, Eq. (4)
    attn_readers: tuple[nn.Module, ...]  # W_q, W_k, W_v (or a fused W_qkv): read the normalized stream
    attn_writer: nn.Module  # W_o: writes A' back to the stream
    post_attn_norm: nn.Module  # the norm before the MLP
    mlp_readers: tuple[nn.Module, ...]  # W_gate, W_up (or a fused W_gate_up)
    mlp_writer: nn.Module  # W_down


@dataclass(frozen=True)
class Dims:
    """The paper's Table 1 sizes for one model: d, m, h_attn, v (KV heads), h_dim, vocab, layers."""

    d: int
    m: int
    h_attn: int
    v: int
    h_dim: int
    vocab: int
    n_layers: int


@dataclass(frozen=True)
class ArchAdapter:
    """Where one family keeps its residual-stream weights, by attribute name on the Hugging Face modules."""

    model_type: str
    attn_readers: tuple[str, ...]
    attn_writer: str
    mlp_readers: tuple[str, ...]
    mlp_writer: str
    fused_qkv: bool = False
    fused_gate_up: bool = False
    input_norm: str = "input_layernorm"
    post_attn_norm: str = "post_attention_layernorm"

    def layers(self, model: PreTrainedModel) -> nn.ModuleList:
        """The decoder blocks, in order."""
        return model.model.layers

    def embeddings(self, model: PreTrainedModel) -> nn.Embedding:
        """The input embedding (writes E_in to the stream)."""
        return model.model.embed_tokens

    def final_norm(self, model: PreTrainedModel) -> nn.Module:
        """The norm before the unembedding."""
        return model.model.norm

    def lm_head(self, model: PreTrainedModel) -> nn.Linear:
        """The unembedding (reads the final normalized stream)."""
        return model.lm_head

    def block(self, layer: nn.Module) -> BlockView:
        """The residual-stream modules of one decoder block."""
        attn, mlp = layer.self_attn, layer.mlp
        return BlockView(
            input_norm=getattr(layer, self.input_norm),
            attn_readers=tuple(getattr(attn, n) for n in self.attn_readers),
            attn_writer=getattr(attn, self.attn_writer),
            post_attn_norm=getattr(layer, self.post_attn_norm),
            mlp_readers=tuple(getattr(mlp, n) for n in self.mlp_readers),
            mlp_writer=getattr(mlp, self.mlp_writer),
        )

    def attention_window(self, config: PretrainedConfig, layer: int) -> int | None:
        """How many most recent keys (the query's own included) layer `layer` attends to; None: all before it.

        Mistral and Phi-3 configs may set one `sliding_window` for every layer; Qwen2 names per layer whether
        it slides (`layer_types`); Llama has no window. Read from the config exactly as the HF masks read it.
        """
        window = getattr(config, "sliding_window", None)
        kinds = getattr(config, "layer_types", None)
        if kinds is not None:
            return window if kinds[layer] == "sliding_attention" else None
        return window

    def dims(self, config: PretrainedConfig) -> Dims:
        """Table 1 sizes read off the config."""
        h_attn = config.num_attention_heads
        h_dim = getattr(config, "head_dim", None) or config.hidden_size // h_attn
        return Dims(
            d=config.hidden_size,
            m=config.intermediate_size,
            h_attn=h_attn,
            v=getattr(config, "num_key_value_heads", None) or h_attn,
            h_dim=h_dim,
            vocab=config.vocab_size,
            n_layers=config.num_hidden_layers,
        )


_LLAMA_LIKE = {
    "attn_readers": ("q_proj", "k_proj", "v_proj"),
    "attn_writer": "o_proj",
    "mlp_readers": ("gate_proj", "up_proj"),
    "mlp_writer": "down_proj",
}

ADAPTERS: dict[str, ArchAdapter] = {
    "llama": ArchAdapter("llama", **_LLAMA_LIKE),
    # Qwen2's Q/K/V biases live on the output side, which rotation of the input side never touches.
    "qwen2": ArchAdapter("qwen2", **_LLAMA_LIKE),
    "mistral": ArchAdapter("mistral", **_LLAMA_LIKE),
    # Phi-3 fuses Q/K/V and gate/up; their input side is still d wide, so they rotate and slice unfused.
    "phi3": ArchAdapter(
        "phi3",
        attn_readers=("qkv_proj",),
        attn_writer="o_proj",
        mlp_readers=("gate_up_proj",),
        mlp_writer="down_proj",
        fused_qkv=True,
        fused_gate_up=True,
    ),
}

# Families the method does not cover, with what is missing; anything else unknown gets the generic refusal.
_REFUSED = {
    "gemma2": "post-attention and post-feedforward norms sit inside the residual branch",
    "gemma3": "post-branch norms and QK-norm sit inside the residual branch",
    "gemma3_text": "post-branch norms and QK-norm sit inside the residual branch",
    "mixtral": "mixture-of-experts blocks (one router and many MLPs per layer) are not covered",
    "qwen2_moe": "mixture-of-experts blocks are not covered",
    "olmo2": "post-branch norms and QK-norm sit inside the residual branch",
    "gpt2": "LayerNorm with bias needs mean-baking before fusion, which is not implemented",
    "opt": "LayerNorm with bias needs mean-baking before fusion, which is not implemented",
    "phi": "LayerNorm with bias and a parallel attention/MLP block are not covered",
}


def adapter_for(config: PretrainedConfig) -> ArchAdapter:
    """The adapter for a config's `model_type`, or a clear refusal naming the architecture."""
    return adapter_for_type(getattr(config, "model_type", "unknown"))


def adapter_for_type(model_type: str) -> ArchAdapter:
    """The adapter for a Hugging Face `model_type`, or a clear refusal naming the architecture."""
    if model_type in ADAPTERS:
        return ADAPTERS[model_type]
    supported = ", ".join(sorted(ADAPTERS))
    why = _REFUSED.get(model_type, "its block layout has no adapter")
    raise MechsliceError(f"unsupported architecture '{model_type}': {why}; supported: {supported}")
