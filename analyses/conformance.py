"""Conformance: recompute every traced stage from the one before with the paper's Eqs. (4)-(8), live weights.

Footnote 2 of the paper drops what a real Llama block adds to Eqs. (4)-(8); the recomputation puts it back:
the residual connections (E_mid = E_in S_attn + A', E_out = E_mid S_mlp + down, with the SliceGPT shortcut
matrices S where a per-layer sliced model has them, identity otherwise), RoPE on Q and K (scaled or partial as
configured), the causal mask (with the sliding window where the config sets one), GQA (each of the v KV heads
serves h_attn/v query heads), the RMSNorm epsilon, and the gated MLP as it is computed:
W_down(σ(W_gate Ā') ⊙ W_up Ā') (the paper's Eq. (8) writes σ around the product and a trailing RMSNorm that
belongs to the next block). A fused W_qkv or W_gate_up is read as its stacked parts, in the block's order. Each check reads its inputs from the tracer's own hook points, so a wrong entry in
the tracer's stage table fails here. Recomputation is in float64 from the recorded fp32 inputs, one layer at a
time (memory is one layer's activations), and the report keeps the largest deviation per equation per layer.
The verdict covers every (layer, equation) pair of the chosen layers: a pair whose hook never fired fails
the check (it is named in `missing`) unless the bridge is known not to fire it, with the reason
(`NOT_APPLICABLE`), so a check cannot pass by checking nothing.

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
from transformer_lens.model_bridge.generalized_components import JointQKVAttentionBridge
from transformers.activations import ACT2FN
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from hooks.flow import STAGE_BY_KEY, TraceError, resolve_layers
from mechslice.architecture import weight_table
from mechslice.errors import MechsliceError
from mechslice.loaded import LoadedModel

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

# Equations a bridge is known not to record, by its attention class, with the reason. TransformerLens 4.3's
# joint-QKV attention (Phi-3's fused W_qkv) applies RoPE inside without firing hook_rot_q / hook_rot_k.
_ROPE_INSIDE = (
    "the joint-QKV attention bridge applies RoPE without firing hook_rot_q/k; RoPE is checked through (7) W_a"
)
NOT_APPLICABLE: tuple[tuple[type, dict[str, str]], ...] = (
    (JointQKVAttentionBridge, {"RoPE(Q)": _ROPE_INSIDE, "RoPE(K)": _ROPE_INSIDE}),
)


def not_applicable(block: Any) -> dict[str, str]:
    """Equation label -> why this bridge block never records it (empty when it records every stage)."""
    return {
        eq: why for kind, table in NOT_APPLICABLE if isinstance(block.attn, kind) for eq, why in table.items()
    }


@dataclass
class Deviation:
    """Largest |recomputed - recorded| of one equation at one layer, absolute and relative to max|recorded|."""

    layer: int
    equation: str
    stage: str
    max_abs: float = 0.0
    max_rel: float = 0.0
    checked: bool = False  # False when the bridge never fired the stage's hook (nothing to compare)

    def update(self, recomputed: Tensor, recorded: Tensor) -> None:
        """Fold in one batch (both float64)."""
        self.checked = True
        abs_dev = float((recomputed - recorded).abs().max())
        scale = float(recorded.abs().max())
        self.max_abs = max(self.max_abs, abs_dev)
        self.max_rel = max(self.max_rel, abs_dev / scale if scale > 0 else abs_dev)


@dataclass
class ConformanceReport:
    """Per layer and equation, the largest deviation; the Table 2 weight shapes; the tolerance and verdict."""

    deviations: list[Deviation]  # the checked (layer, equation) pairs
    weights: list[dict[str, Any]]
    shared_d: list[int]
    tokens: int
    rel_tol: float = REL_TOL
    notes: list[str] = field(default_factory=list)
    # (layer, equation) pairs never checked though the bridge should have recorded them: each fails the check
    missing: list[tuple[int, str]] = field(default_factory=list)
    # equation -> (layers, reason) for pairs this bridge is known not to record (see NOT_APPLICABLE)
    not_applicable: dict[str, tuple[list[int], str]] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """Every (layer, equation) pair checked or not applicable, each within tolerance; Table 2 shapes match."""
        return (
            not self.missing
            and all(d.max_rel <= self.rel_tol for d in self.deviations)
            and all(w["matches"] for w in self.weights)
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
            "missing": [{"layer": layer, "equation": eq} for layer, eq in self.missing],
            "not_applicable": [
                {"equation": eq, "layers": layers, "reason": why}
                for eq, (layers, why) in self.not_applicable.items()
            ],
            "weights": self.weights,
            "notes": self.notes,
        }


def rotate_half(x: Float[Tensor, "... h_dim"]) -> Float[Tensor, "... h_dim"]:
    """(x1, x2) -> (-x2, x1) on the two halves of the head dimension (the Llama RoPE convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_cos_sin(
    theta: float, h_dim: int, seqlen: int, device: torch.device
) -> tuple[Float[Tensor, "seqlen h_dim"], Float[Tensor, "seqlen h_dim"]]:
    """cos and sin of the default RoPE angles pos * theta^(-2i/h_dim), float64, each frequency used twice."""
    inv_freq = theta ** (-torch.arange(0, h_dim, 2, dtype=torch.float64, device=device) / h_dim)
    angles = torch.outer(torch.arange(seqlen, dtype=torch.float64, device=device), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def rope_tables(
    config: Any, h_dim: int, seqlen: int, device: torch.device
) -> tuple[Float[Tensor, "seqlen r"], Float[Tensor, "seqlen r"]]:
    """cos and sin over the first r rotary channels of a head (r = h_dim unless the config rotates a part).

    Default RoPE is the formula above; any scaled variant (llama3, linear, yarn, ...) takes its frequencies
    and attention factor from transformers' table of RoPE initialisers, as configured.
    """
    rope = getattr(config, "rope_parameters", None) or {"rope_theta": config.rope_theta}
    kind = rope.get("rope_type", "default")
    rotary = int(h_dim * rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)))
    if kind == "default":
        return rope_cos_sin(float(rope["rope_theta"]), rotary, seqlen, device)
    if kind not in ROPE_INIT_FUNCTIONS:
        raise MechsliceError(
            f"conformance does not know RoPE type {kind!r}; known: default, {sorted(ROPE_INIT_FUNCTIONS)}"
        )
    inv_freq, scale = ROPE_INIT_FUNCTIONS[kind](config, device)
    angles = torch.outer(torch.arange(seqlen, dtype=torch.float64, device=device), inv_freq.double())
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos() * scale, angles.sin() * scale


