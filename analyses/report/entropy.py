"""Residual-stream entropy per layer: curves and ratios per estimator, the premise H'/H = 1 - s across
estimators, and a table of the signal ratio per sparsity.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import plotly.graph_objects as go
from numpy.typing import ArrayLike

from analyses.entropy import BIASED_IN_D, RANK, SIGNAL
from analyses.laws import record_signal
from analyses.report.layers import layer_curves
from analyses.report.markup import FigureRenderer, fmt, html_table, note_html
from analyses.report.style import DENSE_COLOR, is_dense, s_label, sorted_records, sparsity_color

_ENTROPY_HEAD = "mean H'/H (layers used), d(H'/H)/d ln c, mean κ"


_RATIO_HEAD = {RANK: "mean erank'/erank (layers used)"}


def entropy_stats(records: Sequence[dict[str, Any]], estimator: str) -> list[dict[str, Any]]:
    return [st for rec in records if (st := (rec.get("entropy") or {}).get(estimator))]


def on_dense_blocks(values: Sequence[float | None], rec: dict[str, Any]) -> list[float | None]:
    """Per-layer values at the dense index of their block: a model that lost blocks (the layers method)
    names its blocks under `entropy.layers`; a lost block is NaN, a gap in the curve."""
    blocks = (rec.get("entropy") or {}).get("layers")
    if blocks is None:
        return list(values)
    out: list[float | None] = [math.nan] * (max(blocks) + 1)
    for block, value in zip(blocks, values, strict=True):
        out[block] = value
    return out


def entropy_figures(records: Sequence[dict[str, Any]], estimator: str) -> tuple[go.Figure, go.Figure]:
    """Per-layer entropy H_l (one curve per sparsity, the dense one in black) and per-layer H'_l/H_l with its
    1 - s as a dashed line."""
    curves = go.Figure()
    dense = next(
        (st["per_layer_dense"] for st in entropy_stats(records, estimator) if st.get("per_layer_dense")), None
    )
    dense_drawn = any(
        is_dense(r) and ((r.get("entropy") or {}).get(estimator) or {}).get("per_layer") for r in records
    )
    if dense and not dense_drawn:  # the dense record's own curve, when it has one, is the same line
        curves.add_trace(
            go.Scatter(
                x=list(range(len(dense))),
                y=dense,
                mode="lines",
                name="dense (s = 0)",
                line=dict(color=DENSE_COLOR),
            )
        )
    ratio_curves, colors, levels = {}, {}, {}
    for rec in records:
        stats = (rec.get("entropy") or {}).get(estimator)
        if not stats:
            continue
        color, label = sparsity_color(rec), s_label(rec)
        if stats.get("per_layer"):
            h = on_dense_blocks(stats["per_layer"], rec)
            curves.add_trace(
                go.Scatter(
                    x=list(range(len(h))), y=h, mode="lines+markers", name=label, line=dict(color=color)
                )
            )
        if stats.get("ratio_per_layer"):
            ratio_curves[label] = on_dense_blocks(stats["ratio_per_layer"], rec)
            colors[label] = color
            levels[label] = (f"1 - s ({label})", 1.0 - rec["effective_sparsity"])
    ratios = layer_curves(ratio_curves, colors=colors, levels=levels)
    curves.update_layout(
        title=f"Residual-stream entropy per layer ({estimator}, nats per token vector)",
        xaxis_title="layer",
        yaxis_title="H_l",
    )
    ratios.update_layout(
        title=f"H'_l / H_l per layer ({estimator}); dashed: 1 - s", xaxis_title="layer", yaxis_title="H' / H"
    )
    return curves, ratios


def entropy_ratio_figure(records: Sequence[dict[str, Any]], estimators: Sequence[str]) -> go.Figure:
    """The premise H'/H = 1 - s: each estimator's signal ratio (`record_signal`) against 1 - s, with y = x."""
    fig = go.Figure()
    for est in estimators:
        pts = [
            (1.0 - rec["effective_sparsity"], signal.ratio)
            for rec in records
            if (st := (rec.get("entropy") or {}).get(est))
            and (signal := record_signal(rec, st)) is not None
            and signal.ratio is not None
        ]
        if pts:
            fig.add_trace(
                go.Scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="markers+lines", name=est)
            )
    lo, hi = data_range([v for trace in fig.data for v in (*trace.x, *trace.y)])
    fig.add_trace(
        go.Scatter(
            x=[lo, hi], y=[lo, hi], mode="lines", name="H'/H = 1 - s", line=dict(color="black", dash="dash")
        )
    )
    fig.update_layout(
        title="Entropy ratio vs 1 - s (mean over the layers where it reads as a fraction kept)",
        xaxis=dict(title="1 - s", range=[lo, hi]),
        yaxis=dict(title="mean H'/H", range=[lo, hi]),
    )
    return fig


def data_range(values: ArrayLike, margin: float = 0.05) -> tuple[float, float]:
    """The span of `values` widened by `margin` of it on each side (0.02 at least), for an axis that fits
    its data; (0, 1) when there are none."""
    if not values:
        return 0.0, 1.0
    lo, hi = min(values), max(values)
    pad = max(margin * (hi - lo), 0.02)
    return lo - pad, hi + pad


def _entropy_estimators(records: Sequence[dict[str, Any]]) -> list[str]:
    return sorted(
        {e for rec in records for e, v in (rec.get("entropy") or {}).items() if isinstance(v, dict)}
    )


def _entropy_table(records: Sequence[dict[str, Any]], estimators: Sequence[str]) -> str:
    """Per sparsity and estimator: the signal ratio with the layers it averages, and its unit sensitivity."""
    head = ["s", "1 - s", *(f"{e}: {_RATIO_HEAD.get(e, _ENTROPY_HEAD)}" for e in estimators)]
    rows = []
    for rec in records:
        cells = [f"{rec['effective_sparsity']:.3f}", f"{1.0 - rec['effective_sparsity']:.3f}"]
        for e in estimators:
            st = (rec.get("entropy") or {}).get(e) or {}
            signal = record_signal(rec, st) if st else None
            if signal is None or signal.ratio is None:
                cells.append("n/a")
                continue
            per_layer = st.get("ratio_per_layer") or []
            cell = (
                f"{fmt(signal.ratio)} ({len(signal.layers)}/{len(per_layer)})"
                if per_layer
                else fmt(signal.ratio)
            )
            sens = st.get("unit_sensitivity_per_layer") or []
            used = [sens[int(k)] for k in signal.layers] if len(sens) == len(per_layer) else []
            if used and all(v is not None for v in used):
                cell += f", {fmt(float(sum(used) / len(used)), '+.3f')}"
            if st.get("kappa_mean") is not None:
                cell += f", κ {fmt(st['kappa_mean'], '.4g')}"
            cells.append(cell)
        rows.append(cells)
    return html_table(head, rows)


def entropy_section(results: dict[str, Any], render: FigureRenderer) -> str:
    """Per-layer entropy curves and ratios per estimator, the layer-mean premise check, a table."""
    records = sorted_records(results)
    estimators = _entropy_estimators(records)
    if not estimators:
        return note_html("The sweep recorded no residual-stream entropy (run it with entropy estimation on).")
    parts = [render(entropy_ratio_figure(records, estimators)), _entropy_table(records, estimators)]
    parts.append(
        note_html(
            f"Each ratio is {SIGNAL}; in brackets the layers used of those recorded. d(H'/H)/d ln c is how "
            "far that ratio moves per factor e in the unit of the activations (H(cX) = H(X) + d ln c): no "
            "ratio of entropies of different widths is unit-free. The effective rank exp(H(λ/Σλ)) of the "
            "covariance spectrum is free of unit and basis."
        )
    )
    streams = {(rec.get("entropy") or {}).get("stream") for rec in records if rec.get("entropy")}
    if None in streams:
        parts.append(
            note_html(
                "Some sparsities were recorded before entropy was measured on the RMS-normalised stream: "
                "their ratios depend on the unit of the activations, and their marginal ratios compare the "
                "dense stream's original basis with the sliced stream's PCA basis."
            )
        )
    mixed = [e for e in estimators if any(st.get("same_sign") is False for st in entropy_stats(records, e))]
    if mixed:
        parts.append(
            note_html(
                f"{', '.join(mixed)}: some layers' dense and sliced entropies differ in sign, so there H'/H "
                "does not read as a fraction of entropy kept; those layers are left out of the mean ratio."
            )
        )
    biased = [e for e in estimators if e in BIASED_IN_D]
    if biased:
        parts.append(
            note_html(
                f"{', '.join(biased)}: its bias depends on the dimension, so its H'/H compares two differently "
                "biased numbers; shown for reference, left out of the prediction from internals."
            )
        )
    for est in estimators:
        curves, ratios = entropy_figures(records, est)
        parts += [render(curves), render(ratios)]
    return "".join(parts)
