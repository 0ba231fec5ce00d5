"""`mechslice sweep`: slice at each sparsity, evaluate, fit the laws and write the report."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mechslice.commands._common import add_model_args, emit, show_progress
from mechslice.corpora import SAMPLERS
from mechslice.errors import MechsliceError
from mechslice.lmeval import MC_BACKENDS
from mechslice.mc.tasks import TASKS
from mechslice.pruning import METHODS, PARAM_COUNTS

if TYPE_CHECKING:
    from analyses.sweep import SweepSettings


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `sweep` subcommand."""
    p = sub.add_parser("sweep", help="sparsity sweep: slice, evaluate, fit the laws, write the report")
    add_model_args(p)
    p.add_argument("--sparsities", type=_floats, default=None, help="e.g. 0,0.1,0.15,0.2,0.25,0.3,0.4,0.5")
    p.add_argument(
        "--tasks",
        type=_names,
        default=None,
        help=f"default ppl,arc_easy,arc_challenge,winogrande,piqa; choose from ppl,{','.join(TASKS)}",
    )
    p.add_argument("--rotation", choices=["per-layer", "global"], default=None)
    p.add_argument("--shared", action="store_true", help="calibrate once and slice every sparsity from it")
    p.add_argument("--out", type=Path, default=Path("runs/sweep"), help="results folder (default runs/sweep)")
    p.add_argument("--resume", action="store_true", help="continue a sweep, skipping finished sparsities")
    p.add_argument(
        "--quick", action="store_true", help="the small demo profile (minutes, not a result to quote)"
    )
    p.add_argument(
        "--slice-head",
        action="store_const",
        const=True,
        default=None,
        help="also cut the last MLP output, final norm and head to d' (SliceGPT's default keeps them at d)",
    )
    p.add_argument("--calib-sampler", choices=SAMPLERS, default=None, help="default slicegpt")
    p.add_argument("--calib-corpus", default=None)
    p.add_argument("--calib-samples", type=int, default=None)
    p.add_argument("--calib-seqlen", type=int, default=None)
    p.add_argument("--corpus", dest="ppl_corpus", default=None, help="perplexity corpus (default wiki)")
    p.add_argument("--seqlen", dest="ppl_seqlen", type=int, default=None)
    p.add_argument("--max-tokens", dest="ppl_max_tokens", type=int, default=None)
    p.add_argument("--mc-limit", type=int, default=None, help="first N items of each task (default all)")
    p.add_argument(
        "--mc-backend",
        choices=MC_BACKENDS,
        default=None,
        help="who scores the tasks: ours (default) or lm-eval (the harness over the same model; slower)",
    )
    p.add_argument(
        "--estimators",
        type=_names,
        default=None,
        help="entropy estimators: gaussian,marginal (knn: see below)",
    )
    p.add_argument(
        "--include-knn",
        action="store_true",
        help="allow knn in --estimators: its bias depends on d, so its H'/H compares differently biased numbers",
    )
    p.add_argument(
        "--entropy-stream",
        choices=["normalised", "raw"],
        default=None,
        help="measure entropy on x / rms(x) (default: the unit the model fixes) or on the raw block output",
    )
    p.add_argument("--probe-tokens", type=int, default=None, help="tokens for entropy and output shift")
    p.add_argument(
        "--methods",
        type=_names,
        default=None,
        help=f"prune along these axes ({','.join(METHODS)}), each into OUT/<method>/, and compare them",
    )
    p.add_argument(
        "--param-sparsities",
        type=_floats,
        default=None,
        help="with --methods: match each method to these fractions of parameters removed, e.g. 0.1,0.2,0.3",
    )
    p.add_argument(
        "--param-sparsity-of",
        choices=PARAM_COUNTS,
        default=None,
        help="which parameters --param-sparsities count (default non_embedding)",
    )
    p.add_argument(
        "--keep-first", action="store_const", const=True, default=None, help="layers: keep block 0"
    )
    p.add_argument(
        "--keep-last", action="store_const", const=True, default=None, help="layers: keep the last block"
    )
    p.add_argument("--no-report", action="store_true", help="skip fits.json/fits.csv and report.html")
    p.set_defaults(func=run)


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: '{text}'") from err


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def run(args: argparse.Namespace) -> int:
    """Run or resume the sweep, then fit and report."""
    from analyses.sweep import QUICK, SweepSettings, run_sweep, settings_from

    overrides = {k: getattr(args, k) for k in vars(args)}
    if args.shared:
        overrides["path"] = "shared"
    if args.methods is None:
        for flag, value in (
            ("--param-sparsities", args.param_sparsities),
            ("--param-sparsity-of", args.param_sparsity_of),
        ):
            if value is not None:
                raise MechsliceError(f"{flag} needs --methods (e.g. --methods slice,mlp,heads,layers)")
    if args.param_sparsities is not None and args.sparsities is not None:
        raise MechsliceError(
            "give --sparsities or --param-sparsities, not both (the targets choose the sparsities)"
        )
    if args.methods is not None:  # each method's sweep takes the layers options where they apply
        keep = {k: bool(overrides.pop(k)) for k in ("keep_first", "keep_last")}
        base = settings_from(QUICK if args.quick else SweepSettings(), **overrides)
        return _run_methods(args, replace(base, **keep))
    settings = settings_from(QUICK if args.quick else SweepSettings(), **overrides)
    results = run_sweep(
        settings, args.out, args.model, args.device, args.resume, progress=show_progress(args)
    )
    payload: dict[str, Any] = {
        "out": str(args.out),
        "dtype": results["settings"]["dtype"],
        "records": len(results["records"]),
    }
    if not args.no_report:
        payload.update(_fit_and_report(args.out))
    emit(args, payload, _text)
    return 0


