"""`layers`: remove whole decoder blocks, the least influential first (ShortGPT).

Block influence BI_l = 1 - E_t cos(x_l(t), x_{l+1}(t)), x_l the stream entering block l and x_{l+1} the block's
output, averaged over the calibration tokens (ShortGPT's `block_influence`; a token where either vector is zero
counts cos = 0.5, as there). Blocks are ranked once, on the dense model, and the lowest-BI ones removed. One
difference from ShortGPT's script, which reads the HF `hidden_states` list: there the last entry is the final
norm's output, so its last block is compared with a normalized stream; here every block's own output is used.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from mechslice.loaded import LoadedModel
from mechslice.pruning.calibrate import calibrate

AXIS, UNIT = "L", "decoder blocks"
SCORE = "BI = 1 - mean_t cos(x_in, x_out) of the block's input and output streams (ShortGPT)"
ZERO_COSINE = 0.5  # ShortGPT's value for a token whose input or output vector is zero (its NaN cosine)


def units(lm: LoadedModel) -> int:
    """L, the decoder blocks."""
    return lm.dims.n_layers


def unit_parameters(lm: LoadedModel) -> int:
    """Parameters of one block (the blocks of every supported family are alike)."""
    first = lm.adapter.layers(lm.model)[0]
    return sum(t.numel() for t in first.state_dict().values())


def cosines(x: Float[Tensor, "... d"], y: Float[Tensor, "... d"]) -> Float[Tensor, " tokens"]:
    """Per-token cosine of x and y in float64, ZERO_COSINE where either is the zero vector."""
    a, b = x.reshape(-1, x.shape[-1]).double(), y.reshape(-1, y.shape[-1]).double()
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
    return cos.nan_to_num(nan=ZERO_COSINE)


def scores(
    lm: LoadedModel, calib: Int[Tensor, "n seqlen"], batch_size: int, progress: bool
) -> Float[Tensor, " layers"]:
    """BI of every block, float64, from one dense forward pass over `calib`."""
    layers = lm.adapter.layers(lm.model)
    sums = torch.zeros(len(layers), dtype=torch.float64)

    def hook_for(i: int) -> Callable[[nn.Module, tuple[Any, ...], dict[str, Any], Any], None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            x_in = args[0] if args else kwargs["hidden_states"]
            x_out = output[0] if isinstance(output, tuple) else output
            sums[i] += cosines(x_in, x_out).sum().cpu()

        return hook

    calibrate(
        lm, calib, batch_size, progress, post_hooks=[(layer, hook_for(i)) for i, layer in enumerate(layers)]
    )
    return 1.0 - sums / calib.numel()


@torch.no_grad()
def remove(lm: LoadedModel, removed: list[int]) -> None:
    """Delete blocks `removed`; renumber the rest (KV-cache slots) and update num_hidden_layers, layer_types."""
    layers, config = lm.adapter.layers(lm.model), lm.model.config
    kept = [i for i in range(len(layers)) if i not in set(removed)]
    for i in sorted(set(removed), reverse=True):
        del layers[i]  # the ModuleList renames its children 0..L'-1 (the state-dict keys of a fresh model)
    for new, block in enumerate(layers):
        for module in (block, block.self_attn):
            if hasattr(module, "layer_idx"):
                module.layer_idx = new
    config.num_hidden_layers = len(kept)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in kept]
