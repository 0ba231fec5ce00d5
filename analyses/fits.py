"""Straight-line least squares with the error bars a law fit needs: y = a*s + b, in float64.

Reports what Table 3 of the paper reports (a, b, RMSE) plus what it does not: R^2, t-based confidence
intervals on a and b, leave-one-out prediction error, and a prediction interval at a new s. Quantities
undefined for the number of points (a CI with no residual degrees of freedom, LOO with two points) are None,
never NaN.

Two facts about the paper's laws shape the statistics. The dense point is exact by construction (y = 1 for
ln PPL0 / ln PPL, y = 0 for ln(acc / acc0)), so it carries no noise: it is kept in the paper's unconstrained
fit (`exact` marks it) but earns no residual degree of freedom, and `anchored=True` fits the one-parameter
line through it instead. And the accuracy points have a known sampling error: each acc is a binomial
proportion, and every y shares the error of ln acc0.

Model. The coefficients are ordinary least squares on all points (for the unconstrained fit, exactly the
paper's estimator, so Table 3 compares like for like). The errors of the noisy points are
e = lack-of-fit + sampling, Cov(e) = sigma^2 I + diag(v_i) + v0 * 1 1^T, where v_i is a point's own known
sampling variance, v0 the variance shared by every noisy point (acc0's) and sigma^2 the unknown scatter of
the law itself. sigma^2 comes from the residuals of the noisy points' own fit (the line through them alone,
or the anchored line): (SSR' - tr((I-H') Cov_sampling)) / dof, dof = noisy points - parameters, floored at
0 (for the free line the shared error, constant across points, drops out of SSR'). Those residuals are
orthogonal to span{1, s} (span{s - s0} when anchored), which holds every linear combination of noisy y's the
coefficients are made of, so under normal errors sigma^2's estimate is independent of a and b, and with no
known sampling error t_dof is exact. (The old count, n - 2 residual dof with the dense residual in SSR, is
miscalibrated: that residual is pure estimation error, 1 - b, and inflates SSR exactly when a and b are
off.) The covariance of the coefficients
is the exact one of the OLS map L = (X^T X)^-1 X^T under that error model, L Cov(e) L^T (a sandwich: OLS
weights are not the inverse covariance). With known sampling error the variance is a known part plus a
sigma^2 part, and the t quantile takes Welch-Satterthwaite's dof, dof * (total / sigma part)^2: t_dof
when sampling error is nil, the normal quantile when the scatter is all sampling. Chosen over GLS because
GLS weights need sigma^2 first, and over a bootstrap because with 5-10 points a resample says little the
linear algebra does not say exactly. Every model is scored on the same items, so in truth the acc errors are
positively correlated; without per-item scores they are taken as independent binomials, which overstates the
variance of each difference ln acc - ln acc0 (errs wide). Perplexity's own sampling error is not recorded by
the sweep (it is small on a whole test split); it ends up in sigma.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

from mechslice.errors import MechsliceError

LEVEL = 0.95


Cov2 = tuple[tuple[float, float], tuple[float, float]]


@dataclass(frozen=True)
class LineFit:
    """A fitted line y = a*s + b with its statistics; `None` marks a quantity undefined for these points."""

    a: float
    b: float
    rmse: float  # sqrt(mean of squared residuals), over all n points (the paper's RMSE)
    r2: float | None  # None when every y is the same (no variance to explain)
    a_ci: tuple[float, float] | None  # None when dof == 0 (no residual degrees of freedom)
    b_ci: tuple[float, float] | None  # None as well when anchored: b is fixed by the exact point
    loo_rmse: float | None  # each noisy point predicted by the fit on the others; None when a fold can't fit
    loo_max_abs: float | None
    n: int  # all points, exact ones included
    n_exact: int  # points without noise (the dense one): fitted through or with, but no degree of freedom
    anchored: bool  # True: y = y0 + a (s - s0) through the exact point (s0, y0), a the only parameter
    dof: int  # residual degrees of freedom of sigma: noisy points - parameters of their own fit
    level: float
    sigma: float | None  # lack-of-fit sd beyond the known sampling error; None when dof == 0
    cov: (
        Cov2 | None
    )  # Cov(a, b), lack of fit and sampling together (row/col of b is -s0 times a's if anchored)
    cov_lack: Cov2 | None  # the sigma^2 part of `cov` (what the Satterthwaite dof is computed from)
    shared_var: float  # known sampling variance shared by every noisy point and a new observation (acc0's)
    shared_load: tuple[float, float]  # (da, db) when every noisy y moves by 1: how the shared error enters
    s_min: float
    s_max: float

    def predict(self, s: float) -> float:
        """The fitted y at sparsity s."""
        return self.a * s + self.b

    def prediction_interval(self, s: float, new_var: float = 0.0) -> tuple[float, float] | None:
        """Interval that holds a new observation at s with probability `level`; None when dof == 0.

        Var(y_new - yhat) = sigma^2 + x^T Cov x + new_var + shared_var - 2 shared_var x^T shared_load with
        x = (s, 1): the new point's own sampling variance `new_var` (e.g. of its ln acc) and the one it
        shares with the fitted points (which partly cancels). It widens away from the fitted s.
        """
        if self.sigma is None or self.cov is None or self.cov_lack is None:
            return None
        x = np.array([s, 1.0])
        lack = self.sigma**2 + float(x @ np.asarray(self.cov_lack) @ x)
        total = self.sigma**2 + float(x @ np.asarray(self.cov) @ x) + new_var + self.shared_var
        total -= 2.0 * self.shared_var * float(x @ np.asarray(self.shared_load))
        return _interval(self.predict(s), self.level, self.dof, lack, max(total, 0.0))

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready dict (tuples become lists, None stays None)."""
        out = asdict(self)
        for key in ("a_ci", "b_ci", "shared_load"):
            out[key] = None if out[key] is None else list(out[key])
        for key in ("cov", "cov_lack"):
            out[key] = None if out[key] is None else [list(row) for row in out[key]]
        return out


