"""Triton SDIM candidate gather: bucket lookup, ℓ2 normalisation and group mean in one pass.

The reference is :mod:`triton_kernels.reference.sdim_gather` (ℓ2 normalisation, empty bucket → 0).

Forward: one program per candidate row b loads its G bucket rows ``sums[u, g, c_g, :]`` as one
``(BLOCK_G, BLOCK_D)`` tile (offsets computed from the loaded integer codes, R5), normalises and
averages them. Backward: the same program recomputes the tile and scatters
``(1/G)·(dy − ŷ(ŷ·dy))/‖v‖`` into ``d sums`` with ``atomic_add`` (candidates of one user share
buckets), so ``d sums`` is compared with tolerance, never bit-exactly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from triton_kernels._triton.launch import LaunchConfig, assert_contiguous, assert_shape, pow2_at_least
from triton_kernels.reference._common import check
from triton_kernels.reference.sdim_gather import SDIM_NORM_EPS

__all__ = ["sdim_gather_triton"]


@triton.jit
def _load_buckets(sums_ptr, stride_su, stride_sg, stride_sc, stride_sd,
                  codes_ptr, stride_cb, stride_cg, user_ptr, b, num_groups, num_codes, dim,
                  BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr):
    gs = tl.arange(0, BLOCK_G)
    ds = tl.arange(0, BLOCK_D)
    g_ok = gs < num_groups
    u = tl.load(user_ptr + b).to(tl.int64)
    code = tl.load(codes_ptr + b * stride_cb + gs * stride_cg, mask=g_ok, other=0)
    ok = g_ok & (code >= 0) & (code < num_codes)
    off = (u * stride_su + gs.to(tl.int64)[:, None] * stride_sg + code[:, None] * stride_sc
           + ds[None, :] * stride_sd)
    tile_ok = ok[:, None] & (ds < dim)[None, :]
    return off, tile_ok


@triton.jit
def _sdim_gather_fwd_kernel(
    sums_ptr, stride_su, stride_sg, stride_sc, stride_sd,
    codes_ptr, stride_cb, stride_cg,
    user_ptr,
    out_ptr, stride_ob, stride_od,
    num_groups, num_codes, dim, eps_sq,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One candidate row.

    Pointers:
        sums_ptr:  (U, G, num_codes, dim) float bucket sums.
        codes_ptr: (B, G) int64 candidate codes.
        user_ptr:  (B,) int64 user row of each candidate.
        out_ptr:   (B, dim) float output.
    """
    b = tl.program_id(0).to(tl.int64)
    off, tile_ok = _load_buckets(sums_ptr, stride_su, stride_sg, stride_sc, stride_sd, codes_ptr,
                                 stride_cb, stride_cg, user_ptr, b, num_groups, num_codes, dim,
                                 BLOCK_G, BLOCK_D)
    v = tl.load(sums_ptr + off, mask=tile_ok, other=0.0).to(tl.float32)  # (BLOCK_G, BLOCK_D)
    sq = tl.sum(v * v, axis=1)
    inv = tl.where(sq > eps_sq, 1.0 / tl.sqrt(tl.where(sq > eps_sq, sq, 1.0)), 0.0)
    out = tl.sum(v * inv[:, None], axis=0) / num_groups
    ds = tl.arange(0, BLOCK_D)
    tl.store(out_ptr + b * stride_ob + ds * stride_od, out.to(out_ptr.dtype.element_ty), mask=ds < dim)


