"""`mechslice info`: the model's sizes and the paper's Table 2 read off the live weights."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from typing import Any

from mechslice.architecture import weight_table
from mechslice.commands._common import add_model_args, dtype_from_args, emit, model_fields
from mechslice.loading import default_device, load_model


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `info` subcommand."""
    parser = sub.add_parser("info", help="sizes (d, layers, heads, ...) and the Table 2 weight shapes")
    add_model_args(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the dtype chosen and why, the Table 1 sizes (d, n_layers, h_attn, v, h_dim, m, vocab), parameters, Table 2."""
    dtype, reason = dtype_from_args(args)
    lm = load_model(args.model, device=args.device or default_device(), dtype=dtype)
    dims = lm.dims
    payload = {
        **model_fields(lm),
        "dtype_reason": reason,
        "source": lm.source,
        "architecture": lm.adapter.model_type,
        **asdict(
            dims
        ),  # the paper's Table 1 names (d, m, h_attn, v, h_dim), as in the text below and the code
        "parameters": sum(p.numel() for p in lm.model.parameters()),
        "tied_embeddings": lm.model.get_input_embeddings().weight is lm.model.get_output_embeddings().weight,
        "weights": [row.to_dict() for row in weight_table(lm)],
    }
    emit(args, payload, _text)
    return 0


def _text(p: dict[str, Any]) -> str:
    lines = [
        f"{p['model']}: {p['model_description']} ({p['architecture']}) from {p['source']}",
        f"  dtype {p['dtype']} ({p['dtype_reason']})",
        f"  d={p['d']}  n_layers={p['n_layers']}  h_attn={p['h_attn']}  v={p['v']}  h_dim={p['h_dim']}"
        f"  m={p['m']}  vocab={p['vocab']}  parameters={p['parameters']:,}  tied={p['tied_embeddings']}",
        "",
        "Table 2 (layer 0; shapes as input x output):",
        f"  {'matrix':<10} {'symbolic':<24} {'shape':<14} matches",
    ]
    for row in p["weights"]:
        shape = " x ".join(str(n) for n in row["shape"])
        lines.append(f"  {row['symbol']:<10} {row['symbolic']:<24} {shape:<14} {row['matches']}")
    return "\n".join(lines)
