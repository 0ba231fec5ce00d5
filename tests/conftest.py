"""Shared fixtures: the real embedded model (fresh per test, since slicing edits it in place) and tiny models."""

from __future__ import annotations

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from analyses.sweep import QUICK, SweepSettings, settings_from
from mechslice.corpora import load_corpus
from mechslice.loaded import LoadedModel
from mechslice.loading import load_model

DEAD_PID = 4_194_305  # above Linux's largest pid_max (2**22): no process has it


@pytest.fixture
def embedded() -> LoadedModel:
    """The real embedded SmolLM2 on the CPU in float32 (read from the float cache after the first load).

    Pinned to float32, not the `auto` default: the tests on it compare against float32 and float64
    recomputations at float32 tolerances, which bfloat16 rounding (on a machine with bf16 units) would exceed.
    """
    return load_model(device="cpu", dtype=torch.float32)


def tiny_llama_config(**overrides: object) -> LlamaConfig:
    """A small Llama config exercising GQA, gated SiLU MLP and RoPE."""
    base = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    return LlamaConfig(**{**base, **overrides})


@torch.no_grad()
def randomize_norms(model: torch.nn.Module, biases: bool = False) -> None:
    """Norm weights (and biases, if asked) drawn around 1, not HF's all-ones init, so fusion has work to do."""
    for name, p in model.named_parameters():
        if "norm" in name or (biases and name.endswith("bias")):
            p.copy_(1 + 0.3 * torch.randn_like(p))


@pytest.fixture
def tiny_llama() -> LlamaForCausalLM:
    """A seeded random tiny Llama in eval mode."""
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).eval()


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded random tiny Llama saved with the embedded tokenizer (so real text tokenizes)."""
    folder = tmp_path_factory.mktemp("tiny")
    tokenizer = load_model(device="cpu").tokenizer
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(vocab_size=len(tokenizer))).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Real Wikipedia text in a file: train and test paragraphs for calibration and perplexity."""
    path = tmp_path_factory.mktemp("corpus") / "wiki.txt"
    path.write_text(load_corpus("wiki", "test")[:60_000], encoding="utf-8")
    return f"text:{path}"


def sweep_settings(corpus: str, **overrides: object) -> SweepSettings:
    """The quick profile shrunk to seconds on a tiny model: 3 sparsities, perplexity only, small windows."""
    base = dict(
        sparsities=(0.0, 0.25, 0.5),
        tasks=("ppl",),
        calib_corpus=corpus,
        calib_samples=4,
        calib_seqlen=64,
        ppl_corpus=corpus,
        ppl_seqlen=64,
        ppl_max_tokens=256,
        estimators=("gaussian",),
        probe_tokens=128,
        probe_seqlen=64,
    )
    return settings_from(QUICK, **{**base, **overrides})
