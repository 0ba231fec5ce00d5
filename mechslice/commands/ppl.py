"""`mechslice ppl`: perplexity of a model on a corpus split."""

from __future__ import annotations

import argparse
from typing import Any

from mechslice.checks import check_at_least, check_seqlen
from mechslice.commands._common import add_model_args, emit, model_fields, model_from_args, show_progress
from mechslice.corpora import corpus_tokens, eval_windows
from mechslice.perplexity import evaluate_perplexity


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `ppl` subcommand."""
    parser = sub.add_parser("ppl", help="perplexity on a corpus split in non-overlapping windows")
    add_model_args(parser)
    add_eval_args(parser)
    parser.set_defaults(func=run)


def add_eval_args(parser: argparse.ArgumentParser) -> None:
    """Corpus, split, window length, token budget and batch size of a perplexity evaluation."""
    parser.add_argument("--corpus", default="wiki", help="wiki, wikitext2:PATH or text:PATH (default wiki)")
    parser.add_argument("--split", default="test", choices=["test", "train"])
    parser.add_argument("--seqlen", type=int, default=2048, help="tokens per window (default 2048)")
    parser.add_argument("--max-tokens", type=int, default=None, help="evaluate only the first N tokens")
    parser.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default 4)")


def run(args: argparse.Namespace) -> int:
    """Evaluate and print perplexity (one JSON object with --json)."""
    check_at_least(args.batch_size, 1, "--batch-size")
    lm = model_from_args(args)
    check_seqlen(args.seqlen, lm.model.config.max_position_embeddings, "--seqlen")
    windows = eval_windows(corpus_tokens(lm.tokenizer, args.corpus, args.split), args.seqlen, args.max_tokens)
    result = evaluate_perplexity(lm.model, windows, batch_size=args.batch_size, progress=show_progress(args))
    payload = {
        **model_fields(lm),
        "corpus": args.corpus,
        "split": args.split,
        "seqlen": args.seqlen,
        "windows": len(windows),
        **result.to_dict(),
    }
    emit(args, payload, _text)
    return 0


def _text(p: dict[str, Any]) -> str:
    return (
        f"{p['model']} ({p['dtype']}) on {p['corpus']}/{p['split']}: perplexity {p['ppl']:.3f} (nll {p['nll']:.4f}) over "
        f"{p['tokens']} tokens in {p['windows']} windows of {p['seqlen']}; {p['tokens_per_s']:.0f} tokens/s"
    )
