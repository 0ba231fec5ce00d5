"""Decoder blocks with SliceGPT shortcut matrices, for any pre-norm family an adapter describes.

In per-layer mode the two sides of each residual connection live in different bases, so the block computes
`resid_mid = resid_pre @ attn_shortcut + attn_out` and `resid_post = resid_mid @ mlp_shortcut + mlp_out`.
The layer's class is swapped for a subclass of its own class with that forward (the modules, and so every
TransformerBridge hook inside them, are untouched).
"""

from __future__ import annotations

from typing import Any

from jaxtyping import Float
from torch import Tensor, nn

from mechslice.adapters import ArchAdapter

SHORTCUTS = ("attn_shortcut", "mlp_shortcut")


def attn_branch(
    layer: nn.Module, norm_name: str, x: Float[Tensor, "batch seqlen d"], **kwargs: Any
) -> Tensor:
    """The attention branch of a pre-norm block: self_attn(norm(x)) with the layer's own call arguments."""
    return layer.self_attn(hidden_states=getattr(layer, norm_name)(x), **kwargs)[0]


def mlp_branch(layer: nn.Module, norm_name: str, x: Float[Tensor, "batch seqlen d"]) -> Tensor:
    """The MLP branch of a pre-norm block: mlp(norm(x))."""
    return layer.mlp(getattr(layer, norm_name)(x))


def _through(x: Tensor, shortcut: Tensor | None) -> Tensor:
    return x if shortcut is None else x @ shortcut


class ShortcutBlock(nn.Module):
    """Mixin placed before a family's decoder-layer class: the same block, with shortcut matrices on the skips."""

    input_norm_name: str
    post_attn_norm_name: str
    attn_shortcut: Tensor | None
    mlp_shortcut: Tensor | None

    def forward(
        self,
        hidden_states: Float[Tensor, "batch seqlen d_in"],
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: Any = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[Tensor, Tensor] | None = None,
        **kwargs: Any,
    ) -> Float[Tensor, "batch seqlen d_out"]:
        """resid_pre -> resid_mid -> resid_post, each skip through its shortcut matrix when one is set."""
        attn_out = attn_branch(
            self,
            self.input_norm_name,
            hidden_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        resid_mid = _through(hidden_states, self.attn_shortcut) + attn_out
        return _through(resid_mid, self.mlp_shortcut) + mlp_branch(self, self.post_attn_norm_name, resid_mid)


_CLASSES: dict[tuple[type, str, str], type] = {}


def shortcut_class(base: type, adapter: ArchAdapter) -> type:
    """The (cached) subclass `Sliced<Base>` of a family's decoder-layer class with shortcut skips."""
    key = (base, adapter.input_norm, adapter.post_attn_norm)
    if key not in _CLASSES:
        attrs = {"input_norm_name": adapter.input_norm, "post_attn_norm_name": adapter.post_attn_norm}
        _CLASSES[key] = type(f"Sliced{base.__name__}", (ShortcutBlock, base), attrs)
    return _CLASSES[key]


def install_shortcut(layer: nn.Module, adapter: ArchAdapter, name: str, value: Tensor) -> None:
    """Set `attn_shortcut` or `mlp_shortcut` of a layer (a persistent buffer), swapping in the shortcut class."""
    if not isinstance(layer, ShortcutBlock):
        layer.__class__ = shortcut_class(type(layer), adapter)
        for other in SHORTCUTS:
            layer.register_buffer(other, None)
    reference = next(layer.parameters())
    layer.register_buffer(name, value.to(dtype=reference.dtype, device=reference.device).contiguous())
