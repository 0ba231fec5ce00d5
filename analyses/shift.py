"""Output-distribution shift between a dense model p0 and a sliced model ps on the same tokens.

Per token: KL(p0 || ps), Jensen-Shannon divergence, the predictive entropy of each, whether their top-1
tokens agree, and (given targets) each model's negative log-likelihood, whose mean is ln PPL, so the result
carries ln PPL0 / ln PPL to hold against Proposition 2's 1-s. Everything is computed in float64 from
log_softmax, a chunk of tokens at a time so that a 49152-vocab x 8k-token comparison stays within a few
hundred MB beyond the caller's logits; `ShiftAccumulator` sums over batches and position buckets.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformers import PreTrainedModel

from mechslice.attention import sdpa_attention
from mechslice.errors import MechsliceError

# Bucket lower edges; the last bucket is open-ended: [0,16), [16,64), [64,256), [256,1024), [1024, inf).
DEFAULT_BUCKET_EDGES: tuple[int, ...] = (0, 16, 64, 256, 1024)
METRICS = ("kl", "js", "entropy_dense", "entropy_sliced", "top1_agreement")
NLL_METRICS = ("ln_ppl_dense", "ln_ppl_sliced")


# log 0 = -inf (from -inf logits, e.g. a masked vocabulary) is clamped to the most negative float64, so that
# 0 * log 0 = 0 without a mask; a KL against a zero-probability token then comes out astronomically large
# (~p * 1.8e308) instead of inf. Finite logits never reach the floor: their log-probabilities stay finite.
_LOG_FLOOR = torch.finfo(torch.float64).min


def _clamp_log(logp: Float[Tensor, "*tokens vocab"], inplace: bool = False) -> Float[Tensor, "*tokens vocab"]:
    return logp.clamp_min_(_LOG_FLOOR) if inplace else logp.clamp_min(_LOG_FLOOR)


def _entropy(
    p: Float[Tensor, "*tokens vocab"], logp: Float[Tensor, "*tokens vocab"]
) -> Float[Tensor, "*tokens"]:
    return -(p * logp).sum(-1)


def _kl(
    p: Float[Tensor, "*tokens vocab"],
    logp: Float[Tensor, "*tokens vocab"],
    logq: Float[Tensor, "*tokens vocab"],
) -> Tensor:
    return (p * (logp - logq)).sum(-1)


def _js(
    p: Float[Tensor, "*tokens vocab"], q: Float[Tensor, "*tokens vocab"], h_p: Tensor, h_q: Tensor
) -> Tensor:
    # JS = H((p+q)/2) - (H(p)+H(q))/2: one log pass instead of two KLs; cancellation costs ~1e-15 nats.
    m = (p + q).mul_(0.5)
    return _entropy(m, _clamp_log(m.log(), inplace=True)) - 0.5 * (h_p + h_q)


def kl_divergence(
    logp: Float[Tensor, "*tokens vocab"], logq: Float[Tensor, "*tokens vocab"]
) -> Float[Tensor, "*tokens"]:
    """KL(p || q) = sum p (log p - log q) over the last dim, from normalised log-probabilities."""
    logp, logq = _clamp_log(logp), _clamp_log(logq)
    return _kl(logp.exp(), logp, logq)


def js_divergence(
    logp: Float[Tensor, "*tokens vocab"], logq: Float[Tensor, "*tokens vocab"]
) -> Float[Tensor, "*tokens"]:
    """Jensen-Shannon divergence 0.5 KL(p||m) + 0.5 KL(q||m), m = (p+q)/2; symmetric, in [0, ln 2]."""
    logp, logq = _clamp_log(logp), _clamp_log(logq)
    p, q = logp.exp(), logq.exp()
    return _js(p, q, _entropy(p, logp), _entropy(q, logq))


def predictive_entropy(logp: Float[Tensor, "*tokens vocab"]) -> Float[Tensor, "*tokens"]:
    """Entropy -sum p log p of the next-token distribution (nats)."""
    logp = _clamp_log(logp)
    return _entropy(logp.exp(), logp)


def token_shift(
    logits0: Float[Tensor, "tokens vocab"],
    logits_s: Float[Tensor, "tokens vocab"],
    targets: Int[Tensor, " tokens"] | None,
) -> dict[str, Float[Tensor, " tokens"]]:
    """Per-token metrics (float64) of a chunk of flattened tokens: METRICS, plus NLL_METRICS with targets."""
    logp0 = _clamp_log(torch.log_softmax(logits0, dim=-1, dtype=torch.float64), inplace=True)
    logps = _clamp_log(torch.log_softmax(logits_s, dim=-1, dtype=torch.float64), inplace=True)
    p0, ps = logp0.exp(), logps.exp()
    h0, hs = _entropy(p0, logp0), _entropy(ps, logps)
    out = {
        "kl": _kl(p0, logp0, logps),
        "js": _js(p0, ps, h0, hs),
        "entropy_dense": h0,
        "entropy_sliced": hs,
        "top1_agreement": (logits0.argmax(-1) == logits_s.argmax(-1)).to(torch.float64),
    }
    if targets is not None:
        idx = targets.to(torch.long).unsqueeze(-1)
        out["ln_ppl_dense"] = -logp0.gather(-1, idx).squeeze(-1)
        out["ln_ppl_sliced"] = -logps.gather(-1, idx).squeeze(-1)
    return out


@dataclass
class ShiftStats:
    """Token-mean metrics over one set of tokens; ln PPL fields are None without targets or tokens."""

    tokens: int
    kl: float | None
    js: float | None
    entropy_dense: float | None
    entropy_sliced: float | None
    top1_agreement: float | None
    ln_ppl_dense: float | None = None
    ln_ppl_sliced: float | None = None
    ln_ppl_ratio: float | None = None  # ln PPL0 / ln PPL, Proposition 2's 1-s


@dataclass
class BucketStats:
    """Metrics over the positions [lo, hi) (hi None: open-ended)."""

    lo: int
    hi: int | None
    stats: ShiftStats


@dataclass
class ShiftResult:
    """Overall and per-position-bucket output shift; `to_dict()` is plain JSON."""

    overall: ShiftStats
    buckets: list[BucketStats]

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of ints, floats and None."""
        return asdict(self)


