"""Predicting ln PPL without evaluating: from the entropy ratio alone against the measured ln PPL, and the three
predictors (law, internals, dense) on the law's held-back sparsities.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import plotly.graph_objects as go

from analyses.entropy import SIGNAL
from analyses.laws import FitTable, entropy_predictions
from analyses.predictors import Comparison, compare_predictors
from analyses.report.markup import FigureRenderer, esc, fmt, html_table, note_html
from analyses.report.style import DENSE_COLOR, sorted_records
from analyses.results import PPL, dense_record
from mechslice.errors import MechsliceError


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


def prediction_section(results: dict[str, Any], table: FitTable | None, render: FigureRenderer) -> str:
    """ln PPL predicted from the entropy ratio alone (and from 1 - s) against the measured one."""
    preds = entropy_predictions(results)
    if not preds:
        return note_html(
            "No prediction from internals: it needs the dense perplexity and an entropy ratio per sparsity."
        )
    head = [
        "estimator",
        "s",
        "H'/H",
        "ln PPL predicted",
        "ln PPL measured",
        "|error|",
        "rel. error",
        "layers left out",
    ]
    rows = [
        [
            esc(est),
            f"{p.effective_sparsity:.3f}",
            f"{p.ratio:.3f}",
            f"{p.ln_ppl_predicted:.3f}",
            f"{p.ln_ppl_measured:.3f}",
            f"{p.abs_error:.3f}",
            f"{p.rel_error:.1%}",
            esc(", ".join(f"{k} ({why})" for k, why in p.excluded.items()) or "none"),
        ]
        for est, ps in preds.items()
        for p in ps
    ]
    body = (
        render(prediction_figure(results, table))
        + html_table(head, rows)
        + note_html(f"H'/H here is {SIGNAL}.")
    )
    return body + predictors_html(results, render)


def _pct(x: float | None, spec: str = "+.1%") -> str:
    """A relative error as a percentage; a dash when not measured, "unbounded" for an unbounded prediction."""
    return "–" if x is None else ("unbounded" if math.isinf(x) else format(x, spec))


def predictors_html(results: dict[str, Any], render: FigureRenderer) -> str:
    """The law (fitted on the smallest sparsities), internals and dense-only predictors on the same held-back
    points: a figure against the measured curve and each one's relative errors of PPL and ln PPL."""
    try:
        comparison = compare_predictors(results)
    except MechsliceError as err:
        return note_html(f"The three predictors are not compared: {err}")
    if not comparison.held_back:
        return note_html(
            "The three predictors are not compared: the law is fitted on every sparsity the sweep has."
        )
    methods = list(comparison.predictions.items())
    head = ["s", "PPL measured"] + [f"{m}: PPL, err PPL, err ln PPL" for m, _ in methods]
    rows = []
    for s in comparison.held_back:
        cells = []
        measured = "–"
        for _, prediction in methods:
            p = next((p for p in prediction.points if abs(p.sparsity - s) < 1e-9), None)
            if p is None:
                cells.append("–")
                continue
            if p.ln_ppl_measured is not None:
                measured = fmt(math.exp(p.ln_ppl_measured), ".4g")
            cells.append(f"{fmt(p.ppl, '.4g')}, {_pct(p.rel_error_ppl)}, {_pct(p.rel_error_ln_ppl)}")
        rows.append([f"{s:g}", measured, *cells])
    means = [prediction.mean_abs_errors() for _, prediction in methods]
    rows.append(
        ["mean |error|", ""] + [f"{_pct(m['ppl'], '.1%')}, {_pct(m['ln_ppl'], '.1%')}" for m in means]
    )
    notes = [note for _, prediction in methods for note in prediction.notes]
    notes += [f"{method}: not shown, {why}" for method, why in comparison.missing.items()]
    return (
        render(predictors_figure(results, comparison))
        + html_table(head, [[esc(c) for c in row] for row in rows])
        + "".join(note_html(n) for n in notes)
    )
