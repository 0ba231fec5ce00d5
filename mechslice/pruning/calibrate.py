"""One forward pass of the dense model over the calibration windows, with the hooks a method's scores need."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor, nn
from tqdm.auto import tqdm

from mechslice.attention import sdpa_attention
from mechslice.errors import MechsliceError
from mechslice.loaded import LoadedModel
from mechslice.slicing.calibration import warn_if_few_tokens
from mechslice.slicing.layers import ShortcutBlock
from mechslice.slicing.signals import batches

# a module and its forward pre-hook `hook(module, args)`
PreHook = tuple[nn.Module, Callable[[nn.Module, tuple[Any, ...]], None]]
# a module and its forward hook `hook(module, args, kwargs, output)`
PostHook = tuple[nn.Module, Callable[[nn.Module, tuple[Any, ...], dict[str, Any], Any], None]]


def check_calibration(lm: LoadedModel, calib: Tensor, batch_size: int) -> None:
    """Refuse calibration that is not a non-empty (n, seqlen) integer tensor, and models pruning cannot edit."""
    if calib.ndim != 2 or calib.dtype not in (torch.int32, torch.int64) or calib.numel() == 0:
        raise MechsliceError(
            f"calibration must be a non-empty (n, seqlen) integer tensor, got {tuple(calib.shape)}"
        )
    if batch_size < 1:
        raise MechsliceError(f"batch_size must be at least 1, got {batch_size}")
    check_prunable(lm)
    warn_if_few_tokens(calib.numel(), lm.dims.d)


def check_prunable(lm: LoadedModel) -> None:
    """Refuse models pruning cannot edit in place: offloaded layers, a per-layer sliced model."""
    if any(p.device.type == "meta" for p in lm.model.parameters()):
        raise MechsliceError(
            "some layers are offloaded (their weights are on the meta device) and cannot be pruned in place; "
            "give every layer a device in the map (a GPU or cpu) to prune, offload only to evaluate"
        )
    if any(isinstance(layer, ShortcutBlock) for layer in lm.adapter.layers(lm.model)):
        raise MechsliceError("this model is sliced in per-layer mode; prune the original model instead")


@torch.no_grad()
def calibrate(
    lm: LoadedModel,
    calib: Int[Tensor, "n seqlen"],
    batch_size: int,
    progress: bool,
    pre_hooks: Sequence[PreHook] = (),
    post_hooks: Sequence[PostHook] = (),
) -> None:
    """Run the decoder (no unembedding) over `calib` in batches with SDPA, the hooks installed meanwhile."""
    lm.reset_bridge()  # pruning and saving act on the plain HF modules
    handles = [module.register_forward_pre_hook(hook) for module, hook in pre_hooks]
    handles += [module.register_forward_hook(hook, with_kwargs=True) for module, hook in post_hooks]
    try:
        with sdpa_attention(lm.model):
            for batch in tqdm(list(batches(calib, batch_size)), desc="calibrating", disable=not progress):
                lm.model.base_model(input_ids=batch.to(lm.device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
