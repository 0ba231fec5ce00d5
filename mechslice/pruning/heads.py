"""`heads`: prune whole KV groups (a KV head with all the query heads that read it), the same count per block.

Score of group g in block l: S_g = E_t ||W_o[:, G_g] z_{G_g}(t)||_2^2, the mean squared norm of what the
group's query heads write to the residual stream (z: the concatenated head outputs entering W_o, G_g: the
columns of the group's query heads). Removing the group removes exactly that term from the attention output,
so S_g is the squared error its removal adds to resid_mid (cross terms aside); the same principle as the `mlp`
score. Pruning KV groups keeps GQA whole by construction: a KV head never loses a query head that reads it, and
h_attn / v stays the same. Groups are ranked within each block (one head count must fit the config).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from mechslice.errors import MechsliceError
from mechslice.loaded import LoadedModel
from mechslice.pruning.accounting import linear_numel
from mechslice.pruning.calibrate import calibrate
from mechslice.pruning.surgery import keep_columns, keep_rows

AXIS, UNIT = "v", "KV groups per block"
SCORE = "E_t ||W_o[:, G_g] z_G_g||_2^2: mean squared norm of the KV group's write to the stream, per block"
# attributes of an attention module that hold head counts (Phi-3 reads num_key_value_heads at every call)
_HEAD_COUNTS = {"num_heads": "q", "num_attention_heads": "q", "num_key_value_heads": "kv"}


def units(lm: LoadedModel) -> int:
    """v, the KV heads (groups) per block."""
    return lm.dims.v


def group_size(lm: LoadedModel) -> int:
    """Query heads per KV group, h_attn / v."""
    return lm.dims.h_attn // lm.dims.v


def unit_parameters(lm: LoadedModel) -> int:
    """Parameters one KV group holds over the whole model: its Q, K, V rows and W_o columns per block."""
    h_dim, g = lm.dims.h_dim, group_size(lm)
    total = 0
    for layer in lm.adapter.layers(lm.model):
        view = lm.adapter.block(layer)
        if lm.adapter.fused_qkv:
            total += (g + 2) * h_dim * linear_numel(view.attn_readers[0], rows=1)
        else:
            q, k, v = view.attn_readers
            total += g * h_dim * linear_numel(q, rows=1)
            total += h_dim * (linear_numel(k, rows=1) + linear_numel(v, rows=1))
        total += g * h_dim * view.attn_writer.out_features
    return total


def config_changes(lm: LoadedModel, kept: int) -> dict[str, int]:
    """Config entries of a model keeping `kept` KV groups per block (head_dim written out explicitly)."""
    return {
        "num_attention_heads": kept * group_size(lm),
        "num_key_value_heads": kept,
        "head_dim": lm.dims.h_dim,
    }


def scores(
    lm: LoadedModel, calib: Int[Tensor, "n seqlen"], batch_size: int, progress: bool
) -> Float[Tensor, "layers v"]:
    """S_g for every KV group of every block, float64, from one dense forward pass over `calib`."""
    dims = lm.dims
    width = group_size(lm) * dims.h_dim  # columns of W_o per group
    writers = [lm.adapter.block(layer).attn_writer for layer in lm.adapter.layers(lm.model)]
    sums = torch.zeros(len(writers), dims.v, dtype=torch.float64)

    def hook_for(i: int) -> Callable[[nn.Module, tuple[Tensor, ...]], None]:
        def hook(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            z = args[0].reshape(-1, dims.v, width).float()
            w = module.weight.detach().float().T.reshape(dims.v, width, -1)
            writes = torch.einsum("tgk,gkd->tgd", z, w)  # each group's term of the attention output
            sums[i] += writes.square().sum(-1, dtype=torch.float64).sum(0).cpu()

        return hook

    calibrate(lm, calib, batch_size, progress, pre_hooks=[(w, hook_for(i)) for i, w in enumerate(writers)])
    return sums / calib.numel()


def _rows(groups: Tensor, size: int, h_dim: int, offset: int = 0) -> Tensor:
    """Feature indices of the heads in `groups` (each `size` heads of h_dim features), shifted by `offset`."""
    heads = (groups[:, None] * size + torch.arange(size)).reshape(-1)
    return offset + (heads[:, None] * h_dim + torch.arange(h_dim)).reshape(-1)


@torch.no_grad()
def remove(lm: LoadedModel, removed: list[list[int]]) -> None:
    """Drop KV groups `removed[l]` of block l (the same count in every block) and set the head counts."""
    dims, g = lm.dims, group_size(lm)
    kept_count = dims.v - len(removed[0])
    changes = config_changes(lm, kept_count)
    for layer, gone in zip(lm.adapter.layers(lm.model), removed, strict=True):
        if len(gone) != len(removed[0]):
            raise MechsliceError("every block must lose the same number of KV groups")
        view = lm.adapter.block(layer)
        kept = torch.tensor(sorted(set(range(dims.v)) - set(gone)), dtype=torch.long)
        q_rows, kv_rows = _rows(kept, g, dims.h_dim), _rows(kept, 1, dims.h_dim)
        if lm.adapter.fused_qkv:  # rows [Q; K; V]
            q_width, kv_width = dims.h_attn * dims.h_dim, dims.v * dims.h_dim
            rows = torch.cat([q_rows, q_width + kv_rows, q_width + kv_width + kv_rows])
            keep_rows(view.attn_readers[0], rows)
        else:
            q, k, v = view.attn_readers
            keep_rows(q, q_rows)
            keep_rows(k, kv_rows)
            keep_rows(v, kv_rows)
        keep_columns(view.attn_writer, q_rows)
        for name, kind in _HEAD_COUNTS.items():
            if hasattr(layer.self_attn, name):
                setattr(
                    layer.self_attn,
                    name,
                    changes["num_attention_heads" if kind == "q" else "num_key_value_heads"],
                )
    for key, value in changes.items():
        setattr(lm.model.config, key, value)
