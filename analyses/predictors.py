"""Three predictors of ln PPL(s) of a sliced model, each scored against the sweep's measured points.

- `law`: Prop. 2, y = ln PPL0 / ln PPL = a s + b, fitted on the dense model and a few sparsities (by default
  the three smallest > 0, two when the sweep has three) and used at the others, with 95% prediction
  intervals (`analyses.laws.predict`);
- `internals`: ln PPL = ln PPL0 / (H'/H), the ratio measured on the sliced model's own residual stream
  (`analyses.laws.entropy_predictions`);
- `dense`: the same formula with H'/H read off the dense model alone, before any slicing: the sweep stores
  every layer's covariance spectrum of the dense stream (`analyses.entropy.StreamSpectra`, in the unit the
  entropy ratios use), and what width d' keeps is the entropy (or effective rank) of its top d' eigenvalues,
  the directions PCA slicing keeps (`analyses.entropy.kept_ratio`), averaged over the same layers as the
  internals signal (`analyses.entropy.ratio_signal`: the sliced ones whose H and H' share a sign).

`dense` equals `internals` exactly when the sliced stream is the dense one projected onto its top-d'
principal directions. On a real model they differ because SliceGPT's directions are those of the
calibration data's uncentred second moment, not the probe's covariance; because every later block computes
from the already sliced stream; and, on the normalised stream, because a sliced token is renormalised over
the d' channels it keeps.

Errors are signed relative errors, (predicted - measured) / measured, of PPL and of ln PPL at each point
with a measured perplexity, and the mean of their absolute values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from analyses.entropy import (
    BIASED_IN_D,
    RANK,
    RATIO_ESTIMATORS,
    REL_EIG_FLOOR,
    STREAMS,
    RatioSignal,
    StreamSpectra,
    finite_or_none,
    kept_ratio,
    ratio_signal,
    stream_spectra,
)
from analyses.laws import entropy_predictions, fit_results, predict
from analyses.layer_entropy import residual_samples
from analyses.results import (
    DENSE_TOLERANCE,
    PPL,
    RESULTS_FILE,
    check_same_model,
    dense_record,
    model_fingerprint,
    results_dtype,
)
from analyses.sweep import PREDATING, STREAM_SPECTRA, SweepSettings, probe_windows
from mechslice.errors import MechsliceError
from mechslice.loaded import LoadedModel
from mechslice.slicing import sliced_width
from mechslice.slicing.slicer import head_width

METHODS = ("law", "internals", "dense")
SPECTRUM_ESTIMATORS = ("gaussian", RANK)  # what the dense predictor can read off a spectrum
ESTIMATORS = (*RATIO_ESTIMATORS, RANK)  # the internals predictor also has the marginal sum
DEFAULT_ESTIMATOR = "gaussian"
FIT_ON = 3  # sparsities > 0 the law is fitted on by default (the smallest), beside the dense model
SAME_SPARSITY = 1e-9  # nominal sparsities closer than this are the same sweep point


@dataclass(frozen=True)
class PointPrediction:
    """ln PPL predicted at one sparsity, the measured one where the sweep evaluated it, and the errors.

    `ln_ppl` is None when the prediction is unbounded (the law's y <= 0, a ratio <= 0); an interval bound
    is None where it is unbounded. `detail` holds what the method computed on the way (y, the ratio and
    its layers, ...).
    """

    sparsity: float  # nominal
    effective_sparsity: float
    d_prime: int
    ln_ppl: float | None
    ln_ppl_measured: float | None = None
    ln_ppl_interval: tuple[float | None, float | None] | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def ppl(self) -> float:
        """exp(ln PPL); inf when unbounded or beyond float range."""
        return _exp(self.ln_ppl)

    @property
    def rel_error_ln_ppl(self) -> float | None:
        """(predicted - measured) / measured ln PPL; None without a measurement, inf when unbounded."""
        if self.ln_ppl_measured is None:
            return None
        if self.ln_ppl is None:
            return math.inf
        return (self.ln_ppl - self.ln_ppl_measured) / self.ln_ppl_measured

    @property
    def rel_error_ppl(self) -> float | None:
        """PPL predicted / measured - 1 (from the ln difference, without overflow where it can be avoided)."""
        if self.ln_ppl_measured is None:
            return None
        if self.ln_ppl is None:
            return math.inf
        diff = self.ln_ppl - self.ln_ppl_measured
        return math.expm1(diff) if diff < 700.0 else math.inf

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, with PPL, its interval and both errors beside ln PPL (None for inf)."""
        interval = self.ln_ppl_interval
        return finite_or_none(
            {
                **asdict(self),
                "ln_ppl_interval": None if interval is None else list(interval),
                "ppl": self.ppl,
                "ppl_interval": None if interval is None else [_exp(v) for v in interval],
                "ppl_measured": None if self.ln_ppl_measured is None else math.exp(self.ln_ppl_measured),
                "rel_error_ppl": self.rel_error_ppl,
                "rel_error_ln_ppl": self.rel_error_ln_ppl,
            }
        )


def _exp(ln: float | None) -> float:
    if ln is None:
        return math.inf
    try:
        return math.exp(ln)
    except OverflowError:
        return math.inf


@dataclass(frozen=True)
class Prediction:
    """One method's predictions over a set of sparsities, with its mean absolute relative errors."""

    method: str
    estimator: str | None  # the entropy estimator (internals, dense); None for the law
    ppl0: float
    dtype: str  # what the sweep's models computed in
    points: list[PointPrediction]
    fit_on: list[float] = field(default_factory=list)  # law: the nominal sparsities > 0 it was fitted on
    notes: list[str] = field(default_factory=list)

    def measured(self) -> list[PointPrediction]:
        """The points with a measured perplexity, those the errors are taken over."""
        return [p for p in self.points if p.ln_ppl_measured is not None]

    def mean_abs_errors(self) -> dict[str, float | None]:
        """Mean |relative error| of PPL and of ln PPL over the measured points (None when there are none)."""
        ppl = [abs(e) for p in self.points if (e := p.rel_error_ppl) is not None]
        ln_ppl = [abs(e) for p in self.points if (e := p.rel_error_ln_ppl) is not None]
        return {
            "ppl": float(np.mean(ppl)) if ppl else None,
            "ln_ppl": float(np.mean(ln_ppl)) if ln_ppl else None,
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the method, every point, and the mean absolute errors over the measured ones."""
        return finite_or_none(
            {
                "method": self.method,
                "estimator": self.estimator,
                "ppl0": self.ppl0,
                "dtype": self.dtype,
                "fit_on": self.fit_on,
                "points": [p.to_dict() for p in self.points],
                "n_measured": len(self.measured()),
                "mean_abs_rel_error": self.mean_abs_errors(),
                "notes": self.notes,
            }
        )


# ---------------------------------------------------------------- shared helpers


def _ppl0(results: dict[str, Any]) -> float:
    """The dense perplexity every predictor divides by; MechsliceError when the sweep did not measure it."""
    ppl0 = dense_record(results).get("ppl")
    if ppl0 is None or ppl0 <= 1.0:
        raise MechsliceError(
            f"the dense record has perplexity {ppl0!r}; every predictor needs PPL0 > 1: sweep with the ppl task"
        )
    return float(ppl0)


def _sliced_records(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Records with s > 0 and a perplexity the law is defined at (PPL > 1), by effective sparsity."""
    recs = [
        r
        for r in results["records"]
        if r["effective_sparsity"] >= DENSE_TOLERANCE and r.get("ppl") is not None and r["ppl"] > 1.0
    ]
    return sorted(recs, key=lambda r: r["effective_sparsity"])


def _nominal(rec: dict[str, Any]) -> float:
    """A record's nominal sparsity (the one the sweep was asked for), its effective one in older files."""
    return float(rec.get("sparsity", rec["effective_sparsity"]))


def _record_at(records: Sequence[dict[str, Any]], s: float) -> dict[str, Any] | None:
    """The record at nominal sparsity s, if the sweep has one."""
    return next((r for r in records if abs(_nominal(r) - s) < SAME_SPARSITY), None)


def _measured(results: dict[str, Any], s: float) -> float | None:
    """ln PPL the sweep measured at nominal sparsity s, None where it has no such point."""
    rec = _record_at(_sliced_records(results), s)
    return None if rec is None else math.log(rec["ppl"])


def _setting(results: dict[str, Any], key: str) -> Any:
    """A sweep setting as results.json records it; what the code did before the setting existed if absent."""
    settings = results.get("settings", {})
    if key in settings:
        return settings[key]
    return PREDATING.get(key, getattr(SweepSettings(), key))


def _width(results: dict[str, Any], d: int, s: float) -> int:
    """d' at sparsity s, rounded as the sweep rounded it."""
    return sliced_width(d, s, int(_setting(results, "round_to")))


def _at_list(at: Sequence[float] | None) -> list[float] | None:
    """The sparsities asked for, refused outside (0, 1): the dense point needs no prediction."""
    if at is None:
        return None
    out = [float(s) for s in at]
    bad = [s for s in out if not (math.isfinite(s) and 0.0 < s < 1.0)]
    if bad:
        raise MechsliceError(f"sparsity {bad[0]!r} is outside (0, 1); pass e.g. --sparsity 0.25")
    return out


def _check_estimator(estimator: str, allowed: Sequence[str], method: str) -> str:
    """`estimator`, when `method` has it."""
    if estimator not in allowed:
        raise MechsliceError(
            f"--method {method} has no estimator {estimator!r}; choose one of {', '.join(allowed)}"
        )
    return estimator


# ---------------------------------------------------------------- law


def _default_fit_on(records: Sequence[dict[str, Any]]) -> list[float]:
    """The FIT_ON smallest sparsities, fewer so that one is held back, never under the two a fit needs."""
    k = max(2, min(FIT_ON, len(records) - 1))
    return [_nominal(r) for r in records[:k]]


def _fit_records(records: Sequence[dict[str, Any]], fit_on: Sequence[float]) -> list[dict[str, Any]]:
    """The records at the `fit_on` sparsities; MechsliceError naming the sweep's own for one it lacks."""
    chosen = []
    for s in fit_on:
        rec = _record_at(records, float(s))
        if rec is None:
            have = ", ".join(f"{_nominal(r):g}" for r in records) or "none"
            raise MechsliceError(
                f"--fit-on {s:g} is not a sparsity > 0 with a perplexity in the sweep (it has: {have})"
            )
        if rec not in chosen:
            chosen.append(rec)
    return chosen


def _ln_interval(
    ln_ppl0: float, y_interval: Sequence[float] | None
) -> tuple[float | None, float | None] | None:
    """ln PPL = ln PPL0 / y over y's interval: its low end gives the high ln PPL (None where y <= 0)."""
    if y_interval is None:
        return None
    lo, hi = y_interval
    return (ln_ppl0 / hi if hi > 0.0 else None, ln_ppl0 / lo if lo > 0.0 else None)


def law_prediction(
    results: dict[str, Any], fit_on: Sequence[float] | None = None, at: Sequence[float] | None = None
) -> Prediction:
    """Prop. 2 fitted on the dense model and `fit_on` (nominal sparsities; default: the smallest, see FIT_ON),
    predicting ln PPL at `at` (default: every other evaluated sparsity, the held-back points).

    Reuses the law fit of `fit` and the intervals of `predict` (the paper's unconstrained line, with the line
    through the dense point under detail["anchored"]). MechsliceError when the law cannot be fitted.
    """
    ppl0 = _ppl0(results)
    records = _sliced_records(results)
    chosen = _fit_records(records, _default_fit_on(records) if fit_on is None else fit_on)
    # Only the perplexity law: the tasks are no part of this predictor.
    subset = {**results, "records": [{**r, "tasks": {}} for r in [dense_record(results), *chosen]]}
    table = fit_results(subset)
    if not any(r.dataset == PPL for r in table.rows):
        raise MechsliceError(f"the law cannot be fitted on these sparsities: {table.skipped.get(PPL, '')}")
    fitted = {id(r) for r in chosen}
    targets = _at_list(at)
    if targets is None:
        targets = [_nominal(r) for r in records if id(r) not in fitted]
    d = int(dense_record(results)["d"])
    ln0 = math.log(ppl0)
    points = []
    for s in targets:
        rec = _record_at(records, s)
        d_prime = int(rec["d_prime"]) if rec is not None else _width(results, d, s)
        s_eff = float(rec["effective_sparsity"]) if rec is not None else 1.0 - d_prime / d
        entry = predict(table, s_eff, ppl0, {})["ppl"]
        y = entry["y"]
        points.append(
            PointPrediction(
                sparsity=s,
                effective_sparsity=s_eff,
                d_prime=d_prime,
                ln_ppl=_ln_or_none(ln0, y),
                ln_ppl_measured=None if rec is None else math.log(rec["ppl"]),
                ln_ppl_interval=_ln_interval(ln0, entry["y_interval"]),
                detail={
                    "y": y,
                    "y_interval": entry["y_interval"],
                    "extrapolated": entry["extrapolated"],
                    "anchored_ln_ppl": _ln_or_none(ln0, entry["anchored"]["y"]),
                    "anchored_ln_ppl_interval": _ln_interval(ln0, entry["anchored"]["y_interval"]),
                    "paper_law_ln_ppl": ln0 / (1.0 - s_eff),
                },
            )
        )
    row = table.row(PPL)
    fitted_on = [_nominal(r) for r in chosen]
    note = (
        f"law y = ln PPL0 / ln PPL = a s + b fitted on the dense model and s = {', '.join(f'{s:g}' for s in fitted_on)} "
        f"(a = {row.fit.a:.4g}, b = {row.fit.b:.4g}, {row.fit.dof} residual dof); "
        f"{row.fit.level:.0%} prediction intervals"
    )
    return Prediction("law", None, ppl0, results_dtype(results), points, fitted_on, [note])


def _ln_or_none(ln0: float, y: float) -> float | None:
    """ln PPL = ln PPL0 / y, None (unbounded) where y <= 0."""
    return ln0 / y if y > 0.0 else None


# ---------------------------------------------------------------- internals


def internals_prediction(
    results: dict[str, Any], estimator: str = DEFAULT_ESTIMATOR, at: Sequence[float] | None = None
) -> Prediction:
    """ln PPL0 / (H'/H) with the ratio each sliced record measured (`analyses.laws.entropy_predictions`), at
    `at` (default: every evaluated sparsity > 0 with an entropy). MechsliceError when none has one."""
    estimator = _check_estimator(estimator, (*ESTIMATORS, *BIASED_IN_D), "internals")
    ppl0 = _ppl0(results)
    preds = entropy_predictions(results, include_knn=estimator in BIASED_IN_D).get(estimator, [])
    preds = [p for p in preds if p.effective_sparsity >= DENSE_TOLERANCE]
    targets = _at_list(at)
    if targets is not None:
        preds = [p for p in preds if any(abs(p.sparsity - s) < SAME_SPARSITY for s in targets)]
    if not preds:
        where = "" if targets is None else f" at s = {', '.join(f'{s:g}' for s in targets)}"
        raise MechsliceError(
            f"no sliced record{where} has a {estimator} entropy ratio and a perplexity: the internals predictor "
            "needs the sliced model's stream; sweep that sparsity, or use --method dense or law"
        )
    records = results["records"]
    points = [
        PointPrediction(
            sparsity=p.sparsity,
            effective_sparsity=p.effective_sparsity,
            d_prime=round((1.0 - p.effective_sparsity) * dense_record(results)["d"]),  # s_eff = 1 - d'/d
            ln_ppl=p.ln_ppl_predicted,
            ln_ppl_measured=p.ln_ppl_measured,
            detail={"ratio": p.ratio, "layers": p.layers, "excluded": p.excluded},
        )
        for p in preds
    ]
    stream = next((r["entropy"].get("stream") for r in records if r.get("entropy")), None)
    note = f"ln PPL = ln PPL0 / (H'/H), H'/H the sliced model's {estimator} ratio on the {stream or 'raw'} stream"
    return Prediction("internals", estimator, ppl0, results_dtype(results), points, notes=[note])


# ---------------------------------------------------------------- dense


def read_stream_spectra(results: dict[str, Any], where: str | Path = RESULTS_FILE) -> StreamSpectra:
    """The dense record's `StreamSpectra`; MechsliceError (one line) when the sweep predates them or they are
    malformed."""
    raw = dense_record(results).get(STREAM_SPECTRA)
    if raw is None:
        raise MechsliceError(
            f"no dense spectra in {where}: rerun the sweep into a new folder (mechslice sweep --out NEW) to "
            "record them, or pass --model with the sweep's model to measure them in one pass"
        )
    try:
        spectra = StreamSpectra(**raw)
        ok = (
            spectra.stream in STREAMS
            and spectra.d >= 1
            and len(spectra.eigenvalues) >= 1
            and all(len(lam) == spectra.d for lam in spectra.eigenvalues)
            and all(math.isfinite(v) for lam in spectra.eigenvalues for v in lam)
        )
    except TypeError:
        ok = False
    if not ok:
        raise MechsliceError(
            f"the dense spectra in {where} are malformed (want stream, d, tokens and d eigenvalues per layer); "
            "rerun the sweep into a new folder"
        )
    return spectra


def measure_stream_spectra(lm: LoadedModel, results: dict[str, Any]) -> StreamSpectra:
    """The dense record's spectra measured anew, for results that predate them: `lm`, checked to be the sweep's
    model, traced once on the sweep's probe windows and measured in its entropy stream's unit."""
    check_same_model(results, lm.name, model_fingerprint(lm))
    windows = probe_windows(
        lm,
        _setting(results, "ppl_corpus"),
        _setting(results, "probe_seqlen"),
        _setting(results, "probe_tokens"),
    )
    return stream_spectra(residual_samples(lm, windows, windows.numel()), _setting(results, "entropy_stream"))


def dense_signal(
    spectra: StreamSpectra, widths: Sequence[int], estimator: str = DEFAULT_ESTIMATOR
) -> RatioSignal:
    """`ratio_signal` of the ratios `kept_ratio` reads off each layer's spectrum at that layer's width: the
    internals signal's rule (sliced layers whose H and H' share a sign), with no sliced model."""
    if len(widths) != len(spectra.eigenvalues):
        raise MechsliceError(f"{len(widths)} widths for {len(spectra.eigenvalues)} layers of spectra")
    kept = [
        kept_ratio(np.asarray(lam), k, estimator, REL_EIG_FLOOR)
        for lam, k in zip(spectra.eigenvalues, widths, strict=True)
    ]
    names = [str(i) for i in range(len(widths))]
    same = None if estimator == RANK else [r.same_sign for r in kept]
    return ratio_signal(names, [r.ratio for r in kept], same, [k < spectra.d for k in widths])


def layer_widths(results: dict[str, Any], spectra: StreamSpectra, d_prime: int) -> list[int]:
    """Width of each block output at d': d' everywhere but the last block when the head is left unsliced."""
    last = head_width(spectra.d, d_prime, bool(_setting(results, "slice_head")))
    return [d_prime] * (len(spectra.eigenvalues) - 1) + [last]


def _sweep_sparsities(results: dict[str, Any]) -> list[float]:
    """Every nominal sparsity > 0 the sweep was asked for or recorded."""
    asked = results.get("settings", {}).get("sparsities", [])
    have = [_nominal(r) for r in results["records"]]
    out: list[float] = []
    for s in sorted({float(s) for s in [*asked, *have]}):
        if s > 0.0 and not any(abs(s - o) < SAME_SPARSITY for o in out):
            out.append(s)
    return out


def dense_prediction(
    results: dict[str, Any],
    estimator: str = DEFAULT_ESTIMATOR,
    at: Sequence[float] | None = None,
    spectra: StreamSpectra | None = None,
    where: str | Path = RESULTS_FILE,
) -> Prediction:
    """ln PPL0 / (H'/H) with H'/H read off the dense stream's spectra (`spectra`, default the dense record's)
    at each s of `at` (default: every sparsity of the sweep), d' = `sliced_width` with the sweep's rounding."""
    estimator = _check_estimator(estimator, SPECTRUM_ESTIMATORS, "dense")
    ppl0 = _ppl0(results)
    spectra = read_stream_spectra(results, where) if spectra is None else spectra
    targets = _at_list(at)
    targets = _sweep_sparsities(results) if targets is None else targets
    ln0 = math.log(ppl0)
    points = []
    for s in targets:
        d_prime = _width(results, spectra.d, s)
        signal = dense_signal(spectra, layer_widths(results, spectra, d_prime), estimator)
        ratio = signal.ratio
        points.append(
            PointPrediction(
                sparsity=s,
                effective_sparsity=1.0 - d_prime / spectra.d,
                d_prime=d_prime,
                ln_ppl=ln0 / ratio if ratio is not None and ratio > 0.0 else None,
                ln_ppl_measured=_measured(results, s),
                detail={"ratio": ratio, "layers": signal.layers, "excluded": signal.excluded},
            )
        )
    note = (
        f"ln PPL = ln PPL0 / (H'/H), H'/H the {estimator} ratio of the top d' eigenvalues of the dense "
        f"{spectra.stream} stream's covariance ({spectra.tokens} tokens), no sliced model"
    )
    return Prediction("dense", estimator, ppl0, results_dtype(results), points, notes=[note])


# ---------------------------------------------------------------- all three on the same points


@dataclass(frozen=True)
class Comparison:
    """The three predictors on the law's held-back sparsities; `missing` says why a method has no numbers."""

    held_back: list[float]
    predictions: dict[str, Prediction]
    missing: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "held_back": self.held_back,
            "predictions": {k: p.to_dict() for k, p in self.predictions.items()},
            "missing": self.missing,
        }


def compare_predictors(
    results: dict[str, Any], fit_on: Sequence[float] | None = None, estimator: str = DEFAULT_ESTIMATOR
) -> Comparison:
    """`law`, `internals` and `dense` on the same points: the evaluated sparsities the law was not fitted on.

    A method that cannot run on these results (e.g. no dense spectra) is in `missing` with its one-line
    reason; the law itself failing is an error (there are then no held-back points to compare on).
    """
    law = law_prediction(results, fit_on)
    held = [p.sparsity for p in law.points]
    predictions, missing = {"law": law}, {}
    if not held:
        return Comparison(held, predictions, {m: "no held-back sparsity to compare on" for m in METHODS[1:]})
    for method, run in (("internals", internals_prediction), ("dense", dense_prediction)):
        try:
            predictions[method] = run(results, estimator, held)
        except MechsliceError as err:
            missing[method] = str(err)
    return Comparison(held, predictions, missing)
