"""Does the representation dimension dominate? The paper's protocol along every structural pruning axis.

`run_methods` sweeps each method (slice: d, mlp: m, heads: KV groups, layers: blocks) into `DIR/<method>/`, an
ordinary sweep folder each (fit, report and predict read it as they read any sweep), at the own-axis sparsities
matched to common parameter sparsities (`mechslice.pruning.nearest_sparsity`), with the dense model evaluated
once and its record shared. `compare_methods` fits both laws per method twice, against parameter sparsity and
against the method's own sparsity, and says which axis costs most at an equal parameter budget.
"""

from __future__ import annotations

import csv
import io
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from analyses.fits import LineFit
from analyses.laws import FitRow, FitTable, fit_results
from analyses.paper import PAPER_TABLE3
from analyses.results import DENSE_TOLERANCE, PPL, RESULTS_FILE, dense_record, load_results, results_dtype
from analyses.sweep import (
    SweepSettings,
    check_against_model,
    check_settings,
    held_methods,
    matched_targets,
    run_sweep,
    start_results,
)
from mechslice import distributed
from mechslice.atomic import atomic_write_json, atomic_write_text
from mechslice.checks import check_output_dir, check_sparsity
from mechslice.errors import MechsliceError
from mechslice.loading import DEFAULT_MODEL, default_device, load_model
from mechslice.precision import resolve_dtype
from mechslice.pruning import METHODS

METHODS_FILE = "methods.json"
METHODS_CSV = "methods.csv"
# The two x axes a law is fitted against: the fraction of parameters removed, and of the method's own axis.
AXES = {"param": "parameter sparsity", "own": "own-axis sparsity"}
# The linear form "holds" where a fit's RMSE is within the largest perplexity RMSE of the paper's Table 3: the
# precision the paper itself reports the law at, not a threshold chosen on our data.
PAPER_PPL_RMSE = max(fit.rmse for fit in PAPER_TABLE3[PPL].values())


