"""The `entropy` command's page: per-layer entropy ratios for several sparsities and the eigenvalue spectra of the
residual stream, one self-contained HTML file."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
from jaxtyping import Float

from analyses.entropy import RANK, LayerEntropy
from analyses.layer_entropy import EntropySweep
from analyses.report.layers import layer_curves, spectrum_lines
from mechslice.atomic import atomic_write_text


def entropy_curves(sweep: EntropySweep, estimator: str) -> go.Figure:
    """H(E'_out)/H(E_out) per layer, one line per sparsity, each with its 1-s = d'/d as a dashed line.

    estimator=`RANK` draws the effective-rank ratio erank(E'_out)/erank(E_out) instead.
    """
    curves, levels = {}, {}
    for result in sweep.results:
        name, one_minus_s = f"s={result.sparsity:g}", result.summary.layers[0].one_minus_s
        curves[name] = [_ratio(layer, estimator) for layer in result.summary.layers]
        levels[name] = (f"1-s={one_minus_s:.3f}", one_minus_s)
    layers = [int(layer.layer) for layer in sweep.results[0].summary.layers] if sweep.results else []
    fig = layer_curves(curves, layers, levels=levels)
    what = "effective-rank ratio" if estimator == RANK else f"entropy ratio ({estimator})"
    fig.update_layout(
        title=f"Residual-stream {what} per layer ({sweep.stream} stream, {sweep.rotation} slicing)",
        xaxis_title="layer",
        yaxis_title="erank(E'_out) / erank(E_out)" if estimator == RANK else "H(E'_out) / H(E_out)",
    )
    return fig


def _ratio(layer: LayerEntropy, estimator: str) -> float | None:
    if estimator == RANK:
        return None if layer.effective_rank is None else layer.effective_rank.ratio
    return layer.estimators[estimator].ratio


def eigenvalue_spectra(spectra: Mapping[int, Float[np.ndarray, " d"]], every: int = 1) -> go.Figure:
    """Covariance eigenvalues of E_out (descending, log scale) against their index, one line per layer."""
    layers = sorted(spectra)[::every]
    fig = go.Figure(spectrum_lines({f"layer {layer}": np.asarray(spectra[layer]) for layer in layers}))
    fig.update_layout(
        title="Eigenvalue spectrum of the residual stream E_out per layer",
        xaxis_title="index (descending)",
        yaxis_title="eigenvalue",
        yaxis_type="log",
    )
    return fig


def entropy_report_html(sweep: EntropySweep, path: Path) -> Path:
    """One self-contained (offline) HTML file, written atomically: entropy curves of every estimator and the
    eigenvalue spectra (left out when too few tokens were traced for a spectrum)."""
    estimators = [*sweep.results[0].summary.layers[0].estimators, RANK] if sweep.results else []
    figures = [entropy_curves(sweep, e) for e in estimators]
    figures += [eigenvalue_spectra(sweep.spectra)] if sweep.spectra else []
    parts = [fig.to_html(full_html=False, include_plotlyjs=(i == 0)) for i, fig in enumerate(figures)]
    return atomic_write_text(path, "<html><body>\n" + "\n".join(parts) + "\n</body></html>\n")
