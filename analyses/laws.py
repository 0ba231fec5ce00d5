"""The paper's two laws, fitted on a sweep's results and used to predict a pruned model without evaluating it.

Proposition 2: y = ln PPL0 / ln PPL, which the paper says equals 1 - s (a = -1, b = 1).
Proposition 3: y = ln(acc / acc0), per multiple-choice task, proportional to 1 - s.
Both are fitted as y = a*s + b against the EFFECTIVE sparsity s = 1 - d'/d, with the dense model included as
the point s = 0 (y = 1, resp. 0), as in the paper's Fig. 3; the paper's Table 3 is kept here for comparison.
Input is `DIR/results.json` as written by the sweep; output `DIR/fits.json` and `DIR/fits.csv`.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from analyses.fits import LineFit, fit_line
from mechslice import distributed
from mechslice.errors import MechsliceError

RESULTS_FILE = "results.json"
FITS_JSON = "fits.json"
FITS_CSV = "fits.csv"
PPL = "ppl"
ACC_KEYS = ("acc", "acc_norm")
DENSE_TOLERANCE = 1e-12  # effective sparsity below this is the dense model (it is 1 - d/d = 0 exactly)
DENSE_NOTE = (
    "s is the effective sparsity 1 - d'/d; each fit includes the dense model as the point s=0 "
    "(y=1 for perplexity, y=0 for accuracy), as in the paper's Fig. 3"
)
LAWS = {"perplexity": "y = ln PPL0 / ln PPL (Prop. 2)", "accuracy": "y = ln(acc / acc0) (Prop. 3)"}


@dataclass(frozen=True)
class PaperFit:
    """One cell group of the paper's Table 3: the fitted a, b and the RMSE of the fit."""

    a: float
    b: float
    rmse: float


# Table 3 of the paper (Appendix A.2), keyed by our task names; the columns of fits.csv use the slugs.
PAPER_MODELS = {"Llama-3-8B-Instruct": "llama3_8b", "Phi-3-mini-4k-Instruct": "phi3_mini"}
PAPER_DATASETS = {
    PPL: "WikiText2",
    "arc_easy": "ARC-e",
    "arc_challenge": "ARC-c",
    "winogrande": "WinoGrande",
    "piqa": "PIQA",
}
PAPER_TABLE3: dict[str, dict[str, PaperFit]] = {
    PPL: {
        "Llama-3-8B-Instruct": PaperFit(-1.08, 0.96, 0.03),
        "Phi-3-mini-4k-Instruct": PaperFit(-0.90, 1.02, 0.01),
    },
    "arc_easy": {
        "Llama-3-8B-Instruct": PaperFit(-2.14, 0.04, 0.05),
        "Phi-3-mini-4k-Instruct": PaperFit(-1.84, 0.04, 0.04),
    },
    "arc_challenge": {
        "Llama-3-8B-Instruct": PaperFit(-2.02, -0.07, 0.09),
        "Phi-3-mini-4k-Instruct": PaperFit(-1.88, -0.01, 0.02),
    },
    "winogrande": {
        "Llama-3-8B-Instruct": PaperFit(-0.86, -0.02, 0.02),
        "Phi-3-mini-4k-Instruct": PaperFit(-0.66, -0.02, 0.02),
    },
    "piqa": {
        "Llama-3-8B-Instruct": PaperFit(-0.91, -0.01, 0.03),
        "Phi-3-mini-4k-Instruct": PaperFit(-0.90, 0.01, 0.01),
    },
}


# ---------------------------------------------------------------- reading and checking results.json


def _is_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def validate_results(results: object, where: str = RESULTS_FILE) -> dict[str, Any]:
    """Check the structure of a sweep's results (model, records with effective sparsity, ppl, tasks)."""
    fix = "rerun the sweep into a fresh folder"
    if not isinstance(results, dict) or not isinstance(results.get("model"), str):
        raise MechsliceError(f"{where} is not a sweep result (no 'model' name); {fix}")
    records = results.get("records")
    if not isinstance(records, list) or not records:
        raise MechsliceError(f"{where} has no 'records' list or it is empty; {fix}")
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise MechsliceError(f"{where}: record {i} is not an object; {fix}")
        s = rec.get("effective_sparsity")
        if not _is_number(s) or not 0.0 <= s < 1.0:
            raise MechsliceError(
                f"{where}: record {i} has effective_sparsity {s!r}, not a number in [0, 1); {fix}"
            )
        if rec.get("ppl") is not None and not _is_number(rec["ppl"]):
            raise MechsliceError(f"{where}: record {i} has ppl {rec['ppl']!r}, not a number or null; {fix}")
        tasks = rec.get("tasks", {})
        if not isinstance(tasks, dict) or not all(isinstance(v, dict) for v in tasks.values()):
            raise MechsliceError(f"{where}: record {i} has 'tasks' that is not an object of objects; {fix}")
        for task, metrics in tasks.items():
            bad = [k for k in ACC_KEYS if k in metrics and not _is_number(metrics[k])]
            if bad:
                raise MechsliceError(f"{where}: record {i} task {task} has a non-number {bad[0]}; {fix}")
    dense = [rec for rec in records if rec["effective_sparsity"] < DENSE_TOLERANCE]
    if len(dense) != 1:
        raise MechsliceError(
            f"{where} has {len(dense)} dense records (effective_sparsity 0), needs one for PPL0 and acc0; "
            "rerun the sweep including sparsity 0"
        )
    return results


