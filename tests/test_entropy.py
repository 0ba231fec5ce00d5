"""Entropy estimators against closed forms: Gaussian 0.5 log det(2 pi e Sigma), uniform d log a."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from analyses.entropy import (
    ESTIMATORS,
    RANK,
    as_sample,
    effective_rank,
    effective_rank_from_spectrum,
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
    principal_axes,
    ratio_signal,
    rms_normalised,
    spacing_entropy_1d,
    subsample_rows,
    unit_entropy,
    unit_sensitivity,
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
    # d'=2 by keeping the top-2 principal axes, as PCA slicing would. The raw stream, for the closed form.
    sigma = np.diag([8.0, 4.0, 2.0, 1.0])
    dense = {0: _gaussian(sigma, N, seed=11), 1: torch.tensor(_gaussian(2 * sigma, N, seed=12))}
    sliced = {0: dense[0][:, :2], 1: dense[1][:, :2]}
    summary = layer_entropy_summary(
        dense,
        sliced,
        ("gaussian", "marginal", "knn"),
        estimator_kwargs={"knn": {"max_samples": 1000}},
        stream="raw",
        include_knn=True,
    )
    layer0 = summary.layers[0]
    assert (layer0.layer, layer0.d, layer0.d_prime, layer0.one_minus_s) == ("0", 4, 2, 0.5)
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
    # The signal averages both layers (same sign, both cut to d' < d); the effective rank sits beside it.
    assert summary.signals["gaussian"].layers == ["0", "1"] and summary.signals["gaussian"].excluded == {}
    assert set(summary.signals) == {"gaussian", "marginal", "knn", RANK}
    json.dumps(summary.to_dict(), allow_nan=False)


# ---------------------------------------------------------------- issue 12: ratios that mean what they say


def _correlated(d: int, n: int, seed: int) -> np.ndarray:
    """An anisotropic Gaussian in a random basis (its dims correlated), like a residual stream's raw basis."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return _gaussian(q @ np.diag(np.geomspace(20.0, 0.5, d)) @ q.T, n, seed + 1)


def test_marginal_ratio_is_the_same_basis_for_dense_and_sliced() -> None:
    # Defect 2: a PCA rotation with nothing removed is the "sliced" stream at s = 0. Before, the marginal
    # sum was taken in the dense stream's own basis and in the sliced stream's PCA basis, so the ratio
    # measured the rotation (0.80 here). Both are now in their own principal axes: the same sample up to
    # column signs, to which the spacing estimator is blind, so the ratio is 1 to round-off.
    x = _correlated(8, N, seed=20)
    _, vecs = np.linalg.eigh(x.T @ x)
    rotated = x @ vecs[:, ::-1]
    summary = layer_entropy_summary({0: x}, {0: rotated}, ("marginal",))
    assert summary.layers[0].estimators["marginal"].ratio == pytest.approx(1.0, abs=1e-9)
    # Any rotation, not only the PCA one, and on the raw stream too.
    q, _ = np.linalg.qr(np.random.default_rng(21).standard_normal((8, 8)))
    raw = layer_entropy_summary({0: x}, {0: x @ q}, ("marginal",), stream="raw")
    assert raw.layers[0].estimators["marginal"].ratio == pytest.approx(1.0, abs=1e-9)
    # principal_axes is SliceGPT's basis: uncentred second moment, leading direction first.
    z = principal_axes(x)
    second = np.diag(z.T @ z)
    assert (second[:-1] >= second[1:]).all()


def test_ratio_signal_leaves_out_sign_mixed_and_unsliced_layers() -> None:
    # Defect 3: the mean ratio averages only the layers where H'/H reads as a fraction kept, and says which
    # it left out and why.
    signal = ratio_signal(
        ["0", "1", "2", "3"], [0.9, -0.5, 0.7, 1.0], [True, False, True, True], [True, True, True, False]
    )
    assert signal.ratio == pytest.approx(0.8)
    assert signal.layers == ["0", "2"]
    assert signal.excluded == {"1": "H and H' differ in sign", "3": "not sliced (d' = d)"}
    assert ratio_signal(["0"], [None]).ratio is None
    # With no layer cut (the dense model against itself) every layer counts.
    assert ratio_signal(["0", "1"], [1.0, 1.0], None, [False, False]).layers == ["0", "1"]


