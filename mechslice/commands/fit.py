"""`mechslice fit DIR`: refit the paper's laws (Props. 2, 3) on DIR/results.json; write fits.json, .csv.

Per dataset: the paper's unconstrained y = a*s + b (a, b, CIs, RMSE, R^2, LOO; `dof` its residual degrees of
freedom, sparsities > 0 minus 2, since the dense point is exact) and beside it the fit through the dense point
(`anchored` in the JSON, `anchored_*` in the CSV: a, its CI, RMSE, dof). Accuracy intervals include the
standard errors of acc and acc0 (`sampling_error` says where they came from). Per task, its chance level, the
mark "at chance: the law cannot be read" when acc0 is within 3 standard errors of it, and the chance-corrected
law ln((acc - c)/(acc0 - c)) with both forms' leave-one-out accuracy error. See `laws.csv_columns`.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from typing import Any

from analyses.laws import DENSE_NOTE, entropy_predictions, fit_results, write_fits
from analyses.methods import compare_methods, comparison_dict, is_methods_folder, write_comparison
from analyses.paper import PAPER_MODELS
from analyses.results import ACC_KEYS, load_results
from mechslice.checks import check_output_dir
from mechslice.commands._common import add_json_arg, emit


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `fit` subcommand."""
    parser = subparsers.add_parser(
        "fit",
        help="fit the perplexity and accuracy laws on a sweep (Table 3)",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument(
        "dir", metavar="DIR", help="a sweep's output folder (holds results.json, or a folder per method)"
    )
    parser.add_argument("--acc-key", choices=ACC_KEYS, default="acc", help="accuracy to fit (default acc)")
    add_json_arg(parser)
    parser.set_defaults(func=run)


def _num(x: float | None, spec: str = "+.3f") -> str:
    return "-" if x is None else format(x, spec)


def _ci(ci: list[float] | None) -> str:
    return "-" if ci is None else f"[{ci[0]:+.2f}, {ci[1]:+.2f}]"


def _chance_lines(law: dict[str, Any]) -> list[str]:
    """Under an accuracy row: its chance level, the at-chance mark, the chance-corrected fit and the LOO duel."""
    pad = f"{'':<10} {'':<14} "
    lines = [f"{pad}chance {law['chance']:.3f}" + (f"; {law['at_chance']}" if law["at_chance"] else "")]
    fit = law["fit"]
    if fit is None:
        return [*lines, f"{pad}chance-corrected law not fitted: {law['not_fitted']}"]
    lines.append(
        f"{pad}chance-corrected ln((acc - c)/(acc0 - c)): a {_num(fit['a'])} {_ci(fit['a_ci'])}, "
        f"b {_num(fit['b'])}, RMSE {_num(fit['rmse'], '.3f')}, R^2 {_num(fit['r2'], '.3f')}"
    )
    duel = law["loo_comparison"]
    lines.append(
        f"{pad}leave-one-out acc error over {duel['n']} sparsities: paper's form {_num(duel['paper_rmse'], '.4f')}, "
        f"chance-corrected {_num(duel['corrected_rmse'], '.4f')}; better: {duel['better'] or 'undecided'}"
    )
    return lines


def format_table(payload: dict[str, Any]) -> str:
    """The Table 3 analogue as text: our fit of each law beside the paper's two models."""
    paper_head = " | ".join(f"{slug} a, b, RMSE" for slug in PAPER_MODELS.values())
    lines = [
        f"law fits for {payload['model']} ({payload['dtype']}; accuracy key: {payload['acc_key']}); "
        "y = a*s + b, 95% CIs",
        DENSE_NOTE,
        f"{'metric':<10} {'dataset':<14} {'n':>2} {'dof':>3} {'a':>7} {'CI of a':>16} {'b':>7} {'CI of b':>16} "
        f"{'RMSE':>6} {'R^2':>6} {'LOO':>6} | {'anchored a':>10} {'CI':>16} | {paper_head}",
    ]
    for row in payload["rows"]:
        paper = " | ".join(
            "-"
            if row["paper"].get(name) is None
            else "{a:+.2f} {b:+.2f} {rmse:.2f}".format(**row["paper"][name])
            for name in PAPER_MODELS
        )
        ours = [_num(row["a"]), _ci(row["a_ci"]), _num(row["b"]), _ci(row["b_ci"])]
        ours += [_num(row[k], ".3f") for k in ("rmse", "r2", "loo_rmse")]
        widths = (7, 16, 7, 16, 6, 6, 6)
        cells = " ".join(f"{v:>{w}}" for v, w in zip(ours, widths, strict=True))
        anchored = f"{_num(row['anchored']['a']):>10} {_ci(row['anchored']['a_ci']):>16}"
        lines.append(
            f"{row['metric']:<10} {row['dataset']:<14} {row['n']:>2} {row['dof']:>3} {cells} | {anchored} | {paper}"
        )
        if row["literal_rmse"] is not None:
            lines.append(f"{'':<10} {'':<14} paper's literal line y = 1 - s: RMSE {row['literal_rmse']:.3f}")
        if row["dropped"] is not None:
            lines.append(f"{'':<10} {'':<14} {row['dropped']}")
        if row["chance"] is not None:
            lines += _chance_lines(row["chance"])
    lines += [f"skipped {name}: {why}" for name, why in payload["skipped"].items()]
    for estimator, preds in payload["entropy_predictions"].items():
        lines.append(
            f"ln PPL from the entropy ratio alone ({estimator}): s, ratio, predicted, measured, rel. error, "
            "layers left out of the mean ratio"
        )
        lines += [
            f"  {p['effective_sparsity']:.3f} {p['ratio']:.3f} {p['ln_ppl_predicted']:.3f} "
            f"{p['ln_ppl_measured']:.3f} {p['rel_error']:.1%} {','.join(p['excluded']) or 'none'}"
            for p in preds
        ]
    lines += [f"wrote {path}" for path in payload["files"]]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Refit DIR/results.json, write DIR/fits.json and DIR/fits.csv, print the table (for a methods sweep:
    refit every method on both axes, write methods.json and methods.csv, print the fits and the verdict)."""
    if is_methods_folder(args.dir):
        return _fit_methods(args)
    results = load_results(args.dir)
    check_output_dir(args.dir, "DIR")  # fits.json and fits.csv go beside results.json
    table = fit_results(results, acc_key=args.acc_key)
    paths = write_fits(table, args.dir)
    payload = table.to_dict()
    payload["entropy_predictions"] = {
        name: [asdict(p) for p in preds] for name, preds in entropy_predictions(results).items()
    }
    payload["files"] = [str(p) for p in paths]
    emit(args, payload, format_table)
    return 0


def _fit_methods(args: argparse.Namespace) -> int:
    table = comparison_dict(compare_methods(args.dir, args.acc_key))
    paths = write_comparison(table, args.dir)
    payload = {**table, "files": [str(p) for p in paths]}
    emit(args, payload, _format_methods)
    return 0


def _format_methods(payload: dict[str, Any]) -> str:
    """Each method's perplexity law on both axes, then the verdict."""
    lines = [f"{payload['model']} ({payload['dtype']}): both laws per pruning method"]
    for row in payload["fits"]:
        if row["dataset"] == "ppl":
            lines.append(
                f"  {row['method']:7s} against {row['axis']:5s} sparsity: a {_num(row['a'])}  b {_num(row['b'])}  "
                f"RMSE {row['rmse']:.4f}  ({row['n']} points)"
            )
    lines += [f"- {line}" for line in payload["verdict"]]
    lines.append("wrote " + ", ".join(payload["files"]))
    return "\n".join(lines)
