"""Triton DARE top-K soft search: tiled logits with a running top-K, then softmax-weighted gather.

The reference is :mod:`triton_kernels.reference.dare_search`; conventions (descending order,
ties → smaller position, short rows → index -1 / weight 0) are identical, so ``top_idx`` matches
bit for bit whenever the fp32 logits do.

Forward, one program per candidate row b: stream the user's keys in ``BLOCK_L`` tiles, compute
``q·k + pos`` in registers, pack each (logit, position) into one order-preserving int64 key
(:func:`triton_kernels._triton.math.pack_score_index`) and merge the tile into the running top
``K_PAD`` by replacing its minimum while the tile still holds a better key (no sort network
per tile; a tile whose best key cannot enter costs one comparison), then order the survivors by
repeated max extraction. The ``(B, L)`` logit matrix never reaches global memory. Then softmax
over the K selected logits and ``Σ w_k·values[u, idx_k]``.

Backward, one program per row: ``dw_k = dout·v_k``, ``dlogit_k = w_k(dw_k − Σ_j w_j dw_j)``;
``dq = Σ dlogit_k·k_k`` is stored, while ``d keys[u, idx_k] += dlogit_k·q``,
``d values[u, idx_k] += w_k·dout`` and ``d pos[idx_k] += dlogit_k`` are scattered with
``atomic_add`` (many candidates of one user hit the same behaviors), so those three are compared
with tolerance, never bit-exactly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from triton_kernels._triton.launch import (
    LaunchConfig,
    assert_contiguous,
    config_overrides,
    group_by_user,
    interpreting,
    num_sms,
    pow2_at_least,
)
from triton_kernels._triton.math import pack_score_index, unpack_index, unpack_score
from triton_kernels.reference.dare_search import _check_shapes

__all__ = ["INTERPRET_BLOCK_L", "dare_search_triton"]

INTERPRET_BLOCK_L = 16  # sequence tile under the interpreter (tests pick L just above it)
SENTINEL: tl.constexpr = tl.constexpr(-(2**63))  # below every packed key (int64 minimum)


@triton.heuristics({"HAS_POS": lambda args: args["pos_ptr"] is not None})
@triton.jit
def _dare_search_partial_kernel(
    q_ptr, stride_qb, stride_qd,
    k_ptr, stride_ku, stride_kl, stride_kd,
    mask_ptr, stride_mu, stride_ml,
    order_ptr, block_ptr,
    pos_ptr,
    part_ptr, stride_pb, stride_ps, stride_pk,
    num_rows, length, dim_a, split_len,
    SINGLE_USER: tl.constexpr, HAS_POS: tl.constexpr, K_PAD: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_DA: tl.constexpr, PRECISION: tl.constexpr,
):
    """Running top ``K_PAD`` of up to ``BLOCK_B`` candidates of one user over one slice of L.

    Pointers:
        q_ptr:     (B, dim_a) float queries (attention embeddings of the candidates).
        k_ptr:     (U, L, dim_a) float keys (behavior attention embeddings).
        mask_ptr:  (U, L) uint8, 1 = real behavior.
        order_ptr: (B,) int64 candidate rows grouped by user (unused when SINGLE_USER).
        block_ptr: (num_blocks, 3) int64 (user, first, end) into ``order`` per program row of the
                   grid (unused when SINGLE_USER: block j is rows [j·BLOCK_B, (j+1)·BLOCK_B) of user 0).
        pos_ptr:   (L,) float position logits, or None (HAS_POS=False).
        part_ptr:  (B, num_splits, K_PAD) int64 output: the slice's best packed (logit, position)
                   keys per candidate row, unordered; placeholders below every real key fill the rest.
    """
    blk = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    if SINGLE_USER:
        u = blk * 0
        first = blk * BLOCK_B
        end = tl.minimum(first + BLOCK_B, num_rows)
    else:
        u = tl.load(block_ptr + blk * 3)
        first = tl.load(block_ptr + blk * 3 + 1)
        end = tl.load(block_ptr + blk * 3 + 2)
    r = first + tl.arange(0, BLOCK_B).to(tl.int64)
    row_ok = r < end
    if SINGLE_USER:
        rows = r
    else:
        rows = tl.load(order_ptr + r, mask=row_ok, other=0)
    da = tl.arange(0, BLOCK_DA)
    q = tl.load(q_ptr + rows[:, None] * stride_qb + da[None, :] * stride_qd,
                mask=row_ok[:, None] & (da < dim_a)[None, :], other=0.0).to(tl.float32)
    slot = tl.arange(0, K_PAD)
    # K_PAD distinct placeholder keys per row (positions beyond any real one), below every real key.
    run = pack_score_index(tl.full((BLOCK_B, K_PAD), float("-inf"), tl.float32),
                           2147483647 - tl.broadcast_to(slot[None, :], (BLOCK_B, K_PAD)).to(tl.int64))
    run_min = tl.min(run, axis=1)
    lo = split * split_len
    hi = tl.minimum(lo + split_len, length)
    hi = tl.where(end > first, hi, lo)  # a grid row past the last block streams nothing
    for l0 in range(lo, hi, BLOCK_L):
        ls = l0 + tl.arange(0, BLOCK_L).to(tl.int64)
        l_ok = ls < hi
        real = (tl.load(mask_ptr + u * stride_mu + ls * stride_ml, mask=l_ok, other=0) != 0) & l_ok
        kt = tl.load(k_ptr + u * stride_ku + ls[:, None] * stride_kl + da[None, :] * stride_kd,
                     mask=real[:, None] & (da < dim_a)[None, :], other=0.0).to(tl.float32)
        logit = tl.dot(q, tl.trans(kt), input_precision=PRECISION)  # (BLOCK_B, BLOCK_L) fp32
        if HAS_POS:
            logit += tl.load(pos_ptr + ls, mask=real, other=0.0).to(tl.float32)[None, :]
        logit = tl.where(real[None, :], logit, float("-inf"))
        keys = tl.where(row_ok[:, None] & l_ok[None, :], pack_score_index(logit, ls[None, :]), SENTINEL)
        best = tl.max(keys, axis=1)
        # Replace-the-minimum merge, all rows at once: each pass moves every row's best remaining
        # tile key into its running set if it beats the row's K-th best; the loop ends when no
        # row's does, so after the first tiles most tiles cost one comparison per row. Keys are
        # unique within a row (positions differ).
        while tl.max((best > run_min).to(tl.int32), axis=0) > 0:
            enter = best > run_min
            run = tl.where(enter[:, None] & (run == run_min[:, None]), best[:, None], run)
            keys = tl.where(enter[:, None] & (keys == best[:, None]), SENTINEL, keys)
            best = tl.max(keys, axis=1)
            run_min = tl.min(run, axis=1)
    tl.store(part_ptr + rows[:, None] * stride_pb + split * stride_ps + slot[None, :] * stride_pk, run,
             mask=row_ok[:, None])


@triton.jit
def _dare_search_finish_kernel(
    part_ptr, stride_pb, stride_ps, stride_pk,
    v_ptr, stride_vu, stride_vl, stride_vd,
    user_ptr,
    out_ptr, stride_ob, stride_od,
    idx_ptr, stride_ib, stride_ik,
    w_ptr, stride_wb, stride_wk,
    num_splits, dim_r, top_k,
    K_PAD: tl.constexpr, S_PAD: tl.constexpr, BLOCK_DR: tl.constexpr,
):
    """Merge one candidate row's per-slice top sets, then softmax over the K and gather values.

    Pointers:
        part_ptr: (B, num_splits, K_PAD) int64 packed keys from the partial kernel.
        v_ptr:    (U, L, dim_r) float values (behavior representation embeddings).
        user_ptr: (B,) int64 user row of each candidate.
        out_ptr:  (B, dim_r) float output.
        idx_ptr:  (B, top_k) int64 output indices (-1 for empty slots).
        w_ptr:    (B, top_k) fp32 output softmax weights (0 for empty slots).
    """
    b = tl.program_id(0).to(tl.int64)
    u = tl.load(user_ptr + b).to(tl.int64)
    s = tl.arange(0, S_PAD)
    slot = tl.arange(0, K_PAD)
    cand = tl.load(part_ptr + b * stride_pb + s[:, None] * stride_ps + slot[None, :] * stride_pk,
                   mask=(s < num_splits)[:, None], other=SENTINEL)
    # The K_PAD best keys in descending order by repeated max extraction (keys of one row are
    # unique except the placeholders, which only ever fill slots that end up invalid).
    ordered = tl.full((K_PAD,), SENTINEL, tl.int64)
    for k in tl.static_range(K_PAD):
        top = tl.max(tl.max(cand, axis=1), axis=0)
        ordered = tl.where(slot == k, top, ordered)
        cand = tl.where(cand == top, SENTINEL, cand)
    sel_logit = unpack_score(ordered)
    sel_idx = unpack_index(ordered).to(tl.int64)
    valid = (slot < top_k) & (sel_logit > float("-inf")) & (ordered != SENTINEL)
    m = tl.max(tl.where(valid, sel_logit, float("-inf")), axis=0)
    m = tl.where(m > float("-inf"), m, 0.0)
    e = tl.where(valid, tl.exp(sel_logit - m), 0.0)
    denom = tl.sum(e, axis=0)
    w = e / tl.where(denom > 0, denom, 1.0)
    in_k = slot < top_k
    tl.store(idx_ptr + b * stride_ib + slot * stride_ik, tl.where(valid, sel_idx, -1), mask=in_k)
    tl.store(w_ptr + b * stride_wb + slot * stride_wk, w, mask=in_k)
    dr = tl.arange(0, BLOCK_DR)
    safe = tl.where(valid, sel_idx, 0)
    vt = tl.load(v_ptr + u * stride_vu + safe[:, None] * stride_vl + dr[None, :] * stride_vd,
                 mask=valid[:, None] & (dr < dim_r)[None, :], other=0.0).to(tl.float32)
    out = tl.sum(w[:, None] * vt, axis=0)
    tl.store(out_ptr + b * stride_ob + dr * stride_od, out.to(out_ptr.dtype.element_ty), mask=dr < dim_r)


@triton.heuristics({"HAS_POS": lambda args: args["dpos_ptr"] is not None})
@triton.jit
def _dare_search_bwd_kernel(
    q_ptr, stride_qb, stride_qd,
    k_ptr, stride_ku, stride_kl, stride_kd,
    v_ptr, stride_vu, stride_vl, stride_vd,
    user_ptr,
    idx_ptr, stride_ib, stride_ik,
    w_ptr, stride_wb, stride_wk,
    dout_ptr, stride_ob, stride_od,
    dq_ptr, stride_dqb, stride_dqd,
    dk_ptr, dv_ptr, dpos_ptr,
    dim_a, dim_r, top_k,
    HAS_POS: tl.constexpr, K_PAD: tl.constexpr, BLOCK_DA: tl.constexpr, BLOCK_DR: tl.constexpr,
):
    """Backward through the K selected behaviors of one candidate row.

    Pointers:
        q_ptr, k_ptr, v_ptr, user_ptr: as in the forward.
        idx_ptr:  (B, top_k) int64 selected positions (-1 = empty slot).
        w_ptr:    (B, top_k) fp32 softmax weights.
        dout_ptr: (B, dim_r) float upstream gradient.
        dq_ptr:   (B, dim_a) fp32 output gradient of the query.
        dk_ptr:   (U, L, dim_a) fp32 zero-filled, strides of k_ptr; atomic_add target.
        dv_ptr:   (U, L, dim_r) fp32 zero-filled, strides of v_ptr; atomic_add target.
        dpos_ptr: (L,) fp32 zero-filled atomic_add target, or None (HAS_POS=False).
    """
    b = tl.program_id(0).to(tl.int64)
    u = tl.load(user_ptr + b).to(tl.int64)
    slot = tl.arange(0, K_PAD)
    in_k = slot < top_k
    idx = tl.load(idx_ptr + b * stride_ib + slot * stride_ik, mask=in_k, other=-1)
    valid = idx >= 0
    safe = tl.where(valid, idx, 0)
    w = tl.load(w_ptr + b * stride_wb + slot * stride_wk, mask=in_k, other=0.0)
    dr = tl.arange(0, BLOCK_DR)
    da = tl.arange(0, BLOCK_DA)
    r_ok = valid[:, None] & (dr < dim_r)[None, :]
    a_ok = valid[:, None] & (da < dim_a)[None, :]
    dout = tl.load(dout_ptr + b * stride_ob + dr * stride_od, mask=dr < dim_r, other=0.0).to(tl.float32)
    v_off = u * stride_vu + safe[:, None] * stride_vl + dr[None, :] * stride_vd
    vt = tl.load(v_ptr + v_off, mask=r_ok, other=0.0).to(tl.float32)
    dw = tl.sum(vt * dout[None, :], axis=1)
    dlogit = w * (dw - tl.sum(w * dw, axis=0))
    k_off = u * stride_ku + safe[:, None] * stride_kl + da[None, :] * stride_kd
    kt = tl.load(k_ptr + k_off, mask=a_ok, other=0.0).to(tl.float32)
    q = tl.load(q_ptr + b * stride_qb + da * stride_qd, mask=da < dim_a, other=0.0).to(tl.float32)
    dq = tl.sum(dlogit[:, None] * kt, axis=0)
    tl.store(dq_ptr + b * stride_dqb + da * stride_dqd, dq, mask=da < dim_a)
    tl.atomic_add(dk_ptr + k_off, dlogit[:, None] * q[None, :], mask=a_ok)
    tl.atomic_add(dv_ptr + v_off, w[:, None] * dout[None, :], mask=r_ok)
    if HAS_POS:
        tl.atomic_add(dpos_ptr + safe, dlogit, mask=valid)


CONFIG_ENV = "CTRSTREAM_DARE_CONFIG"  # e.g. "BLOCK_B=16,BLOCK_L=128,num_warps=4,SPLIT_LEN=4096"


def _config(length: int, dim_a: int, dim_r: int, top_k: int, batch: int, users: int,
            device: torch.device) -> LaunchConfig:
    """Tiles and the split of L: candidate blocks × L slices ≈ 4 programs per SM (flash-decoding)."""
    block_da = pow2_at_least(dim_a, 16)
    single = users == 1
    # Measured on an H100 (benchmarks/results/kernels-h100.jsonl, sweep in docs/kernels.md): 3xTF32
    # logits run 2-2.6x faster than FMA fp32 ("ieee") dots; one user's candidates go 64 to a block
    # (each key tile is read once per 64 candidates); one candidate per user (training) prefers
    # long key tiles.
    tun = config_overrides(CONFIG_ENV, {
        "BLOCK_B": 64 if single and batch >= 64 else 16,
        "BLOCK_L": min(128, 8192 // block_da) if single else min(256, 16384 // block_da),
        "num_warps": 4, "SPLIT_LEN": 0, "TF32X3": 1})
    block_b = tun["BLOCK_B"]
    # Candidates of one user share a block; with several users the grid takes the bound of
    # :func:`_user_blocks` (rows past the last real block do nothing).
    num_blocks = triton.cdiv(batch, block_b) if single else batch // block_b + min(users, batch) + 1
    if interpreting():
        block_l, split_len = INTERPRET_BLOCK_L, 2 * INTERPRET_BLOCK_L  # tests cover the merge of slices
    else:
        block_l = tun["BLOCK_L"]
        # ~4 programs per SM; a slice is at least 8 tiles
        splits = max(1, min(64, triton.cdiv(4 * num_sms(device), num_blocks), triton.cdiv(length, 8 * block_l)))
        split_len = tun["SPLIT_LEN"] or triton.cdiv(triton.cdiv(length, splits), block_l) * block_l
    num_splits = max(1, triton.cdiv(length, split_len))
    return LaunchConfig(block_size=block_l, num_warps=tun["num_warps"],
                        grid=(num_blocks, num_splits),
                        extra=(("K_PAD", pow2_at_least(top_k, 2)), ("TF32X3", tun["TF32X3"]),
                               ("BLOCK_DA", block_da), ("BLOCK_DR", pow2_at_least(dim_r, 16)), ("BLOCK_B", block_b),
                               ("SPLIT_LEN", split_len), ("S_PAD", pow2_at_least(num_splits, 2))))


def _user_blocks(user_index: torch.Tensor, users: int, block_b: int, num_blocks: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate rows grouped by user, and (user, first, end) into that order per grid row.

    Each user's candidates fill ``ceil(count / block_b)`` blocks, so a block never mixes users; the
    grid is sized by the bound ``B // block_b + min(U, B) + 1`` and rows past the last block are
    empty (``end == first``).
    """
    _, order, owner, first, size = group_by_user(user_index, users, block_b, num_blocks)
    return order, torch.stack([owner, first, first + size], dim=1).contiguous()


