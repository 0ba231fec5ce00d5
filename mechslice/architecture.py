"""The paper's Table 2 read off a live model: every residual-stream weight with its shape in symbols.

Shapes are written in the paper's orientation (input x output), so W_q is d x h_attn*h_dim; the HF Linear stores
the transpose. Widths are read from the live modules, so after slicing the same table shows d' where d was.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from mechslice.adapters import ArchAdapter, Dims
from mechslice.loaded import LoadedModel


@dataclass(frozen=True)
class WeightRow:
    """One weight matrix: paper symbol, symbolic shape, the live shape, and whether they agree."""

    layer: int
    symbol: str
    symbolic: str
    shape: tuple[int, ...]
    expected: tuple[int, ...]

    @property
    def matches(self) -> bool:
        """Whether the live shape equals the symbolic shape evaluated with this model's sizes."""
        return self.shape == self.expected

    def to_dict(self) -> dict[str, object]:
        """Plain dict for JSON output."""
        return {**asdict(self), "matches": self.matches}


def weight_table(lm: LoadedModel, layers: list[int] | None = None) -> list[WeightRow]:
    """Table 2 for the given layers (default: the first): one row per residual-stream weight matrix."""
    dims = lm.dims
    blocks = lm.adapter.layers(lm.model)
    rows: list[WeightRow] = []
    for i in layers if layers is not None else [0]:
        rows.extend(_block_rows(lm.adapter, dims, blocks[i], i))
    return rows


def _block_rows(adapter: ArchAdapter, dims: Dims, layer: object, index: int) -> list[WeightRow]:
    view = adapter.block(layer)
    d_in = view.input_norm.weight.numel()  # width of the stream this block reads (d, or d' once sliced)
    d_mid = view.post_attn_norm.weight.numel()
    d_out = view.mlp_writer.weight.shape[0]
    q_width, kv_width = dims.h_attn * dims.h_dim, dims.v * dims.h_dim
    attn = (
        [("W_qkv", "d x (h_attn+2v) h_dim", (d_in, q_width + 2 * kv_width))]
        if adapter.fused_qkv
        else [
            ("W_q", "d x h_attn h_dim", (d_in, q_width)),
            ("W_k", "d x v h_dim", (d_in, kv_width)),
            ("W_v", "d x v h_dim", (d_in, kv_width)),
        ]
    )
    mlp = (
        [("W_gate_up", "d x 2m", (d_mid, 2 * dims.m))]
        if adapter.fused_gate_up
        else [("W_gate", "d x m", (d_mid, dims.m)), ("W_up", "d x m", (d_mid, dims.m))]
    )
    expected = [
        ("W_RMSNorm", "d", (d_in,)),
        *attn,
        ("W_o", "h_attn h_dim x d", (q_width, d_mid)),
        *mlp,
        ("W_down", "m x d", (dims.m, d_out)),
    ]
    modules = [
        view.input_norm,
        *view.attn_readers,
        view.attn_writer,
        *view.mlp_readers,
        view.mlp_writer,
    ]
    rows = []
    for (symbol, symbolic, shape), module in zip(expected, modules, strict=True):
        weight = module.weight
        live = tuple(weight.shape) if weight.dim() == 1 else (weight.shape[1], weight.shape[0])
        rows.append(WeightRow(index, symbol, symbolic, live, shape))
    return rows
