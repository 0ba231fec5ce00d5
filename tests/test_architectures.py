"""Every capability on each adapter family (Llama, Qwen2, Mistral, Phi-3), and refusals for uncovered blocks.

Each family is a small random model built from its real `transformers` config class (2 layers, d = 64, GQA
4 query / 2 KV heads, vocab 256 byte-level tokens) with the feature that sets it apart switched on: Llama-3 RoPE
scaling, Qwen2 Q/K/V biases with a tied head and one sliding-window layer, Mistral's sliding window, Phi-3's
fused W_qkv / W_gate_up with partial RoPE. Norm weights and biases are randomised so fusion has work to do.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    OPTConfig,
    Phi3Config,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from analyses.conformance import EQUATIONS, check_conformance
from analyses.sweep import run_sweep
from hooks.flow import trace
from mechslice.adapters import adapter_for
from mechslice.cli import main
from mechslice.errors import MechsliceError
from mechslice.loaded import LoadedModel
from mechslice.loading import load_model
from mechslice.slicing import fuse_norms, save_sliced, slice_model
from mechslice.slicing.layers import ShortcutBlock
from tests.conftest import randomize_norms, sweep_settings

VOCAB, D, WINDOW = 256, 64, 4
# Logits are O(1) after a few d = 64 fp32 dot products: reordering the sums (fusion, a rotation by an orthogonal
# Q computed in float64 and stored in fp32) moves them by ~1e-6. 1e-4 leaves margin; a wrong transpose, a bias
# rotated with the wrong side or a missing shortcut moves them by O(0.1). The same for all four families.
ATOL = 1e-4

SHAPE = dict(
    hidden_size=D,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=1,
)
_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8,  # below the test windows, so the scaling really acts
}
FAMILIES: dict[str, tuple[type[PretrainedConfig], dict[str, object]]] = {
    "llama": (LlamaConfig, {"rope_parameters": _LLAMA3_ROPE, "tie_word_embeddings": False}),
    "qwen2": (
        Qwen2Config,
        {
            "tie_word_embeddings": True,
            "use_sliding_window": True,
            "sliding_window": WINDOW,
            "max_window_layers": 1,
        },
    ),
    "mistral": (MistralConfig, {"sliding_window": WINDOW, "tie_word_embeddings": False}),
    "phi3": (
        Phi3Config,
        {
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
            "tie_word_embeddings": False,
        },
    ),
}
ROTATIONS = ("per-layer", "global")


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with no merges: the 256 byte symbols are the whole vocabulary."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=alphabet[1], pad_token=alphabet[0])


def family_config(family: str) -> PretrainedConfig:
    """A fresh config (slicing edits the config in place)."""
    config_class, extra = FAMILIES[family]
    return config_class(**SHAPE, **extra)


def random_model(family: str, seed: int = 0) -> torch.nn.Module:
    """The family's causal LM with randomised norm weights and biases."""
    return model_from(family_config(family), seed)


