"""Entropy estimators against closed forms: Gaussian 0.5 log det(2 pi e Sigma), uniform d log a."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from analyses.entropy import (
    ESTIMATORS,
    as_sample,
    entropy_ratio,
    estimate,
    gaussian_entropy,
    gaussian_entropy_from_moments,
    gaussian_entropy_from_spectrum,
    gaussian_entropy_top,
    kde_entropy_1d,
    knn_entropy,
    layer_entropy_summary,
    marginal_entropy_sum,
    spacing_entropy_1d,
    subsample_rows,
    unit_entropy,
)
from mechslice.errors import MechsliceError

N = 2000
LOG_2PIE = math.log(2 * math.pi * math.e)


def _covariance(d: int, seed: int) -> np.ndarray:
    a = np.random.default_rng(seed).standard_normal((d, d))
    return a @ a.T / d + 0.5 * np.eye(d)


def _gaussian(sigma: np.ndarray, n: int, seed: int) -> np.ndarray:
    z = np.random.default_rng(seed).standard_normal((n, sigma.shape[0]))
    return z @ np.linalg.cholesky(sigma).T


def _gaussian_h(sigma: np.ndarray) -> float:
    return 0.5 * np.linalg.slogdet(2 * math.pi * math.e * sigma)[1]


def test_gaussian_entropy_matches_log_det_and_moments_agree() -> None:
    sigma = _covariance(4, seed=1)
    x = _gaussian(sigma, N, seed=2)
    # 0.5 log det of a sample covariance has sd ~ sqrt(d / (2n)) = 0.03 and bias -d(d+1)/(4n) ~ -0.003: 0.1 is
    # more than 3 sd.
    assert gaussian_entropy(x) == pytest.approx(_gaussian_h(sigma), abs=0.1)
    # The streaming path sees the same sums, so it agrees to float64 round-off after centring.
    sums = gaussian_entropy_from_moments(torch.tensor(x.sum(0)), torch.tensor(x.T @ x), N)
    assert sums == pytest.approx(gaussian_entropy(x), abs=1e-9)
    # Scale law h(cX) = h(X) + d log c holds exactly for the plug-in estimator.
    assert gaussian_entropy(3.0 * x) == pytest.approx(gaussian_entropy(x) + 4 * math.log(3.0), abs=1e-9)


def test_gaussian_entropy_floors_a_singular_direction() -> None:
    x3 = _gaussian(np.eye(3), N, seed=3)
    x = np.concatenate([x3, x3[:, :1] + x3[:, 1:2]], axis=1)  # x = x3 @ B^T, B = [I; v^T], v = (1, 1, 0)
    h = gaussian_entropy(x)
    # Nonzero eigenvalues multiply to det(Sigma3) * det(B^T B) = 3 det(Sigma3); the zero one is clamped to
    # 1e-12 * lambda_max. Exact up to float64 round-off.
    lambda_max = np.linalg.eigvalsh(np.cov(x.T)).max()
    expected = gaussian_entropy(x3) + 0.5 * math.log(3.0) + 0.5 * (LOG_2PIE + math.log(1e-12 * lambda_max))
    assert h == pytest.approx(expected, abs=1e-6)


def test_top_k_entropy_is_sum_over_leading_eigenvalues() -> None:
    sigma = np.diag([4.0, 2.0, 1.0, 0.25])
    x = _gaussian(sigma, N, seed=4)
    # Top-2 principal directions of diag(4,2,1,.25) are the first two axes: 0.5*(2 log 2pie + log 8).
    expected_top2 = 0.5 * (2 * LOG_2PIE + math.log(8.0))
    assert gaussian_entropy_top(x, 2) == pytest.approx(expected_top2, abs=0.1)  # same sd argument as above
    assert gaussian_entropy_top(x, 4) == pytest.approx(gaussian_entropy(x), abs=1e-12)


def test_marginal_estimators_on_gaussian_with_independent_dims() -> None:
    sigma = np.diag([1.0, 4.0, 0.25])
    x = _gaussian(sigma, N, seed=5)
    true = _gaussian_h(sigma)
    spacing = marginal_entropy_sum(x, method="spacing")
    # Measured over 10 seeds at n=2000: spacing bias +0.015/dim (Gaussian tails), sd 0.011; KDE (n=1000)
    # bias ~0, sd 0.022. 0.06 per dim covers bias + 3 sd.
    assert spacing.total == pytest.approx(true, abs=3 * 0.06)
    per_dim_true = [0.5 * (LOG_2PIE + math.log(v)) for v in np.diag(sigma)]
    assert spacing.per_dim == pytest.approx(per_dim_true, abs=0.06)
    kde = marginal_entropy_sum(x, method="kde", max_samples=1000)
    assert kde.total == pytest.approx(true, abs=3 * 0.06)


def test_uniform_entropy_is_d_log_a() -> None:
    a, d = 3.0, 2
    u = np.random.default_rng(6).uniform(0.0, a, size=(N, d))
    true = d * math.log(a)
    # Spacing is unbiased for uniform data by construction; sd at n=2000 is ~0.002/dim.
    assert marginal_entropy_sum(u).total == pytest.approx(true, abs=0.02)
    # KL has a known positive boundary bias on bounded supports: measured +0.035 (sd 0.015) at d=2, n=2000.
    assert knn_entropy(u) == pytest.approx(true, abs=0.1)
    # KDE smooths across the edges (+0.065/dim measured at n=1000): looser bound.
    assert marginal_entropy_sum(u, method="kde", max_samples=1000).total == pytest.approx(true, abs=0.2)
    # The Gaussian estimator gives the max-entropy bound for variance a^2/12: d*(log a + 0.5 log(pi e / 6)).
    bound = d * (math.log(a) + 0.5 * math.log(math.pi * math.e / 6))
    assert gaussian_entropy(u) == pytest.approx(bound, abs=0.05)  # sd ~ sqrt(d/2n) = 0.022


def test_knn_on_gaussian_and_duplicates() -> None:
    sigma = _covariance(3, seed=7)
    x = _gaussian(sigma, N, seed=8)
    # Measured over 10 seeds for d=3, n=2000, k=3: bias -0.03, sd 0.025.
    h = knn_entropy(x)
    assert h == pytest.approx(_gaussian_h(sigma), abs=0.12)
    # Exact duplicate rows (an atom) are dropped, not turned into log(0) = -inf.
    with_dups = np.concatenate([x, np.repeat(x[:1], 50, axis=0)])
    assert knn_entropy(with_dups, max_samples=len(with_dups)) == pytest.approx(h, abs=0.02)


def test_spacing_and_kde_1d_on_standard_normal() -> None:
    z = np.random.default_rng(9).standard_normal(N)
    assert spacing_entropy_1d(z) == pytest.approx(0.5 * LOG_2PIE, abs=0.06)
    assert kde_entropy_1d(z[:1000]) == pytest.approx(0.5 * LOG_2PIE, abs=0.07)


def test_registry_and_estimate() -> None:
    assert set(ESTIMATORS) == {"gaussian", "marginal", "knn"}
    x = _gaussian(np.eye(2), 500, seed=10)
    assert estimate("gaussian", x) == gaussian_entropy(x)
    assert estimate("marginal", x, method="kde") == marginal_entropy_sum(x, method="kde").total
    assert estimate("knn", torch.tensor(x), k=5) == knn_entropy(x, k=5)


def test_ratio_unit_entropy_and_sign_flag() -> None:
    assert unit_entropy(12.0, 3, 2) == 2.0
    assert unit_entropy(6.0, 1, 4) == 1.5  # per-vector h: kappa = h/d
    r = entropy_ratio(3.0, 4.0)
    assert (r.ratio, r.same_sign) == (0.75, True)
    r = entropy_ratio(-1.0, 4.0)
    assert (r.ratio, r.same_sign) == (-0.25, False)
    assert math.isnan(entropy_ratio(1.0, 0.0).ratio)


def test_layer_summary_on_pca_sliced_gaussian() -> None:
    # Dense stream d=4 with independent dims of variance 8,4,2,1 (all positive entropy per dim); "sliced" to
    # d'=2 by keeping the top-2 principal axes, as PCA slicing would.
    sigma = np.diag([8.0, 4.0, 2.0, 1.0])
    dense = {0: _gaussian(sigma, N, seed=11), 1: torch.tensor(_gaussian(2 * sigma, N, seed=12))}
    sliced = {0: dense[0][:, :2], 1: dense[1][:, :2]}
    summary = layer_entropy_summary(dense, sliced, estimator_kwargs={"knn": {"max_samples": 1000}})
    layer0 = summary.layers[0]
    assert (layer0.layer, layer0.d, layer0.d_sliced, layer0.one_minus_s) == ("0", 4, 2, 0.5)
    g = layer0.estimators["gaussian"]
    per_dim = [0.5 * (LOG_2PIE + math.log(v)) for v in (8.0, 4.0, 2.0, 1.0)]
    expected_ratio = sum(per_dim[:2]) / sum(per_dim)  # 0.58: the leading dims carry more than half
    assert g.ratio == pytest.approx(expected_ratio, abs=0.02)  # two log-dets, each sd ~0.03 on ~7 nats
    assert g.same_sign
    assert g.kappa_dense == pytest.approx(g.H_dense / 4)
    assert layer0.top_ratio is not None
    # The axes are the principal directions up to sample correlations ~1/sqrt(n) = 0.02, which move the
    # eigenvalues only at second order (~4e-4 relative).
    assert layer0.top_ratio.ratio == pytest.approx(g.ratio, abs=1e-3)
    assert set(layer0.estimators) == {"gaussian", "marginal", "knn"}
    json.dumps(summary.to_dict(), allow_nan=False)


def test_bad_inputs() -> None:
    x = np.random.default_rng(13).standard_normal((10, 4))
    with pytest.raises(MechsliceError, match="choose one of"):
        estimate("renyi", x)
    with pytest.raises(MechsliceError, match="more tokens than dims"):
        gaussian_entropy(x[:4])
    with pytest.raises(MechsliceError, match="more than k=3"):
        knn_entropy(x[:3])
    with pytest.raises(MechsliceError, match="only 10 are available"):
        subsample_rows(x, 11)
    with pytest.raises(MechsliceError, match="unknown marginal method"):
        marginal_entropy_sum(x, method="histogram")
    with pytest.raises(MechsliceError, match="constant"):
        marginal_entropy_sum(np.ones((10, 2)))
    with pytest.raises(MechsliceError, match="nan or inf"):
        as_sample(np.full((5, 2), np.nan))
    with pytest.raises(MechsliceError, match=r"shape \(5,\)"):
        as_sample(np.zeros(5))
    with pytest.raises(MechsliceError, match="l >= 1"):
        unit_entropy(1.0, 0, 4)
    with pytest.raises(MechsliceError, match="different layers"):
        layer_entropy_summary({0: x}, {1: x})
    with pytest.raises(MechsliceError, match=r"1 <= k <= d=4"):
        gaussian_entropy_top(np.random.default_rng(0).standard_normal((20, 4)), 5)
    with pytest.raises(MechsliceError, match="empty or all zero"):
        gaussian_entropy_from_spectrum(np.array([]))
    with pytest.raises(MechsliceError, match="pass a \\(d, d\\)"):
        gaussian_entropy_from_moments(np.zeros(3), np.zeros((2, 2)), 10)
