"""The report's plotly figures, drawn from results.json records: Fig. 3a/3b analogues, the ln PPL prediction,
per-layer entropy, eigenvalue spectra of the rotations and the output shift.

Each sparsity keeps one colour (`sparsity_color`) in every figure.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.colors import qualitative, sample_colorscale
from plotly.subplots import make_subplots

from analyses.chance import AT_CHANCE
from analyses.fits import LineFit
from analyses.laws import (
    DENSE_TOLERANCE,
    PAPER_TABLE3,
    PPL,
    FitTable,
    dense_record,
    entropy_predictions,
    record_signal,
)
from analyses.layer_plots import bin_labels, binned_log_shares, index_bins, layer_curves, spectra_heatmap
from analyses.predictors import Comparison
from analyses.report_text import PAPER_SHORT, STDERR_KEYS, task_label

SHIFT_PANELS = (
    ("kl", "KL(p0 || ps) (nats)"),
    ("js", "JS divergence (nats)"),
    ("top1_agreement", "top-1 agreement"),
)

# One distinct hue per task (a qualitative palette: a sequential one makes tasks look like an ordered series).
TASK_COLORS = qualitative.D3
AT_CHANCE_COLOR = "#b0b0b0"  # a task at chance: drawn apart, grey
X_SPREAD = 0.012  # neighbouring tasks' points: this share of the s range apart, ~12 px, past a 4 px bar cap
DENSE_COLOR = "black"
S_COLOR_MAX = 0.6  # sparsities from here on share the lightest colour


def sorted_records(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The sweep's records by effective sparsity, dense first."""
    return sorted(results["records"], key=lambda r: r["effective_sparsity"])


def _is_dense(rec: dict[str, Any]) -> bool:
    return rec["effective_sparsity"] < DENSE_TOLERANCE


def sparsity_color(rec: dict[str, Any]) -> str:
    """A colour fixed by the effective sparsity (black for dense, then dark to light by S_COLOR_MAX), the same
    in every figure."""
    if _is_dense(rec):
        return DENSE_COLOR
    return sample_colorscale("Viridis", [0.9 * min(rec["effective_sparsity"] / S_COLOR_MAX, 1.0)])[0]


def s_label(rec: dict[str, Any]) -> str:
    """A record's legend name: its effective sparsity, or "dense (s = 0)"."""
    return "dense (s = 0)" if _is_dense(rec) else f"s = {rec['effective_sparsity']:.3f}"


def _line_xs(fit: LineFit) -> np.ndarray:
    """The two ends of a straight line drawn over the fitted sparsities."""
    return np.array([0.0, max(fit.s_max, 0.05)])


def _paper_line_traces(
    fit: LineFit, dataset: str, color: str | None = None, group: str = ""
) -> list[go.Scatter]:
    """Table 3's line of each paper model for `dataset` over our fitted range (Llama-3 dashed, Phi-3 dash-dot);
    with `group`, in `color` and in that legend group, its name prefixed by it."""
    xs = _line_xs(fit)
    return [
        go.Scatter(
            x=xs,
            y=p.a * xs + p.b,
            mode="lines",
            name=f"{group + ': ' if group else ''}Table 3 {PAPER_SHORT[m]} ({p.a:+.2f}s {p.b:+.2f})",
            line=dict(dash="dash" if i == 0 else "dashdot", width=1.5, color=color),
            legendgroup=group or None,
        )
        for i, (m, p) in enumerate(PAPER_TABLE3.get(dataset, {}).items())
    ]


def _fit_trace(fit: LineFit, name: str, color: str | None = None) -> go.Scatter:
    xs = _line_xs(fit)
    return go.Scatter(
        x=xs,
        y=fit.a * xs + fit.b,
        mode="lines",
        name=f"{name} fit ({fit.a:+.2f}s {fit.b:+.2f})",
        line=dict(color=color),
    )