def load_results(directory: str | Path) -> dict[str, Any]:
    """Read and validate `directory/results.json`; a clear error for a missing folder or file, or bad JSON."""
    folder = Path(directory)
    if not folder.is_dir():
        raise MechsliceError(f"results folder {folder} does not exist; pass the --out folder of a sweep")
    path = folder / RESULTS_FILE
    if not path.is_file():
        raise MechsliceError(f"{path} not found; run `mechslice sweep --out {folder}` first")
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MechsliceError(
            f"{path} is not valid JSON ({err}); rerun the sweep or restore the file"
        ) from err
    return validate_results(results, where=str(path))


def results_dtype(results: dict[str, Any]) -> str:
    """The dtype a sweep's numbers were computed in; sweeps from before the dtype setting ran in float32."""
    return results.get("settings", {}).get("dtype", "float32")


def check_same_model(results: dict[str, Any], model_name: str, fingerprint: str) -> None:
    """Refuse results made by another model than `model_name` / `fingerprint` (e.g. when resuming a sweep)."""
    theirs, their_print = results.get("model"), results.get("model_fingerprint")
    if theirs != model_name or their_print != fingerprint:
        raise MechsliceError(
            f"these results were made with model {theirs!r} (fingerprint {their_print!r}), "
            f"not {model_name!r} "
            f"(fingerprint {fingerprint!r}); use a new output folder or the same model"
        )


def dense_record(results: dict[str, Any]) -> dict[str, Any]:
    """The record of the unpruned model (effective sparsity 0): it carries PPL0 and acc0."""
    return next(rec for rec in results["records"] if rec["effective_sparsity"] < DENSE_TOLERANCE)


def _check_acc_key(acc_key: str) -> None:
    if acc_key not in ACC_KEYS:
        raise MechsliceError(f"accuracy key {acc_key!r} is not one of {', '.join(ACC_KEYS)}")


# ---------------------------------------------------------------- fitting


@dataclass(frozen=True)
class LawPoints:
    """The (s, y) points of one law on one dataset; `excluded` are sparsities whose y is undefined."""

    s: np.ndarray
    y: np.ndarray
    excluded: list[float]


def law_points(results: dict[str, Any], dataset: str, acc_key: str = "acc") -> LawPoints:
    """(s, y) of `dataset` (`ppl` or a task): y = ln PPL0/ln PPL or ln(acc/acc0), dense point included.

    Records without the metric are left out; records where the law is undefined (PPL <= 1, acc == 0) are
    listed in `excluded`. Raises MechsliceError when the dense record lacks the metric.
    """

    def value(rec: dict[str, Any]) -> float | None:
        if dataset == PPL:
            return rec.get("ppl")
        return rec.get("tasks", {}).get(dataset, {}).get(acc_key)

    def defined(v: float) -> bool:  # ln PPL must be > 0 to divide by; ln(acc) needs acc > 0
        return v > 1.0 if dataset == PPL else v > 0.0

    dense = dense_record(results)
    base = value(dense)
    if base is None:
        raise MechsliceError(
            f"the dense record has no {dataset if dataset == PPL else dataset + ' ' + acc_key}"
        )
    if not defined(base):
        raise MechsliceError(f"the dense model's {dataset} value {base} leaves the law undefined")
    s, y, excluded = [], [], []
    for rec in results["records"]:
        v = value(rec)
        if v is None:
            continue
        if rec is dense:
            s.append(0.0)
            y.append(1.0 if dataset == PPL else 0.0)
        elif not defined(v):
            excluded.append(float(rec["effective_sparsity"]))
        else:
            s.append(float(rec["effective_sparsity"]))
            y.append(math.log(base) / math.log(v) if dataset == PPL else math.log(v / base))
    return LawPoints(np.asarray(s, dtype=np.float64), np.asarray(y, dtype=np.float64), excluded)


