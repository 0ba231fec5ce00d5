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


def rotate_embedding(embedding: nn.Embedding, q: Float[Tensor, "d d_prime"]) -> None:
    """E_in = E Q: the token embeddings written into the rotated, sliced stream."""
    w = embedding.weight
    embedding.weight = _new(w, w.double() @ q.to(w.device))
    embedding.embedding_dim = q.shape[1]


def rotate_readers(readers: Iterable[nn.Linear], q: Float[Tensor, "d d_prime"], scale: float = 1.0) -> None:
    """W -> scale * W Q on the input side of every linear that reads the (normalized) stream.

    `scale` carries the sliced norm's sqrt(d/d') (see `resize_norm`), folded here in float64 and rounded once.
    """
    for linear in readers:
        w = linear.weight
        linear.weight = _new(w, (w.double() @ q.to(w.device)) * scale)
        linear.in_features = q.shape[1]


def rotate_writer(writer: nn.Linear, q: Float[Tensor, "d d_prime"]) -> None:
    """W -> Q^T W (and b -> Q^T b) on the output side of a linear that writes the stream."""
    w = writer.weight
    qt = q.to(w.device).T
    writer.weight = _new(w, qt @ w.double())
    if writer.bias is not None:
        writer.bias = _new(writer.bias, qt @ writer.bias.double())
    writer.out_features = q.shape[1]


def norm_eps(norm: nn.Module) -> float:
    """The epsilon a Hugging Face RMSNorm adds to the mean square (`variance_epsilon` in every family we adapt)."""
    return float(norm.variance_epsilon)


def resize_norm(norm: nn.Module, d: int, width: int) -> float:
    """Turn a fused RMSNorm into SliceGPT's norm over `width` of the original d channels; returns the reader scale.

    SliceGPT's norm is x / sqrt(sum x^2 / d + eps) with the original d. A Hugging Face RMSNorm over `width`
    channels with weight 1 and eps' = eps d / width computes x / sqrt(sum x^2 / width + eps'), which is that
    divided by c = sqrt(d / width); the readers take the factor c (`rotate_readers(scale=c)`). The weight stays
    exactly 1, so no dtype rounds the scale, and the module keeps its own class (hooks, plain checkpoints).
    """
    w = norm.weight
    norm.weight = _new(w, torch.ones(width, dtype=torch.float64))
    norm.variance_epsilon = norm_eps(norm) * d / width
    return math.sqrt(d / width)


def shortcut(q_in: Float[Tensor, "d d_in"], q_out: Float[Tensor, "d d_out"]) -> Float[Tensor, "d_in d_out"]:
    """The residual connection between two bases: Q_in^T Q_out (identity when they are equal and unsliced)."""
    return q_in.T @ q_out