def model_from(config: PretrainedConfig, seed: int = 0) -> torch.nn.Module:
    """A seeded random model; norm weights and biases (which HF initialises to 1 and 0) randomised too."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    randomize_norms(model, biases=True)
    return model


def random_lm(family: str, seed: int = 0) -> LoadedModel:
    model = random_model(family, seed)
    return LoadedModel(model, byte_tokenizer(), adapter_for(model.config), family, "random")


def ids(n: int, seqlen: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))


CALIB, PROBE = ids(8, 32, 1), ids(2, 16, 2)


@torch.no_grad()
def logits(lm: LoadedModel) -> torch.Tensor:
    return lm.model(PROBE).logits


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each family's dense random model saved as a Hugging Face folder with the byte tokenizer."""
    root = tmp_path_factory.mktemp("families")
    folders = {}
    for family in FAMILIES:
        folders[family] = root / family
        random_model(family).save_pretrained(folders[family])
        byte_tokenizer().save_pretrained(folders[family])
    return folders


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A `text:PATH` corpus of 40 paragraphs of random lowercase words (train and test splits both non-empty)."""
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefgh") for _ in range(rng.randint(1, 5))) for _ in range(300)]
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(60)) for _ in range(40)))
    return f"text:{path}"


@pytest.mark.parametrize("family", FAMILIES)
def test_loads_from_a_folder_with_its_adapter_and_info(family, saved, capsys):
    lm = load_model(str(saved[family]), device="cpu", dtype=torch.float32)
    assert lm.adapter.model_type == family == lm.model.config.model_type
    assert lm.dims.d == D and lm.dims.h_attn == 4 and lm.dims.v == 2 and lm.dims.h_dim == 16
    reference = random_lm(family)
    assert torch.equal(logits(lm), logits(reference))  # same seed, same weights, same ops
    assert main(["info", "--model", str(saved[family]), "--device", "cpu", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["architecture"] == family and info["d"] == D
    assert info["tied_embeddings"] == (family == "qwen2")
    assert all(row["matches"] for row in info["weights"])  # Table 2, fused rows for Phi-3


@pytest.mark.parametrize("family", FAMILIES)
def test_fusion_keeps_logits_unties_and_leaves_unit_norms(family):
    lm = random_lm(family)
    before = logits(lm)
    fuse_norms(lm)
    assert torch.allclose(logits(lm), before, atol=ATOL)
    head, embedding = lm.adapter.lm_head(lm.model), lm.adapter.embeddings(lm.model)
    assert head.weight is not embedding.weight and not lm.model.config.tie_word_embeddings
    for layer in lm.adapter.layers(lm.model):
        view = lm.adapter.block(layer)
        for norm in (view.input_norm, view.post_attn_norm):
            assert torch.equal(norm.weight, torch.ones_like(norm.weight))


@pytest.mark.parametrize("rotation", ROTATIONS)
@pytest.mark.parametrize("family", FAMILIES)
def test_rotation_without_slicing_keeps_logits(family, rotation):
    lm = random_lm(family)
    before = logits(lm)
    record = slice_model(lm, 0.0, CALIB, rotation=rotation, progress=False)
    assert record.d_prime == D
    assert torch.allclose(logits(lm), before, atol=ATOL)
    original = random_lm(family)
    rotated, plain = (x.adapter.embeddings(x.model).weight for x in (lm, original))
    assert not torch.allclose(rotated, plain, atol=0.1)  # the stream really was rotated


@pytest.mark.parametrize("rotation", ROTATIONS)
@pytest.mark.parametrize("family", FAMILIES)
def test_sliced_model_saves_reloads_traces_and_conforms(family, rotation, tmp_path):
    lm = random_lm(family)
    record = slice_model(lm, 0.25, CALIB, rotation=rotation, progress=False)
    out = save_sliced(lm, record, tmp_path / "sliced")
    loaded = load_model(str(out), device="cpu", dtype=torch.float32)
    assert loaded.adapter.model_type == family and loaded.dims.d == 48
    assert torch.equal(logits(loaded), logits(lm))  # same fp32 weights, same ops: bit-identical
    layers = loaded.adapter.layers(loaded.model)
    assert all(isinstance(layer, ShortcutBlock) == (rotation == "per-layer") for layer in layers[:-1])
    assert isinstance(layers[-1], ShortcutBlock)  # its MLP skip widens d' -> d into the unsliced head

    flow = trace(loaded.bridge, PROBE)
    assert flow.shapes[(0, "E_in")] == (16, 48) and flow.shapes[(0, "E_out")] == (16, 48)
    assert flow.shapes[(1, "E_out")] == (16, D)  # the last block writes the full-width stream
    assert flow.shapes[(0, "Q")] == (16, 4, 16) and flow.shapes[(0, "gate")] == (16, 128)
    report = check_conformance(loaded, PROBE)
    assert report.passed, report.worst()
    assert report.shared_d == [48, D]  # Table 2: residual sides are d', but the last W_down writes d
    checked = {d.stage for d in report.deviations}
    rope_stages = {"Q_rope", "K_rope"}
    # TransformerLens 4.3's joint-QKV attention (Phi-3) never fires hook_rot_q/k: RoPE is checked through W_a.
    expected = {s for _, s in EQUATIONS} - (rope_stages if family == "phi3" else set())
    assert checked == expected
    assert report.missing == []  # the verdict covers every pair: RoPE on Phi-3 is declared, with its reason
    assert set(report.not_applicable) == ({"RoPE(Q)", "RoPE(K)"} if family == "phi3" else set())
    assert all(layers == [0, 1] for layers, _ in report.not_applicable.values())


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_sliding_window_is_traced_and_checked(family):
    """The recorded W_a is zero beyond the window exactly where the adapter says a layer slides."""
    lm = random_lm(family)
    flow = trace(lm.bridge, PROBE, stages=["W_a"], raw=["W_a"])
    q, k = torch.arange(16)[:, None], torch.arange(16)[None, :]
    outside = (k <= q - WINDOW).repeat(2 * 4, 1)  # rows are (sequence, head, query)
    for layer in range(2):
        window = lm.adapter.attention_window(lm.model.config, layer)
        pattern = flow.raw_rows(layer, "W_a")
        assert bool((pattern[outside] == 0).all()) == (window == WINDOW)
    assert [lm.adapter.attention_window(lm.model.config, i) for i in range(2)] == (
        [None, WINDOW] if family == "qwen2" else [WINDOW, WINDOW]
    )
    assert check_conformance(lm, PROBE).passed


@pytest.mark.parametrize("family", FAMILIES)
def test_sweep_runs_two_sparsities(family, saved, corpus, tmp_path):
    # probe_tokens 128 (the shared default) gives more rows than d = 64: the Gaussian covariance is not singular
    settings = sweep_settings(
        corpus,
        sparsities=(0.25, 0.5),
        path="exact",
        calib_seqlen=32,
        ppl_seqlen=16,
        ppl_max_tokens=64,
        probe_seqlen=16,
    )
    results = run_sweep(
        settings, tmp_path, model=str(saved[family]), device="cpu", progress=False, log=lambda _: None
    )
    records = results["records"]
    assert [(r["sparsity"], r["d_prime"]) for r in records] == [(0.0, 64), (0.25, 48), (0.5, 32)]
    assert all(r["ppl"] > 1 and torch.isfinite(torch.tensor(r["ppl"])) for r in records)
    ratios = [r["entropy"]["gaussian"]["ratio_mean"] for r in records]
    assert ratios[0] == pytest.approx(1.0)
    # A sliced record's mean ratio is finite, or None when every layer was left out (e.g. H and H' of
    # opposite signs on these random weights) and then excluded_layers says why for each.
    for r, ratio in zip(records[1:], ratios[1:], strict=True):
        g = r["entropy"]["gaussian"]
        assert math.isfinite(ratio) if ratio is not None else sorted(g["excluded_layers"]) == ["0", "1"]
    assert json.loads((tmp_path / "results.json").read_text())["records"] == records


REFUSED = [
    (Gemma2Config, "post-attention and post-feedforward norms"),
    (Gemma3TextConfig, "QK-norm"),
    (MixtralConfig, "mixture-of-experts"),
    (GPT2Config, "LayerNorm with bias"),
    (OPTConfig, "LayerNorm with bias"),
]


@pytest.mark.parametrize(("config_class", "missing"), REFUSED, ids=[c.model_type for c, _ in REFUSED])
def test_uncovered_architectures_are_refused_naming_what_is_missing(config_class, missing, tmp_path):
    small = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=1,
        n_head=2,
        ffn_dim=64,
        word_embed_proj_dim=32,
        num_local_experts=2,
    )
    known = set(config_class().to_dict())
    config = config_class(**{k: v for k, v in small.items() if k in known})
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    byte_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(MechsliceError, match=rf"unsupported architecture '{config.model_type}': .*{missing}"):
        load_model(str(tmp_path), device="cpu")