def apply_rope(
    x: Float[Tensor, "batch seqlen heads h_dim"],
    cos: Float[Tensor, "seqlen r"],
    sin: Float[Tensor, "seqlen r"],
) -> Float[Tensor, "batch seqlen heads h_dim"]:
    """RoPE on the first r channels of every head, the rest passed through (r = h_dim for full RoPE)."""
    r = cos.shape[-1]
    cos, sin = cos[:, None, :], sin[:, None, :]  # broadcast over heads
    rotated, rest = x[..., :r], x[..., r:]
    return torch.cat((rotated * cos + rotate_half(rotated) * sin, rest), dim=-1)


def _readers(x: Tensor, readers: tuple[torch.nn.Module, ...], sizes: list[int]) -> tuple[Tensor, ...]:
    """The outputs of a block's readers, split into `sizes`: separate W_q, W_k, W_v or one fused W_qkv alike."""
    return torch.cat([_linear(x, r) for r in readers], dim=-1).split(sizes, dim=-1)


def _linear(x: Tensor, module: torch.nn.Module) -> Tensor:
    bias = None if module.bias is None else module.bias.double()
    return F.linear(x, module.weight.double(), bias)


def _rms(x: Tensor, eps: float) -> Tensor:
    return torch.sqrt(x.square().mean(-1, keepdim=True) + eps)


def _masked(pos: int, window: int | None, device: torch.device) -> Tensor:
    """True where query q may not see key k: the future (k > q) and, with a sliding window, k <= q - window."""
    q, k = torch.arange(pos, device=device)[:, None], torch.arange(pos, device=device)[None, :]
    hidden = k > q
    return hidden if window is None else hidden | (k <= q - window)


def _shortcut(x: Tensor, layer: torch.nn.Module, name: str) -> Tensor:
    S = getattr(layer, name, None)
    return x if S is None else x @ S.double()


