"""Cut a Linear down to chosen output rows or input columns, in place (new, smaller parameters)."""

from __future__ import annotations

from jaxtyping import Int
from torch import Tensor, nn


def keep_rows(linear: nn.Linear, rows: Int[Tensor, " k"]) -> None:
    """Keep output features `rows` (in the given order) of `linear`, with their bias entries."""
    index = rows.to(linear.weight.device)
    linear.weight = nn.Parameter(linear.weight.data.index_select(0, index).contiguous(), requires_grad=False)
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.data.index_select(0, index).contiguous(), requires_grad=False)
    linear.out_features = len(rows)


def keep_columns(linear: nn.Linear, columns: Int[Tensor, " k"]) -> None:
    """Keep input features `columns` (in the given order) of `linear`; its bias is per output and stays."""
    index = columns.to(linear.weight.device)
    linear.weight = nn.Parameter(linear.weight.data.index_select(1, index).contiguous(), requires_grad=False)
    linear.in_features = len(columns)
