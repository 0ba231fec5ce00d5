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

import plotly.graph_objects as go

from analyses.chance import AT_CHANCE, AT_CHANCE_SE, CORRECTED_LAW
from analyses.entropy import BIASED_IN_D, RANK, SIGNAL
from analyses.laws import (
    ACC_KEYS,
    DENSE_NOTE,
    PAPER_DATASETS,
    PPL,
    FitTable,
    entropy_predictions,
    fit_results,
    load_results,
    record_signal,
)
from analyses.predictors import compare_predictors
from analyses.report_figures import (
    entropy_figures,
    entropy_ratio_figure,
    entropy_stats,
    figure_3a,
    figure_3b,
    figure_3b_corrected,
    prediction_figure,
    predictors_figure,
    shift_bucket_figure,
    shift_figure,
    shift_overall,
    sorted_records,
    spectra_figures,
)
from analyses.report_text import (
    PAPER_SHORT,
    STDERR_KEYS,
    ci_text,
    dataset_label,
    fmt,
    quick_note,
    sparsity_count,
    summary,
    task_label,
)
from mechslice import distributed
from mechslice.atomic import atomic_write_text
from mechslice.checks import check_output_file
from mechslice.errors import MechsliceError
from mechslice.loading import describe_model

REPORT_FILE = "report.html"
PLOT_CONFIG = {"displaylogo": False, "responsive": True}

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
        name = _esc(dataset_label(r.dataset, settings))
        if r.chance is not None and r.chance.at_chance is not None:
            name += f"<br><span class=note>{_esc(AT_CHANCE)}</span>"
        cells = [law, name, str(f.n), str(f.dof), f"{f.a:+.3f}"]
        cells.append(ci_text(f.a_ci))
        cells += [f"{f.b:+.3f}", ci_text(f.b_ci), f"{f.rmse:.3f}", fmt(f.r2), fmt(f.loo_rmse)]
        cells += [fmt(f.loo_max_abs), f"{g.a:+.3f}", ci_text(g.a_ci), f"{g.rmse:.3f}"]
        for model in PAPER_SHORT:
            p = r.paper.get(model)
            cells.append("–" if p is None else f"{p.a:+.2f}, {p.b:+.2f}, {p.rmse:.2f}")
        rows.append(cells)
    out = _table(head, rows, left=2) + _fit_notes(table, settings)
    ppl_rows = [r for r in table.rows if r.literal_rmse is not None]
    if ppl_rows:
        out += f"<p>The paper's literal line y = 1 - s on our perplexity points: RMSE {ppl_rows[0].literal_rmse:.3f}.</p>"
    paper_ppl = PAPER_DATASETS[PPL]
    return out + _note(
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
    return "<ul>" + "".join(f"<li>{_esc(item)}</li>" for item in items) + "</ul>" if items else ""


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
        cells = [_esc(task_label(r.dataset)), f"{law.chance:.3f}", fmt(table.acc0s.get(r.dataset))]
        cells.append("yes: the law cannot be read" if law.at_chance else "no")
        if f is None or duel is None:
            cells += [_esc(f"not fitted: {law.not_fitted}"), *["–"] * 7]
        else:
            cells += [f"{f.a:+.3f}", ci_text(f.a_ci), f"{f.b:+.3f}", f"{f.rmse:.3f}", fmt(f.r2)]
            cells += [fmt(duel.paper_rmse, ".4f"), fmt(duel.corrected_rmse, ".4f"), _esc(duel.better or "–")]
        rows.append(cells)
    if not rows:
        return _note("No task's accuracy law was fitted.")
    fig = figure_3b_corrected(table)
    body = _table(head, rows)
    body += render(fig) if fig is not None else _note("Not drawn: no task has a chance-corrected fit.")
    return body + _note(
        f"{CORRECTED_LAW}, fitted like the paper's form (dense point exact, binomial errors by the delta method). "
        f"At chance: acc0 within {AT_CHANCE_SE:g} standard errors of c. LOO acc error: the RMSE of each sliced "
        "point's accuracy predicted by each form's fit on the others, on the points both forms define (acc > c)."
    )


# ---------------------------------------------------------------- inside the network


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
    return _table(head, rows)


_ENTROPY_HEAD = "mean H'/H (layers used), d(H'/H)/d ln c, mean κ"
_RATIO_HEAD = {RANK: "mean erank'/erank (layers used)"}


def entropy_section(results: dict[str, Any], render: FigureRenderer) -> str:
    """Per-layer entropy curves and ratios per estimator, the layer-mean premise check, a table."""
    records = sorted_records(results)
    estimators = _entropy_estimators(records)
    if not estimators:
        return _note("The sweep recorded no residual-stream entropy (run it with entropy estimation on).")
    parts = [render(entropy_ratio_figure(records, estimators)), _entropy_table(records, estimators)]
    parts.append(
        _note(
            f"Each ratio is {SIGNAL}; in brackets the layers used of those recorded. d(H'/H)/d ln c is how "
            "far that ratio moves per factor e in the unit of the activations (H(cX) = H(X) + d ln c): no "
            "ratio of entropies of different widths is unit-free. The effective rank exp(H(λ/Σλ)) of the "
            "covariance spectrum is free of unit and basis."
        )
    )
    streams = {(rec.get("entropy") or {}).get("stream") for rec in records if rec.get("entropy")}
    if None in streams:
        parts.append(
            _note(
                "Some sparsities were recorded before entropy was measured on the RMS-normalised stream: "
                "their ratios depend on the unit of the activations, and their marginal ratios compare the "
                "dense stream's original basis with the sliced stream's PCA basis."
            )
        )
    mixed = [e for e in estimators if any(st.get("same_sign") is False for st in entropy_stats(records, e))]
    if mixed:
        parts.append(
            _note(
                f"{', '.join(mixed)}: some layers' dense and sliced entropies differ in sign, so there H'/H "
                "does not read as a fraction of entropy kept; those layers are left out of the mean ratio."
            )
        )
    biased = [e for e in estimators if e in BIASED_IN_D]
    if biased:
        parts.append(
            _note(
                f"{', '.join(biased)}: its bias depends on the dimension, so its H'/H compares two differently "
                "biased numbers; shown for reference, left out of the prediction from internals."
            )
        )
    for est in estimators:
        curves, ratios = entropy_figures(records, est)
        parts += [render(curves), render(ratios)]
    return "".join(parts)


def prediction_section(results: dict[str, Any], table: FitTable | None, render: FigureRenderer) -> str:
    """ln PPL predicted from the entropy ratio alone (and from 1 - s) against the measured one."""
    preds = entropy_predictions(results)
    if not preds:
        return _note(
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
            _esc(est),
            f"{p.effective_sparsity:.3f}",
            f"{p.ratio:.3f}",
            f"{p.ln_ppl_predicted:.3f}",
            f"{p.ln_ppl_measured:.3f}",
            f"{p.abs_error:.3f}",
            f"{p.rel_error:.1%}",
            _esc(", ".join(f"{k} ({why})" for k, why in p.excluded.items()) or "none"),
        ]
        for est, ps in preds.items()
        for p in ps
    ]
    body = render(prediction_figure(results, table)) + _table(head, rows) + _note(f"H'/H here is {SIGNAL}.")
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
        return _note(f"The three predictors are not compared: {err}")
    if not comparison.held_back:
        return _note(
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
        + _table(head, [[_esc(c) for c in row] for row in rows])
        + "".join(_note(n) for n in notes)
    )


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