def test_summary_warns_about_sign_mixed_layers() -> None:
    # Dense layer 1 has all variances below 1/(2 pi e) (negative entropy) and its slice keeps large ones
    # (positive): a sign-mixed layer, left out of the mean with a warning.
    small = _gaussian(np.diag([0.01, 0.01, 0.01, 0.01]), N, seed=22)
    dense = {0: _gaussian(np.diag([8.0, 4.0, 2.0, 1.0]), N, seed=23), 1: small}
    sliced = {0: dense[0][:, :2], 1: 100.0 * small[:, :2]}
    with pytest.warns(
        UserWarning, match=r"1 layer\(s\) left out of the mean ratio: 1 \(H and H' differ in sign\)"
    ):
        summary = layer_entropy_summary(dense, sliced, ("gaussian",), stream="raw", s_nominal=0.5)
    assert not summary.layers[1].estimators["gaussian"].same_sign
    g = summary.signals["gaussian"]
    assert g.layers == ["0"] and g.ratio == pytest.approx(summary.layers[0].estimators["gaussian"].ratio)


def test_normalised_ratio_does_not_depend_on_the_unit() -> None:
    # Defect 4: h(cX) = h(X) + d log c, so a raw ratio at d' != d moves with the unit; the RMS-normalised
    # stream has the unit the model fixes and does not. d = 8 -> d' = 6.
    x = _correlated(8, N, seed=24)
    _, vecs = np.linalg.eigh(x.T @ x)
    xs = x @ vecs[:, ::-1][:, :6]
    base = layer_entropy_summary({0: x}, {0: xs}, ("gaussian",))
    scaled = layer_entropy_summary({0: 1000.0 * x}, {0: 1000.0 * xs}, ("gaussian",))
    g, g_scaled = base.layers[0].estimators["gaussian"], scaled.layers[0].estimators["gaussian"]
    assert g_scaled.ratio == pytest.approx(g.ratio, rel=1e-9)
    raw = layer_entropy_summary({0: x}, {0: xs}, ("gaussian",), stream="raw").layers[0]
    raw_scaled = layer_entropy_summary({0: 1000.0 * x}, {0: 1000.0 * xs}, ("gaussian",), stream="raw").layers[
        0
    ]
    assert abs(raw_scaled.estimators["gaussian"].ratio - raw.estimators["gaussian"].ratio) > 0.05
    # unit_sensitivity is d(H'/H)/d(log c): a central difference of the raw ratio agrees.
    eps = 1e-4
    up, down = (
        layer_entropy_summary({0: x * c}, {0: xs * c}, ("gaussian",), stream="raw").layers[0]
        for c in (math.exp(eps), math.exp(-eps))
    )
    slope = (up.estimators["gaussian"].ratio - down.estimators["gaussian"].ratio) / (2 * eps)
    assert raw.estimators["gaussian"].unit_sensitivity == pytest.approx(slope, rel=1e-5)
    # The effective rank is free of unit and basis: the same on the raw and the scaled stream.
    assert raw.effective_rank is not None and raw_scaled.effective_rank is not None
    assert raw_scaled.effective_rank.ratio == pytest.approx(raw.effective_rank.ratio, rel=1e-9)
    assert 0.0 < raw.effective_rank.ratio < 1.0


def test_rms_normalised_uses_the_original_width() -> None:
    # SliceGPT's norm over d' channels divides the sum of squares by the original d: the sliced stream keeps
    # the dense unit, its norm shrinks by the energy slicing dropped.
    x = np.random.default_rng(25).standard_normal((10, 6))
    expected = x / np.sqrt(np.sum(x**2, axis=1, keepdims=True) / 8)
    np.testing.assert_allclose(rms_normalised(x, 8), expected, rtol=1e-12)
    np.testing.assert_allclose(np.mean(rms_normalised(x, 6) ** 2, axis=1), 1.0, rtol=1e-12)
    with pytest.raises(MechsliceError, match="smaller than the stream"):
        rms_normalised(x, 4)


