"""`mechslice entropy`: per-layer residual-stream entropy, dense against sliced, next to 1-s."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from analyses.entropy import RANK, RATIO_ESTIMATORS, SIGNAL, STREAMS
from analyses.layer_entropy import check_estimators, check_gaussian_rows, entropy_sweep
from mechslice.checks import check_output_file
from mechslice.commands._common import (
    add_model_args,
    add_probe_args,
    calibration_from_args,
    emit,
    model_fields,
    model_from_args,
    token_windows,
)
from mechslice.errors import MechsliceError
from mechslice.slicing import sliced_width


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `entropy` subcommand."""
    parser = sub.add_parser("entropy", help="per-layer residual-stream entropy of dense vs sliced models")
    add_model_args(parser)
    add_probe_args(parser)
    parser.add_argument(
        "--sparsities", type=float, nargs="+", default=[0.1, 0.2, 0.3], help="default 0.1 0.2 0.3"
    )
    parser.add_argument(
        "--estimators", nargs="+", default=list(RATIO_ESTIMATORS), help="gaussian, marginal (knn: see below)"
    )
    parser.add_argument(
        "--include-knn",
        action="store_true",
        help="allow knn in --estimators: its bias depends on d, so its H'/H compares differently biased numbers",
    )
    parser.add_argument(
        "--stream",
        choices=STREAMS,
        default="normalised",
        help="normalised: x / sqrt(sum x^2 / d), the unit the model fixes (default); raw: the block output",
    )
    parser.add_argument("--samples", type=int, default=None, help="token rows per layer (default all traced)")
    parser.add_argument("--layers", type=int, nargs="+", default=None, help="block indices (default all)")
    parser.add_argument("--html", type=Path, default=None, help="write the figures to this HTML file")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Slice at each sparsity, estimate per-layer entropies, print (and optionally plot) them."""
    estimators = check_estimators(args.estimators, args.include_knn)
    if args.html is not None:
        check_output_file(args.html, "--html")
    lm = model_from_args(args)
    for s in args.sparsities:
        sliced_width(lm.dims.d, s)  # reject a bad sparsity before any work
    windows = token_windows(lm.tokenizer, args, lm.model.config.max_position_embeddings)
    samples = windows.numel() if args.samples is None else args.samples
    if not 1 <= samples <= windows.numel():
        raise MechsliceError(
            f"--samples {samples} is not in 1..{windows.numel()}, the number of tokens traced; "
            "ask for fewer samples or more --max-tokens"
        )
    sets_rows = "--samples" if args.samples is not None else "--max-tokens" if args.text is None else "--text"
    check_gaussian_rows(estimators, samples, lm.dims.d, sets_rows)  # before calibrating
    calib = calibration_from_args(args, lm)
    sweep = entropy_sweep(
        lm,
        args.sparsities,
        calib,
        windows,
        estimators,
        args.rotation,
        samples,
        args.layers,
        stream=args.stream,
        include_knn=args.include_knn,
    )
    payload = {**model_fields(lm), **sweep.to_dict()}
    if args.html is not None:
        from analyses.report import entropy_report_html

        entropy_report_html(sweep, args.html)
        payload["html"] = str(args.html)
    emit(args, payload, _text)
    return 0


def _text(p: dict[str, Any]) -> str:
    lines = [
        f"{p['model']} ({p['dtype']}): {p['rotation']} slicing, {p['samples']} samples per layer of "
        f"{p['tokens']} tokens, {p['stream']} stream"
    ]
    for entry in p["sparsities"]:
        lines.append(
            f"s = {entry['sparsity']} (d' = {entry['d_prime']}): per layer 1-s = d'/d, then per estimator "
            "H'/H [d(H'/H)/d ln c], and the effective-rank ratio"
        )
        for layer in entry["layers"]:
            ratios = "  ".join(
                f"{name} {_fmt(c['ratio'])}{'' if c['same_sign'] else '*'} [{_fmt(c['unit_sensitivity'], '+.3f')}]"
                for name, c in layer["estimators"].items()
            )
            rank = layer["effective_rank"]
            erank = "" if rank is None else f"  erank {_fmt(rank['ratio'])}"
            lines.append(f"  layer {layer['layer']:>3}  1-s {layer['one_minus_s']:.3f}  {ratios}{erank}")
        for name, signal in entry["signals"].items():
            left = ", ".join(f"{k} ({why})" for k, why in signal["excluded"].items()) or "none"
            label = "effective rank" if name == RANK else name
            lines.append(
                f"  mean ratio, {label}: {_fmt(signal['ratio'])} over {len(signal['layers'])} layers; left out: {left}"
            )
    lines.append("* H and H' differ in sign: the ratio does not read as a fraction of entropy kept")
    lines.append(f"mean ratio: {SIGNAL}")
    return "\n".join(lines)


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "n/a" if x is None else f"{x:{spec}}"
