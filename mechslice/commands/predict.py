"""`mechslice predict --sparsity S --from DIR`: perplexity and accuracies at an unseen s, from the laws.

Each metric has `predicted`, `interval` (95% prediction interval), `y`, `y_interval`, `extrapolated` from the
paper's unconstrained fit, and the same from the fit through the dense point under `anchored`; `dropped` names
the sparsities the fit left out. A law that cannot be fitted is not predicted: `skipped` says why.
"""

from __future__ import annotations

import argparse
from typing import Any

from analyses.laws import ACC_KEYS, PPL, check_sparsity, fit_results, load_results, predict
from mechslice.commands._common import add_json_arg, emit


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `predict` subcommand."""
    parser = subparsers.add_parser(
        "predict",
        help="predict perplexity and accuracy at a sparsity from a sweep's fitted laws",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument("--sparsity", type=float, required=True, help="sparsity s in [0, 1)")
    parser.add_argument(
        "--from", dest="source", metavar="DIR", required=True, help="a sweep's output folder (results.json)"
    )
    parser.add_argument("--acc-key", choices=ACC_KEYS, default="acc", help="accuracy to fit (default acc)")
    add_json_arg(parser)
    parser.set_defaults(func=run)


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


def run(args: argparse.Namespace) -> int:
    """Fit the laws on DIR/results.json and print the predictions at --sparsity."""
    s = check_sparsity(args.sparsity)
    table = fit_results(load_results(args.source), acc_key=args.acc_key)
    payload = {**predict(table, s, table.ppl0, table.acc0s), "skipped": table.skipped, "dtype": table.dtype}
    emit(args, payload, format_prediction)
    return 0
