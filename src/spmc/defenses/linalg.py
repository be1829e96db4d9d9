"""Float64 linear algebra over column blocks, shared by the defenses.

A defense sees a ``[n, d]`` matrix of client states with d up to millions; a float64 copy of it would double or
quadruple the memory, so products are accumulated over column blocks of ``BLOCK`` entries, each cast to float64:

    G = Σ_b X_b X_bᵀ          (the Gram matrix, G_ij = ⟨x_i, x_j⟩)
    q = Σ_b Σ_c X_b[:, c]²    (squared row norms)

The block size fixes the order of the float64 sums, hence the last bits of the result: callers that must
reproduce earlier results keep their block size.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

BLOCK = 1 << 16


def column_slices(width: int, block: int = BLOCK) -> Iterator[slice]:
    """The column slices ``[start, start + block)`` covering ``range(width)``, in order."""
    if block < 1:
        raise ValueError(f"block: got {block}; must be an integer >= 1")
    for start in range(0, width, block):
        yield slice(start, start + block)


def gram(vectors: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """G = X Xᵀ for the rows of ``vectors`` [n, d], accumulated in float64 over column blocks; float64 [n, n] on the
    device of ``vectors`` (no [n, d] float64 copy)."""
    if vectors.dim() != 2:
        raise ValueError(f"vectors must be [n, d]; got shape {tuple(vectors.shape)}")
    n = vectors.shape[0]
    out = torch.zeros((n, n), dtype=torch.float64, device=vectors.device)
    for cols in column_slices(vectors.shape[1], block):
        part = vectors[:, cols].to(torch.float64)
        out += part @ part.T
    return out


def row_sq_norms(vectors: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """‖x_k‖² of every row of ``vectors`` [n, d], accumulated in float64 over column blocks; float64 [n]."""
    if vectors.dim() != 2:
        raise ValueError(f"vectors must be [n, d]; got shape {tuple(vectors.shape)}")
    out = torch.zeros(vectors.shape[0], dtype=torch.float64, device=vectors.device)
    for cols in column_slices(vectors.shape[1], block):
        part = vectors[:, cols].to(torch.float64)
        out += (part * part).sum(dim=1)
    return out
