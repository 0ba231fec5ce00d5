"""The sweep's self-contained HTML report: the paper's Figure 3 and Table 3 redone on our model, with what the
paper could not show (per-layer entropy, eigenvalue spectra, output shift), all read from DIR/results.json.

One file, readable offline: plotly.js is inlined once (in the first figure) and nothing refers to the network.
A section whose data the sweep did not record is replaced by a one-line note, never an error.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.colors import sample_colorscale
from plotly.subplots import make_subplots

from analyses.fits import LineFit
from analyses.laws import (
    ACC_KEYS,
    DENSE_NOTE,
    PAPER_DATASETS,
    PAPER_TABLE3,
    PPL,
    FitTable,
    dense_record,
    entropy_predictions,
    fit_results,
    load_results,
)
from mechslice import distributed
from mechslice.atomic import atomic_write_text
from mechslice.errors import MechsliceError

REPORT_FILE = "report.html"
PAPER_SHORT = {"Llama-3-8B-Instruct": "Llama-3", "Phi-3-mini-4k-Instruct": "Phi-3"}
# Accuracy of a uniform guess, 1 / number of choices (ARC has a few 3- and 5-choice questions; 4 is the rule).
CHANCE = {"arc_easy": 0.25, "arc_challenge": 0.25, "hellaswag": 0.25, "piqa": 0.5, "winogrande": 0.5}
# acc0 closer than this to chance leaves ln(acc/acc0) little room to fall (at most ln(chance/acc0)).
NEAR_CHANCE = 0.05
# A slope interval wider than +-0.25 cannot tell the paper's two models apart (a = -1.08 and -0.90) nor either
# from -1 by more than its own width, so the summary calls it inconclusive instead of "holds".
DECISIVE_HALF_WIDTH = 0.25
STDERR_KEYS = {"acc": "stderr", "acc_norm": "acc_norm_stderr"}
SHIFT_PANELS = (
    ("kl", "KL(p0 || ps) (nats)"),
    ("js", "JS divergence (nats)"),
    ("top1_agreement", "top-1 agreement"),
)
PLOT_CONFIG = {"displaylogo": False, "responsive": True}
S_COLOR_MAX = 0.6  # sparsities from here on share the lightest colour
SIG_DIGITS = 4  # eigenvalues are rounded to this many significant digits in the page (a plot, not a dataset)

CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .8em 0; font-size: .9em; }
th, td { border: 1px solid #ccc; padding: .25em .5em; text-align: right; }
th { background: #f3f3f3; } td.l, th.l { text-align: left; }
.note { color: #666; font-style: italic; }
.warn { background: #fff3cd; border: 1px solid #e0c060; padding: .6em 1em; }
.meta { color: #555; }
"""


@dataclass(frozen=True)
class Section:
    """One part of the report: an anchor, a heading and its HTML body (a one-line note when data is absent)."""

    anchor: str
    title: str
    body: str


class FigureRenderer:
    """Turns plotly figures into HTML divs; plotly.js goes inline into the first one only."""

    def __init__(self) -> None:
        self.js_included = False

    def __call__(self, fig: go.Figure, height: int = 460) -> str:
        """The figure as a div (with plotly.js before it the first time)."""
        fig.update_layout(template="plotly_white", height=height, margin=dict(l=60, r=20, t=60, b=50))
        div = fig.to_html(full_html=False, include_plotlyjs=not self.js_included, config=PLOT_CONFIG)
        self.js_included = True
        return div


# ---------------------------------------------------------------- small formatting helpers


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "–" if x is None else format(x, spec)


def _ci(ci: tuple[float, float] | None) -> str:
    return "–" if ci is None else f"[{ci[0]:+.3f}, {ci[1]:+.3f}]"


def _esc(x: object) -> str:
    return html.escape(str(x))


def _note(text: str) -> str:
    return f'<p class="note">{_esc(text)}</p>'


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> str:
    """An HTML table of already-escaped cells; the first `left` columns are left-aligned."""

    def cells(tag: str, row: Sequence[str]) -> str:
        return "".join(f"<{tag}{' class=l' if i < left else ''}>{c}</{tag}>" for i, c in enumerate(row))

    body = "".join(f"<tr>{cells('td', r)}</tr>" for r in rows)
    return f"<table><tr>{cells('th', head)}</tr>{body}</table>"


def _count(n: int) -> str:
    return f"{n} sparsity" if n == 1 else f"{n} sparsities"


def _task_label(task: str) -> str:
    return PAPER_DATASETS.get(task, task)


