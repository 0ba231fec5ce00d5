"""The chance level of each task and the chance-corrected accuracy law, ln((acc - c)/(acc0 - c)), beside the
paper's form: a table with the leave-one-out duel of the two forms, and the corrected law's figure.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from analyses.chance import AT_CHANCE_SE, CORRECTED_LAW
from analyses.laws import FitTable
from analyses.report.laws import TASK_COLORS, task_offsets, task_traces
from analyses.report.markup import FigureRenderer, ci_text, esc, fmt, html_table, note_html, task_label


def figure_3b_corrected(table: FitTable) -> go.Figure | None:
    """The chance-corrected law: ln((acc - c)/(acc0 - c)) per task against s with its fit (bars: ±1 se of each
    point's own acc, delta method); tasks at chance or without a corrected fit are left out. None when no task
    has one."""
    rows = [r for r in table.rows if r.chance is not None and r.chance.fit is not None]
    if not rows:
        return None
    fig = go.Figure()
    for i, (row, shift) in enumerate(zip(rows, task_offsets(len(rows), [r.fit for r in rows]), strict=True)):
        law = row.chance
        points = (law.points.s, law.points.y, np.sqrt(law.points.var))  # own error only, as in Fig. 3b
        label = f"{task_label(row.dataset)} (c = {law.chance:.3f})"
        for trace in task_traces(label, TASK_COLORS[i % len(TASK_COLORS)], points, law.fit, shift, "y"):
            fig.add_trace(trace)
    fig.update_layout(
        title=f"Chance-corrected accuracy law: ln((acc - c)/(acc0 - c)) vs effective sparsity ({table.acc_key}; "
        "bars ±1 se)",
        xaxis_title="effective sparsity s = 1 - d'/d (points spread slightly per task)",
        yaxis_title="ln((acc - c) / (acc0 - c))",
    )
    return fig


def chance_section(table: FitTable, render: FigureRenderer) -> str:
    """Per task: chance level, the at-chance rule, the chance-corrected law's fit, and which form (paper's or
    chance-corrected) predicts left-out sparsities better; then the corrected law's figure."""
    head = ["task", "chance c", "acc0", "at chance?", "a", "95% CI of a", "b", "RMSE", "R²"]
    head += ["LOO acc error: paper", "LOO acc error: corrected", "better"]
    rows = []
    for r in table.rows:
        law = r.chance
        if law is None:
            continue
        f, duel = law.fit, law.comparison  # a fitted corrected law always has its comparison
        cells = [esc(task_label(r.dataset)), f"{law.chance:.3f}", fmt(table.acc0s.get(r.dataset))]
        cells.append("yes: the law cannot be read" if law.at_chance else "no")
        if f is None or duel is None:
            cells += [esc(f"not fitted: {law.not_fitted}"), *["–"] * 7]
        else:
            cells += [f"{f.a:+.3f}", ci_text(f.a_ci), f"{f.b:+.3f}", f"{f.rmse:.3f}", fmt(f.r2)]
            cells += [fmt(duel.paper_rmse, ".4f"), fmt(duel.corrected_rmse, ".4f"), esc(duel.better or "–")]
        rows.append(cells)
    if not rows:
        return note_html("No task's accuracy law was fitted.")
    fig = figure_3b_corrected(table)
    body = html_table(head, rows)
    body += render(fig) if fig is not None else note_html("Not drawn: no task has a chance-corrected fit.")
    return body + note_html(
        f"{CORRECTED_LAW}, fitted like the paper's form (dense point exact, binomial errors by the delta method). "
        f"At chance: acc0 within {AT_CHANCE_SE:g} standard errors of c. LOO acc error: the RMSE of each sliced "
        "point's accuracy predicted by each form's fit on the others, on the points both forms define (acc > c)."
    )
