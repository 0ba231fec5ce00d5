"""The loaded model every part of mechslice passes around: HF modules, tokenizer, adapter, and a bridge.

Its own module, below `loading` and `slicing`: loading builds one (a sliced folder through `slicing.io`), and
slicing, pruning and evaluation take one, so neither needs the other's module to name the type.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from mechslice.adapters import ArchAdapter, Dims

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge


@dataclass
class LoadedModel:
    """A loaded causal LM: HF modules for evaluation, a bridge over the same modules for hooks."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    adapter: ArchAdapter
    name: str
    source: str
    _bridge: TransformerBridge | None = field(default=None, repr=False)

    @property
    def device(self) -> torch.device:
        """Where the weights live."""
        return next(self.model.parameters()).device

    @property
    def dims(self) -> Dims:
        """d, m, h_attn, v, h_dim, vocab and layer count of the live model."""
        return self.adapter.dims(self.model.config)

    @property
    def bridge(self) -> TransformerBridge:
        """TransformerLens bridge wrapping these very modules (built once; weights are shared, not copied)."""
        if self._bridge is None:
            from transformer_lens.model_bridge import TransformerBridge

            self._bridge = TransformerBridge.boot_transformers(
                self.name, hf_model=self.model, tokenizer=self.tokenizer, device=str(self.device)
            )
        return self._bridge

    def reset_bridge(self) -> None:
        """Drop the bridge and put the plain HF modules back where it installed its wrappers.

        Building a bridge replaces modules inside the HF model (their state-dict keys gain
        `_original_component`); slicing, saving and a rebuilt bridge must see the originals.
        """
        _unwrap_children(self.model)
        _drop_bridge_biases(self.model)
        self._bridge = None


def _unwrap_children(module: torch.nn.Module) -> None:
    """Replace every bridge wrapper below `module` by the HF module it wraps, recursively."""
    for name, child in list(module._modules.items()):
        if child is None:
            continue
        plain = child
        while "_original_component" in plain._modules:
            plain = plain._modules["_original_component"]
        if plain is not child:
            module._modules[name] = plain
        _unwrap_children(plain)


def _drop_bridge_biases(model: torch.nn.Module) -> None:
    """Remove the zero `bias` buffer the bridge's unembedding registers on a bias-free linear (it would
    otherwise be saved as a weight the model's config does not have)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and "bias" in module._buffers:
            del module._buffers["bias"]
            module.register_parameter("bias", None)
