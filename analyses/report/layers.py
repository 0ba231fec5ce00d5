"""The per-layer figures drawn in several places (the `entropy` command's page, the sweep report, the notebooks),
from plain data: one line per label over the layers, one eigenvalue spectrum per label, spectra as a heat map, or
the norm of each traced stage."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
from jaxtyping import Float
from numpy.typing import ArrayLike

# Columns of a spectra heat map: enough for the eye, and a bound that keeps the page's size independent of d.
HEATMAP_COLUMNS = 160
SHARE_FLOOR = 1e-12  # shares below this (zero eigenvalues) are drawn at it: log10 of 0 has no colour


def layer_curves(
    curves: Mapping[str, ArrayLike],
    layers: Sequence[int] | None = None,
    colors: Mapping[str, str] | None = None,
    levels: Mapping[str, tuple[str, float]] | None = None,
) -> go.Figure:
    """One line per label of per-layer values over `layers` (default 0..n-1), each with an optional dashed
    reference level (name, y) across the same layers, e.g. 1 - s beside an entropy ratio.

    A level in its curve's colour is drawn thin and left out of the legend (the curve's entry stands for it);
    without colours each level gets the next palette colour and its own legend entry.
    """
    fig = go.Figure()
    for label, values in curves.items():
        xs = list(range(len(values))) if layers is None else list(layers)
        color = None if colors is None else colors[label]
        level = None if levels is None else levels.get(label)
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=values,
                mode="lines+markers",
                name=label,
                line=None if color is None else dict(color=color),
                legendgroup=None if level is None else label,
            )
        )
        if level is not None:
            fig.add_trace(
                go.Scatter(
                    x=[xs[0], xs[-1]],
                    y=[level[1], level[1]],
                    mode="lines",
                    line={"dash": "dash"} if color is None else dict(color=color, dash="dash", width=1),
                    name=level[0],
                    legendgroup=label,
                    showlegend=None if color is None else False,
                )
            )
    return fig


def spectrum_lines(
    spectra: Mapping[str, Sequence[float] | Float[np.ndarray, " _k"]], colors: Sequence[str] | None = None
) -> list[go.Scatter]:
    """One line per label of eigenvalues (already in the order and scale to plot) against their index from 1;
    with `colors`, thin lines in those colours."""
    shades = [None] * len(spectra) if colors is None else list(colors)
    return [
        go.Scatter(
            x=list(range(1, len(values) + 1)),
            y=values,
            mode="lines",
            name=label,
            line=None if shade is None else dict(color=shade, width=1),
        )
        for (label, values), shade in zip(spectra.items(), shades, strict=True)
    ]


def index_bins(d: int, columns: int = HEATMAP_COLUMNS) -> list[int]:
    """0-based edges of at most `columns` bins over eigenvalue indices 0..d-1: one index per bin at the top
    of the spectrum, log-spaced groups further down (where a spectrum is smooth)."""
    return sorted({int(e) - 1 for e in np.round(np.geomspace(1, d + 1, columns + 1))})


def bin_labels(edges: Sequence[int]) -> list[str]:
    """Each bin's 1-based index range as the heat map's column name: "7" or "300–311"."""
    return [str(lo + 1) if hi == lo + 1 else f"{lo + 1}–{hi}" for lo, hi in itertools.pairwise(edges)]


def binned_log_shares(
    shares: Sequence[ArrayLike], edges: Sequence[int]
) -> Float[np.ndarray, "spectra columns"]:
    """log10 of each bin's mean share per spectrum, in float32 (a picture, not a data set: 4 bytes a cell in
    the page); NaN where a spectrum is shorter than the bin."""
    padded = np.full((len(shares), edges[-1]), np.nan, dtype=np.float64)
    for i, row in enumerate(shares):
        padded[i, : len(row)] = np.asarray(row, dtype=np.float64)[: edges[-1]]
    means = np.add.reduceat(padded, edges[:-1], axis=1) / np.diff(edges)
    return np.log10(np.maximum(means, SHARE_FLOOR)).astype(np.float32)


def spectra_heatmap(
    names: Sequence[str], shares: Sequence[ArrayLike], edges: Sequence[int], zrange: tuple[float, float]
) -> go.Heatmap:
    """One row per spectrum (`names`, top to bottom), one column per index bin, coloured by log10 share on a
    common `zrange` so that several heat maps compare."""
    return go.Heatmap(
        z=binned_log_shares(shares, edges),
        x=bin_labels(edges),
        y=list(names),
        zmin=zrange[0],
        zmax=zrange[1],
        colorscale="Viridis",
        colorbar=dict(title="log10 λ_i / Σλ"),
        hovertemplate="%{y}<br>index %{x}<br>log10 λ_i/Σλ = %{z:.2f}<extra></extra>",
    )


def stage_norms(table: Iterable[Mapping[str, Any]], stages: Iterable[str] | None = None) -> go.Figure:
    """Mean L2 norm of each traced stage against the layer (rows of `FlowTrace.table()`), log scale."""
    by_stage: dict[str, list[tuple[int, float]]] = {}
    keep = None if stages is None else set(stages)
    for row in table:
        if keep is None or row["stage"] in keep:
            by_stage.setdefault(row["stage"], []).append((row["layer"], row["mean_norm"]))
    fig = go.Figure()
    for stage, points in by_stage.items():
        layers, norms = zip(*sorted(points), strict=True)
        fig.add_trace(go.Scatter(x=layers, y=norms, mode="lines+markers", name=stage))
    fig.update_layout(
        title="Mean L2 norm per stage and layer",
        xaxis_title="layer",
        yaxis_title="mean |x|",
        yaxis_type="log",
    )
    return fig
