"""Triton SDIM candidate gather: bucket lookup, ℓ2 normalisation and group mean in one pass.

The reference is :mod:`triton_kernels.reference.sdim_gather` (ℓ2 normalisation, empty bucket → 0).

Forward: one program per candidate row b loads its G bucket rows ``sums[u, g, c_g, :]`` as one
``(BLOCK_G, BLOCK_D)`` tile (offsets computed from the loaded integer codes, R5), normalises and
averages them.

Backward, general layout (U > 1, e.g. training with U = B): the same per-candidate program
recomputes the tile and scatters ``(1/G)·(dy − ŷ(ŷ·dy))/‖v‖`` into a zeroed fp32 ``d sums`` with
``atomic_add`` (candidates rarely share a user's bucket there).

Backward, serving layout (U = 1, at most ``SHARED_MAX_CODES`` codes): every candidate hits the same
tiny ``(G, 2**τ, d)`` table, so per-candidate atomics would serialise (B·G·d adds onto G·2**τ·d
addresses: 16.7M adds onto 8k floats at B = 16,384). Instead grid ``(G, B-chunks)``: a program
segment-sums one group's gradients over its candidates with ``onehot(code)ᵀ @ dv`` on the tensor
cores (dv split exactly into three bf16 terms) and writes its ``(2**τ, d)`` tile once: a plain
store into ``torch.empty`` when there is one chunk (one launch, no zero-fill), else one
``atomic_add`` per chunk into a zeroed table. Either way ``d sums`` is compared with tolerance.

Tunables (see :func:`sdim_gather_config`): ``num_warps`` and the ``BWD_*`` keys. On a GPU they can
be overridden without editing code through ``CTRSTREAM_SDIM_GATHER_CONFIG``, e.g.
``"BWD_BLOCK_B=128,BWD_num_warps=8,BWD_PROGRAMS_PER_SM=4"`` (comma-separated ``KEY=int``; unknown
keys raise; ignored under ``TRITON_INTERPRET=1``).
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
    num_sms,
    pow2_at_least,
)
from triton_kernels.reference._common import check
from triton_kernels.reference.sdim_gather import SDIM_NORM_EPS

__all__ = ["sdim_gather_config", "sdim_gather_triton"]

ENV_CONFIG = "CTRSTREAM_SDIM_GATHER_CONFIG"


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


@triton.jit
def _sdim_gather_bwd_shared_user_kernel(
    sums_ptr, stride_sg, stride_sc, stride_sd,
    codes_ptr, stride_cb, stride_cg,
    dout_ptr, stride_ob, stride_od,
    dsums_ptr, stride_dg, stride_dc, stride_dd,
    num_cands, num_groups, dim, eps_sq, chunk_len,
    NUM_CODES: tl.constexpr, USE_ATOMICS: tl.constexpr, F32_DOT: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Serving backward (one user): segment-sum one group's gradients over a chunk of candidates.

    Program ``(g, chunk)`` walks its candidates in ``BLOCK_B`` tiles, recomputes
    ``dv = (1/G)·(dy − ŷ(ŷ·dy))/‖v‖`` for group g and accumulates ``onehot(code)ᵀ @ dv`` into a
    ``(BLOCK_C, BLOCK_D)`` fp32 tile (tensor cores: dv split exactly into three bf16 terms, the
    one-hot is exact), then writes it once (``USE_ATOMICS``: ``atomic_add`` into a zeroed table,
    one add per chunk instead of one per candidate).

    Pointers:
        sums_ptr:  (G, NUM_CODES, dim) float, the single user's bucket sums (forward input).
        codes_ptr: (B, G) int64 candidate codes.
        dout_ptr:  (B, dim) float upstream gradient.
        dsums_ptr: (G, NUM_CODES, dim) output (fp32 and zero-filled when USE_ATOMICS).
    """
    g = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1).to(tl.int64)
    ds = tl.arange(0, BLOCK_D)
    d_ok = ds < dim
    cs = tl.arange(0, BLOCK_C)
    acc = tl.zeros((BLOCK_C, BLOCK_D), dtype=tl.float32)
    start = chunk * chunk_len
    end = tl.minimum(start + chunk_len, num_cands)
    for b0 in range(start, end, BLOCK_B):
        bs = b0 + tl.arange(0, BLOCK_B)
        b_ok = bs < end
        code = tl.load(codes_ptr + bs * stride_cb + g * stride_cg, mask=b_ok, other=-1)
        ok = b_ok & (code >= 0) & (code < NUM_CODES)
        code = tl.where(ok, code, 0)
        tile_ok = ok[:, None] & d_ok[None, :]
        v = tl.load(sums_ptr + g * stride_sg + code[:, None] * stride_sc + ds[None, :] * stride_sd,
                    mask=tile_ok, other=0.0).to(tl.float32)  # (BLOCK_B, BLOCK_D)
        sq = tl.sum(v * v, axis=1)
        inv = tl.where(sq > eps_sq, 1.0 / tl.sqrt(tl.where(sq > eps_sq, sq, 1.0)), 0.0)
        y = v * inv[:, None]
        dy = tl.load(dout_ptr + bs[:, None] * stride_ob + ds[None, :] * stride_od,
                     mask=b_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32) / num_groups
        proj = tl.sum(y * dy, axis=1)
        dv = tl.where(tile_ok & (inv[:, None] > 0), (dy - y * proj[:, None]) * inv[:, None], 0.0)
        hit = (cs[:, None] == code[None, :]) & ok[None, :]  # (BLOCK_C, BLOCK_B)
        if F32_DOT:  # interpreter: its bf16 dot is unreliable
            acc = tl.dot(hit.to(tl.float32), dv, acc, input_precision="ieee")
        else:  # exact: dv = d1 + d2 + d3 in bf16, one-hot exact in bf16
            onehot = hit.to(tl.bfloat16)
            d1 = dv.to(tl.bfloat16)
            r1 = dv - d1.to(tl.float32)
            d2 = r1.to(tl.bfloat16)
            d3 = (r1 - d2.to(tl.float32)).to(tl.bfloat16)
            acc = tl.dot(onehot, d1, acc)
            acc = tl.dot(onehot, d2, acc)
            acc = tl.dot(onehot, d3, acc)
    out_ok = (cs < NUM_CODES)[:, None] & d_ok[None, :]
    off = g * stride_dg + cs[:, None] * stride_dc + ds[None, :] * stride_dd
    if USE_ATOMICS:
        tl.atomic_add(dsums_ptr + off, acc, mask=out_ok)
    else:
        tl.store(dsums_ptr + off, acc.to(dsums_ptr.dtype.element_ty), mask=out_ok)


