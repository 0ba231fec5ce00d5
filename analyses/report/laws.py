"""Figs. 3a and 3b and Table 3 redone on our model: the perplexity law (Prop. 2) and the accuracy law (Prop. 3)
per task, our fits beside the paper's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
from numpy.typing import ArrayLike
from plotly.colors import qualitative

from analyses.chance import AT_CHANCE
from analyses.fits import LineFit
from analyses.laws import DENSE_NOTE, FitTable
from analyses.paper import PAPER_DATASETS, PAPER_SHORT, PAPER_TABLE3
from analyses.report.markup import ci_text, dataset_label, esc, fmt, html_table, note_html, task_label
from analyses.report.style import sorted_records
from analyses.results import PPL, STDERR_KEYS, dense_record

# One distinct hue per task (a qualitative palette: a sequential one makes tasks look like an ordered series).
TASK_COLORS = qualitative.D3


AT_CHANCE_COLOR = "#b0b0b0"  # a task at chance: drawn apart, grey


X_SPREAD = 0.012  # neighbouring tasks' points: this share of the s range apart, ~12 px, past a 4 px bar cap


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


def task_offsets(n: int, fits: Sequence[LineFit]) -> list[float]:
    """x shifts that spread n tasks' points around each sparsity so their error bars do not overlap."""
    step = X_SPREAD * max([f.s_max for f in fits] + [0.05])
    return [(i - (n - 1) / 2) * step for i in range(n)]


def task_traces(
    label: str,
    color: str,
    points: tuple[ArrayLike, ArrayLike, Sequence[float | None] | np.ndarray],
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
    for i, (row, shift) in enumerate(zip(rows, task_offsets(len(rows), [r.fit for r in rows]), strict=True)):
        at_chance = row.chance is not None and row.chance.at_chance is not None
        color = AT_CHANCE_COLOR if at_chance else TASK_COLORS[i % len(TASK_COLORS)]
        label = task_label(row.dataset) + (f" ({AT_CHANCE})" if at_chance else "")
        points = accuracy_points(results, row.dataset, table.acc_key)
        for trace in task_traces(label, color, points, row.fit, shift, "ln(acc/acc0)"):
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


def table3_html(table: FitTable, settings: dict[str, Any]) -> str:
    """The Table 3 analogue: our a, b (95% CIs), RMSE, R², LOO error beside the paper's two models.

    a, b are the paper's unconstrained fit (what Table 3 compares); beside it the fit through the exact
    dense point (a only) with its interval and RMSE, and each fit's residual degrees of freedom. The dataset
    column names what we measured (`settings`' perplexity corpus); below the table, the points each fit
    dropped and the laws that could not be fitted, with the reason.
    """
    head = [
        "law",
        "dataset",
        "n",
        "dof",
        "a",
        "95% CI of a",
        "b",
        "95% CI of b",
        "RMSE",
        "R²",
        "LOO RMSE",
        "LOO max |e|",
        "anchored a",
        "95% CI",
        "anchored RMSE",
    ]
    head += [f"{short} a, b, RMSE" for short in PAPER_SHORT.values()]
    rows = []
    for r in table.rows:
        f, g = r.fit, r.anchored
        law = "ln PPL0/ln PPL" if r.metric == "perplexity" else f"ln(acc/acc0), {table.acc_key}"
        name = esc(dataset_label(r.dataset, settings))
        if r.chance is not None and r.chance.at_chance is not None:
            name += f"<br><span class=note>{esc(AT_CHANCE)}</span>"
        cells = [law, name, str(f.n), str(f.dof), f"{f.a:+.3f}"]
        cells.append(ci_text(f.a_ci))
        cells += [f"{f.b:+.3f}", ci_text(f.b_ci), f"{f.rmse:.3f}", fmt(f.r2), fmt(f.loo_rmse)]
        cells += [fmt(f.loo_max_abs), f"{g.a:+.3f}", ci_text(g.a_ci), f"{g.rmse:.3f}"]
        for model in PAPER_SHORT:
            p = r.paper.get(model)
            cells.append("–" if p is None else f"{p.a:+.2f}, {p.b:+.2f}, {p.rmse:.2f}")
        rows.append(cells)
    out = html_table(head, rows, left=2) + _fit_notes(table, settings)
    ppl_rows = [r for r in table.rows if r.literal_rmse is not None]
    if ppl_rows:
        out += f"<p>The paper's literal line y = 1 - s on our perplexity points: RMSE {ppl_rows[0].literal_rmse:.3f}.</p>"
    paper_ppl = PAPER_DATASETS[PPL]
    return out + note_html(
        f"{DENSE_NOTE}; the paper's perplexity fits are on {paper_ppl}, ours on the corpus named."
    )


def _fit_notes(table: FitTable, settings: dict[str, Any]) -> str:
    """A list of the points each fit dropped and of the laws that could not be fitted, each with why."""
    items = [
        f"{dataset_label(r.dataset, settings)}: {note}"
        for r in table.rows
        if (note := r.points.dropped_note()) is not None
    ]
    items += [f"{dataset_label(name, settings)}: {why}" for name, why in table.skipped.items()]
    items += [
        f"{dataset_label(r.dataset, settings)}: {r.chance.at_chance}"
        for r in table.rows
        if r.chance is not None and r.chance.at_chance is not None
    ]
    return "<ul>" + "".join(f"<li>{esc(item)}</li>" for item in items) + "</ul>" if items else ""
