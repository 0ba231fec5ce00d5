"""Differential entropy (nats) of residual-stream samples, and the paper's premise H(E'_out)/H(E_out) = 1-s.

Section 3.1 of the paper models the stacked embeddings E (l tokens x d dims) as l*d scalars of unit entropy
kappa, so H(E) = l*d*kappa and slicing d to d' = (1-s)d gives H(E')/H(E) = 1-s. Here a sample X is n token
vectors of width d (n, d); every estimator returns the entropy h of ONE vector (nats), so under the paper's
independent-tokens reading H(E) = l*h and kappa = h/d (`unit_entropy`).

Two caveats every caller should keep in mind:
- differential entropy depends on scale (h(cX) = h(X) + d*log|c|) and can be negative, so H'/H is only a
  meaningful "fraction of entropy kept" when both have the same sign; `entropy_ratio` reports it anyway and
  flags the sign;
- the estimators differ in what they assume (Gaussianity, independence of dims, or nothing but with a large
  high-d bias); compare like with like: the same estimator, the same number of samples.

All arithmetic is float64 numpy; inputs may be numpy arrays or torch tensors of shape (..., d).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from scipy.spatial import cKDTree
from scipy.special import digamma, gammaln

from mechslice.errors import MechsliceError

Sample = Float[np.ndarray, "n d"] | Float[torch.Tensor, "n d"]

# Eigenvalues of a covariance below REL_EIG_FLOOR * lambda_max are clamped to that value. float64 round-off in
# a d x d covariance is ~d * 1e-16 * lambda_max, so 1e-12 keeps every genuine direction of a d <= 1e4 stream
# and turns numerically-zero/negative ones (rank-deficient streams, constant dims) into a finite, stated
# contribution of 0.5*log(2*pi*e*floor) each instead of -inf or nan.
REL_EIG_FLOOR = 1e-12


def as_sample(X: Sample) -> Float[np.ndarray, "n d"]:
    """X as a float64 (n, d) numpy array; leading dims (batch, pos, ...) are flattened into tokens n."""
    arr = X.detach().to("cpu", torch.float64).numpy() if isinstance(X, torch.Tensor) else np.asarray(X)
    if arr.ndim < 2:
        raise MechsliceError(
            f"entropy sample has shape {tuple(arr.shape)}; pass tokens x residual dims, (n, d) or (..., d)"
        )
    arr = arr.reshape(-1, arr.shape[-1]).astype(np.float64, copy=False)
    if not np.isfinite(arr).all():
        raise MechsliceError("entropy sample contains nan or inf; check the collected activations")
    return arr


def subsample_rows(X: Float[np.ndarray, "n d"], n_samples: int, seed: int = 0) -> Float[np.ndarray, "m d"]:
    """Seeded subsample of n_samples rows without replacement (all rows, in order, when n_samples == n)."""
    n = X.shape[0]
    if n_samples < 1 or n_samples > n:
        raise MechsliceError(f"requested {n_samples} samples but only {n} are available; ask for 1..{n}")
    if n_samples == n:
        return X
    idx = np.sort(np.random.default_rng(seed).choice(n, size=n_samples, replace=False))
    return X[idx]


# --- Gaussian (covariance spectrum) -------------------------------------------------------------------------


def covariance_spectrum(X: Sample) -> Float[np.ndarray, " d"]:
    """Eigenvalues (descending) of the unbiased sample covariance of X; needs n > d for full rank."""
    x = as_sample(X)
    n, d = x.shape
    if n <= d:
        raise MechsliceError(
            f"gaussian entropy needs more tokens than dims (n={n}, d={d}): the covariance would be singular; "
            "collect more tokens"
        )
    centred = x - x.mean(axis=0)
    return _descending_eigvals(centred.T @ centred / (n - 1))


def _descending_eigvals(sigma: Float[np.ndarray, "d d"]) -> Float[np.ndarray, " d"]:
    return np.linalg.eigvalsh(0.5 * (sigma + sigma.T))[::-1].copy()


def gaussian_entropy_from_spectrum(
    eigvals: Float[np.ndarray, " k"], lambda_max: float | None = None, rel_floor: float = REL_EIG_FLOOR
) -> float:
    """0.5 * sum_i log(2*pi*e*lambda_i): entropy of a Gaussian with these covariance eigenvalues.

    Eigenvalues below rel_floor * lambda_max (default: the largest given) are clamped to that floor.
    """
    lam = np.asarray(eigvals, dtype=np.float64)
    top = (float(lam.max()) if lam.size else 0.0) if lambda_max is None else lambda_max
    if lam.size == 0 or top <= 0.0:
        raise MechsliceError("covariance spectrum is empty or all zero (constant sample); entropy is -inf")
    lam = np.maximum(lam, rel_floor * top)
    return float(0.5 * np.sum(np.log(2.0 * math.pi * math.e * lam)))


def gaussian_entropy(X: Sample, rel_floor: float = REL_EIG_FLOOR) -> float:
    """Entropy 0.5*log det(2*pi*e*Sigma) of a Gaussian with X's covariance.

    Exact for Gaussian data, and an upper bound on the true entropy for any distribution with that covariance
    (the Gaussian maximises entropy at fixed covariance). Rotation invariant. Needs n > d.
    """
    return gaussian_entropy_from_spectrum(covariance_spectrum(X), rel_floor=rel_floor)


def gaussian_entropy_from_moments(
    sum_x: Float[np.ndarray, " d"] | Float[torch.Tensor, " d"],
    sum_xxT: Float[np.ndarray, "d d"] | Float[torch.Tensor, "d d"],
    n: int,
    rel_floor: float = REL_EIG_FLOOR,
) -> float:
    """`gaussian_entropy` from streaming sums (sum of x and of x x^T over n tokens), for collectors that keep
    only moments. Accumulate the sums in float64: the centring below subtracts two large numbers."""
    s1 = as_sample(torch.as_tensor(sum_x).reshape(1, -1))[0]
    s2 = as_sample(sum_xxT)
    d = s1.shape[0]
    if s2.shape != (d, d):
        raise MechsliceError(
            f"sum_xxT has shape {s2.shape} but sum_x has {d} dims; pass a (d, d) second moment"
        )
    if n <= d:
        raise MechsliceError(f"gaussian entropy needs n > d (n={n}, d={d}); accumulate more tokens")
    sigma = (s2 - np.outer(s1, s1) / n) / (n - 1)
    return gaussian_entropy_from_spectrum(_descending_eigvals(sigma), rel_floor=rel_floor)


def gaussian_entropy_top(X: Sample, k: int, rel_floor: float = REL_EIG_FLOOR) -> float:
    """Gaussian entropy of X projected onto its top-k principal directions (what slicing to d'=k keeps).

    Compared with `gaussian_entropy(X)` this gives the premise's ratio H(E'_out)/H(E_out) without building a
    sliced model: PCA slicing keeps these directions (SliceGPT uses the uncentred second moment, so its
    directions differ slightly for a stream with a large mean). Directions with variance below 1/(2*pi*e)
    contribute negative entropy, so dropping them can make the ratio exceed 1 (seen on SmolLM2's layer 1).
    The floor is relative to the full spectrum.
    """
    lam = covariance_spectrum(X)
    if not 1 <= k <= lam.size:
        raise MechsliceError(f"top-k entropy needs 1 <= k <= d={lam.size}, got k={k}")
    return gaussian_entropy_from_spectrum(lam[:k], lambda_max=float(lam[0]), rel_floor=rel_floor)


# --- Sum of 1-D marginal entropies -------------------------------------------------------------------------


@dataclass
class MarginalEntropy:
    """Sum of per-dimension entropies and the per-dimension values (nats)."""

    total: float
    per_dim: list[float]


def spacing_entropy_1d(x: Float[np.ndarray, " n"], m: int | None = None) -> float:
    """Vasicek m-spacing entropy of a 1-D sample, each log-spacing centred by its exact uniform expectation.

    h = mean_i [ log(x_(i+m) - x_(i-m)) - psi(k_i) + psi(n+1) ] with order statistics clamped to 1..n and
    k_i = the number of order-statistic steps spanned (2m in the interior). Plain Vasicek uses log(n/(2m))
    instead of psi(n+1) - psi(k_i), which is biased low by O(1/m) and at the edges; this version is unbiased
    for uniform data and consistent for m -> inf, m/n -> 0 (default m = round(sqrt(n))). Zero spacings (ties)
    are floored at 1e-12 * range.
    """
    n = x.shape[0]
    if n < 3:
        raise MechsliceError(f"spacing entropy needs at least 3 samples, got {n}; collect more tokens")
    m = max(1, round(math.sqrt(n))) if m is None else m
    if not 1 <= m < n:
        raise MechsliceError(f"spacing m must be in 1..{n - 1}, got {m}")
    xs = np.sort(x)
    span = xs[-1] - xs[0]
    if span <= 0.0:
        raise MechsliceError("a dimension is constant: its differential entropy is -inf; drop constant dims")
    i = np.arange(n)
    hi, lo = np.minimum(i + m, n - 1), np.maximum(i - m, 0)
    gaps = np.maximum(xs[hi] - xs[lo], 1e-12 * span)
    return float(np.mean(np.log(gaps) - digamma(hi - lo)) + digamma(n + 1))


def kde_entropy_1d(x: Float[np.ndarray, " n"]) -> float:
    """Leave-one-out Gaussian-KDE resubstitution entropy -mean_i log f_{-i}(x_i) of a 1-D sample.

    Silverman bandwidth 0.9*min(std, IQR/1.34)*n^(-1/5); consistent for smooth densities. Smoothing biases it
    high by about h^2/(2 var) (~0.03 nats at n=1000 for Gaussian data) and it overestimates near hard edges of
    bounded supports. O(n^2): subsample large n.
    """
    n = x.shape[0]
    if n < 3:
        raise MechsliceError(f"kde entropy needs at least 3 samples, got {n}; collect more tokens")
    iqr = float(np.subtract(*np.percentile(x, [75, 25])))
    scale = min(float(np.std(x, ddof=1)), iqr / 1.34) or float(np.std(x, ddof=1))
    if scale <= 0.0:
        raise MechsliceError("a dimension is constant: its differential entropy is -inf; drop constant dims")
    h = 0.9 * scale * n ** (-0.2)
    z = (x[:, None] - x[None, :]) / h
    kern = np.exp(-0.5 * z * z)
    np.fill_diagonal(kern, 0.0)
    dens = kern.sum(axis=1) / ((n - 1) * h * math.sqrt(2.0 * math.pi))
    return float(-np.mean(np.log(np.maximum(dens, np.finfo(np.float64).tiny))))


_MARGINAL_1D: dict[str, Callable[[np.ndarray], float]] = {
    "spacing": spacing_entropy_1d,
    "kde": kde_entropy_1d,
}


def marginal_entropy_sum(
    X: Sample, method: str = "spacing", max_samples: int = 4000, seed: int = 0
) -> MarginalEntropy:
    """Sum over dims of 1-D entropy estimates: the joint entropy if the dims are independent, an upper bound
    otherwise (sum of marginals >= joint). Not rotation invariant: compare streams in the same basis (e.g.
    the dense model's PCA basis against a PCA-sliced model). Uses a seeded subsample of <= max_samples tokens.
    """
    if method not in _MARGINAL_1D:
        raise MechsliceError(f"unknown marginal method {method!r}; choose one of {sorted(_MARGINAL_1D)}")
    x = as_sample(X)
    x = subsample_rows(x, min(x.shape[0], max_samples), seed)
    per_dim = [_MARGINAL_1D[method](x[:, j]) for j in range(x.shape[1])]
    return MarginalEntropy(total=float(sum(per_dim)), per_dim=per_dim)


# --- Kozachenko-Leonenko k-nearest-neighbour ---------------------------------------------------------------


def knn_entropy(X: Sample, k: int = 3, max_samples: int = 2000, seed: int = 0) -> float:
    """Kozachenko-Leonenko entropy psi(n) - psi(k) + log V_d + (d/n) sum_i log eps_i, with eps_i the Euclidean
    distance to the k-th neighbour, on a seeded subsample of at most max_samples tokens.

    Assumes nothing about the distribution and is consistent, but in high d (hundreds of dims) with thousands
    of samples it is biased (typically low): use it for low-d checks or relative comparisons at equal n and d.
    Exact duplicate rows (e.g. the residual at position 0, identical for every sequence starting with BOS) are
    an atom with no density: they are dropped before estimating.
    """
    x = as_sample(X)
    if k < 1:
        raise MechsliceError(f"knn entropy needs k >= 1, got k={k}")
    x = np.unique(subsample_rows(x, min(x.shape[0], max_samples), seed), axis=0)
    n, d = x.shape
    if n <= k:
        raise MechsliceError(
            f"knn entropy needs more than k={k} distinct samples, got {n}; collect more tokens"
        )
    eps = cKDTree(x).query(x, k=k + 1)[0][:, k]
    log_vd = 0.5 * d * math.log(math.pi) - gammaln(0.5 * d + 1.0)
    return float(digamma(n) - digamma(k) + log_vd + d * np.mean(np.log(eps)))


# --- Registry, ratios and unit entropy ---------------------------------------------------------------------


def _marginal_total(X: Sample, **kw: Any) -> float:
    return marginal_entropy_sum(X, **kw).total


ESTIMATORS: dict[str, Callable[..., float]] = {
    "gaussian": gaussian_entropy,
    "marginal": _marginal_total,
    "knn": knn_entropy,
}


def estimate(name: str, X: Sample, **kw: Any) -> float:
    """Entropy of X (nats per token vector) by the estimator registered under name, kwargs passed on."""
    if name not in ESTIMATORS:
        raise MechsliceError(f"unknown entropy estimator {name!r}; choose one of {sorted(ESTIMATORS)}")
    return ESTIMATORS[name](X, **kw)


@dataclass
class EntropyRatio:
    """H'/H with a flag: the ratio reads as 'fraction of entropy kept' only when both have the same sign."""

    ratio: float
    same_sign: bool


def entropy_ratio(H_sliced: float, H_dense: float) -> EntropyRatio:
    """H(E'_out)/H(E_out), to hold against 1-s; nan when H_dense is 0."""
    ratio = H_sliced / H_dense if H_dense != 0.0 else math.nan
    return EntropyRatio(ratio=ratio, same_sign=H_sliced * H_dense > 0.0)


def unit_entropy(H: float, l: int, d: int) -> float:  # noqa: E741 (l: the paper's token count)
    """kappa = H/(l*d), from the paper's H(E) = l*d*kappa for l tokens of width d.

    Every estimator here returns the entropy h of one token vector (H/l under independent tokens), so the
    per-vector call is unit_entropy(h, 1, d) = h/d.
    """
    if l < 1 or d < 1:
        raise MechsliceError(f"unit entropy needs l >= 1 tokens and d >= 1 dims, got l={l}, d={d}")
    return H / (l * d)


# --- Per-layer dense vs sliced summary ---------------------------------------------------------------------


@dataclass
class EstimatorComparison:
    """One estimator at one layer: per-vector entropies, their ratio next to 1-s, and kappa = h/d."""

    H_dense: float
    H_sliced: float
    ratio: float
    same_sign: bool
    kappa_dense: float
    kappa_sliced: float


@dataclass
class LayerEntropy:
    """Entropies of one layer's residual stream in the dense (width d) and sliced (width d') model.

    `top_ratio` is the Gaussian entropy of the dense stream on its top-d' principal directions over its full
    Gaussian entropy: the premise's ratio from the dense model alone.
    """

    layer: str
    d: int
    d_sliced: int
    n_dense: int
    n_sliced: int
    one_minus_s: float
    estimators: dict[str, EstimatorComparison]
    top_ratio: EntropyRatio | None = None


@dataclass
class EntropySummary:
    """Per-layer entropies of a dense and a sliced model; `to_dict()` is strict-JSON (non-finite -> None)."""

    layers: list[LayerEntropy]
    s_nominal: float | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of plain floats/ints/strings, nan and inf replaced by None."""
        return _finite_or_none(asdict(self))


def _finite_or_none(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite_or_none(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _by_layer(samples: Mapping[Any, Sample] | Sequence[Sample]) -> dict[str, Sample]:
    items = samples.items() if isinstance(samples, Mapping) else enumerate(samples)
    return {str(k): v for k, v in items}


def layer_entropy_summary(
    dense: Mapping[Any, Sample] | Sequence[Sample],
    sliced: Mapping[Any, Sample] | Sequence[Sample],
    estimators: Sequence[str] = ("gaussian", "marginal", "knn"),
    estimator_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    s_nominal: float | None = None,
) -> EntropySummary:
    """Per-layer entropies of dense and sliced residual samples (layer -> (n, d) / (n, d')) per estimator,
    with H'/H next to 1-s = d'/d (effective sparsity, from the widths), kappa, and the top-d' Gaussian ratio.
    """
    dense_by, sliced_by = _by_layer(dense), _by_layer(sliced)
    if dense_by.keys() != sliced_by.keys():
        raise MechsliceError(
            f"dense and sliced samples cover different layers ({sorted(dense_by)} vs {sorted(sliced_by)}); "
            "collect the same layers from both models"
        )
    unknown = [e for e in estimators if e not in ESTIMATORS]
    if unknown:
        raise MechsliceError(f"unknown entropy estimator(s) {unknown}; choose from {sorted(ESTIMATORS)}")
    kwargs = estimator_kwargs or {}
    layers: list[LayerEntropy] = []
    for name, x_dense in dense_by.items():
        x0, xs = as_sample(x_dense), as_sample(sliced_by[name])
        d, d_s = x0.shape[1], xs.shape[1]
        comparisons = {}
        for est in estimators:
            h0, hs = estimate(est, x0, **kwargs.get(est, {})), estimate(est, xs, **kwargs.get(est, {}))
            r = entropy_ratio(hs, h0)
            comparisons[est] = EstimatorComparison(
                H_dense=h0,
                H_sliced=hs,
                ratio=r.ratio,
                same_sign=r.same_sign,
                kappa_dense=unit_entropy(h0, 1, d),
                kappa_sliced=unit_entropy(hs, 1, d_s),
            )
        top = None
        if d_s <= d and x0.shape[0] > d:
            lam = covariance_spectrum(x0)
            rel_floor = kwargs.get("gaussian", {}).get("rel_floor", REL_EIG_FLOOR)
            top = entropy_ratio(
                gaussian_entropy_from_spectrum(lam[:d_s], float(lam[0]), rel_floor),
                gaussian_entropy_from_spectrum(lam, rel_floor=rel_floor),
            )
        layers.append(
            LayerEntropy(name, d, d_s, x0.shape[0], xs.shape[0], d_s / d, comparisons, top_ratio=top)
        )
    notes = [
        "entropies are per token vector (nats); kappa = h/d",
        "ratios with same_sign=false mix negative and positive differential entropies and do not read as 1-s",
    ]
    return EntropySummary(layers=layers, s_nominal=s_nominal, notes=notes)