def _t_quantile(level: float, dof: float) -> float:
    """Two-sided Student-t critical value for a `level` interval with `dof` degrees of freedom."""
    return float(stats.t.ppf(0.5 + level / 2.0, dof))


def _interval(center: float, level: float, dof: int, lack: float, total: float) -> tuple[float, float]:
    """center +- t * sqrt(total), t with Welch-Satterthwaite dof * (total / lack)^2 (normal when lack is 0)."""
    if lack <= 0.0 or total <= 0.0:
        q = float(stats.norm.ppf(0.5 + level / 2.0))
    else:
        q = _t_quantile(level, dof * (total / lack) ** 2)
    half = q * math.sqrt(total)
    return (center - half, center + half)


def _distinct(s: np.ndarray) -> int:
    return len(np.unique(s))


@dataclass(frozen=True)
class _Design:
    """Where a line is fitted: all points (unconstrained) or the noisy ones relative to the anchor."""

    X: np.ndarray  # design matrix of the fitted points
    target: np.ndarray  # response of the fitted points
    rows: np.ndarray  # indices of the fitted points in the input
    anchor: tuple[float, float] | None  # (s0, y0) when anchored

    def coefficients(self, beta: np.ndarray) -> tuple[float, float]:
        """(a, b) from the fitted parameters."""
        if self.anchor is None:
            return float(beta[0]), float(beta[1])
        s0, y0 = self.anchor
        return float(beta[0]), y0 - float(beta[0]) * s0

    def to_ab(self) -> np.ndarray:
        """The linear map from fitted parameters to (a, b): (a, b) = M beta + const."""
        if self.anchor is None:
            return np.eye(2)
        return np.array([[1.0], [-self.anchor[0]]])


def _design(s: np.ndarray, y: np.ndarray, exact: np.ndarray, anchored: bool) -> _Design:
    if not anchored:
        return _Design(np.column_stack([s, np.ones_like(s)]), y, np.arange(len(s)), None)
    s0, y0 = float(s[exact][0]), float(y[exact][0])
    rows = np.flatnonzero(~exact)
    return _Design((s[rows] - s0)[:, None], y[rows] - y0, rows, (s0, y0))


