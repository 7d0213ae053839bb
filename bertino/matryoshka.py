"""Matryoshka Representation Learning (Kusupati et al. 2022, arXiv:2205.13147) as a loss combinator.

Shapes: B batch, D full dim, d a truncated dim.

    L_MRL = Σ_m  w_m · L(normalize(e[:, :d_m]), ...)

The model is encoded ONCE; each dim only slices the same embeddings, so the extra cost is a few small matmuls.
Weights are used as given, not renormalised: the V5 weights [1.0, 0.4, 0.2, 0.2] sum to 1.8.
Under GradCache the cached gradient is ∂L_MRL/∂e = Σ_m w_m ∂L_m/∂e: one recompute pass serves every dim.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F


def truncate(e: torch.Tensor, dim: int) -> torch.Tensor:
    """First `dim` columns of e (..., D), re-normalised to unit length → (..., dim)."""
    return F.normalize(e[..., :dim], dim=-1)


def matryoshka_loss(
    loss_fn: Callable[..., torch.Tensor],
    embeddings: Sequence[torch.Tensor],
    dims: Sequence[int],
    weights: Sequence[float],
    parts: dict[int, torch.Tensor] | None = None,
    **loss_kwargs,
) -> torch.Tensor:
    """Σ_m weights[m] · loss_fn(*[truncate(e, dims[m]) for e in embeddings], **loss_kwargs) → ().

    embeddings: the loss's embedding arguments, each (B_i, D); loss_kwargs: its other arguments (scores, scale).
    `parts`, if given, receives each dim's unweighted loss (detached): {d: L_d} — free to log, as the loss is
    computed anyway (under GradCache, in pass 2).
    """
    if len(dims) != len(weights):
        raise ValueError(f"matryoshka dims {list(dims)} and weights {list(weights)} differ in length")
    total = embeddings[0].new_zeros((), dtype=torch.float32)
    for d, w in zip(dims, weights):
        loss = loss_fn(*[truncate(e, d) for e in embeddings], **loss_kwargs)
        if parts is not None:
            parts[int(d)] = loss.detach()
        total = total + w * loss
    return total
