"""The paper's two laws, fitted on a sweep's results and used to predict a pruned model without evaluating it.

Proposition 2: y = ln PPL0 / ln PPL, which the paper says equals 1 - s (a = -1, b = 1).
Proposition 3: y = ln(acc / acc0), per multiple-choice task, proportional to 1 - s.
Beside Prop. 3, per task, its chance-corrected form and the at-chance rule (`analyses.chance`).
Both are fitted as y = a*s + b against the EFFECTIVE sparsity s = 1 - d'/d, with the dense model included as
the point s = 0 (y = 1, resp. 0), as in the paper's Fig. 3; the paper's Table 3 (`analyses.paper`) is set beside it.
That point is exact by construction, not an observation: it earns no degree of freedom, and a second fit,
`anchored`, is the line through it (y = 1 + a s, resp. a s). Accuracy intervals carry the binomial sampling
error of every acc and of the acc0 all points share (see `analyses.fits` for the model).
Input is `DIR/results.json` as written by the sweep (`analyses.results`); output `DIR/fits.json` and `DIR/fits.csv`.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from analyses.chance import (
    CHANCE_CSV,
    ChanceLaw,
    acc_from_y,
    at_chance_note,
    chance_cells,
    chance_level,
    compare_forms,
)
from analyses.entropy import BIASED_IN_D, RatioSignal, ratio_signal
from analyses.fits import LawPoints, LineFit, fit_line
from analyses.paper import LAWS, PAPER_DATASETS, PAPER_MODELS, PAPER_TABLE3, PaperFit
from analyses.results import (
    DENSE_TOLERANCE,
    PPL,
    SweepRecord,
    TaskScore,
    check_acc_key,
    dense_record,
    is_number,
    results_dtype,
    validate_results,
)
from mechslice import distributed
from mechslice.atomic import atomic_write_text
from mechslice.checks import check_sparsity
from mechslice.errors import MechsliceError

FITS_JSON = "fits.json"
FITS_CSV = "fits.csv"
DENSE_NOTE = (
    "s is the effective sparsity 1 - d'/d; the paper's fit (a, b) includes the dense model as the point s=0 "
    "(y=1 for perplexity, y=0 for accuracy), as in the paper's Fig. 3; that point is exact by construction, so "
    "it adds no degree of freedom (dof = sparsities > 0 minus 2); the anchored fit passes through it (a only, "
    "dof = sparsities > 0 minus 1); accuracy intervals include the standard errors of acc and of acc0 "
    "where results.json records them (column sampling_error)"
)


# ---------------------------------------------------------------- fitting


def _log_acc_var(score: TaskScore, acc_key: str, chance: float = 0.0) -> float | None:
    """Delta method: Var(ln(acc - c)) = SE^2 / (acc - c)^2 (None when no SE is known)."""
    se, acc = score.sampling_error(acc_key), score.accuracy(acc_key)
    return None if se is None or acc is None else (se / (acc - chance)) ** 2


def undefined_rule(dataset: str, acc_key: str = "acc", chance: float = 0.0) -> str:
    """When a point of `dataset`'s law has no y: the log it takes is of a value it cannot take."""
    if dataset == PPL:
        return "PPL <= 1, where ln PPL0 / ln PPL is undefined"
    if chance > 0.0:
        return f"{acc_key} <= chance {chance:.3f}, where ln(({acc_key} - c) / ({acc_key}0 - c)) is undefined"
    return f"{acc_key} = 0, where ln({acc_key} / {acc_key}0) is undefined"