@dataclass(frozen=True)
class FitRow:
    """One row of the Table 3 analogue: the fitted law on one dataset, with the paper's values beside it."""

    metric: str  # "perplexity" or "accuracy"
    dataset: str  # "ppl" or our task name
    fit: LineFit
    points: LawPoints
    literal_rmse: float | None  # perplexity only: RMSE of the paper's literal line y = 1 - s on our points
    paper: dict[str, PaperFit] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the fit, the points, and the paper's a, b, RMSE per paper model."""
        return {
            "metric": self.metric,
            "dataset": self.dataset,
            "paper_dataset": PAPER_DATASETS.get(self.dataset),
            "law": LAWS[self.metric],
            **self.fit.to_dict(),
            "literal_rmse": self.literal_rmse,
            "points": [[float(s), float(y)] for s, y in zip(self.points.s, self.points.y, strict=True)],
            "excluded_sparsities": self.points.excluded,
            "paper": {name: vars(p) for name, p in self.paper.items()},
        }


@dataclass(frozen=True)
class FitTable:
    """All law fits of one sweep: a row per dataset, the dense values, and what could not be fitted (why)."""

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


def fit_results(results: dict[str, Any], acc_key: str = "acc") -> FitTable:
    """Fit Prop. 2 on perplexity and Prop. 3 on every task's `acc_key` accuracy against effective sparsity.

    A dataset with under two sparsities (dense included) is listed in `skipped`; MechsliceError if none fits.
    """
    _check_acc_key(acc_key)
    validate_results(results)
    rows, skipped = [], {}
    for dataset in _datasets(results):
        metric = "perplexity" if dataset == PPL else "accuracy"
        try:
            points = law_points(results, dataset, acc_key)
            if len(np.unique(points.s)) < 2:
                raise MechsliceError("only one sparsity has a value; a line needs two")
        except MechsliceError as err:
            skipped[dataset] = str(err)
            continue
        fit = fit_line(points.s, points.y)
        literal = None
        if dataset == PPL:
            literal = float(np.sqrt(np.mean((points.y - (1.0 - points.s)) ** 2)))
        rows.append(FitRow(metric, dataset, fit, points, literal, PAPER_TABLE3.get(dataset, {})))
    if not rows:
        reasons = "; ".join(f"{k}: {v}" for k, v in skipped.items())
        raise MechsliceError(
            f"nothing to fit: fewer than two sparsities with a metric ({reasons}); "
            "sweep at least one sparsity > 0"
        )
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


def _atomic_write(path: Path, text: str) -> None:
    """Write `text` to a temp file in the same folder, then os.replace onto `path`: no half-written file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def csv_columns() -> list[str]:
    """Columns of fits.csv: Table 3's layout with our statistics, then the paper's a, b, RMSE per model."""
    ours = ["metric", "dataset", "paper_dataset", "acc_key", "a", "b", "rmse", "r2", "a_ci_low", "a_ci_high"]
    ours += ["b_ci_low", "b_ci_high", "loo_rmse", "loo_max_abs", "n_points", "dense_point_included"]
    return ours + [f"paper_{slug}_{k}" for slug in PAPER_MODELS.values() for k in ("a", "b", "rmse")]


def _csv_row(row: FitRow, acc_key: str) -> dict[str, object]:
    f = row.fit
    out: dict[str, object] = {
        "metric": row.metric,
        "dataset": row.dataset,
        "paper_dataset": PAPER_DATASETS.get(row.dataset, ""),
        "acc_key": acc_key if row.metric == "accuracy" else "",
        "a": f.a,
        "b": f.b,
        "rmse": f.rmse,
        "r2": f.r2,
        "a_ci_low": None if f.a_ci is None else f.a_ci[0],
        "a_ci_high": None if f.a_ci is None else f.a_ci[1],
        "b_ci_low": None if f.b_ci is None else f.b_ci[0],
        "b_ci_high": None if f.b_ci is None else f.b_ci[1],
        "loo_rmse": f.loo_rmse,
        "loo_max_abs": f.loo_max_abs,
        "n_points": f.n,
        "dense_point_included": "yes",
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

    def write() -> None:
        _atomic_write(json_path, json.dumps(table.to_dict(), indent=2, allow_nan=False) + "\n")
        _atomic_write(csv_path, buf.getvalue())

    distributed.on_main(write)  # under torchrun only rank 0 writes; the others wait for it
    return json_path, csv_path


# ---------------------------------------------------------------- prediction


def check_sparsity(sparsity: float) -> float:
    """A sparsity must lie in [0, 1): at s = 1 nothing of the residual stream is left."""
    if not (_is_number(sparsity) and 0.0 <= sparsity < 1.0):
        raise MechsliceError(f"sparsity {sparsity!r} is outside [0, 1); pass e.g. --sparsity 0.25")
    return float(sparsity)


def ppl_from_y(ppl0: float, y: float) -> float | None:
    """Invert y = ln PPL0 / ln PPL: PPL = exp(ln PPL0 / y); None (unbounded) when y <= 0 or it overflows."""
    if y <= 0.0:
        return None
    try:
        return math.exp(math.log(ppl0) / y)
    except OverflowError:
        return None


def acc_from_y(acc0: float, y: float) -> float:
    """Invert y = ln(acc / acc0): acc = acc0 * exp(y), capped at 1 (an accuracy cannot exceed it)."""
    return 1.0 if y >= -math.log(acc0) else acc0 * math.exp(y)


def ppl_from_entropy_ratio(ppl0: float, ratio: float) -> float:
    """Prop. 2 read literally with H'/H in place of 1 - s: PPL = exp(ln PPL0 / ratio) (inf on overflow)."""
    if not (_is_number(ratio) and ratio > 0.0):
        raise MechsliceError(f"entropy ratio {ratio!r} must be a positive number")
    if not (_is_number(ppl0) and ppl0 >= 1.0):
        raise MechsliceError(f"dense perplexity {ppl0!r} must be a number >= 1")
    ppl = ppl_from_y(ppl0, ratio)
    return math.inf if ppl is None else ppl