def _sorted_records(results: dict[str, Any]) -> list[dict[str, Any]]:
    return sorted(results["records"], key=lambda r: r["effective_sparsity"])


def _color(rec: dict[str, Any]) -> str:
    """A colour fixed by the effective sparsity (dark for dense, light by S_COLOR_MAX), the same in every figure."""
    return sample_colorscale("Viridis", [0.9 * min(rec["effective_sparsity"] / S_COLOR_MAX, 1.0)])[0]


def _s_label(rec: dict[str, Any]) -> str:
    return f"s={rec['effective_sparsity']:.3f}"


def _line_xs(fit: LineFit) -> np.ndarray:
    """The two ends of a straight line drawn over the fitted sparsities."""
    return np.array([0.0, max(fit.s_max, 0.05)])


# ---------------------------------------------------------------- the plain-language summary


def _prop2_summary(table: FitTable) -> str:
    row = table.row(PPL)
    f = row.fit
    text = (
        f"Perplexity law (Prop. 2, y = ln PPL0 / ln PPL): our fit is y = {f.a:+.3f}·s {f.b:+.3f} "
        f"(RMSE {f.rmse:.3f}, R² {_fmt(f.r2)}, {f.n} points, PPL0 = {_fmt(table.ppl0, '.3g')}). "
    )
    if f.a_ci is None or f.b_ci is None:
        text += "With two points there are no confidence intervals, so the paper's line cannot be tested. "
    elif (f.a_ci[1] - f.a_ci[0]) / 2 > DECISIVE_HALF_WIDTH:
        text += (
            f"Our 95% interval on a, {_ci(f.a_ci)}, is too wide to confirm or reject the paper's slope -1 "
            "(more sparsities or more evaluation tokens would narrow it). "
        )
    elif f.a_ci[0] <= -1.0 <= f.a_ci[1] and f.b_ci[0] <= 1.0 <= f.b_ci[1]:
        text += f"The paper's y = 1 - s lies inside our 95% intervals (a {_ci(f.a_ci)}, b {_ci(f.b_ci)}): Prop. 2 holds here. "
    else:
        text += (
            f"The paper's y = 1 - s lies outside our 95% intervals (a {_ci(f.a_ci)}, b {_ci(f.b_ci)}): "
            "Prop. 2 does not hold exactly here. "
        )
    text += f"Read literally, y = 1 - s misses our points by RMSE {_fmt(row.literal_rmse)}. "
    paper = row.paper
    slopes = sorted(p.a for p in paper.values())
    if slopes:
        where = (
            "steeper than both"
            if f.a < slopes[0]
            else "shallower than both"
            if f.a > slopes[-1]
            else "between them"
        )
        listed = "; ".join(
            f"{PAPER_SHORT[m]} a = {p.a:+.2f}, b = {p.b:.2f}, RMSE {p.rmse:.2f}" for m, p in paper.items()
        )
        text += f"Table 3 has {listed}; our slope is {where}."
    return text


def _resolved(results: dict[str, Any], task: str, acc_key: str) -> bool | None:
    """Does any sliced accuracy differ from acc0 by more than two combined standard errors? None: no stderr."""
    dense = dense_record(results)
    key = STDERR_KEYS[acc_key]
    m0 = dense.get("tasks", {}).get(task, {})
    if m0.get(key) is None:
        return None
    zs = []
    for rec in results["records"]:
        m = rec.get("tasks", {}).get(task, {})
        if rec is dense or m.get(acc_key) is None or m.get(key) is None:
            continue
        se = math.hypot(m[key], m0[key])
        zs.append(abs(m[acc_key] - m0[acc_key]) / se if se > 0 else math.inf)
    return None if not zs else max(zs) > 2.0