def law_points(results: dict[str, Any], dataset: str, acc_key: str = "acc", chance: float = 0.0) -> LawPoints:
    """(s, y) of `dataset` (`ppl` or a task): y = ln PPL0/ln PPL or ln(acc/acc0), dense point included; with
    `chance` c > 0 the chance-corrected y = ln((acc - c) / (acc0 - c)).

    Records without the metric are left out; records where the law is undefined (PPL <= 1, acc == 0) are
    listed in `excluded`. Accuracy points carry their sampling variances from `stderr` (or the item count
    `n` of older results); if any point lacks both, none is used. Raises MechsliceError when the dense
    record lacks the metric.
    """

    def value(rec: SweepRecord) -> float | None:
        if dataset == PPL:
            return rec.ppl
        return rec.tasks[dataset].accuracy(acc_key) if dataset in rec.tasks else None

    def defined(v: float) -> bool:  # ln PPL must be > 0 to divide by; ln(acc - c) needs acc > c
        return v > 1.0 if dataset == PPL else v > chance

    records = [SweepRecord.from_dict(rec) for rec in results["records"]]
    dense = next(rec for rec in records if rec.is_dense)
    base = value(dense)
    if base is None:
        raise MechsliceError(
            f"the dense record has no {dataset if dataset == PPL else dataset + ' ' + acc_key}"
        )
    if not defined(base):
        raise MechsliceError(f"the dense model's {dataset} value {base} leaves the law undefined")
    s, y, excluded, used = [], [], [], []
    for rec in records:
        v = value(rec)
        if v is None:
            continue
        if rec is dense:
            s.append(0.0)
            y.append(1.0 if dataset == PPL else 0.0)
        elif not defined(v):
            excluded.append(float(rec.effective_sparsity))
            continue
        else:
            s.append(float(rec.effective_sparsity))
            y.append(
                math.log(base) / math.log(v) if dataset == PPL else math.log((v - chance) / (base - chance))
            )
        used.append(rec)
    exact = np.array([rec is dense for rec in used])
    points = LawPoints(
        np.asarray(s, dtype=np.float64),
        np.asarray(y, dtype=np.float64),
        excluded,
        exact,
        np.zeros(len(used)),
        undefined=undefined_rule(dataset, acc_key, chance),
        values=np.asarray([value(rec) for rec in used], dtype=np.float64),
    )
    if dataset == PPL:
        return points
    variances = [_log_acc_var(rec.tasks[dataset], acc_key, chance) for rec in used]
    if any(v is None for v in variances):
        return points
    dense_score = dense.tasks[dataset]
    return replace(
        points,
        var=np.where(exact, 0.0, np.asarray(variances, dtype=np.float64)),
        shared_var=float(_log_acc_var(dense_score, acc_key, chance)),
        n_items=dense_score.item_count(acc_key),
        sampling="stderr" if is_number(dense_score.standard_error(acc_key)) else "n",
    )


@dataclass(frozen=True)
class FitRow:
    """One row of the Table 3 analogue: the fitted law on one dataset, with the paper's values beside it.

    `fit` is the paper's unconstrained y = a*s + b (what Table 3 is compared with); `anchored` the line
    through the exact dense point, y = y(0) + a*s.
    """

    metric: str  # "perplexity" or "accuracy"
    dataset: str  # "ppl" or our task name
    fit: LineFit
    anchored: LineFit
    points: LawPoints
    literal_rmse: float | None  # perplexity only: RMSE of the paper's literal line y = 1 - s on our points
    paper: dict[str, PaperFit] = field(default_factory=dict)
    chance: ChanceLaw | None = None  # accuracy only: chance level, at-chance note, chance-corrected law

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the fit, the points, and the paper's a, b, RMSE per paper model."""
        return {
            "metric": self.metric,
            "dataset": self.dataset,
            "paper_dataset": PAPER_DATASETS.get(self.dataset),
            "law": LAWS[self.metric],
            **self.fit.to_dict(),
            "anchored": self.anchored.to_dict(),
            "sampling_error": self.points.sampling,
            "n_items": self.points.n_items,
            "literal_rmse": self.literal_rmse,
            "points": [[float(s), float(y)] for s, y in zip(self.points.s, self.points.y, strict=True)],
            "excluded_sparsities": self.points.excluded,
            "dropped": self.points.dropped_note(),
            "paper": {name: vars(p) for name, p in self.paper.items()},
            "chance": None if self.chance is None else self.chance.to_dict(),
        }


