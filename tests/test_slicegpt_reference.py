"""mechslice's per-layer slicing against a direct re-derivation of SliceGPT's algorithm, and its norm.

`reference_slicegpt` follows SliceGPT's `rotate_and_slice_sequential` with `do_slice_head=False` step by step on
plain tensors (its own fusion, PCA, shortcut bookkeeping and `RMSN` norm dividing by the original d), sharing
nothing with `mechslice.slicing` but the Hugging Face attention module it calls for softmax(QK^T)V.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechslice.loaded import LoadedModel
from mechslice.loading import load_model
from mechslice.slicing import slice_model
from tests.test_slicing import CALIB, IDS, D, random_lm


@pytest.fixture(scope="module")
def tokenizer():
    return load_model(device="cpu").tokenizer


def rmsn(x: Float[Tensor, "... w"], d: int, eps: float) -> Float[Tensor, "... w"]:
    """SliceGPT's RMSN: the sum of squares over the channels present, divided by the original d."""
    return x * torch.rsqrt(x.double().square().sum(-1, keepdim=True).to(x.dtype) / d + eps)


def pca_basis(xs: list[Float[Tensor, "b t d"]]) -> Float[Tensor, "d d"]:
    """SliceGPT's pca_calc: H = sum X^T X in float64, damped by 0.01 mean(diag H), eigenvectors by descending value."""
    h = sum(x.double().flatten(0, 1).T @ x.double().flatten(0, 1) for x in xs)
    h = h + 0.01 * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype)
    values, vectors = torch.linalg.eigh(h)
    return vectors[:, values.argsort(descending=True)]


class Reference:
    """A SliceGPT-sliced copy of a tiny Llama as plain tensors, with its own forward pass."""

    def __init__(self, lm: LoadedModel, calib: Int[Tensor, "n t"], d_prime: int) -> None:
        model = copy.deepcopy(lm.model)
        cfg = model.config
        self.d, self.eps, self.model = cfg.hidden_size, cfg.rms_norm_eps, model
        layers = model.model.layers
        f32 = torch.float32

        def fold(w: Tensor, g: Tensor) -> Tensor:
            return w.double() * g.double()

        self.W: list[dict[str, Tensor]] = []
        for layer in layers:
            a, m = layer.self_attn, layer.mlp
            g1, g2 = layer.input_layernorm.weight, layer.post_attention_layernorm.weight
            self.W.append(
                {
                    "q": fold(a.q_proj.weight, g1),
                    "k": fold(a.k_proj.weight, g1),
                    "v": fold(a.v_proj.weight, g1),
                    "o": a.o_proj.weight.double(),
                    "gate": fold(m.gate_proj.weight, g2),
                    "up": fold(m.up_proj.weight, g2),
                    "down": m.down_proj.weight.double(),
                }
            )
        head = fold(model.lm_head.weight, model.model.norm.weight)
        embed = model.model.embed_tokens.weight.double()

        inps = [embed[batch].to(f32) for batch in calib.split(4)]
        q = pca_basis(inps)
        self.embed = (embed @ q)[:, :d_prime]
        last = len(layers) - 1
        for i, w in enumerate(self.W):
            attn_shortcut = q.T[:d_prime, :]
            for name in ("q", "k", "v"):
                w[name] = (w[name] @ q)[:, :d_prime]
            inps = [(x.double() @ q)[:, :, :d_prime].to(f32) for x in inps]
            mids = [(x.double() @ attn_shortcut).to(f32) + self._attn(i, x) for x in inps]
            q = pca_basis(mids)
            attn_shortcut = attn_shortcut @ q[:, :d_prime]
            w["o"] = (q.T @ w["o"])[:d_prime]
            mlp_shortcut = q.T[:d_prime, :]
            for name in ("gate", "up"):
                w[name] = (w[name] @ q)[:, :d_prime]
            mids = [(x.double() @ attn_shortcut).to(f32) + self._attn(i, x) for x in inps]
            outs = [(m.double() @ mlp_shortcut).to(f32) + self._mlp(i, m) for m in mids]
            q = pca_basis(outs)
            width = self.d if i == last else d_prime  # do_slice_head=False: the last MLP output stays at d
            w["mlp_shortcut"] = (mlp_shortcut @ q)[:, :width]
            w["attn_shortcut"] = attn_shortcut
            w["down"] = (q.T @ w["down"])[:width]
            inps = outs
        self.head = head @ q  # rotated, not sliced

    def _attn(self, i: int, x: Float[Tensor, "b t w"]) -> Float[Tensor, "b t d_out"]:
        w, attn = self.W[i], self.model.model.layers[i].self_attn
        for name in ("q", "k", "v", "o"):
            getattr(attn, f"{name}_proj").weight = torch.nn.Parameter(w[name].float())
        position_ids = torch.arange(x.shape[1])[None]
        cos_sin = self.model.model.rotary_emb(x, position_ids)
        return attn(
            hidden_states=rmsn(x, self.d, self.eps), position_embeddings=cos_sin, attention_mask=None
        )[0]

    def _mlp(self, i: int, x: Float[Tensor, "b t w"]) -> Float[Tensor, "b t d_out"]:
        w, h = self.W[i], rmsn(x, self.d, self.eps).double()
        return (((torch.nn.functional.silu(h @ w["gate"].T)) * (h @ w["up"].T)) @ w["down"].T).float()

    @torch.no_grad()
    def logits(self, ids: Int[Tensor, "b t"]) -> Float[Tensor, "b t vocab"]:
        x = self.embed[ids].float()
        for i, w in enumerate(self.W):
            mid = (x.double() @ w["attn_shortcut"]).float() + self._attn(i, x)
            x = (mid.double() @ w["mlp_shortcut"]).float() + self._mlp(i, mid)
        return (rmsn(x, self.d, self.eps).double() @ self.head.T).float()


