"""The attention kernel evaluation runs with: SDPA, whatever a TransformerLens bridge switched the model to.

Its own module because slicing, pruning, perplexity and multiple-choice scoring all need it, and none of them is
the others' owner.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from transformers import PreTrainedModel


@contextmanager
def sdpa_attention(model: PreTrainedModel) -> Iterator[None]:
    """Run with SDPA attention; building a TransformerBridge switches the modules to eager, which is slower."""
    previous = model.config._attn_implementation
    if previous == "sdpa":
        yield
        return
    model.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)