@dataclass(frozen=True)
class FitTable:
    """All law fits of one sweep: a row per dataset, the dense values, and what could not be fitted (`skipped`:
    dataset -> "cannot be fitted: why")."""

    model: str
    model_fingerprint: str | None
    dtype: str  # what the sweep's models computed in
    acc_key: str
    ppl0: float | None
    acc0s: dict[str, float]
    rows: list[FitRow]
    skipped: dict[str, str]

    def row(self, dataset: str) -> FitRow:
        """The row of `dataset` (`ppl` or a task name)."""
        for r in self.rows:
            if r.dataset == dataset:
                return r
        raise MechsliceError(f"no fit for {dataset}; fitted: {', '.join(r.dataset for r in self.rows)}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form of the whole table (what fits.json holds)."""
        return {
            "model": self.model,
            "model_fingerprint": self.model_fingerprint,
            "dtype": self.dtype,
            "acc_key": self.acc_key,
            "dense_point_included": True,
            "note": DENSE_NOTE,
            "ppl0": self.ppl0,
            "acc0": self.acc0s,
            "rows": [r.to_dict() for r in self.rows],
            "skipped": self.skipped,
        }


def _datasets(results: dict[str, Any]) -> list[str]:
    """`ppl`, then the paper's tasks in Table 3 order, then any other task, sorted."""
    tasks = {t for rec in results["records"] for t in rec.get("tasks", {})}
    paper_order = [t for t in PAPER_DATASETS if t in tasks]
    return [PPL, *paper_order, *sorted(tasks - set(paper_order))]


def _too_few(points: LawPoints) -> str | None:
    """Why `points` hold too few sparsities > 0 for a fit with a residual degree of freedom, else None.

    The dense point is exact, so with one sparsity beside it even the line through it has no residual
    degree of freedom: its slope would be a number without an error bar, so it is not offered as a fit.
    """
    if len(np.unique(points.s[~points.exact])) >= 2:
        return None
    return (
        f"{points.dropped_note() or points.kept_text()}; a law needs two beside the dense model to leave a "
        "residual degree of freedom"
    )


def _zero_width(fit: LineFit) -> bool:
    """True when the interval on a has zero width: the points lie on the line and none has sampling error."""
    return fit.a_ci is not None and fit.a_ci[0] == fit.a_ci[1]


ZERO_WIDTH = (
    "every point lies exactly on the line and none carries a sampling error, so the interval on a would have "
    "zero width (claiming a certainty the data cannot give)"
)


def _fit_row(results: dict[str, Any], dataset: str, acc_key: str) -> FitRow:
    """The law fitted on one dataset; MechsliceError (the reason) when it cannot be fitted."""
    points = law_points(results, dataset, acc_key)
    fit, anchored = _fit_points(points)
    literal = None
    if dataset == PPL:
        literal = float(np.sqrt(np.mean((points.y - (1.0 - points.s)) ** 2)))
        return FitRow("perplexity", dataset, fit, anchored, points, literal, PAPER_TABLE3.get(dataset, {}))
    chance = _chance_law(results, dataset, acc_key)
    return FitRow("accuracy", dataset, fit, anchored, points, literal, PAPER_TABLE3.get(dataset, {}), chance)


def _fit_points(points: LawPoints) -> tuple[LineFit, LineFit]:
    """The unconstrained and the anchored line through `points`; MechsliceError (why) when they cannot be."""
    reason = _too_few(points)
    if reason is not None:
        raise MechsliceError(reason)
    fit, anchored = (
        fit_line(
            points.s,
            points.y,
            exact=points.exact,
            anchored=through,
            sampling_var=points.var,
            shared_var=points.shared_var,
        )
        for through in (False, True)
    )
    if _zero_width(fit) or _zero_width(anchored):
        raise MechsliceError(ZERO_WIDTH)
    return fit, anchored


def _chance_law(results: dict[str, Any], task: str, acc_key: str) -> ChanceLaw:
    """The task's chance level, the at-chance rule on acc0, and (when acc0 is clear of chance) the
    chance-corrected law with its leave-one-out comparison against the paper's form."""
    metrics = dense_record(results)["tasks"][task]
    chance, acc0 = chance_level(task, metrics), float(metrics[acc_key])
    note = at_chance_note(acc0, TaskScore.from_dict(metrics).sampling_error(acc_key), chance)
    if note is not None:
        return ChanceLaw(chance, note, not_fitted="the dense model is at chance")
    if acc0 <= chance:
        return ChanceLaw(chance, None, not_fitted=f"acc0 {acc0:.3f} is below chance {chance:.3f}")
    points = law_points(results, task, acc_key, chance)
    try:
        fit, anchored = _fit_points(points)
    except MechsliceError as err:
        return ChanceLaw(chance, None, points, not_fitted=str(err))
    return ChanceLaw(chance, None, points, fit, anchored, compare_forms(points, acc0, chance))


def _nothing_fits(results: dict[str, Any], skipped: dict[str, str]) -> MechsliceError:
    """The one error for a sweep where no law fits: the sweep's own shortfall if it has one, else each reason."""
    sliced = sum(rec["effective_sparsity"] >= DENSE_TOLERANCE for rec in results["records"])
    if sliced < 2:
        return MechsliceError(
            f"nothing to fit: fewer than two sparsities > 0 (the sweep has {sliced}), and a law needs two "
            "beside the dense model; sweep at least two sparsities > 0"
        )
    reasons = "; ".join(f"{k}: {v}" for k, v in skipped.items())
    return MechsliceError(f"nothing to fit: {reasons}")


def fit_results(results: dict[str, Any], acc_key: str = "acc") -> FitTable:
    """Fit Prop. 2 on perplexity and Prop. 3 on every task's `acc_key` accuracy against effective sparsity.

    A dataset that cannot be fitted is listed in `skipped` with the reason ("cannot be fitted: ..."): under
    two sparsities > 0 with a defined value, or a zero-width interval; MechsliceError if none fits, or if a
    task has no chance level. Each accuracy row carries `chance` (`analyses.chance.ChanceLaw`): the at-chance
    mark and the chance-corrected law beside the paper's.
    """
    check_acc_key(acc_key)
    validate_results(results)
    for task, metrics in dense_record(results).get("tasks", {}).items():
        chance_level(task, metrics)  # no chance level is bad input (MechsliceError), not an unfittable law
    rows, skipped = [], {}
    for dataset in _datasets(results):
        try:
            rows.append(_fit_row(results, dataset, acc_key))
        except MechsliceError as err:
            skipped[dataset] = f"cannot be fitted: {err}"
    if not rows:
        raise _nothing_fits(results, skipped)
    dense = dense_record(results)
    acc0s = {t: float(m[acc_key]) for t, m in dense.get("tasks", {}).items() if m.get(acc_key) is not None}
    return FitTable(
        model=results["model"],
        model_fingerprint=results.get("model_fingerprint"),
        dtype=results_dtype(results),
        acc_key=acc_key,
        ppl0=dense.get("ppl"),
        acc0s=acc0s,
        rows=rows,
        skipped=skipped,
    )


# ---------------------------------------------------------------- writing fits.json / fits.csv


ANCHORED_CSV = ("a", "a_ci_low", "a_ci_high", "rmse", "loo_rmse", "dof", "sigma")


def csv_columns() -> list[str]:
    """Columns of fits.csv: Table 3's layout with our statistics, then the paper's a, b, RMSE per model.

    a .. n_points: the paper's unconstrained fit (dense point included); `dof` its residual degrees of
    freedom (sparsities > 0 minus 2: the exact dense point earns none), `sigma` the law's scatter beyond
    sampling error, `sampling_error` where the accuracy standard errors came from ("stderr", "n" or "none");
    `anchored_*` the one-parameter fit through the dense point (its b is 1 for perplexity, 0 for accuracy);
    `n_dropped` and `dropped` the sparsities left out because the law is undefined there (e.g. acc = 0);
    a dataset that cannot be fitted has a row of its own with only its name and `not_fitted` (why).
    """
    ours = ["metric", "dataset", "paper_dataset", "acc_key", "a", "b", "rmse", "r2", "a_ci_low", "a_ci_high"]
    ours += ["b_ci_low", "b_ci_high", "loo_rmse", "loo_max_abs", "n_points", "dense_point_included"]
    ours += ["dof", "sigma", "sampling_error", *(f"anchored_{k}" for k in ANCHORED_CSV)]
    ours += ["n_dropped", "dropped", "not_fitted"]
    paper = [f"paper_{slug}_{k}" for slug in PAPER_MODELS.values() for k in ("a", "b", "rmse")]
    return ours + paper + list(CHANCE_CSV)


def _fit_cells(f: LineFit) -> dict[str, object]:
    """The per-fit cells of a fits.csv row (None where undefined)."""
    return {
        "a": f.a,
        "a_ci_low": None if f.a_ci is None else f.a_ci[0],
        "a_ci_high": None if f.a_ci is None else f.a_ci[1],
        "rmse": f.rmse,
        "loo_rmse": f.loo_rmse,
        "dof": f.dof,
        "sigma": f.sigma,
    }


def _name_cells(dataset: str, acc_key: str) -> dict[str, object]:
    """The cells naming a fits.csv row: metric, dataset, the paper's name for it, accuracy key."""
    return {
        "metric": "perplexity" if dataset == PPL else "accuracy",
        "dataset": dataset,
        "paper_dataset": PAPER_DATASETS.get(dataset, ""),
        "acc_key": "" if dataset == PPL else acc_key,
    }


def _csv_row(row: FitRow, acc_key: str) -> dict[str, object]:
    f = row.fit
    out: dict[str, object] = {
        **_name_cells(row.dataset, acc_key),
        **_fit_cells(f),
        "b": f.b,
        "r2": f.r2,
        "b_ci_low": None if f.b_ci is None else f.b_ci[0],
        "b_ci_high": None if f.b_ci is None else f.b_ci[1],
        "loo_max_abs": f.loo_max_abs,
        "n_points": f.n,
        "dense_point_included": "yes",
        "sampling_error": row.points.sampling,
        **{f"anchored_{k}": v for k, v in _fit_cells(row.anchored).items()},
        "n_dropped": len(row.points.excluded),
        "dropped": row.points.dropped_note(),
        **chance_cells(row.chance),
    }
    for name, slug in PAPER_MODELS.items():
        paper = row.paper.get(name)
        for k in ("a", "b", "rmse"):
            out[f"paper_{slug}_{k}"] = None if paper is None else getattr(paper, k)
    return {k: "" if v is None else v for k, v in out.items()}


def write_fits(table: FitTable, directory: str | Path) -> tuple[Path, Path]:
    """Write `directory/fits.json` and `directory/fits.csv` atomically; return their paths."""
    folder = Path(directory)
    json_path, csv_path = folder / FITS_JSON, folder / FITS_CSV
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=csv_columns(), lineterminator="\n")
    writer.writeheader()
    writer.writerows(_csv_row(r, table.acc_key) for r in table.rows)
    writer.writerows({**_name_cells(k, table.acc_key), "not_fitted": why} for k, why in table.skipped.items())

    def write() -> None:
        atomic_write_text(json_path, json.dumps(table.to_dict(), indent=2, allow_nan=False) + "\n")
        atomic_write_text(csv_path, buf.getvalue())

    distributed.on_main(write)  # under torchrun only rank 0 writes; the others wait for it
    return json_path, csv_path


