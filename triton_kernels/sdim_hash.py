"""Public ``sdim_hash`` (STYLE R1): the reference signature plus a trailing ``backend``."""

from __future__ import annotations

import torch

from triton_kernels import reference
from triton_kernels._dispatch import triton_module
from triton_kernels.backend import Backend, resolve_backend

__all__ = ["sdim_hash"]


def sdim_hash(
    seq_emb: torch.Tensor,  # (N, L, d) float
    projection: torch.Tensor,  # (d, num_hashes * hash_bits) float
    *,
    num_hashes: int,
    hash_bits: int,
    upcast: bool = False,
    backend: Backend = Backend.AUTO,
) -> torch.Tensor:  # (N, L, num_hashes) int64
    """SimHash codes; see :mod:`triton_kernels.reference.sdim_hash` for the math."""
    if resolve_backend("sdim_hash", backend, seq_emb.device) is Backend.TRITON:
        codes: torch.Tensor = triton_module("sdim_hash").sdim_hash_triton(
            seq_emb, projection, num_hashes=num_hashes, hash_bits=hash_bits, upcast=upcast)
        return codes
    return reference.sdim_hash(seq_emb, projection, num_hashes=num_hashes, hash_bits=hash_bits,
                               upcast=upcast)