def figure_3a(table: FitTable) -> go.Figure:
    """Fig. 3a analogue: ln PPL0 / ln PPL against effective sparsity, our fit, y = 1 - s, Table 3's lines."""
    row = table.row(PPL)
    xs = _line_xs(row.fit)
    fig = go.Figure()
    fig.add_trace(
        go.Scatter(x=row.points.s, y=row.points.y, mode="markers", name="measured", marker=dict(size=9))
    )
    fig.add_trace(_fit_trace(row.fit, "our", "#1f77b4"))
    fig.add_trace(
        go.Scatter(x=xs, y=1.0 - xs, mode="lines", name="paper: y = 1 - s", line=dict(color="black"))
    )
    for trace in _paper_line_traces(row.fit, PPL):
        fig.add_trace(trace)
    fig.update_layout(
        title="Fig. 3a analogue: ln PPL0 / ln PPL vs effective sparsity",
        xaxis_title="effective sparsity s = 1 - d'/d",
        yaxis_title="ln PPL0 / ln PPL",
    )
    return fig


def accuracy_points(
    results: dict[str, Any], task: str, acc_key: str
) -> tuple[list[float], list[float], list[float | None]]:
    """(s, ln(acc/acc0), standard error) of `task`; se(ln acc) ~ stderr/acc (delta method), None if unknown."""
    dense = dense_record(results)
    acc0 = dense["tasks"][task][acc_key]
    s, y, err = [], [], []
    for rec in sorted_records(results):
        m = rec.get("tasks", {}).get(task, {})
        acc = m.get(acc_key)
        if acc is None or acc <= 0.0:
            continue
        se = m.get(STDERR_KEYS[acc_key])
        s.append(float(rec["effective_sparsity"]))
        y.append(math.log(acc / acc0))
        err.append(None if se is None else se / acc)
    return s, y, err


def _offsets(n: int, fits: Sequence[LineFit]) -> list[float]:
    """x shifts that spread n tasks' points around each sparsity so their error bars do not overlap."""
    step = X_SPREAD * max([f.s_max for f in fits] + [0.05])
    return [(i - (n - 1) / 2) * step for i in range(n)]


def _task_traces(
    label: str,
    color: str,
    points: tuple[Sequence[float], Sequence[float], Sequence[float | None]],
    fit: LineFit,
    shift: float,
    y_name: str,
) -> list[go.Scatter]:
    """One task's points (shifted by `shift` along s, the true s in the hover) with error bars, and its fit."""
    s, y, err = points
    dots = go.Scatter(
        x=[v + shift for v in s],
        y=y,
        customdata=s,
        hovertemplate=f"{label}<br>s = %{{customdata:.3f}}<br>{y_name} = %{{y:.3f}}<extra></extra>",
        mode="markers",
        name=label,
        marker=dict(color=color, size=8),
        error_y=dict(
            type="data",
            array=[0.0 if e is None else e for e in err],
            visible=any(e is not None for e in err),
        ),
        legendgroup=label,
    )
    line = _fit_trace(fit, label, color)
    line.legendgroup = label
    return [dots, line]


def figure_3b(results: dict[str, Any], table: FitTable) -> go.Figure:
    """Fig. 3b analogue: ln(acc/acc0) per task against effective sparsity, with error bars, our fitted line
    and Table 3's lines, one qualitative colour per task; points are shifted a little along s (hover: the
    true s) so that the tasks' error bars stay apart. A task at chance is drawn grey, labelled so."""
    fig = go.Figure()
    rows = [r for r in table.rows if r.metric == "accuracy"]
    for i, (row, shift) in enumerate(zip(rows, _offsets(len(rows), [r.fit for r in rows]), strict=True)):
        at_chance = row.chance is not None and row.chance.at_chance is not None
        color = AT_CHANCE_COLOR if at_chance else TASK_COLORS[i % len(TASK_COLORS)]
        label = task_label(row.dataset) + (f" ({AT_CHANCE})" if at_chance else "")
        points = accuracy_points(results, row.dataset, table.acc_key)
        for trace in _task_traces(label, color, points, row.fit, shift, "ln(acc/acc0)"):
            fig.add_trace(trace)
        for trace in _paper_line_traces(row.fit, row.dataset, color, label):
            fig.add_trace(trace)
    fig.update_layout(
        title=f"Fig. 3b analogue: ln(acc/acc0) vs effective sparsity ({table.acc_key}; bars ±1 se; "
        "solid: our fit, dashed: Table 3 Llama-3, dash-dot: Phi-3)",
        xaxis_title="effective sparsity s = 1 - d'/d (points spread slightly per task)",
        yaxis_title="ln(acc / acc0)",
    )
    return fig


