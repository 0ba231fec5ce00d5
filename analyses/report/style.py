"""What every figure of the report shares: records in order of effective sparsity, and one colour per sparsity
(`sparsity_color`) with its legend name, the same in every figure.
"""

from __future__ import annotations

from typing import Any

from plotly.colors import sample_colorscale

from analyses.results import DENSE_TOLERANCE

DENSE_COLOR = "black"


S_COLOR_MAX = 0.6  # sparsities from here on share the lightest colour


def sorted_records(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The sweep's records by effective sparsity, dense first."""
    return sorted(results["records"], key=lambda r: r["effective_sparsity"])


def is_dense(rec: dict[str, Any]) -> bool:
    return rec["effective_sparsity"] < DENSE_TOLERANCE


def sparsity_color(rec: dict[str, Any]) -> str:
    """A colour fixed by the effective sparsity (black for dense, then dark to light by S_COLOR_MAX), the same
    in every figure."""
    if is_dense(rec):
        return DENSE_COLOR
    return sample_colorscale("Viridis", [0.9 * min(rec["effective_sparsity"] / S_COLOR_MAX, 1.0)])[0]


def s_label(rec: dict[str, Any]) -> str:
    """A record's legend name: its effective sparsity, or "dense (s = 0)"."""
    return "dense (s = 0)" if is_dense(rec) else f"s = {rec['effective_sparsity']:.3f}"