# ---------------------------------------------------------------- prediction


def ppl_from_y(ppl0: float, y: float) -> float | None:
    """Invert y = ln PPL0 / ln PPL: PPL = exp(ln PPL0 / y); None (unbounded) when y <= 0 or it overflows."""
    if y <= 0.0:
        return None
    try:
        return math.exp(math.log(ppl0) / y)
    except OverflowError:
        return None


def ppl_from_entropy_ratio(ppl0: float, ratio: float) -> float:
    """Prop. 2 read literally with H'/H in place of 1 - s: PPL = exp(ln PPL0 / ratio) (inf on overflow)."""
    if not (is_number(ratio) and ratio > 0.0):
        raise MechsliceError(f"entropy ratio {ratio!r} must be a positive number")
    if not (is_number(ppl0) and ppl0 >= 1.0):
        raise MechsliceError(f"dense perplexity {ppl0!r} must be a number >= 1")
    ppl = ppl_from_y(ppl0, ratio)
    return math.inf if ppl is None else ppl


def _new_point_var(points: LawPoints, acc: float) -> float:
    """Sampling variance of ln acc for a new model scored on the same items (0 when unknown or perplexity)."""
    n = points.n_items
    if points.sampling == "none" or n is None or n < 2 or acc <= 0.0:
        return 0.0
    return (1.0 - acc) / ((n - 1) * acc)