@pytest.mark.parametrize("sparsity", [0.25, 0.5])
def test_per_layer_slicing_equals_slicegpt_with_unsliced_head(tokenizer, sparsity):
    lm = random_lm(tokenizer, n_layers=3)
    lm.model.set_attn_implementation("sdpa")  # attention_mask=None is causal under SDPA
    d_prime = int((1 - sparsity) * D)
    with torch.no_grad():
        reference = Reference(lm, CALIB, d_prime)
        expected = reference.logits(IDS)
    record = slice_model(lm, sparsity, CALIB, rotation="per-layer", progress=False)
    assert (record.d_prime, record.slice_head) == (d_prime, False)
    with torch.no_grad():
        got = lm.model(IDS).logits
    # Both are fp32 networks of 3 blocks computed from the same float64 bases; they differ in summation order and
    # in where fp32 rounding happens (~1e-6 on O(1) logits). A wrong shortcut, norm divisor or head cut moves
    # logits by O(0.1) (the unsliced head alone changes them by more than 1e-2 here).
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
    sliced_head = random_lm(tokenizer, n_layers=3)
    slice_model(sliced_head, sparsity, CALIB, rotation="per-layer", progress=False, slice_head=True)
    with torch.no_grad():
        assert (sliced_head.model(IDS).logits - expected).abs().max() > 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sliced_norm_computes_slicegpts_norm_without_rounding_its_scale(tokenizer, dtype):
    """An HF RMSNorm over d' with weight 1 and eps d/d', times the folded sqrt(d/d'), is SliceGPT's RMSN."""
    lm = random_lm(tokenizer)
    eps = lm.model.config.rms_norm_eps
    slice_model(lm, 0.2, CALIB, rotation="per-layer", progress=False)
    lm.model.to(dtype)
    d_prime = lm.model.config.hidden_size
    norm = lm.model.model.layers[1].input_layernorm
    assert torch.equal(norm.weight, torch.ones(d_prime, dtype=dtype))  # exactly 1 in every dtype
    # small activations make eps matter: sum(x^2)/d ~ 1e-5 ~ eps, where eps d'/d instead of eps is a 10% error
    x = (3e-3 * torch.randn(4, d_prime, generator=torch.Generator().manual_seed(0))).to(dtype)
    got = norm(x).float() * math.sqrt(D / d_prime)
    expected = rmsn(x.float(), D, eps)
    # HF computes the norm in float32 and rounds its output once to `dtype` (unit roundoff 2^-8 in bfloat16)
    rtol = 1e-6 if dtype == torch.float32 else 2**-8
    assert torch.allclose(got, expected, rtol=rtol, atol=0), (got / expected - 1).abs().max()
