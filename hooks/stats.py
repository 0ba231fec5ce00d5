"""Streaming moments of an activation: running sums in float64, additive, so memory never grows with tokens.

A `RunningMoments` holds n, sum x, sum x*x, sum ||x|| and (when asked) a `SecondMoment`, sum x x^T, over the rows
it has seen; the `SecondMoment` alone is what SliceGPT's PCA diagonalizes (mechslice.slicing).
Two accumulators over disjoint token sets merge by adding their sums (`a + b`), which is how batches, windows
and workers combine; every statistic (mean, variance, mean L2 norm, second moment, covariance) is read off the
sums at the end.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor

from hooks.allocator import MMAP_THRESHOLD

# Rows of `update` are reduced a block at a time, its working copy just under the pinned mmap threshold: such a
# block is reused from the heap, where a mapped one would be faulted in afresh for every block (measured 3x
# slower); smaller blocks cost more per-block operations.
BLOCK_BYTES = MMAP_THRESHOLD - (64 << 10)

# Half-precision inputs: a product of two 8- or 11-bit significands is exact in float32's 24 bits.
HALF = (torch.bfloat16, torch.float16)


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype rows are reduced in: float32 for half-precision rows, float64 otherwise.

    Half-precision rows are reduced in float32 (a float64 copy costs twice the memory traffic): squares are
    exact and only the within-block sums round, at about 2^-24 log2(n) relative, far below the inputs' own
    2^-9 (bf16) resolution; this is what keeps tracing a bf16 model near the cost of its forward pass.
    """
    return torch.float32 if dtype in HALF else torch.float64


def block_sums(block: Float[Tensor, "n f"], out: Float[Tensor, " 2*f+1"]) -> None:
    """Write (sum x, sum x^2, sum ||x||) over the rows of one block into `out`, in `working_dtype`."""
    f = block.shape[1]
    x = block.to(out.dtype)
    squares = x * x  # one pass gives both the per-dimension sums and the row norms
    torch.sum(x, 0, out=out[:f])
    torch.sum(squares, 0, out=out[f : 2 * f])
    torch.sum(squares.sum(1).sqrt_(), 0, out=out[2 * f])


def gram(flat: Float[Tensor, "tokens d"]) -> Float[Tensor, "d d"]:
    """x^T x in float64. A bf16/fp16 batch goes through one float32 GEMM, float64 otherwise.

    For half-precision activations every product x_ti x_tj is exact in float32, so the float32 GEMM rounds only
    its within-batch sum (relative error about 2^-24 sqrt(tokens)); the sums across batches stay float64. On CPU
    this runs about 3x faster than a float64 GEMM, and the PCA of it is what the slicer spends its time on.
    """
    f = flat.to(working_dtype(flat.dtype))
    return (f.T @ f).double()


@dataclass
class SecondMoment:
    """H = sum over tokens of x x^T (float64, on `device`), with the number of tokens it sums.

    A plain sum, so shards computed on different processes merge exactly (add the sums, add the counts): an
    all-reduce of `sum` and `count` is the whole merge.
    """

    d: int
    device: torch.device | str = "cpu"
    sum: Float[Tensor, "d d"] = field(init=False)
    count: int = 0

    def __post_init__(self) -> None:
        self.sum = torch.zeros(self.d, self.d, dtype=torch.float64, device=self.device)

    def add(self, x: Float[Tensor, "... d"]) -> None:
        """Accumulate the tokens of `x` (any leading shape): one `gram`, added where the sum lives."""
        flat = x.reshape(-1, self.d)
        self.sum += gram(flat).to(self.sum.device)
        self.count += flat.shape[0]

    def merge(self, other: SecondMoment) -> None:
        """Add another shard's sums (exact: the statistic is a plain sum)."""
        self.sum += other.sum.to(self.sum.device)
        self.count += other.count