def _check_edges(edges: Sequence[int]) -> tuple[int, ...]:
    e = tuple(int(x) for x in edges)
    if not e or e[0] != 0 or any(b <= a for a, b in itertools.pairwise(e)):
        raise MechsliceError(
            f"bucket edges {list(edges)} must start at 0 and strictly increase, "
            f"e.g. {list(DEFAULT_BUCKET_EDGES)}"
        )
    return e


class ShiftAccumulator:
    """Streaming sums of the per-token shift metrics, overall and per position bucket.

    Feed `update(logits0, logits_s, targets, mask)` batch by batch (same tokens through both models), then
    read `result()`. Position = index along the pos axis of each batch; targets[b, t] is the token that
    logits[b, t] predicts (the input ids shifted by one); mask False excludes a token (padding, or the last
    position when no next token exists). Either every update passes targets or none does.
    """

    def __init__(self, bucket_edges: Sequence[int] = DEFAULT_BUCKET_EDGES, chunk_tokens: int = 128) -> None:
        if chunk_tokens < 1:
            raise MechsliceError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
        self.bucket_edges = _check_edges(bucket_edges)
        self.chunk_tokens = chunk_tokens
        nb = len(self.bucket_edges)
        self._sums = {m: torch.zeros(nb, dtype=torch.float64) for m in METRICS + NLL_METRICS}
        self._counts = torch.zeros(nb, dtype=torch.float64)
        self._with_targets: bool | None = None

    def update(
        self,
        logits0: Float[Tensor, "*_batch_pos _vocab"],
        logits_s: Float[Tensor, "*_batch_pos _vocab"],
        targets: Int[Tensor, "*_batch_pos"] | None = None,
        mask: Bool[Tensor, "*_batch_pos"] | None = None,
    ) -> None:
        """Add one batch of dense and sliced logits, (batch, pos, vocab), over the same tokens.

        The axes start with `_` (not bound at run time): `_check` refuses mismatched shapes in words.
        """
        self._check(logits0, logits_s, targets, mask)
        batch, pos, vocab = logits0.shape
        positions = torch.arange(pos).expand(batch, pos).reshape(-1)
        keep = torch.ones(batch * pos, dtype=torch.bool) if mask is None else mask.reshape(-1).cpu().bool()
        bucket = torch.bucketize(positions, torch.tensor(self.bucket_edges), right=True) - 1
        flat0, flats = logits0.reshape(-1, vocab), logits_s.reshape(-1, vocab)
        flat_t = None if targets is None else targets.reshape(-1)
        for start in range(0, batch * pos, self.chunk_tokens):
            sl = slice(start, start + self.chunk_tokens)
            rows = keep[sl].nonzero().squeeze(-1) + start
            if rows.numel() == 0:
                continue
            dev_rows = rows.to(logits0.device)
            t = None if flat_t is None else flat_t[rows.to(flat_t.device)]
            per_token = token_shift(flat0[dev_rows], flats[dev_rows], t)
            b = bucket[rows]
            for name, values in per_token.items():
                self._sums[name].index_add_(0, b, values.cpu())
            self._counts.index_add_(0, b, torch.ones(rows.numel(), dtype=torch.float64))

    def _check(
        self,
        logits0: Tensor,
        logits_s: Tensor,
        targets: Tensor | None,
        mask: Tensor | None,
    ) -> None:
        if logits0.ndim != 3 or logits0.shape != logits_s.shape:
            raise MechsliceError(
                f"dense and sliced logits must both be (batch, pos, vocab) with equal shapes, got "
                f"{tuple(logits0.shape)} and {tuple(logits_s.shape)}; run both models on the same tokens"
            )
        if logits0.device != logits_s.device:
            raise MechsliceError(
                f"dense logits are on {logits0.device} but sliced logits on {logits_s.device}; move both to one device"
            )
        for name, t in (("targets", targets), ("mask", mask)):
            if t is not None and tuple(t.shape) != tuple(logits0.shape[:2]):
                raise MechsliceError(
                    f"{name} has shape {tuple(t.shape)} but logits are {tuple(logits0.shape)}; "
                    f"pass {name} of shape (batch, pos)"
                )
        with_targets = targets is not None
        if self._with_targets is not None and with_targets != self._with_targets:
            raise MechsliceError("pass targets to every update or to none: ln PPL needs them on all tokens")
        if targets is not None:
            valid = targets if mask is None else targets[mask.bool()]
            if valid.numel() and (valid.min() < 0 or valid.max() >= logits0.shape[-1]):
                raise MechsliceError(
                    f"targets must be token ids in [0, {logits0.shape[-1]}); mask out padding or -100 labels"
                )
        self._with_targets = with_targets

    def _stats(self, sums: dict[str, float], count: float) -> ShiftStats:
        mean = {m: (sums[m] / count if count else None) for m in sums}
        if not self._with_targets:
            mean.update(dict.fromkeys(NLL_METRICS))
        l0, ls = mean["ln_ppl_dense"], mean["ln_ppl_sliced"]
        ratio = l0 / ls if l0 is not None and ls else None
        return ShiftStats(tokens=int(count), **mean, ln_ppl_ratio=ratio)

    def result(self) -> ShiftResult:
        """Token-mean metrics overall and per position bucket (buckets with no tokens report None)."""
        overall = self._stats({m: float(s.sum()) for m, s in self._sums.items()}, float(self._counts.sum()))
        his = [*self.bucket_edges[1:], None]
        buckets = [
            BucketStats(lo, hi, self._stats({m: float(s[i]) for m, s in self._sums.items()}, float(c)))
            for i, (lo, hi, c) in enumerate(zip(self.bucket_edges, his, self._counts, strict=True))
        ]
        return ShiftResult(overall=overall, buckets=buckets)


