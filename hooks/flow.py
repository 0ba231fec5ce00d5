"""Trace the activation flow of the paper's Appendix A.1 through every block, as streaming statistics.

Each stage of a pre-norm Llama block is read off one TransformerLens `TransformerBridge` hook point (names are
relative to `blocks.{i}.`; every mapping below was checked numerically against the Hugging Face modules):

| stage key    | paper symbol             | hook                  | content, per token                       |
|--------------|--------------------------|-----------------------|------------------------------------------|
| `E_in`       | E_in                     | `hook_in`             | block input (residual stream), d         |
| `rms_in`     | RMSNorm(E_in), Eq. (5)   | `ln1.hook_scale`      | sqrt(mean(E_in^2) + eps), 1              |
| `E_in_hat`   | E_in / RMSNorm(E_in)     | `ln1.hook_normalized` | unit-RMS input, d                        |
| `E_in_bar`   | Ē_in, Eq. (4)            | `ln1.hook_out`        | W_norm * E_in / RMSNorm(E_in), d         |
| `Q`          | Q = W_q Ē_in, Eq. (6)    | `attn.hook_q`         | before RoPE, h_attn x h_dim              |
| `K`          | K = W_k Ē_in, Eq. (6)    | `attn.hook_k`         | before RoPE, v x h_dim                   |
| `V`          | V = W_v Ē_in, Eq. (6)    | `attn.hook_v`         | v x h_dim                                |
| `Q_rope`     | RoPE(Q)                  | `attn.hook_rot_q`     | h_attn x h_dim                           |
| `K_rope`     | RoPE(K)                  | `attn.hook_rot_k`     | v x h_dim                                |
| `W_a`        | W_a, Eq. (7)             | `attn.hook_pattern`   | softmax(γ QK^T + causal mask), per head  |
| `W_aV`       | W_a V (per head)         | `attn.hook_z`         | h_attn x h_dim, KV heads shared (GQA)    |
| `A_prime`    | A' = W_o(W_a V), Eq. (7) | `hook_attn_out`       | d                                        |
| `E_mid`      | residual after attention | `ln2.hook_in`         | E_in S_attn + A' (S_attn = I when dense) |
| `rms_mid`    | RMSNorm(E_mid), Eq. (5)  | `ln2.hook_scale`      | 1                                        |
| `E_mid_hat`  | E_mid / RMSNorm(E_mid)   | `ln2.hook_normalized` | d                                        |
| `E_mid_bar`  | Ā', Eq. (8)              | `ln2.hook_out`        | W_norm2 * E_mid / RMSNorm(E_mid), d      |
| `gate`       | W_gate Ā', Eq. (8)       | `mlp.hook_pre`        | gate pre-activation, m                   |
| `sigma_gate` | σ(W_gate Ā')             | `mlp.hook_pre` + σ    | derived: the block's own activation, m   |
| `up`         | W_up Ā', Eq. (8)         | `mlp.hook_pre_linear` | m                                        |
| `gate_up`    | σ(W_gate Ā') ⊙ W_up Ā'   | `mlp.hook_post`       | input of W_down, m                       |
| `down`       | W_down(·), Eq. (8)       | `hook_mlp_out`        | MLP output, d                            |
| `E_out`      | E_out                    | `hook_out`            | E_mid S_mlp + down (block output), d     |

`ln2.hook_in` is used rather than TransformerLens's `hook_resid_mid` alias: it is the tensor the second norm
really reads, which in a sliced layer with shortcut matrices is E_in S_attn + A', not E_in + A'.

Rows: a token-major hook (batch, pos, ...) gives one row per token with the trailing dims flattened; the
attention pattern (batch, head, query, key) gives one row per (sequence, head, query) over the key positions.
Statistics per (layer, stage): shape, mean L2 norm of a row, per-dimension mean and variance, and the float64
second-moment matrix for the stages named in `moments`; raw rows only for the stages named in `raw`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformers.activations import ACT2FN

from hooks.allocator import pin_mmap_threshold
from hooks.stats import RunningMoments


class TraceError(ValueError):
    """Bad tracer input (unknown stage or hook, layer out of range, no tokens), said in one line."""


@dataclass(frozen=True)
class Stage:
    """One step of the Appendix A.1 flow: key, paper symbol, block-relative hook, optional transform."""

    key: str
    symbol: str
    hook: str
    derive: str | None = None  # "act": apply the block's MLP activation σ to the hooked tensor


STAGES: tuple[Stage, ...] = (
    Stage("E_in", "E_in", "hook_in"),
    Stage("rms_in", "RMSNorm(E_in)", "ln1.hook_scale"),
    Stage("E_in_hat", "E_in/RMSNorm(E_in)", "ln1.hook_normalized"),
    Stage("E_in_bar", "Ē_in", "ln1.hook_out"),
    Stage("Q", "Q", "attn.hook_q"),
    Stage("K", "K", "attn.hook_k"),
    Stage("V", "V", "attn.hook_v"),
    Stage("Q_rope", "RoPE(Q)", "attn.hook_rot_q"),
    Stage("K_rope", "RoPE(K)", "attn.hook_rot_k"),
    Stage("W_a", "W_a", "attn.hook_pattern"),
    Stage("W_aV", "W_a V", "attn.hook_z"),
    Stage("A_prime", "A'", "hook_attn_out"),
    Stage("E_mid", "E_in S_attn + A'", "ln2.hook_in"),
    Stage("rms_mid", "RMSNorm(E_mid)", "ln2.hook_scale"),
    Stage("E_mid_hat", "E_mid/RMSNorm(E_mid)", "ln2.hook_normalized"),
    Stage("E_mid_bar", "Ā'", "ln2.hook_out"),
    Stage("gate", "W_gate Ā'", "mlp.hook_pre"),
    Stage("sigma_gate", "σ(W_gate Ā')", "mlp.hook_pre", derive="act"),
    Stage("up", "W_up Ā'", "mlp.hook_pre_linear"),
    Stage("gate_up", "σ(W_gate Ā') ⊙ W_up Ā'", "mlp.hook_post"),
    Stage("down", "W_down(·)", "hook_mlp_out"),
    Stage("E_out", "E_out", "hook_out"),
)
STAGE_BY_KEY: dict[str, Stage] = {s.key: s for s in STAGES}
_PATTERN_HOOK = "attn.hook_pattern"


def rows(hook: str, x: Tensor) -> Tensor:
    """The hooked tensor as rows: one per token (trailing dims flattened); per (seq, head, query) for W_a."""
    if hook.endswith(_PATTERN_HOOK):
        return x.reshape(-1, x.shape[-1])
    return x.reshape(x.shape[0] * x.shape[1], -1)


def n_layers(bridge: Any) -> int:
    """Number of decoder blocks behind a bridge."""
    return len(bridge.blocks)


def resolve_layers(bridge: Any, layers: Iterable[int] | None) -> tuple[int, ...]:
    """The requested block indices (all when None), sorted; out-of-range indices are a TraceError."""
    count = n_layers(bridge)
    if layers is None:
        return tuple(range(count))
    chosen = tuple(sorted(set(layers)))
    if not chosen:
        raise TraceError(f"no layers chosen; pick block indices in 0..{count - 1} or leave layers unset")
    bad = [i for i in chosen if not 0 <= i < count]
    if bad:
        raise TraceError(f"layer index {bad[0]} is out of range; this model has layers 0..{count - 1}")
    return chosen


def resolve_stages(bridge: Any, names: Iterable[str] | None) -> tuple[Stage, ...]:
    """Stages by key, or block-relative hook names (e.g. 'attn.hook_z') as ad-hoc stages."""
    if names is None:
        return STAGES
    stages = []
    for name in names:
        if name in STAGE_BY_KEY:
            stages.append(STAGE_BY_KEY[name])
            continue
        if f"blocks.0.{name}" not in bridge.hook_dict:
            keys = ", ".join(STAGE_BY_KEY)
            raise TraceError(
                f"unknown stage or hook '{name}'; use a stage ({keys}) or a block hook such as 'attn.hook_z'"
            )
        stages.append(Stage(name, name, name))
    return tuple(stages)


def _activation(bridge: Any) -> Callable[[Tensor], Tensor]:
    """The MLP activation σ the block applies: the one its config names (families differ in where the HF MLP
    module keeps it, e.g. `act_fn` or `activation_fn`; the bridge config's name is the same for all)."""
    return ACT2FN[bridge.cfg.act_fn]


@dataclass
class FlowTrace:
    """What a trace recorded: per (layer, stage key) moments and shapes, raw rows where asked, token count."""

    layers: tuple[int, ...]
    stages: tuple[Stage, ...]
    tokens: int = 0
    moments: dict[tuple[int, str], RunningMoments] = field(default_factory=dict)
    shapes: dict[tuple[int, str], tuple[int, ...]] = field(default_factory=dict)
    raw: dict[tuple[int, str], list[Tensor]] = field(default_factory=dict)

    def raw_rows(self, layer: int, key: str) -> Float[Tensor, "n f"]:
        """All raw rows kept for one stage of one layer, concatenated (only for stages traced with `raw`)."""
        if (layer, key) not in self.raw:
            raise TraceError(f"stage '{key}' of layer {layer} was not traced with raw=...; add it to `raw`")
        return torch.cat(self.raw[(layer, key)])

    def table(self) -> list[dict[str, Any]]:
        """One row per (layer, stage): hook, shape per sequence, mean L2 norm, mean per-dim mean and var."""
        out = []
        for layer in self.layers:
            for stage in self.stages:
                m = self.moments[(layer, stage.key)]
                out.append(
                    {
                        "layer": layer,
                        "stage": stage.key,
                        "symbol": stage.symbol,
                        "hook": f"blocks.{layer}.{stage.hook}",
                        "shape": list(self.shapes[(layer, stage.key)]),
                        "mean_norm": m.mean_norm,
                        "mean": float(m.mean.mean()),
                        "var": float(m.var.mean()),
                    }
                )
        return out


class FlowTracer:
    """Hook functions that stream the chosen stages of the chosen layers into a `FlowTrace`.

    Use `fwd_hooks` with `bridge.hooks(...)` around your own forward passes, or call `trace(...)`.
    """

    def __init__(
        self,
        bridge: Any,
        stages: Iterable[str] | None = None,
        layers: Iterable[int] | None = None,
        moments: Sequence[str] = (),
        raw: Sequence[str] = (),
        max_raw_rows: int | None = None,
    ) -> None:
        self.bridge = bridge
        self.result = FlowTrace(resolve_layers(bridge, layers), resolve_stages(bridge, stages))
        keys = {s.key for s in self.result.stages}
        for key in (*moments, *raw):
            if key not in keys:
                raise TraceError(f"stage '{key}' asked for moments/raw is not among the traced stages")
        self._moments, self._raw, self._max_raw = set(moments), set(raw), max_raw_rows

    @property
    def fwd_hooks(self) -> list[tuple[str, Callable[..., None]]]:
        """(hook name, fn) pairs, one per distinct hook point, for `bridge.hooks(fwd_hooks=...)`."""
        pairs = []
        for layer in self.result.layers:
            by_hook: dict[str, list[Stage]] = {}
            for stage in self.result.stages:
                by_hook.setdefault(stage.hook, []).append(stage)
            for hook, stages in by_hook.items():
                pairs.append((f"blocks.{layer}.{hook}", self._hook_fn(layer, stages)))
        return pairs

    def _hook_fn(self, layer: int, stages: list[Stage]) -> Callable[..., None]:
        act = _activation(self.bridge) if any(s.derive == "act" for s in stages) else None

        def fn(x: Tensor, hook: Any) -> None:
            for stage in stages:
                y = act(x) if stage.derive == "act" else x
                self._record(layer, stage, y)

        return fn

    def _record(self, layer: int, stage: Stage, x: Tensor) -> None:
        key = (layer, stage.key)
        R = rows(stage.hook, x.detach())
        if key not in self.result.moments:
            self.result.moments[key] = RunningMoments(R.shape[1], stage.key in self._moments)
            self.result.shapes[key] = tuple(x.shape[1:])
        elif self.result.shapes[key] != tuple(x.shape[1:]):
            raise TraceError(
                f"stage '{stage.key}' changed shape from {self.result.shapes[key]} to {tuple(x.shape[1:])}; "
                "trace windows of one length"
            )
        self.result.moments[key].update(R)
        if stage.key in self._raw:
            kept = self.result.raw.setdefault(key, [])
            room = R.shape[0] if self._max_raw is None else self._max_raw - sum(t.shape[0] for t in kept)
            if room > 0:
                kept.append(R[:room].float().cpu().clone())

    def run(self, windows: Int[Tensor, "w seqlen"], batch_size: int = 4) -> FlowTrace:
        """Forward `windows` through the bridge in batches, hooks on; stop after the last traced block."""
        if windows.ndim != 2 or windows.numel() == 0:
            raise TraceError("no tokens to trace; give non-empty text or a corpus with tokens")
        pin_mmap_threshold()
        stop = self.result.layers[-1] + 1
        device = next(self.bridge.parameters()).device
        with torch.no_grad(), ExitStack() as stack:
            try:
                stack.enter_context(self.bridge.hooks(fwd_hooks=self.fwd_hooks))
            except (KeyError, ValueError) as err:  # TransformerLens refuses a gated or unknown hook point
                raise TraceError(f"cannot hook this model: {err}") from err
            for start in range(0, windows.shape[0], batch_size):
                batch = windows[start : start + batch_size].to(device)
                self.bridge(batch, stop_at_layer=stop if stop < n_layers(self.bridge) else None)
                self.result.tokens += batch.numel()
        return self.result


def trace(
    bridge: Any,
    windows: Int[Tensor, "w seqlen"],
    stages: Iterable[str] | None = None,
    layers: Iterable[int] | None = None,
    moments: Sequence[str] = (),
    raw: Sequence[str] = (),
    max_raw_rows: int | None = None,
    batch_size: int = 4,
) -> FlowTrace:
    """Trace the chosen stages of the chosen layers over token windows; memory does not grow with tokens."""
    return FlowTracer(bridge, stages, layers, moments, raw, max_raw_rows).run(windows, batch_size)


def trace_tokens(
    bridge: Any, ids: Int[Tensor, " n"], n_tokens: int, seqlen: int = 512, batch_size: int = 4, **kw: Any
) -> FlowTrace:
    """Trace the first `n_tokens` of a token stream in windows of `seqlen` (to time against a forward)."""
    if n_tokens > ids.numel():
        raise TraceError(f"asked to trace {n_tokens} tokens but only {ids.numel()} are available")
    if n_tokens < seqlen:
        raise TraceError(f"asked to trace {n_tokens} tokens, fewer than one window of {seqlen}")
    windows = ids[: (n_tokens // seqlen) * seqlen].reshape(-1, seqlen)
    return trace(bridge, windows, batch_size=batch_size, **kw)
