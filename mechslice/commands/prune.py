"""`mechslice prune`: structurally prune a model along one axis (d, m, KV groups or blocks) and save it."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from mechslice.checks import check_at_least, check_output_dir
from mechslice.commands._common import (
    add_calibration_args,
    add_model_args,
    calibration_fields,
    calibration_from_args,
    emit,
    model_fields,
    model_from_args,
    show_progress,
)
from mechslice.errors import MechsliceError
from mechslice.pruning import (
    METHODS,
    PARAM_COUNTS,
    PruneOptions,
    kept_units,
    nearest_sparsity,
    prune,
    save_pruned,
)
from mechslice.slicing.slicer import ROTATIONS


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `prune` subcommand."""
    parser = sub.add_parser(
        "prune",
        help="prune the MLP width, KV-head groups, whole blocks or (slice) the residual stream, then save",
    )
    add_model_args(parser)
    parser.add_argument("--method", choices=METHODS, required=True, help="the axis to prune")
    amount = parser.add_mutually_exclusive_group(required=True)
    amount.add_argument(
        "--sparsity", type=float, help="fraction of the method's own axis to remove, in [0, 1)"
    )
    amount.add_argument(
        "--param-sparsity",
        type=float,
        help="target fraction of parameters to remove: the method's sparsity nearest it is chosen",
    )
    parser.add_argument(
        "--param-sparsity-of",
        choices=PARAM_COUNTS,
        default="non_embedding",
        help="which parameters --param-sparsity counts (default non_embedding)",
    )
    add_calibration_args(parser)
    parser.add_argument(
        "--round-to",
        type=int,
        default=None,
        help="mlp, slice: round m' or d' down to a multiple of R (default 8)",
    )
    parser.add_argument("--keep-first", action="store_true", help="layers: never remove the first block")
    parser.add_argument("--keep-last", action="store_true", help="layers: never remove the last block")
    parser.add_argument("--rotation", choices=ROTATIONS, default=None, help="slice: default per-layer")
    parser.add_argument("--slice-head", action="store_true", help="slice: also cut the head to d'")
    parser.add_argument("--batch-size", type=int, default=8, help="calibration windows per pass (default 8)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.set_defaults(func=run)


def _options(args: argparse.Namespace) -> PruneOptions:
    """The method's options; an option of another method is refused rather than ignored."""
    foreign = {
        "--keep-first": args.keep_first and args.method != "layers",
        "--keep-last": args.keep_last and args.method != "layers",
        "--rotation": args.rotation is not None and args.method != "slice",
        "--slice-head": args.slice_head and args.method != "slice",
        "--round-to": args.round_to is not None and args.method not in ("mlp", "slice"),
    }
    if given := [flag for flag, bad in foreign.items() if bad]:
        raise MechsliceError(f"{', '.join(given)} do(es) not apply to --method {args.method}")
    return PruneOptions(
        round_to=8 if args.round_to is None else args.round_to,
        keep_first=args.keep_first,
        keep_last=args.keep_last,
        rotation=args.rotation or "per-layer",
        slice_head=args.slice_head,
    )


def run(args: argparse.Namespace) -> int:
    """Prune and save; print a summary (one JSON object with --json)."""
    check_output_dir(args.out, "--out")
    check_at_least(args.batch_size, 1, "--batch-size")
    if args.out.exists() and not args.overwrite:
        raise MechsliceError(
            f"output folder '{args.out}' exists; pass --overwrite to replace it or choose another"
        )
    options = _options(args)
    lm = model_from_args(args)
    match = None
    if args.param_sparsity is not None:
        match = nearest_sparsity(lm, args.method, args.param_sparsity, args.param_sparsity_of, options)
        sparsity = match.sparsity
    else:
        sparsity = args.sparsity
        kept_units(lm, args.method, sparsity, options)  # reject bad input before calibrating
    calib = calibration_from_args(args, lm)
    start = time.perf_counter()
    record = prune(lm, args.method, sparsity, calib, options, args.batch_size, show_progress(args), match)
    seconds = time.perf_counter() - start
    record.calibration.update(calibration_fields(args))
    save_pruned(lm, record, args.out, overwrite=args.overwrite)
    payload = {
        **model_fields(lm),
        "out": str(args.out),
        "method": record.method,
        "sparsity": record.sparsity,
        "effective_sparsity": record.effective_sparsity,
        "axis": record.axis,
        "units": record.units,
        "kept": record.kept,
        "representation_dim": record.representation_dim,
        "params": record.params,
        "param_sparsity": record.param_sparsity,
        "target": record.target,
        "calibration": record.calibration,
        "seconds": seconds,
    }
    emit(args, payload, _text)
    return 0


def _text(p: dict[str, Any]) -> str:
    ps = p["param_sparsity"]
    return (
        f"{p['model']} ({p['dtype']}): {p['method']} {p['axis']} {p['units']} -> {p['kept']} (sparsity "
        f"{p['sparsity']:.4f}, effective {p['effective_sparsity']:.4f}); parameters removed: "
        f"{ps['non_embedding']:.4f} of non-embedding, {ps['total']:.4f} of all; representation dim "
        f"{p['representation_dim']}; {p['seconds']:.1f} s; saved to {p['out']}"
    )
