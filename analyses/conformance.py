"""Conformance: recompute every traced stage from the one before with the paper's Eqs. (4)-(8), live weights.

Footnote 2 of the paper drops what a real Llama block adds to Eqs. (4)-(8); the recomputation puts it back:
the residual connections (E_mid = E_in S_attn + A', E_out = E_mid S_mlp + down, with the SliceGPT shortcut
matrices S where a per-layer sliced model has them, identity otherwise), RoPE on Q and K, the causal mask, GQA
(each of the v KV heads serves h_attn/v query heads), the RMSNorm epsilon, and the gated MLP as it is computed:
W_down(σ(W_gate Ā') ⊙ W_up Ā') (the paper's Eq. (8) writes σ around the product and a trailing RMSNorm that
belongs to the next block). Each check reads its inputs from the tracer's own hook points, so a wrong entry in
the tracer's stage table fails here. Recomputation is in float64 from the recorded fp32 inputs, one layer at a
time (memory is one layer's activations), and the report keeps the largest deviation per equation per layer.

Also: the paper's Table 2 (Proposition 1), every weight matrix's shape in d, m, h_attn, v, h_dim, and the
residual-side widths they share (d, or d' after slicing).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from transformers.activations import ACT2FN

from hooks.flow import STAGE_BY_KEY, TraceError, resolve_layers
from mechslice.architecture import weight_table
from mechslice.errors import MechsliceError
from mechslice.loading import LoadedModel

# Relative tolerance: deviation / max|reference| of the stage. The model computes in fp32 (unit round-off
# u = 2^-24 = 6e-8); a dot product of length K accumulated in any order is within K*u of the exact sum relative
# to sum|a_i b_i| (worst case), about sqrt(K)*u in practice. The longest contraction here is K = m = 1536 for
# W_down, so K*u = 9.2e-5: 1e-4 admits every summation order and blocking, while a wrong weight, a missing
# residual, RoPE or mask error shows up as a relative deviation of order 1e-2..1.
REL_TOL = 1e-4

# (equation label, stage recomputed) in the order of the forward pass.
EQUATIONS: tuple[tuple[str, str], ...] = (
    ("(5) RMSNorm(E_in)", "rms_in"),
    ("(4) Ē_in", "E_in_bar"),
    ("(6) Q", "Q"),
    ("(6) K", "K"),
    ("(6) V", "V"),
    ("RoPE(Q)", "Q_rope"),
    ("RoPE(K)", "K_rope"),
    ("(7) W_a", "W_a"),
    ("(7) W_a V", "W_aV"),
    ("(7) A'", "A_prime"),
    ("residual E_in S_attn + A'", "E_mid"),
    ("(5) RMSNorm(E_mid)", "rms_mid"),
    ("(4) Ā'", "E_mid_bar"),
    ("(8) W_gate Ā'", "gate"),
    ("(8) W_up Ā'", "up"),
    ("(8) σ(gate) ⊙ up", "gate_up"),
    ("(8) W_down", "down"),
    ("residual E_mid S_mlp + down", "E_out"),
)
_INPUTS = ("E_in", "W_a")  # stages read but not recomputed beyond those in EQUATIONS


@dataclass
class Deviation:
    """Largest |recomputed - recorded| of one equation at one layer, absolute and relative to max|recorded|."""

    layer: int
    equation: str
    stage: str
    max_abs: float = 0.0
    max_rel: float = 0.0

    def update(self, recomputed: Tensor, recorded: Tensor) -> None:
        """Fold in one batch (both float64)."""
        abs_dev = float((recomputed - recorded).abs().max())
        scale = float(recorded.abs().max())
        self.max_abs = max(self.max_abs, abs_dev)
        self.max_rel = max(self.max_rel, abs_dev / scale if scale > 0 else abs_dev)


@dataclass
class ConformanceReport:
    """Per layer and equation, the largest deviation; the Table 2 weight shapes; the tolerance and verdict."""

    deviations: list[Deviation]
    weights: list[dict[str, Any]]
    shared_d: list[int]
    tokens: int
    rel_tol: float = REL_TOL
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """Every deviation within tolerance and every weight shape as Table 2 says."""
        return all(d.max_rel <= self.rel_tol for d in self.deviations) and all(
            w["matches"] for w in self.weights
        )

    def worst(self) -> dict[str, float]:
        """Largest relative deviation of each equation over all layers."""
        out: dict[str, float] = {}
        for d in self.deviations:
            out[d.equation] = max(out.get(d.equation, 0.0), d.max_rel)
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        return {
            "passed": self.passed,
            "rel_tol": self.rel_tol,
            "tokens": self.tokens,
            "shared_d": self.shared_d,
            "worst": self.worst(),
            "deviations": [vars(d) for d in self.deviations],
            "weights": self.weights,
            "notes": self.notes,
        }


def rotate_half(x: Float[Tensor, "... h_dim"]) -> Float[Tensor, "... h_dim"]:
    """(x1, x2) -> (-x2, x1) on the two halves of the head dimension (the Llama RoPE convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_cos_sin(
    theta: float, h_dim: int, seqlen: int, device: torch.device
) -> tuple[Float[Tensor, "pos h_dim"], Float[Tensor, "pos h_dim"]]:
    """cos and sin of the default RoPE angles pos * theta^(-2i/h_dim), float64, each frequency used twice."""
    inv_freq = theta ** (-torch.arange(0, h_dim, 2, dtype=torch.float64, device=device) / h_dim)
    angles = torch.outer(torch.arange(seqlen, dtype=torch.float64, device=device), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def _linear(x: Tensor, module: torch.nn.Linear) -> Tensor:
    bias = None if module.bias is None else module.bias.double()
    return F.linear(x, module.weight.double(), bias)


def _rms(x: Tensor, eps: float) -> Tensor:
    return torch.sqrt(x.square().mean(-1, keepdim=True) + eps)


def _shortcut(x: Tensor, layer: torch.nn.Module, name: str) -> Tensor:
    S = getattr(layer, name, None)
    return x if S is None else x @ S.double()


class _LayerCheck:
    """Recomputes one decoder layer's stages from its recorded hook tensors."""

    def __init__(self, lm: LoadedModel, index: int, deviations: dict[tuple[int, str], Deviation]) -> None:
        self.index, self.deviations = index, deviations
        self.recorded: dict[str, Tensor] = {}
        cfg = lm.model.config
        rope = getattr(cfg, "rope_parameters", None) or {"rope_type": "default", "rope_theta": cfg.rope_theta}
        if rope.get("rope_type", "default") != "default":
            raise MechsliceError(
                f"conformance covers default RoPE only, this model uses {rope['rope_type']!r}"
            )
        self.layer = lm.adapter.layers(lm.model)[index]
        self.view = lm.adapter.block(self.layer)
        self.fused = lm.adapter.fused_qkv or lm.adapter.fused_gate_up
        if self.fused:
            raise MechsliceError(
                "conformance covers unfused Q/K/V and gate/up projections (Llama-style) only"
            )
        self.dims = lm.dims
        self.eps = float(cfg.rms_norm_eps)
        self.theta = float(rope["rope_theta"])
        self.act: Callable[[Tensor], Tensor] = ACT2FN[cfg.hidden_act]
        self.gamma = self.dims.h_dim**-0.5

    def hook_fn(self, keys: list[str], is_last: bool) -> Callable[..., None]:
        """A hook recording `keys` from its tensor; the block's last hook also checks and clears the layer."""

        def fn(x: Tensor, hook: Any) -> None:
            for key in keys:
                self.recorded[key] = x.detach().double()
            if is_last:
                recomputed = self.recompute(self.recorded)
                for equation, stage in EQUATIONS:
                    self.deviations[(self.index, equation)].update(recomputed[stage], self.recorded[stage])
                self.recorded.clear()

        return fn

    def recompute(self, t: dict[str, Tensor]) -> dict[str, Tensor]:
        """Every stage in EQUATIONS from the recorded stage(s) before it (float64 in, float64 out)."""
        dims, view = self.dims, self.view
        batch, pos = t["E_in"].shape[:2]
        W_q, W_k, W_v = view.attn_readers
        W_gate, W_up = view.mlp_readers
        out: dict[str, Tensor] = {}
        out["rms_in"] = _rms(t["E_in"], self.eps)
        out["E_in_bar"] = view.input_norm.weight.double() * t["E_in"] / t["rms_in"]
        out["Q"] = _linear(t["E_in_bar"], W_q).view(batch, pos, dims.h_attn, dims.h_dim)
        out["K"] = _linear(t["E_in_bar"], W_k).view(batch, pos, dims.v, dims.h_dim)
        out["V"] = _linear(t["E_in_bar"], W_v).view(batch, pos, dims.v, dims.h_dim)
        cos, sin = rope_cos_sin(self.theta, dims.h_dim, pos, t["Q"].device)
        cos, sin = cos[:, None, :], sin[:, None, :]  # broadcast over heads
        out["Q_rope"] = t["Q"] * cos + rotate_half(t["Q"]) * sin
        out["K_rope"] = t["K"] * cos + rotate_half(t["K"]) * sin
        group = dims.h_attn // dims.v  # GQA: KV head j serves query heads j*group .. (j+1)*group-1
        K_shared = t["K_rope"].repeat_interleave(group, dim=2)
        V_shared = t["V"].repeat_interleave(group, dim=2)
        scores = torch.einsum("bqhe,bkhe->bhqk", t["Q_rope"], K_shared) * self.gamma
        causal = torch.ones(pos, pos, dtype=torch.bool, device=scores.device).triu(1)
        out["W_a"] = scores.masked_fill(causal, -math.inf).softmax(-1)
        out["W_aV"] = torch.einsum("bhqk,bkhe->bqhe", t["W_a"], V_shared)
        out["A_prime"] = _linear(t["W_aV"].reshape(batch, pos, -1), view.attn_writer)
        out["E_mid"] = _shortcut(t["E_in"], self.layer, "attn_shortcut") + t["A_prime"]
        out["rms_mid"] = _rms(t["E_mid"], self.eps)
        out["E_mid_bar"] = view.post_attn_norm.weight.double() * t["E_mid"] / t["rms_mid"]
        out["gate"] = _linear(t["E_mid_bar"], W_gate)
        out["up"] = _linear(t["E_mid_bar"], W_up)
        out["gate_up"] = self.act(t["gate"]) * t["up"]
        out["down"] = _linear(t["gate_up"], view.mlp_writer)
        out["E_out"] = _shortcut(t["E_mid"], self.layer, "mlp_shortcut") + t["down"]
        return out


def _hooks_for(
    lm: LoadedModel, layers: tuple[int, ...], deviations: dict[tuple[int, str], Deviation]
) -> list[tuple[str, Callable[..., None]]]:
    """Hooks that record one layer's stages and, when its block output fires, check and forget them."""
    by_hook: dict[str, list[str]] = {}
    for key in sorted({stage for _, stage in EQUATIONS} | set(_INPUTS)):
        by_hook.setdefault(STAGE_BY_KEY[key].hook, []).append(key)
    last_hook = STAGE_BY_KEY["E_out"].hook
    pairs = []
    for index in layers:
        check = _LayerCheck(lm, index, deviations)
        for hook, keys in by_hook.items():
            pairs.append((f"blocks.{index}.{hook}", check.hook_fn(keys, is_last=hook == last_hook)))
    return pairs


def shared_widths(weights: Iterable[dict[str, Any]]) -> list[int]:
    """The residual-side widths of all weights (the d side of each Table 2 shape): one value when d is shared."""
    widths = set()
    for w in weights:
        symbolic = w["symbolic"].split(" x ")
        for size, symbol in zip(w["shape"], symbolic, strict=True):
            if symbol == "d":
                widths.add(int(size))
    return sorted(widths)


def check_conformance(
    lm: LoadedModel,
    windows: Int[Tensor, "w seqlen"],
    layers: Iterable[int] | None = None,
    batch_size: int = 1,
) -> ConformanceReport:
    """Run `windows` through the bridge and compare every stage with its recomputation, layer by layer."""
    bridge = lm.bridge
    try:
        chosen = resolve_layers(bridge, layers)
    except TraceError as err:
        raise MechsliceError(str(err)) from err
    if windows.ndim != 2 or windows.numel() == 0:
        raise MechsliceError("no tokens to check; give non-empty text or a corpus with tokens")
    deviations = {(i, eq): Deviation(i, eq, stage) for i in chosen for eq, stage in EQUATIONS}
    stop = chosen[-1] + 1
    with torch.no_grad(), bridge.hooks(fwd_hooks=_hooks_for(lm, chosen, deviations)):
        for start in range(0, windows.shape[0], batch_size):
            batch = windows[start : start + batch_size].to(lm.device)
            bridge(batch, stop_at_layer=stop if stop < len(bridge.blocks) else None)
    weights = [row.to_json() for row in weight_table(lm, list(chosen))]
    notes = [
        f"max_rel = max|recomputed - recorded| / max|recorded| per stage; pass when <= {REL_TOL:g} (fp32)",
        "Eq. (8) is checked as computed: W_down(σ(W_gate Ā') ⊙ W_up Ā'); its outer RMSNorm is the next block's",
    ]
    return ConformanceReport(
        deviations=list(deviations.values()),
        weights=weights,
        shared_d=shared_widths(weights),
        tokens=windows.numel(),
        notes=notes,
    )
