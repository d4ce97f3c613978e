"""Triton SDIM bucket table: masked segment sums per (user, group, code), with a gather backward.

The reference is :mod:`triton_kernels.reference.sdim_bucket_sums`.

Forward: grid ``(U, G, chunks)``. Each program walks its chunk of L in ``BLOCK_L`` tiles, builds the
``(BLOCK_L, BLOCK_C)`` one-hot of the codes (padding rows all-zero, padding embeddings never
loaded) and accumulates ``onehotᵀ @ emb`` into a ``(BLOCK_C, BLOCK_D)`` fp32 tile plus the counts.
With one chunk per (user, group) the result is stored (deterministic); when L is long and there
are few (user, group) pairs (serving: U = 1) the launcher splits L into chunks whose partial
tables are combined with ``atomic_add`` (order-dependent rounding; compared with tolerance).

Backward (no atomics, deterministic): grid ``(U, L-tiles)``;
``d seq_emb[u, l] = mask[u, l] · Σ_g d sums[u, g, codes[u, l, g]]``, a gather.

Codes of real behaviors outside ``[0, 2**hash_bits)`` are ignored here (the reference raises).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from triton_kernels._triton.launch import (
    LaunchConfig,
    assert_contiguous,
    assert_shape,
    interpreting,
    pow2_at_least,
)
from triton_kernels.reference._common import check

__all__ = ["sdim_bucket_sums_triton"]


@triton.jit
def _sdim_bucket_sums_fwd_kernel(
    x_ptr, stride_xu, stride_xl, stride_xd,
    codes_ptr, stride_cu, stride_cl, stride_cg,
    mask_ptr, stride_mu, stride_ml,
    sums_ptr, stride_su, stride_sg, stride_sc, stride_sd,
    counts_ptr, stride_nu, stride_ng, stride_nc,
    length, dim, chunk_len,
    NUM_CODES: tl.constexpr, USE_ATOMICS: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One (user, group, L-chunk) partial bucket table.

    Pointers:
        x_ptr:      (U, L, dim) float, behavior embeddings (any float dtype; accumulated in fp32).
        codes_ptr:  (U, L, G) int64 codes; only read where the mask is True.
        mask_ptr:   (U, L) uint8 (a view of the bool mask), 1 = real behavior.
        sums_ptr:   (U, G, NUM_CODES, dim) fp32 output; zero-filled beforehand when USE_ATOMICS.
        counts_ptr: (U, G, NUM_CODES) int32 output; zero-filled beforehand when USE_ATOMICS.
    """
    u = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1).to(tl.int64)
    chunk = tl.program_id(2).to(tl.int64)
    cs = tl.arange(0, BLOCK_C)
    ds = tl.arange(0, BLOCK_D)
    d_ok = ds < dim
    acc = tl.zeros((BLOCK_C, BLOCK_D), dtype=tl.float32)
    cnt = tl.zeros((BLOCK_C,), dtype=tl.int32)
    start = chunk * chunk_len
    end = tl.minimum(start + chunk_len, length)
    for l0 in range(start, end, BLOCK_L):
        ls = l0 + tl.arange(0, BLOCK_L)
        l_ok = ls < end
        real = tl.load(mask_ptr + u * stride_mu + ls * stride_ml, mask=l_ok, other=0) != 0
        code = tl.load(codes_ptr + u * stride_cu + ls * stride_cl + g * stride_cg, mask=real, other=-1)
        hit = (code[:, None] == cs[None, :]) & real[:, None]  # (BLOCK_L, BLOCK_C)
        x = tl.load(x_ptr + u * stride_xu + ls[:, None] * stride_xl + ds[None, :] * stride_xd,
                    mask=real[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        onehot = tl.where(hit, 1.0, 0.0)
        acc += tl.dot(tl.trans(onehot), x, input_precision="ieee")
        cnt += tl.sum(hit.to(tl.int32), axis=0)
    c_ok = cs < NUM_CODES
    s_off = u * stride_su + g * stride_sg + cs[:, None] * stride_sc + ds[None, :] * stride_sd
    n_off = u * stride_nu + g * stride_ng + cs * stride_nc
    if USE_ATOMICS:
        tl.atomic_add(sums_ptr + s_off, acc, mask=c_ok[:, None] & d_ok[None, :])
        tl.atomic_add(counts_ptr + n_off, cnt, mask=c_ok)
    else:
        tl.store(sums_ptr + s_off, acc, mask=c_ok[:, None] & d_ok[None, :])
        tl.store(counts_ptr + n_off, cnt, mask=c_ok)


@triton.jit
def _sdim_bucket_sums_bwd_kernel(
    dsums_ptr, stride_su, stride_sg, stride_sc, stride_sd,
    codes_ptr, stride_cu, stride_cl, stride_cg,
    mask_ptr, stride_mu, stride_ml,
    dx_ptr, stride_xu, stride_xl, stride_xd,
    length, dim,
    NUM_GROUPS: tl.constexpr, NUM_CODES: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Gather backward for one (user, L-tile).

    Pointers:
        dsums_ptr: (U, G, NUM_CODES, dim) float, upstream gradient of ``sums``.
        codes_ptr: (U, L, G) int64 codes.
        mask_ptr:  (U, L) uint8, 1 = real behavior.
        dx_ptr:    (U, L, dim) float output gradient of ``seq_emb`` (0 on padding).
    """
    u = tl.program_id(0).to(tl.int64)
    ls = tl.program_id(1).to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L)
    l_ok = ls < length
    ds = tl.arange(0, BLOCK_D)
    d_ok = ds < dim
    real = tl.load(mask_ptr + u * stride_mu + ls * stride_ml, mask=l_ok, other=0) != 0
    acc = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    for g in tl.static_range(NUM_GROUPS):
        code = tl.load(codes_ptr + u * stride_cu + ls * stride_cl + g * stride_cg, mask=real, other=0)
        ok = real & (code >= 0) & (code < NUM_CODES)
        acc += tl.load(dsums_ptr + u * stride_su + g * stride_sg + code[:, None] * stride_sc
                       + ds[None, :] * stride_sd, mask=ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    tl.store(dx_ptr + u * stride_xu + ls[:, None] * stride_xl + ds[None, :] * stride_xd,
             acc.to(dx_ptr.dtype.element_ty), mask=l_ok[:, None] & d_ok[None, :])


_TARGET_PROGRAMS = 512  # enough programs to fill an H100's 132 SMs a few times over


def _plan(num_users: int, num_groups: int, length: int, block_l: int) -> tuple[int, int]:
    """(chunk_len, num_chunks): split L only when (user, group) pairs alone underfill the GPU."""
    tiles = max(triton.cdiv(length, block_l), 1)
    pairs = max(num_users * num_groups, 1)
    want = 1 if pairs >= _TARGET_PROGRAMS else min(tiles, triton.cdiv(_TARGET_PROGRAMS, pairs))
    if interpreting():  # keep the interpreter cheap, but still exercise the atomic path
        want = min(tiles, 2)
    tiles_per_chunk = triton.cdiv(tiles, want)
    chunk_len = tiles_per_chunk * block_l
    return chunk_len, max(triton.cdiv(length, chunk_len), 1)


def sdim_bucket_sums_fwd(seq_emb: torch.Tensor, codes: torch.Tensor, mask: torch.Tensor, hash_bits: int
                         ) -> tuple[torch.Tensor, torch.Tensor, LaunchConfig]:
    """Launcher: fp32 sums, int32 counts and the launch decisions."""
    check(seq_emb.dim() == 3, f"seq_emb must be (U, L, d), got {tuple(seq_emb.shape)}")
    u, length, dim = seq_emb.shape
    check(codes.dim() == 3, f"codes must be (U, L, G), got {tuple(codes.shape)}")
    g = codes.shape[2]
    assert_shape("codes", codes, (u, length, g))
    assert_shape("mask", mask, (u, length))
    check(codes.dtype == torch.int64, "codes must be int64")
    num_codes = 1 << hash_bits
    x, codes = seq_emb.contiguous(), codes.contiguous()
    mask_u8 = mask.to(torch.bool).contiguous().view(torch.uint8)
    assert_contiguous(seq_emb=x, codes=codes, mask=mask_u8)
    block_d = pow2_at_least(dim, 16)
    block_c = pow2_at_least(num_codes, 16)
    block_l = 16 if interpreting() else 64
    chunk_len, chunks = _plan(u, g, length, block_l)
    use_atomics = chunks > 1
    alloc = torch.zeros if use_atomics else torch.empty
    sums = alloc((u, g, num_codes, dim), dtype=torch.float32, device=x.device)
    counts = alloc((u, g, num_codes), dtype=torch.int32, device=x.device)
    grid = (u, g, chunks)
    cfg = LaunchConfig(block_size=block_d, num_warps=4, grid=grid,
                       extra=(("BLOCK_L", block_l), ("BLOCK_C", block_c), ("CHUNKS", chunks)))
    if u * g > 0 and length > 0:
        _sdim_bucket_sums_fwd_kernel[grid](
            x, *x.stride(), codes, *codes.stride(), mask_u8, *mask_u8.stride(),
            sums, *sums.stride(), counts, *counts.stride(),
            length, dim, chunk_len,
            NUM_CODES=num_codes, USE_ATOMICS=use_atomics,
            BLOCK_L=block_l, BLOCK_D=block_d, BLOCK_C=block_c, num_warps=cfg.num_warps,
        )
    elif not use_atomics:
        sums.zero_()
        counts.zero_()
    return sums, counts, cfg


def sdim_bucket_sums_bwd(dsums: torch.Tensor, codes: torch.Tensor, mask_u8: torch.Tensor, dim: int,
                         out_dtype: torch.dtype, cfg: LaunchConfig) -> torch.Tensor:
    u, length, g = codes.shape
    dsums = dsums.contiguous()
    dx = torch.empty((u, length, dim), dtype=out_dtype, device=dsums.device)
    block_l = cfg.get("BLOCK_L")
    grid = (u, triton.cdiv(length, block_l))
    if u > 0 and length > 0:
        _sdim_bucket_sums_bwd_kernel[grid](
            dsums, *dsums.stride(), codes, *codes.stride(), mask_u8, *mask_u8.stride(),
            dx, *dx.stride(), length, dim,
            NUM_GROUPS=g, NUM_CODES=dsums.shape[2], BLOCK_L=block_l, BLOCK_D=cfg.block_size,
            num_warps=cfg.num_warps,
        )
    return dx


class _SdimBucketSums(torch.autograd.Function):
    @staticmethod
    def forward(ctx, seq_emb, codes, mask, hash_bits, upcast):
        sums, counts, cfg = sdim_bucket_sums_fwd(seq_emb, codes, mask, hash_bits)
        ctx.save_for_backward(codes.contiguous(), mask.to(torch.bool).contiguous().view(torch.uint8))
        ctx.cfg, ctx.dim, ctx.in_dtype = cfg, seq_emb.shape[2], seq_emb.dtype
        out_dtype = torch.float32 if upcast else seq_emb.dtype
        ctx.mark_non_differentiable(counts)
        return sums.to(out_dtype), counts

    @staticmethod
    def backward(ctx, dsums, dcounts):
        codes, mask_u8 = ctx.saved_tensors
        dx = sdim_bucket_sums_bwd(dsums, codes, mask_u8, ctx.dim, ctx.in_dtype, ctx.cfg)
        return dx, None, None, None, None


def sdim_bucket_sums_triton(seq_emb: torch.Tensor, codes: torch.Tensor, mask: torch.Tensor, *,
                            hash_bits: int, upcast: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of :func:`triton_kernels.reference.sdim_bucket_sums`."""
    sums_counts: tuple[torch.Tensor, torch.Tensor] = _SdimBucketSums.apply(
        seq_emb, codes, mask, hash_bits, upcast)
    return sums_counts