def spectra_section(results: dict[str, Any], directory: Path, render: FigureRenderer) -> str:
    """Eigenvalue spectra of the PCA rotations, from each record's spectra file (absent files: a note)."""
    spectra: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []
    problems = []
    for rec in sorted_records(results):
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


def shift_section(results: dict[str, Any], render: FigureRenderer) -> str:
    """Output shift vs sparsity, a table of it, and KL by position when buckets were recorded."""
    records = [r for r in sorted_records(results) if shift_overall(r) is not None]
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
        + [fmt(shift_overall(r).get(k), ".4g") for k in columns]
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
        ["model", _esc(describe_model(results["model"]))],
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
        f"{label}{metrics[key]:.3f} ± {fmt(metrics.get(STDERR_KEYS[key]))}"
        for key, label in (("acc", ""), ("acc_norm", "norm "))
        if metrics.get(key) is not None
    ]
    if metrics.get("n") is not None:
        parts.append(f"n={metrics['n']}")
    return "<br>".join(parts)


def raw_table_html(results: dict[str, Any]) -> str:
    """Per-sparsity numbers as measured: d', perplexity, each task's accuracies with standard errors, time."""
    records = sorted_records(results)
    tasks = _tasks(records)
    head = [
        "s (nominal)",
        "s (effective)",
        "d",
        "d'",
        "PPL",
        "PPL tokens",
        *map(task_label, tasks),
        "seconds",
    ]
    rows = []
    for rec in records:
        seconds = rec.get("seconds") or {}
        parts = [v for v in seconds.values() if isinstance(v, int | float)]
        secs = [seconds["total"]] if isinstance(seconds.get("total"), int | float) else parts
        cells = [fmt(rec.get("sparsity")), f"{rec['effective_sparsity']:.4f}", _esc(rec.get("d", "–"))]
        cells += [
            _esc(rec.get("d_prime", "–")),
            fmt(rec.get("ppl"), ".4g"),
            _esc(rec.get("ppl_tokens", "–")),
        ]
        cells += [_acc_cell(rec.get("tasks", {}).get(t)) for t in tasks]
        cells.append(f"{sum(secs):.0f}" if secs else "–")
        rows.append(cells)
    return _table(head, rows, left=0)