def _law_prediction(row: FitRow, fit: LineFit, s: float, base: float) -> dict[str, Any]:
    """y, its prediction interval, and both mapped back to PPL (base = PPL0) or acc (base = acc0)."""
    y = fit.predict(s)
    if row.dataset == PPL:
        y_int = fit.prediction_interval(s)
        # y decreasing means perplexity increasing: the low end of y gives the high end of PPL.
        interval = None if y_int is None else [ppl_from_y(base, y_int[1]), ppl_from_y(base, y_int[0])]
        predicted = ppl_from_y(base, y)
    else:
        predicted = acc_from_y(base, y)
        y_int = fit.prediction_interval(s, new_var=_new_point_var(row.points, predicted))
        interval = None if y_int is None else [acc_from_y(base, v) for v in y_int]
    return {
        "y": y,
        "y_interval": None if y_int is None else list(y_int),
        "predicted": predicted,
        "interval": interval,
    }


def predict(fits: FitTable, sparsity: float, ppl0: float | None, acc0s: dict[str, float]) -> dict[str, Any]:
    """Predicted perplexity and accuracies at an unseen `sparsity`, with 95% prediction intervals.

    From the paper's unconstrained fit, and under `anchored` from the fit through the dense point. The
    interval of y is mapped back through the law: PPL = exp(ln PPL0 / y) (an upper bound is None when the
    interval reaches y <= 0: unbounded), acc = acc0 * exp(y) capped at 1; an accuracy interval holds a new
    model's accuracy measured on as many items as the sweep's (its binomial error included). `extrapolated`
    flags an s outside the fitted range, `dropped` the sparsities the fit left out (None: none). The paper's
    literal law PPL = exp(ln PPL0 / (1 - s)) is given too; a law that cannot be fitted is in `fits.skipped`.
    """
    s = check_sparsity(sparsity)
    out: dict[str, Any] = {"sparsity": s, "acc_key": fits.acc_key, "level": None, "ppl": None, "tasks": {}}
    for row in fits.rows:
        out["level"] = row.fit.level
        base = ppl0 if row.dataset == PPL else acc0s.get(row.dataset)
        if base is None:
            continue
        entry = _law_prediction(row, row.fit, s, base)
        entry["extrapolated"] = not row.fit.s_min <= s <= row.fit.s_max
        entry["anchored"] = _law_prediction(row, row.anchored, s, base)
        entry["dropped"] = row.points.dropped_note()
        if row.dataset == PPL:
            entry["paper_law"] = ppl_from_y(base, 1.0 - s)
            out["ppl"] = entry
        else:
            out["tasks"][row.dataset] = entry
    return out


