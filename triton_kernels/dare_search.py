"""Public ``dare_search`` (STYLE R1): the reference signature plus a trailing ``backend``."""

from __future__ import annotations

import torch

from triton_kernels import reference
from triton_kernels._dispatch import triton_module
from triton_kernels.backend import Backend, resolve_backend

__all__ = ["dare_search"]


def dare_search(
    query: torch.Tensor,  # (B, da)
    keys: torch.Tensor,  # (U, L, da)
    values: torch.Tensor,  # (U, L, dr)
    mask: torch.Tensor,  # (U, L) bool
    user_index: torch.Tensor,  # (B,) int64
    pos_logits: torch.Tensor | None,  # (L,) or None
    *,
    top_k: int,
    upcast: bool = False,
    backend: Backend = Backend.AUTO,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # out (B, dr), top_idx (B, K), weights (B, K)
    """DARE top-K soft search; see :mod:`triton_kernels.reference.dare_search`."""
    if resolve_backend("dare_search", backend, query.device) is Backend.TRITON:
        launch = triton_module("dare_search").dare_search_triton
        found: tuple[torch.Tensor, torch.Tensor, torch.Tensor] = launch(
            query, keys, values, mask, user_index, pos_logits, top_k=top_k, upcast=upcast)
        return found
    return reference.dare_search(query, keys, values, mask, user_index, pos_logits, top_k=top_k,
                                 upcast=upcast)
