"""What every section of the report writes with: escaping, notes, tables, the renderer that inlines plotly.js
once, and the number and label formats the tables and the summary share.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import plotly.graph_objects as go

from analyses.paper import PAPER_DATASETS
from analyses.results import PPL

PLOT_CONFIG = {"displaylogo": False, "responsive": True}


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


def esc(x: object) -> str:
    return html.escape(str(x))


def note_html(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def html_table(head: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> str:
    """An HTML table of already-escaped cells; the first `left` columns are left-aligned."""

    def cells(tag: str, row: Sequence[str]) -> str:
        return "".join(f"<{tag}{' class=l' if i < left else ''}>{c}</{tag}>" for i, c in enumerate(row))

    body = "".join(f"<tr>{cells('td', r)}</tr>" for r in rows)
    return f"<table><tr>{cells('th', head)}</tr>{body}</table>"


def fmt(x: float | None, spec: str = ".3f") -> str:
    """`x` in format `spec`, or a dash when it was not measured."""
    return "–" if x is None else format(x, spec)


def ci_text(ci: tuple[float, float] | None) -> str:
    """A 95% interval as [lo, hi] with signs, or a dash when there is none."""
    return "–" if ci is None else f"[{ci[0]:+.3f}, {ci[1]:+.3f}]"


def sparsity_count(n: int) -> str:
    """ "1 sparsity" or "n sparsities"."""
    return f"{n} sparsity" if n == 1 else f"{n} sparsities"


def task_label(task: str) -> str:
    """The paper's name for a task where it has one, else the task key."""
    return PAPER_DATASETS.get(task, task)


def corpus_label(settings: dict[str, Any]) -> str:
    """The corpus the sweep measured perplexity on, from its `ppl_corpus` setting (not the paper's WikiText2)."""
    spec = settings.get("ppl_corpus")
    if not isinstance(spec, str):
        return "corpus not recorded"
    kind, _, arg = spec.partition(":")
    if kind == "wiki" and not arg:
        return "wiki (Wikipedia lead sections, not WikiText2)"
    if kind == "wikitext2" and arg:
        return f"WikiText2 ({Path(arg).name or arg})"
    if kind == "text" and arg:
        return f"text file {Path(arg).name}"
    return spec


def dataset_label(dataset: str, settings: dict[str, Any]) -> str:
    """A fitted dataset's name in the report: the perplexity corpus actually used, or the task's name."""
    return corpus_label(settings) if dataset == PPL else task_label(dataset)
