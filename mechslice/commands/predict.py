"""`mechslice predict --from DIR`: perplexity (and accuracies) at sparsities a sweep did or did not evaluate.

Without --method (needs --sparsity): perplexity and accuracies at S from the laws fitted on every point. Each
metric has `predicted`, `interval` (95% prediction interval), `y`, `y_interval`, `extrapolated` from the
paper's unconstrained fit, and the same from the fit through the dense point under `anchored`; `dropped` names
the sparsities the fit left out. A law that cannot be fitted is not predicted: `skipped` says why.

With --method law|internals|dense: ln PPL and PPL at every sweep sparsity (or at --sparsity) by one of the three
predictors of `analyses.predictors`, each with its relative errors against the measured points.
"""

from __future__ import annotations

import argparse
from typing import Any

from analyses.laws import fit_results, predict
from analyses.predictors import (
    DEFAULT_ESTIMATOR,
    ESTIMATORS,
    METHODS,
    Prediction,
    dense_prediction,
    internals_prediction,
    law_prediction,
    measure_stream_spectra,
)
from analyses.results import ACC_KEYS, PPL, RESULTS_FILE, load_results, results_dtype
from mechslice.checks import check_sparsity
from mechslice.commands._common import add_json_arg, emit
from mechslice.errors import MechsliceError
from mechslice.loading import default_device, load_model


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `predict` subcommand."""
    parser = subparsers.add_parser(
        "predict",
        help="predict perplexity and accuracy at a sparsity from a sweep's fitted laws",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument(
        "--sparsity", type=float, default=None, help="sparsity s in [0, 1) (with --method: default every one)"
    )
    parser.add_argument(
        "--from", dest="source", metavar="DIR", required=True, help="a sweep's output folder (results.json)"
    )
    parser.add_argument("--acc-key", choices=ACC_KEYS, default="acc", help="accuracy to fit (default acc)")
    parser.add_argument(
        "--method",
        choices=METHODS,
        default=None,
        help="ln PPL from the law fitted on a few sparsities, the sliced model's entropy ratio, or the dense "
        "model's spectra alone, with errors against the measured points (default: the laws at --sparsity)",
    )
    parser.add_argument(
        "--fit-on",
        type=_sparsities,
        default=None,
        metavar="S,S,...",
        help="--method law: the sparsities > 0 to fit on beside the dense model (default the three smallest)",
    )
    parser.add_argument(
        "--estimator",
        choices=ESTIMATORS,
        default=None,
        help=f"--method internals or dense: the entropy ratio (default {DEFAULT_ESTIMATOR}; dense: gaussian "
        "or effective_rank)",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="--method dense: measure the dense spectra with this model (the sweep's, in its dtype) in one "
        "pass, for a results folder that predates them",
    )
    parser.add_argument(
        "--device", default=None, help="torch device for --model (default: cuda if available)"
    )
    add_json_arg(parser)
    parser.set_defaults(func=run)


def _sparsities(text: str) -> list[float]:
    """--fit-on's comma-separated sparsities."""
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of sparsities: {text!r}") from err


def _value(x: float | None, spec: str) -> str:
    return "unbounded" if x is None else format(x, spec)


def _bounds(interval: list[float | None] | None, spec: str) -> str:
    if interval is None:
        return "no interval (too few sparsities)"
    return f"[{_value(interval[0], spec)}, {_value(interval[1], spec)}]"


def _line(name: str, entry: dict[str, Any], spec: str) -> str:
    extra = " (extrapolated)" if entry["extrapolated"] else ""
    anchored = entry["anchored"]
    line = (
        f"{name:<22} {_value(entry['predicted'], spec):>10}  {_bounds(entry['interval'], spec)}{extra}; "
        f"through the dense point {_value(anchored['predicted'], spec)} {_bounds(anchored['interval'], spec)}"
    )
    return line if entry["dropped"] is None else f"{line}\n{'':<22} {entry['dropped']}"


