"""`mechslice trace`: the Appendix A.1 activation flow per layer as streaming statistics, plus conformance."""

from __future__ import annotations

import argparse
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from analyses.conformance import check_conformance
from hooks.flow import TraceError, trace
from mechslice.checks import available_memory, check_at_least
from mechslice.commands._common import (
    add_model_args,
    add_token_args,
    emit,
    model_fields,
    model_from_args,
    token_windows,
)
from mechslice.errors import MechsliceError
from mechslice.loaded import LoadedModel
from mechslice.loading import default_device, load_model
from mechslice.memory import peak_memory_gb

CONFORMANCE_TOKENS = 128  # conformance recomputes every stage in float64: run it on one short window
# Peak memory of a trace beyond the model, per element of the attention scores (batch x heads x n x n): the
# embedded model's peak RSS grew by about 6 bytes per element from 1200 to 2400 tokens; rounded up.
TRACE_BYTES_PER_SCORE = 8


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `trace` subcommand."""
    parser = sub.add_parser(
        "trace", help="per-layer activation-flow statistics (Appendix A.1) and conformance"
    )
    add_model_args(parser)
    add_token_args(parser, default_max_tokens=2048)
    parser.add_argument("--layers", type=int, nargs="+", default=None, help="block indices (default all)")
    parser.add_argument(
        "--stages", nargs="+", default=None, help="stage keys (E_in, Q, W_a, ...) or block hook names"
    )
    parser.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default 4)")
    parser.add_argument("--no-conformance", action="store_true", help="skip the Eqs. (4)-(8) recomputation")
    parser.set_defaults(func=run)


def check_trace_memory(lm: LoadedModel, windows: Int[Tensor, "w seqlen"], batch_size: int) -> None:
    """Refuse a trace whose attention scores (batch x heads x n^2) would not fit in the memory available."""
    rows, n = min(batch_size, windows.shape[0]), windows.shape[1]
    need = rows * lm.dims.h_attn * n * n * TRACE_BYTES_PER_SCORE
    free = available_memory(lm.device)
    if need > free:
        raise MechsliceError(
            f"tracing {rows} x {n} tokens at once needs about {need / 1e9:.1f} GB for the attention scores, "
            f"more than the {free / 1e9:.1f} GB available; trace shorter windows (--seqlen, or --corpus text:FILE "
            "instead of a long --text) or fewer at once (--batch-size)"
        )


def run(args: argparse.Namespace) -> int:
    """Trace, check conformance, print the table (one JSON object with --json)."""
    check_at_least(args.batch_size, 1, "--batch-size")
    lm = model_from_args(args)
    windows = token_windows(lm.tokenizer, args, lm.model.config.max_position_embeddings)
    check_trace_memory(lm, windows, args.batch_size)
    rss_model = peak_memory_gb()["cpu"] * 1024
    try:
        result = trace(lm.bridge, windows, stages=args.stages, layers=args.layers, batch_size=args.batch_size)
    except TraceError as err:
        raise MechsliceError(str(err)) from err
    payload: dict[str, Any] = {
        **model_fields(lm),
        "tokens": result.tokens,
        "rss_model_mb": rss_model,
        "peak_rss_mb": peak_memory_gb()["cpu"] * 1024,
        "stages": result.table(),
    }
    if not args.no_conformance:
        first = windows[:1, :CONFORMANCE_TOKENS]
        payload["conformance"] = check_conformance(_float32(lm, args), first, layers=result.layers).to_dict()
    emit(args, payload, _text)
    return 0


def _float32(lm: LoadedModel, args: argparse.Namespace) -> LoadedModel:
    """`lm` if it computes in float32, else the same weights loaded again in float32.

    Conformance's tolerance separates a wrong equation (deviations of 1e-2 and more) from float32 rounding;
    bfloat16 rounding alone reaches 1e-2, so the check runs in float32 whatever the trace computed in.
    """
    if lm.model.dtype == torch.float32:
        return lm
    return load_model(args.model, device=args.device or default_device(), dtype=torch.float32)


def _text(p: dict[str, Any]) -> str:
    lines = [
        f"{p['model']} ({p['dtype']}): {p['tokens']} tokens traced; peak RSS {p['peak_rss_mb']:.0f} MB "
        f"({p['rss_model_mb']:.0f} MB after loading)",
        f"{'layer':>5}  {'stage':<11} {'symbol':<24} {'shape':<16} {'mean |x|':>10} {'mean var':>10}",
    ]
    for r in p["stages"]:
        shape = "x".join(str(n) for n in r["shape"])
        lines.append(
            f"{r['layer']:>5}  {r['stage']:<11} {r['symbol']:<24} {shape:<16} {r['mean_norm']:>10.4g} "
            f"{r['var']:>10.4g}"
        )
    if "conformance" in p:
        c = p["conformance"]
        verdict = "PASS" if c["passed"] else "FAIL"
        lines.append(
            f"conformance {verdict} (max relative deviation per equation, tolerance {c['rel_tol']:g}):"
        )
        lines += [f"  {eq:<30} {dev:.2e}" for eq, dev in c["worst"].items()]
        lines += [f"  {n['equation']:<30} not applicable: {n['reason']}" for n in c["not_applicable"]]
        lines += [
            f"  never checked (hook did not fire): layer {m['layer']} {m['equation']}" for m in c["missing"]
        ]
        lines.append(f"Table 2: every weight's residual side has width {c['shared_d']}")
    return "\n".join(lines)
