"""Triton SDIM bucket table: masked segment sums per (user, group, code), with a gather backward.

The reference is :mod:`triton_kernels.reference.sdim_bucket_sums`.

Forward: grid ``(U, group-blocks × code-blocks, L-chunks)``. One program owns a block of
``BLOCK_G`` groups × ``BLOCK_C`` codes (``ROWS = BLOCK_G·BLOCK_C`` table rows, 128 for the paper's
G = 16, τ = 3, so one program covers every group and each embedding tile is read once, not G
times). It walks its chunk of L in ``BLOCK_L`` tiles: one coalesced ``(BLOCK_L, BLOCK_G)`` load of
the codes, a ``(BLOCK_L, BLOCK_G, BLOCK_C)`` compare reshaped into the ``(BLOCK_L, ROWS)`` one-hot
(padding rows all-zero, padding embeddings never loaded) and ``acc += onehotᵀ @ emb`` on the
tensor cores. fp32 embeddings are split exactly into three bf16 terms (``x = x₁ + x₂ + x₃``, each
the bf16 rounding of the remainder; 3 × 8 significand bits cover fp32's 24), and the one-hot is
exact in bf16, so the three bf16 products are exact and accumulate in fp32: fp32-accurate sums at
tensor-core speed (an ``ieee`` fp32 dot runs on the FMA units at ~8k FMAs per behavior, which is
slower than reading the behavior). bf16/fp16 embeddings use one dot in their own dtype.

Serving has U = 1, so the launcher splits L into about one chunk per SM (``PROGRAMS_PER_SM``)
with at least ``MIN_L_PER_CHUNK`` behaviors each. With one chunk the program stores the table
directly (in the output dtype); with several, each program stores its partial table into an fp32
workspace and a second small kernel sums the partials in chunk order. Deterministic, no atomics,
no zero-fills: at most two launches.

Backward (no atomics, deterministic): grid ``(U, L-tiles)``;
``d seq_emb[u, l] = mask[u, l] · Σ_g d sums[u, g, codes[u, l, g]]``, a gather from the (small,
cache-resident) ``d sums`` table; it reads the codes and writes ``d seq_emb`` once.

Codes of real behaviors outside ``[0, 2**hash_bits)`` are ignored here (the reference raises).

Tunables (see :func:`sdim_bucket_sums_config`): ``BLOCK_L``, ``ROWS``, ``num_warps``,
``num_stages``, ``PROGRAMS_PER_SM``, ``MIN_L_PER_CHUNK`` (forward), ``RED_BLOCK_N``,
``RED_BLOCK_K`` (partial-table reduction), ``BWD_BLOCK_L``, ``BWD_num_warps`` (backward). On a GPU
they can be overridden without editing code through ``CTRSTREAM_SDIM_BUCKETS_CONFIG``, e.g.
``"BLOCK_L=128,num_warps=8,PROGRAMS_PER_SM=2"`` (comma-separated ``KEY=int``; unknown keys raise;
ignored under ``TRITON_INTERPRET=1``).
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

__all__ = ["sdim_bucket_sums_config", "sdim_bucket_sums_triton"]

ENV_CONFIG = "CTRSTREAM_SDIM_BUCKETS_CONFIG"


@triton.jit
def _sdim_bucket_sums_fwd_kernel(
    x_ptr, stride_xu, stride_xl, stride_xd,
    codes_ptr, stride_cu, stride_cl, stride_cg,
    mask_ptr, stride_mu, stride_ml,
    sums_ptr, stride_su, stride_sk, stride_sg, stride_sc, stride_sd,
    counts_ptr, stride_nu, stride_nk, stride_ng, stride_nc,
    length, dim, num_groups, chunk_len,
    NUM_CODES: tl.constexpr, C_BLOCKS: tl.constexpr, SPLIT_BF16: tl.constexpr, F32_DOT: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One (user, group-block × code-block, L-chunk) partial bucket table.

    Pointers:
        x_ptr:      (U, L, dim) float, behavior embeddings (any float dtype; accumulated in fp32).
        codes_ptr:  (U, L, G) int64 codes; only read where the mask is True.
        mask_ptr:   (U, L) uint8 (a view of the bool mask), 1 = real behavior.
        sums_ptr:   (U, K, G, NUM_CODES, dim) float: the output table (K = 1, any float dtype) or the
                    fp32 per-chunk workspace (K = number of chunks); program (.., .., k) writes slice k.
        counts_ptr: (U, K, G, NUM_CODES) int32, same convention.
    """
    ROWS: tl.constexpr = BLOCK_G * BLOCK_C
    u = tl.program_id(0).to(tl.int64)
    g0 = (tl.program_id(1) // C_BLOCKS) * BLOCK_G
    c0 = (tl.program_id(1) % C_BLOCKS) * BLOCK_C
    chunk = tl.program_id(2).to(tl.int64)
    gs = g0 + tl.arange(0, BLOCK_G)
    g_ok = gs < num_groups
    cs = c0 + tl.arange(0, BLOCK_C)
    ds = tl.arange(0, BLOCK_D)
    d_ok = ds < dim
    acc = tl.zeros((ROWS, BLOCK_D), dtype=tl.float32)
    cnt_acc = tl.zeros((ROWS, 16), dtype=tl.float32)
    e0 = tl.where(tl.arange(0, 16)[None, :] == 0, 1.0, 0.0) + tl.zeros((BLOCK_L, 16), dtype=tl.float32)
    start = chunk * chunk_len
    end = tl.minimum(start + chunk_len, length)
    for l0 in range(start, end, BLOCK_L):
        ls = l0 + tl.arange(0, BLOCK_L)
        l_ok = ls < end
        real = tl.load(mask_ptr + u * stride_mu + ls * stride_ml, mask=l_ok, other=0) != 0
        code = tl.load(codes_ptr + u * stride_cu + ls[:, None] * stride_cl + gs[None, :] * stride_cg,
                       mask=real[:, None] & g_ok[None, :], other=-1)  # (BLOCK_L, BLOCK_G)
        code = tl.where((code >= 0) & (code < NUM_CODES), code, -1).to(tl.int32)  # -1 never hits
        hit3 = code[:, :, None] == cs[None, None, :]  # (BLOCK_L, BLOCK_G, BLOCK_C)
        hit = tl.reshape(hit3.to(tl.int32), (BLOCK_L, ROWS))  # column m = (g - g0)·BLOCK_C + (c - c0)
        x_ptrs = x_ptr + u * stride_xu + ls[:, None] * stride_xl + ds[None, :] * stride_xd
        if EVEN_D:
            x = tl.load(x_ptrs, mask=real[:, None], other=0.0)
        else:
            x = tl.load(x_ptrs, mask=real[:, None] & d_ok[None, :], other=0.0)
        # counts ride on the tensor cores too: onehot @ e₀ (a ones column), exact integers in fp32
        if F32_DOT:  # interpreter: its bf16 dot is unreliable; the same values in fp32 are exact
            onehot32 = tl.trans(hit).to(tl.float32)
            cnt_acc = tl.dot(onehot32, e0.to(tl.float32), cnt_acc, input_precision="ieee")
        else:
            onehot = tl.trans(hit).to(tl.bfloat16 if SPLIT_BF16 else x.dtype)  # (ROWS, BLOCK_L) 0/1
            cnt_acc = tl.dot(onehot, e0.to(onehot.dtype), cnt_acc)
        if SPLIT_BF16:  # exact 3-term bf16 split of fp32 x
            xf = x.to(tl.float32)
            x1 = xf.to(tl.bfloat16)
            r1 = xf - x1.to(tl.float32)
            x2 = r1.to(tl.bfloat16)
            x3 = (r1 - x2.to(tl.float32)).to(tl.bfloat16)
            if F32_DOT:
                acc = tl.dot(onehot32, x1.to(tl.float32), acc, input_precision="ieee")
                acc = tl.dot(onehot32, x2.to(tl.float32), acc, input_precision="ieee")
                acc = tl.dot(onehot32, x3.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(onehot, x1, acc)
                acc = tl.dot(onehot, x2, acc)
                acc = tl.dot(onehot, x3, acc)
        elif F32_DOT:
            acc = tl.dot(onehot32, x.to(tl.float32), acc, input_precision="ieee")
        else:  # bf16/fp16 input: one exact dot in its own dtype
            acc = tl.dot(onehot, x, acc)
    cnt = tl.sum(cnt_acc, axis=1).to(tl.int32)  # only column 0 is non-zero; ≤ chunk_len < 2**24
    ms = tl.arange(0, ROWS)
    gm = g0 + ms // BLOCK_C
    cm = c0 + ms % BLOCK_C
    m_ok = gm < num_groups
    base_s = u * stride_su + chunk * stride_sk
    s_off = base_s + gm[:, None] * stride_sg + cm[:, None] * stride_sc + ds[None, :] * stride_sd
    tl.store(sums_ptr + s_off, acc.to(sums_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    n_off = u * stride_nu + chunk * stride_nk + gm * stride_ng + cm * stride_nc
    tl.store(counts_ptr + n_off, cnt, mask=m_ok)


@triton.jit
def _sum_chunks(part_ptr, out_ptr, u, block, n, num_chunks, ACC: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr):
    """``out[u, ns] = Σ_k part[u, k, ns]`` over the chunks k in order, for one block of ``BLOCK_N``
    entries; accumulated in ``ACC`` (fp32 for sums, int32 for counts)."""
    ns = block.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = ns < n
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N,), dtype=ACC)
    for k0 in range(0, num_chunks, BLOCK_K):
        kk = k0 + ks
        part = tl.load(part_ptr + (u * num_chunks + kk[:, None]) * n + ns[None, :],
                       mask=(kk < num_chunks)[:, None] & n_ok[None, :], other=0)
        acc += tl.sum(part, axis=0)
    tl.store(out_ptr + u * n + ns, acc.to(out_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _sdim_bucket_sums_reduce_kernel(
    ws_ptr, wc_ptr, sums_ptr, counts_ptr,
    n_sums, n_counts, num_chunks,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Sum the per-chunk partial tables in chunk order (deterministic).

    Pointers:
        ws_ptr:     (U, K, n_sums) fp32 partial sums; wc_ptr: (U, K, n_counts) int32 partial counts.
        sums_ptr:   (U, n_sums) output (any float dtype); counts_ptr: (U, n_counts) int32 output.
    Programs ``[0, cdiv(n_sums, BLOCK_N))`` reduce sums, the rest reduce counts.
    """
    u = tl.program_id(0).to(tl.int64)
    pid = tl.program_id(1)
    blocks_s = tl.cdiv(n_sums, BLOCK_N)
    if pid < blocks_s:
        _sum_chunks(ws_ptr, sums_ptr, u, pid, n_sums, num_chunks, tl.float32, BLOCK_N, BLOCK_K)
    else:
        _sum_chunks(wc_ptr, counts_ptr, u, pid - blocks_s, n_counts, num_chunks, tl.int32, BLOCK_N, BLOCK_K)


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


def sdim_bucket_sums_config(device: torch.device, num_users: int, length: int, dim: int, num_groups: int,
                            num_codes: int) -> dict[str, int]:
    """Launch tunables (defaults, then ``CTRSTREAM_SDIM_BUCKETS_CONFIG`` overrides).

    ``BLOCK_L`` behaviors per tile; ``ROWS`` table rows (groups × codes) per program (≥ 16);
    ``num_warps``/``num_stages`` of the forward; L is split into chunks of at least
    ``MIN_L_PER_CHUNK`` behaviors until there are ``PROGRAMS_PER_SM`` programs per SM;
    ``RED_BLOCK_N``/``RED_BLOCK_K`` tile the partial-table reduction (table entries × chunks);
    ``BWD_BLOCK_L``/``BWD_num_warps`` the backward gather.
    """
    block_d = pow2_at_least(dim, 16)
    interp = interpreting()
    cfg = {
        "BLOCK_L": 16 if interp else 64,
        "ROWS": 128 if block_d <= 128 else 64,
        "num_warps": 8,  # sm_90, G=16, τ=3: 166 registers at d = 64 (255 with spills at 4 warps)
        "num_stages": 3,
        "PROGRAMS_PER_SM": 1,
        "MIN_L_PER_CHUNK": 16 if interp else 128,
        "RED_BLOCK_N": 64,
        "RED_BLOCK_K": 32,
        "BWD_BLOCK_L": 16 if interp else 32,  # H100 sweep: 32 beat 64 by 1.5x at L = 10k, equal at 100k
        "BWD_num_warps": 4 if block_d <= 64 else 8,
    }
    cfg = config_overrides(ENV_CONFIG, cfg)
    check(cfg["ROWS"] >= 16 and cfg["BLOCK_L"] >= 16, f"{ENV_CONFIG}: ROWS and BLOCK_L must be ≥ 16")
    block_c = min(pow2_at_least(num_codes), pow2_at_least(cfg["ROWS"]))
    block_g = max(min(pow2_at_least(num_groups), cfg["ROWS"] // block_c), triton.cdiv(16, block_c))
    cfg.update(BLOCK_D=block_d, BLOCK_C=block_c, BLOCK_G=block_g,
               C_BLOCKS=triton.cdiv(num_codes, block_c), G_BLOCKS=triton.cdiv(max(num_groups, 1), block_g))
    # chunks over L: only when (user, block) pairs alone leave SMs idle
    tiles = max(triton.cdiv(length, cfg["BLOCK_L"]), 1)
    pairs = max(num_users * cfg["G_BLOCKS"] * cfg["C_BLOCKS"], 1)
    want = triton.cdiv(num_sms(device) * max(cfg["PROGRAMS_PER_SM"], 1), pairs)
    want = max(min(want, triton.cdiv(length, max(cfg["MIN_L_PER_CHUNK"], 1))), 1)
    # counts accumulate in fp32 inside a chunk: keep a chunk below 2**24 behaviors so they stay exact
    tiles_per_chunk = min(triton.cdiv(tiles, want), max(2**24 // cfg["BLOCK_L"], 1))
    cfg["CHUNK_L"] = tiles_per_chunk * cfg["BLOCK_L"]
    cfg["CHUNKS"] = max(triton.cdiv(length, cfg["CHUNK_L"]), 1)
    return cfg


def sdim_bucket_sums_fwd(seq_emb: torch.Tensor, codes: torch.Tensor, mask: torch.Tensor, hash_bits: int,
                         out_dtype: torch.dtype | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, LaunchConfig, torch.Tensor, torch.Tensor]:
    """Launcher: sums (``out_dtype``, default fp32), int32 counts, the launch decisions and the
    contiguous codes / uint8 mask it used (kept for the backward)."""
    check(seq_emb.dim() == 3, f"seq_emb must be (U, L, d), got {tuple(seq_emb.shape)}")
    u, length, dim = seq_emb.shape
    check(codes.dim() == 3, f"codes must be (U, L, G), got {tuple(codes.shape)}")
    g = codes.shape[2]
    assert_shape("codes", codes, (u, length, g))
    assert_shape("mask", mask, (u, length))
    check(codes.dtype == torch.int64, "codes must be int64")
    num_codes = 1 << hash_bits
    x, codes = seq_emb.contiguous(), codes.contiguous()
    mask_u8 = (mask if mask.dtype == torch.bool else mask.to(torch.bool)).contiguous().view(torch.uint8)
    assert_contiguous(seq_emb=x, codes=codes, mask=mask_u8)
    dev = x.device
    c = sdim_bucket_sums_config(dev, u, length, dim, g, num_codes)
    chunks = c["CHUNKS"]
    sums = torch.empty((u, g, num_codes, dim), dtype=out_dtype or torch.float32, device=dev)
    counts = torch.empty((u, g, num_codes), dtype=torch.int32, device=dev)
    grid = (u, c["G_BLOCKS"] * c["C_BLOCKS"], chunks)
    cfg = LaunchConfig(block_size=c["BLOCK_D"], num_warps=c["num_warps"], grid=grid,
                       extra=tuple((k, v) for k, v in c.items() if k not in ("BLOCK_D", "num_warps")))
    if u * g == 0 or length == 0 or dim == 0:
        sums.zero_()
        counts.zero_()
        return sums, counts, cfg, codes, mask_u8
    if chunks == 1:  # 5-D views with a unit chunk axis: the program writes the table directly
        ws, wc = sums.unsqueeze(1), counts.unsqueeze(1)
    else:
        ws = torch.empty((u, chunks, g, num_codes, dim), dtype=torch.float32, device=dev)
        wc = torch.empty((u, chunks, g, num_codes), dtype=torch.int32, device=dev)
    _sdim_bucket_sums_fwd_kernel[grid](
        x, *x.stride(), codes, *codes.stride(), mask_u8, *mask_u8.stride(),
        ws, *ws.stride(), wc, *wc.stride(),
        length, dim, g, c["CHUNK_L"],
        NUM_CODES=num_codes, C_BLOCKS=c["C_BLOCKS"], SPLIT_BF16=x.dtype == torch.float32, F32_DOT=interpreting(), EVEN_D=dim == c["BLOCK_D"],
        BLOCK_L=c["BLOCK_L"], BLOCK_D=c["BLOCK_D"], BLOCK_G=c["BLOCK_G"], BLOCK_C=c["BLOCK_C"],
        num_warps=c["num_warps"], num_stages=c["num_stages"],
    )
    if chunks > 1:
        n_sums, n_counts = g * num_codes * dim, g * num_codes
        block_n = c["RED_BLOCK_N"]
        red_grid = (u, triton.cdiv(n_sums, block_n) + triton.cdiv(n_counts, block_n))
        _sdim_bucket_sums_reduce_kernel[red_grid](
            ws, wc, sums, counts, n_sums, n_counts, chunks,
            BLOCK_N=block_n, BLOCK_K=c["RED_BLOCK_K"], num_warps=4,
        )
    return sums, counts, cfg, codes, mask_u8


def sdim_bucket_sums_bwd(dsums: torch.Tensor, codes: torch.Tensor, mask_u8: torch.Tensor, dim: int,
                         out_dtype: torch.dtype, cfg: LaunchConfig) -> torch.Tensor:
    u, length, g = codes.shape
    dsums = dsums.contiguous()
    dx = torch.empty((u, length, dim), dtype=out_dtype, device=dsums.device)
    block_l = cfg.get("BWD_BLOCK_L")
    grid = (u, triton.cdiv(length, block_l))
    if u > 0 and length > 0 and dim > 0:
        _sdim_bucket_sums_bwd_kernel[grid](
            dsums, *dsums.stride(), codes, *codes.stride(), mask_u8, *mask_u8.stride(),
            dx, *dx.stride(), length, dim,
            NUM_GROUPS=g, NUM_CODES=dsums.shape[2], BLOCK_L=block_l, BLOCK_D=cfg.block_size,
            num_warps=cfg.get("BWD_num_warps"),
        )
    return dx


class _SdimBucketSums(torch.autograd.Function):
    @staticmethod
    def forward(ctx, seq_emb, codes, mask, hash_bits, upcast):
        out_dtype = torch.float32 if upcast else seq_emb.dtype
        sums, counts, cfg, codes_c, mask_u8 = sdim_bucket_sums_fwd(seq_emb, codes, mask, hash_bits, out_dtype)
        ctx.save_for_backward(codes_c, mask_u8)
        ctx.cfg, ctx.dim, ctx.in_dtype = cfg, seq_emb.shape[2], seq_emb.dtype
        ctx.mark_non_differentiable(counts)
        return sums, counts

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
