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

Implementation: one batched matmul ``onehotᵀ @ seq_emb`` per user, where the one-hot
``(U, L, G·2**hash_bits)`` is built directly in the compute dtype by ``scatter_`` (3-5× faster
than an int64 ``one_hot`` cast to float at L = 10,000, the scorer's cold encode; no Python loop
over behaviors). Accumulation is in fp32 when ``upcast`` (the result is then fp32), else in the
input dtype. Counts are summed as integers, so they stay exact in bf16/fp16 at any L.
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
    g = codes.shape[2]
    num_codes = 1 << hash_bits
    dtype = compute_dtype(seq_emb, upcast)
    real = mask.to(torch.bool).unsqueeze(-1)  # (U, L, 1)
    zero = torch.zeros((), dtype=dtype, device=seq_emb.device)
    emb = torch.where(real, seq_emb.to(dtype), zero)  # padded rows → 0, even NaN/Inf padding
    offsets = torch.arange(g, device=codes.device) * num_codes  # (G,)
    slots = torch.where(real, codes, torch.zeros_like(codes)) + offsets  # (U, L, G) in [0, G·C)
    onehot = torch.zeros(u, length, g * num_codes, dtype=dtype, device=seq_emb.device)
    onehot.scatter_(2, slots, real.to(dtype).expand(u, length, g))  # padded rows select no bucket
    sums = torch.bmm(onehot.transpose(1, 2), emb).view(u, g, num_codes, d)  # (U, G, C, d)
    counts = torch.zeros(u, g * num_codes, dtype=torch.int32, device=seq_emb.device)
    counts.scatter_add_(1, slots.reshape(u, -1), real.to(torch.int32).expand(u, length, g).reshape(u, -1))
    return sums, counts.view(u, g, num_codes)