def format_prediction(payload: dict[str, Any]) -> str:
    """Predicted values with their prediction intervals, one line per metric."""
    level = payload["level"]
    lines = [f"predicted at s = {payload['sparsity']:g} ({level:.0%} prediction intervals, fitted laws)"]
    if payload["ppl"] is not None:
        lines.append(_line("perplexity", payload["ppl"], ".4g"))
        lines.append(
            f"{'':<22} paper's law exp(ln PPL0 / (1 - s)): {_value(payload['ppl']['paper_law'], '.4g')}"
        )
    for task, entry in payload["tasks"].items():
        lines.append(_line(f"{task} {payload['acc_key']}", entry, ".4f"))
    lines += [
        f"{'perplexity' if name == PPL else name:<22} {why}" for name, why in payload["skipped"].items()
    ]
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "" if x is None else format(x, "+.1%")


def format_method(payload: dict[str, Any]) -> str:
    """One line per sparsity: predicted PPL (interval), measured PPL, relative errors of PPL and ln PPL."""
    lines = [*payload["notes"], f"PPL0 = {payload['ppl0']:.4g} ({payload['dtype']})"]
    lines.append(
        f"{'s':>6} {'s_eff':>6} {'d_prime':>7} {'PPL pred':>10} {'interval':>22} {'PPL meas':>10} "
        f"{'err PPL':>8} {'ln PPL pred':>11} {'ln PPL meas':>11} {'err ln':>7}"
    )
    for p in payload["points"]:
        interval = "" if p["ppl_interval"] is None else _bounds(p["ppl_interval"], ".4g")
        measured = "" if p["ppl_measured"] is None else format(p["ppl_measured"], ".4g")
        ln_meas = "" if p["ln_ppl_measured"] is None else format(p["ln_ppl_measured"], ".4f")
        lines.append(
            f"{p['sparsity']:>6.3f} {p['effective_sparsity']:>6.3f} {p['d_prime']:>7} "
            f"{_value(p['ppl'], '.4g'):>10} {interval:>22} {measured:>10} {_pct(p['rel_error_ppl']):>8} "
            f"{_value(p['ln_ppl'], '.4f'):>11} {ln_meas:>11} {_pct(p['rel_error_ln_ppl']):>7}"
        )
    errors = payload["mean_abs_rel_error"]
    if payload["n_measured"]:
        lines.append(
            f"mean |relative error| over {payload['n_measured']} measured point(s): PPL {errors['ppl']:.1%}, "
            f"ln PPL {errors['ln_ppl']:.1%}"
        )
    else:
        lines.append("no measured point to score against")
    return "\n".join(lines)


def _method_prediction(args: argparse.Namespace) -> Prediction:
    """The --method predictor on DIR/results.json, at --sparsity or every sparsity."""
    if args.fit_on is not None and args.method != "law":
        raise MechsliceError("--fit-on applies to --method law only")
    if args.estimator is not None and args.method == "law":
        raise MechsliceError("--estimator applies to --method internals or dense only")
    if (args.model is not None or args.device is not None) and args.method != "dense":
        raise MechsliceError("--model and --device apply to --method dense only")
    results = load_results(args.source)
    at = None if args.sparsity is None else [check_sparsity(args.sparsity)]
    estimator = args.estimator or DEFAULT_ESTIMATOR
    if args.method == "law":
        return law_prediction(results, args.fit_on, at)
    if args.method == "internals":
        return internals_prediction(results, estimator, at)
    spectra = None
    if args.model is not None:
        lm = load_model(args.model, args.device or default_device(), results_dtype(results))
        spectra = measure_stream_spectra(lm, results)
    return dense_prediction(results, estimator, at, spectra, where=f"{args.source}/{RESULTS_FILE}")


def run(args: argparse.Namespace) -> int:
    """With --method, that predictor over the sweep; else fit the laws on DIR/results.json and predict at S."""
    if args.method is not None:
        emit(args, _method_prediction(args).to_dict(), format_method)
        return 0
    if args.sparsity is None or any(
        x is not None for x in (args.fit_on, args.estimator, args.model, args.device)
    ):
        raise MechsliceError(
            "pass --sparsity S for the laws' prediction at S, or --method law|internals|dense "
            "(--fit-on, --estimator, --model, --device go with --method)"
        )
    s = check_sparsity(args.sparsity)
    table = fit_results(load_results(args.source), acc_key=args.acc_key)
    payload = {**predict(table, s, table.ppl0, table.acc0s), "skipped": table.skipped, "dtype": table.dtype}
    emit(args, payload, format_prediction)
    return 0