@dataclass
class RunningMoments:
    """Running float64 sums over rows of width `f`; `with_second_moment` adds the f x f matrix sum x x^T."""

    f: int
    with_second_moment: bool = False
    n: int = 0
    sum_x: Float[Tensor, " f"] = field(init=False)
    sum_x2: Float[Tensor, " f"] = field(init=False)
    sum_norm: float = 0.0
    xxT: SecondMoment | None = field(init=False)

    def __post_init__(self) -> None:
        self.sum_x = torch.zeros(self.f, dtype=torch.float64)
        self.sum_x2 = torch.zeros(self.f, dtype=torch.float64)
        self.xxT = SecondMoment(self.f) if self.with_second_moment else None

    def update(self, X: Float[Tensor, "n f"]) -> None:
        """Add the rows of X (any device or float dtype) to the float64 sums, a bounded block of rows at a time.

        Each block is reduced in `working_dtype` (float32 for bf16/fp16 rows, float64 otherwise) and the
        blocks' sums are added in float64.
        """
        if X.ndim != 2 or X.shape[1] != self.f:
            raise ValueError(f"expected rows of width {self.f}, got shape {tuple(X.shape)}")
        # blocks, not the whole activation: a working copy of all of it would be a large transient allocation
        work = working_dtype(X.dtype)
        f = self.f
        blocks = X.detach().split(max(1, BLOCK_BYTES // (f * work.itemsize)))
        sums = torch.empty(len(blocks), 2 * f + 1, dtype=work, device=X.device)
        for block, out in zip(blocks, sums, strict=True):
            block_sums(block, out)
            if self.xxT is not None:
                self.xxT.add(block)
        total = sums.double().sum(0).cpu()  # blocks add up in float64
        self.n += X.shape[0]
        self.sum_x += total[:f]
        self.sum_x2 += total[f : 2 * f]
        self.sum_norm += float(total[2 * f])

    def __add__(self, other: RunningMoments) -> RunningMoments:
        """The accumulator over both token sets (sums add; the second moment only when both carry it)."""
        if other.f != self.f:
            raise ValueError(f"cannot merge moments of width {self.f} and {other.f}")
        merged = RunningMoments(self.f, self.with_second_moment and other.with_second_moment)
        merged.n = self.n + other.n
        merged.sum_x = self.sum_x + other.sum_x
        merged.sum_x2 = self.sum_x2 + other.sum_x2
        merged.sum_norm = self.sum_norm + other.sum_norm
        if merged.xxT is not None:
            merged.xxT.merge(self.xxT)
            merged.xxT.merge(other.xxT)
        return merged

    @property
    def sum_xxT(self) -> Float[Tensor, "f f"] | None:
        """sum x x^T over the rows (float64, on the CPU), or None when the second moment was not requested."""
        return None if self.xxT is None else self.xxT.sum

    def _require_rows(self) -> None:
        if self.n == 0:
            raise ValueError("no rows accumulated yet")

    @property
    def mean(self) -> Float[Tensor, " f"]:
        """Per-dimension mean."""
        self._require_rows()
        return self.sum_x / self.n

    @property
    def var(self) -> Float[Tensor, " f"]:
        """Per-dimension population variance (divides by n), clamped at 0 against float64 round-off."""
        return (self.sum_x2 / self.n - self.mean.square()).clamp_min(0.0)

    @property
    def mean_norm(self) -> float:
        """Mean L2 norm of a row."""
        self._require_rows()
        return self.sum_norm / self.n

    @property
    def second_moment(self) -> Float[Tensor, "f f"]:
        """E[x x^T] (the PCA matrix SliceGPT diagonalizes, up to the factor n)."""
        self._require_rows()
        if self.sum_xxT is None:
            raise ValueError("second moment was not requested for this accumulator")
        return self.sum_xxT / self.n

    @property
    def covariance(self) -> Float[Tensor, "f f"]:
        """Population covariance E[x x^T] - mu mu^T."""
        mu = self.mean
        return self.second_moment - torch.outer(mu, mu)
