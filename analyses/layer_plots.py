"""The per-layer figures drawn in two places (the `entropy` command's page and the sweep report), from plain
data: one line per label over the layers, or one eigenvalue spectrum per label."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import plotly.graph_objects as go


def layer_curves(
    curves: Mapping[str, Sequence[float]],
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
    spectra: Mapping[str, Sequence[float]], colors: Sequence[str] | None = None
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