@triton.jit
def _sdim_gather_bwd_kernel(
    sums_ptr, stride_su, stride_sg, stride_sc, stride_sd,
    codes_ptr, stride_cb, stride_cg,
    user_ptr,
    dout_ptr, stride_ob, stride_od,
    dsums_ptr,
    num_groups, num_codes, dim, eps_sq,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Scatter one candidate's gradient into its G buckets.

    Pointers:
        sums_ptr:  (U, G, num_codes, dim) float bucket sums (forward input).
        codes_ptr: (B, G) int64; user_ptr: (B,) int64.
        dout_ptr:  (B, dim) float upstream gradient.
        dsums_ptr: (U, G, num_codes, dim) fp32, zero-filled, same strides as sums; atomic_add target.
    """
    b = tl.program_id(0).to(tl.int64)
    off, tile_ok = _load_buckets(sums_ptr, stride_su, stride_sg, stride_sc, stride_sd, codes_ptr,
                                 stride_cb, stride_cg, user_ptr, b, num_groups, num_codes, dim,
                                 BLOCK_G, BLOCK_D)
    v = tl.load(sums_ptr + off, mask=tile_ok, other=0.0).to(tl.float32)
    sq = tl.sum(v * v, axis=1)
    inv = tl.where(sq > eps_sq, 1.0 / tl.sqrt(tl.where(sq > eps_sq, sq, 1.0)), 0.0)
    y = v * inv[:, None]
    ds = tl.arange(0, BLOCK_D)
    dy = tl.load(dout_ptr + b * stride_ob + ds * stride_od, mask=ds < dim, other=0.0).to(tl.float32)
    dy = dy / num_groups  # (BLOCK_D,)
    proj = tl.sum(y * dy[None, :], axis=1)  # (BLOCK_G,) ŷ·dy
    dv = (dy[None, :] - y * proj[:, None]) * inv[:, None]
    tl.atomic_add(dsums_ptr + off, dv, mask=tile_ok & (inv[:, None] > 0))


def _prepare(sums: torch.Tensor, counts: torch.Tensor, cand_codes: torch.Tensor, user_index: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, LaunchConfig]:
    check(sums.dim() == 4, f"sums must be (U, G, C, d), got {tuple(sums.shape)}")
    u, g, c, dim = sums.shape
    assert_shape("counts", counts, (u, g, c))
    check(cand_codes.dim() == 2 and cand_codes.shape[1] == g, f"cand_codes must be (B, {g})")
    b = cand_codes.shape[0]
    assert_shape("user_index", user_index, (b,))
    sums, codes, users = sums.contiguous(), cand_codes.contiguous(), user_index.contiguous()
    assert_contiguous(sums=sums, cand_codes=codes, user_index=users)
    cfg = LaunchConfig(block_size=pow2_at_least(dim, 16), num_warps=4, grid=(b,),
                       extra=(("BLOCK_G", pow2_at_least(g, 2)),))
    return sums, codes, users, cfg


class _SdimGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, sums, counts, cand_codes, user_index, upcast):
        sums_c, codes, users, cfg = _prepare(sums, counts, cand_codes, user_index)
        u, g, c, dim = sums_c.shape
        b = codes.shape[0]
        out = torch.empty((b, dim), dtype=torch.float32 if upcast else sums.dtype, device=sums.device)
        if b > 0:
            _sdim_gather_fwd_kernel[cfg.grid](
                sums_c, *sums_c.stride(), codes, *codes.stride(), users, out, *out.stride(),
                g, c, dim, SDIM_NORM_EPS * SDIM_NORM_EPS,
                BLOCK_G=cfg.get("BLOCK_G"), BLOCK_D=cfg.block_size, num_warps=cfg.num_warps,
            )
        ctx.save_for_backward(sums_c, codes, users)
        ctx.cfg = cfg
        return out

    @staticmethod
    def backward(ctx, dout):
        sums_c, codes, users = ctx.saved_tensors
        cfg = ctx.cfg
        u, g, c, dim = sums_c.shape
        dout = dout.contiguous()
        dsums = torch.zeros(sums_c.shape, dtype=torch.float32, device=sums_c.device)
        if codes.shape[0] > 0:
            _sdim_gather_bwd_kernel[cfg.grid](
                sums_c, *sums_c.stride(), codes, *codes.stride(), users, dout, *dout.stride(), dsums,
                g, c, dim, SDIM_NORM_EPS * SDIM_NORM_EPS,
                BLOCK_G=cfg.get("BLOCK_G"), BLOCK_D=cfg.block_size, num_warps=cfg.num_warps,
            )
        return dsums.to(sums_c.dtype), None, None, None, None


def sdim_gather_triton(sums: torch.Tensor, counts: torch.Tensor, cand_codes: torch.Tensor,
                       user_index: torch.Tensor, *, upcast: bool = False) -> torch.Tensor:
    """Triton twin of :func:`triton_kernels.reference.sdim_gather`."""
    out: torch.Tensor = _SdimGather.apply(sums, counts, cand_codes, user_index, upcast)
    return out
