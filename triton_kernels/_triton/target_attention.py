"""Triton DIN target attention: activation unit, score and pooling fused, forward and backward.

The reference is :mod:`triton_kernels.reference.target_attention` (math, activation API, shapes).

Forward, one program per candidate row b. With ``w1 = [Wq; Wk; Wd; Wp]`` the program computes once
``hq = q@(Wq+Wd) + b1`` (H,) and ``W_b = (Wk − Wd) + diag(q)·Wp`` (d, H), so that for every
behavior ``[q, k, q−k, q⊙k]@w1 + b1 = hq + k@W_b``: one ``tl.dot`` per ``BLOCK_L`` tile of keys,
then the elementwise activation, ``·w2 + b2``, masking and the weighted sum — plain sum (DIN
paper) or an online softmax (running max/sum, FlashAttention style; its log-sum-exp is saved).
Neither the ``(B, L, 4d)`` concat nor the ``(B, L, H)`` hidden layer touch global memory.

Backward, two kernels, both recomputing the hidden tiles. With ``a_l`` the pooling weight and
``dscore_l = dout·k_l`` (plain) or ``a_l(dout·k_l − dout·out)`` (softmax):

* ``_target_attention_bwd_kernel``, one program per row, accumulates ``dw2, db2, dalpha,
  dhq = Σ dh, dW_b = Σ kᵀdh`` in registers and writes them to a per-row partial buffer reduced by
  ``torch.sum`` afterwards (deterministic weight gradients, no atomics). When the row's user has
  exactly one candidate (the training layout, U == B) it also writes
  ``d keys[u, l] = a_l·dout + dh_l@W_bᵀ`` with a plain store (nobody else touches that user's keys);
  otherwise it stashes its ``W_b`` and ``hq`` for the second kernel.
* ``_target_attention_dkeys_kernel`` handles the users with several candidates (the serving layout,
  U = 1): candidates are sorted by user on the device (``launch.group_by_user``: torch ops, no
  host sync) and cut into groups of at most ``BLOCK_B`` candidates of one user; one program per
  (group, key tile) sums ``a_l·dout + dh_l@W_bᵀ`` over the group's candidates in registers and
  writes the tile once: a plain store when the group is the user's only one, else one
  ``atomic_add`` per tile and group (``ceil(count/BLOCK_B)`` writers per address instead of
  ``count``). ``d keys`` is therefore compared with tolerance.

``dice_mean``/``dice_var`` get no gradient (they are statistics, as in the reference).

Tunables live in :func:`_config`: ``BLOCK_L``/``num_warps`` (forward), ``BLOCK_L_BWD``/
``num_warps_bwd`` (both backward kernels) and ``BLOCK_B`` (candidates per d-keys group). The
defaults keep every kernel free of register spills at d, H ≤ 64 on sm_90 (checked with ``ptxas``);
``num_warps_bwd = 4`` was the fastest in an H100 sweep (training layout, see docs/kernels.md).
For sweeps on a GPU, the environment variable ``CTRSTREAM_TA_CONFIG`` overrides any of them, e.g.
``CTRSTREAM_TA_CONFIG="BLOCK_L=64,num_warps=16,BLOCK_L_BWD=16,num_warps_bwd=8,BLOCK_B=8"`` (comma
separated ``name=int``; block sizes are powers of two ≥ 16, warps
powers of two ≤ 32, ``BLOCK_B`` ≥ 1). It is read at every call and ignored under the interpreter,
which uses ``INTERPRET_BLOCK_L`` and ``INTERPRET_BLOCK_B`` so the tests cross every tile and group
boundary.
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
    pow2_at_least,
)
from triton_kernels._triton.math import activation_bwd, activation_fwd
from triton_kernels.reference.target_attention import ACTIVATIONS, check_target_attention_shapes

__all__ = ["CONFIG_ENV", "INTERPRET_BLOCK_B", "INTERPRET_BLOCK_L", "target_attention_triton"]

INTERPRET_BLOCK_L = 16  # sequence tile under the interpreter (tests pick L just above it)
INTERPRET_BLOCK_B = 2  # d-keys group size under the interpreter (tests give users 1, 2 and > 2 rows)
CONFIG_ENV = "CTRSTREAM_TA_CONFIG"  # "BLOCK_L=64,num_warps=8,BLOCK_B=4": see the module docstring


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
def _key_tile(k_ptr, stride_ku, stride_kl, stride_kd, mask_ptr, stride_mu, stride_ml, u, ls, length, ds, d_ok):
    """User ``u``'s keys at positions ``ls`` as fp32, 0 on padding and past L: ``(real, offsets,
    load mask, keys)``; the offsets and mask serve the backward's ``d keys`` writes."""
    l_ok = ls < length
    real = (tl.load(mask_ptr + u * stride_mu + ls * stride_ml, mask=l_ok, other=0) != 0) & l_ok
    k_off = u * stride_ku + ls[:, None] * stride_kl + ds[None, :] * stride_kd
    k_mask = real[:, None] & d_ok[None, :]
    return real, k_off, k_mask, tl.load(k_ptr + k_off, mask=k_mask, other=0.0).to(tl.float32)


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
        real, _, _, k = _key_tile(k_ptr, stride_ku, stride_kl, stride_kd, mask_ptr, stride_mu, stride_ml,
                                           u, ls, length, ds, d_ok)
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
    user_ptr, count_ptr,
    w1_ptr, stride_w1r, stride_w1h,
    b1_ptr, w2_ptr, b2_ptr, alpha_ptr, mean_ptr, istd_ptr,
    out_ptr, stride_ob, stride_od,
    lse_ptr,
    dout_ptr, stride_gb, stride_gd,
    dq_ptr, stride_dqb, stride_dqd,
    dk_ptr,
    part_ptr, stride_pb, stride_pr, stride_ph,
    unit_ptr, stride_ub, stride_ur, stride_uh,
    length, dim, hid,
    ACT: tl.constexpr, SOFTMAX: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Backward for one candidate row (recomputes the hidden tiles).

    Pointers (in addition to the forward's, which keep their meaning):
        count_ptr: (U,) int64 number of candidates of each user.
        out_ptr:  (B, dim) fp32 forward output (read only when SOFTMAX).
        lse_ptr:  (B,) fp32 forward log-sum-exp (read only when SOFTMAX).
        dout_ptr: (B, dim) float upstream gradient.
        dq_ptr:   (B, dim) fp32 output gradient of the query.
        dk_ptr:   (U, L, dim) fp32 zero-filled, strides of k_ptr; written here (plain store) only
                  for a user with exactly one candidate, else by ``_target_attention_dkeys_kernel``.
        part_ptr: (B, 4·dim + 4, hid) fp32 per-row partial parameter gradients: rows [0, 4·dim) are
                  d w1, then d b1, d w2, d alpha, and d b2 (in column 0 of the last row).
        unit_ptr: (B, dim + 1, hid) fp32 scratch: rows [0, dim) W_b, row dim hq; written only when
                  the row's user has several candidates (read by the d-keys kernel).
    """
    b = tl.program_id(0).to(tl.int64)
    u = tl.load(user_ptr + b).to(tl.int64)
    single = tl.load(count_ptr + u) == 1  # this program alone owns d keys[u]
    q, hq, w_b, wqd, wp, w2, alpha, mean, istd = _load_unit(
        q_ptr, stride_qb, stride_qd, w1_ptr, stride_w1r, stride_w1h, b1_ptr, w2_ptr, alpha_ptr,
        mean_ptr, istd_ptr, b, dim, hid, BLOCK_D, BLOCK_H)
    b2 = tl.load(b2_ptr).to(tl.float32)
    ds = tl.arange(0, BLOCK_D)
    hs = tl.arange(0, BLOCK_H)
    d_ok = ds < dim
    h_ok = hs < hid
    w_mask = d_ok[:, None] & h_ok[None, :]
    if not single:
        u_off = b * stride_ub + ds[:, None] * stride_ur + hs[None, :] * stride_uh
        tl.store(unit_ptr + u_off, w_b, mask=w_mask)
        tl.store(unit_ptr + b * stride_ub + dim * stride_ur + hs * stride_uh, hq, mask=h_ok)
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
        real, k_off, k_mask, k = _key_tile(k_ptr, stride_ku, stride_kl, stride_kd, mask_ptr, stride_mu, stride_ml,
                                           u, ls, length, ds, d_ok)
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
        if single:
            dk = tl.dot(dh, tl.trans(w_b), att[:, None] * dout[None, :], input_precision="ieee")
            tl.store(dk_ptr + k_off, dk, mask=k_mask)
    dq = tl.sum(wqd * d_hq[None, :], axis=1) + tl.sum(d_wb * wp, axis=1)
    tl.store(dq_ptr + b * stride_dqb + ds * stride_dqd, dq, mask=d_ok)
    q_dhq = q[:, None] * d_hq[None, :]
    p_off = b * stride_pb + ds[:, None] * stride_pr + hs[None, :] * stride_ph
    tl.store(part_ptr + p_off, q_dhq, mask=w_mask)  # d Wq
    tl.store(part_ptr + dim * stride_pr + p_off, d_wb, mask=w_mask)  # d Wk
    tl.store(part_ptr + 2 * dim * stride_pr + p_off, q_dhq - d_wb, mask=w_mask)  # d Wd
    tl.store(part_ptr + 3 * dim * stride_pr + p_off, q[:, None] * d_wb, mask=w_mask)  # d Wp
    row = b * stride_pb + 4 * dim * stride_pr + hs * stride_ph
    tl.store(part_ptr + row, d_hq, mask=h_ok)  # d b1
    tl.store(part_ptr + row + stride_pr, d_w2, mask=h_ok)
    tl.store(part_ptr + row + 2 * stride_pr, d_alpha, mask=h_ok)
    tl.store(part_ptr + row + 3 * stride_pr, tl.where(hs == 0, d_b2, 0.0), mask=h_ok)


@triton.jit
def _target_attention_dkeys_kernel(
    k_ptr, stride_ku, stride_kl, stride_kd,
    mask_ptr, stride_mu, stride_ml,
    group_ptr, stride_gg, stride_gf,
    order_ptr,
    unit_ptr, stride_ub, stride_ur, stride_uh,
    w2_ptr, b2_ptr, alpha_ptr, mean_ptr, istd_ptr,
    out_ptr, stride_ob, stride_od,
    lse_ptr,
    dout_ptr, stride_gb, stride_gd,
    dk_ptr,
    length, dim, hid,
    ACT: tl.constexpr, SOFTMAX: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """``d keys`` of one group of candidates sharing a user, for key tiles pid(1), pid(1) + npid(1), ….

    Pointers (the forward's keep their meaning):
        group_ptr: (G, 4) int64 rows [user, first slot in order, n candidates, atomic]; n = 0 for
                   a padding group (the grid is an upper bound, the table is built without sync);
                   atomic = 1 when the user has other groups (then the tile is ``atomic_add``-ed).
        order_ptr: (B,) int64 candidate rows sorted by user.
        unit_ptr:  (B, dim + 1, hid) fp32: W_b (rows [0, dim)) and hq (row dim) of each candidate,
                   written by ``_target_attention_bwd_kernel``.
        out_ptr, lse_ptr: forward output and log-sum-exp (read only when SOFTMAX).
        dout_ptr:  (B, dim) float upstream gradient.
        dk_ptr:    (U, L, dim) fp32 zero-filled, strides of k_ptr.
    """
    g = tl.program_id(0).to(tl.int64)
    u = tl.load(group_ptr + g * stride_gg)
    first = tl.load(group_ptr + g * stride_gg + stride_gf)
    n = tl.load(group_ptr + g * stride_gg + 2 * stride_gf).to(tl.int32)
    atomic = tl.load(group_ptr + g * stride_gg + 3 * stride_gf) != 0
    ds = tl.arange(0, BLOCK_D)
    hs = tl.arange(0, BLOCK_H)
    d_ok = ds < dim
    h_ok = hs < hid
    w_mask = d_ok[:, None] & h_ok[None, :]
    w2 = tl.load(w2_ptr + hs, mask=h_ok, other=0.0).to(tl.float32)
    alpha = tl.load(alpha_ptr + hs, mask=h_ok, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + hs, mask=h_ok, other=0.0).to(tl.float32)
    istd = tl.load(istd_ptr + hs, mask=h_ok, other=0.0).to(tl.float32)
    b2 = tl.load(b2_ptr).to(tl.float32)
    end = tl.where(n > 0, length, 0)  # a padding group does nothing (and must not store zeros)
    for l0 in range(tl.program_id(1) * BLOCK_L, end, tl.num_programs(1) * BLOCK_L):
        ls = l0 + tl.arange(0, BLOCK_L).to(tl.int64)
        real, k_off, k_mask, k = _key_tile(k_ptr, stride_ku, stride_kl, stride_kd, mask_ptr, stride_mu, stride_ml,
                                           u, ls, length, ds, d_ok)
        dk = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
        for i in range(0, n):
            b = tl.load(order_ptr + first + i)
            u_row = unit_ptr + b * stride_ub
            w_b = tl.load(u_row + ds[:, None] * stride_ur + hs[None, :] * stride_uh, mask=w_mask, other=0.0)
            hq = tl.load(u_row + dim * stride_ur + hs * stride_uh, mask=h_ok, other=0.0)
            dout = tl.load(dout_ptr + b * stride_gb + ds * stride_gd, mask=d_ok, other=0.0).to(tl.float32)
            hidden = tl.dot(k, w_b, input_precision="ieee") + hq[None, :]
            dk_dot = tl.sum(k * dout[None, :], axis=1)  # (BLOCK_L,) dout·k_l
            if SOFTMAX:
                out = tl.load(out_ptr + b * stride_ob + ds * stride_od, mask=d_ok, other=0.0)
                act = activation_fwd(hidden, alpha[None, :], mean[None, :], istd[None, :], ACT)
                score = tl.sum(act * w2[None, :], axis=1) + b2
                att = tl.where(real, tl.exp(score - tl.load(lse_ptr + b)), 0.0)
                dscore = att * (dk_dot - tl.sum(dout * out, axis=0))
            else:
                act = activation_fwd(hidden, alpha[None, :], mean[None, :], istd[None, :], ACT)
                att = tl.where(real, tl.sum(act * w2[None, :], axis=1) + b2, 0.0)
                dscore = tl.where(real, dk_dot, 0.0)
            dsd, dal = activation_bwd(hidden, alpha[None, :], mean[None, :], istd[None, :], ACT)
            dh = (dscore[:, None] * w2[None, :]) * dsd
            dk = tl.dot(dh, tl.trans(w_b), dk + att[:, None] * dout[None, :], input_precision="ieee")
        if atomic:
            tl.atomic_add(dk_ptr + k_off, dk, mask=k_mask)
        else:
            tl.store(dk_ptr + k_off, dk, mask=k_mask)


_TUNABLES = ("BLOCK_L", "num_warps", "BLOCK_L_BWD", "num_warps_bwd", "BLOCK_B")


def _checked(tun: dict[str, int]) -> dict[str, int]:
    """Reject tunables the kernels cannot take (``CTRSTREAM_TA_CONFIG`` typos fail loudly)."""
    for key, v in tun.items():
        pow2 = v > 0 and v & (v - 1) == 0
        if key.startswith("BLOCK_L") and not (pow2 and v >= 16):
            raise ValueError(f"{CONFIG_ENV}: {key} must be a power of two >= 16 (tl.dot), got {v}")
        if key.startswith("num_warps") and not (pow2 and v <= 32):
            raise ValueError(f"{CONFIG_ENV}: {key} must be a power of two <= 32, got {v}")
        if key == "BLOCK_B" and v < 1:
            raise ValueError(f"{CONFIG_ENV}: BLOCK_B must be >= 1, got {v}")
    return tun


def _config(batch: int, dim: int, hid: int) -> LaunchConfig:
    """Every launch decision of the op, forward and backward (see the module docstring).

    ``block_size``/``num_warps`` are the forward's ``BLOCK_L``/``num_warps``; ``extra`` holds
    ``BLOCK_D``/``BLOCK_H`` (d and H padded to powers of two), ``BLOCK_L_BWD``/``NUM_WARPS_BWD``
    (both backward kernels) and ``BLOCK_B`` (candidates per d-keys group, a host-side choice: no
    recompilation). Defaults, from ptxas resource usage on sm_90 at d = 64, H = 36 → 64 (fp32, dice,
    triton 3.6): forward 32 × 64 key tile, 8 warps: 117 registers, no spill (the former 128-row tile
    with 4 warps spilled ~14 KB per thread; 64 rows/8 warps or 32 rows/4 warps spill a little; 64
    rows/16 warps and 16 rows/4 warps do not). Row backward 16 rows, 8 warps: 208 registers, no
    spill (32 rows spill). d-keys kernel 16 rows, 8 warps, ``num_stages=1``: 168 registers, no spill
    (software pipelining of its per-candidate W_b loads spills). Wider units (d or H up to 128) get a
    16-row forward tile. ``BLOCK_B = 8`` cuts the d-keys writers per key address eightfold while the
    (group, key tile) grid stays large (serving, B = 1024: 128 groups × L/16 tiles).
    """
    block_d, block_h = pow2_at_least(dim, 16), pow2_at_least(hid, 16)
    small = block_d * block_h <= 4096
    tun = {"BLOCK_L": 32 if small else 16, "num_warps": 8, "BLOCK_L_BWD": 16, "num_warps_bwd": 4, "BLOCK_B": 8}
    if interpreting():
        tun.update(BLOCK_L=INTERPRET_BLOCK_L, BLOCK_L_BWD=INTERPRET_BLOCK_L, BLOCK_B=INTERPRET_BLOCK_B)
    else:
        tun = _checked(config_overrides(CONFIG_ENV, tun))
    return LaunchConfig(block_size=tun["BLOCK_L"], num_warps=tun["num_warps"], grid=(batch,),
                        extra=(("BLOCK_D", block_d), ("BLOCK_H", block_h), ("BLOCK_L_BWD", tun["BLOCK_L_BWD"]),
                               ("NUM_WARPS_BWD", tun["num_warps_bwd"]), ("BLOCK_B", tun["BLOCK_B"])))


def _user_groups(users: torch.Tensor, num_users: int, block_b: int) -> tuple[torch.Tensor, ...]:
    """Device-side grouping of candidates by user for the d-keys kernel (torch ops, no host sync).

    Returns ``counts (U,)`` candidates per user, ``order (B,)`` candidate rows sorted by user and
    ``groups (G, 4)`` int64 rows [user, first slot in order, n, atomic] (the kernel's
    ``group_ptr``). Only users with ≥ 2 candidates get groups (the row kernel writes the others);
    each is cut into ``ceil(count/block_b)`` ≤ ``count // block_b + 1`` groups, and at most
    ``B // 2`` users have ≥ 2 candidates, so G = ``min(B, B // block_b + min(U, B // 2))`` bounds
    the number of groups without a host sync; rows past the real groups have n = 0.
    """
    b = users.numel()
    g_max = max(1, min(b, b // block_b + min(num_users, b // 2)))
    counts, order, owner, first, n = group_by_user(users, num_users, block_b, g_max, min_count=2)
    groups = torch.stack([owner, first, n, (counts[owner] > block_b).long()], 1)
    return counts, order, groups.contiguous()


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
        unit = torch.empty((b, dim + 1, hid), dtype=torch.float32, device=q.device)
        length = k.shape[1]
        if b > 0:
            counts, order, groups = _user_groups(users, k.shape[0], cfg.get("BLOCK_B"))
            block_l, warps = cfg.get("BLOCK_L_BWD"), cfg.get("NUM_WARPS_BWD")
            meta = {"ACT": ctx.act_code, "SOFTMAX": ctx.softmax, "BLOCK_L": block_l, "BLOCK_D": cfg.get("BLOCK_D"),
                    "BLOCK_H": cfg.get("BLOCK_H"), "num_warps": warps}
            _target_attention_bwd_kernel[cfg.grid](
                q, *q.stride(), k, *k.stride(), mask_u8, *mask_u8.stride(), users, counts, w1c, *w1c.stride(),
                b1c, w2c, b2c, alpha_f, mean_f, istd, out, *out.stride(), lse, dout, *dout.stride(),
                dq, *dq.stride(), dk, part, *part.stride(), unit, *unit.stride(), length, dim, hid, **meta,
            )
            tiles = triton.cdiv(length, block_l)
            if tiles > 0:
                _target_attention_dkeys_kernel[(groups.shape[0], min(tiles, 65535))](
                    k, *k.stride(), mask_u8, *mask_u8.stride(), groups, *groups.stride(), order,
                    unit, *unit.stride(), w2c, b2c, alpha_f, mean_f, istd, out, *out.stride(), lse,
                    dout, *dout.stride(), dk, length, dim, hid, **meta, num_stages=1,  # no spill
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
