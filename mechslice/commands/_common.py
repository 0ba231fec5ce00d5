"""Arguments and output shared by every subcommand."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from mechslice import distributed
from mechslice.checks import check_device, check_seqlen
from mechslice.corpora import CALIBRATION_SEED, SAMPLERS, calibration_windows, corpus_tokens, eval_windows
from mechslice.errors import MechsliceError
from mechslice.loaded import LoadedModel
from mechslice.loading import DEFAULT_MODEL, default_device, describe_model, load_model
from mechslice.precision import AUTO, DTYPES, dtype_name, resolve_dtype
from mechslice.slicing.slicer import ROTATIONS


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """`--model`, `--device`, `--dtype` and `--json`, the options every command shares."""
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"model name, GGUF file or folder ({DEFAULT_MODEL})"
    )
    parser.add_argument(
        "--device", type=_device, default=None, help="torch device (default: cuda when available, else cpu)"
    )
    parser.add_argument(
        "--dtype",
        choices=[AUTO, *DTYPES],
        default=AUTO,
        help="compute dtype (default auto: bfloat16 where the device has bf16 matrix units, else float32)",
    )
    add_json_arg(parser)


def _device(name: str) -> str:
    """`--device` as given, refused at parse time when this machine has no such device."""
    try:
        check_device(name)
    except MechsliceError as err:
        raise argparse.ArgumentTypeError(str(err)) from err
    return name


def add_json_arg(parser: argparse.ArgumentParser) -> None:
    """`--json`: print one JSON object on stdout instead of text."""
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def add_calibration_args(parser: argparse.ArgumentParser, samples: int = 128, seqlen: int = 2048) -> None:
    """`--calib-corpus`, `--calib-sampler`, `--calib-samples`, `--calib-seqlen`: SliceGPT's calibration by default."""
    parser.add_argument(
        "--calib-corpus", default="wiki", help="wiki, wikitext2:PATH or text:PATH (train split)"
    )
    parser.add_argument(
        "--calib-sampler",
        choices=SAMPLERS,
        default="slicegpt",
        help="slicegpt (default: whole documents from a seeded random start, none reused) or offsets",
    )
    parser.add_argument(
        "--calib-samples", type=int, default=samples, help=f"calibration windows (default {samples})"
    )
    parser.add_argument(
        "--calib-seqlen", type=int, default=seqlen, help=f"tokens per window (default {seqlen})"
    )


def add_rotation_arg(parser: argparse.ArgumentParser) -> None:
    """`--rotation`: SliceGPT's per-layer rotations (default) or one shared rotation."""
    parser.add_argument("--rotation", choices=ROTATIONS, default="per-layer", help="default per-layer")


def add_probe_args(parser: argparse.ArgumentParser) -> None:
    """The options of the commands that compare dense and sliced models on test tokens (`entropy`, `shift`):
    4096 test tokens, the rotation, and a 32 x 512 calibration (many sparsities in minutes, not hours)."""
    add_token_args(parser, default_max_tokens=4096)
    add_rotation_arg(parser)
    add_calibration_args(parser, samples=32, seqlen=512)


def calibration_from_args(args: argparse.Namespace, lm: LoadedModel) -> torch.Tensor:
    """The calibration windows the `add_calibration_args` options ask for, drawn with CALIBRATION_SEED."""
    check_seqlen(args.calib_seqlen, lm.model.config.max_position_embeddings, "--calib-seqlen")
    return calibration_windows(
        lm.tokenizer,
        args.calib_corpus,
        args.calib_samples,
        args.calib_seqlen,
        CALIBRATION_SEED,
        args.calib_sampler,
    )


def calibration_fields(args: argparse.Namespace) -> dict[str, Any]:
    """Where the calibration windows came from, as the records store it."""
    return {
        "corpus": args.calib_corpus,
        "split": "train",
        "seed": CALIBRATION_SEED,
        "sampler": args.calib_sampler,
    }


def add_token_args(parser: argparse.ArgumentParser, default_max_tokens: int) -> None:
    """--text, or --corpus/--split with --max-tokens, in windows of --seqlen."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--text", default=None, help="trace this text (one sequence)")
    source.add_argument("--corpus", default="wiki", help="wiki, wikitext2:PATH or text:PATH (default wiki)")
    parser.add_argument("--split", default="test", choices=["test", "train"])
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=default_max_tokens,
        help=f"corpus tokens (default {default_max_tokens})",
    )
    parser.add_argument("--seqlen", type=int, default=512, help="tokens per corpus window (default 512)")


def token_windows(
    tokenizer: PreTrainedTokenizerBase, args: argparse.Namespace, context: int
) -> Int[Tensor, "w seqlen"]:
    """The tokens to trace or probe: the --text as one sequence, or the first --max-tokens corpus tokens in windows;
    neither longer than the model's `context` (positions beyond it were never trained)."""
    if args.text is not None:
        ids = tokenizer(args.text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        if ids.numel() == 0:
            raise MechsliceError("--text is empty (no tokens); give some text or use --corpus")
        if ids.numel() > context:
            raise MechsliceError(
                f"--text has {ids.numel()} tokens, more than the model's context of {context}; shorten it to "
                f"at most {context} tokens, or trace a corpus in windows (--corpus text:FILE --seqlen {context})"
            )
        return ids
    check_seqlen(args.seqlen, context, "--seqlen")
    ids = corpus_tokens(tokenizer, args.corpus, args.split)
    if args.max_tokens > ids.numel():
        raise MechsliceError(
            f"--max-tokens {args.max_tokens} is more than the {ids.numel()} tokens of {args.corpus}/{args.split}"
        )
    return eval_windows(ids, args.seqlen, args.max_tokens)


def show_progress(args: argparse.Namespace) -> bool:
    """Progress bars on stderr, unless `--json` asks for clean output or this is not rank 0 under torchrun."""
    return not args.json and distributed.is_main()


def model_from_args(args: argparse.Namespace) -> LoadedModel:
    """Load the model named by `--model` on `--device` in `--dtype`."""
    return load_model(args.model, device=args.device or default_device(), dtype=args.dtype)


def dtype_from_args(args: argparse.Namespace) -> tuple[torch.dtype, str]:
    """The dtype `--dtype` stands for on `--device` (auto resolved), and why it was chosen."""
    return resolve_dtype(args.dtype, args.device or default_device())


def model_fields(lm: LoadedModel) -> dict[str, str]:
    """The model's name and the dtype it computes in: the first fields of every command's output."""
    return {
        "model": lm.name,
        "model_description": describe_model(lm.name),
        "dtype": dtype_name(lm.model.dtype),
    }


def emit(args: argparse.Namespace, payload: dict[str, Any], text: Callable[[dict[str, Any]], str]) -> None:
    """Print `payload` as JSON under `--json`, else as the human-readable `text(payload)`."""
    if args.json:
        json.dump(payload, sys.stdout, default=float)
        sys.stdout.write("\n")
    else:
        print(text(payload))
