"""A task's chance level and what it does to Prop. 3: the at-chance rule and the chance-corrected law.

Guessing scores the chance level c (1 / number of choices; ~0 for LAMBADA's last word). A task whose dense
accuracy acc0 lies within AT_CHANCE_SE standard errors of c has no room to fall: ln(acc / acc0) is noise around
a floor, so the law cannot be read there; it is marked, not fitted silently. Beside the paper's
y = ln(acc / acc0), the chance-corrected y = ln((acc - c) / (acc0 - c)) measures the fall of the accuracy above
chance (the share of the dense model's above-chance skill kept). Both are fitted by the same machinery
(`analyses.fits`, the dense point exact, sampling errors by the delta method) and compared by leave-one-out
prediction error in accuracy units, on the points where both are defined.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from analyses.fits import LawPoints, LineFit, loo_errors
from mechslice.errors import MechsliceError
from mechslice.mc.tasks import TASKS, load_task, task_chance

AT_CHANCE_SE = 3.0
AT_CHANCE = "at chance: the law cannot be read"
PAPER_FORM = "paper"
CORRECTED_FORM = "chance-corrected"
TIE = "tie"
CORRECTED_LAW = "y = ln((acc - c) / (acc0 - c)), c the chance level"


def acc_from_y(acc0: float, y: float, chance: float = 0.0) -> float:
    """Invert y = ln((acc - c) / (acc0 - c)) (the paper's ln(acc / acc0) at c = 0): acc = c + (acc0 - c) e^y,
    capped at 1 (an accuracy cannot exceed it)."""
    if y >= math.log((1.0 - chance) / (acc0 - chance)):
        return 1.0
    return chance + (acc0 - chance) * math.exp(y)


def chance_level(task: str, metrics: dict[str, Any]) -> float:
    """The chance level a task's record states, else (results from before it was recorded) that of the
    registered task on the recorded split and item count; MechsliceError for an unknown task without one."""
    recorded = metrics.get("chance")
    if recorded is not None:
        return float(recorded)
    if task not in TASKS:
        raise MechsliceError(
            f"task '{task}' records no chance level and is not one of mechslice's tasks ({', '.join(TASKS)}); "
            'add "chance": 1 / (number of choices) to its entries in results.json'
        )
    return _registered_chance(task, metrics.get("split"), metrics.get("n"))


@functools.cache
def _registered_chance(task: str, split: str | None, n: int | None) -> float:
    return task_chance(task, load_task(task, split=split, limit=n))


def at_chance_note(acc0: float, se0: float | None, chance: float) -> str | None:
    """`AT_CHANCE` with the numbers when |acc0 - c| <= AT_CHANCE_SE standard errors of acc0, else None (also
    when acc0 has no standard error to judge by)."""
    if se0 is None or abs(acc0 - chance) > AT_CHANCE_SE * se0:
        return None
    return (
        f"{AT_CHANCE} (acc0 {acc0:.3f} is within {AT_CHANCE_SE:g} standard errors, {AT_CHANCE_SE * se0:.3f}, "
        f"of chance {chance:.3f})"
    )


@dataclass(frozen=True)
class FormComparison:
    """Leave-one-out error of both forms in accuracy units: each sliced point's acc predicted by each form's
    fit (the paper's unconstrained a*s + b, dense point included) on the other points, on the `n` sliced
    points where both forms are defined (acc > c). An RMSE is None when some fold cannot be fitted."""

    n: int
    paper_rmse: float | None
    corrected_rmse: float | None

    @property
    def better(self) -> str | None:
        """The form with the smaller leave-one-out error (`PAPER_FORM`, `CORRECTED_FORM`, `TIE`), or None."""
        if self.paper_rmse is None or self.corrected_rmse is None:
            return None
        if self.paper_rmse == self.corrected_rmse:
            return TIE
        return CORRECTED_FORM if self.corrected_rmse < self.paper_rmse else PAPER_FORM

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, with the verdict."""
        return {
            "n": self.n,
            "paper_rmse": self.paper_rmse,
            "corrected_rmse": self.corrected_rmse,
            "better": self.better,
        }


def _loo_acc_rmse(
    s: np.ndarray, acc: np.ndarray, exact: np.ndarray, acc0: float, chance: float
) -> float | None:
    """RMSE of acc - acc-hat(-i) over the sliced points, the form fitted on y = ln((acc - c) / (acc0 - c))."""
    y = np.log((acc - chance) / (acc0 - chance))
    errors = loo_errors(s, y, exact)
    if errors is None:
        return None
    noisy = np.flatnonzero(~exact)
    predicted = [acc_from_y(acc0, y[i] - e, chance) for i, e in zip(noisy, errors, strict=True)]
    return float(np.sqrt(np.mean((acc[noisy] - np.asarray(predicted)) ** 2)))


def compare_forms(points: LawPoints, acc0: float, chance: float) -> FormComparison:
    """Both forms' leave-one-out accuracy error on the chance-corrected law's points (all have acc > c)."""
    s, acc, exact = points.s, points.values, points.exact
    return FormComparison(
        n=int((~exact).sum()),
        paper_rmse=_loo_acc_rmse(s, acc, exact, acc0, 0.0),
        corrected_rmse=_loo_acc_rmse(s, acc, exact, acc0, chance),
    )


@dataclass(frozen=True)
class ChanceLaw:
    """A task's chance level, whether its dense model is at chance, and its chance-corrected law.

    `fit` and `anchored` are the chance-corrected y = a*s + b (None, with `not_fitted` saying why, when the
    task is at chance or too few points lie above it); `comparison` their leave-one-out duel with the paper's.
    """

    chance: float
    at_chance: str | None
    points: LawPoints | None = None
    fit: LineFit | None = None
    anchored: LineFit | None = None
    comparison: FormComparison | None = None
    not_fitted: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: chance, the at-chance note, the corrected fits and points, the comparison."""
        return {
            "chance": self.chance,
            "at_chance": self.at_chance,
            "law": CORRECTED_LAW,
            "fit": None if self.fit is None else self.fit.to_dict(),
            "anchored": None if self.anchored is None else self.anchored.to_dict(),
            "points": None
            if self.points is None
            else [[float(s), float(y)] for s, y in zip(self.points.s, self.points.y, strict=True)],
            "dropped": None if self.points is None else self.points.dropped_note(),
            "loo_comparison": None if self.comparison is None else self.comparison.to_dict(),
            "not_fitted": self.not_fitted,
        }


CHANCE_CSV = (
    "chance",
    "at_chance",
    "corrected_a",
    "corrected_b",
    "corrected_a_ci_low",
    "corrected_a_ci_high",
    "corrected_rmse",
    "corrected_r2",
    "corrected_loo_rmse",
    "corrected_dof",
    "corrected_dropped",
    "corrected_not_fitted",
    "loo_acc_points",
    "loo_acc_rmse_paper",
    "loo_acc_rmse_corrected",
    "better_form",
)


def chance_cells(law: ChanceLaw | None) -> dict[str, object]:
    """The `CHANCE_CSV` cells of a fits.csv row (None throughout for perplexity)."""
    if law is None:
        return dict.fromkeys(CHANCE_CSV)
    f, c = law.fit, law.comparison
    return {
        "chance": law.chance,
        "at_chance": law.at_chance,
        "corrected_a": None if f is None else f.a,
        "corrected_b": None if f is None else f.b,
        "corrected_a_ci_low": None if f is None or f.a_ci is None else f.a_ci[0],
        "corrected_a_ci_high": None if f is None or f.a_ci is None else f.a_ci[1],
        "corrected_rmse": None if f is None else f.rmse,
        "corrected_r2": None if f is None else f.r2,
        "corrected_loo_rmse": None if f is None else f.loo_rmse,
        "corrected_dof": None if f is None else f.dof,
        "corrected_dropped": None if law.points is None else law.points.dropped_note(),
        "corrected_not_fitted": law.not_fitted,
        "loo_acc_points": None if c is None else c.n,
        "loo_acc_rmse_paper": None if c is None else c.paper_rmse,
        "loo_acc_rmse_corrected": None if c is None else c.corrected_rmse,
        "better_form": None if c is None else c.better,
    }
