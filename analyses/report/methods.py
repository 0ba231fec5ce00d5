"""The methods comparison page: both laws against parameter sparsity for every pruning axis on one plot, the
per-method fits in a Table 3 layout on both axes, the entropy ratio per method, the matched points and the
verdict. Each method's own sweep report sits in its folder and is linked from here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from analyses.laws import law_points
from analyses.methods import AXES, PAPER_PPL_RMSE, Comparison, MethodFits
from analyses.report.markup import FigureRenderer, esc, fmt, html_table, note_html, task_label
from analyses.report.page import CSS, REPORT_FILE
from analyses.results import PPL
from mechslice import distributed
from mechslice.atomic import atomic_write_text
from mechslice.checks import check_output_file
from mechslice.errors import MechsliceError
from mechslice.pruning import METHODS

# One hue per method, fixed by METHODS order so that a method keeps its colour across reports.
METHOD_COLORS = dict(zip(METHODS, qualitative.Set1, strict=False))


def _points(mf: MethodFits, dataset: str, acc_key: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(parameter sparsity, y) of one method's law on `dataset`, dense point included; None without data."""
    try:
        points = law_points(mf.param_results, dataset, acc_key)
    except MechsliceError:  # the dense model has no value for it: nothing to draw
        return None
    return points.s, points.y


def _method_traces(
    fig: go.Figure, comparison: Comparison, dataset: str, row: int, col: int, legend: bool
) -> None:
    """Points and the fitted free line of each method for `dataset`, against parameter sparsity."""
    for method, mf in comparison.methods.items():
        xy = _points(mf, dataset, comparison.acc_key)
        if xy is None:
            continue
        color = METHOD_COLORS[method]
        order = np.argsort(xy[0])
        fig.add_trace(
            go.Scatter(
                x=xy[0][order],
                y=xy[1][order],
                mode="markers",
                marker=dict(color=color, size=8),
                name=method,
                legendgroup=method,
                showlegend=legend,
            ),
            row=row,
            col=col,
        )
        table = mf.fits["param"]
        fit = next((r.fit for r in table.rows if r.dataset == dataset), None) if table else None
        if fit is not None:
            xs = np.array([0.0, fit.s_max])
            fig.add_trace(
                go.Scatter(
                    x=xs,
                    y=fit.a * xs + fit.b,
                    mode="lines",
                    line=dict(color=color, width=1.5),
                    name=f"{method} fit",
                    legendgroup=method,
                    showlegend=False,
                ),
                row=row,
                col=col,
            )


def perplexity_figure(comparison: Comparison) -> go.Figure:
    """ln PPL0 / ln PPL against parameter sparsity, every method, with y = 1 - s for reference."""
    fig = make_subplots(rows=1, cols=1)
    _method_traces(fig, comparison, PPL, 1, 1, legend=True)
    fig.add_trace(
        go.Scatter(
            x=[0, 0.5], y=[1, 0.5], mode="lines", name="y = 1 - s", line=dict(dash="dot", color="#888")
        )
    )
    fig.update_layout(title="Prop. 2 on every pruning axis: ln PPL0 / ln PPL against parameter sparsity")
    fig.update_xaxes(title=f"parameter sparsity ({comparison.of.replace('_', '-')})")
    fig.update_yaxes(title="ln PPL0 / ln PPL")
    return fig


