"""Output-distribution shift: KL, JS, predictive entropies and top-1 agreement of the sliced model's next-token
distribution against the dense one's, as a figure, a table, and KL by token position.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analyses.report.markup import FigureRenderer, fmt, html_table, note_html
from analyses.report.style import s_label, sorted_records, sparsity_color

SHIFT_PANELS = (
    ("kl", "KL(p0 || ps) (nats)"),
    ("js", "JS divergence (nats)"),
    ("top1_agreement", "top-1 agreement"),
)


def shift_overall(rec: dict[str, Any]) -> dict[str, Any] | None:
    """The record's whole-sequence output-shift metrics, or None when it has none."""
    shift = rec.get("shift")
    if not isinstance(shift, dict):
        return None
    return shift.get("overall", shift)  # a flattened record, or ShiftResult.to_dict() as it is


def shift_figure(records: Sequence[dict[str, Any]]) -> go.Figure:
    """KL, JS and top-1 agreement of the sliced model's next-token distribution against the dense one's."""
    fig = make_subplots(rows=1, cols=len(SHIFT_PANELS), subplot_titles=[t for _, t in SHIFT_PANELS])
    for col, (key, _) in enumerate(SHIFT_PANELS, start=1):
        pts = [(r["effective_sparsity"], shift_overall(r).get(key)) for r in records]
        pts = [p for p in pts if p[1] is not None]
        fig.add_trace(
            go.Scatter(
                x=[p[0] for p in pts], y=[p[1] for p in pts], mode="lines+markers", name=key, showlegend=False
            ),
            row=1,
            col=col,
        )
        fig.update_xaxes(title_text="effective sparsity s", row=1, col=col)
    fig.update_layout(title="Output-distribution shift vs sparsity")
    return fig


def shift_bucket_figure(records: Sequence[dict[str, Any]]) -> go.Figure | None:
    """KL per position bucket, one curve per sparsity; None when no record has buckets."""
    fig = go.Figure()
    for rec in records:
        buckets = (rec.get("shift") or {}).get("buckets") or []
        pts = [
            (f"{b['lo']}–{'' if b.get('hi') is None else b['hi']}", (b.get("stats") or b).get("kl"))
            for b in buckets
            if isinstance(b, dict) and "lo" in b
        ]
        pts = [p for p in pts if p[1] is not None]
        if pts:
            fig.add_trace(
                go.Scatter(
                    x=[p[0] for p in pts],
                    y=[p[1] for p in pts],
                    mode="lines+markers",
                    name=s_label(rec),
                    line=dict(color=sparsity_color(rec)),
                )
            )
    if not fig.data:
        return None
    fig.update_layout(title="KL per token-position bucket", xaxis_title="positions", yaxis_title="KL (nats)")
    return fig


def shift_section(results: dict[str, Any], render: FigureRenderer) -> str:
    """Output shift vs sparsity, a table of it, and KL by position when buckets were recorded."""
    records = [r for r in sorted_records(results) if shift_overall(r) is not None]
    if not records:
        return note_html("The sweep recorded no output-distribution shift.")
    columns = {
        "kl": "KL",
        "js": "JS",
        "top1_agreement": "top-1 agreement",
        "entropy_dense": "predictive entropy, dense",
        "entropy_sliced": "predictive entropy, sliced",
        "ln_ppl_ratio": "ln PPL0 / ln PPL (probe tokens)",
    }
    rows = [
        [f"{r['effective_sparsity']:.3f}", f"{1.0 - r['effective_sparsity']:.3f}"]
        + [fmt(shift_overall(r).get(k), ".4g") for k in columns]
        for r in records
    ]
    parts = [render(shift_figure(records), height=400), html_table(["s", "1 - s", *columns.values()], rows)]
    buckets = shift_bucket_figure(records)
    if buckets is not None:
        parts.append(render(buckets))
    return "".join(parts)
