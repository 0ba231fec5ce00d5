"""Loading each adapter family from a GGUF file written here with the `gguf` package (F32 tensors).

The writer follows llama.cpp's conventions as transformers' GGUF loader reads them: tensor names from gguf-py's
own name map (`blk.N.attn_q`, Phi-3's fused `attn_qkv` and `ffn_up`), Llama-arch Q/K rows permuted for
llama.cpp's interleaved RoPE, `output.weight` omitted when the head is tied, Mistral written as arch `llama`
with "mistral" in `general.name`, and a byte-level ("gpt2") tokenizer in the metadata.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import MODEL_ARCH_NAMES, GGUFWriter, get_tensor_name_map
from transformers import PreTrainedModel

from mechslice.errors import MechsliceError
from mechslice.loading import load_model
from mechslice.slicing import slice_model
from tests.test_architectures import (
    CALIB,
    FAMILIES,
    PROBE,
    SHAPE,
    VOCAB,
    byte_tokenizer,
    logits,
    model_from,
)

# (GGUF architecture, general.name, model type transformers builds) per family. llama.cpp files Mistral under
# the Llama architecture; transformers 5.24 turns such a file into a Mistral model only when general.name is
# exactly "mistral", and then fails (gguf 0.19 has no "mistral" tensor map). A real Mistral GGUF (named e.g.
# "Mistral 7B v0.3") therefore loads as a Llama model: the same weights and computation, without the window.
GGUF_ARCH = {
    "llama": ("llama", "tiny-llama", "llama"),
    "qwen2": ("qwen2", "tiny-qwen2", "qwen2"),
    "mistral": ("llama", "Tiny Mistral", "llama"),
    "phi3": ("phi3", "tiny-phi3", "phi3"),
}


def llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's row order for Llama-arch W_q / W_k (pairs interleaved per head); transformers undoes it."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model: PreTrainedModel, path: Path, arch: str, name: str) -> Path:
    """Write `model` (and the byte tokenizer) as an F32 GGUF file in llama.cpp's layout."""
    config = model.config
    writer = GGUFWriter(str(path), arch)
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_embedding_length(config.hidden_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_vocab_size(config.vocab_size)
    tokens = sorted(byte_tokenizer().get_vocab(), key=byte_tokenizer().get_vocab().get)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * len(tokens))  # 1: NORMAL
    writer.add_token_scores([0.0] * len(tokens))  # no merges: the loader derives none from single bytes
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    writer.add_pad_token_id(config.pad_token_id)
    arch_id = next(k for k, v in MODEL_ARCH_NAMES.items() if v == arch)
    names = get_tensor_name_map(arch_id, config.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        base, suffix = hf_name.rsplit(".", 1)
        if base == "lm_head" and config.tie_word_embeddings:
            continue
        gguf_name = names.get_name(base)
        assert gguf_name is not None, hf_name
        w = tensor.detach().float()
        if arch == "llama" and gguf_name.endswith("attn_q"):
            w = llama_cpp_permute(w, config.num_attention_heads)
        elif arch == "llama" and gguf_name.endswith("attn_k"):
            w = llama_cpp_permute(w, config.num_key_value_heads)
        writer.add_tensor(f"{gguf_name}.{suffix}", w.numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("family", GGUF_ARCH)
def test_family_loads_from_gguf_with_the_same_logits(family, tmp_path):
    # transformers 5.24's GGUF config mapping for these architectures reads no RoPE scaling, partial rotary
    # or sliding window, so each family's plain config is written; the tied head is kept (llama.cpp writes it
    # by omitting output.weight, and the loader ties the head again).
    config_class, _ = FAMILIES[family]
    config = config_class(**SHAPE, tie_word_embeddings=family == "qwen2")
    model = model_from(config)
    arch, name, model_type = GGUF_ARCH[family]
    path = write_gguf(model, tmp_path / f"{family}.gguf", arch, name)

    lm = load_model(str(path), device="cpu", dtype=torch.float32)
    assert (
        lm.adapter.model_type == model_type and lm.dims.d == SHAPE["hidden_size"] and lm.dims.vocab == VOCAB
    )
    assert not getattr(lm.model, "is_quantized", False)
    assert lm.model.config.tie_word_embeddings == (family == "qwen2")
    reference = type(lm)(model, byte_tokenizer(), lm.adapter, family, "reference")
    # F32 tensors round-trip exactly; only the attention kernel may differ (sdpa vs eager): fp32 rounding ~1e-6.
    assert torch.allclose(logits(lm), logits(reference), atol=1e-5)
    text = "a gguf tokenizer\n\nround trip"
    assert lm.tokenizer(text)["input_ids"] == byte_tokenizer()(text)["input_ids"]
    slice_model(lm, 0.25, CALIB, rotation="global", progress=False)  # a GGUF-loaded model slices like any
    assert lm.dims.d == 48 and torch.isfinite(lm.model(PROBE).logits).all()


def test_uncovered_gguf_architecture_is_refused_before_reading_tensors(tmp_path):
    writer = GGUFWriter(str(tmp_path / "g.gguf"), "gemma2")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(MechsliceError, match="unsupported architecture 'gemma2': post-attention"):
        load_model(str(tmp_path / "g.gguf"), device="cpu")
