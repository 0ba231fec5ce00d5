"""Structural pruning along four axes, each leaving an ordinary checkpoint: d (slice), m (mlp), KV groups
(heads) and blocks (layers), with one parameter accounting so that the axes can be compared.

`prune(lm, method, sparsity, calib)` prunes in place and returns the `PruningRecord`; `nearest_sparsity` picks
the method's own sparsity whose rounded result comes nearest a target parameter sparsity; `save_pruned` writes
the folder. The scores of `mlp`, `heads` and `layers` come from one forward pass of the dense model over the
calibration windows (`mechslice.corpora.calibration_windows`, the same windows SliceGPT calibrates on).
`mlp` and `heads` rank within each block and cut every block to the same size (a config holds one
`intermediate_size` and one head count); `layers` ranks the blocks against each other. Pruning is in place, so
a sweep loads (or copies) the dense model once per method and sparsity and calls `prune` on it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from types import ModuleType

import torch
from huggingface_hub.errors import StrictDataclassError
from jaxtyping import Int
from torch import Tensor

from mechslice.errors import MechsliceError
from mechslice.loaded import LoadedModel
from mechslice.precision import dtype_name
from mechslice.pruning import heads, layers, mlp
from mechslice.pruning.accounting import (
    PARAM_COUNTS,
    Match,
    ParamCount,
    count_parameters,
    nearest,
    param_sparsity,
    sliced_parameters,
)
from mechslice.pruning.calibrate import check_calibration, check_prunable
from mechslice.pruning.io import save_pruned
from mechslice.pruning.record import PruningRecord
from mechslice.slicing.slicer import ROTATIONS, kept_size, slice_model, software_versions

METHODS = ("slice", "mlp", "heads", "layers")
_UNIT_METHODS: dict[str, ModuleType] = {"mlp": mlp, "heads": heads, "layers": layers}

__all__ = [
    "METHODS",
    "PARAM_COUNTS",
    "Match",
    "ParamCount",
    "PruneOptions",
    "PruningRecord",
    "check_prunable",
    "count_parameters",
    "kept_units",
    "nearest_sparsity",
    "param_sparsity",
    "predicted_parameters",
    "prune",
    "save_pruned",
]


@dataclass(frozen=True)
class PruneOptions:
    """Method options: `round_to` (the granularity of d' and m'), `keep_first`/`keep_last` (blocks `layers`
    must not remove), `rotation` and `slice_head` (passed to SliceGPT)."""

    round_to: int = 8
    keep_first: bool = False
    keep_last: bool = False
    rotation: str = "per-layer"
    slice_head: bool = False

    def check(self) -> None:
        """Refuse options no method accepts."""
        if self.rotation not in ROTATIONS:
            raise MechsliceError(f"unknown rotation '{self.rotation}'; use one of {', '.join(ROTATIONS)}")


def _method(method: str) -> None:
    if method not in METHODS:
        raise MechsliceError(f"unknown pruning method '{method}'; use one of {', '.join(METHODS)}")


def _axis(lm: LoadedModel, method: str) -> tuple[str, int]:
    """The symbol and size of the method's own axis."""
    if method == "slice":
        return "d", lm.dims.d
    module = _UNIT_METHODS[method]
    return module.AXIS, module.units(lm)


def _granularity(method: str, options: PruneOptions) -> int:
    return options.round_to if method in ("slice", "mlp") else 1


def _protected(lm: LoadedModel, options: PruneOptions) -> list[int]:
    """Blocks `layers` must keep."""
    n = lm.dims.n_layers
    return sorted({i for i, keep in ((0, options.keep_first), (n - 1, options.keep_last)) if keep})


def _check_config(lm: LoadedModel, kept: int) -> None:
    """Refuse a head count the family's config class rejects (Llama's wants d to be a multiple of h_attn)."""
    config = lm.model.config
    try:
        type(config).from_dict({**config.to_dict(), **heads.config_changes(lm, kept)})
    except (ValueError, TypeError, StrictDataclassError) as err:
        why = " ".join(str(err.__cause__ or err).split())  # the validator's own words, on one line
        raise MechsliceError(
            f"keeping {kept} of {lm.dims.v} KV groups ({kept * heads.group_size(lm)} query heads) gives a config "
            f"transformers refuses ({why}); choose another sparsity"
        ) from err


def kept_units(lm: LoadedModel, method: str, sparsity: float, options: PruneOptions = PruneOptions()) -> int:
    """The units of the method's axis left at `sparsity` after rounding; refused where nothing would be left."""
    _method(method)
    options.check()
    symbol, n = _axis(lm, method)
    protected = _protected(lm, options) if method == "layers" else []
    why = "blocks --keep-first/--keep-last keep"
    kept = kept_size(n, sparsity, _granularity(method, options), symbol, len(protected), why)
    if method == "heads":
        _check_config(lm, kept)
    return kept


