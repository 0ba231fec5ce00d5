"""SliceGPT engine on small random Llama models: fusion, invariance, slicing, bridge, Slicer, bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import (
    Gemma2Config,
    LlamaForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from hooks.stats import SecondMoment, gram
from mechslice.adapters import adapter_for
from mechslice.errors import MechsliceError
from mechslice.loaded import LoadedModel
from mechslice.loading import load_model
from mechslice.slicing import Slicer, fuse_norms, slice_model, sliced_width
from mechslice.slicing.calibration import pca, principal_angles
from mechslice.slicing.layers import ShortcutBlock
from tests.conftest import randomize_norms, tiny_llama_config

D, VOCAB = 64, 128
# fp32 logits of O(1) after a handful of d=64 dot products: rounding differences stay ~1e-6; 1e-4 leaves margin
# while any wrong rotation, transpose or missing shortcut moves logits by O(0.1).
ATOL = 1e-4


@pytest.fixture(scope="module")
def tokenizer():
    return load_model(device="cpu").tokenizer


def random_lm(tokenizer, n_layers: int = 2, seed: int = 0) -> LoadedModel:
    """A tiny Llama with tied embeddings and non-trivial norm weights (so fusion has something to fold)."""
    torch.manual_seed(seed)
    config = tiny_llama_config(
        hidden_size=D,
        num_hidden_layers=n_layers,
        vocab_size=VOCAB,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).eval()
    randomize_norms(model)
    return LoadedModel(model, tokenizer, adapter_for(config), "random", "random")


def windows(n: int, seqlen: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))


CALIB, IDS = windows(8, 32, 1), windows(2, 16, 2)


@torch.no_grad()
def logits(lm: LoadedModel) -> torch.Tensor:
    return lm.model(IDS).logits


def test_fuse_norms_keeps_logits_and_unties(tokenizer):
    lm = random_lm(tokenizer)
    before = logits(lm)
    fuse_norms(lm)
    assert torch.allclose(logits(lm), before, atol=ATOL)
    assert lm.model.lm_head.weight is not lm.model.model.embed_tokens.weight
    assert not lm.model.config.tie_word_embeddings
    assert all(
        torch.equal(m.weight, torch.ones_like(m.weight))
        for m in lm.model.modules()
        if isinstance(m, LlamaRMSNorm)
    )


@pytest.mark.parametrize("rotation", ["per-layer", "global"])
def test_rotation_without_slicing_is_invariant(tokenizer, rotation):
    lm = random_lm(tokenizer)
    before = logits(lm)
    record = slice_model(lm, 0.0, CALIB, rotation=rotation, progress=False)
    assert record.d_prime == D and record.effective_sparsity == 0.0
    assert torch.allclose(logits(lm), before, atol=ATOL)
    assert not torch.allclose(
        lm.model.model.embed_tokens.weight, random_lm(tokenizer).model.model.embed_tokens.weight
    )


@pytest.mark.parametrize("slice_head", [False, True])
@pytest.mark.parametrize("rotation", ["per-layer", "global"])
def test_sliced_model_has_width_d_prime(tokenizer, rotation, slice_head):
    lm = random_lm(tokenizer)
    before = logits(lm)
    eps = lm.model.config.rms_norm_eps
    record = slice_model(lm, 0.3, CALIB, rotation=rotation, round_to=8, progress=False, slice_head=slice_head)
    d_prime = 40  # floor(0.7 * 64 / 8) * 8
    head = d_prime if slice_head else D
    assert (record.d_prime, record.sparsity, record.effective_sparsity) == (d_prime, 0.3, 1 - d_prime / D)
    assert record.slice_head == slice_head and record.head_width == head
    assert lm.model.config.hidden_size == d_prime and lm.model.model.embed_tokens.weight.shape == (
        VOCAB,
        d_prime,
    )
    out = logits(lm)
    assert out.shape == before.shape and torch.isfinite(out).all()
    assert not torch.allclose(out, before, atol=ATOL)  # slicing does change the function
    layers = lm.model.model.layers
    for i, layer in enumerate(layers):
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            assert (
                torch.equal(norm.weight, torch.ones(d_prime)) and norm.variance_epsilon == eps * D / d_prime
            )
        last = i == len(layers) - 1
        assert layer.mlp.down_proj.weight.shape[0] == (head if last else d_prime)
        if rotation == "per-layer":
            assert isinstance(layer, ShortcutBlock)
            assert layer.attn_shortcut.shape == (d_prime, d_prime)
            assert layer.mlp_shortcut.shape == (d_prime, head if last else d_prime)
        else:  # only the skip into an unsliced head changes width
            assert isinstance(layer, ShortcutBlock) == (last and not slice_head)
    final = lm.model.model.norm
    assert lm.model.lm_head.weight.shape == (VOCAB, head) and final.weight.shape == (head,)
    assert final.variance_epsilon == pytest.approx(eps * D / head, rel=1e-12)
    expected = (
        ["global"] if rotation == "global" else ["resid_pre.0", "resid_mid.0", "resid_pre.1", "resid_mid.1"]
    )
    assert sorted(record.spectra) == sorted(expected + ([] if rotation == "global" else ["resid_final"]))
    spectrum = next(iter(record.spectra.values()))
    assert len(spectrum) == D and spectrum == sorted(spectrum, reverse=True)


@pytest.mark.parametrize("slice_head", [False, True])
@pytest.mark.parametrize("rotation", ["per-layer", "global"])
def test_bridge_sees_width_d_prime_at_every_layer(tokenizer, rotation, slice_head):
    lm = random_lm(tokenizer)
    _ = lm.bridge  # built before slicing: slicing must put the plain modules back first
    slice_model(lm, 0.25, CALIB, rotation=rotation, progress=False, slice_head=slice_head)
    lm.reset_bridge()
    bridge_logits, cache = lm.bridge.run_with_cache(IDS)
    lm.model.set_attn_implementation("sdpa")
    assert torch.allclose(bridge_logits, logits(lm), atol=ATOL)
    for i in range(2):
        for hook in ("hook_resid_pre", "ln1.hook_in", "ln2.hook_in", "hook_resid_post"):
            width = 64 if (i, hook, slice_head) == (1, "hook_resid_post", False) else 48
            assert cache[f"blocks.{i}.{hook}"].shape == (2, 16, width), hook


def test_slicer_shares_one_calibration(tokenizer):
    exact = random_lm(tokenizer)
    slice_model(exact, 0.25, CALIB, rotation="global", progress=False)
    lm = random_lm(tokenizer)
    before = logits(lm)
    slicer = Slicer(lm, CALIB, rotation="global", progress=False)
    sliced, _ = slicer.sliced(0.25)
    assert torch.allclose(logits(sliced), logits(exact), atol=ATOL)  # global mode: shared = exact
    per_layer = Slicer(lm, CALIB, rotation="per-layer", progress=False)
    dense, _ = per_layer.sliced(0.0)
    assert torch.allclose(logits(dense), before, atol=ATOL)
    small, small_record = per_layer.sliced(0.5)
    assert small_record.d_prime == 32 and small_record.shared_rotation
    assert small.model.model.layers[0].attn_shortcut.shape == (32, 32)
    assert torch.allclose(logits(lm), before, atol=ATOL)  # handing out models leaves the source intact
    own = {id(p) for p in lm.model.parameters()}
    assert not any(id(p) in own for p in small.model.parameters())


@pytest.mark.parametrize(
    ("config_class", "model_class"), [(Qwen2Config, Qwen2ForCausalLM), (Phi3Config, Phi3ForCausalLM)]
)
@pytest.mark.parametrize("rotation", ["per-layer", "global"])
def test_other_families_rotate_invariantly_and_slice(tokenizer, config_class, model_class, rotation):
    """The adapter seam: Qwen2 (biased Q/K/V) and Phi-3 (fused W_qkv, W_gate_up) go through the same code."""
    config = config_class(
        hidden_size=D,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
    )
    torch.manual_seed(0)
    model = model_class(config).eval()
    randomize_norms(model, biases=True)
    lm = LoadedModel(model, tokenizer, adapter_for(config), "random", "random")
    before = logits(lm)
    slice_model(lm, 0.0, CALIB, rotation=rotation, progress=False)
    assert torch.allclose(logits(lm), before, atol=ATOL)
    other = LoadedModel(model_class(config).eval(), tokenizer, adapter_for(config), "random", "random")
    slice_model(other, 0.5, CALIB, rotation=rotation, progress=False)
    assert other.model.config.hidden_size == 32 and torch.isfinite(logits(other)).all()


def test_second_moments_merge_exactly_and_pca_is_sorted():
    x = torch.randn(100, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    whole, a, b = SecondMoment(D), SecondMoment(D), SecondMoment(D)
    whole.add(x)
    a.add(x[:37])
    b.add(x[37:])
    a.merge(b)
    assert a.count == 100 and torch.allclose(a.sum, whole.sum, rtol=1e-12, atol=1e-10)
    eigenvalues, q = pca(a)
    assert torch.all(eigenvalues[:-1] >= eigenvalues[1:])
    assert torch.allclose(q.T @ q, torch.eye(D, dtype=torch.float64), atol=1e-10)
    damped = x.T @ x / 100 + 0.01 * (x.T @ x / 100).diagonal().mean() * torch.eye(D, dtype=torch.float64)
    assert torch.allclose(q @ torch.diag(eigenvalues) @ q.T, damped, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_gram_matches_float64_of_the_same_values(dtype):
    # the products of bf16/fp16 values are exact in float32, so only the float32 within-batch sum rounds:
    # relative error about 2^-24 sqrt(4096) = 4e-6 at most; 2e-5 leaves a margin and fails for a bf16 GEMM (1.7e-3)
    x = torch.randn(4096, 96, generator=torch.Generator().manual_seed(5)).to(dtype)
    exact = x.double().T @ x.double()
    got = gram(x)
    assert got.dtype == torch.float64
    assert ((got - exact).norm() / exact.norm()).item() < 2e-5


def test_principal_angles_recover_a_known_rotation():
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    a = q[:, :4]
    theta = torch.tensor([1e-6, 1e-3, 0.3, 1.2], dtype=torch.float64)
    b = (
        a * theta.cos() + q[:, 4:8] * theta.sin()
    )  # rotate each column of a towards its own orthogonal partner
    assert torch.allclose(principal_angles(a, b), theta.flip(0), rtol=1e-8, atol=1e-12)
    assert torch.allclose(principal_angles(a, a), torch.zeros(4, dtype=torch.float64), atol=1e-12)


def test_sliced_width_rounds_down():
    assert (
        sliced_width(576, 0.2) == 456 and sliced_width(576, 0.25) == 432 and sliced_width(576, 0.1, 1) == 518
    )


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, float("nan")])
def test_sparsity_outside_unit_interval_is_refused(tokenizer, sparsity):
    with pytest.raises(MechsliceError, match="sparsity must lie in"):
        slice_model(random_lm(tokenizer), sparsity, CALIB, progress=False)


def test_sparsity_leaving_no_width_is_refused(tokenizer):
    with pytest.raises(MechsliceError, match="leaves d' = 0"):
        slice_model(random_lm(tokenizer), 0.9, CALIB, round_to=8, progress=False)


def test_round_to_below_one_is_refused(tokenizer):
    with pytest.raises(MechsliceError, match="round_to must be at least 1"):
        slice_model(random_lm(tokenizer), 0.2, CALIB, round_to=0, progress=False)


def test_unknown_rotation_is_refused(tokenizer):
    with pytest.raises(MechsliceError, match="unknown rotation"):
        slice_model(random_lm(tokenizer), 0.2, CALIB, rotation="random", progress=False)


@pytest.mark.parametrize("rotation", ["per-layer", "global"])
def test_fewer_tokens_than_d_warns_and_damping_keeps_it_defined(tokenizer, rotation):
    lm = random_lm(tokenizer)
    with pytest.warns(UserWarning, match=r"fewer than d=64.*damping"):
        slice_model(lm, 0.25, windows(2, 16, 4), rotation=rotation, progress=False)
    assert torch.isfinite(logits(lm)).all()


@pytest.mark.parametrize("rotation", ["per-layer", "global"])
def test_non_finite_activations_name_the_layer(tokenizer, rotation):
    lm = random_lm(tokenizer)
    with torch.no_grad():
        lm.model.model.layers[1].mlp.down_proj.weight[0, 0] = float("inf")
    with pytest.raises(MechsliceError, match=r"NaN or Inf .* layer 1"):
        slice_model(lm, 0.25, CALIB, rotation=rotation, progress=False)


def test_block_with_extra_post_norm_is_refused(tokenizer):
    lm = random_lm(tokenizer)
    lm.model.model.layers[0].post_feedforward_layernorm = LlamaRMSNorm(D)
    with pytest.raises(MechsliceError, match="layer 0 has norms the method does not cover"):
        slice_model(lm, 0.25, CALIB, progress=False)


def test_layernorm_with_bias_is_refused(tokenizer):
    lm = random_lm(tokenizer)
    lm.model.model.layers[1].input_layernorm = nn.LayerNorm(D)
    with pytest.raises(MechsliceError, match="layer 1 uses LayerNorm with a bias"):
        fuse_norms(lm)


def test_architecture_with_post_branch_norms_is_refused():
    with pytest.raises(MechsliceError, match=r"gemma2.*post-attention and post-feedforward norms"):
        adapter_for(Gemma2Config())


def test_already_sliced_model_is_refused(tokenizer):
    lm = random_lm(tokenizer)
    slice_model(lm, 0.25, CALIB, progress=False)
    with pytest.raises(MechsliceError, match="already sliced"):
        slice_model(lm, 0.25, CALIB, progress=False)


DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rotation", ["per-layer", "global"])
def test_slices_in_place_on_the_model_device(tokenizer, device, rotation):
    lm = random_lm(tokenizer)
    lm.model.to(device)
    ids = IDS.to(device)
    with torch.no_grad():
        before = lm.model(ids).logits
        slice_model(lm, 0.0, CALIB, rotation=rotation, progress=False)
        after = lm.model(ids).logits
    assert {p.device.type for p in lm.model.parameters()} == {device}
    # GPU matmuls may use TF32-like reduced precision for fp32 in some setups: allow 1e-3 there.
    assert torch.allclose(after, before, atol=ATOL if device == "cpu" else 1e-3)
