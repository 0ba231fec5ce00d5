"""`PruningRecord`: what one structural pruning did, on the axis it cut and on the shared parameter axis."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from mechslice.slicing.slicer import SlicingRecord

RECORD = "pruning.json"


@dataclass
class PruningRecord:
    """One pruned model: method, sparsity along its own axis (asked and after rounding), parameters, ranking.

    `scores[l][j]` is unit j's score in block l (for `layers`, `scores[l]` is block l's), `ranking` the unit
    indices by ascending score, first removed first, and `removed` what went (both per block for mlp and heads).
    `representation_dim` is the residual-stream width after pruning: d' for `slice`, d for every other method.
    """

    method: str
    sparsity: float  # nominal: the fraction of the method's own axis asked to go
    effective_sparsity: float  # 1 - kept / units after rounding down to the granularity
    axis: str  # d, m, v (KV groups) or L (blocks)
    units: int  # the axis' size before pruning
    kept: int  # and after
    granularity: int  # units are kept in multiples of this
    representation_dim: int
    d: int
    params: dict[str, int]  # total and non-embedding parameters, before and after
    param_sparsity: dict[str, float]  # fraction removed: "non_embedding" and "total"
    calibration: dict[str, Any]
    options: dict[str, Any]
    score: str | None = None  # the importance measure, in words and symbols
    scores: list[Any] | None = field(default=None, repr=False)
    ranking: list[Any] | None = field(default=None, repr=False)
    removed: list[Any] | None = None
    target: dict[str, Any] | None = None  # the parameter-sparsity match that chose `sparsity`, if one did
    dtype: str | None = None  # what the calibration forwards computed in
    versions: dict[str, str] = field(default_factory=dict)
    # `slice` only: SliceGPT's own record (written as slicing.json beside this one, not inside it)
    slicing: SlicingRecord | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The record as a JSON-ready dict (the content of `pruning.json`), without the nested slicing record."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "slicing"}
        return {k: asdict(v) if hasattr(v, "__dataclass_fields__") else v for k, v in values.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PruningRecord:
        """Read a record written by `to_dict`."""
        return cls(**data)