def test_effective_rank_closed_forms() -> None:
    assert effective_rank_from_spectrum(np.ones(5)) == pytest.approx(5.0)
    assert effective_rank_from_spectrum(np.array([1.0, 0.0, 0.0])) == pytest.approx(1.0)
    p = np.array([0.5, 0.25, 0.25])
    assert effective_rank_from_spectrum(4.0 * p) == pytest.approx(math.exp(-np.sum(p * np.log(p))))
    # Isotropic d = 6 Gaussian: the sample spectrum is nearly flat, so the effective rank is nearly 6.
    assert effective_rank(_gaussian(np.eye(6), N, seed=26)) == pytest.approx(6.0, abs=0.05)


def test_knn_is_kept_out_of_ratios_unless_asked() -> None:
    # Defect 9: the kNN estimator's bias depends on d. Standard Gaussians at d = 64 and d' = 32, n = 1000:
    # the true entropy per dim is 0.5 log(2 pi e) = 1.419 at both widths and the true ratio exactly 0.5.
    # Measured: kNN is +0.155 nats/dim high at d = 64 and +0.099 at d' = 32 (ratio 0.482); the Gaussian
    # plug-in is -0.019 and -0.009 (its small -(d+1)/(4n) bias, ratio 0.504).
    z = np.random.default_rng(27).standard_normal((1000, 64))
    summary = layer_entropy_summary(
        {0: z}, {0: z[:, :32]}, ("gaussian", "knn"), stream="raw", include_knn=True
    )
    g, knn = summary.layers[0].estimators["gaussian"], summary.layers[0].estimators["knn"]
    assert g.ratio == pytest.approx(0.5, abs=0.01)
    knn_drift, g_drift = knn.kappa_dense - knn.kappa_sliced, g.kappa_dense - g.kappa_sliced
    assert knn_drift > 0.04 and knn_drift > 4 * abs(g_drift)
    assert abs(knn.ratio - 0.5) > 4 * abs(g.ratio - 0.5)
    # So the default summary does not compute it, and asking without include_knn is refused.
    assert set(layer_entropy_summary({0: z}, {0: z[:, :32]}).layers[0].estimators) == {"gaussian", "marginal"}
    with pytest.raises(MechsliceError, match="include_knn"):
        layer_entropy_summary({0: z}, {0: z[:, :32]}, ("gaussian", "knn"))
    # On one stream it is still available.
    assert math.isfinite(estimate("knn", z[:, :3]))


def test_unit_sensitivity_formula() -> None:
    # R(c) = (H' + d' log c) / (H + d log c); dR/dlog c at c = 1 is (d' - d R) / H.
    assert unit_sensitivity(6.0, 10.0, 3, 5) == pytest.approx((3 - 5 * 0.6) / 10.0)
    assert unit_sensitivity(4.0, 10.0, 3, 5) == pytest.approx((3 - 2.0) / 10.0)
    assert math.isnan(unit_sensitivity(1.0, 0.0, 3, 5))


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
    with pytest.raises(MechsliceError, match="unknown entropy stream"):
        layer_entropy_summary({0: x}, {0: x}, stream="log")
    with pytest.raises(MechsliceError, match=r"1 <= k <= d=4"):
        gaussian_entropy_top(np.random.default_rng(0).standard_normal((20, 4)), 5)
    with pytest.raises(MechsliceError, match="empty or all zero"):
        gaussian_entropy_from_spectrum(np.array([]))
    with pytest.raises(MechsliceError, match="pass a \\(d, d\\)"):
        gaussian_entropy_from_moments(np.zeros(3), np.zeros((2, 2)), 10)