def check_methods(methods: Sequence[str]) -> tuple[str, ...]:
    """The method names, refused when empty, unknown or repeated."""
    if not methods:
        raise MechsliceError(f"no pruning method given; use e.g. --methods {','.join(METHODS)}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise MechsliceError(f"unknown pruning method(s) {unknown}; choose from {', '.join(METHODS)}")
    if len(set(methods)) != len(methods):
        raise MechsliceError(f"a method is named twice in {list(methods)}; name each once")
    return tuple(methods)


def method_settings(
    settings: SweepSettings,
    methods: Sequence[str],
    out_dir: Path,
    model: str,
    device: str | None,
    resume: bool,
) -> dict[str, SweepSettings]:
    """Each method's sweep settings; with parameter-sparsity targets, the own-axis sparsities matched to them.

    Everything is checked here, before any model is calibrated: a target no method can reach, a sparsity that
    removes every unit, `--keep-first/--keep-last` without `layers` among the methods, a folder of a single
    sweep, and every method folder a resumed run would continue (same settings, dtype and model).
    """
    methods = check_methods(methods)
    if (settings.keep_first or settings.keep_last) and "layers" not in methods:
        raise MechsliceError("--keep-first/--keep-last apply to the layers method, which is not in --methods")
    targets = settings.param_sparsities
    if targets is not None:
        for target in targets:
            check_sparsity(target, "parameter sparsities", "--param-sparsities 0.1,0.2,0.3")
        if not targets or list(targets) != sorted(set(targets)) or targets[0] <= 0.0:
            raise MechsliceError(
                f"parameter sparsities must be increasing, above 0 and without repeats, got {list(targets)}; "
                "e.g. --param-sparsities 0.1,0.2,0.3"
            )
    if (out_dir / RESULTS_FILE).is_file():
        raise MechsliceError(
            f"'{out_dir}' holds a single sweep ({RESULTS_FILE}); choose another --out for a methods sweep"
        )
    dtype, _ = resolve_dtype(settings.dtype, device or default_device())
    dense = load_model(model, device=device, dtype=dtype)
    out = {}
    for method in methods:
        own = replace(settings, method=method, keep_first=False, keep_last=False)
        if method == "layers":
            own = replace(own, keep_first=settings.keep_first, keep_last=settings.keep_last)
        if targets is not None:  # a target nearest to removing nothing is the dense model itself
            own = replace(own, sparsities=(0.0, *sorted(s for s in matched_targets(dense, own) if s > 0.0)))
        check_settings(own)
        check_against_model(dense, own)
        start_results(out_dir / method, own, dense, resume)
        out[method] = own
    return out


def run_methods(
    settings: SweepSettings,
    methods: Sequence[str],
    out_dir: Path,
    model: str = DEFAULT_MODEL,
    device: str | None = None,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, dict[str, Any]]:
    """Sweep every method into `out_dir/<method>/` (each resumable on its own) and return their results.

    The dense model is evaluated by the first method's sweep and its record copied into the others: the
    evaluation settings are the same by construction, so it would measure the same numbers again.
    """
    check_output_dir(out_dir, "--out")
    per_method = method_settings(settings, methods, out_dir, model, device, resume)
    results: dict[str, dict[str, Any]] = {}
    dense = None
    for method, own in per_method.items():
        log(f"method {method}: sparsities {', '.join(f'{s:.4f}' for s in own.sparsities)}")
        results[method] = run_sweep(own, out_dir / method, model, device, resume, progress, log, dense)
        if (
            dense is None
        ):  # the copies say which sweep measured the dense model (its seconds are that sweep's)
            dense = {**dense_record(results[method]), "measured_in": method}
    return results


def method_folders(out_dir: str | Path) -> dict[str, Path]:
    """The method sweeps under a methods folder (a subfolder per method holding results.json), in METHODS order."""
    folder = Path(out_dir)
    found = {m: folder / m for m in held_methods(folder)}
    if not found:
        raise MechsliceError(
            f"{folder} holds no method sweep (no <method>/{RESULTS_FILE}); run "
            f"`mechslice sweep --methods {','.join(METHODS)} --out {folder}` first"
        )
    return found


def is_methods_folder(out_dir: str | Path) -> bool:
    """True for the folder of a methods sweep (a subfolder per method), False for a single sweep."""
    folder = Path(out_dir)
    return not (folder / RESULTS_FILE).is_file() and bool(held_methods(folder))


def param_view(results: dict[str, Any], of: str) -> tuple[dict[str, Any], list[float]]:
    """The results with each record's effective sparsity replaced by its parameter sparsity (`of`), so that
    every law machinery reads parameter sparsity as its x; records that removed no parameters (a per-layer
    slice's shortcut matrices can outweigh what a small cut saves) are left out and their own sparsity
    returned."""
    records, left_out = [], []
    for rec in results["records"]:
        if rec["effective_sparsity"] < DENSE_TOLERANCE:
            records.append(rec)
            continue
        if "param_sparsity" not in rec:
            raise MechsliceError(
                f"the record at sparsity {rec['sparsity']} has no parameter sparsity (a sweep from before "
                "it was recorded); rerun the sweep"
            )
        x = rec["param_sparsity"][of]
        if x <= 0.0:
            left_out.append(rec["effective_sparsity"])
            continue
        records.append({**rec, "effective_sparsity": x})
    return {**results, "records": records}, left_out


@dataclass(frozen=True)
class MethodFits:
    """One method's laws against both axes (None with the reason where a law could not be fitted)."""

    method: str
    results: dict[str, Any]
    param_results: dict[str, Any]  # the same records with parameter sparsity as x (`param_view`)
    fits: dict[str, FitTable | None]  # by AXES key
    errors: dict[str, str]
    left_out: list[float]  # own sparsities that removed no parameters (not on the parameter axis)
    unreached: list[float]  # parameter targets whose nearest pruned model was the dense one
    missing: list[float]  # own sparsities of the settings not measured yet (an unfinished sweep)


@dataclass(frozen=True)
class Comparison:
    """Every method of a methods sweep, fitted; `of` names which parameters the parameter axis counts."""

    model: str
    dtype: str
    of: str
    acc_key: str
    methods: dict[str, MethodFits]


# Settings that must agree between the method folders of one comparison: what the models are evaluated on.
SHARED_SETTINGS = (
    "tasks",
    "ppl_corpus",
    "ppl_seqlen",
    "ppl_max_tokens",
    "mc_limit",
    "mc_backend",
    "calib_corpus",
    "calib_sampler",
    "calib_samples",
    "calib_seqlen",
    "probe_tokens",
    "probe_seqlen",
    "entropy_stream",
    "dtype",
    "param_sparsity_of",
    "param_sparsities",
)


def _check_comparable(found: dict[str, dict[str, Any]]) -> None:
    """Refuse method folders made with different models or evaluation settings (one line naming them)."""
    (first, ref), *rest = found.items()
    for method, results in rest:
        if (results["model"], results.get("model_fingerprint")) != (
            ref["model"],
            ref.get("model_fingerprint"),
        ):
            raise MechsliceError(
                f"{method} was swept on another model than {first}; compare sweeps of one model only"
            )
        mine, theirs = results.get("settings") or {}, ref.get("settings") or {}
        differ = [k for k in SHARED_SETTINGS if mine.get(k) != theirs.get(k)]
        if differ:
            raise MechsliceError(
                f"{method} and {first} were evaluated with different settings ({', '.join(differ)}); rerun one "
                "of them with the other's settings, or compare them in separate folders"
            )


def _fit(results: dict[str, Any], acc_key: str) -> tuple[FitTable | None, str | None]:
    try:
        return fit_results(results, acc_key), None
    except MechsliceError as err:
        return None, str(err)


def _missing(results: dict[str, Any]) -> list[float]:
    """The sparsities the sweep's settings ask for that it has not measured yet."""
    done = {rec["sparsity"] for rec in results["records"]}
    return [s for s in (results.get("settings") or {}).get("sparsities", []) if s not in done]


def _unreached(results: dict[str, Any]) -> list[float]:
    """The parameter targets no pruned record of a finished sweep answers (their nearest model was the dense
    one); none while the sweep is unfinished (its records cannot tell yet)."""
    if _missing(results):
        return []
    asked = (results.get("settings") or {}).get("param_sparsities") or []
    reached = {t for rec in results["records"] for t in rec.get("param_targets") or []}
    return [t for t in asked if t not in reached]


def compare_methods(out_dir: str | Path, acc_key: str = "acc") -> Comparison:
    """Fit both laws of every method sweep under `out_dir` against parameter and own-axis sparsity."""
    found = {method: load_results(folder) for method, folder in method_folders(out_dir).items()}
    _check_comparable(found)
    first = next(iter(found.values()))
    of = (first.get("settings") or {}).get("param_sparsity_of", "non_embedding")
    per: dict[str, MethodFits] = {}
    for method, results in found.items():
        fits: dict[str, FitTable | None] = {}
        errors: dict[str, str] = {}
        param, left_out = param_view(results, of)
        for axis, view in (("param", param), ("own", results)):
            fits[axis], error = _fit(view, acc_key)
            if error is not None:
                errors[axis] = error
        per[method] = MethodFits(
            method, results, param, fits, errors, left_out, _unreached(results), _missing(results)
        )
    return Comparison(first["model"], results_dtype(first), of, acc_key, per)


def _row_fit(table: FitTable | None, dataset: str) -> FitRow | None:
    if table is None:
        return None
    return next((r for r in table.rows if r.dataset == dataset), None)


def fit_rows(comparison: Comparison) -> list[dict[str, Any]]:
    """One row per method, axis and dataset: the free fit (a, b, RMSE, R^2, LOO RMSE) and the anchored slope."""
    rows = []
    for method, mf in comparison.methods.items():
        for axis in AXES:
            table = mf.fits[axis]
            if table is None:
                continue
            for row in table.rows:
                fit, anchored = row.fit, row.anchored
                rows.append(
                    {
                        "method": method,
                        "axis": axis,
                        "dataset": row.dataset,
                        "n": fit.n,
                        "a": fit.a,
                        "b": fit.b,
                        "rmse": fit.rmse,
                        "r2": fit.r2,
                        "loo_rmse": fit.loo_rmse,
                        "anchored_a": anchored.a,
                        "anchored_a_ci_low": None if anchored.a_ci is None else anchored.a_ci[0],
                        "anchored_a_ci_high": None if anchored.a_ci is None else anchored.a_ci[1],
                        "at_chance": row.chance is not None and row.chance.at_chance is not None,
                    }
                )
    return rows


def matched_points(comparison: Comparison) -> list[dict[str, Any]]:
    """Every pruned model of every method: its parameter target(s), sparsities, width, PPL and accuracies."""
    points = []
    for method, mf in comparison.methods.items():
        for rec in mf.results["records"]:
            if rec["effective_sparsity"] < DENSE_TOLERANCE:
                continue
            entropy = rec.get("entropy") or {}
            points.append(
                {
                    "method": method,
                    "axis": rec.get("axis", "d"),  # slice records name no axis: theirs is d
                    "targets": rec.get("param_targets"),
                    "sparsity": rec["sparsity"],
                    "effective_sparsity": rec["effective_sparsity"],
                    "param_sparsity": rec.get("param_sparsity"),
                    "representation_dim": rec.get("d_prime"),
                    "ppl": rec.get("ppl"),
                    "acc": {t: m.get(comparison.acc_key) for t, m in rec.get("tasks", {}).items()},
                    "entropy_ratio": (entropy.get("gaussian") or {}).get("ratio_mean"),
                    "erank_ratio": (entropy.get("effective_rank") or {}).get("ratio_mean"),
                    "kl": ((rec.get("shift") or {}).get("overall") or {}).get("kl"),
                }
            )
    return points


def _slope_text(method: str, fit: LineFit) -> str:
    ci = "" if fit.a_ci is None else f" [{fit.a_ci[0]:.3g}, {fit.a_ci[1]:.3g}]"
    return f"{method} a = {fit.a:.3g}{ci}"


def _ranking(comparison: Comparison, dataset: str, what: str) -> str | None:
    """Which method loses most of `dataset`'s y per parameter removed: the anchored slopes against parameter
    sparsity, steepest first, with their intervals; neighbours whose intervals overlap are called unresolved."""
    slopes = {
        m: row.anchored
        for m, mf in comparison.methods.items()
        if (row := _row_fit(mf.fits["param"], dataset)) is not None
        and (row.chance is None or row.chance.at_chance is None)
    }
    if len(slopes) < 2:
        return None
    order = sorted(slopes, key=lambda m: slopes[m].a)
    ties = [
        f"{hi} vs {lo}"
        for hi, lo in itertools.pairwise(order)
        if slopes[hi].a_ci is None or slopes[lo].a_ci is None or slopes[hi].a_ci[1] >= slopes[lo].a_ci[0]
    ]
    text = (
        f"Per parameter removed, {what} suffers most from {order[0]} and least from {order[-1]} (slope against "
        f"{comparison.of.replace('_', '-')} parameter sparsity through the dense point, 95% intervals: "
        f"{', '.join(_slope_text(m, slopes[m]) for m in order)})"
    )
    return text + (f"; not resolved by the intervals: {', '.join(ties)}." if ties else ".")


def _at_targets(comparison: Comparison) -> list[str]:
    """At each parameter target, every method's perplexity and the parameter sparsity it actually reached."""
    lines = []
    points = sorted(matched_points(comparison), key=lambda p: p["ppl"] or math.inf)
    targets = sorted({t for p in points for t in p["targets"] or []})
    for target in targets:
        cells = [
            f"{p['method']} {p['ppl']:.4g} (at {p['param_sparsity'][comparison.of]:.3f})"
            for p in points
            if target in (p["targets"] or []) and p["ppl"] is not None
        ]
        if cells:
            lines.append(f"At about {target:g} of the parameters removed, perplexity: {', '.join(cells)}.")
    return lines


def _linear_form(comparison: Comparison) -> list[str]:
    """Whether ln PPL0 / ln PPL is linear, per method, within the paper's precision; only where the fit has a
    residual degree of freedom (with two pruned points any line passes near three points)."""
    lines = []
    for axis, label in AXES.items():
        holds, fails, few = [], [], []
        for method, mf in comparison.methods.items():
            if axis == "own" and method != "slice":
                continue  # parameter sparsity is proportional to own sparsity there: the same law twice
            row = _row_fit(mf.fits[axis], PPL)
            if row is None:
                continue
            if row.fit.dof < 1:
                few.append(method)
                continue
            text = f"{method} (RMSE {row.fit.rmse:.3f}, LOO RMSE {row.fit.loo_rmse or math.nan:.3f})"
            (holds if row.fit.rmse <= PAPER_PPL_RMSE else fails).append(text)
        if holds or fails:
            lines.append(
                f"Against {label}, ln PPL0 / ln PPL is linear within the paper's precision (RMSE <= "
                f"{PAPER_PPL_RMSE}, Table 3's largest perplexity RMSE) for {', '.join(holds) or 'no method'}; "
                f"not for {', '.join(fails) or 'any method'}."
            )
        if few:
            lines.append(
                f"Against {label}, too few pruned points to test the linear form (no residual degree of freedom): "
                f"{', '.join(few)}."
            )
    lines.append(
        "For mlp, heads and layers the parameters removed are proportional to the units removed, so their fits "
        "against own-axis sparsity are the same law in other units; for slice they differ (its shortcut "
        "matrices and untied head)."
    )
    return lines


def verdict(comparison: Comparison) -> list[str]:
    """The answer in plain words, each sentence with the numbers it rests on: the cost of each axis per
    parameter removed (perplexity and every task clear of chance), the measured points at each target, and
    whether the linear form holds (`PAPER_PPL_RMSE`, with a residual degree of freedom)."""
    lines = []
    if (ppl := _ranking(comparison, PPL, "perplexity (ln PPL0 / ln PPL)")) is not None:
        lines.append(ppl)
    lines += _at_targets(comparison)
    tables = [mf.fits["param"] for mf in comparison.methods.values() if mf.fits["param"] is not None]
    tasks = sorted({r.dataset for table in tables for r in table.rows})
    for task in (t for t in tasks if t != PPL):
        if (text := _ranking(comparison, task, f"{task} accuracy (ln(acc / acc0))")) is not None:
            lines.append(text)
    lines += _linear_form(comparison)
    for method, mf in comparison.methods.items():
        if mf.missing:
            lines.append(
                f"{method}: unfinished, own sparsities {', '.join(f'{s:.4f}' for s in mf.missing)} not measured "
                "yet (rerun the sweep with --resume)."
            )
        for axis, error in mf.errors.items():
            lines.append(f"{method}, {AXES[axis]}: no law fitted ({error}).")
        if mf.unreached:
            lines.append(
                f"{method}: the targets {', '.join(f'{t:g}' for t in mf.unreached)} lie nearest the dense model "
                "at this granularity, so no pruned model answers them."
            )
    return lines


def comparison_dict(comparison: Comparison) -> dict[str, Any]:
    """What methods.json holds: the matched points, every fit row, each method's fit tables and the verdict."""
    return {
        "model": comparison.model,
        "dtype": comparison.dtype,
        "param_sparsity_of": comparison.of,
        "acc_key": comparison.acc_key,
        "paper_ppl_rmse": PAPER_PPL_RMSE,
        "points": matched_points(comparison),
        "fits": fit_rows(comparison),
        "tables": {
            m: {axis: None if t is None else t.to_dict() for axis, t in mf.fits.items()}
            for m, mf in comparison.methods.items()
        },
        "not_on_parameter_axis": {m: mf.left_out for m, mf in comparison.methods.items() if mf.left_out},
        "unreached_targets": {m: mf.unreached for m, mf in comparison.methods.items() if mf.unreached},
        "unfinished": {m: mf.missing for m, mf in comparison.methods.items() if mf.missing},
        "verdict": verdict(comparison),
    }


CSV_COLUMNS = (
    "method",
    "axis",
    "dataset",
    "n",
    "a",
    "b",
    "rmse",
    "r2",
    "loo_rmse",
    "anchored_a",
    "anchored_a_ci_low",
    "anchored_a_ci_high",
    "at_chance",
)


def write_comparison(payload: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """Write methods.json and methods.csv (a row per method, axis and dataset) from `comparison_dict`'s
    payload, atomically."""
    folder = Path(out_dir)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(payload["fits"])
    paths = (folder / METHODS_FILE, folder / METHODS_CSV)
    distributed.on_main(lambda: atomic_write_json(paths[0], payload))
    distributed.on_main(lambda: atomic_write_text(paths[1], buffer.getvalue()))
    return paths


__all__ = [
    "AXES",
    "METHODS_CSV",
    "METHODS_FILE",
    "Comparison",
    "MethodFits",
    "compare_methods",
    "comparison_dict",
    "is_methods_folder",
    "method_folders",
    "method_settings",
    "param_view",
    "run_methods",
    "verdict",
    "write_comparison",
]
