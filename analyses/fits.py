"""Straight-line least squares with the error bars a law fit needs: y = a*s + b, in float64.

Reports what Table 3 of the paper reports (a, b, RMSE) plus what it does not: R^2, t-based confidence
intervals on a and b, leave-one-out prediction error, and a prediction interval at a new s. Quantities
undefined for the number of points (a CI with no residual degrees of freedom, LOO with two points) are None,
never NaN.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

from mechslice.errors import MechsliceError

LEVEL = 0.95


@dataclass(frozen=True)
class LineFit:
    """A fitted line y = a*s + b with its statistics; `None` marks a quantity undefined for these points."""

    a: float
    b: float
    rmse: float  # sqrt(mean of squared residuals), over all n points (the paper's RMSE)
    r2: float | None  # None when every y is the same (no variance to explain)
    a_ci: tuple[float, float] | None  # None when n == 2 (no residual degrees of freedom)
    b_ci: tuple[float, float] | None
    loo_rmse: float | None  # each point predicted by the line fitted on the others; None when n < 3
    loo_max_abs: float | None
    n: int
    level: float
    s_mean: float
    sxx: float  # sum of (s - s_mean)^2
    sigma: float | None  # residual standard error sqrt(SSR / (n - 2)); None when n == 2
    s_min: float
    s_max: float

    def predict(self, s: float) -> float:
        """The fitted y at sparsity s."""
        return self.a * s + self.b

    def prediction_interval(self, s: float) -> tuple[float, float] | None:
        """Interval that holds a new observation at s with probability `level`; None when n == 2.

        Half-width t * sigma * sqrt(1 + 1/n + (s - s_mean)^2 / Sxx): it widens away from the fitted s.
        """
        if self.sigma is None:
            return None
        t = _t_quantile(self.level, self.n - 2)
        half = t * self.sigma * math.sqrt(1.0 + 1.0 / self.n + (s - self.s_mean) ** 2 / self.sxx)
        y = self.predict(s)
        return (y - half, y + half)

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready dict (tuples become lists, None stays None)."""
        out = asdict(self)
        for key in ("a_ci", "b_ci"):
            out[key] = None if out[key] is None else list(out[key])
        return out


def _t_quantile(level: float, dof: int) -> float:
    """Two-sided Student-t critical value for a `level` interval with `dof` degrees of freedom."""
    return float(stats.t.ppf(0.5 + level / 2.0, dof))


def _least_squares(s: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Slope and intercept of the least-squares line through (s, y); s must take at least two values."""
    s_mean = s.mean()
    sxx = float(np.sum((s - s_mean) ** 2))
    a = float(np.sum((s - s_mean) * (y - y.mean())) / sxx)
    return a, float(y.mean() - a * s_mean)


def _distinct(s: np.ndarray) -> int:
    return len(np.unique(s))


def loo_errors(s: ArrayLike, y: ArrayLike) -> np.ndarray | None:
    """Leave-one-out errors y_i - yhat_i(-i), each point predicted by the line fitted on all the others.

    None when some fold leaves fewer than two distinct sparsities (no line through the rest).
    """
    s_arr, y_arr = np.asarray(s, dtype=np.float64), np.asarray(y, dtype=np.float64)
    errors = np.empty(len(s_arr), dtype=np.float64)
    for i in range(len(s_arr)):
        keep = np.arange(len(s_arr)) != i
        if _distinct(s_arr[keep]) < 2:
            return None
        a, b = _least_squares(s_arr[keep], y_arr[keep])
        errors[i] = y_arr[i] - (a * s_arr[i] + b)
    return errors


def fit_line(s: ArrayLike, y: ArrayLike, level: float = LEVEL) -> LineFit:
    """Least-squares fit of y = a*s + b with RMSE, R^2, `level` CIs on a and b (t, n-2 dof), LOO error."""
    s_arr, y_arr = np.asarray(s, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if s_arr.ndim != 1 or s_arr.shape != y_arr.shape:
        raise MechsliceError(
            f"fit_line needs two 1-D arrays of equal length, got {s_arr.shape} and {y_arr.shape}"
        )
    if not (np.all(np.isfinite(s_arr)) and np.all(np.isfinite(y_arr))):
        raise MechsliceError("fit_line got a non-finite value; drop the points whose metric is undefined")
    if _distinct(s_arr) < 2:
        raise MechsliceError(
            f"a line needs at least two different sparsities, got {_distinct(s_arr)}; sweep more sparsities"
        )
    n = len(s_arr)
    a, b = _least_squares(s_arr, y_arr)
    residuals = y_arr - (a * s_arr + b)
    ssr = float(np.sum(residuals**2))
    sst = float(np.sum((y_arr - y_arr.mean()) ** 2))
    s_mean = float(s_arr.mean())
    sxx = float(np.sum((s_arr - s_mean) ** 2))

    sigma = a_ci = b_ci = None
    if n > 2:
        sigma = math.sqrt(ssr / (n - 2))
        t = _t_quantile(level, n - 2)
        se_a = sigma / math.sqrt(sxx)
        se_b = sigma * math.sqrt(1.0 / n + s_mean**2 / sxx)
        a_ci, b_ci = (a - t * se_a, a + t * se_a), (b - t * se_b, b + t * se_b)

    loo = loo_errors(s_arr, y_arr) if n > 2 else None
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
        level=level,
        s_mean=s_mean,
        sxx=sxx,
        sigma=sigma,
        s_min=float(s_arr.min()),
        s_max=float(s_arr.max()),
    )
