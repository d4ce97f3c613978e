"""SDIM per-user bucket table (the paper's BSE step), pure torch reference (STYLE R2 oracle).

Math (papers.md §2(a) 9 and §5 pitfall 10): for every user row u, group g and code c::

    sums[u, g, c, :]  = Σ_{l : mask[u, l] and codes[u, l, g] == c} seq_emb[u, l, :]
    counts[u, g, c]   = |{l : mask[u, l] and codes[u, l, g] == c}|

The sums are **un-normalised** on purpose: they are additive, so serving can extend a user's
table with new behaviors (``sums += one_hot(code) ⊗ emb``) without re-reading the history; the
ℓ2 normalisation happens at gather time (:mod:`triton_kernels.reference.sdim_gather`).

Padding never contributes: padded embeddings are replaced by 0 with ``torch.where`` (so NaN/Inf
padding cannot leak) and padded codes are ignored (they may hold any value). The gradient
reaches ``seq_emb`` only (codes are integer; SDIM has no gradient through bucket choice).

Implementation: a one-hot matmul ``onehot(codes)ᵀ @ seq_emb`` per (user, group) —
memory ``U·L·G·2**hash_bits`` for the one-hot, no Python loop over behaviors. Accumulation is in
fp32 when ``upcast`` (the result is then fp32), else in the input dtype.
"""

from __future__ import annotations

import torch

from triton_kernels.reference._common import check, compute_dtype

__all__ = ["sdim_bucket_sums"]


def sdim_bucket_sums(
    seq_emb: torch.Tensor,  # (U, L, d) float
    codes: torch.Tensor,  # (U, L, G) int64 in [0, 2**hash_bits) where mask is True
    mask: torch.Tensor,  # (U, L) bool, True = real behavior
    *,
    hash_bits: int,
    upcast: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:  # sums (U, G, 2**τ, d) float, counts (U, G, 2**τ) int32
    """Masked segment sums of behaviors per (group, code); see module docstring."""
    check(seq_emb.dim() == 3, f"seq_emb must be (U, L, d), got {tuple(seq_emb.shape)}")
    u, length, d = seq_emb.shape
    check(codes.dim() == 3 and tuple(codes.shape[:2]) == (u, length),
          f"codes must be ({u}, {length}, G), got {tuple(codes.shape)}")
    check(tuple(mask.shape) == (u, length), f"mask must be ({u}, {length}), got {tuple(mask.shape)}")
    num_codes = 1 << hash_bits
    dtype = compute_dtype(seq_emb, upcast)
    real = mask.to(torch.bool)  # (U, L)
    emb = torch.where(real.unsqueeze(-1), seq_emb.to(dtype), torch.zeros((), dtype=dtype,
                                                                         device=seq_emb.device))
    safe_codes = torch.where(real.unsqueeze(-1), codes, torch.zeros_like(codes))  # (U, L, G)
    onehot = torch.nn.functional.one_hot(safe_codes, num_codes)  # (U, L, G, C) int64
    onehot = onehot * real.view(u, length, 1, 1)  # padded rows select no bucket
    sums = torch.einsum("ulgc,uld->ugcd", onehot.to(dtype), emb)  # (U, G, C, d)
    counts = onehot.sum(dim=1).to(torch.int32)  # (U, G, C)
    return sums, counts