def _prop3_summary(table: FitTable, task: str, results: dict[str, Any]) -> str:
    f = table.row(task).fit
    interval = "" if f.a_ci is None else f" {_ci(f.a_ci)}"
    text = (
        f"{_task_label(task)}: a = {f.a:+.3f}{interval}, b = {f.b:+.3f}, RMSE {f.rmse:.3f}, R² {_fmt(f.r2)}"
    )
    paper = PAPER_TABLE3.get(task, {})
    if paper:
        text += " (Table 3: " + ", ".join(f"{PAPER_SHORT[m]} a = {p.a:+.2f}" for m, p in paper.items()) + ")"
    text += ". "
    if f.a_ci is None:
        text += "Two points: no interval on the slope. "
    elif f.a_ci[1] < 0.0:
        text += "Accuracy falls with s, as Prop. 3 says. "
    elif f.a_ci[0] > 0.0:
        text += "Accuracy rises with s, against Prop. 3. "
    else:
        text += "The slope's interval includes 0: no significant trend. "
    acc0, chance = table.acc0s.get(task), CHANCE.get(task)
    if acc0 is not None and chance is not None:
        text += f"acc0 = {acc0:.3f} against chance {chance:.2f}. "
        if acc0 <= chance:
            text += "The dense model is already at or below chance, so this slope carries no signal. "
        elif acc0 - chance < NEAR_CHANCE:
            text += (
                f"That is close to chance: ln(acc/acc0) can fall by at most ln(chance/acc0) = "
                f"{math.log(chance / acc0):+.3f} before the model is guessing, so this slope carries little signal. "
            )
    if _resolved(results, task, table.acc_key) is False:
        text += "No accuracy change exceeds two standard errors of the item sample. "
    return text.rstrip()


def _entropy_summary(results: dict[str, Any]) -> list[str]:
    """Per estimator: how far ln PPL0 / (H'/H) lands from the measured ln PPL, beside ln PPL0 / (1 - s)."""
    lines = []
    for estimator, preds in entropy_predictions(results).items():
        sliced = [p for p in preds if p.effective_sparsity > 0.0]
        if not sliced:
            continue
        abs_err = float(np.mean([p.abs_error for p in sliced]))
        rel_err = float(np.mean([p.rel_error for p in sliced]))
        # ln PPL0 = predicted * ratio, so the literal law's prediction at the same points is that / (1 - s).
        literal = [
            abs(p.ln_ppl_predicted * p.ratio / (1.0 - p.effective_sparsity) - p.ln_ppl_measured)
            / p.ln_ppl_measured
            for p in sliced
        ]
        lines.append(
            f"From internals ({estimator} entropy): ln PPL = ln PPL0 / (H'/H) misses the measured ln PPL by "
            f"{abs_err:.3f} nats on average ({rel_err:.1%}) over {_count(len(sliced))}; the same law with "
            f"1 - s in place of H'/H misses by {float(np.mean(literal)):.1%}."
        )
    return lines


def quick_note(settings: dict[str, Any]) -> str | None:
    """The warning that a quick-profile sweep is a smoke test, with its sizes; None for a full sweep."""
    if not settings.get("quick"):
        return None
    sizes = [
        f"{settings[k]} {what}"
        for k, what in (
            ("calib_samples", "calibration windows"),
            ("calib_seqlen", "tokens per window"),
            ("ppl_max_tokens", "perplexity tokens at most"),
            ("mc_limit", "items per task at most"),
            ("probe_tokens", "tokens for entropy and shift"),
        )
        if settings.get(k) is not None
    ]
    detail = f" ({', '.join(sizes)})" if sizes else ""
    return (
        f"This is the quick profile{detail}: small calibration, few tokens and items. It checks that the "
        "pipeline runs end to end; it is not a result to quote."
    )


def summary(results: dict[str, Any], table: FitTable | None, fit_error: str | None) -> list[str]:
    """Plain-language findings, generated from the numbers: Prop. 2, Prop. 3 per task, entropy prediction.

    The quick-profile warning (`quick_note`) is not among them: the page shows it as a banner above them.
    """
    if table is None:
        return [f"No law could be fitted: {fit_error}"]
    lines = []
    fitted = {r.dataset for r in table.rows}
    if PPL in fitted:
        lines.append(_prop2_summary(table))
    else:
        lines.append(f"Perplexity law not fitted: {table.skipped.get(PPL, 'no perplexity recorded')}")
    tasks = [r.dataset for r in table.rows if r.metric == "accuracy"]
    if tasks:
        lines.append(f"Accuracy law (Prop. 3, y = ln(acc/acc0), {table.acc_key}):")
        lines += [_prop3_summary(table, t, results) for t in tasks]
    lines += [f"{name} not fitted: {why}" for name, why in table.skipped.items() if name != PPL]
    lines += _entropy_summary(results)
    return lines


# ---------------------------------------------------------------- Figure 3 and Table 3


