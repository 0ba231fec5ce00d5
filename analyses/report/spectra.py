"""Eigenvalue spectra of the PCA rotations, read from each record's spectra file: the share of mass the top d'
directions keep, and every rotation's spectrum as a heat map.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go
from numpy.typing import ArrayLike

from analyses.report.layers import bin_labels, binned_log_shares, index_bins, spectra_heatmap
from analyses.report.markup import FigureRenderer, note_html
from analyses.report.style import s_label, sorted_records, sparsity_color
from mechslice.errors import MechsliceError


def descending(eigenvalues: ArrayLike) -> np.ndarray:
    """Eigenvalues sorted descending, in float64, with negatives (round-off of a PSD matrix) set to 0."""
    return np.sort(np.clip(np.asarray(eigenvalues, dtype=np.float64), 0.0, None))[::-1]


def kept_fraction(eigenvalues: ArrayLike, d_prime: int) -> float:
    """Share of the second-moment mass in the top d' eigenvalues (negatives from round-off count as 0)."""
    lam = descending(eigenvalues)
    total = lam.sum()
    return float(lam[:d_prime].sum() / total) if total > 0 else math.nan


def _shares(eigenvalues: ArrayLike) -> np.ndarray:
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
            problems.append(note_html(f"{err}; that sparsity is left out."))
    if not spectra:
        return "".join(problems) or note_html("The sweep saved no eigenvalue spectra.")
    kept, full = spectra_figures(spectra)
    return "".join(problems) + render(kept) + render(full, height=560)
