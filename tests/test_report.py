"""The sweep report: every section from a synthetic results.json, sections omitted when data is absent,
offline self-containment, the Table 3 numbers, atomic writing, and the `mechslice report` command."""

from __future__ import annotations

import itertools
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import plotly.offline
import pytest

from analyses.laws import fit_results
from analyses.paper import PAPER_TABLE3
from analyses.report import REPORT_FILE, build_report
from analyses.report.entropy import entropy_figures, entropy_ratio_figure
from analyses.report.laws import AT_CHANCE_COLOR, TASK_COLORS, figure_3b
from analyses.report.layers import HEATMAP_COLUMNS, binned_log_shares, index_bins
from analyses.report.spectra import kept_fraction
from analyses.report.style import sorted_records
from analyses.report.summary import quick_note, summary
from mechslice.cli import main
from mechslice.errors import MechsliceError
from tests.conftest import law_results

D = 64
LAYERS = 4
PPL0 = 14.0
ACC0 = {"arc_easy": 0.52, "arc_challenge": 0.27, "piqa": 0.62}
SLOPES = {"arc_easy": -1.6, "arc_challenge": -0.4, "piqa": -0.9}
PPL_SLOPE = -1.2


def make_results(
    nominal: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4),
    extras: bool = True,
    quick: bool = False,
    seed: int = 0,
    d: int = D,
    layers: int = LAYERS,
) -> dict[str, Any]:
    """A sweep following the laws (`law_results`) with a little noise; with `extras`, entropy, shift and spectra.

    One noise draw per sliced record moves y of PPL and every task's ln acc together (acc_norm stays exact).
    """
    results = law_results(nominal, d, PPL0, PPL_SLOPE, ACC0, SLOPES, stderr=0.02)
    rng = np.random.default_rng(seed)
    records = results["records"]
    for i, rec in enumerate(records):
        s = rec["effective_sparsity"]
        noise = 0.0 if s == 0 else rng.normal(0.0, 0.01)
        rec["ppl"] = math.exp(math.log(PPL0) / (1.0 + PPL_SLOPE * s + noise))
        for metrics in rec["tasks"].values():
            metrics.update(acc=metrics["acc"] * math.exp(noise), acc_norm_stderr=0.02, split="validation")
        rec.update(ppl_tokens=4096, seconds={"slice": 1.5, "ppl": 2.0, "total": 731.0})
        if extras:
            h_dense = 10.0 + np.arange(layers, dtype=float)
            ratios = (1 - s) * (1 + 0.02 * rng.standard_normal(layers))
            rec["entropy"] = {
                est: {
                    "per_layer_dense": list(h_dense * scale),
                    "per_layer": list(h_dense * ratios * scale),
                    "same_sign": est == "gaussian",
                    "ratio_per_layer": list(ratios),
                    "ratio_mean": float(ratios.mean()),
                    "kappa_mean": float((h_dense * ratios).mean() / rec["d_prime"]),
                }
                for est, scale in (("gaussian", 1.0), ("knn", 0.9))
            }
            overall = {
                "kl": 2.0 * s,
                "js": 0.4 * s,
                "top1_agreement": 1.0 - s,
                "entropy_dense": 3.0,
                "entropy_sliced": 3.0 + s,
            }
            # Both layouts: the overall metrics flattened into the record, or nested as ShiftResult.to_dict().
            nested = i % 2 == 1
            rec["shift"] = {
                **({"overall": overall} if nested else overall),
                "buckets": [
                    {"lo": 0, "hi": 16, "stats": {"kl": 2.5 * s, "tokens": 100}},
                    {"lo": 16, "hi": None, "stats": {"kl": 1.5 * s, "tokens": 900}},
                ],
            }
            rec["spectra_file"] = f"spectra/s{rec['sparsity']:.3f}.json"
    settings = {
        "quick": quick,
        "sparsities": list(nominal),
        "tasks": list(ACC0),
        "rotation": "per-layer",
        "path": "exact",
        "calib_corpus": "wiki",
        "calib_samples": 8 if quick else 128,
        "calib_seqlen": 256 if quick else 2048,
        "ppl_max_tokens": 4096,
        "mc_limit": 100 if quick else None,
    }
    return {**results, "model": "smollm2-<135m>", "model_fingerprint": "abc123", "settings": settings}