class _LayerCheck:
    """Recomputes one decoder layer's stages from its recorded hook tensors."""

    def __init__(self, lm: LoadedModel, index: int, deviations: dict[tuple[int, str], Deviation]) -> None:
        self.index, self.deviations = index, deviations
        self.recorded: dict[str, Tensor] = {}
        cfg = lm.model.config
        self.config = cfg
        self.layer = lm.adapter.layers(lm.model)[index]
        self.view = lm.adapter.block(self.layer)
        self.window = lm.adapter.attention_window(cfg, index)
        self.dims = lm.dims
        rope_tables(cfg, self.dims.h_dim, 1, torch.device("cpu"))  # refuse an unknown RoPE type up front
        self.eps = float(cfg.rms_norm_eps)
        self.act: Callable[[Tensor], Tensor] = ACT2FN[cfg.hidden_act]
        self.gamma = self.dims.h_dim**-0.5

    def hook_fn(self, keys: list[str], is_last: bool) -> Callable[..., None]:
        """A hook recording `keys` from its tensor; the block's last hook also checks and clears the layer."""

        def fn(x: Tensor, hook: Any) -> None:
            for key in keys:
                self.recorded[key] = x.detach().double()
            if is_last:
                self.flush()

        return fn

    def flush(self) -> None:
        """Compare what was recorded with its recomputation and forget it (a no-op when nothing was recorded).

        Called by the block's last hook, and after each forward for a block whose last hook never fired.
        """
        if not self.recorded:
            return
        recomputed = self.recompute(self.recorded)
        for equation, stage in EQUATIONS:
            if stage in self.recorded and stage in recomputed:
                self.deviations[(self.index, equation)].update(recomputed[stage], self.recorded[stage])
        self.recorded.clear()

    def recompute(self, t: dict[str, Tensor]) -> dict[str, Tensor]:
        """Every stage in EQUATIONS from the recorded stage(s) before it (float64 in, float64 out).

        A stage whose inputs were not all recorded is left out, so it counts as unchecked rather than raising.
        """
        out: dict[str, Tensor] = {}
        for step in self._steps():
            try:
                step(t, out)
            except KeyError:
                continue
        return out

    def _steps(self) -> tuple[Callable[[dict[str, Tensor], dict[str, Tensor]], None], ...]:
        """The recomputations in forward order; each reads recorded stages `t` and writes `out`."""
        dims, view = self.dims, self.view
        q_width, kv_width = dims.h_attn * dims.h_dim, dims.v * dims.h_dim

        def heads(x: Tensor, n: int) -> Tensor:
            return x.reshape(*x.shape[:2], n, dims.h_dim)

        def rope(x: Tensor) -> Tensor:
            return apply_rope(x, *rope_tables(self.config, dims.h_dim, x.shape[1], x.device))

        def qkv(t: dict[str, Tensor], out: dict[str, Tensor]) -> None:
            Q, K, V = _readers(t["E_in_bar"], view.attn_readers, [q_width, kv_width, kv_width])
            out["Q"], out["K"], out["V"] = heads(Q, dims.h_attn), heads(K, dims.v), heads(V, dims.v)

        def pattern(t: dict[str, Tensor], out: dict[str, Tensor]) -> None:
            # A bridge whose attention never fires the RoPE hooks leaves them unrecorded: W_a is then checked
            # from the recorded Q, K through the recomputed RoPE (RoPE and W_a verified together).
            Q_rope, K_rope = (t[k] if k in t else out[k] for k in ("Q_rope", "K_rope"))
            group = dims.h_attn // dims.v  # GQA: KV head j serves query heads j*group .. (j+1)*group-1
            scores = torch.einsum("bqhe,bkhe->bhqk", Q_rope, K_rope.repeat_interleave(group, dim=2))
            scores = scores * self.gamma
            pos = scores.shape[-1]
            out["W_a"] = scores.masked_fill(_masked(pos, self.window, scores.device), -math.inf).softmax(-1)

        def weighted_values(t: dict[str, Tensor], out: dict[str, Tensor]) -> None:
            V_shared = t["V"].repeat_interleave(dims.h_attn // dims.v, dim=2)
            out["W_aV"] = torch.einsum("bhqk,bkhe->bqhe", t["W_a"], V_shared)

        def gate_and_up(t: dict[str, Tensor], out: dict[str, Tensor]) -> None:
            out["gate"], out["up"] = _readers(t["E_mid_bar"], view.mlp_readers, [dims.m, dims.m])

        def put(stage: str, f: Callable[[dict[str, Tensor]], Tensor]) -> Callable[..., None]:
            return lambda t, out: out.__setitem__(stage, f(t))

        return (
            put("rms_in", lambda t: _rms(t["E_in"], self.eps)),
            put("E_in_bar", lambda t: view.input_norm.weight.double() * t["E_in"] / t["rms_in"]),
            qkv,
            put("Q_rope", lambda t: rope(t["Q"])),
            put("K_rope", lambda t: rope(t["K"])),
            pattern,
            weighted_values,
            put("A_prime", lambda t: _linear(t["W_aV"].flatten(2), view.attn_writer)),
            put("E_mid", lambda t: _shortcut(t["E_in"], self.layer, "attn_shortcut") + t["A_prime"]),
            put("rms_mid", lambda t: _rms(t["E_mid"], self.eps)),
            put("E_mid_bar", lambda t: view.post_attn_norm.weight.double() * t["E_mid"] / t["rms_mid"]),
            gate_and_up,
            put("gate_up", lambda t: self.act(t["gate"]) * t["up"]),
            put("down", lambda t: _linear(t["gate_up"], view.mlp_writer)),
            put("E_out", lambda t: _shortcut(t["E_mid"], self.layer, "mlp_shortcut") + t["down"]),
        )


def _hooks_for(
    lm: LoadedModel, layers: tuple[int, ...], deviations: dict[tuple[int, str], Deviation]
) -> tuple[list[tuple[str, Callable[..., None]]], list[_LayerCheck]]:
    """Hooks that record one layer's stages and, when its block output fires, check and forget them."""
    by_hook: dict[str, list[str]] = {}
    for key in sorted({stage for _, stage in EQUATIONS} | set(_INPUTS)):
        by_hook.setdefault(STAGE_BY_KEY[key].hook, []).append(key)
    last_hook = STAGE_BY_KEY["E_out"].hook
    pairs, checks = [], []
    for index in layers:
        check = _LayerCheck(lm, index, deviations)
        checks.append(check)
        for hook, keys in by_hook.items():
            pairs.append((f"blocks.{index}.{hook}", check.hook_fn(keys, is_last=hook == last_hook)))
    return pairs, checks


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
    hooks, checks = _hooks_for(lm, chosen, deviations)
    with torch.no_grad(), bridge.hooks(fwd_hooks=hooks):
        for start in range(0, windows.shape[0], batch_size):
            batch = windows[start : start + batch_size].to(lm.device)
            bridge(batch, stop_at_layer=stop if stop < len(bridge.blocks) else None)
            for check in checks:  # a block whose output hook never fired still has its stages compared
                check.flush()
    weights = [row.to_dict() for row in weight_table(lm, list(chosen))]
    skipped: dict[str, tuple[list[int], str]] = {}
    missing = []
    for (index, equation), d in deviations.items():
        if d.checked:
            continue
        why = not_applicable(bridge.blocks[index]).get(equation)
        if why is None:
            missing.append((index, equation))
        else:
            skipped.setdefault(equation, ([], why))[0].append(index)
    notes = [
        f"max_rel = max|recomputed - recorded| / max|recorded| per stage; pass when <= {REL_TOL:g} (fp32)",
        "Eq. (8) is checked as computed: W_down(σ(W_gate Ā') ⊙ W_up Ā'); its outer RMSNorm is the next block's",
    ]
    notes += [f"not applicable: {eq} at layers {where}: {why}" for eq, (where, why) in skipped.items()]
    if missing:
        notes.append(f"FAIL: {len(missing)} (layer, equation) pairs never checked (their hooks never fired)")
    return ConformanceReport(
        deviations=[d for d in deviations.values() if d.checked],
        weights=weights,
        shared_d=shared_widths(weights),
        tokens=windows.numel(),
        notes=notes,
        missing=missing,
        not_applicable=skipped,
    )
