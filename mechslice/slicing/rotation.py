"""Rotate and slice one family of residual-stream weights by an orthogonal Q (computed in float64).

Notation: Q is d x d' (the first d' principal directions of the signal, columns). A module reading the stream
(x -> W x) gets W Q; a module writing it (y -> W y + b) gets Q^T W and Q^T b; the embedding's rows become E Q.
Each function replaces the module's tensors with new, smaller ones and never edits a shared tensor in place, so
a model that shares its parameters with another (see `Slicer.sliced`) leaves the other untouched.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from jaxtyping import Float
from torch import Tensor, nn


def _new(tensor: Tensor, value: Tensor) -> nn.Parameter:
    return nn.Parameter(
        value.to(dtype=tensor.dtype, device=tensor.device), requires_grad=tensor.requires_grad
    )


def rotate_embedding(embedding: nn.Embedding, q: Float[Tensor, "d d_"]) -> None:
    """E_in = E Q: the token embeddings written into the rotated, sliced stream."""
    w = embedding.weight
    embedding.weight = _new(w, w.double() @ q.to(w.device))
    embedding.embedding_dim = q.shape[1]


def rotate_readers(readers: Iterable[nn.Linear], q: Float[Tensor, "d d_"]) -> None:
    """W -> W Q on the input side of every linear that reads the (normalized) stream."""
    for linear in readers:
        w = linear.weight
        linear.weight = _new(w, w.double() @ q.to(w.device))
        linear.in_features = q.shape[1]


def rotate_writer(writer: nn.Linear, q: Float[Tensor, "d d_"]) -> None:
    """W -> Q^T W (and b -> Q^T b) on the output side of a linear that writes the stream."""
    w = writer.weight
    qt = q.to(w.device).T
    writer.weight = _new(w, qt @ w.double())
    if writer.bias is not None:
        writer.bias = _new(writer.bias, qt @ writer.bias.double())
    writer.out_features = q.shape[1]


def resize_norm(norm: nn.Module, d: int, d_sliced: int) -> None:
    """A fused RMSNorm over d' channels with weight sqrt(d/d'): it divides the sum of squares by the original d."""
    w = norm.weight
    norm.weight = _new(w, torch.full((d_sliced,), math.sqrt(d / d_sliced), dtype=torch.float64))


def shortcut(q_in: Float[Tensor, "d d_in"], q_out: Float[Tensor, "d d_out"]) -> Float[Tensor, "d_in d_out"]:
    """The residual connection between two bases: Q_in^T Q_out (identity when they are equal and unsliced)."""
    return q_in.T @ q_out