def write_sweep(folder: Path, results: dict[str, Any], layers: int = LAYERS) -> Path:
    """results.json plus, for records that name one, a spectra file of 2 rotations per layer (of width d)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(results))
    rng = np.random.default_rng(1)
    for rec in results["records"]:
        if "spectra_file" in rec:
            spectra = [
                {
                    "name": f"layer{i}.{part}",
                    "eigenvalues": sorted(rng.exponential(1.0, rec["d"]).tolist(), reverse=True),
                }
                for i in range(layers)
                for part in ("attn", "mlp")
            ]
            path = folder / rec["spectra_file"]
            path.parent.mkdir(exist_ok=True)
            path.write_text(json.dumps(spectra))
    return folder


def _without_plotlyjs(page: str) -> str:
    """The page with the inlined plotly.js bundle cut out (it must be there exactly once)."""
    js = plotly.offline.get_plotlyjs()
    assert page.count(js) == 1
    return page.replace(js, "")


# ---------------------------------------------------------------- building


def test_full_report_has_every_section_and_is_offline(tmp_path: Path) -> None:
    folder = write_sweep(tmp_path / "run", make_results())
    path = build_report(folder)
    assert path == folder / REPORT_FILE
    page = path.read_text(encoding="utf-8")
    rest = _without_plotlyjs(page)
    # Self-contained: no script or link tag loads anything, and no URL at all outside plotly.js itself.
    assert not re.search(r"<(script|link)[^>]*(src|href)\s*=", rest)
    assert not re.search(r"https?://", rest)
    for anchor in (
        "summary",
        "fig3a",
        "fig3b",
        "table3",
        "chance",
        "predict",
        "entropy",
        "spectra",
        "shift",
        "settings",
        "raw",
    ):
        assert f'id="{anchor}"' in rest
    assert 'class="note"' not in rest.split('id="table3"')[0]  # no section before Table 3 was omitted
    # One plot per figure: 3a, 3b, chance-corrected, prediction, the three predictors, entropy ratio + 2 per
    # estimator, 2 spectra, 2 shift.
    assert rest.count("Plotly.newPlot(") == 3 + 1 + 1 + 1 + 4 + 2 + 2
    assert "Fig. 3a analogue" in rest and "Table 3 Llama-3" in rest and "paper: y = 1 - s" in rest
    # Model name is escaped, the settings and fingerprint are shown.
    assert "smollm2-&lt;135m&gt;" in rest and "smollm2-<135m>" not in rest
    assert "abc123" in rest and "per-layer" in rest
    assert "ARC-e" in rest and "layer3.mlp" in rest
    assert "knn: some layers&#x27; dense and sliced entropies differ in sign" in rest
    assert "gaussian: some layers" not in rest
    # Every record's KL reaches the shift table, from flat and nested layouts alike (2.0 * s).
    shift_html = rest.split('id="shift"')[1].split("<h2")[0]
    for s in (0.125, 0.25, 0.375, 0.5):
        assert f"<td>{2.0 * s:.4g}</td>" in shift_html
    # The time per sparsity is the recorded total, not the total added to its parts.
    raw_html = rest.split('id="raw"')[1]
    assert raw_html.count("<td>731</td>") == 5 and "<td>734</td>" not in raw_html


# What a report page with plotly.js inlined (4.8 MB of it) should stay under.
PAGE_LIMIT = 6_000_000


def test_a_realistic_sweeps_page_stays_under_the_size_limit(tmp_path: Path) -> None:
    # SmolLM2-135M's shape: d = 576, 30 layers (60 rotations), eight sparsities. The line-per-rotation
    # spectra made this page 8.4 MB; the binned heat map holds every sparsity in a fraction of that.
    nominal = (0.0, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5)
    results = make_results(nominal=nominal, d=576, layers=30)
    page = build_report(write_sweep(tmp_path, results, layers=30)).read_bytes()
    assert len(page) < PAGE_LIMIT
    spectra_html = page.split(b'id="spectra"')[1].split(b"<h2")[0]
    assert len(spectra_html) < 500_000 and spectra_html.count(b'"zmin"') == len(nominal)


def test_report_names_the_layers_left_out_of_the_entropy_ratio(tmp_path: Path) -> None:
    # Issue 12, defect 3: one layer of one sparsity has H < 0 < H'. The prediction from internals averages
    # the other layers and the table says which layer it left out and why; the entropy table shows how many
    # layers each ratio used. The fixture predates the normalised stream, which the page also says.
    results = make_results()
    rec = results["records"][2]
    g = rec["entropy"]["gaussian"]
    g["per_layer_dense"][1] = -abs(g["per_layer_dense"][1])
    g["ratio_per_layer"][1] = g["per_layer"][1] / g["per_layer_dense"][1]
    rest = _without_plotlyjs(build_report(write_sweep(tmp_path, results)).read_text(encoding="utf-8"))
    predict_html = rest.split('id="predict"')[1].split("<h2")[0]
    assert "<td>1 (H and H&#x27; differ in sign)</td>" in predict_html
    expected = np.mean([r for i, r in enumerate(g["ratio_per_layer"]) if i != 1])
    assert f"<td>{expected:.3f}</td>" in predict_html
    entropy_html = rest.split('id="entropy"')[1].split("<h2")[0]
    assert f"(3/{LAYERS})" in entropy_html and f"(4/{LAYERS})" in entropy_html
    assert "recorded before entropy was measured on the RMS-normalised stream" in entropy_html
    assert "knn: its bias depends on the dimension" in entropy_html
    assert "From internals (knn" not in "\n".join(summary(results, fit_results(results), None))


def test_report_contains_table3_numbers(tmp_path: Path) -> None:
    results = make_results()
    folder = write_sweep(tmp_path, results)
    rest = _without_plotlyjs(build_report(folder).read_text(encoding="utf-8"))
    table = fit_results(results)
    table_html = rest.split('id="table3"')[1].split("<h2")[0]
    for row in table.rows:
        f = row.fit
        for value in (f"{f.a:+.3f}", f"{f.b:+.3f}", f"{f.rmse:.3f}", f"{f.r2:.3f}", f"{f.loo_rmse:.3f}"):
            assert value in table_html, (row.dataset, value)
        assert f"[{f.a_ci[0]:+.3f}, {f.a_ci[1]:+.3f}]" in table_html
        g = row.anchored  # the fit through the dense point, beside the paper's
        assert f"<td>{f.dof}</td><td>{f.a:+.3f}</td>" in table_html
        assert (
            f"<td>{g.a:+.3f}</td><td>[{g.a_ci[0]:+.3f}, {g.a_ci[1]:+.3f}]</td><td>{g.rmse:.3f}</td>"
            in table_html
        )
    # The paper's values sit beside ours: Table 3, Llama-3 and Phi-3, perplexity and ARC-c.
    assert "-1.08, +0.96, 0.03" in table_html and "-0.90, +1.02, 0.01" in table_html
    assert "-2.02, -0.07, 0.09" in table_html
    assert f"RMSE {table.row('ppl').literal_rmse:.3f}" in table_html


@pytest.mark.parametrize(
    ("corpus", "label"),
    [
        ("wiki", "wiki (Wikipedia lead sections, not WikiText2)"),
        ("wikitext2:/data/wikitext", "WikiText2 (wikitext)"),
        ("text:/data/my_corpus.txt", "text file my_corpus.txt"),
    ],
)
def test_table3_names_the_perplexity_corpus_the_sweep_used(tmp_path: Path, corpus: str, label: str) -> None:
    results = make_results(extras=False)
    results["settings"]["ppl_corpus"] = corpus
    rest = _without_plotlyjs(build_report(write_sweep(tmp_path, results)).read_text(encoding="utf-8"))
    table_html = rest.split('id="table3"')[1].split("<h2")[0]
    assert f"<tr><td class=l>ln PPL0/ln PPL</td><td class=l>{label}</td>" in table_html


def test_report_names_dropped_points_and_the_task_that_cannot_be_fitted(tmp_path: Path) -> None:
    # ARC-e: acc = 0 at two of four sparsities (ln 0 is undefined); PIQA keeps one: no fit, no interval.
    results = make_results(extras=False)
    records = results["records"]
    for i in (2, 3):
        records[i]["tasks"]["arc_easy"].update(acc=0.0, stderr=0.0)
    for i in (1, 2, 3):
        records[i]["tasks"]["piqa"].update(acc=0.0, stderr=0.0)
    rest = _without_plotlyjs(build_report(write_sweep(tmp_path, results)).read_text(encoding="utf-8"))
    where = f"s = {records[2]['effective_sparsity']:.3f}, {records[3]['effective_sparsity']:.3f} dropped"
    dropped = f"{where} (acc = 0, where ln(acc / acc0) is undefined); 2 of 4 sparsities &gt; 0 have a"
    summary_html = rest.split('id="summary"')[1].split("<h2")[0]
    arc_e = next(li for li in summary_html.split("<li>") if li.startswith("ARC-e: a = "))
    assert f"Left out of the fit: {dropped}" in arc_e and "biased toward 0" in arc_e
    assert "<li>PIQA: cannot be fitted: s = " in summary_html
    table_html = rest.split('id="table3"')[1].split("<h2")[0]
    assert f"<li>ARC-e: {dropped}" in table_html
    assert "<li>PIQA: cannot be fitted: s = " in table_html and "has a defined value" in table_html
    assert "<td class=l>PIQA</td>" not in table_html  # no row of numbers for it
    assert not re.search(r"\[([+-]\d\.\d{3}), \1\]", rest)  # no zero-width interval anywhere


def test_report_without_extras_builds_with_notes(tmp_path: Path) -> None:
    folder = write_sweep(tmp_path, make_results(extras=False))
    rest = _without_plotlyjs(build_report(folder).read_text(encoding="utf-8"))
    assert "recorded no residual-stream entropy" in rest
    assert "saved no eigenvalue spectra" in rest
    assert "recorded no output-distribution shift" in rest
    assert "No prediction from internals" in rest
    assert rest.count("Plotly.newPlot(") == 3  # only Figs. 3a, 3b and the chance-corrected law


def test_report_when_nothing_can_be_fitted(tmp_path: Path) -> None:
    # Only the dense model: no line can be fitted, yet the report builds and says why.
    folder = write_sweep(tmp_path, make_results(nominal=(0.0,), extras=False))
    page = build_report(folder).read_text(encoding="utf-8")
    # Said once, in the summary, with the reason; the law sections are left out rather than repeating it.
    assert page.count("No law could be fitted") == 1
    assert page.count("the sweep has 0") == 1 and 'id="table3"' not in page
    assert "Plotly.newPlot(" not in page and "plotly.js" not in page  # no figure, so no bundle either


def test_missing_spectra_file_is_a_note(tmp_path: Path) -> None:
    results = make_results()
    folder = write_sweep(tmp_path, results)
    (folder / results["records"][1]["spectra_file"]).unlink()
    (folder / results["records"][2]["spectra_file"]).write_text("[1, 2]")
    rest = _without_plotlyjs(build_report(folder).read_text(encoding="utf-8"))
    spectra_html = rest.split('id="spectra"')[1].split("<h2")[0]
    assert spectra_html.count("that sparsity is left out") == 2
    assert spectra_html.count("Plotly.newPlot(") == 2  # the remaining sparsities still plotted


def test_atomic_write_to_custom_out_leaves_no_temp_files(tmp_path: Path) -> None:
    folder = write_sweep(tmp_path / "run", make_results(extras=False))
    out_dir = tmp_path / "elsewhere"
    out_dir.mkdir()
    (out_dir / "r.html").write_text("old")
    path = build_report(folder, out_dir / "r.html")
    assert path.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert sorted(p.name for p in out_dir.iterdir()) == ["r.html"]
    assert not (folder / REPORT_FILE).exists()
    assert build_report(folder, tmp_path / "new" / "r.html").is_file()  # a missing folder is created
    with pytest.raises(MechsliceError, match="it is a folder"):
        build_report(folder, out_dir)
    assert sorted(p.name for p in out_dir.iterdir()) == ["r.html"]
    with pytest.raises(MechsliceError, match="accuracy key"):
        build_report(folder, acc_key="f1")


# ---------------------------------------------------------------- the generated words


def test_summary_reports_prop2_and_near_chance_task(tmp_path: Path) -> None:
    results = make_results()
    table = fit_results(results)
    text = "\n".join(summary(results, table, None))
    f = table.row("ppl").fit
    assert f"y = {f.a:+.3f}·s {f.b:+.3f}" in text
    assert (
        f"Through the dense point (y = 1 + a·s, which knows y(0) = 1 exactly): a = {table.row('ppl').anchored.a:+.3f}"
        in text
    )
    # Our slope -1.2 is outside the interval around -1 and steeper than both of the paper's models.
    assert "outside our 95% intervals" in text and "steeper than both" in text
    # ARC-c's acc0 = 0.27 is within 3 standard errors (0.06) of chance 0.25; ARC-e's 0.52 is not.
    arc_c = next(line for line in text.splitlines() if line.startswith("ARC-c"))
    arc_e = next(line for line in text.splitlines() if line.startswith("ARC-e"))
    assert "at chance: the law cannot be read" in arc_c and "at chance" not in arc_e
    assert "Chance-corrected" not in arc_c and "Chance-corrected, ln((acc - c)/(acc0 - c)): a = " in arc_e
    # The from-internals line: mean relative error of ln PPL0 / (H'/H), then of ln PPL0 / (1 - s), same points.
    sliced = [r for r in results["records"] if r["effective_sparsity"] > 0]
    ln_ppl = [math.log(r["ppl"]) for r in sliced]
    ratio = [r["entropy"]["gaussian"]["ratio_mean"] for r in sliced]
    one_minus_s = [1 - r["effective_sparsity"] for r in sliced]
    ours = np.mean([abs(math.log(PPL0) / q - m) / m for q, m in zip(ratio, ln_ppl, strict=True)])
    literal = np.mean([abs(math.log(PPL0) / q - m) / m for q, m in zip(one_minus_s, ln_ppl, strict=True)])
    line = next(x for x in text.splitlines() if x.startswith("From internals (gaussian entropy)"))
    assert f"({ours:.1%}) over 4 sparsities" in line and f"misses by {literal:.1%}." in line
    assert "quick profile" not in text


def test_summary_below_chance_has_no_signal() -> None:
    results = make_results()
    for rec in results["records"]:
        rec["tasks"]["arc_challenge"]["acc"] *= 0.8  # acc0 = 0.216 < chance 0.25
    text = "\n".join(summary(results, fit_results(results), None))
    arc_c = next(line for line in text.splitlines() if line.startswith("ARC-c"))
    assert "at chance: the law cannot be read" in arc_c and "close to chance" not in arc_c


def test_summary_accepts_paper_line_when_it_fits() -> None:
    # Exactly y = 1 - s up to tiny noise: the paper's line lies inside the intervals.
    results = make_results()
    rng = np.random.default_rng(3)
    for rec in results["records"]:
        s = rec["effective_sparsity"]
        rec["ppl"] = math.exp(math.log(PPL0) / (1.0 - s + (0 if s == 0 else rng.normal(0, 0.01))))
    text = "\n".join(summary(results, fit_results(results), None))
    assert "lies inside our 95% intervals" in text and "Prop. 2 holds here" in text


def test_summary_calls_a_wide_interval_inconclusive() -> None:
    # Three sparsities beside the dense point (1 dof), one far off the line: the slope's interval is wide.
    results = make_results(nominal=(0.0, 0.25, 0.375, 0.5))
    mid = results["records"][1]
    mid["ppl"] = math.exp(math.log(PPL0) / (1.0 - mid["effective_sparsity"] + 0.2))
    table = fit_results(results)
    lo, hi = table.row("ppl").fit.a_ci
    assert (hi - lo) / 2 > 0.25
    text = "\n".join(summary(results, table, None))
    assert f"Our 95% interval on a, [{lo:+.3f}, {hi:+.3f}], is too wide" in text
    assert "holds here" not in text and "does not hold" not in text


def test_summary_has_no_interval_from_two_sparsities() -> None:
    # Two sparsities beside the exact dense point leave the two-parameter fit no degree of freedom.
    table = fit_results(make_results(nominal=(0.0, 0.25, 0.5)))
    assert table.row("ppl").fit.dof == 0 and table.row("ppl").fit.a_ci is None
    assert table.row("ppl").anchored.a_ci is not None  # the one-parameter fit through it still has one
    text = "\n".join(summary(make_results(nominal=(0.0, 0.25, 0.5)), table, None))
    assert "no confidence intervals" in text and "cannot be tested" in text


def test_quick_note() -> None:
    note = quick_note(make_results(quick=True)["settings"])
    assert note is not None and "not a result to quote" in note and "8 calibration windows" in note
    assert quick_note(make_results()["settings"]) is None


def test_quick_profile_is_flagged_in_page(tmp_path: Path) -> None:
    folder = write_sweep(tmp_path, make_results(quick=True, extras=False))
    page = build_report(folder).read_text(encoding="utf-8")
    assert '<p class="warn">This is the quick profile' in page
    assert page.count("This is the quick profile") == 1


def test_kept_fraction() -> None:
    assert kept_fraction([4.0, 3.0, 2.0, 1.0], 2) == pytest.approx(0.7, abs=1e-15)  # (4+3)/10, exact in fp
    assert kept_fraction([1.0, -1e-18], 1) == 1.0  # round-off negatives count as 0


# ---------------------------------------------------------------- the command


def test_cli_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = write_sweep(tmp_path / "run", make_results(extras=False))
    assert main(["report", str(folder)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {folder / REPORT_FILE} (numbers computed in float32)"
    assert main(["report", str(folder), "--out", str(tmp_path / "x.html"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"report": str(tmp_path / "x.html"), "dtype": "float32"}
    assert (tmp_path / "x.html").is_file()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "does not exist"),
        ("{not json", "not valid JSON"),
        ('{"model": "m", "records": []}', "no 'records'"),
    ],
)
def test_cli_report_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None, message: str
) -> None:
    folder = tmp_path / "run"
    if content is not None:
        folder.mkdir()
        (folder / "results.json").write_text(content)
    assert main(["report", str(folder)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not (folder / REPORT_FILE).exists()


def test_figure_3b_has_the_papers_line_per_task_in_the_tasks_own_colour() -> None:
    results = make_results(extras=False)
    table = fit_results(results)
    fig = figure_3b(results, table)
    points = {t.name: t for t in fig.data if t.mode == "markers"}
    arc_c = "ARC-c (at chance: the law cannot be read)"  # acc0 0.27: 1 standard error from chance
    assert set(points) == {"ARC-e", arc_c, "PIQA"}
    colors = {name: t.marker.color for name, t in points.items()}
    assert len(set(colors.values())) == 3  # a distinct hue per task, grey for the one at chance
    assert colors[arc_c] == AT_CHANCE_COLOR and AT_CHANCE_COLOR not in TASK_COLORS
    for task, name in (("arc_easy", "ARC-e"), ("arc_challenge", arc_c), ("piqa", "PIQA")):
        paper = [t for t in fig.data if t.name.startswith(f"{name}: Table 3")]
        assert len(paper) == 2 and all(t.line.color == colors[name] for t in paper)
        slopes = sorted(float(np.diff(t.y)[0] / np.diff(t.x)[0]) for t in paper)
        assert slopes == pytest.approx(sorted(p.a for p in PAPER_TABLE3[task].values()))
    # The tasks' points are spread around each sparsity (the true s is kept for the hover).
    xs = [np.asarray(t.x) for t in points.values()]
    assert all(np.all(np.abs(a - b) > 0.002) for i, a in enumerate(xs) for b in xs[i + 1 :])
    assert all(np.all(np.abs(np.asarray(t.x) - np.asarray(t.customdata)) < 0.01) for t in points.values())


def test_spectra_heat_map_bins_cover_every_index_once() -> None:
    edges = index_bins(576)
    assert edges[0] == 0 and edges[-1] == 576 and len(edges) - 1 <= HEATMAP_COLUMNS
    assert np.all(np.diff(edges) > 0) and edges[:21] == list(range(21))  # the top: one index a column
    share = np.arange(576, 0, -1, dtype=np.float64)
    share /= share.sum()
    z = binned_log_shares([share, share[:100]], edges)
    expected = [np.log10(share[lo:hi].mean()) for lo, hi in itertools.pairwise(edges)]
    assert z.dtype == np.float32 and z[0] == pytest.approx(expected, rel=1e-6)
    covered = np.array(edges[1:]) <= 100
    assert np.all(np.isfinite(z[1][covered])) and np.all(np.isnan(z[1][np.array(edges[:-1]) >= 100]))


def test_dense_curve_is_labelled_once_and_the_ratio_axes_fit_the_data() -> None:
    records = sorted_records(make_results())
    curves, ratios = entropy_figures(records, "gaussian")
    names = [t.name for t in curves.data]
    assert names.count("dense (s = 0)") == 1 and not any("0.000" in n for n in names)
    assert next(t for t in curves.data if t.name == "dense (s = 0)").line.color == "black"
    assert "dense (s = 0)" in [t.name for t in ratios.data]
    fig = entropy_ratio_figure(records, ["gaussian"])
    values = [v for t in fig.data if t.mode == "markers+lines" for v in (*t.x, *t.y)]
    assert min(values) > 0.45 and max(values) < 1.1  # the fixture's data: 1 - s from 0.5 to 1
    for axis in (fig.layout.xaxis, fig.layout.yaxis):
        lo, hi = axis.range
        assert lo < min(values) and max(values) < hi and hi - lo < 1.2 * (max(values) - min(values)) + 0.05


def test_chance_section_marks_the_task_at_chance_and_names_the_better_form(tmp_path: Path) -> None:
    results = make_results(extras=False)
    table = fit_results(results)
    page = build_report(write_sweep(tmp_path, results)).read_text(encoding="utf-8")
    section = _without_plotlyjs(page).split('id="chance"')[1].split("<h2")[0]
    rows = {m[0]: m[1] for m in re.findall(r"<tr><td class=l>([^<]+)</td>(.*?)</tr>", section)}
    assert (
        "yes: the law cannot be read" in rows["ARC-c"]
        and "not fitted: the dense model is at chance" in rows["ARC-c"]
    )
    duel = table.row("arc_easy").chance.comparison
    assert f"{duel.paper_rmse:.4f}" in rows["ARC-e"] and f"{duel.corrected_rmse:.4f}" in rows["ARC-e"]
    assert duel.better in rows["ARC-e"] and "Chance-corrected accuracy law" in section  # the figure's title
    assert (
        "ARC-c</td>" in page.split('id="table3"')[1]
        and "at chance: the law cannot be read" in page.split('id="table3"')[1]
    )
    line = next(x for x in summary(results, table, None) if x.startswith("Which form of the accuracy law"))
    assert "ARC-c" not in line and "ARC-e" in line and "PIQA" not in line
    # PIQA (chance 0.5) falls below chance past s ~ 0.24: one sparsity above it leaves no corrected fit.
    assert "not fitted: s = " in rows["PIQA"] and "acc &lt;= chance 0.500" in rows["PIQA"]