def sdim_gather_config(device: torch.device, num_users: int, num_cands: int, num_groups: int,
                       num_codes: int, dim: int) -> dict[str, int]:
    """Launch tunables (defaults, then ``CTRSTREAM_SDIM_GATHER_CONFIG`` overrides).

    ``num_warps`` of the per-candidate forward / atomic backward; for the one-user backward
    (``SHARED_BWD``: U = 1 and at most ``SHARED_MAX_CODES`` codes): ``BWD_BLOCK_B`` candidates per
    tile, ``BWD_num_warps``, ``BWD_num_stages``, ``BWD_PROGRAMS_PER_SM`` and ``BWD_MIN_B_PER_CHUNK`` (the candidates
    are split into chunks, combined with ``atomic_add``, only while (group, chunk) programs are
    fewer than ``BWD_PROGRAMS_PER_SM`` per SM and each chunk keeps that many candidates).
    """
    interp = interpreting()
    cfg = {
        "num_warps": 4,
        "BWD_BLOCK_B": 16 if interp else 64,
        "BWD_num_warps": 4 if dim <= 64 else 8,
        "BWD_num_stages": 2,
        "BWD_PROGRAMS_PER_SM": 2,
        "BWD_MIN_B_PER_CHUNK": 16 if interp else 256,
        "SHARED_MAX_CODES": 64,
    }
    cfg = config_overrides(ENV_CONFIG, cfg)
    check(cfg["BWD_BLOCK_B"] >= 16, f"{ENV_CONFIG}: BWD_BLOCK_B must be ≥ 16")
    cfg.update(BLOCK_D=pow2_at_least(dim, 16), BLOCK_G=pow2_at_least(num_groups, 2),
               BLOCK_C=pow2_at_least(num_codes, 16))
    shared = num_users == 1 and num_codes <= cfg["SHARED_MAX_CODES"]
    cfg["SHARED_BWD"] = int(shared)
    if shared:
        want = triton.cdiv(num_sms(device) * max(cfg["BWD_PROGRAMS_PER_SM"], 1), max(num_groups, 1))
        want = max(min(want, triton.cdiv(num_cands, max(cfg["BWD_MIN_B_PER_CHUNK"], 1))), 1)
        tiles = max(triton.cdiv(num_cands, cfg["BWD_BLOCK_B"]), 1)
        cfg["BWD_CHUNK_B"] = triton.cdiv(tiles, want) * cfg["BWD_BLOCK_B"]
        cfg["BWD_CHUNKS"] = max(triton.cdiv(num_cands, cfg["BWD_CHUNK_B"]), 1)
    return cfg


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
    k = sdim_gather_config(sums.device, u, b, g, c, dim)
    cfg = LaunchConfig(block_size=k["BLOCK_D"], num_warps=k["num_warps"], grid=(b,),
                       extra=tuple((n, v) for n, v in k.items() if n not in ("BLOCK_D", "num_warps")))
    return sums, codes, users, cfg