def _paper_line_traces(fit: LineFit, dataset: str) -> list[go.Scatter]:
    xs = _line_xs(fit)
    return [
        go.Scatter(
            x=xs,
            y=p.a * xs + p.b,
            mode="lines",
            name=f"Table 3 {PAPER_SHORT[m]} ({p.a:+.2f}s {p.b:+.2f})",
            line=dict(dash="dash" if i == 0 else "dashdot", width=1.5),
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
    for rec in _sorted_records(results):
        m = rec.get("tasks", {}).get(task, {})
        acc = m.get(acc_key)
        if acc is None or acc <= 0.0:
            continue
        se = m.get(STDERR_KEYS[acc_key])
        s.append(float(rec["effective_sparsity"]))
        y.append(math.log(acc / acc0))
        err.append(None if se is None else se / acc)
    return s, y, err


def figure_3b(results: dict[str, Any], table: FitTable) -> go.Figure:
    """Fig. 3b analogue: ln(acc/acc0) per task against effective sparsity, with error bars and fitted lines."""
    fig = go.Figure()
    palette = sample_colorscale("Plotly3", [0.1 + 0.8 * i / 5 for i in range(6)])
    for i, row in enumerate(r for r in table.rows if r.metric == "accuracy"):
        color = palette[i % len(palette)]
        s, y, err = accuracy_points(results, row.dataset, table.acc_key)
        bars = [0.0 if e is None else e for e in err]
        label = _task_label(row.dataset)
        fig.add_trace(
            go.Scatter(
                x=s,
                y=y,
                mode="markers",
                name=label,
                marker=dict(color=color, size=8),
                error_y=dict(type="data", array=bars, visible=any(e is not None for e in err)),
                legendgroup=label,
            )
        )
        fit_line = _fit_trace(row.fit, label, color)
        fit_line.legendgroup = label
        fig.add_trace(fit_line)
    fig.update_layout(
        title=f"Fig. 3b analogue: ln(acc/acc0) vs effective sparsity ({table.acc_key}; bars ±1 se)",
        xaxis_title="effective sparsity s = 1 - d'/d",
        yaxis_title="ln(acc / acc0)",
    )
    return fig


def table3_html(table: FitTable) -> str:
    """The Table 3 analogue: our a, b (95% CIs), RMSE, R², LOO error beside the paper's two models."""
    head = [
        "law",
        "dataset",
        "n",
        "a",
        "95% CI of a",
        "b",
        "95% CI of b",
        "RMSE",
        "R²",
        "LOO RMSE",
        "LOO max |e|",
    ]
    head += [f"{short} a, b, RMSE" for short in PAPER_SHORT.values()]
    rows = []
    for r in table.rows:
        f = r.fit
        law = "ln PPL0/ln PPL" if r.metric == "perplexity" else f"ln(acc/acc0), {table.acc_key}"
        cells = [law, _esc(_task_label(r.dataset)), str(f.n), f"{f.a:+.3f}", _ci(f.a_ci), f"{f.b:+.3f}"]
        cells += [_ci(f.b_ci), f"{f.rmse:.3f}", _fmt(f.r2), _fmt(f.loo_rmse), _fmt(f.loo_max_abs)]
        for model in PAPER_SHORT:
            p = r.paper.get(model)
            cells.append("–" if p is None else f"{p.a:+.2f}, {p.b:+.2f}, {p.rmse:.2f}")
        rows.append(cells)
    out = _table(head, rows, left=2)
    ppl_rows = [r for r in table.rows if r.literal_rmse is not None]
    if ppl_rows:
        out += f"<p>The paper's literal line y = 1 - s on our perplexity points: RMSE {ppl_rows[0].literal_rmse:.3f}.</p>"
    return out + _note(DENSE_NOTE)


# ---------------------------------------------------------------- inside the network


def _entropy_estimators(records: Sequence[dict[str, Any]]) -> list[str]:
    return sorted(
        {e for rec in records for e, v in (rec.get("entropy") or {}).items() if isinstance(v, dict)}
    )


def _stats(records: Sequence[dict[str, Any]], estimator: str) -> list[dict[str, Any]]:
    return [st for rec in records if (st := (rec.get("entropy") or {}).get(estimator))]


def entropy_figures(records: Sequence[dict[str, Any]], estimator: str) -> tuple[go.Figure, go.Figure]:
    """Per-layer entropy H_l (one curve per sparsity, the dense one in black) and per-layer H'_l/H_l with its
    1 - s as a dashed line."""
    curves, ratios = go.Figure(), go.Figure()
    dense = next(
        (st["per_layer_dense"] for st in _stats(records, estimator) if st.get("per_layer_dense")), None
    )
    if dense:
        curves.add_trace(
            go.Scatter(
                x=list(range(len(dense))), y=dense, mode="lines", name="dense", line=dict(color="black")
            )
        )
    for rec in records:
        stats = (rec.get("entropy") or {}).get(estimator)
        if not stats:
            continue
        color, label = _color(rec), _s_label(rec)
        if stats.get("per_layer"):
            h = stats["per_layer"]
            curves.add_trace(
                go.Scatter(
                    x=list(range(len(h))), y=h, mode="lines+markers", name=label, line=dict(color=color)
                )
            )
        if stats.get("ratio_per_layer"):
            r = stats["ratio_per_layer"]
            ratios.add_trace(
                go.Scatter(
                    x=list(range(len(r))),
                    y=r,
                    mode="lines+markers",
                    name=label,
                    line=dict(color=color),
                    legendgroup=label,
                )
            )
            ratios.add_trace(
                go.Scatter(
                    x=[0, len(r) - 1],
                    y=[1.0 - rec["effective_sparsity"]] * 2,
                    mode="lines",
                    name=f"1 - s ({label})",
                    line=dict(color=color, dash="dash", width=1),
                    legendgroup=label,
                    showlegend=False,
                )
            )
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
    """The premise H'/H = 1 - s: the layer-mean entropy ratio against 1 - s, per estimator, with y = x."""
    fig = go.Figure()
    fig.add_trace(
        go.Scatter(
            x=[0, 1], y=[0, 1], mode="lines", name="H'/H = 1 - s", line=dict(color="black", dash="dash")
        )
    )
    for est in estimators:
        pts = [
            (1.0 - rec["effective_sparsity"], rec["entropy"][est]["ratio_mean"])
            for rec in records
            if (rec.get("entropy") or {}).get(est, {}).get("ratio_mean") is not None
        ]
        if pts:
            fig.add_trace(
                go.Scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="markers+lines", name=est)
            )
    fig.update_layout(title="Layer-mean entropy ratio vs 1 - s", xaxis_title="1 - s", yaxis_title="mean H'/H")
    return fig


def _entropy_table(records: Sequence[dict[str, Any]], estimators: Sequence[str]) -> str:
    head = ["s", *(f"{e}: mean H'/H, mean κ" for e in estimators)]
    rows = []
    for rec in records:
        cells = [f"{rec['effective_sparsity']:.3f}"]
        for e in estimators:
            st = (rec.get("entropy") or {}).get(e) or {}
            cells.append(f"{_fmt(st.get('ratio_mean'))}, {_fmt(st.get('kappa_mean'), '.4g')}")
        rows.append(cells)
    return _table(head, rows)


def entropy_section(results: dict[str, Any], render: FigureRenderer) -> str:
    """Per-layer entropy curves and ratios per estimator, the layer-mean premise check, a table."""
    records = _sorted_records(results)
    estimators = _entropy_estimators(records)
    if not estimators:
        return _note("The sweep recorded no residual-stream entropy (run it with entropy estimation on).")
    parts = [render(entropy_ratio_figure(records, estimators)), _entropy_table(records, estimators)]
    mixed = [e for e in estimators if any(st.get("same_sign") is False for st in _stats(records, e))]
    if mixed:
        parts.append(
            _note(
                f"{', '.join(mixed)}: some layers' dense and sliced entropies differ in sign, so there H'/H "
                "does not read as a fraction of entropy kept."
            )
        )
    for est in estimators:
        curves, ratios = entropy_figures(records, est)
        parts += [render(curves), render(ratios)]
    return "".join(parts)


def prediction_figure(results: dict[str, Any], table: FitTable | None) -> go.Figure:
    """Measured ln PPL vs s, with ln PPL0/(1-s), the fitted law, and ln PPL0/(H'/H) per entropy estimator."""
    records = [r for r in _sorted_records(results) if r.get("ppl") is not None and r["ppl"] > 1.0]
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


def prediction_section(results: dict[str, Any], table: FitTable | None, render: FigureRenderer) -> str:
    """ln PPL predicted from the entropy ratio alone (and from 1 - s) against the measured one."""
    preds = entropy_predictions(results)
    if not preds:
        return _note(
            "No prediction from internals: it needs the dense perplexity and an entropy ratio per sparsity."
        )
    head = ["estimator", "s", "H'/H", "ln PPL predicted", "ln PPL measured", "|error|", "rel. error"]
    rows = [
        [
            _esc(est),
            f"{p.effective_sparsity:.3f}",
            f"{p.ratio:.3f}",
            f"{p.ln_ppl_predicted:.3f}",
            f"{p.ln_ppl_measured:.3f}",
            f"{p.abs_error:.3f}",
            f"{p.rel_error:.1%}",
        ]
        for est, ps in preds.items()
        for p in ps
    ]
    return render(prediction_figure(results, table)) + _table(head, rows)


def _read_spectra(directory: Path, rec: dict[str, Any]) -> list[dict[str, Any]]:
    """The record's spectra file: a list of {name, eigenvalues}; MechsliceError if missing or malformed."""
    path = directory / rec["spectra_file"]
    try:
        spectra = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise MechsliceError(f"spectra file {path} could not be read ({err})") from err
    ok = isinstance(spectra, list) and all(
        isinstance(x, dict)
        and isinstance(x.get("name"), str)
        and isinstance(x.get("eigenvalues"), list)
        and x["eigenvalues"]
        and all(isinstance(v, int | float) and math.isfinite(v) for v in x["eigenvalues"])
        for x in spectra
    )
    if not ok or not spectra:
        raise MechsliceError(f"spectra file {path} is not a list of {{name, eigenvalues}}")
    return spectra


def _round(values: np.ndarray) -> list[float]:
    return [float(f"{v:.{SIG_DIGITS}g}") for v in values]


def _descending(eigenvalues: Sequence[float]) -> np.ndarray:
    """Eigenvalues sorted descending, in float64, with negatives (round-off of a PSD matrix) set to 0."""
    return np.sort(np.clip(np.asarray(eigenvalues, dtype=np.float64), 0.0, None))[::-1]


def kept_fraction(eigenvalues: Sequence[float], d_prime: int) -> float:
    """Share of the second-moment mass in the top d' eigenvalues (negatives from round-off count as 0)."""
    lam = _descending(eigenvalues)
    total = lam.sum()
    return float(lam[:d_prime].sum() / total) if total > 0 else math.nan


def spectra_figures(
    spectra: Sequence[tuple[dict[str, Any], list[dict[str, Any]]]],
) -> tuple[go.Figure, go.Figure]:
    """Kept share of eigenvalue mass per rotation (a curve per sparsity), and the full normalised spectra of
    every rotation with a menu to pick the sparsity; the dotted line marks d'."""
    kept = go.Figure()
    full = go.Figure()
    buttons, visible_sets = [], []
    for rec, rotations in spectra:
        label = _s_label(rec)
        kept.add_trace(
            go.Scatter(
                x=[r["name"] for r in rotations],
                y=[kept_fraction(r["eigenvalues"], rec["d_prime"]) for r in rotations],
                mode="lines+markers",
                name=f"{label}, d'={rec['d_prime']}",
                line=dict(color=_color(rec)),
            )
        )
        start = len(full.data)
        shades = sample_colorscale(
            "Viridis", [0.9 * i / max(len(rotations) - 1, 1) for i in range(len(rotations))]
        )
        for r, shade in zip(rotations, shades, strict=True):
            lam = _descending(r["eigenvalues"])
            share = lam / lam.sum() if lam.sum() > 0 else lam
            full.add_trace(
                go.Scatter(
                    x=list(range(1, len(lam) + 1)),
                    y=_round(share),
                    mode="lines",
                    name=r["name"],
                    line=dict(color=shade, width=1),
                    visible=not buttons,
                )
            )
        visible_sets.append((start, len(full.data), rec["d_prime"]))
        buttons.append(label)
    n = len(full.data)
    menu = [
        dict(
            label=label,
            method="update",
            args=[
                {"visible": [lo <= i < hi for i in range(n)]},
                {
                    "shapes": [_d_prime_line(d_prime)],
                    "title.text": f"Eigenvalue spectra per rotation ({label})",
                },
            ],
        )
        for label, (lo, hi, d_prime) in zip(buttons, visible_sets, strict=True)
    ]
    full.update_layout(
        title=f"Eigenvalue spectra per rotation ({buttons[0]})",
        xaxis_title="eigenvalue index (descending)",
        yaxis=dict(title="λ_i / Σλ", type="log"),
        shapes=[_d_prime_line(visible_sets[0][2])],
        updatemenus=[dict(buttons=menu, x=1.0, y=1.15, xanchor="right")] if len(menu) > 1 else [],
    )
    kept.update_layout(
        title="Share of eigenvalue mass kept by the top d' directions, per rotation",
        xaxis_title="rotation (in network order)",
        yaxis_title="Σ_{i≤d'} λ_i / Σ λ",
    )
    return kept, full


def _d_prime_line(d_prime: int) -> dict[str, Any]:
    return dict(
        type="line", x0=d_prime, x1=d_prime, y0=0, y1=1, yref="paper", line=dict(dash="dot", color="grey")
    )


def spectra_section(results: dict[str, Any], directory: Path, render: FigureRenderer) -> str:
    """Eigenvalue spectra of the PCA rotations, from each record's spectra file (absent files: a note)."""
    spectra: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []
    problems = []
    for rec in _sorted_records(results):
        if not rec.get("spectra_file"):
            continue
        try:
            spectra.append((rec, _read_spectra(directory, rec)))
        except MechsliceError as err:
            problems.append(_note(f"{err}; that sparsity is left out."))
    if not spectra:
        return "".join(problems) or _note("The sweep saved no eigenvalue spectra.")
    kept, full = spectra_figures(spectra)
    return "".join(problems) + render(kept) + render(full, height=560)


def _shift_overall(rec: dict[str, Any]) -> dict[str, Any] | None:
    shift = rec.get("shift")
    if not isinstance(shift, dict):
        return None
    return shift.get("overall", shift)  # a flattened record, or ShiftResult.to_dict() as it is


def shift_figure(records: Sequence[dict[str, Any]]) -> go.Figure:
    """KL, JS and top-1 agreement of the sliced model's next-token distribution against the dense one's."""
    fig = make_subplots(rows=1, cols=len(SHIFT_PANELS), subplot_titles=[t for _, t in SHIFT_PANELS])
    for col, (key, _) in enumerate(SHIFT_PANELS, start=1):
        pts = [(r["effective_sparsity"], _shift_overall(r).get(key)) for r in records]
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
                    name=_s_label(rec),
                    line=dict(color=_color(rec)),
                )
            )
    if not fig.data:
        return None
    fig.update_layout(title="KL per token-position bucket", xaxis_title="positions", yaxis_title="KL (nats)")
    return fig