def figure_3b_corrected(table: FitTable) -> go.Figure | None:
    """The chance-corrected law: ln((acc - c)/(acc0 - c)) per task against s with its fit (bars: ±1 se of each
    point's own acc, delta method); tasks at chance or without a corrected fit are left out. None when no task
    has one."""
    rows = [r for r in table.rows if r.chance is not None and r.chance.fit is not None]
    if not rows:
        return None
    fig = go.Figure()
    for i, (row, shift) in enumerate(zip(rows, _offsets(len(rows), [r.fit for r in rows]), strict=True)):
        law = row.chance
        points = (law.points.s, law.points.y, np.sqrt(law.points.var))  # own error only, as in Fig. 3b
        label = f"{task_label(row.dataset)} (c = {law.chance:.3f})"
        for trace in _task_traces(label, TASK_COLORS[i % len(TASK_COLORS)], points, law.fit, shift, "y"):
            fig.add_trace(trace)
    fig.update_layout(
        title=f"Chance-corrected accuracy law: ln((acc - c)/(acc0 - c)) vs effective sparsity ({table.acc_key}; "
        "bars ±1 se)",
        xaxis_title="effective sparsity s = 1 - d'/d (points spread slightly per task)",
        yaxis_title="ln((acc - c) / (acc0 - c))",
    )
    return fig


def entropy_stats(records: Sequence[dict[str, Any]], estimator: str) -> list[dict[str, Any]]:
    return [st for rec in records if (st := (rec.get("entropy") or {}).get(estimator))]


