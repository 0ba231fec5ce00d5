"""Intervention hooks: keep only the top-k principal directions of the residual stream.

`x -> x U_k U_k^T` with U_k the first k columns of an orthonormal basis (e.g. the eigenvectors of the stream's
second moment, sorted by eigenvalue, as SliceGPT computes them). It is what slicing to d' = k does to one
signal, applied in place on a dense model without rotating any weight, so a user can ask "what if only this
residual stream were sliced?" one layer at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor


def project_top_k(
    x: Float[Tensor, "... d"], basis: Float[Tensor, "d d_basis"], k: int
) -> Float[Tensor, "... d"]:
    """x projected onto span of the first k basis columns (computed in float64, returned in x's dtype)."""
    U = basis[:, :k].to(device=x.device, dtype=torch.float64)
    return ((x.to(torch.float64) @ U) @ U.T).to(x.dtype)


def projection_hook(basis: Float[Tensor, "d d_basis"], k: int) -> Callable[[Tensor, Any], Tensor]:
    """A TransformerLens forward hook replacing its activation by the top-k projection."""
    if basis.ndim != 2 or not 1 <= k <= basis.shape[1]:
        raise ValueError(f"need 1 <= k <= {basis.shape[-1]} basis columns, got k={k}")
    gram = basis.to(torch.float64).T @ basis.to(torch.float64)
    # Orthonormal columns to float32 storage precision: off-identity entries are O(d * 1e-7) at most.
    if not torch.allclose(gram, torch.eye(gram.shape[0], dtype=torch.float64), atol=1e-4):
        raise ValueError("basis columns are not orthonormal; pass eigenvectors from eigh")

    def hook(x: Tensor, hook: Any) -> Tensor:
        return project_top_k(x, basis, k)

    return hook


def projection_hooks(
    bases: dict[int, Float[Tensor, "d d_basis"]], k: int, hook: str = "hook_out"
) -> list[tuple[str, Callable[[Tensor, Any], Tensor]]]:
    """(hook name, fn) pairs projecting `blocks.{i}.{hook}` of each layer i in `bases` onto its top-k basis."""
    return [(f"blocks.{i}.{hook}", projection_hook(basis, k)) for i, basis in sorted(bases.items())]