def _run_methods(args: argparse.Namespace, settings: SweepSettings) -> int:
    """Sweep each method into OUT/<method>/, then fit and report each and write the comparison."""
    from analyses.methods import compare_methods, comparison_dict, run_methods, write_comparison
    from analyses.report.methods import build_methods_report

    results = run_methods(
        settings, args.methods, args.out, args.model, args.device, args.resume, progress=show_progress(args)
    )
    payload: dict[str, Any] = {
        "out": str(args.out),
        "dtype": next(iter(results.values()))["settings"]["dtype"],
        "records": sum(len(r["records"]) for r in results.values()),
        "methods": {m: len(r["records"]) for m, r in results.items()},
    }
    if not args.no_report:
        for method in results:
            _fit_and_report(args.out / method)
        comparison = compare_methods(args.out)
        table = comparison_dict(comparison)
        methods_json, methods_csv = write_comparison(table, args.out)
        report = build_methods_report(comparison, table, args.out)
        payload.update(fits=str(methods_json), fits_csv=str(methods_csv), report=str(report))
    emit(args, payload, _text)
    return 0


def _fit_and_report(out: Path) -> dict[str, Any]:
    from analyses.laws import fit_results, write_fits
    from analyses.report import build_report
    from analyses.results import load_results

    try:
        fits_json, fits_csv = write_fits(fit_results(load_results(out)), out)
    except MechsliceError as err:  # e.g. a single sparsity: nothing to fit, the records still stand
        return {"fits": None, "fits_error": str(err), "report": str(build_report(out))}
    return {"fits": str(fits_json), "fits_csv": str(fits_csv), "report": str(build_report(out))}


def _text(p: dict[str, Any]) -> str:
    if "methods" in p:
        each = ", ".join(f"{m} {n}" for m, n in p["methods"].items())
        lines = [f"records per method ({each}) in {p['out']}/<method>/results.json, computed in {p['dtype']}"]
    else:
        lines = [f"{p['records']} sparsities in {p['out']}/results.json, computed in {p['dtype']}"]
    if p.get("fits"):
        lines.append(f"fits: {p['fits']} and {p['fits_csv']}")
    elif "fits_error" in p:
        lines.append(f"no fit: {p['fits_error']}")
    if p.get("report"):
        lines.append(f"report: {p['report']}")
    return "\n".join(lines)
