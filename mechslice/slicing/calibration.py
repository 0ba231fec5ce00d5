"""Calibration statistics for PCA: the damped eigenbasis of a second moment (`hooks.stats.SecondMoment`).

The moment is a plain float64 sum H = sum_t x_t x_t^T with a token count, so shards computed on different
processes merge exactly (add the sums, add the counts): `distributed.reduce_moment_` all-reduces both.
"""

from __future__ import annotations

import warnings

import torch
from jaxtyping import Float
from torch import Tensor

from hooks.stats import SecondMoment
from mechslice.errors import MechsliceError

# SliceGPT's damping: add 0.01 * mean(diag H) to the diagonal before `eigh`.
DAMPING = 0.01


def require_finite(x: Tensor, signal: str) -> None:
    """Refuse NaN/Inf calibration activations, naming the signal (and so the layer) they appeared in."""
    if not bool(torch.isfinite(x).all()):
        raise MechsliceError(
            f"NaN or Inf in the calibration activations at {signal}; check the weights and dtype "
            "(fp16 overflows are common: load with float32 or bfloat16)"
        )


def warn_if_few_tokens(tokens: int, d: int) -> None:
    """Warn when the calibration has fewer tokens than d: H is rank-deficient and damping decides the rest."""
    if tokens < d:
        warnings.warn(
            f"calibration has {tokens} tokens, fewer than d={d}: the second moment has rank <= {tokens}; "
            f"damping ({DAMPING} x mean diagonal) makes it positive definite so the PCA is defined, but the "
            f"{d - tokens} trailing directions are then arbitrary (equal eigenvalues); use more calibration tokens",
            UserWarning,
            stacklevel=3,
        )


def pca(stats: SecondMoment) -> tuple[Float[Tensor, " d"], Float[Tensor, "d d"]]:
    """Eigenvalues (descending) and eigenvectors (columns) of the damped per-token second moment, float64."""
    if stats.count == 0:
        raise MechsliceError("no calibration tokens were seen; give at least one calibration window")
    h = stats.sum / stats.count
    h = h + DAMPING * h.diagonal().mean() * torch.eye(stats.d, dtype=h.dtype, device=h.device)
    eigenvalues, q = torch.linalg.eigh(h)
    return eigenvalues.flip(0), q.flip(1)


def principal_angles(a: Float[Tensor, "d k"], b: Float[Tensor, "d k"]) -> Float[Tensor, " k"]:
    """Principal angles (radians, largest first) between the spans of two orthonormal bases, in float64.

    Computed from the sines, the singular values of b's residual after projecting onto span(a), which stay
    accurate for the tiny angles two runs of one PCA differ by (arccos of cosines near 1 would not).
    """
    a64, b64 = a.double(), b.double()
    sines = torch.linalg.svdvals(b64 - a64 @ (a64.T @ b64))
    return torch.arcsin(sines.clamp(max=1.0))
