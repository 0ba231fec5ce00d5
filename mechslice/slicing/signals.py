"""Calibration signals: the inputs and call arguments of every decoder layer, and dense norm-input moments.

`layer_inputs` runs the model's own embedding and mask/position code with each decoder layer replaced by a
catcher, so the per-layer call arguments (position embeddings, attention mask) are exactly what the family's
forward would pass, for any adapter family. `norm_input_moments` runs the dense model once with hooks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from tqdm.auto import tqdm

from hooks.stats import SecondMoment
from mechslice.loaded import LoadedModel
from mechslice.slicing.calibration import require_finite

CallArgs = list[dict[str, Any]]  # keyword arguments the decoder passes to each layer, by layer index


def batches(calib: Int[Tensor, "n seqlen"], batch_size: int) -> Iterator[Int[Tensor, "batch seqlen"]]:
    """Consecutive batches of calibration windows."""
    yield from calib.split(batch_size)


class _Catcher(nn.Module):
    """Stands in for decoder layer `index`: records its input and call arguments, passes the input through."""

    def __init__(self, index: int, seen: dict[int, tuple[Tensor, dict[str, Any]]]) -> None:
        super().__init__()
        self.index, self.seen = index, seen

    def forward(self, hidden_states: Tensor, **kwargs: Any) -> Tensor:
        self.seen[self.index] = (hidden_states, kwargs)
        return hidden_states


@torch.no_grad()
def layer_inputs(
    lm: LoadedModel, calib: Int[Tensor, "n seqlen"], batch_size: int
) -> tuple[list[Float[Tensor, "batch seqlen d"]], list[CallArgs]]:
    """The first layer's input (the embedding output) per batch, and every layer's call arguments per batch."""
    layers = lm.adapter.layers(lm.model)
    originals = list(layers)
    seen: dict[int, tuple[Tensor, dict[str, Any]]] = {}
    inputs, call_args = [], []
    try:
        for i in range(len(layers)):
            layers[i] = _Catcher(i, seen)
        for batch in batches(calib, batch_size):
            lm.model.base_model(input_ids=batch.to(lm.device), use_cache=False)
            inputs.append(seen[0][0])
            call_args.append([seen[i][1] for i in range(len(layers))])
            seen.clear()
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    return inputs, call_args


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


@torch.no_grad()
def norm_input_moments(
    lm: LoadedModel, calib: Int[Tensor, "n seqlen"], batch_size: int, progress: bool
) -> tuple[list[SecondMoment], list[SecondMoment]]:
    """Second moments of every norm input of the (dense) model: resid_pre of each layer plus the final norm's
    input (L+1 of them), and resid_mid of each layer (L), from one forward pass over the calibration."""
    adapter, model, d = lm.adapter, lm.model, lm.dims.d
    layers = adapter.layers(model)
    # each moment lives beside its signal (the device of the layer that reads it, under a device map)
    pre = [SecondMoment(d, _device(adapter.block(layer).input_norm)) for layer in layers]
    pre.append(SecondMoment(d, _device(adapter.final_norm(model))))
    mid = [SecondMoment(d, _device(adapter.block(layer).post_attn_norm)) for layer in layers]
    targets: list[tuple[nn.Module, SecondMoment, str]] = []
    for i, layer in enumerate(layers):
        view = adapter.block(layer)
        targets += [
            (view.input_norm, pre[i], "the embedding output" if i == 0 else f"the output of layer {i - 1}")
        ]
        targets += [(view.post_attn_norm, mid[i], f"resid_mid of layer {i}")]
    targets.append((adapter.final_norm(model), pre[-1], f"the output of layer {len(mid) - 1}"))

    def hook_for(stats: SecondMoment) -> Callable[[nn.Module, tuple[Tensor, ...]], None]:
        def hook(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            stats.add(args[0])

        return hook

    handles = [norm.register_forward_pre_hook(hook_for(stats)) for norm, stats, _ in targets]
    try:
        for batch in tqdm(list(batches(calib, batch_size)), desc="calibrating", disable=not progress):
            model.base_model(input_ids=batch.to(lm.device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    for _, stats, signal in targets:  # in network order, so the first non-finite signal is named
        require_finite(stats.sum, signal)
    return pre, mid
