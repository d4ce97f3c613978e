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

from triton_kernels._triton.launch import LaunchConfig, assert_contiguous, interpreting, pow2_at_least
from triton_kernels._triton.math import pack_score_index, unpack_index, unpack_score
from triton_kernels.reference.dare_search import _check_shapes

__all__ = ["INTERPRET_BLOCK_L", "dare_search_triton"]

INTERPRET_BLOCK_L = 16  # sequence tile under the interpreter (tests pick L just above it)
SENTINEL: tl.constexpr = tl.constexpr(-(2**63))  # below every packed key (int64 minimum)


@triton.heuristics({"HAS_POS": lambda args: args["pos_ptr"] is not None})
@triton.jit
def _dare_search_fwd_kernel(
    q_ptr, stride_qb, stride_qd,
    k_ptr, stride_ku, stride_kl, stride_kd,
    v_ptr, stride_vu, stride_vl, stride_vd,
    mask_ptr, stride_mu, stride_ml,
    user_ptr,
    pos_ptr,
    out_ptr, stride_ob, stride_od,
    idx_ptr, stride_ib, stride_ik,
    w_ptr, stride_wb, stride_wk,
    length, dim_a, dim_r, top_k,
    HAS_POS: tl.constexpr, K_PAD: tl.constexpr, BLOCK_L: tl.constexpr,
    BLOCK_DA: tl.constexpr, BLOCK_DR: tl.constexpr,
):
    """Top-K search and aggregation for one candidate row.

    Pointers:
        q_ptr:    (B, dim_a) float query (attention embedding of the candidate).
        k_ptr:    (U, L, dim_a) float keys (behavior attention embeddings).
        v_ptr:    (U, L, dim_r) float values (behavior representation embeddings).
        mask_ptr: (U, L) uint8, 1 = real behavior.
        user_ptr: (B,) int64 user row of each candidate.
        pos_ptr:  (L,) float position logits, or None (HAS_POS=False).
        out_ptr:  (B, dim_r) float output.
        idx_ptr:  (B, top_k) int64 output indices (-1 for empty slots).
        w_ptr:    (B, top_k) fp32 output softmax weights (0 for empty slots).
    """
    b = tl.program_id(0).to(tl.int64)
    u = tl.load(user_ptr + b).to(tl.int64)
    da = tl.arange(0, BLOCK_DA)
    q = tl.load(q_ptr + b * stride_qb + da * stride_qd, mask=da < dim_a, other=0.0).to(tl.float32)
    slot = tl.arange(0, K_PAD)
    # K_PAD distinct placeholder keys (positions beyond any real one) below every real key.
    run = pack_score_index(tl.full((K_PAD,), float("-inf"), tl.float32), 2147483647 - slot.to(tl.int64))
    run_min = tl.min(run, axis=0)
    for l0 in range(0, length, BLOCK_L):
        ls = l0 + tl.arange(0, BLOCK_L).to(tl.int64)
        l_ok = ls < length
        real = (tl.load(mask_ptr + u * stride_mu + ls * stride_ml, mask=l_ok, other=0) != 0) & l_ok
        kt = tl.load(k_ptr + u * stride_ku + ls[:, None] * stride_kl + da[None, :] * stride_kd,
                     mask=real[:, None] & (da < dim_a)[None, :], other=0.0).to(tl.float32)
        logit = tl.sum(kt * q[None, :], axis=1)  # (BLOCK_L,)
        if HAS_POS:
            logit += tl.load(pos_ptr + ls, mask=real, other=0.0).to(tl.float32)
        logit = tl.where(real, logit, float("-inf"))
        keys = tl.where(l_ok, pack_score_index(logit, ls), SENTINEL)
        best = tl.max(keys, axis=0)
        # Replace-the-minimum merge: each pass moves the tile's best key into the running set;
        # it stops as soon as nothing left in the tile beats the running K-th best, so after the
        # first few tiles most tiles cost one comparison. Keys are unique (positions differ).
        while best > run_min:
            run = tl.where(run == run_min, best, run)
            keys = tl.where(keys == best, SENTINEL, keys)
            best = tl.max(keys, axis=0)
            run_min = tl.min(run, axis=0)
    # Order the K_PAD survivors descending by repeated max extraction.
    ordered = run
    for k in tl.static_range(K_PAD):
        top = tl.max(run, axis=0)
        ordered = tl.where(slot == k, top, ordered)
        run = tl.where(run == top, SENTINEL, run)
    run = ordered
    sel_logit = unpack_score(run)
    sel_idx = unpack_index(run).to(tl.int64)
    valid = (slot < top_k) & (sel_logit > float("-inf"))
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


def _config(length: int, dim_a: int, dim_r: int, top_k: int, batch: int) -> LaunchConfig:
    k_pad = pow2_at_least(top_k, 2)
    block_da = pow2_at_least(dim_a, 16)
    if interpreting():
        block_l = INTERPRET_BLOCK_L
    else:  # keep the (BLOCK_L, BLOCK_DA) key tile within ~8K fp32 registers per program
        block_l = min(256, max(16, 8192 // block_da))
    return LaunchConfig(block_size=block_l, num_warps=4, grid=(batch,),
                        extra=(("K_PAD", k_pad), ("BLOCK_DA", block_da),
                               ("BLOCK_DR", pow2_at_least(dim_r, 16))))


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
        cfg = _config(length, dim_a, dim_r, top_k, b)
        out_dtype = torch.float32 if upcast else query.dtype
        out = torch.empty((b, dim_r), dtype=out_dtype, device=q.device)
        top_idx = torch.empty((b, top_k), dtype=torch.int64, device=q.device)
        w = torch.empty((b, top_k), dtype=torch.float32, device=q.device)
        if b > 0:
            _dare_search_fwd_kernel[cfg.grid](
                q, *q.stride(), k, *k.stride(), v, *v.stride(), mask_u8, *mask_u8.stride(), users, pos,
                out, *out.stride(), top_idx, *top_idx.stride(), w, *w.stride(),
                length, dim_a, dim_r, top_k,
                K_PAD=cfg.get("K_PAD"), BLOCK_L=cfg.block_size, BLOCK_DA=cfg.get("BLOCK_DA"),
                BLOCK_DR=cfg.get("BLOCK_DR"), num_warps=cfg.num_warps,
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
            _dare_search_bwd_kernel[cfg.grid](
                q, *q.stride(), k, *k.stride(), v, *v.stride(), users, top_idx, *top_idx.stride(),
                w, *w.stride(), dout, *dout.stride(), dq, *dq.stride(), dk, dv, dpos,
                q.shape[1], v.shape[2], ctx.top_k,
                K_PAD=cfg.get("K_PAD"), BLOCK_DA=cfg.get("BLOCK_DA"), BLOCK_DR=cfg.get("BLOCK_DR"),
                num_warps=cfg.num_warps,
            )
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None,
                None if dpos is None else dpos.to(ctx.pos_dtype), None, None)


def dare_search_triton(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                       user_index: torch.Tensor, pos_logits: torch.Tensor | None, *, top_k: int,
                       upcast: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton twin of :func:`triton_kernels.reference.dare_search` (``top_weights`` detached)."""
    out, top_idx, w = _DareSearch.apply(query, keys, values, mask, user_index, pos_logits, top_k, upcast)
    return out, top_idx, w.detach()