@dataclass(frozen=True)
class EntropyPrediction:
    """ln PPL at one sparsity predicted from the residual-stream entropy ratio alone, and the measured one.

    `ratio` is `analyses.entropy.SIGNAL`: the mean over `layers`; `excluded` names the layers left out, why.
    """

    sparsity: float
    effective_sparsity: float
    ratio: float
    ln_ppl_measured: float
    ln_ppl_predicted: float
    abs_error: float  # |predicted - measured| in ln PPL
    rel_error: float  # abs_error / measured ln PPL
    layers: list[str] = field(default_factory=list)
    excluded: dict[str, str] = field(default_factory=dict)


def record_signal(rec: dict[str, Any], stats: dict[str, Any]) -> RatioSignal | None:
    """`ratio_signal` of one estimator in one record, recomputed from its per-layer lists.

    Recomputing (rather than reading `ratio_mean`) gives files written before the sign rule the same
    treatment: their `ratio_mean` averaged every layer. A record with only `ratio_mean` is taken as it is.
    """
    ratios = stats.get("ratio_per_layer")
    if not ratios:
        mean = stats.get("ratio_mean")
        return RatioSignal(float(mean), [], {}) if is_number(mean) else None
    h0, h1 = stats.get("per_layer_dense"), stats.get("per_layer")
    same = stats.get("same_sign_per_layer")
    if same is None and h0 and h1 and len(h0) == len(h1) == len(ratios):
        same = [a is not None and b is not None and bool(a * b > 0.0) for a, b in zip(h0, h1, strict=True)]
    widths = (rec.get("entropy") or {}).get("d_sliced_per_layer")
    sliced = [w < rec["d"] for w in widths] if widths and len(widths) == len(ratios) and "d" in rec else None
    return ratio_signal([str(i) for i in range(len(ratios))], ratios, same, sliced)


