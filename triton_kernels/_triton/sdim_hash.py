"""Triton SDIM SimHash: one fused projection + sign + bit-pack pass (no autograd: integer output).

The reference is :mod:`triton_kernels.reference.sdim_hash`. Each program hashes ``BLOCK_R`` rows:
it accumulates ``x @ R`` over ``d`` in ``BLOCK_D`` chunks in fp32 (``input_precision="ieee"``, never
TF32, so bits match fp32 math), then packs the τ bits of each of the G groups into an int64 code.
Only the codes are written: the ``(N·L, G·τ)`` projection never reaches global memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from triton_kernels._triton.launch import LaunchConfig, assert_contiguous, assert_shape, pow2_at_least
from triton_kernels.reference._common import check

__all__ = ["sdim_hash_triton"]


@triton.jit
def _sdim_hash_fwd_kernel(
    x_ptr, stride_xr, stride_xd,
    proj_ptr, stride_pd, stride_pm,
    codes_ptr, stride_cr, stride_cg,
    num_rows, dim,
    NUM_HASHES: tl.constexpr, HASH_BITS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Hash ``BLOCK_R`` rows.

    Pointers:
        x_ptr:     (num_rows, dim) float (fp32/fp16/bf16), the flattened ``seq_emb``; cast to fp32.
        proj_ptr:  (dim, NUM_HASHES*HASH_BITS) float, the fixed projection; cast to fp32.
        codes_ptr: (num_rows, NUM_HASHES) int64 output codes in [0, 2**HASH_BITS).
    """
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # int64: N·L may exceed 2**31 / d
    row_ok = rows < num_rows
    cols = tl.arange(0, BLOCK_M)
    m_total = NUM_HASHES * HASH_BITS
    col_ok = cols < m_total
    acc = tl.zeros((BLOCK_R, BLOCK_M), dtype=tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_ok = ds < dim
        x = tl.load(x_ptr + rows[:, None] * stride_xr + ds[None, :] * stride_xd,
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        p = tl.load(proj_ptr + ds[:, None] * stride_pd + cols[None, :] * stride_pm,
                    mask=d_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.dot(x, p, input_precision="ieee")
    bit_val = tl.where(acc > 0, 1, 0).to(tl.int64) << (cols % HASH_BITS).to(tl.int64)[None, :]
    group_of_col = tl.where(col_ok, cols // HASH_BITS, -1)
    for g in tl.static_range(NUM_HASHES):
        code = tl.sum(tl.where(group_of_col[None, :] == g, bit_val, 0), axis=1)  # (BLOCK_R,)
        tl.store(codes_ptr + rows * stride_cr + g * stride_cg, code, mask=row_ok)


def sdim_hash_launch(seq_emb: torch.Tensor, projection: torch.Tensor, num_hashes: int,
                     hash_bits: int) -> tuple[torch.Tensor, LaunchConfig]:
    """Check shapes, launch, return ``(codes, launch decisions)``."""
    check(seq_emb.dim() == 3, f"seq_emb must be (N, L, d), got {tuple(seq_emb.shape)}")
    n, length, dim = seq_emb.shape
    check(1 <= hash_bits <= 30, f"hash_bits must be in [1, 30], got {hash_bits}")
    assert_shape("projection", projection, (dim, num_hashes * hash_bits))
    x = seq_emb.reshape(n * length, dim).contiguous()
    proj = projection.contiguous()
    assert_contiguous(seq_emb=x, projection=proj)
    codes = torch.empty((n * length, num_hashes), dtype=torch.int64, device=seq_emb.device)
    rows = n * length
    block_m = pow2_at_least(num_hashes * hash_bits, 16)
    block_d = min(pow2_at_least(dim, 16), 64)
    block_r = 32 if block_m <= 64 else 16
    grid = (triton.cdiv(rows, block_r),)
    cfg = LaunchConfig(block_size=block_d, num_warps=4, grid=grid,
                       extra=(("BLOCK_R", block_r), ("BLOCK_M", block_m)))
    if rows > 0:
        _sdim_hash_fwd_kernel[grid](
            x, x.stride(0), x.stride(1),
            proj, proj.stride(0), proj.stride(1),
            codes, codes.stride(0), codes.stride(1),
            rows, dim,
            NUM_HASHES=num_hashes, HASH_BITS=hash_bits,
            BLOCK_R=block_r, BLOCK_D=block_d, BLOCK_M=block_m, num_warps=cfg.num_warps,
        )
    return codes.view(n, length, num_hashes), cfg


def sdim_hash_triton(seq_emb: torch.Tensor, projection: torch.Tensor, *, num_hashes: int, hash_bits: int,
                     upcast: bool = False) -> torch.Tensor:
    """Triton twin of :func:`triton_kernels.reference.sdim_hash` (``upcast`` has no effect)."""
    del upcast
    codes, _ = sdim_hash_launch(seq_emb.detach(), projection.detach(), num_hashes, hash_bits)
    return codes
