"""Public ``sdim_bucket_sums`` (STYLE R1): the reference signature plus a trailing ``backend``."""

from __future__ import annotations

import torch

from triton_kernels import reference
from triton_kernels._dispatch import triton_module
from triton_kernels.backend import Backend, resolve_backend

__all__ = ["sdim_bucket_sums"]


def sdim_bucket_sums(
    seq_emb: torch.Tensor,  # (U, L, d) float
    codes: torch.Tensor,  # (U, L, G) int64
    mask: torch.Tensor,  # (U, L) bool
    *,
    hash_bits: int,
    upcast: bool = False,
    backend: Backend = Backend.AUTO,
) -> tuple[torch.Tensor, torch.Tensor]:  # sums (U, G, 2**τ, d), counts (U, G, 2**τ) int32
    """Per-user bucket table; see :mod:`triton_kernels.reference.sdim_bucket_sums`."""
    if resolve_backend("sdim_bucket_sums", backend, seq_emb.device) is Backend.TRITON:
        launch = triton_module("sdim_bucket_sums").sdim_bucket_sums_triton
        sums_counts: tuple[torch.Tensor, torch.Tensor] = launch(
            seq_emb, codes, mask, hash_bits=hash_bits, upcast=upcast)
        return sums_counts
    return reference.sdim_bucket_sums(seq_emb, codes, mask, hash_bits=hash_bits, upcast=upcast)
