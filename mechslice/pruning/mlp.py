"""`mlp`: prune the gated MLP's intermediate width m -> m', the same m' in every block.

Score of neuron j in block l: S_j = E_t[a_j(t)^2] ||W_down[:, j]||^2, where a_j = act(gate_j) * up_j is the
neuron's activation (the input of W_down) and the expectation runs over the calibration tokens. Removing the
neuron removes exactly a_j(t) W_down[:, j] from the block's output, and S_j is the mean squared norm of that
term: the error its removal adds to the residual stream, cross terms aside. It is Wanda's structured score
(||X_j||_2 ||W_:,j||, squared, a monotone change) and FLAP's WIFN/WIFV family; FLAP's WIFV uses the
variance of a_j because FLAP adds each removed neuron's mean back as a W_down bias, which the bias-free MLPs
of these families do not have (the result must stay an ordinary checkpoint), so here the mean counts too.
Neurons are ranked within each block (a per-block m' would not fit one `intermediate_size` in the config).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from mechslice.loaded import LoadedModel
from mechslice.pruning.accounting import linear_numel
from mechslice.pruning.calibrate import calibrate
from mechslice.pruning.surgery import keep_columns, keep_rows

AXIS, UNIT = "m", "MLP neurons per block"
SCORE = "E_t[a_j^2] * ||W_down[:, j]||_2^2, a_j = act(gate_j) * up_j (the input of W_down), per block"


def units(lm: LoadedModel) -> int:
    """m, the intermediate width."""
    return lm.dims.m


def unit_parameters(lm: LoadedModel) -> int:
    """Parameters one neuron holds over the whole model: its W_gate, W_up rows and W_down column per block."""
    total = 0
    for layer in lm.adapter.layers(lm.model):
        view = lm.adapter.block(layer)
        rows = 2 if lm.adapter.fused_gate_up else 1  # a fused W_gate_up holds two rows per neuron
        total += sum(rows * linear_numel(r, rows=1) for r in view.mlp_readers)
        total += view.mlp_writer.out_features
    return total


def scores(
    lm: LoadedModel, calib: Int[Tensor, "n seqlen"], batch_size: int, progress: bool
) -> Float[Tensor, "layers m"]:
    """S_j for every neuron of every block, float64, from one dense forward pass over `calib`."""
    writers = [lm.adapter.block(layer).mlp_writer for layer in lm.adapter.layers(lm.model)]
    sums = torch.zeros(len(writers), lm.dims.m, dtype=torch.float64)

    def hook_for(i: int) -> Callable[[nn.Module, tuple[Tensor, ...]], None]:
        def hook(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            sums[i] += args[0].reshape(-1, args[0].shape[-1]).double().square().sum(0).cpu()

        return hook

    calibrate(lm, calib, batch_size, progress, pre_hooks=[(w, hook_for(i)) for i, w in enumerate(writers)])
    columns = torch.stack([w.weight.detach().double().square().sum(0).cpu() for w in writers])
    return sums / calib.numel() * columns


@torch.no_grad()
def remove(lm: LoadedModel, removed: list[list[int]]) -> None:
    """Drop neurons `removed[l]` of block l (the same count in every block); set `intermediate_size`."""
    m = lm.dims.m
    for layer, gone in zip(lm.adapter.layers(lm.model), removed, strict=True):
        view = lm.adapter.block(layer)
        kept = torch.tensor(sorted(set(range(m)) - set(gone)), dtype=torch.long)
        rows = torch.cat([kept, kept + m]) if lm.adapter.fused_gate_up else kept  # [gate; up] halves
        for reader in view.mlp_readers:
            keep_rows(reader, rows)
        keep_columns(view.mlp_writer, kept)
        if hasattr(layer.mlp, "intermediate_size"):
            layer.mlp.intermediate_size = len(kept)
    lm.model.config.intermediate_size = m - len(removed[0])
