"""The sweep's settings and its raw numbers per sparsity, as measured."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from analyses.paper import PAPER_DATASETS
from analyses.report.markup import esc, fmt, html_table, task_label
from analyses.report.style import sorted_records
from analyses.results import STDERR_KEYS
from mechslice.loading import describe_model


def settings_html(results: dict[str, Any]) -> str:
    """The model, its fingerprint and every sweep setting as a two-column table."""
    rows = [
        ["model", esc(describe_model(results["model"]))],
        ["model fingerprint", esc(results.get("model_fingerprint", "–"))],
    ]
    for key, value in (results.get("settings") or {}).items():
        shown = value if isinstance(value, str) else json.dumps(value)
        rows.append([esc(key), esc(shown)])
    return html_table(["setting", "value"], rows, left=2)


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
        cells = [fmt(rec.get("sparsity")), f"{rec['effective_sparsity']:.4f}", esc(rec.get("d", "–"))]
        cells += [
            esc(rec.get("d_prime", "–")),
            fmt(rec.get("ppl"), ".4g"),
            esc(rec.get("ppl_tokens", "–")),
        ]
        cells += [_acc_cell(rec.get("tasks", {}).get(t)) for t in tasks]
        cells.append(f"{sum(secs):.0f}" if secs else "–")
        rows.append(cells)
    return html_table(head, rows, left=0)
