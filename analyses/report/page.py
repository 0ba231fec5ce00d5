"""The sweep's self-contained HTML report assembled from its sections (a module each in this package): the
page head, the summary, the table of contents and each section under its heading; written atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from analyses.laws import FitTable, fit_results
from analyses.report.chance import chance_section
from analyses.report.entropy import entropy_section
from analyses.report.laws import figure_3a, figure_3b, table3_html
from analyses.report.markup import FigureRenderer, Section, esc, note_html, sparsity_count
from analyses.report.prediction import prediction_section
from analyses.report.settings import raw_table_html, settings_html
from analyses.report.shift import shift_section
from analyses.report.spectra import spectra_section
from analyses.report.summary import quick_note, summary
from analyses.results import PPL, check_acc_key, load_results
from mechslice import distributed
from mechslice.atomic import atomic_write_text
from mechslice.checks import check_output_file
from mechslice.errors import MechsliceError
from mechslice.loading import describe_model

REPORT_FILE = "report.html"
# What a sweep along another axis than d pruned (the `method` setting), for its report's header.
AXIS_NOTES = {
    "mlp": "Pruned axis: the MLP's intermediate width m (whole neurons, the same m' in every block).",
    "heads": "Pruned axis: attention heads, whole KV groups with their query heads, the same count per block.",
    "layers": "Pruned axis: whole decoder blocks (ShortGPT's block influence).",
}


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


def _law_sections(results: dict[str, Any], table: FitTable | None, render: FigureRenderer) -> list[Section]:
    """Figs. 3a, 3b and Table 3; none when no law could be fitted (the summary says why, once)."""
    if table is None:
        return []
    fitted = {r.dataset for r in table.rows}
    fig3a = (
        render(figure_3a(table))
        if PPL in fitted
        else note_html("Not drawn: the perplexity law could not be fitted (Table 3 says why).")
    )
    has_acc = any(r.metric == "accuracy" for r in table.rows)
    fig3b = (
        render(figure_3b(results, table))
        if has_acc
        else note_html("Not drawn: no task's accuracy law could be fitted (Table 3 says why).")
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
    method = (results.get("settings") or {}).get("method", "slice")
    title = f"mechslice sparsity sweep: {results['model']}" + (
        "" if method == "slice" else f", {method} pruning"
    )
    head = f'<meta charset="utf-8"><title>{esc(title)}</title><style>{CSS}</style>'
    parts = [
        f"<h1>{esc(title)}</h1>",
        f'<p class="meta">model {esc(describe_model(results["model"]))}, fingerprint {esc(results.get("model_fingerprint", "–"))}; '
        f"{sparsity_count(len(results['records']))}; built from {esc(directory.name)}/results.json</p>",
    ]
    if method != "slice":  # every s on this page is a fraction of the method's own axis, not of d
        parts.append(
            f'<p class="warn">{esc(AXIS_NOTES.get(method, method))} Here s is the fraction of that axis removed; '
            "the residual stream keeps width d, so d' = d throughout. The comparison with the other axes, "
            "against parameter sparsity, is ../report.html.</p>"
        )
    parts.append('<h2 id="summary">Summary</h2>')
    if quick:
        parts.append(f'<p class="warn">{esc(quick)}</p>')
    lines = summary(results, table, fit_error)
    parts.append("<ul>" + "".join(f"<li>{esc(line)}</li>" for line in lines) + "</ul>")
    parts.append("<p>" + " · ".join(f'<a href="#{s.anchor}">{esc(s.title)}</a>' for s in sections) + "</p>")
    parts += [f'<h2 id="{s.anchor}">{esc(s.title)}</h2>{s.body}' for s in sections]
    return f"<!DOCTYPE html><html lang=en><head>{head}</head><body>{''.join(parts)}</body></html>\n"


def build_report(directory: str | Path, out: str | Path | None = None, acc_key: str = "acc") -> Path:
    """Write the sweep's report (default `directory/report.html`, folders created) atomically from its
    results.json; return its path."""
    check_acc_key(acc_key)
    folder = Path(directory)
    results = load_results(folder)
    path = Path(out) if out is not None else folder / REPORT_FILE
    check_output_file(path, "the report path (--out)")
    distributed.on_main(lambda: atomic_write_text(path, render_report(results, folder, acc_key)))
    return path  # under torchrun only rank 0 renders and writes; the others wait for it
