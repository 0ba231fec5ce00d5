"""`mechslice shift`: output-distribution shift between the dense and a sliced model on the same tokens."""

from __future__ import annotations

import argparse
from typing import Any

from analyses.shift import shift_over_windows
from mechslice.checks import check_at_least
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
from mechslice.slicing import Slicer, sliced_width


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `shift` subcommand."""
    parser = sub.add_parser("shift", help="KL, JS, entropy, top-1 agreement, ln PPL: dense vs sliced")
    add_model_args(parser)
    add_probe_args(parser)
    parser.add_argument("--sparsity", type=float, required=True, help="fraction s of d to remove, in [0, 1)")
    parser.add_argument("--batch-size", type=int, default=1, help="windows per forward pass (default 1)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Slice a copy of the model, compare the two output distributions, print (one JSON object with --json)."""
    check_at_least(args.batch_size, 1, "--batch-size")
    lm = model_from_args(args)
    sliced_width(lm.dims.d, args.sparsity)  # reject a bad sparsity before calibrating
    windows = token_windows(lm.tokenizer, args, lm.model.config.max_position_embeddings)
    if windows.shape[1] < 2:
        raise MechsliceError("need at least 2 tokens: each prediction is scored against the next token")
    calib = calibration_from_args(args, lm)
    sliced, record = Slicer(lm, calib, args.rotation, progress=False).sliced(args.sparsity)
    result = shift_over_windows(lm.model, sliced.model, windows, args.batch_size)
    payload = {
        **model_fields(lm),
        "rotation": args.rotation,
        "sparsity": args.sparsity,
        "effective_sparsity": record.effective_sparsity,
        "d_prime": record.d_prime,
        "tokens": windows.numel(),
        **result.to_dict(),
    }
    emit(args, payload, _text)
    return 0


def _row(label: str, s: dict[str, Any]) -> str:
    if not s["tokens"]:
        return f"  {label:<12} (no tokens)"
    return (
        f"  {label:<12} {s['tokens']:>7} {s['kl']:>8.4f} {s['js']:>8.4f} {s['entropy_dense']:>8.3f} "
        f"{s['entropy_sliced']:>8.3f} {s['top1_agreement']:>7.3f} {s['ln_ppl_dense']:>8.4f} {s['ln_ppl_sliced']:>8.4f}"
    )


def _text(p: dict[str, Any]) -> str:
    lines = [
        f"{p['model']} ({p['dtype']}): dense vs {p['rotation']} slice at s={p['sparsity']} (d'={p['d_prime']}, effective "
        f"{p['effective_sparsity']:.4f}); ln PPL0/ln PPL = {p['overall']['ln_ppl_ratio']:.4f} vs 1-s",
        f"  {'positions':<12} {'tokens':>7} {'KL':>8} {'JS':>8} {'H dense':>8} {'H slice':>8} {'top-1':>7} "
        f"{'lnPPL0':>8} {'lnPPL':>8}",
        _row("all", p["overall"]),
    ]
    for b in p["buckets"]:
        label = f"[{b['lo']},{'' if b['hi'] is None else b['hi']})"
        lines.append(_row(label, b["stats"]))
    return "\n".join(lines)