def predicted_parameters(
    lm: LoadedModel, method: str, kept: int, options: PruneOptions = PruneOptions()
) -> ParamCount:
    """What the model will store once pruned to `kept` units of the method's axis (before pruning it)."""
    return _predictor(lm, method, options)(kept)


def _predictor(lm: LoadedModel, method: str, options: PruneOptions) -> Callable[[int], ParamCount]:
    """kept -> the stored parameters after pruning to it; the dense counts read once."""
    _method(method)
    if method == "slice":
        return lambda kept: sliced_parameters(lm, kept, options.rotation, options.slice_head)
    dense, module = count_parameters(lm), _UNIT_METHODS[method]
    n, per_unit = module.units(lm), module.unit_parameters(lm)
    # every unit of an axis holds the same parameters, so the count is affine in the units kept
    return lambda kept: ParamCount(dense.total - (n - kept) * per_unit, dense.embedding)


def _admissible(lm: LoadedModel, method: str, options: PruneOptions) -> list[int]:
    """Every kept count the method can reach."""
    _, n = _axis(lm, method)
    step = _granularity(method, options)
    low = max(len(_protected(lm, options)), 1) if method == "layers" else step
    counts = list(range(low, n + 1, step))
    if method != "heads":
        return counts
    valid = []
    for k in counts:
        try:
            _check_config(lm, k)
        except MechsliceError:
            continue
        valid.append(k)
    return valid


def nearest_sparsity(
    lm: LoadedModel,
    method: str,
    target: float,
    of: str = "non_embedding",
    options: PruneOptions = PruneOptions(),
) -> Match:
    """The method's own sparsity whose result removes the fraction of parameters nearest `target`.

    `of` says which parameters the fraction counts ("non_embedding", the default, or "total"); the match
    records the parameter sparsity actually reached, which the granularity keeps from equalling the target.
    """
    _method(method)
    options.check()
    _, n = _axis(lm, method)
    dense = count_parameters(lm)
    candidates = _admissible(lm, method, options)
    return nearest(dense, target, of, candidates, n, _predictor(lm, method, options))


def _rank(scores: Tensor, removable: list[int] | None = None) -> list[int]:
    """Unit indices by ascending score (ties: lower index first), optionally only those in `removable`."""
    order = torch.argsort(scores, stable=True).tolist()
    if removable is None:
        return order
    allowed = set(removable)
    return [i for i in order if i in allowed]


@torch.no_grad()
def prune(
    lm: LoadedModel,
    method: str,
    sparsity: float,
    calib: Int[Tensor, "n seqlen"],
    options: PruneOptions = PruneOptions(),
    batch_size: int = 8,
    progress: bool = True,
    target: Match | None = None,
) -> PruningRecord:
    """Prune `lm` in place along the method's axis to `sparsity` (rounded down to whole units) and record it.

    `slice` runs SliceGPT (`slice_model`); `mlp`, `heads` and `layers` score their units on the dense model
    over `calib` and remove the lowest-scoring ones (see each module for its score). `target` is the match
    that chose `sparsity`, recorded with it.
    """
    kept = kept_units(lm, method, sparsity, options)
    symbol, n = _axis(lm, method)
    d, before = lm.dims.d, count_parameters(lm)
    calibration = {"n_samples": calib.shape[0], "seqlen": calib.shape[1], "tokens": calib.numel()}
    fields: dict[str, object] = {}
    if method == "slice":
        fields["slicing"] = slice_model(
            lm, sparsity, calib, options.rotation, options.round_to, batch_size, progress, options.slice_head
        )
        representation_dim = kept
    else:
        check_calibration(lm, calib, batch_size)
        module = _UNIT_METHODS[method]
        scores = module.scores(lm, calib, batch_size, progress)
        if method == "layers":
            protected = _protected(lm, options)
            ranking = _rank(scores)
            removed = sorted(_rank(scores, [i for i in range(n) if i not in protected])[: n - kept])
            module.remove(lm, removed)
        else:
            ranking = [_rank(row) for row in scores]
            removed = [sorted(order[: n - kept]) for order in ranking]
            module.remove(lm, removed)
        fields.update(score=module.SCORE, scores=scores.tolist(), ranking=ranking, removed=removed)
        representation_dim = d
    after = count_parameters(lm)
    return PruningRecord(
        method=method,
        sparsity=sparsity,
        effective_sparsity=1.0 - kept / n,
        axis=symbol,
        units=n,
        kept=kept,
        granularity=_granularity(method, options),
        representation_dim=representation_dim,
        d=d,
        params={
            "total_before": before.total,
            "total_after": after.total,
            "non_embedding_before": before.non_embedding,
            "non_embedding_after": after.non_embedding,
        },
        param_sparsity=param_sparsity(before, after),
        calibration=calibration,
        options=asdict(options),
        target=None if target is None else asdict(target),
        dtype=dtype_name(lm.model.dtype),
        versions=software_versions(),
        **fields,
    )
