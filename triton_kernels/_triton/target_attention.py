"""Triton DIN target attention: activation unit, score and pooling fused, forward and backward.

The reference is :mod:`triton_kernels.reference.target_attention` (math, activation API, shapes).

Forward, one program per candidate row b. With ``w1 = [Wq; Wk; Wd; Wp]`` the program computes once
``hq = q@(Wq+Wd) + b1`` (H,) and ``W_b = (Wk − Wd) + diag(q)·Wp`` (d, H), so that for every
behavior ``[q, k, q−k, q⊙k]@w1 + b1 = hq + k@W_b``: one ``tl.dot`` per ``BLOCK_L`` tile of keys,
then the elementwise activation, ``·w2 + b2``, masking and the weighted sum — plain sum (DIN
paper) or an online softmax (running max/sum, FlashAttention style; its log-sum-exp is saved).
Neither the ``(B, L, 4d)`` concat nor the ``(B, L, H)`` hidden layer touch global memory.

Backward, one program per row, recomputing the hidden tiles. With ``a_l`` the pooling weight and
``dscore_l = dout·k_l`` (plain) or ``a_l(dout·k_l − dout·out)`` (softmax), it accumulates
``dw2, db2, dalpha, dhq = Σ dh, dW_b = Σ kᵀdh`` in registers and writes them to a per-row
partial buffer reduced by ``torch.sum`` afterwards (deterministic weight gradients, no atomics);
``d keys[u, l] += a_l·dout + dh_l@W_bᵀ`` is scattered with ``atomic_add`` (candidates of one user
share keys), so ``d keys`` is compared with tolerance. ``dice_mean``/``dice_var`` get no gradient
(they are statistics, as in the reference).

Register budget: a program holds ``BLOCK_D × BLOCK_H`` fp32 weights; d ≤ 128 and H ≤ 128 fit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from triton_kernels._triton.launch import LaunchConfig, assert_contiguous, interpreting, pow2_at_least
from triton_kernels._triton.math import activation_bwd, activation_fwd
from triton_kernels.reference.target_attention import ACTIVATIONS, check_target_attention_shapes

__all__ = ["INTERPRET_BLOCK_L", "target_attention_triton"]

INTERPRET_BLOCK_L = 16  # sequence tile under the interpreter (tests pick L just above it)


@triton.jit
def _load_unit(q_ptr, stride_qb, stride_qd, w1_ptr, stride_w1r, stride_w1h, b1_ptr, w2_ptr,
               alpha_ptr, mean_ptr, istd_ptr, b, dim, hid, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr):
    """Per-candidate constants: q, hq = q@(Wq+Wd)+b1, W_b = Wk−Wd+diag(q)Wp, Wq+Wd, Wp, w2, act params."""
    ds = tl.arange(0, BLOCK_D)
    hs = tl.arange(0, BLOCK_H)
    d_ok = ds < dim
    h_ok = hs < hid
    q = tl.load(q_ptr + b * stride_qb + ds * stride_qd, mask=d_ok, other=0.0).to(tl.float32)
    w_mask = d_ok[:, None] & h_ok[None, :]
    w_off = ds[:, None] * stride_w1r + hs[None, :] * stride_w1h
    wq = tl.load(w1_ptr + w_off, mask=w_mask, other=0.0).to(tl.float32)
    wk = tl.load(w1_ptr + dim * stride_w1r + w_off, mask=w_mask, other=0.0).to(tl.float32)
    wd = tl.load(w1_ptr + 2 * dim * stride_w1r + w_off, mask=w_mask, other=0.0).to(tl.float32)
    wp = tl.load(w1_ptr + 3 * dim * stride_w1r + w_off, mask=w_mask, other=0.0).to(tl.float32)
    wqd = wq + wd
    hq = tl.sum(q[:, None] * wqd, axis=0) + tl.load(b1_ptr + hs, mask=h_ok, other=0.0).to(tl.float32)
    w_b = wk - wd + q[:, None] * wp
    w2 = tl.load(w2_ptr + hs, mask=h_ok, other=0.0).to(tl.float32)
    alpha = tl.load(alpha_ptr + hs, mask=h_ok, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + hs, mask=h_ok, other=0.0).to(tl.float32)
    istd = tl.load(istd_ptr + hs, mask=h_ok, other=0.0).to(tl.float32)
    return q, hq, w_b, wqd, wp, w2, alpha, mean, istd


@triton.jit
def _target_attention_fwd_kernel(
    q_ptr, stride_qb, stride_qd,
    k_ptr, stride_ku, stride_kl, stride_kd,
    mask_ptr, stride_mu, stride_ml,
    user_ptr,
    w1_ptr, stride_w1r, stride_w1h,
    b1_ptr, w2_ptr, b2_ptr, alpha_ptr, mean_ptr, istd_ptr,
    out_ptr, stride_ob, stride_od,
    lse_ptr,
    length, dim, hid,
    ACT: tl.constexpr, SOFTMAX: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Fused activation unit + pooling for one candidate row.

    Pointers:
        q_ptr:     (B, dim) float queries.
        k_ptr:     (U, L, dim) float keys (behaviors).
        mask_ptr:  (U, L) uint8, 1 = real behavior.
        user_ptr:  (B,) int64 user row of each candidate.
        w1_ptr:    (4·dim, hid) float, rows [Wq; Wk; Wd; Wp].
        b1_ptr, w2_ptr: (hid,) float.  b2_ptr: (1,) float.
        alpha_ptr, mean_ptr, istd_ptr: (hid,) fp32 activation params (zeros when unused);
                   istd = 1/sqrt(dice_var + dice_eps).
        out_ptr:   (B, dim) float output.
        lse_ptr:   (B,) fp32 log-sum-exp of the softmax (-inf for a row with no behavior);
                   written only when SOFTMAX.
    """
    b = tl.program_id(0).to(tl.int64)
    u = tl.load(user_ptr + b).to(tl.int64)
    q, hq, w_b, wqd, wp, w2, alpha, mean, istd = _load_unit(
        q_ptr, stride_qb, stride_qd, w1_ptr, stride_w1r, stride_w1h, b1_ptr, w2_ptr, alpha_ptr,
        mean_ptr, istd_ptr, b, dim, hid, BLOCK_D, BLOCK_H)
    b2 = tl.load(b2_ptr).to(tl.float32)
    ds = tl.arange(0, BLOCK_D)
    d_ok = ds < dim
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    m = float("-inf")
    s = 0.0
    for l0 in range(0, length, BLOCK_L):
        ls = l0 + tl.arange(0, BLOCK_L).to(tl.int64)
        l_ok = ls < length
        real = (tl.load(mask_ptr + u * stride_mu + ls * stride_ml, mask=l_ok, other=0) != 0) & l_ok
        k = tl.load(k_ptr + u * stride_ku + ls[:, None] * stride_kl + ds[None, :] * stride_kd,
                    mask=real[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        hidden = tl.dot(k, w_b, input_precision="ieee") + hq[None, :]  # (BLOCK_L, BLOCK_H)
        act = activation_fwd(hidden, alpha[None, :], mean[None, :], istd[None, :], ACT)
        score = tl.sum(act * w2[None, :], axis=1) + b2  # (BLOCK_L,)
        if SOFTMAX:
            score = tl.where(real, score, float("-inf"))
            m_new = tl.maximum(m, tl.max(score, axis=0))
            m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
            scale = tl.exp(m - m_safe)
            p = tl.where(real, tl.exp(score - m_safe), 0.0)
            s = s * scale + tl.sum(p, axis=0)
            acc = acc * scale + tl.sum(p[:, None] * k, axis=0)
            m = m_new
        else:
            acc += tl.sum(tl.where(real, score, 0.0)[:, None] * k, axis=0)
    if SOFTMAX:
        acc = acc / tl.where(s > 0, s, 1.0)
        tl.store(lse_ptr + b, tl.where(s > 0, m + tl.log(tl.where(s > 0, s, 1.0)), float("-inf")))
    tl.store(out_ptr + b * stride_ob + ds * stride_od, acc.to(out_ptr.dtype.element_ty), mask=d_ok)


@triton.jit
def _target_attention_bwd_kernel(
    q_ptr, stride_qb, stride_qd,
    k_ptr, stride_ku, stride_kl, stride_kd,
    mask_ptr, stride_mu, stride_ml,
    user_ptr,
    w1_ptr, stride_w1r, stride_w1h,
    b1_ptr, w2_ptr, b2_ptr, alpha_ptr, mean_ptr, istd_ptr,
    out_ptr, stride_ob, stride_od,
    lse_ptr,
    dout_ptr, stride_gb, stride_gd,
    dq_ptr, stride_dqb, stride_dqd,
    dk_ptr,
    part_ptr, stride_pb, stride_pr, stride_ph,
    length, dim, hid,
    ACT: tl.constexpr, SOFTMAX: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Backward for one candidate row (recomputes the hidden tiles).

    Pointers (in addition to the forward's, which keep their meaning):
        out_ptr:  (B, dim) fp32 forward output (read only when SOFTMAX).
        lse_ptr:  (B,) fp32 forward log-sum-exp (read only when SOFTMAX).
        dout_ptr: (B, dim) float upstream gradient.
        dq_ptr:   (B, dim) fp32 output gradient of the query.
        dk_ptr:   (U, L, dim) fp32 zero-filled, strides of k_ptr; atomic_add target.
        part_ptr: (B, 4·dim + 4, hid) fp32 per-row partial parameter gradients: rows [0, 4·dim) are
                  d w1, then d b1, d w2, d alpha, and d b2 (in column 0 of the last row).
    """
    b = tl.program_id(0).to(tl.int64)
    u = tl.load(user_ptr + b).to(tl.int64)
    q, hq, w_b, wqd, wp, w2, alpha, mean, istd = _load_unit(
        q_ptr, stride_qb, stride_qd, w1_ptr, stride_w1r, stride_w1h, b1_ptr, w2_ptr, alpha_ptr,
        mean_ptr, istd_ptr, b, dim, hid, BLOCK_D, BLOCK_H)
    b2 = tl.load(b2_ptr).to(tl.float32)
    ds = tl.arange(0, BLOCK_D)
    hs = tl.arange(0, BLOCK_H)
    d_ok = ds < dim
    h_ok = hs < hid
    dout = tl.load(dout_ptr + b * stride_gb + ds * stride_gd, mask=d_ok, other=0.0).to(tl.float32)
    if SOFTMAX:
        out = tl.load(out_ptr + b * stride_ob + ds * stride_od, mask=d_ok, other=0.0).to(tl.float32)
        dot_out = tl.sum(dout * out, axis=0)
        lse = tl.load(lse_ptr + b)
    d_hq = tl.zeros((BLOCK_H,), dtype=tl.float32)
    d_w2 = tl.zeros((BLOCK_H,), dtype=tl.float32)
    d_alpha = tl.zeros((BLOCK_H,), dtype=tl.float32)
    d_wb = tl.zeros((BLOCK_D, BLOCK_H), dtype=tl.float32)
    d_b2 = 0.0
    for l0 in range(0, length, BLOCK_L):
        ls = l0 + tl.arange(0, BLOCK_L).to(tl.int64)
        l_ok = ls < length
        real = (tl.load(mask_ptr + u * stride_mu + ls * stride_ml, mask=l_ok, other=0) != 0) & l_ok
        k_off = u * stride_ku + ls[:, None] * stride_kl + ds[None, :] * stride_kd
        k_mask = real[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + k_off, mask=k_mask, other=0.0).to(tl.float32)
        hidden = tl.dot(k, w_b, input_precision="ieee") + hq[None, :]
        act = activation_fwd(hidden, alpha[None, :], mean[None, :], istd[None, :], ACT)
        score = tl.sum(act * w2[None, :], axis=1) + b2
        dk_dot = tl.sum(k * dout[None, :], axis=1)  # (BLOCK_L,) dout·k_l
        if SOFTMAX:
            att = tl.where(real, tl.exp(score - lse), 0.0)
            dscore = att * (dk_dot - dot_out)
        else:
            att = tl.where(real, score, 0.0)
            dscore = tl.where(real, dk_dot, 0.0)
        d_w2 += tl.sum(dscore[:, None] * act, axis=0)
        d_b2 += tl.sum(dscore, axis=0)
        dact = dscore[:, None] * w2[None, :]
        dsd, dal = activation_bwd(hidden, alpha[None, :], mean[None, :], istd[None, :], ACT)
        dh = dact * dsd  # (BLOCK_L, BLOCK_H)
        d_alpha += tl.sum(dact * dal, axis=0)
        d_hq += tl.sum(dh, axis=0)
        d_wb += tl.dot(tl.trans(k), dh, input_precision="ieee")
        dk = att[:, None] * dout[None, :] + tl.dot(dh, tl.trans(w_b), input_precision="ieee")
        tl.atomic_add(dk_ptr + k_off, dk, mask=k_mask)
    dq = tl.sum(wqd * d_hq[None, :], axis=1) + tl.sum(d_wb * wp, axis=1)
    tl.store(dq_ptr + b * stride_dqb + ds * stride_dqd, dq, mask=d_ok)
    q_dhq = q[:, None] * d_hq[None, :]
    p_off = b * stride_pb + ds[:, None] * stride_pr + hs[None, :] * stride_ph
    w_mask = d_ok[:, None] & h_ok[None, :]
    tl.store(part_ptr + p_off, q_dhq, mask=w_mask)  # d Wq
    tl.store(part_ptr + dim * stride_pr + p_off, d_wb, mask=w_mask)  # d Wk
    tl.store(part_ptr + 2 * dim * stride_pr + p_off, q_dhq - d_wb, mask=w_mask)  # d Wd
    tl.store(part_ptr + 3 * dim * stride_pr + p_off, q[:, None] * d_wb, mask=w_mask)  # d Wp
    row = b * stride_pb + 4 * dim * stride_pr + hs * stride_ph
    tl.store(part_ptr + row, d_hq, mask=h_ok)  # d b1
    tl.store(part_ptr + row + stride_pr, d_w2, mask=h_ok)
    tl.store(part_ptr + row + 2 * stride_pr, d_alpha, mask=h_ok)
    tl.store(part_ptr + row + 3 * stride_pr, tl.where(hs == 0, d_b2, 0.0), mask=h_ok)


def _config(batch: int, dim: int, hid: int) -> LaunchConfig:
    block_d, block_h = pow2_at_least(dim, 16), pow2_at_least(hid, 16)
    block_l = INTERPRET_BLOCK_L if interpreting() else max(16, min(128, 16384 // max(block_d, block_h)))
    return LaunchConfig(block_size=block_l, num_warps=4 if block_d * block_h <= 4096 else 8, grid=(batch,),
                        extra=(("BLOCK_D", block_d), ("BLOCK_H", block_h)))


class _TargetAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, keys, mask, user_index, w1, b1, w2, b2, alpha, dice_mean, dice_var,
                activation, dice_eps, softmax, upcast):
        check_target_attention_shapes(query, keys, mask, user_index, w1, b1, w2, b2, activation,
                                      (alpha, dice_mean, dice_var))
        if activation in ("prelu", "dice") and alpha is None:
            raise ValueError(f"activation={activation!r} needs alpha (H,)")
        if activation == "dice" and (dice_mean is None or dice_var is None):
            raise ValueError("activation='dice' needs dice_mean and dice_var (H,)")
        b, dim = query.shape
        hid = w1.shape[1]
        q, k, users = query.contiguous(), keys.contiguous(), user_index.contiguous()
        w1c, b1c, w2c, b2c = w1.contiguous(), b1.contiguous(), w2.contiguous(), b2.reshape(1).contiguous()
        mask_u8 = mask.to(torch.bool).contiguous().view(torch.uint8)
        zeros = torch.zeros(hid, dtype=torch.float32, device=q.device)
        alpha_f = zeros if alpha is None else alpha.float().contiguous()
        mean_f = zeros if dice_mean is None else dice_mean.float().contiguous()
        istd = zeros if dice_var is None else torch.rsqrt(dice_var.float() + dice_eps).contiguous()
        assert_contiguous(query=q, keys=k, user_index=users, mask=mask_u8, w1=w1c, b1=b1c, w2=w2c)
        cfg = _config(b, dim, hid)
        out = torch.empty((b, dim), dtype=torch.float32, device=q.device)
        lse = torch.empty((b,), dtype=torch.float32, device=q.device)
        act_code = ACTIVATIONS.index(activation)
        args = (q, *q.stride(), k, *k.stride(), mask_u8, *mask_u8.stride(), users, w1c, *w1c.stride(),
                b1c, w2c, b2c, alpha_f, mean_f, istd)
        if b > 0:
            _target_attention_fwd_kernel[cfg.grid](
                *args, out, *out.stride(), lse, keys.shape[1], dim, hid,
                ACT=act_code, SOFTMAX=softmax, BLOCK_L=cfg.block_size, BLOCK_D=cfg.get("BLOCK_D"),
                BLOCK_H=cfg.get("BLOCK_H"), num_warps=cfg.num_warps,
            )
        ctx.save_for_backward(q, k, mask_u8, users, w1c, b1c, w2c, b2c, alpha_f, mean_f, istd, out, lse)
        ctx.cfg, ctx.act_code, ctx.softmax, ctx.has_alpha = cfg, act_code, softmax, alpha is not None
        ctx.dtypes = (query.dtype, keys.dtype, w1.dtype, b1.dtype, w2.dtype, b2.dtype,
                      None if alpha is None else alpha.dtype)
        ctx.b2_shape = b2.shape
        return out.to(torch.float32 if upcast else query.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, mask_u8, users, w1c, b1c, w2c, b2c, alpha_f, mean_f, istd, out, lse = ctx.saved_tensors
        cfg = ctx.cfg
        b, dim = q.shape
        hid = w1c.shape[1]
        dout = dout.contiguous()
        dq = torch.empty((b, dim), dtype=torch.float32, device=q.device)
        dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        part = torch.zeros((b, 4 * dim + 4, hid), dtype=torch.float32, device=q.device)
        if b > 0:
            _target_attention_bwd_kernel[cfg.grid](
                q, *q.stride(), k, *k.stride(), mask_u8, *mask_u8.stride(), users, w1c, *w1c.stride(),
                b1c, w2c, b2c, alpha_f, mean_f, istd, out, *out.stride(), lse, dout, *dout.stride(),
                dq, *dq.stride(), dk, part, *part.stride(), k.shape[1], dim, hid,
                ACT=ctx.act_code, SOFTMAX=ctx.softmax, BLOCK_L=cfg.block_size, BLOCK_D=cfg.get("BLOCK_D"),
                BLOCK_H=cfg.get("BLOCK_H"), num_warps=cfg.num_warps,
            )
        total = part.sum(0)  # (4d + 4, H)
        dq_t, dk_t, dw1_t, db1_t, dw2_t, db2_t, dal_t = ctx.dtypes
        d_alpha = total[4 * dim + 2].to(dal_t) if ctx.has_alpha else None
        return (dq.to(dq_t), dk.to(dk_t), None, None, total[: 4 * dim].to(dw1_t), total[4 * dim].to(db1_t),
                total[4 * dim + 1].to(dw2_t), total[4 * dim + 3, :1].reshape(ctx.b2_shape).to(db2_t),
                d_alpha, None, None, None, None, None, None)


def target_attention_triton(
    query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor, user_index: torch.Tensor,
    w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, *,
    activation: str = "sigmoid", alpha: torch.Tensor | None = None, dice_mean: torch.Tensor | None = None,
    dice_var: torch.Tensor | None = None, dice_eps: float = 1e-8, softmax: bool = False, upcast: bool = False,
) -> torch.Tensor:
    """Triton twin of :func:`triton_kernels.reference.target_attention` (forward and backward)."""
    out: torch.Tensor = _TargetAttention.apply(query, keys, mask, user_index, w1, b1, w2, b2, alpha,
                                               dice_mean, dice_var, activation, dice_eps, softmax, upcast)
    return out
