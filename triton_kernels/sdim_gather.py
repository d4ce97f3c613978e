"""Public ``sdim_gather`` (STYLE R1): the reference signature plus a trailing ``backend``."""

from __future__ import annotations

import torch

from triton_kernels import reference
from triton_kernels._dispatch import triton_module
from triton_kernels.backend import Backend, resolve_backend

__all__ = ["sdim_gather"]


def sdim_gather(
    sums: torch.Tensor,  # (U, G, C, d) float
    counts: torch.Tensor,  # (U, G, C) int32
    cand_codes: torch.Tensor,  # (B, G) int64
    user_index: torch.Tensor,  # (B,) int64
    *,
    upcast: bool = False,
    backend: Backend = Backend.AUTO,
) -> torch.Tensor:  # (B, d)
    """ℓ2-normalised bucket gather, mean over groups; see :mod:`triton_kernels.reference.sdim_gather`."""
    if resolve_backend("sdim_gather", backend, sums.device) is Backend.TRITON:
        out: torch.Tensor = triton_module("sdim_gather").sdim_gather_triton(
            sums, counts, cand_codes, user_index, upcast=upcast)
        return out
    return reference.sdim_gather(sums, counts, cand_codes, user_index, upcast=upcast)
