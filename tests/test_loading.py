"""Loading: the embedded model from its cache, the bridge over the same modules, and refusals of bad sources."""

from __future__ import annotations

import time
from pathlib import Path

import gguf
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from mechslice.errors import MechsliceError
from mechslice.loaded import LoadedModel
from mechslice.loading import cache_dir, embedded_gguf, load_model


@pytest.mark.slow
def test_embedded_model_shape_and_cache(embedded: LoadedModel) -> None:
    dims = embedded.dims
    assert (dims.d, dims.n_layers, dims.h_attn, dims.v, dims.h_dim, dims.m, dims.vocab) == (
        576,
        30,
        9,
        3,
        64,
        1536,
        49152,
    )
    assert (cache_dir() / "models" / "smollm2-135m" / "model.safetensors").exists()
    start = time.perf_counter()
    load_model(device="cpu")
    # Generous bound (target 2 s): this only catches a load that re-reads the GGUF instead of the cache.
    assert time.perf_counter() - start < 10


@pytest.mark.slow
def test_bridge_logits_equal_hf_logits(embedded: LoadedModel) -> None:
    ids = embedded.tokenizer("The residual stream has width d.", return_tensors="pt").input_ids
    bridge = embedded.bridge  # switches the HF modules to eager attention, which the bridge hooks into
    with torch.no_grad():
        hf = embedded.model(ids).logits
        hooked = bridge(ids)
    # Same modules, same kernels, same order of operations: the logits are bit-identical.
    assert torch.equal(hf, hooked)


@pytest.mark.slow
def test_tokenization_is_deterministic(embedded: LoadedModel) -> None:
    text = "Slicing keeps the first d' principal directions of the residual stream."
    first = embedded.tokenizer(text, add_special_tokens=False).input_ids
    again = load_model(device="cpu").tokenizer(text, add_special_tokens=False).input_ids
    assert first == again and len(first) > 5


def test_unknown_name_and_missing_path() -> None:
    with pytest.raises(MechsliceError, match="neither a known name"):
        load_model("no-such-model")
    with pytest.raises(MechsliceError, match="neither a known name"):
        load_model("/no/such/file.gguf")


def test_non_gguf_file(tmp_path: Path) -> None:
    path = tmp_path / "weights.gguf"
    path.write_bytes(b"not a model at all")
    with pytest.raises(MechsliceError, match="not a GGUF file"):
        load_model(str(path))


def test_truncated_gguf(tmp_path: Path) -> None:
    path = tmp_path / "cut.gguf"
    with open(embedded_gguf(), "rb") as f:
        path.write_bytes(f.read(1_000_000))
    with pytest.raises(MechsliceError, match="truncated or damaged"):
        load_model(str(path))


def test_unsupported_architecture_gguf(tmp_path: Path) -> None:
    path = tmp_path / "gemma.gguf"
    writer = gguf.GGUFWriter(str(path), arch="gemma2")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(MechsliceError, match=r"unsupported architecture 'gemma2'.*post-attention"):
        load_model(str(path))


def test_unsupported_architecture_folder(tmp_path: Path) -> None:
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path)
    with pytest.raises(MechsliceError, match=r"unsupported architecture 'gpt2'.*mean-baking"):
        load_model(str(tmp_path))


def test_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(MechsliceError, match=r"no config\.json"):
        load_model(str(tmp_path))
