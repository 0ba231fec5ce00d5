"""`mechslice report DIR`: rebuild DIR/report.html (Fig. 3, Table 3, entropy, spectra, shift) from results.json."""

from __future__ import annotations

import argparse

from analyses.methods import compare_methods, comparison_dict, is_methods_folder, write_comparison
from analyses.report import build_report
from analyses.report.methods import build_methods_report
from analyses.results import ACC_KEYS, load_results, results_dtype
from mechslice.commands._common import add_json_arg, emit


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `report` subcommand."""
    parser = subparsers.add_parser(
        "report",
        help="rebuild a sweep's self-contained HTML report from its results.json",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument(
        "dir", metavar="DIR", help="a sweep's output folder (holds results.json, or a folder per method)"
    )
    parser.add_argument(
        "--out", default=None, metavar="PATH", help="where to write (default DIR/report.html)"
    )
    parser.add_argument(
        "--acc-key", choices=ACC_KEYS, default="acc", help="accuracy the law is fitted on (default acc)"
    )
    add_json_arg(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Write the report (for a methods sweep: refit the comparison and write its page) and print its path."""
    if is_methods_folder(args.dir):
        comparison = compare_methods(args.dir, args.acc_key)
        table = comparison_dict(comparison)
        write_comparison(table, args.dir)
        path = build_methods_report(comparison, table, args.dir, args.out)
        payload = {"report": str(path), "dtype": comparison.dtype}
    else:
        path = build_report(args.dir, args.out, acc_key=args.acc_key)
        payload = {"report": str(path), "dtype": results_dtype(load_results(args.dir))}
    emit(args, payload, lambda p: f"wrote {p['report']} (numbers computed in {p['dtype']})")
    return 0