def entropy_figures(records: Sequence[dict[str, Any]], estimator: str) -> tuple[go.Figure, go.Figure]:
    """Per-layer entropy H_l (one curve per sparsity, the dense one in black) and per-layer H'_l/H_l with its
    1 - s as a dashed line."""
    curves = go.Figure()
    dense = next(
        (st["per_layer_dense"] for st in entropy_stats(records, estimator) if st.get("per_layer_dense")), None
    )
    dense_drawn = any(
        _is_dense(r) and ((r.get("entropy") or {}).get(estimator) or {}).get("per_layer") for r in records
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
            h = stats["per_layer"]
            curves.add_trace(
                go.Scatter(
                    x=list(range(len(h))), y=h, mode="lines+markers", name=label, line=dict(color=color)
                )
            )
        if stats.get("ratio_per_layer"):
            ratio_curves[label] = stats["ratio_per_layer"]
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


def data_range(values: Sequence[float], margin: float = 0.05) -> tuple[float, float]:
    """The span of `values` widened by `margin` of it on each side (0.02 at least), for an axis that fits
    its data; (0, 1) when there are none."""
    if not values:
        return 0.0, 1.0
    lo, hi = min(values), max(values)
    pad = max(margin * (hi - lo), 0.02)
    return lo - pad, hi + pad


def prediction_figure(results: dict[str, Any], table: FitTable | None) -> go.Figure:
    """Measured ln PPL vs s, with ln PPL0/(1-s), the fitted law, and ln PPL0/(H'/H) per entropy estimator."""
    records = [r for r in sorted_records(results) if r.get("ppl") is not None and r["ppl"] > 1.0]
    ppl0 = dense_record(results)["ppl"]
    fig = go.Figure()
    s = [r["effective_sparsity"] for r in records]
    fig.add_trace(
        go.Scatter(
            x=s,
            y=[math.log(r["ppl"]) for r in records],
            mode="markers",
            name="measured",
            marker=dict(size=10),
        )
    )
    xs = np.linspace(0.0, max(s), 50)
    fig.add_trace(
        go.Scatter(
            x=xs,
            y=math.log(ppl0) / (1.0 - xs),
            mode="lines",
            name="ln PPL0 / (1 - s)",
            line=dict(color="black"),
        )
    )
    if table is not None and any(r.dataset == PPL for r in table.rows):
        fit = table.row(PPL).fit
        ys = fit.a * xs + fit.b
        fig.add_trace(
            go.Scatter(
                x=xs[ys > 0], y=math.log(ppl0) / ys[ys > 0], mode="lines", name="ln PPL0 / (a s + b), our fit"
            )
        )
    for est, preds in entropy_predictions(results).items():
        fig.add_trace(
            go.Scatter(
                x=[p.effective_sparsity for p in preds],
                y=[p.ln_ppl_predicted for p in preds],
                mode="markers+lines",
                name=f"ln PPL0 / (H'/H), {est}",
                line=dict(dash="dot"),
            )
        )
    fig.update_layout(
        title="ln PPL: measured and predicted", xaxis_title="effective sparsity s", yaxis_title="ln PPL"
    )
    return fig


PREDICTOR_STYLE = {"law": "circle-open", "internals": "diamond", "dense": "x"}


def predictors_figure(results: dict[str, Any], comparison: Comparison) -> go.Figure:
    """The measured ln PPL curve with the three predictors at the law's held-back sparsities (the law with
    its prediction intervals; an unbounded prediction or bound is not drawn)."""
    records = [r for r in sorted_records(results) if r.get("ppl") is not None and r["ppl"] > 1.0]
    fig = go.Figure()
    fig.add_trace(
        go.Scatter(
            x=[r["effective_sparsity"] for r in records],
            y=[math.log(r["ppl"]) for r in records],
            mode="markers+lines",
            name="measured",
            line=dict(color=DENSE_COLOR),
        )
    )
    for method, prediction in comparison.predictions.items():
        points = [p for p in prediction.points if p.ln_ppl is not None]
        ys = [p.ln_ppl for p in points]
        error_y = None
        if method == "law":
            bounds = [p.ln_ppl_interval or (None, None) for p in points]
            error_y = dict(
                type="data",
                array=[0.0 if hi is None else hi - y for (_, hi), y in zip(bounds, ys, strict=True)],
                arrayminus=[0.0 if lo is None else y - lo for (lo, _), y in zip(bounds, ys, strict=True)],
            )
        label = method if prediction.estimator is None else f"{method} ({prediction.estimator})"
        if prediction.fit_on:
            label += f", fitted on s = {', '.join(f'{s:g}' for s in prediction.fit_on)}"
        fig.add_trace(
            go.Scatter(
                x=[p.effective_sparsity for p in points],
                y=ys,
                mode="markers",
                name=label,
                error_y=error_y,
                marker=dict(size=11, symbol=PREDICTOR_STYLE[method]),
            )
        )
    fig.update_layout(
        title="ln PPL at the held-back sparsities: three predictors against the measured curve",
        xaxis_title="effective sparsity s",
        yaxis_title="ln PPL",
    )
    return fig


def descending(eigenvalues: Sequence[float]) -> np.ndarray:
    """Eigenvalues sorted descending, in float64, with negatives (round-off of a PSD matrix) set to 0."""
    return np.sort(np.clip(np.asarray(eigenvalues, dtype=np.float64), 0.0, None))[::-1]


def kept_fraction(eigenvalues: Sequence[float], d_prime: int) -> float:
    """Share of the second-moment mass in the top d' eigenvalues (negatives from round-off count as 0)."""
    lam = descending(eigenvalues)
    total = lam.sum()
    return float(lam[:d_prime].sum() / total) if total > 0 else math.nan


def _shares(eigenvalues: Sequence[float]) -> np.ndarray:
    """Eigenvalues as descending shares λ_i / Σλ (all zero when the spectrum is)."""
    lam = descending(eigenvalues)
    return lam / lam.sum() if lam.sum() > 0 else lam


def _kept_trace(rec: dict[str, Any], rotations: list[dict[str, Any]]) -> go.Scatter:
    return go.Scatter(
        x=[r["name"] for r in rotations],
        y=[kept_fraction(r["eigenvalues"], rec["d_prime"]) for r in rotations],
        mode="lines+markers",
        name=f"{s_label(rec)}, d'={rec['d_prime']}",
        line=dict(color=sparsity_color(rec)),
    )


def _column_of(edges: Sequence[int], index: int) -> int:
    """The heat-map column holding 1-based eigenvalue index `index`."""
    return next(j for j, hi in enumerate(edges[1:]) if index <= hi)


def _d_prime_shape(edges: Sequence[int], d_prime: int) -> dict[str, Any]:
    """The dotted line after the column holding index d' (columns sit at 0, 1, ... on the category axis)."""
    x = _column_of(edges, d_prime) + 0.5
    return dict(
        type="line", x0=x, x1=x, y0=0, y1=1, yref="paper", line=dict(dash="dot", color="white", width=2)
    )


def _index_ticks(edges: Sequence[int]) -> tuple[list[str], list[str]]:
    """Tick positions (column names) and texts at the columns holding indices 1, 2, 5, 10, 20, 50, ..., d."""
    labels = bin_labels(edges)
    wanted = [k * 10**e for e in range(6) for k in (1, 2, 5)] + [edges[-1]]
    at = {_column_of(edges, i): i for i in reversed(wanted) if i <= edges[-1]}  # the first wanted per column
    return [labels[j] for j in sorted(at)], [str(at[j]) for j in sorted(at)]


def _spectrum_menu(
    spectra: Sequence[tuple[dict[str, Any], list[dict[str, Any]]]], edges: list[int]
) -> list[dict[str, Any]]:
    """One button per sparsity: show its heat map, move the d' line, retitle."""
    return [
        dict(
            label=s_label(rec),
            method="update",
            args=[
                {"visible": [j == i for j in range(len(spectra))]},
                {"shapes": [_d_prime_shape(edges, rec["d_prime"])], "title.text": _spectra_title(rec)},
            ],
        )
        for i, (rec, _) in enumerate(spectra)
    ]


def _spectra_title(rec: dict[str, Any]) -> str:
    return f"Eigenvalue spectra per rotation ({s_label(rec)}, d'={rec['d_prime']}; dotted: d')"


def spectra_figures(
    spectra: Sequence[tuple[dict[str, Any], list[dict[str, Any]]]],
) -> tuple[go.Figure, go.Figure]:
    """Kept share of eigenvalue mass per rotation (a curve per sparsity), and a heat map of every rotation's
    normalised spectrum (a row each, as the spectra file lists them; log-binned eigenvalue index across) with a menu to pick the
    sparsity; the dotted line marks d'. A heat map, not a line per rotation: sixty lines on one axis cannot be
    told apart, and binning bounds the page's size whatever d is."""
    kept = go.Figure([_kept_trace(rec, rotations) for rec, rotations in spectra])
    edges = index_bins(max(len(r["eigenvalues"]) for _, rotations in spectra for r in rotations))
    shares = [[_shares(r["eigenvalues"]) for r in rotations] for _, rotations in spectra]
    logs = np.concatenate([binned_log_shares(s, edges).ravel() for s in shares])
    zrange = (float(np.nanmin(logs)), float(np.nanmax(logs)))  # one colour scale for every sparsity
    full = go.Figure()
    for i, ((_, rotations), rows) in enumerate(zip(spectra, shares, strict=True)):
        full.add_trace(spectra_heatmap([r["name"] for r in rotations], rows, edges, zrange))
        full.data[-1].visible = i == 0
    menu = _spectrum_menu(spectra, edges)
    tickvals, ticktext = _index_ticks(edges)
    first = spectra[0][0]
    full.update_layout(
        title=_spectra_title(first),
        xaxis=dict(
            title="eigenvalue index (descending; log-spaced bins)", tickvals=tickvals, ticktext=ticktext
        ),
        yaxis=dict(title="rotation", autorange="reversed"),
        shapes=[_d_prime_shape(edges, first["d_prime"])],
        updatemenus=[dict(buttons=menu, x=1.0, y=1.15, xanchor="right")] if len(menu) > 1 else [],
    )
    kept.update_layout(
        title="Share of eigenvalue mass kept by the top d' directions, per rotation",
        xaxis_title="rotation (in network order)",
        yaxis_title="Σ_{i≤d'} λ_i / Σ λ",
    )
    return kept, full


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