class _DareSearch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, keys, values, mask, user_index, pos_logits, top_k, upcast):
        _check_shapes(query, keys, values, mask, user_index, pos_logits, top_k)
        q, k, v = query.contiguous(), keys.contiguous(), values.contiguous()
        users = user_index.contiguous()
        mask_u8 = mask.to(torch.bool).contiguous().view(torch.uint8)
        pos = None if pos_logits is None else pos_logits.contiguous()
        assert_contiguous(query=q, keys=k, values=v, user_index=users, mask=mask_u8, pos_logits=pos)
        b, dim_a = q.shape
        _, length, dim_r = v.shape
        cfg = _config(length, dim_a, dim_r, top_k, b, k.shape[0], q.device)
        out_dtype = torch.float32 if upcast else query.dtype
        out = torch.empty((b, dim_r), dtype=out_dtype, device=q.device)
        top_idx = torch.empty((b, top_k), dtype=torch.int64, device=q.device)
        w = torch.empty((b, top_k), dtype=torch.float32, device=q.device)
        if b > 0:
            single = k.shape[0] == 1
            order, blocks = (users, users) if single else _user_blocks(users, k.shape[0], cfg.get("BLOCK_B"),
                                                                       cfg.grid[0])
            part = torch.empty((b, cfg.grid[1], cfg.get("K_PAD")), dtype=torch.int64, device=q.device)
            _dare_search_partial_kernel[cfg.grid](
                q, *q.stride(), k, *k.stride(), mask_u8, *mask_u8.stride(), order, blocks, pos,
                part, *part.stride(), b, length, dim_a, cfg.get("SPLIT_LEN"),
                SINGLE_USER=single, K_PAD=cfg.get("K_PAD"), BLOCK_B=cfg.get("BLOCK_B"),
                BLOCK_L=cfg.block_size, BLOCK_DA=cfg.get("BLOCK_DA"),
                PRECISION="tf32x3" if cfg.get("TF32X3") and not interpreting() else "ieee",
                num_warps=cfg.num_warps,
            )
            _dare_search_finish_kernel[(b,)](
                part, *part.stride(), v, *v.stride(), users, out, *out.stride(), top_idx, *top_idx.stride(),
                w, *w.stride(), cfg.grid[1], dim_r, top_k,
                K_PAD=cfg.get("K_PAD"), S_PAD=cfg.get("S_PAD"), BLOCK_DR=cfg.get("BLOCK_DR"), num_warps=4,
            )
        ctx.save_for_backward(q, k, v, users, top_idx, w)
        ctx.cfg, ctx.top_k, ctx.has_pos = cfg, top_k, pos is not None
        ctx.pos_dtype = None if pos is None else pos.dtype
        ctx.mark_non_differentiable(top_idx)
        return out, top_idx, w.to(out_dtype)

    @staticmethod
    def backward(ctx, dout, _didx, _dw):
        q, k, v, users, top_idx, w = ctx.saved_tensors
        cfg = ctx.cfg
        dout = dout.contiguous()
        dq = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        dpos = torch.zeros((k.shape[1],), dtype=torch.float32, device=k.device) if ctx.has_pos else None
        if q.shape[0] > 0:
            _dare_search_bwd_kernel[(q.shape[0],)](
                q, *q.stride(), k, *k.stride(), v, *v.stride(), users, top_idx, *top_idx.stride(),
                w, *w.stride(), dout, *dout.stride(), dq, *dq.stride(), dk, dv, dpos,
                q.shape[1], v.shape[2], ctx.top_k,
                K_PAD=cfg.get("K_PAD"), BLOCK_DA=cfg.get("BLOCK_DA"), BLOCK_DR=cfg.get("BLOCK_DR"),
                num_warps=4,
            )
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None,
                None if dpos is None else dpos.to(ctx.pos_dtype), None, None)


def dare_search_triton(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                       user_index: torch.Tensor, pos_logits: torch.Tensor | None, *, top_k: int,
                       upcast: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton twin of :func:`triton_kernels.reference.dare_search` (``top_weights`` detached)."""
    out, top_idx, w = _DareSearch.apply(query, keys, values, mask, user_index, pos_logits, top_k, upcast)
    return out, top_idx, w.detach()