def _backward_shared_user(sums_c: torch.Tensor, codes: torch.Tensor, dout: torch.Tensor, cfg: LaunchConfig
                          ) -> torch.Tensor:
    """d sums for U = 1: (group, chunk) programs segment-sum the candidates' gradients."""
    _, g, c, dim = sums_c.shape
    b = codes.shape[0]
    chunks = cfg.get("BWD_CHUNKS")
    use_atomics = chunks > 1
    if use_atomics:
        dsums = torch.zeros(sums_c.shape, dtype=torch.float32, device=sums_c.device)
    else:
        dsums = torch.empty(sums_c.shape, dtype=sums_c.dtype, device=sums_c.device)
    if b == 0 or g == 0 or dim == 0:
        return dsums.zero_()
    _sdim_gather_bwd_shared_user_kernel[(g, chunks)](
        sums_c, *sums_c.stride()[1:], codes, *codes.stride(), dout, *dout.stride(),
        dsums, *dsums.stride()[1:],
        b, g, dim, SDIM_NORM_EPS * SDIM_NORM_EPS, cfg.get("BWD_CHUNK_B"),
        NUM_CODES=c, USE_ATOMICS=use_atomics, F32_DOT=interpreting(),
        BLOCK_B=cfg.get("BWD_BLOCK_B"), BLOCK_C=cfg.get("BLOCK_C"), BLOCK_D=cfg.block_size,
        num_warps=cfg.get("BWD_num_warps"), num_stages=cfg.get("BWD_num_stages"),
    )
    return dsums


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
        if cfg.get("SHARED_BWD"):
            dsums = _backward_shared_user(sums_c, codes, dout, cfg)
        else:
            dsums = torch.zeros(sums_c.shape, dtype=torch.float32, device=sums_c.device)
            if codes.shape[0] > 0:
                _sdim_gather_bwd_kernel[cfg.grid](
                    sums_c, *sums_c.stride(), codes, *codes.stride(), users, dout, *dout.stride(), dsums,
                    g, c, dim, SDIM_NORM_EPS * SDIM_NORM_EPS,
                    BLOCK_G=cfg.get("BLOCK_G"), BLOCK_D=cfg.block_size, num_warps=cfg.num_warps,
                )
        if dsums.dtype != sums_c.dtype:
            dsums = dsums.to(sums_c.dtype)
        return dsums, None, None, None, None


def sdim_gather_triton(sums: torch.Tensor, counts: torch.Tensor, cand_codes: torch.Tensor,
                       user_index: torch.Tensor, *, upcast: bool = False) -> torch.Tensor:
    """Triton twin of :func:`triton_kernels.reference.sdim_gather`."""
    out: torch.Tensor = _SdimGather.apply(sums, counts, cand_codes, user_index, upcast)
    return out