# ---------------------------------------------------------------- assembling the page


def _law_sections(results: dict[str, Any], table: FitTable | None, render: FigureRenderer) -> list[Section]:
    """Figs. 3a, 3b and Table 3; none when no law could be fitted (the summary says why, once)."""
    if table is None:
        return []
    fitted = {r.dataset for r in table.rows}
    fig3a = (
        render(figure_3a(table))
        if PPL in fitted
        else _note("Not drawn: the perplexity law could not be fitted (Table 3 says why).")
    )
    has_acc = any(r.metric == "accuracy" for r in table.rows)
    fig3b = (
        render(figure_3b(results, table))
        if has_acc
        else _note("Not drawn: no task's accuracy law could be fitted (Table 3 says why).")
    )
    settings = results.get("settings") or {}
    return [
        Section("fig3a", "Fig. 3a analogue: perplexity law (Prop. 2)", fig3a),
        Section("fig3b", "Fig. 3b analogue: accuracy law (Prop. 3)", fig3b),
        Section(
            "table3", "Table 3 analogue: fitted coefficients beside the paper's", table3_html(table, settings)
        ),
        Section(
            "chance", "Chance level and the chance-corrected accuracy law", chance_section(table, render)
        ),
    ]


def render_report(results: dict[str, Any], directory: Path, acc_key: str = "acc") -> str:
    """The whole report page for validated `results` (spectra files are read relative to `directory`)."""
    try:
        table, fit_error = fit_results(results, acc_key=acc_key), None
    except MechsliceError as err:
        table, fit_error = None, str(err)
    render = FigureRenderer()
    sections = _law_sections(results, table, render)
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
        f'<p class="meta">model {_esc(describe_model(results["model"]))}, fingerprint {_esc(results.get("model_fingerprint", "–"))}; '
        f"{sparsity_count(len(results['records']))}; built from {_esc(directory.name)}/results.json</p>",
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
    check_output_file(path, "the report path (--out)")
    distributed.on_main(lambda: atomic_write_text(path, render_report(results, folder, acc_key)))
    return path  # under torchrun only rank 0 renders and writes; the others wait for it