def _fit_ab(s: np.ndarray, y: np.ndarray, exact: np.ndarray, anchored: bool) -> tuple[float, float]:
    """(a, b) of the least-squares line (through the exact point when anchored)."""
    d = _design(s, y, exact, anchored)
    beta = np.linalg.lstsq(d.X, d.target, rcond=None)[0]
    return d.coefficients(beta)


def loo_errors(
    s: ArrayLike, y: ArrayLike, exact: ArrayLike | None = None, anchored: bool = False
) -> np.ndarray | None:
    """Leave-one-out errors y_i - yhat_i(-i) of the noisy points, each predicted by the fit on all the others.

    Exact points are never left out (they are part of the law, not observations). None when some fold has
    too few distinct sparsities left to fit.
    """
    s_arr, y_arr = np.asarray(s, dtype=np.float64), np.asarray(y, dtype=np.float64)
    mask = np.zeros(len(s_arr), dtype=bool) if exact is None else np.asarray(exact, dtype=bool)
    noisy = np.flatnonzero(~mask)
    errors = np.empty(len(noisy), dtype=np.float64)
    for j, i in enumerate(noisy):
        keep = np.arange(len(s_arr)) != i
        if _distinct(s_arr[keep]) < 2:
            return None
        a, b = _fit_ab(s_arr[keep], y_arr[keep], mask[keep], anchored)
        errors[j] = y_arr[i] - (a * s_arr[i] + b)
    return errors


def _pair(m: np.ndarray) -> Cov2:
    return ((float(m[0, 0]), float(m[0, 1])), (float(m[1, 0]), float(m[1, 1])))


def _check(s: np.ndarray, y: np.ndarray, exact: np.ndarray, var: np.ndarray, anchored: bool) -> None:
    if s.ndim != 1 or s.shape != y.shape:
        raise MechsliceError(f"fit_line needs two 1-D arrays of equal length, got {s.shape} and {y.shape}")
    if exact.shape != s.shape or var.shape != s.shape:
        raise MechsliceError("fit_line: `exact` and `sampling_var` need one entry per point")
    if not (np.all(np.isfinite(s)) and np.all(np.isfinite(y)) and np.all(np.isfinite(var))):
        raise MechsliceError("fit_line got a non-finite value; drop the points whose metric is undefined")
    if np.any(var < 0) or np.any(var[exact] != 0):
        raise MechsliceError("fit_line: sampling variances must be >= 0, and 0 on exact points")
    if _distinct(s) < 2:
        raise MechsliceError(
            f"a line needs at least two different sparsities, got {_distinct(s)}; sweep more sparsities"
        )
    if anchored and int(exact.sum()) != 1:
        raise MechsliceError(
            f"an anchored fit needs exactly one exact point to pass through, got {exact.sum()}"
        )


