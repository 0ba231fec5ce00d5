"""Norm fusion: fold each RMSNorm's weight into the linears that read it, and untie the embeddings.

After fusion every norm computes a plain x / rms(x) (weight all ones), which commutes with any orthogonal Q
applied to the stream: the precondition of SliceGPT's computational invariance. Logits do not change.
"""

from __future__ import annotations

import torch
from torch import nn

from mechslice.errors import MechsliceError
from mechslice.loaded import LoadedModel

# Child modules of a block that may sit beside the two pre-norms without touching the residual stream.
_NORM_WORDS = ("norm",)


def check_blocks_covered(lm: LoadedModel) -> None:
    """Refuse blocks the method does not cover: extra norms in the residual branch, biased or non-RMS norms."""
    adapter = lm.adapter
    expected = {adapter.input_norm, adapter.post_attn_norm}
    for i, layer in enumerate(adapter.layers(lm.model)):
        extra = sorted(
            name
            for name, child in layer.named_children()
            if name not in expected and any(w in type(child).__name__.lower() for w in _NORM_WORDS)
        )
        if extra:
            raise MechsliceError(
                f"layer {i} has norms the method does not cover ({', '.join(extra)}: post-branch norms inside "
                "the residual branch break computational invariance); slice a pre-norm model such as Llama"
            )
        view = adapter.block(layer)
        for norm in (view.input_norm, view.post_attn_norm):
            if getattr(norm, "bias", None) is not None or not hasattr(norm, "weight"):
                raise MechsliceError(
                    f"layer {i} uses {type(norm).__name__} with a bias or no weight; only RMSNorm-style norms "
                    "fuse without mean-baking; slice a model with RMSNorm"
                )


def _fold(norm: nn.Module, readers: tuple[nn.Linear, ...]) -> None:
    """W -> W diag(g) for every reader, g -> 1 (float64 product, stored in each tensor's dtype)."""
    g = norm.weight.detach().double()
    for linear in readers:
        w = linear.weight
        w.data = (w.data.double() * g.to(w.device)).to(w.dtype)
    norm.weight.data = torch.ones_like(norm.weight.data)


def untie_embeddings(lm: LoadedModel) -> None:
    """Give the unembedding its own copy of the embedding matrix (they will be rotated differently)."""
    model, adapter = lm.model, lm.adapter
    head, embedding = adapter.lm_head(model), adapter.embeddings(model)
    if head.weight is embedding.weight or head.weight.data_ptr() == embedding.weight.data_ptr():
        head.weight = nn.Parameter(
            embedding.weight.detach().clone(), requires_grad=embedding.weight.requires_grad
        )
    model.config.tie_word_embeddings = False
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    text_config.tie_word_embeddings = False


@torch.no_grad()
def fuse_norms(lm: LoadedModel) -> None:
    """Fold every norm weight into its readers and untie the embeddings, in place; the logits stay the same."""
    lm.reset_bridge()  # slicing and saving act on the plain HF modules
    check_blocks_covered(lm)
    untie_embeddings(lm)
    adapter, model = lm.adapter, lm.model
    for layer in adapter.layers(model):
        view = adapter.block(layer)
        _fold(view.input_norm, view.attn_readers)
        _fold(view.post_attn_norm, view.mlp_readers)
    _fold(adapter.final_norm(model), (adapter.lm_head(model),))