def shift_section(results: dict[str, Any], render: FigureRenderer) -> str:
    """Output shift vs sparsity, a table of it, and KL by position when buckets were recorded."""
    records = [r for r in _sorted_records(results) if _shift_overall(r) is not None]
    if not records:
        return _note("The sweep recorded no output-distribution shift.")
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
        + [_fmt(_shift_overall(r).get(k), ".4g") for k in columns]
        for r in records
    ]
    parts = [render(shift_figure(records), height=400), _table(["s", "1 - s", *columns.values()], rows)]
    buckets = shift_bucket_figure(records)
    if buckets is not None:
        parts.append(render(buckets))
    return "".join(parts)


# ---------------------------------------------------------------- settings and raw numbers


def settings_html(results: dict[str, Any]) -> str:
    """The model, its fingerprint and every sweep setting as a two-column table."""
    rows = [
        ["model", _esc(results["model"])],
        ["model fingerprint", _esc(results.get("model_fingerprint", "–"))],
    ]
    for key, value in (results.get("settings") or {}).items():
        shown = value if isinstance(value, str) else json.dumps(value)
        rows.append([_esc(key), _esc(shown)])
    return _table(["setting", "value"], rows, left=2)


def _tasks(records: Sequence[dict[str, Any]]) -> list[str]:
    found = {t for rec in records for t in rec.get("tasks", {})}
    return [t for t in PAPER_DATASETS if t in found] + sorted(found - set(PAPER_DATASETS))


