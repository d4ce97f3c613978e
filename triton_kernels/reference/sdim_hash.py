"""SDIM SimHash signatures, pure torch reference (STYLE R2 oracle).

Math (papers.md §2(a) 1–2): with a fixed random projection ``R`` of shape ``(d, G·τ)``
(``G = num_hashes`` signature groups of ``τ = hash_bits`` bits each)::

    p = seq_emb @ R                                  # (N, L, G·τ), always in fp32
    bit[n, l, g, j] = p[n, l, g·τ + j] > 0           # bits of a group are consecutive columns
    code[n, l, g] = Σ_j bit[n, l, g, j] << j         # in [0, 2**τ)

The projection is always computed in fp32 (inputs are cast) so that the bits do not depend on
the activation dtype (papers.md §5 pitfall 8). Bits are order-of-summation sensitive only when a
projection is within rounding error of 0; training and serving must therefore use the *same*
backend for bit-for-bit agreement (the Triton kernel sums in a different order than BLAS).
``upcast`` is accepted for signature uniformity and has no effect (the math is already fp32).

Cross-check against FuxiCTR (R2), ``reczoo/FuxiCTR model_zoo/LongCTR/SDIM/SDIM.py`` ``lsh_hash``:
FuxiCTR keeps ``random_rotations`` of shape ``(1, D, num_hashes, hash_bits)`` and computes
``rot = einsum('bld,bdht->blht')``, ``bit = argmax([-rot, rot]) = (rot > 0)`` and
``bucket = bits @ [1, 2, …, 2**(hash_bits-1)]``. Our ``projection`` is that tensor reshaped to
``(D, num_hashes*hash_bits)`` (group-major, bit-minor), and our code equals FuxiCTR's bucket id
(an int64 here instead of a float holding an integer). Read at reczoo/FuxiCTR 5c0c308; not run side
by side (FuxiCTR is not installed here).
"""

from __future__ import annotations

import torch

from triton_kernels.reference._common import check

__all__ = ["sdim_hash"]


def sdim_hash(
    seq_emb: torch.Tensor,  # (N, L, d) float
    projection: torch.Tensor,  # (d, num_hashes * hash_bits) float, fixed (never trained)
    *,
    num_hashes: int,
    hash_bits: int,
    upcast: bool = False,
) -> torch.Tensor:  # (N, L, num_hashes) int64 in [0, 2**hash_bits)
    """SimHash codes of every row of ``seq_emb``; pass ``(B, 1, d)`` to hash candidates."""
    del upcast  # always fp32, see module docstring
    check(seq_emb.dim() == 3, f"seq_emb must be (N, L, d), got {tuple(seq_emb.shape)}")
    d = seq_emb.shape[-1]
    check(
        tuple(projection.shape) == (d, num_hashes * hash_bits),
        f"projection must be ({d}, {num_hashes * hash_bits}), got {tuple(projection.shape)}",
    )
    check(1 <= hash_bits <= 30, f"hash_bits must be in [1, 30], got {hash_bits}")
    n, length, _ = seq_emb.shape
    proj = torch.matmul(seq_emb.float(), projection.float())  # (N, L, G·τ) fp32
    bits = (proj > 0).view(n, length, num_hashes, hash_bits)  # (N, L, G, τ) bool
    # Accumulate bit by bit in int32 (τ ≤ 30 fits), vectorised over all behaviors: ~5× faster on
    # CPU than multiplying an int64 (N, L, G, τ) tensor by the powers of two and summing.
    codes = bits[..., 0].to(torch.int32)  # (N, L, G)
    for j in range(1, hash_bits):
        codes |= bits[..., j].to(torch.int32) << j
    return codes.to(torch.int64)  # (N, L, G)