def predict(fits: FitTable, sparsity: float, ppl0: float | None, acc0s: dict[str, float]) -> dict[str, Any]:
    """Predicted perplexity and accuracies at an unseen `sparsity`, with 95% prediction intervals.

    The interval of y is mapped back through the law: PPL = exp(ln PPL0 / y) (an upper bound is None when
    the interval reaches y <= 0: unbounded), acc = acc0 * exp(y) capped at 1. `extrapolated` flags an s
    outside the fitted range. The paper's literal law PPL = exp(ln PPL0 / (1 - s)) is given beside the fit.
    """
    s = check_sparsity(sparsity)
    out: dict[str, Any] = {"sparsity": s, "acc_key": fits.acc_key, "level": None, "ppl": None, "tasks": {}}
    for row in fits.rows:
        y, y_int = row.fit.predict(s), row.fit.prediction_interval(s)
        out["level"] = row.fit.level
        entry: dict[str, Any] = {
            "y": y,
            "y_interval": None if y_int is None else list(y_int),
            "extrapolated": not row.fit.s_min <= s <= row.fit.s_max,
        }
        if row.dataset == PPL:
            if ppl0 is None:
                continue
            entry["predicted"] = ppl_from_y(ppl0, y)
            # y decreasing means perplexity increasing: the low end of y gives the high end of PPL.
            entry["interval"] = (
                None if y_int is None else [ppl_from_y(ppl0, y_int[1]), ppl_from_y(ppl0, y_int[0])]
            )
            entry["paper_law"] = ppl_from_y(ppl0, 1.0 - s)
            out["ppl"] = entry
        elif row.dataset in acc0s:
            acc0 = acc0s[row.dataset]
            entry["predicted"] = acc_from_y(acc0, y)
            entry["interval"] = None if y_int is None else [acc_from_y(acc0, v) for v in y_int]
            out["tasks"][row.dataset] = entry
    return out


@dataclass(frozen=True)
class EntropyPrediction:
    """ln PPL at one sparsity predicted from the residual-stream entropy ratio alone, and the measured one."""

    sparsity: float
    effective_sparsity: float
    ratio: float
    ln_ppl_measured: float
    ln_ppl_predicted: float
    abs_error: float  # |predicted - measured| in ln PPL
    rel_error: float  # abs_error / measured ln PPL


def entropy_predictions(results: dict[str, Any]) -> dict[str, list[EntropyPrediction]]:
    """Per entropy estimator and record with a measured ppl and `ratio_mean`: predicted vs measured ln PPL."""
    dense = dense_record(results)
    ppl0 = dense.get("ppl")
    if ppl0 is None or ppl0 <= 1.0:
        return {}
    out: dict[str, list[EntropyPrediction]] = {}
    for rec in results["records"]:
        if rec.get("ppl") is None or rec["ppl"] <= 1.0:
            continue
        for estimator, stats in (rec.get("entropy") or {}).items():
            ratio = stats.get("ratio_mean") if isinstance(stats, dict) else None
            if not (_is_number(ratio) and ratio > 0.0):
                continue
            measured = math.log(rec["ppl"])
            predicted = math.log(ppl0) / ratio  # ln of ppl_from_entropy_ratio, without overflow
            out.setdefault(estimator, []).append(
                EntropyPrediction(
                    sparsity=float(rec.get("sparsity", rec["effective_sparsity"])),
                    effective_sparsity=float(rec["effective_sparsity"]),
                    ratio=float(ratio),
                    ln_ppl_measured=measured,
                    ln_ppl_predicted=predicted,
                    abs_error=abs(predicted - measured),
                    rel_error=abs(predicted - measured) / measured,
                )
            )
    return out