def output_shift(
    logits0: Float[Tensor, "*_batch_pos _vocab"],
    logits_s: Float[Tensor, "*_batch_pos _vocab"],
    targets: Int[Tensor, "*_batch_pos"] | None = None,
    mask: Bool[Tensor, "*_batch_pos"] | None = None,
    bucket_edges: Sequence[int] = DEFAULT_BUCKET_EDGES,
) -> ShiftResult:
    """One-shot `ShiftAccumulator` over a single batch of logits."""
    acc = ShiftAccumulator(bucket_edges)
    acc.update(logits0, logits_s, targets, mask)
    return acc.result()


@torch.no_grad()
def shift_over_windows(
    dense: PreTrainedModel, sliced: PreTrainedModel, windows: Int[Tensor, "w seqlen"], batch_size: int = 1
) -> ShiftResult:
    """Both models over the same token windows, `batch_size` at a time; logits at t are scored against token t+1.

    The one output-shift measurement: the sweep's records and the `shift` command both come from here.
    """
    acc = ShiftAccumulator()
    dense_device, sliced_device = (next(m.parameters()).device for m in (dense, sliced))
    with sdpa_attention(dense), sdpa_attention(sliced):
        for start in range(0, windows.shape[0], batch_size):
            ids = windows[start : start + batch_size].to(dense_device)
            acc.update(
                dense(ids).logits[:, :-1], sliced(ids.to(sliced_device)).logits[:, :-1], targets=ids[:, 1:]
            )
    return acc.result()
