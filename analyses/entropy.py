"""Differential entropy (nats) of residual-stream samples, and the paper's premise H(E'_out)/H(E_out) = 1-s.

Section 3.1 of the paper models the stacked embeddings E (l tokens x d dims) as l*d scalars of unit entropy
kappa, so H(E) = l*d*kappa and slicing d to d' = (1-s)d gives H(E')/H(E) = 1-s. Here a sample X is n token
vectors of width d (n, d); every estimator returns the entropy h of ONE vector (nats), so under the paper's
independent-tokens reading H(E) = l*h and kappa = h/d (`unit_entropy`).

What a dense-vs-sliced ratio here means, and why (`layer_entropy_summary`):
- differential entropy depends on the unit: h(cX) = h(X) + d*log|c|, so H'/H of a width-d' and a width-d
  stream changes with c (and tends to d'/d = 1-s for ANY data as c grows). Ratios are therefore taken on the
  stream in the unit the model itself fixes, the RMS-normalised stream every block reads
  (`rms_normalised`), with d(H'/H)/d(log c) beside them (`unit_sensitivity`) and a unit- and rotation-free
  companion, the effective rank of the covariance spectrum (`effective_rank`);
- the sum of marginals is not rotation invariant, so each stream is first expressed in its own principal
  axes (`principal_axes`), the basis SliceGPT puts the sliced stream in;
- the k-NN estimator's bias depends on d, so at d vs d' it is left out of ratios unless asked for
  (`include_knn`); on one stream it is fine;
- H'/H reads as "fraction of entropy kept" only when both have the same sign (`EntropyRatio.same_sign`);
  `ratio_signal` averages only such layers and says which it left out.

All arithmetic is float64 numpy; inputs may be numpy arrays or torch tensors of shape (..., d).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from scipy.spatial import cKDTree
from scipy.special import digamma, gammaln

from mechslice.errors import MechsliceError

# One layer's residual sample, (..., width) with leading dims flattened into tokens. Its axes start with `_`: named
# for the reader but not bound at run time, since dense and sliced layers (and layers of one model) differ in
# width and the shape is checked by `as_sample`, which refuses a wrong one in words.
Sample = Float[np.ndarray, "*_n _width"] | Float[torch.Tensor, "*_n _width"]

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


def rms_normalised(X: Sample, d: int) -> Float[np.ndarray, "n k"]:
    """x / sqrt(sum(x^2) / d) per token: the stream as the next block's RMSNorm reads it (before its weight).

    d is the ORIGINAL width for dense and sliced streams alike: SliceGPT's RMSN over the d' kept channels
    divides the sum of squares by d, not d', so every normalised token, dense or sliced, has norm sqrt(d)
    (a sliced one spreads it over d' channels). This follows SliceGPT's definition of the stream, not how a
    norm module stores it (mechslice's `resize_norm` weight, or a factor folded into the readers). The eps
    (1e-5 against mean squares of order 1..1e3) is left out: a model detail, not part of the unit.
    """
    x = as_sample(X)
    if d < x.shape[1]:
        raise MechsliceError(f"the original width d={d} is smaller than the stream's {x.shape[1]} channels")
    sq = np.sum(x * x, axis=1, keepdims=True)
    if (sq <= 0.0).any():
        raise MechsliceError("a token vector is all zero: it has no RMS unit; drop it before normalising")
    return x / np.sqrt(sq / d)


def principal_axes(X: Sample) -> Float[np.ndarray, "n d"]:
    """X in the eigenbasis of its uncentred second moment X^T X / n, leading direction first.

    This is the basis SliceGPT rotates a stream into (`mechslice.slicing.calibration.pca`: uncentred, descending),
    so a sliced stream is already close to it and a dense stream is put in the same kind of basis. Estimators
    that are not rotation invariant (the sum of marginals) then compare like with like: any rotation of X,
    e.g. a PCA rotation with nothing removed, gives the same rotated sample up to the signs of its columns.
    """
    x = as_sample(X)
    _, vecs = np.linalg.eigh(x.T @ x / x.shape[0])
    return x @ vecs[:, ::-1]


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
    sum_x: Float[np.ndarray, " _d"] | Float[torch.Tensor, " _d"],
    sum_xxT: Float[np.ndarray, "_d _d"] | Float[torch.Tensor, "_d _d"],
    n: int,
    rel_floor: float = REL_EIG_FLOOR,
) -> float:
    """`gaussian_entropy` from streaming sums (sum of x and of x x^T over n tokens), for collectors that keep
    only moments. Accumulate the sums in float64: the centring below subtracts two large numbers. The axes start
    with `_` (not bound at run time): a (d, d) second moment that does not match is refused in words below."""
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


def effective_rank_from_spectrum(eigvals: Float[np.ndarray, " k"]) -> float:
    """exp(H(p)) with p = lambda / sum(lambda): how many directions the variance is spread over (1..k).

    Invariant to the unit (p does not change when X is scaled) and to rotations (it depends on the spectrum
    only), so a ratio of two of them is free of both caveats of a differential-entropy ratio. Round-off
    negatives are taken as 0.
    """
    lam = np.maximum(np.asarray(eigvals, dtype=np.float64), 0.0)
    total = float(lam.sum())
    if total <= 0.0:
        raise MechsliceError("covariance spectrum is empty or all zero (constant sample); it has no rank")
    p = lam[lam > 0.0] / total
    return float(np.exp(-np.sum(p * np.log(p))))


def effective_rank(X: Sample) -> float:
    """Effective rank exp(H(lambda / sum lambda)) of X's covariance spectrum (needs n > d)."""
    return effective_rank_from_spectrum(covariance_spectrum(X))


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
# The estimators a dense-vs-sliced ratio uses unless told otherwise.
RATIO_ESTIMATORS: tuple[str, ...] = ("gaussian", "marginal")
# Estimators whose bias depends on d: H at d and H' at d' are biased differently, so their ratio is not H'/H.
BIASED_IN_D = ("knn",)
# "normalised": x / rms(x), the unit the model fixes (`rms_normalised`); "raw": the block output as it is.
STREAMS = ("normalised", "raw")
RANK = "effective_rank"  # the key of the effective-rank companion beside the estimators


def estimate(name: str, X: Sample, **kw: Any) -> float:
    """Entropy of X (nats per token vector) by the estimator registered under name, kwargs passed on."""
    if name not in ESTIMATORS:
        raise MechsliceError(f"unknown entropy estimator {name!r}; choose one of {sorted(ESTIMATORS)}")
    return ESTIMATORS[name](X, **kw)


def check_ratio_estimators(names: Sequence[str], include_knn: bool = False) -> tuple[str, ...]:
    """The estimator names for a dense-vs-sliced ratio: known ones, and kNN only when `include_knn`."""
    names = tuple(names)
    unknown = [n for n in names if n not in ESTIMATORS]
    if unknown or not names:
        raise MechsliceError(
            f"unknown entropy estimator {unknown or list(names)}; choose from {sorted(ESTIMATORS)}"
        )
    biased = [n for n in names if n in BIASED_IN_D]
    if biased and not include_knn:
        raise MechsliceError(
            f"{', '.join(biased)}: its bias depends on the dimension, so a ratio at d vs d' compares two "
            "differently biased numbers; leave it out, or pass include_knn (--include-knn) to record it anyway"
        )
    return names


@dataclass
class EntropyRatio:
    """H'/H with a flag: the ratio reads as 'fraction of entropy kept' only when both have the same sign."""

    ratio: float
    same_sign: bool


def entropy_ratio(H_sliced: float, H_dense: float) -> EntropyRatio:
    """H(E'_out)/H(E_out), to hold against 1-s; nan when H_dense is 0."""
    ratio = H_sliced / H_dense if H_dense != 0.0 else math.nan
    return EntropyRatio(ratio=ratio, same_sign=H_sliced * H_dense > 0.0)


def kept_ratio(
    eigvals: Float[np.ndarray, " d"], k: int, estimator: str = "gaussian", rel_floor: float = REL_EIG_FLOOR
) -> EntropyRatio:
    """What slicing to width k keeps of a stream, read off its covariance spectrum (descending) alone.

    The Gaussian entropy (or, for `RANK`, the effective rank) of the top k eigenvalues, the directions PCA
    slicing keeps, over that of all of them: the premise's H'/H without building a sliced model. The Gaussian
    floor is relative to the full spectrum's largest eigenvalue, as for the stream before slicing.
    """
    lam = np.asarray(eigvals, dtype=np.float64)
    if not 1 <= k <= lam.size:
        raise MechsliceError(f"a kept width needs 1 <= k <= d={lam.size}, got k={k}")
    if estimator == RANK:
        return EntropyRatio(effective_rank_from_spectrum(lam[:k]) / effective_rank_from_spectrum(lam), True)
    if estimator != "gaussian":
        raise MechsliceError(f"estimator {estimator!r} cannot be read off a spectrum; use gaussian or {RANK}")
    return entropy_ratio(
        gaussian_entropy_from_spectrum(lam[:k], float(lam[0]), rel_floor),
        gaussian_entropy_from_spectrum(lam, rel_floor=rel_floor),
    )


@dataclass(frozen=True)
class StreamSpectra:
    """Each layer's covariance spectrum (descending, float64) of one model's block outputs, in `stream`'s unit.

    What the dense-only predictor needs: every H'/H at every width follows from it (`kept_ratio`).
    """

    stream: str
    d: int
    tokens: int
    eigenvalues: list[list[float]]  # one list of d per layer, in layer order

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict; floats kept at full float64 precision (json writes them round-trip)."""
        return asdict(self)


def stream_spectra(
    samples: Mapping[Any, Sample] | Sequence[Sample], stream: str = "normalised"
) -> StreamSpectra:
    """`StreamSpectra` of per-layer samples (layer -> (n, d)), measured as `layer_entropy_summary` measures the
    dense stream: RMS-normalised (`rms_normalised`) unless stream is "raw", then `covariance_spectrum`."""
    if stream not in STREAMS:
        raise MechsliceError(f"unknown entropy stream {stream!r}; choose one of {', '.join(STREAMS)}")
    xs = [as_sample(x) for x in _by_layer(samples).values()]
    if not xs:
        raise MechsliceError("no layers to measure spectra of; collect at least one layer's samples")
    d, n = xs[0].shape[1], xs[0].shape[0]
    if stream == "normalised":
        xs = [rms_normalised(x, d) for x in xs]
    spectra = [covariance_spectrum(x).tolist() for x in xs]
    return StreamSpectra(stream=stream, d=d, tokens=n, eigenvalues=spectra)


def unit_sensitivity(H_sliced: float, H_dense: float, d_prime: int, d: int) -> float:
    """d(H'/H)/d(log c): how far the ratio moves per factor e in the unit of both streams, (d' - d H'/H)/H.

    From h(cX) = h(X) + d log c: at width d' < d no ratio is unit-free; |value| * log(2) is the change if the
    unit were halved or doubled. nan when H is 0.
    """
    if H_dense == 0.0:
        return math.nan
    return (d_prime - d * H_sliced / H_dense) / H_dense


def unit_entropy(H: float, l: int, d: int) -> float:  # noqa: E741 (l: the paper's token count)
    """kappa = H/(l*d), from the paper's H(E) = l*d*kappa for l tokens of width d.

    Every estimator here returns the entropy h of one token vector (H/l under independent tokens), so the
    per-vector call is unit_entropy(h, 1, d) = h/d.
    """
    if l < 1 or d < 1:
        raise MechsliceError(f"unit entropy needs l >= 1 tokens and d >= 1 dims, got l={l}, d={d}")
    return H / (l * d)


# --- The premise's ratio as one number ---------------------------------------------------------------------

SIGNAL = (
    "mean of H'/H over the sliced block outputs E_out (d' < d) whose dense and sliced entropies share a sign"
)


@dataclass
class RatioSignal:
    """The from-internals signal: the mean ratio over the layers in `layers`; `excluded` says why the rest
    were left out. `ratio` is None when no layer qualifies."""

    ratio: float | None
    layers: list[str]
    excluded: dict[str, str]


def ratio_signal(
    layers: Sequence[str],
    ratios: Sequence[float | None],
    same_sign: Sequence[bool] | None = None,
    sliced: Sequence[bool] | None = None,
) -> RatioSignal:
    """`SIGNAL` from per-layer ratios, their sign flags and whether each layer's stream was cut to d' < d.

    Every block output is a stream the paper's premise covers (its E_in = E_out = l*d*kappa holds at every
    linear map), so the signal averages all of them that qualify: one layer alone is noisy. Left out: a
    layer whose H and H' differ in sign (the ratio is then not a fraction kept), one not sliced (d' = d, e.g.
    the last block's output when the head is unsliced: its ratio says nothing about d'/d; when no layer is
    cut, as for the dense model, every layer counts), a missing ratio.
    """
    used: list[str] = []
    values: list[float] = []
    excluded: dict[str, str] = {}
    for j, (name, r) in enumerate(zip(layers, ratios, strict=True)):
        if r is None or not math.isfinite(r):
            excluded[name] = "ratio not finite"
        elif sliced is not None and any(sliced) and not sliced[j]:
            excluded[name] = "not sliced (d' = d)"
        elif same_sign is not None and not same_sign[j]:
            excluded[name] = "H and H' differ in sign"
        else:
            used.append(name)
            values.append(r)
    return RatioSignal(float(np.mean(values)) if values else None, used, excluded)


def warn_excluded(label: str, signal: RatioSignal) -> None:
    """A warning naming the layers `ratio_signal` left out, so a mean over fewer layers is never silent."""
    if signal.excluded:
        left = ", ".join(f"{k} ({why})" for k, why in signal.excluded.items())
        warnings.warn(
            f"{label}: {len(signal.excluded)} layer(s) left out of the mean ratio: {left}", stacklevel=3
        )


# --- Per-layer dense vs sliced summary ---------------------------------------------------------------------


@dataclass
class EstimatorComparison:
    """One estimator at one layer: per-vector entropies, their ratio next to 1-s, kappa = h/d, and the
    ratio's change per factor e in the unit (`unit_sensitivity`)."""

    H_dense: float
    H_sliced: float
    ratio: float
    same_sign: bool
    kappa_dense: float
    kappa_sliced: float
    unit_sensitivity: float = math.nan


@dataclass
class RankComparison:
    """Effective ranks of the dense and sliced covariance spectra and sliced/dense: free of unit and basis."""

    dense: float
    sliced: float
    ratio: float


@dataclass
class LayerEntropy:
    """Entropies of one layer's residual stream in the dense (width d) and sliced (width d') model.

    `top_ratio` is the Gaussian entropy of the dense stream on its top-d' principal directions over its full
    Gaussian entropy: the premise's ratio from the dense model alone.
    """

    layer: str
    d: int
    d_prime: int
    n_dense: int
    n_sliced: int
    one_minus_s: float
    estimators: dict[str, EstimatorComparison]
    top_ratio: EntropyRatio | None = None
    effective_rank: RankComparison | None = None


@dataclass
class EntropySummary:
    """Per-layer entropies of a dense and a sliced model; `to_dict()` is strict-JSON (non-finite -> None).

    `signals` holds `ratio_signal` per estimator and for the effective rank (key `RANK`).
    """

    layers: list[LayerEntropy]
    s_nominal: float | None = None
    notes: list[str] = field(default_factory=list)
    stream: str = "normalised"
    signals: dict[str, RatioSignal] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of plain floats/ints/strings, nan and inf replaced by None."""
        return finite_or_none(asdict(self))


def finite_or_none(obj: Any) -> Any:
    """obj with every non-finite float (nan, inf) inside dicts and lists replaced by None: strict JSON."""
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [finite_or_none(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _by_layer(samples: Mapping[Any, Sample] | Sequence[Sample]) -> dict[str, Sample]:
    items = samples.items() if isinstance(samples, Mapping) else enumerate(samples)
    return {str(k): v for k, v in items}


def _compare(
    est: str,
    x0: np.ndarray,
    xs: np.ndarray,
    kw: Mapping[str, Any],
    spectra: tuple[np.ndarray, np.ndarray] | None,
) -> EstimatorComparison:
    """One estimator on both streams; the marginal sum in each stream's own principal axes (see module doc).

    `spectra` (the covariance spectra of both, when n > d) spares the Gaussian estimator a second eigensolve.
    """
    if est == "gaussian" and spectra is not None:
        h0, hs = (gaussian_entropy_from_spectrum(lam, **kw) for lam in spectra)
    elif est == "marginal":
        h0, hs = estimate(est, principal_axes(x0), **kw), estimate(est, principal_axes(xs), **kw)
    else:
        h0, hs = estimate(est, x0, **kw), estimate(est, xs, **kw)
    d, d_prime = x0.shape[1], xs.shape[1]
    r = entropy_ratio(hs, h0)
    return EstimatorComparison(
        H_dense=h0,
        H_sliced=hs,
        ratio=r.ratio,
        same_sign=r.same_sign,
        kappa_dense=unit_entropy(h0, 1, d),
        kappa_sliced=unit_entropy(hs, 1, d_prime),
        unit_sensitivity=unit_sensitivity(hs, h0, d_prime, d),
    )


def layer_entropy_summary(
    dense: Mapping[Any, Sample] | Sequence[Sample],
    sliced: Mapping[Any, Sample] | Sequence[Sample],
    estimators: Sequence[str] = RATIO_ESTIMATORS,
    estimator_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    s_nominal: float | None = None,
    stream: str = "normalised",
    include_knn: bool = False,
) -> EntropySummary:
    """Per-layer entropies of dense and sliced residual samples (layer -> (n, d) / (n, d')) per estimator,
    with H'/H next to 1-s = d'/d (effective sparsity, from the widths), kappa, the ratio's unit sensitivity,
    the effective-rank ratio, the top-d' Gaussian ratio, and `ratio_signal` per estimator (warning about
    the layers it leaves out).

    stream="normalised" (default) measures x / sqrt(sum(x^2) / d) with d the DENSE width for both streams
    (`rms_normalised`); "raw" measures the samples as given, whose ratio depends on their unit.
    """
    dense_by, sliced_by = _by_layer(dense), _by_layer(sliced)
    if dense_by.keys() != sliced_by.keys():
        raise MechsliceError(
            f"dense and sliced samples cover different layers ({sorted(dense_by)} vs {sorted(sliced_by)}); "
            "collect the same layers from both models"
        )
    if stream not in STREAMS:
        raise MechsliceError(f"unknown entropy stream {stream!r}; choose one of {', '.join(STREAMS)}")
    estimators = check_ratio_estimators(estimators, include_knn)
    kwargs = estimator_kwargs or {}
    rel_floor = kwargs.get("gaussian", {}).get("rel_floor", REL_EIG_FLOOR)
    layers: list[LayerEntropy] = []
    for name, x_dense in dense_by.items():
        x0, xs = as_sample(x_dense), as_sample(sliced_by[name])
        d, d_prime = x0.shape[1], xs.shape[1]
        if stream == "normalised":
            x0, xs = rms_normalised(x0, d), rms_normalised(xs, d)
        spectra = None
        if x0.shape[0] > d and xs.shape[0] > d_prime:
            spectra = covariance_spectrum(x0), covariance_spectrum(xs)
        comparisons = {est: _compare(est, x0, xs, kwargs.get(est, {}), spectra) for est in estimators}
        top = rank = None
        if spectra is not None:
            lam, lam_s = spectra
            e0, es = effective_rank_from_spectrum(lam), effective_rank_from_spectrum(lam_s)
            rank = RankComparison(e0, es, es / e0)
            if d_prime <= d:
                top = kept_ratio(lam, d_prime, "gaussian", rel_floor)
        layers.append(
            LayerEntropy(
                name,
                d,
                d_prime,
                x0.shape[0],
                xs.shape[0],
                d_prime / d,
                comparisons,
                top_ratio=top,
                effective_rank=rank,
            )
        )
    names = [layer.layer for layer in layers]
    cut = [layer.d_prime < layer.d for layer in layers]
    signals = {
        est: ratio_signal(
            names,
            [layer.estimators[est].ratio for layer in layers],
            [layer.estimators[est].same_sign for layer in layers],
            cut,
        )
        for est in estimators
    }
    if all(layer.effective_rank is not None for layer in layers):
        signals[RANK] = ratio_signal(names, [layer.effective_rank.ratio for layer in layers], None, cut)
    label = "entropy ratio" if s_nominal is None else f"entropy ratio at s={s_nominal:g}"
    for est, signal in signals.items():
        if est != RANK:
            warn_excluded(f"{label} ({est})", signal)
    notes = [
        "entropies are per token vector (nats); kappa = h/d",
        f"stream: {stream}"
        + (
            " (x / sqrt(sum x^2 / d), d the dense width, for dense and sliced)"
            if stream == "normalised"
            else ""
        ),
        "marginal: each stream in its own principal axes (uncentred second moment, as SliceGPT's PCA)",
        "unit_sensitivity: d(H'/H)/d(log c) if both streams were measured in units c times larger",
        "ratios with same_sign=false mix negative and positive differential entropies and do not read as 1-s",
        f"signals: {SIGNAL}",
    ]
    return EntropySummary(layers=layers, s_nominal=s_nominal, notes=notes, stream=stream, signals=signals)
