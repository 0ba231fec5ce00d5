"""`mechslice mc`: zero-shot multiple-choice accuracy of a model on one task."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mechslice.checks import check_at_least
from mechslice.commands._common import add_model_args, emit, model_fields, model_from_args, show_progress
from mechslice.mc import DEFAULT_SPLITS, evaluate_mc
from mechslice.mc.tasks import check_limit, task_spec


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `mc` subcommand."""
    splits = ", ".join(f"{task}: {split}" for task, split in DEFAULT_SPLITS.items())
    parser = subparsers.add_parser(
        "mc",
        help="zero-shot accuracy (acc, acc_norm) on a multiple-choice task, or LAMBADA's last word",
        description=f"Log-likelihood multiple-choice accuracy. Default splits: {splits}.",
    )
    parser.add_argument("--task", required=True, help=f"one of: {', '.join(DEFAULT_SPLITS)}")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N items")
    parser.add_argument("--batch-size", type=int, default=16, help="requests per forward pass (16)")
    parser.add_argument("--split", default=None, help="split to use (default: the task's default split)")
    parser.add_argument(
        "--data", type=Path, default=None, help="a .jsonl file or `save_to_disk` folder (HF fields)"
    )
    add_model_args(parser)
    parser.set_defaults(func=run)


def _stderr(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _acc_norm(payload: dict[str, Any]) -> str:
    """acc_norm ± its standard error, or why the task has none."""
    if payload["acc_norm"] is None:
        return f"n/a (the harness defines no acc_norm for {payload['task']})"
    return f"{payload['acc_norm']:.4f} ± {_stderr(payload['acc_norm_stderr'])}"


def _text(payload: dict[str, Any]) -> str:
    greedy = payload["perplexity"] is not None
    lines = [
        f"{payload['model']} ({payload['dtype']}) on {payload['task']} ({payload['split']} split, {payload['n']} items, {payload['source']})",
        f"  acc      {payload['acc']:.4f} ± {_stderr(payload['acc_stderr'])}"
        + (" (greedy decoding produces the last word)" if greedy else ""),
        f"  acc_norm {_acc_norm(payload)}",
        f"  chance   {payload['chance']:.4f}" + (" (a guessed word: ~1/vocabulary)" if greedy else ""),
    ]
    if greedy:
        lines.append(f"  perplexity of the last word {payload['perplexity']:.4f}")
    lines.append(f"  {payload['seconds']:.1f} s, {payload['items_per_s']:.2f} items/s")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Evaluate the model on the task and print the accuracies."""
    task_spec(args.task)  # refuse bad input before loading the model
    check_limit(args.limit)
    check_at_least(args.batch_size, 1, "--batch-size")
    loaded = model_from_args(args)
    result = evaluate_mc(
        loaded.model,
        loaded.tokenizer,
        args.task,
        limit=args.limit,
        batch_size=args.batch_size,
        split=args.split,
        data=args.data,
        progress=show_progress(args),
    )
    emit(args, {**model_fields(loaded), **result.to_dict()}, _text)
    return 0
