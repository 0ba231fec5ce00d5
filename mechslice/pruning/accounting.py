"""Parameter accounting: what a pruned model stores, against the dense model, and the sparsity that matches it.

Every method prunes along its own axis (d, m, KV groups or blocks), so its own sparsity means different things;
parameter sparsity, the fraction of stored parameters removed, is the one axis they share. "Embedding" counts
the input embedding and the unembedding (once when tied); everything else (norms, shortcut matrices included)
is non-embedding. Counts read the live tensors; predictions use the same shapes before anything is pruned.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from mechslice.checks import check_sparsity
from mechslice.errors import MechsliceError
from mechslice.loaded import LoadedModel

# What a parameter sparsity can count: the parameters outside the embeddings, or all of them.
PARAM_COUNTS = ("non_embedding", "total")


@dataclass(frozen=True)
class ParamCount:
    """Stored parameters of a model: all of them, and the embedding part (embedding plus unembedding)."""

    total: int
    embedding: int

    @property
    def non_embedding(self) -> int:
        """Everything but the embedding and the unembedding."""
        return self.total - self.embedding


def _unique_numel(tensors: list[Tensor]) -> int:
    """Elements of the distinct tensors (a tied weight, listed twice, counts once)."""
    return sum({t.data_ptr(): t.numel() for t in tensors}.values())


def count_parameters(lm: LoadedModel) -> ParamCount:
    """Count what the model's state dict stores: its weights and persistent buffers (SliceGPT's shortcuts)."""
    model, adapter = lm.model, lm.adapter
    embedding = [adapter.embeddings(model).weight, adapter.lm_head(model).weight]
    return ParamCount(_unique_numel(list(model.state_dict().values())), _unique_numel(embedding))


def param_sparsity(before: ParamCount, after: ParamCount) -> dict[str, float]:
    """Fraction of the non-embedding parameters and of all parameters removed (negative: the model grew)."""
    return {
        "non_embedding": 1.0 - after.non_embedding / before.non_embedding,
        "total": 1.0 - after.total / before.total,
    }


def linear_numel(linear: nn.Linear, rows: int | None = None, cols: int | None = None) -> int:
    """Parameters of `linear` with `rows` output and `cols` input features (default: its own)."""
    rows = linear.out_features if rows is None else rows
    cols = linear.in_features if cols is None else cols
    return rows * cols + (rows if linear.bias is not None else 0)


def sliced_parameters(lm: LoadedModel, d_prime: int, rotation: str, slice_head: bool) -> ParamCount:
    """What `slice_model(lm, ...)` at width d' will store, from the dense model's shapes.

    Fusion unties the unembedding; every stream axis becomes d' (the head's width stays d unless sliced);
    per-layer mode adds a d' x d' shortcut on each skip, and an unsliced head a d' x d one on the last MLP skip.
    """
    adapter, model, d = lm.adapter, lm.model, lm.dims.d
    width = d_prime if slice_head else d
    layers = adapter.layers(model)
    embedding = (
        adapter.embeddings(model).num_embeddings * d_prime + adapter.lm_head(model).out_features * width
    )
    blocks = 0
    for i, layer in enumerate(layers):
        view = adapter.block(layer)
        out = width if i == len(layers) - 1 else d_prime
        readers = sum(linear_numel(r, cols=d_prime) for r in (*view.attn_readers, *view.mlp_readers))
        writers = linear_numel(view.attn_writer, rows=d_prime) + linear_numel(view.mlp_writer, rows=out)
        shortcuts = (
            d_prime * d_prime + d_prime * out if rotation == "per-layer" else d_prime * out * (out != d_prime)
        )
        blocks += 2 * d_prime + readers + writers + shortcuts
    return ParamCount(embedding + blocks + width, embedding)


@dataclass(frozen=True)
class Match:
    """The own-axis sparsity whose granularity-rounded result comes nearest a target parameter sparsity."""

    target: float
    of: str  # "non_embedding" or "total": which parameters the target counts
    sparsity: float
    kept: int
    param_sparsity: float


def nearest(
    dense: ParamCount,
    target: float,
    of: str,
    candidates: list[int],
    n: int,
    predicted: Callable[[int], ParamCount],
) -> Match:
    """Among kept counts `candidates` (of `n` units), the one whose predicted parameter sparsity is nearest."""
    check_sparsity(target, "parameter sparsity", "0.2")
    if of not in PARAM_COUNTS:
        raise MechsliceError(f"parameter sparsity counts 'non_embedding' or 'total' parameters, not '{of}'")
    if not candidates:
        raise MechsliceError("no admissible pruned size: every choice would remove everything")
    scored = [(param_sparsity(dense, predicted(k))[of], k) for k in candidates]
    # nearest first; of two equally near, the one that keeps more
    value, kept = min(scored, key=lambda pair: (abs(pair[0] - target), -pair[1]))
    return Match(target, of, 1.0 - kept / n, kept, value)