def entropy_predictions(
    results: dict[str, Any], include_knn: bool = False
) -> dict[str, list[EntropyPrediction]]:
    """Per entropy estimator (and the effective rank) and record with a measured ppl: ln PPL0 / ratio against
    the measured ln PPL, the ratio being `record_signal`. kNN ratios are left out unless `include_knn`: its
    bias depends on d, so its H'/H compares two differently biased numbers."""
    dense = dense_record(results)
    ppl0 = dense.get("ppl")
    if ppl0 is None or ppl0 <= 1.0:
        return {}
    out: dict[str, list[EntropyPrediction]] = {}
    for rec in results["records"]:
        if rec.get("ppl") is None or rec["ppl"] <= 1.0:
            continue
        for estimator, stats in (rec.get("entropy") or {}).items():
            if not isinstance(stats, dict) or (estimator in BIASED_IN_D and not include_knn):
                continue
            signal = record_signal(rec, stats)
            if signal is None or not (is_number(signal.ratio) and signal.ratio > 0.0):
                continue
            measured = math.log(rec["ppl"])
            predicted = math.log(ppl0) / signal.ratio  # ln of ppl_from_entropy_ratio, without overflow
            out.setdefault(estimator, []).append(
                EntropyPrediction(
                    sparsity=float(rec.get("sparsity", rec["effective_sparsity"])),
                    effective_sparsity=float(rec["effective_sparsity"]),
                    ratio=float(signal.ratio),
                    ln_ppl_measured=measured,
                    ln_ppl_predicted=predicted,
                    abs_error=abs(predicted - measured),
                    rel_error=abs(predicted - measured) / measured,
                    layers=signal.layers,
                    excluded=signal.excluded,
                )
            )
    return out
