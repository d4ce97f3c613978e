"""Triton SDIM SimHash: one fused projection + sign + bit-pack pass (no autograd: integer output).

The reference is :mod:`triton_kernels.reference.sdim_hash`. Each program hashes ``BLOCK_R`` rows:
it accumulates ``x @ R`` over ``d`` in ``BLOCK_D`` chunks in fp32 (``input_precision="ieee"``, never
TF32, so bits match fp32 math), then packs the τ bits of each of the G groups into a code.

Column layout: the projection's ``G·τ`` columns are read into a padded ``(G_PAD, T_PAD)`` grid
(``T_PAD = next_pow2(τ)``, ``G_PAD = next_pow2(G)``; padding columns are 0, so their bit is 0), so
the ``(BLOCK_R, G_PAD·T_PAD)`` accumulator reshapes to ``(BLOCK_R, G_PAD, T_PAD)`` and the codes
are one int32 ``Σ_j bit_j << j`` over the last axis, written with one coalesced 2-D store of the
``(BLOCK_R, G)`` int64 codes. Only the codes are written: the projection never reaches memory.
Each output element is the same sequential fp32 FMA chain over ``d`` as before the re-layout (a
column permutation does not change per-element arithmetic), so the codes are unchanged.

Tunables (see :func:`sdim_hash_config`): ``BLOCK_R`` (rows per program), ``BLOCK_D`` (d chunk),
``num_warps``, ``num_stages``. On a GPU they can be overridden without editing code through the
environment variable ``CTRSTREAM_SDIM_HASH_CONFIG``, e.g. ``"BLOCK_R=128,num_warps=8"``
(comma-separated ``KEY=int``; unknown keys raise; ignored under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from triton_kernels._triton.launch import (
    LaunchConfig,
    assert_contiguous,
    assert_shape,
    config_overrides,
    interpreting,
    pow2_at_least,
)
from triton_kernels.reference._common import check

__all__ = ["sdim_hash_config", "sdim_hash_triton"]

ENV_CONFIG = "CTRSTREAM_SDIM_HASH_CONFIG"


@triton.jit
def _sdim_hash_fwd_kernel(
    x_ptr, stride_xr, stride_xd,
    proj_ptr, stride_pd, stride_pm,
    codes_ptr, stride_cr, stride_cg,
    num_rows, dim,
    NUM_HASHES: tl.constexpr, HASH_BITS: tl.constexpr,
    G_PAD: tl.constexpr, T_PAD: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
):
    """Hash ``BLOCK_R`` rows.

    Pointers:
        x_ptr:     (num_rows, dim) float (fp32/fp16/bf16), the flattened ``seq_emb``; cast to fp32.
        proj_ptr:  (dim, NUM_HASHES*HASH_BITS) float, the fixed projection; cast to fp32.
        codes_ptr: (num_rows, NUM_HASHES) int64 output codes in [0, 2**HASH_BITS).
    """
    BLOCK_M: tl.constexpr = G_PAD * T_PAD
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # int64: N·L may exceed 2**31 / d
    row_ok = rows < num_rows
    # padded column m = g·T_PAD + j reads projection column g·τ + j (0 when g ≥ G or j ≥ τ)
    cols = tl.arange(0, BLOCK_M)
    grp = cols // T_PAD
    bit = cols % T_PAD
    col_ok = (grp < NUM_HASHES) & (bit < HASH_BITS)
    src_col = grp * HASH_BITS + bit
    acc = tl.zeros((BLOCK_R, BLOCK_M), dtype=tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        if EVEN_D:
            x = tl.load(x_ptr + rows[:, None] * stride_xr + ds[None, :] * stride_xd,
                        mask=row_ok[:, None], other=0.0).to(tl.float32)
            p = tl.load(proj_ptr + ds[:, None] * stride_pd + src_col[None, :] * stride_pm,
                        mask=col_ok[None, :], other=0.0).to(tl.float32)
        else:
            d_ok = ds < dim
            x = tl.load(x_ptr + rows[:, None] * stride_xr + ds[None, :] * stride_xd,
                        mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            p = tl.load(proj_ptr + ds[:, None] * stride_pd + src_col[None, :] * stride_pm,
                        mask=d_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.dot(x, p, input_precision="ieee")
    # (BLOCK_R, G_PAD, T_PAD) bits → int32 codes; τ ≤ 30 so the shifts fit in int32
    bits = tl.reshape(tl.where(acc > 0, 1, 0), (BLOCK_R, G_PAD, T_PAD))
    shifts = tl.arange(0, T_PAD)
    code = tl.sum(bits << shifts[None, None, :], axis=2)  # (BLOCK_R, G_PAD) int32
    gs = tl.arange(0, G_PAD)
    tl.store(codes_ptr + rows[:, None] * stride_cr + gs[None, :] * stride_cg, code.to(tl.int64),
             mask=row_ok[:, None] & (gs < NUM_HASHES)[None, :])


def sdim_hash_config(rows: int, dim: int, num_hashes: int, hash_bits: int) -> dict[str, int]:
    """Launch tunables for ``rows`` rows (defaults, then ``CTRSTREAM_SDIM_HASH_CONFIG`` overrides).

    ``BLOCK_R`` rows per program (the accumulator is ``BLOCK_R × G_PAD·T_PAD`` fp32); ``BLOCK_D``
    the d chunk per ``tl.dot`` (≥ 16): fp32 ``ieee`` dots run on FMA units and each thread holds its
    whole K slice of both operands, so K = 16 keeps them in registers (K = 64 at ``BLOCK_R = 128``
    spills on sm_90); ``num_warps``, ``num_stages`` (d is only ``dim/BLOCK_D`` iterations long).
    The chunk size does not change the result: ``acc += dot`` is one sequential FMA chain over d.
    """
    t_pad = pow2_at_least(hash_bits)
    g_pad = pow2_at_least(num_hashes, max(16 // t_pad, 1))  # tl.dot needs N ≥ 16
    block_m = g_pad * t_pad
    if interpreting():
        block_r = 16 if rows <= 16 else 32
    elif block_m <= 64:
        block_r = 128
    elif block_m <= 128:
        block_r = 64
    else:
        block_r = 32
    cfg = {
        "BLOCK_R": block_r,
        "BLOCK_D": 16,
        "num_warps": 8 if block_r * block_m >= 8192 else 4,
        "num_stages": 3,
        "G_PAD": g_pad,
        "T_PAD": t_pad,
    }
    cfg = config_overrides(ENV_CONFIG, cfg)
    check(cfg["G_PAD"] >= num_hashes and cfg["T_PAD"] >= hash_bits and cfg["G_PAD"] * cfg["T_PAD"] >= 16,
          f"{ENV_CONFIG}: G_PAD/T_PAD too small for G={num_hashes}, τ={hash_bits}")
    return cfg


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
    c = sdim_hash_config(rows, dim, num_hashes, hash_bits)
    block_r, block_d = c["BLOCK_R"], c["BLOCK_D"]
    grid = (triton.cdiv(rows, block_r),)
    cfg = LaunchConfig(block_size=block_d, num_warps=c["num_warps"], grid=grid,
                       extra=tuple((k, v) for k, v in c.items() if k not in ("BLOCK_D", "num_warps")))
    if rows > 0 and num_hashes > 0:
        _sdim_hash_fwd_kernel[grid](
            x, x.stride(0), x.stride(1),
            proj, proj.stride(0), proj.stride(1),
            codes, codes.stride(0), codes.stride(1),
            rows, dim,
            NUM_HASHES=num_hashes, HASH_BITS=hash_bits, G_PAD=c["G_PAD"], T_PAD=c["T_PAD"],
            BLOCK_R=block_r, BLOCK_D=block_d, EVEN_D=dim % block_d == 0,
            num_warps=c["num_warps"], num_stages=c["num_stages"],
        )
    return codes.view(n, length, num_hashes), cfg


def sdim_hash_triton(seq_emb: torch.Tensor, projection: torch.Tensor, *, num_hashes: int, hash_bits: int,
                     upcast: bool = False) -> torch.Tensor:
    """Triton twin of :func:`triton_kernels.reference.sdim_hash` (``upcast`` has no effect)."""
    del upcast
    codes, _ = sdim_hash_launch(seq_emb.detach(), projection.detach(), num_hashes, hash_bits)
    return codes