def _acc_cell(metrics: dict[str, Any] | None) -> str:
    if not metrics:
        return "–"
    parts = [
        f"{label}{metrics[key]:.3f} ± {_fmt(metrics.get(STDERR_KEYS[key]))}"
        for key, label in (("acc", ""), ("acc_norm", "norm "))
        if metrics.get(key) is not None
    ]
    if metrics.get("n") is not None:
        parts.append(f"n={metrics['n']}")
    return "<br>".join(parts)


def raw_table_html(results: dict[str, Any]) -> str:
    """Per-sparsity numbers as measured: d', perplexity, each task's accuracies with standard errors, time."""
    records = _sorted_records(results)
    tasks = _tasks(records)
    head = [
        "s (nominal)",
        "s (effective)",
        "d",
        "d'",
        "PPL",
        "PPL tokens",
        *map(_task_label, tasks),
        "seconds",
    ]
    rows = []
    for rec in records:
        seconds = rec.get("seconds") or {}
        parts = [v for v in seconds.values() if isinstance(v, int | float)]
        secs = [seconds["total"]] if isinstance(seconds.get("total"), int | float) else parts
        cells = [_fmt(rec.get("sparsity")), f"{rec['effective_sparsity']:.4f}", _esc(rec.get("d", "–"))]
        cells += [
            _esc(rec.get("d_prime", "–")),
            _fmt(rec.get("ppl"), ".4g"),
            _esc(rec.get("ppl_tokens", "–")),
        ]
        cells += [_acc_cell(rec.get("tasks", {}).get(t)) for t in tasks]
        cells.append(f"{sum(secs):.0f}" if secs else "–")
        rows.append(cells)
    return _table(head, rows, left=0)


