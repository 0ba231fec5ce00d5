"""Perplexity: exp of the token-weighted mean negative log-likelihood over non-overlapping windows.

Each window is scored on its own (no context carried over), predicting tokens 2..L from their prefixes, so a
window of L tokens contributes L-1 predictions. Evaluation uses the plain Hugging Face modules with SDPA attention,
and applies the unembedding in chunks of positions so that the (tokens x vocab) logits never exist all at once.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from mechslice import distributed
from mechslice.attention import sdpa_attention

_LOGIT_CHUNK = 512  # positions per unembedding chunk: 512 x 49152 fp32 logits is ~100 MB


@dataclass(frozen=True)
class PerplexityResult:
    """Mean NLL (nats/token), perplexity, number of scored tokens, and wall time."""

    nll: float
    ppl: float
    tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        """Scored tokens per second of wall time."""
        return self.tokens / self.seconds if self.seconds > 0 else float("inf")

    def to_dict(self) -> dict[str, float]:
        """Plain dict for JSON output."""
        return {**asdict(self), "tokens_per_s": self.tokens_per_s}


def _lm_head(model: PreTrainedModel) -> torch.nn.Module:
    return model.get_output_embeddings()


@torch.no_grad()
def window_nll(
    model: PreTrainedModel, windows: Int[Tensor, "batch seqlen"]
) -> Float[Tensor, "batch seqlen-1"]:
    """Per-token NLL (float32) of each next token in a batch of windows."""
    device = next(model.parameters()).device
    windows = windows.to(device)
    hidden = model.base_model(input_ids=windows, use_cache=False).last_hidden_state
    head = _lm_head(model)
    out = torch.empty(windows.shape[0], windows.shape[1] - 1, device=device)
    for start in range(0, windows.shape[1] - 1, _LOGIT_CHUNK):
        stop = min(start + _LOGIT_CHUNK, windows.shape[1] - 1)
        logits = head(hidden[:, start:stop]).float()
        targets = windows[:, start + 1 : stop + 1]
        # rows of (token, vocab) in memory order: a (batch, vocab, pos) view makes cross_entropy ~2x slower on CPU
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
        out[:, start:stop] = nll.view(targets.shape)
    return out


def token_nll(
    model: PreTrainedModel, windows: Int[Tensor, "w seqlen"], batch_size: int = 4, progress: bool = False
) -> Float[Tensor, "w seqlen-1"]:
    """Per-token NLL for every window, batched, on the model's device; returned on the CPU."""
    chunks = []
    with sdpa_attention(model):
        for start in tqdm(range(0, len(windows), batch_size), desc="nll", disable=not progress, leave=False):
            chunks.append(window_nll(model, windows[start : start + batch_size]).cpu())
    return torch.cat(chunks)


def evaluate_perplexity(
    model: PreTrainedModel, windows: Int[Tensor, "w seqlen"], batch_size: int = 4, progress: bool = True
) -> PerplexityResult:
    """Perplexity of `model` over `windows`: exp(sum NLL / scored tokens), summed in float64.

    Under torchrun each rank scores its `distributed.shard` of the windows and the sums are added over ranks.
    """
    total, count = 0.0, 0
    start_time = time.perf_counter()
    windows = distributed.shard(windows)
    bar = tqdm(total=windows.numel() - len(windows), desc="perplexity", unit="tok", disable=not progress)
    with sdpa_attention(model):
        for start in range(0, len(windows), batch_size):
            nll = window_nll(model, windows[start : start + batch_size])
            total += nll.double().sum().item()
            count += nll.numel()
            bar.update(nll.numel())
    bar.close()
    total, count = distributed.sum_counts(total, count)
    seconds = time.perf_counter() - start_time
    mean = total / count
    return PerplexityResult(nll=mean, ppl=math.exp(mean), tokens=int(count), seconds=seconds)
