"""Shared fixtures: the real embedded model (fresh per test, since slicing edits it in place) and tiny models."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import numpy as np
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


def law_results(
    nominal: tuple[float, ...],
    d: int,
    ppl0: float,
    ppl_slope: float,
    acc0: dict[str, float],
    slopes: dict[str, float],
    noise: float = 0.0,
    seed: int = 0,
    stderr: float = 0.01,
) -> dict[str, Any]:
    """A results document whose metrics follow the paper's laws (y = a*s + 1 for PPL, a*s for ln acc) plus noise.

    d' is rounded down to a multiple of 8, so effective and nominal sparsity differ as in a real sweep; acc_norm
    follows slopes half as steep so that choosing the key is visible in a fit. Each sliced record draws its own
    normal noise (sd `noise`) for y of PPL and for ln acc and ln acc_norm of every task; the dense record is exact.
    """
    rng = np.random.default_rng(seed)
    records = []
    for s_nom in nominal:
        d_prime = int((1 - s_nom) * d) // 8 * 8
        s = 1 - d_prime / d
        dense = s == 0
        eps = rng.normal(0.0, noise, size=1 + 2 * len(acc0))
        y_ppl = 1.0 + ppl_slope * s + (0 if dense else eps[0])
        tasks = {}
        for i, (task, a0) in enumerate(acc0.items()):
            jitter = (0.0, 0.0) if dense else (eps[1 + 2 * i], eps[2 + 2 * i])
            tasks[task] = {
                "acc": a0 * math.exp(slopes[task] * s + jitter[0]),
                "acc_norm": a0 * math.exp(0.5 * slopes[task] * s + jitter[1]),
                "stderr": stderr,
                "n": 500,
            }
        records.append(
            {
                "sparsity": s_nom,
                "effective_sparsity": s,
                "d": d,
                "d_prime": d_prime,
                "ppl": math.exp(math.log(ppl0) / y_ppl),
                "tasks": tasks,
            }
        )
    return {"model": "tiny", "model_fingerprint": "f00d", "settings": {}, "records": records}