def accuracy_figure(comparison: Comparison, tasks: list[str]) -> go.Figure:
    """ln(acc / acc0) against parameter sparsity, one panel per task, every method."""
    cols = min(len(tasks), 2)
    rows = (len(tasks) + cols - 1) // cols
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[task_label(t) for t in tasks])
    for i, task in enumerate(tasks):
        _method_traces(fig, comparison, task, i // cols + 1, i % cols + 1, legend=i == 0)
    fig.update_layout(title="Prop. 3 on every pruning axis: ln(acc / acc0) against parameter sparsity")
    fig.update_xaxes(title="parameter sparsity")
    return fig


def _table3(comparison: Comparison, axis: str, datasets: list[str]) -> str:
    """Table 3's layout (a, b, RMSE per dataset) with a row per method, on one axis."""
    head = [
        "method",
        *[f"{task_label(d) if d != PPL else 'PPL'} {c}" for d in datasets for c in ("a", "b", "RMSE")],
    ]
    rows = []
    for method, mf in comparison.methods.items():
        table = mf.fits[axis]
        cells = [esc(method)]
        for dataset in datasets:
            row = next((r for r in table.rows if r.dataset == dataset), None) if table else None
            if row is None:
                cells += ["–"] * 3
                continue
            mark = " (at chance)" if row.chance is not None and row.chance.at_chance else ""
            cells += [fmt(row.fit.a, ".2f") + esc(mark), fmt(row.fit.b, ".2f"), fmt(row.fit.rmse, ".3f")]
        rows.append(cells)
    return html_table(head, rows)


def _points_table(payload: dict[str, Any], tasks: list[str]) -> str:
    """Each pruned model: target, parameter and own sparsity, width, PPL, accuracies, entropy ratios, KL."""
    head = [
        "method",
        "target",
        "param. sparsity",
        "own axis: sparsity",
        "width d'",
        "PPL",
        *[task_label(t) for t in tasks],
        "H'/H (gaussian)",
        "erank'/erank",
        "KL",
    ]
    rows = []
    for p in sorted(payload["points"], key=lambda p: (METHODS.index(p["method"]), p["effective_sparsity"])):
        targets = ", ".join(f"{t:.2f}" for t in p["targets"] or []) or "–"
        ps = (p["param_sparsity"] or {}).get(payload["param_sparsity_of"])
        axis = f"{p['axis']} {fmt(p['effective_sparsity'], '.3f')}"
        rows.append(
            [
                esc(p["method"]),
                esc(targets),
                fmt(ps, ".3f"),
                esc(axis),
                esc(p["representation_dim"]),
                fmt(p["ppl"], ".2f"),
                *[fmt(p["acc"].get(t), ".3f") for t in tasks],
                fmt(p["entropy_ratio"], ".3f"),
                fmt(p["erank_ratio"], ".3f"),
                fmt(p["kl"], ".3f"),
            ]
        )
    return html_table(head, rows)


def methods_report_html(comparison: Comparison, payload: dict[str, Any]) -> str:
    """The whole comparison page; `payload` is `comparison_dict(comparison)` (what methods.json holds)."""
    render = FigureRenderer()
    tasks = sorted(
        {
            t
            for mf in comparison.methods.values()
            for rec in mf.results["records"]
            for t in rec.get("tasks", {})
        }
    )
    datasets = [PPL, *tasks]
    title = f"mechslice: pruning axes compared on {comparison.model}"
    links = " · ".join(f'<a href="{esc(m)}/{REPORT_FILE}">{esc(m)}</a>' for m in comparison.methods)
    parts = [
        f"<h1>{esc(title)}</h1>",
        f'<p class="meta">computed in {esc(comparison.dtype)}; parameter sparsity counts '
        f"{esc(comparison.of.replace('_', '-'))} parameters; each method's own sweep report: {links}</p>",
        '<h2 id="verdict">Verdict</h2>',
        "<ul>" + "".join(f"<li>{esc(line)}</li>" for line in payload["verdict"]) + "</ul>",
        '<h2 id="ppl">Perplexity law against parameter sparsity</h2>',
        render(perplexity_figure(comparison)),
    ]
    if tasks:
        parts += [
            '<h2 id="acc">Accuracy law against parameter sparsity</h2>',
            render(accuracy_figure(comparison, tasks), height=360 * ((len(tasks) + 1) // 2)),
        ]
    for axis, label in AXES.items():
        parts += [
            f'<h2 id="table3-{axis}">Table 3 layout: fits against {esc(label)}</h2>',
            _table3(comparison, axis, datasets),
        ]
    parts.append(
        note_html(
            f"Free fits y = a·s + b with the dense point included, as the paper fits; the linear form counts as "
            f"holding where RMSE <= {PAPER_PPL_RMSE} (Table 3's largest perplexity RMSE). fits: methods.csv."
        )
    )
    parts += ['<h2 id="points">Every pruned model</h2>', _points_table(payload, tasks)]
    if payload["not_on_parameter_axis"]:
        parts.append(
            note_html(
                "Left off the parameter axis (they removed no parameters): "
                + "; ".join(f"{m} at own sparsity {v}" for m, v in payload["not_on_parameter_axis"].items())
            )
        )
    head = f'<meta charset="utf-8"><title>{esc(title)}</title><style>{CSS}</style>'
    return f"<!DOCTYPE html><html lang=en><head>{head}</head><body>{''.join(parts)}</body></html>\n"


def build_methods_report(
    comparison: Comparison, payload: dict[str, Any], directory: str | Path, out: str | Path | None = None
) -> Path:
    """Write the comparison page of a methods sweep (default `directory/report.html`) atomically; return its path."""
    folder = Path(directory)
    path = Path(out) if out is not None else folder / REPORT_FILE
    check_output_file(path, "the report path (--out)")
    distributed.on_main(lambda: atomic_write_text(path, methods_report_html(comparison, payload)))
    return path  # under torchrun only rank 0 renders and writes