# ---------------------------------------------------------------- assembling the page


def _law_sections(
    results: dict[str, Any], table: FitTable | None, fit_error: str | None, render: FigureRenderer
) -> list[Section]:
    if table is None:
        missing = _note(f"No law could be fitted: {fit_error}")
        titles = {"fig3a": "Fig. 3a analogue", "fig3b": "Fig. 3b analogue", "table3": "Table 3 analogue"}
        return [Section(anchor, title, missing) for anchor, title in titles.items()]
    fitted = {r.dataset for r in table.rows}
    fig3a = (
        render(figure_3a(table))
        if PPL in fitted
        else _note(f"Perplexity law not fitted: {table.skipped.get(PPL, 'no perplexity recorded')}")
    )
    has_acc = any(r.metric == "accuracy" for r in table.rows)
    fig3b = (
        render(figure_3b(results, table)) if has_acc else _note("No multiple-choice task could be fitted.")
    )
    return [
        Section("fig3a", "Fig. 3a analogue: perplexity law (Prop. 2)", fig3a),
        Section("fig3b", "Fig. 3b analogue: accuracy law (Prop. 3)", fig3b),
        Section("table3", "Table 3 analogue: fitted coefficients beside the paper's", table3_html(table)),
    ]


def render_report(results: dict[str, Any], directory: Path, acc_key: str = "acc") -> str:
    """The whole report page for validated `results` (spectra files are read relative to `directory`)."""
    try:
        table, fit_error = fit_results(results, acc_key=acc_key), None
    except MechsliceError as err:
        table, fit_error = None, str(err)
    render = FigureRenderer()
    sections = _law_sections(results, table, fit_error, render)
    sections += [
        Section("predict", "Predicting ln PPL from internals", prediction_section(results, table, render)),
        Section("entropy", "Residual-stream entropy per layer", entropy_section(results, render)),
        Section(
            "spectra", "Eigenvalue spectra of the rotations", spectra_section(results, directory, render)
        ),
        Section("shift", "Output-distribution shift", shift_section(results, render)),
        Section("settings", "Settings", settings_html(results)),
        Section("raw", "Raw numbers per sparsity", raw_table_html(results)),
    ]
    quick = quick_note(results.get("settings") or {})
    title = f"mechslice sparsity sweep: {results['model']}"
    head = f'<meta charset="utf-8"><title>{_esc(title)}</title><style>{CSS}</style>'
    parts = [
        f"<h1>{_esc(title)}</h1>",
        f'<p class="meta">model {_esc(results["model"])}, fingerprint {_esc(results.get("model_fingerprint", "–"))}; '
        f"{_count(len(results['records']))}; built from {_esc(directory.name)}/results.json</p>",
    ]
    parts.append('<h2 id="summary">Summary</h2>')
    if quick:
        parts.append(f'<p class="warn">{_esc(quick)}</p>')
    lines = summary(results, table, fit_error)
    parts.append("<ul>" + "".join(f"<li>{_esc(line)}</li>" for line in lines) + "</ul>")
    parts.append("<p>" + " · ".join(f'<a href="#{s.anchor}">{_esc(s.title)}</a>' for s in sections) + "</p>")
    parts += [f'<h2 id="{s.anchor}">{_esc(s.title)}</h2>{s.body}' for s in sections]
    return f"<!DOCTYPE html><html lang=en><head>{head}</head><body>{''.join(parts)}</body></html>\n"


def build_report(directory: str | Path, out: str | Path | None = None, acc_key: str = "acc") -> Path:
    """Write the sweep's report (default `directory/report.html`, folders created) atomically from its
    results.json; return its path."""
    if acc_key not in ACC_KEYS:
        raise MechsliceError(f"accuracy key {acc_key!r} is not one of {', '.join(ACC_KEYS)}")
    folder = Path(directory)
    results = load_results(folder)
    path = Path(out) if out is not None else folder / REPORT_FILE
    if path.is_dir():
        raise MechsliceError(f"cannot write the report to {path}: it is a folder; give a file path to --out")
    distributed.on_main(lambda: atomic_write_text(path, render_report(results, folder, acc_key)))
    return path  # under torchrun only rank 0 renders and writes; the others wait for it