def fit_line(
    s: ArrayLike,
    y: ArrayLike,
    level: float = LEVEL,
    *,
    exact: ArrayLike | None = None,
    anchored: bool = False,
    sampling_var: ArrayLike | None = None,
    shared_var: float = 0.0,
) -> LineFit:
    """Least-squares fit of y = a*s + b with RMSE, R^2, `level` t-CIs on a and b, LOO error (model above).

    `exact` marks points without noise (no degree of freedom); `anchored` forces the line through the one
    exact point; `sampling_var` are the points' own known sampling variances (0 on exact points) and
    `shared_var` the known variance of an error common to every noisy point. With none of these it is
    classical OLS with n - 2 degrees of freedom.
    """
    s_arr, y_arr = np.asarray(s, dtype=np.float64), np.asarray(y, dtype=np.float64)
    n = len(s_arr)
    mask = np.zeros(n, dtype=bool) if exact is None else np.asarray(exact, dtype=bool)
    var = np.zeros(n) if sampling_var is None else np.asarray(sampling_var, dtype=np.float64)
    _check(s_arr, y_arr, mask, var, anchored)

    d = _design(s_arr, y_arr, mask, anchored)
    L = np.linalg.pinv(d.X)  # the OLS map (X^T X)^-1 X^T of the fitted points
    a, b = d.coefficients(L @ d.target)
    residuals = y_arr - (a * s_arr + b)
    ssr = float(np.sum(residuals**2))
    sst = float(np.sum((y_arr - y_arr.mean()) ** 2))

    noisy = (~mask[d.rows]).astype(np.float64)  # which fitted points carry noise
    sampling = np.diag(var[d.rows]) + shared_var * np.outer(noisy, noisy)
    M = d.to_ab()
    to_ab = M @ L
    # sigma from the noisy points' own fit: the anchored design itself, or the free line through them alone.
    own = d if anchored else _design(s_arr[~mask], y_arr[~mask], np.zeros(int((~mask).sum()), bool), False)
    resid_maker = np.eye(len(own.rows)) - own.X @ np.linalg.pinv(own.X)  # I - H'
    dof = max(0, len(own.rows) - own.X.shape[1])
    sigma = a_ci = b_ci = cov = cov_lack = None
    if dof > 0:
        ssr_own = float(np.sum((resid_maker @ own.target) ** 2))
        k = len(own.rows)
        own_sampling = np.diag(var[~mask]) + shared_var * np.ones((k, k))
        sigma2 = max(0.0, ssr_own - float(np.trace(resid_maker @ own_sampling))) / dof
        sigma = math.sqrt(sigma2)
        lack_ab = sigma2 * to_ab @ np.diag(noisy) @ to_ab.T
        cov_ab = lack_ab + to_ab @ sampling @ to_ab.T
        cov, cov_lack = _pair(cov_ab), _pair(lack_ab)
        a_ci = _interval(a, level, dof, lack_ab[0, 0], cov_ab[0, 0])
        b_ci = None if anchored else _interval(b, level, dof, lack_ab[1, 1], cov_ab[1, 1])
    load = to_ab @ noisy

    loo = loo_errors(s_arr, y_arr, mask, anchored) if dof > 0 else None
    return LineFit(
        a=a,
        b=b,
        rmse=math.sqrt(ssr / n),
        r2=None if sst == 0.0 else 1.0 - ssr / sst,
        a_ci=a_ci,
        b_ci=b_ci,
        loo_rmse=None if loo is None else float(np.sqrt(np.mean(loo**2))),
        loo_max_abs=None if loo is None else float(np.max(np.abs(loo))),
        n=n,
        n_exact=int(mask.sum()),
        anchored=anchored,
        dof=dof,
        level=level,
        sigma=sigma,
        cov=cov,
        cov_lack=cov_lack,
        shared_var=float(shared_var),
        shared_load=(float(load[0]), float(load[1])),
        s_min=float(s_arr.min()),
        s_max=float(s_arr.max()),
    )


@dataclass(frozen=True)
class LawPoints:
    """The (s, y) points of one law on one dataset; `excluded` are sparsities whose y is undefined (why:
    `undefined`).

    `exact` marks the dense point (y fixed by construction). For accuracy, `var` is each point's own
    sampling variance of ln acc and `shared_var` that of ln acc0, in every y but the dense one; both are 0
    when `sampling` is "none" (a results file without standard errors or item counts).
    """

    s: np.ndarray
    y: np.ndarray
    excluded: list[float]
    exact: np.ndarray
    var: np.ndarray
    shared_var: float = 0.0
    n_items: int | None = None  # items per evaluation (for a new point's sampling variance); None: unknown
    sampling: str = "none"  # "stderr" (recorded), "n" (from the item count) or "none"
    undefined: str = (
        ""  # the rule that dropped the `excluded` points, e.g. "acc = 0, where ln(acc / acc0) ..."
    )
    values: np.ndarray = field(default_factory=lambda: np.zeros(0))  # the metric (PPL or acc) at each point

    def dropped_note(self) -> str | None:
        """Which sparsities the fit left out and why (with how many it kept), or None when it left out none."""
        if not self.excluded:
            return None
        where = ", ".join(f"{s:.3f}" for s in self.excluded)
        return f"s = {where} dropped ({self.undefined}); {self.kept_text()}"

    def kept_text(self) -> str:
        """ "k of n sparsities > 0 have a defined value" (n counts the dropped ones)."""
        kept = len(np.unique(self.s[~self.exact]))
        total = kept + len(self.excluded)
        if total == 0:
            return "no sparsity > 0 has a value"
        return f"{kept} of {total} sparsit{'y' if total == 1 else 'ies'} > 0 ha{'s' if kept == 1 else 've'} a defined value"
