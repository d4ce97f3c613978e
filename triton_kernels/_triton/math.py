"""Pure in-kernel math shared by the kernels (STYLE R7: no loads/stores here).

* ``pack_score_index`` / ``unpack_*``: an order-preserving int64 key for (fp32 logit, position)
  so a single ``tl.topk``/``tl.sort`` over int64 selects by logit, descending, and breaks ties by
  the *smaller* position first — exactly the reference's stable-sort rule.
* ``activation_fwd`` / ``activation_bwd``: the elementwise hidden activations of the DIN unit.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = [
    "ACT_DICE",
    "ACT_IDENTITY",
    "ACT_PRELU",
    "ACT_RELU",
    "ACT_SIGMOID",
    "IDX_MAX",
    "activation_bwd",
    "activation_fwd",
    "pack_score_index",
    "unpack_index",
    "unpack_score",
]

IDX_MAX = 2147483647  # positions are stored as IDX_MAX - l in the low 32 bits (l < 2**31)
ACT_SIGMOID = 0
ACT_RELU = 1
ACT_IDENTITY = 2
ACT_PRELU = 3
ACT_DICE = 4


@triton.jit
def pack_score_index(score, idx):
    """int64 key ordered like (score desc, idx asc) under a descending sort; score fp32, idx int."""
    score = tl.where(score == 0.0, 0.0, score)  # -0.0 → +0.0: torch's sort treats them equal
    s = score.to(tl.int32, bitcast=True)
    ordered = s ^ ((s >> 31) & 0x7FFFFFFF)  # monotone map of fp32 order onto int32 order
    low = 2147483647 - idx.to(tl.int64)  # in [0, 2**31): larger for smaller idx
    return ordered.to(tl.int64) * 4294967296 + low


@triton.jit
def unpack_index(key):
    return (2147483647 - (key & 0xFFFFFFFF)).to(tl.int32)


@triton.jit
def unpack_score(key):
    ordered = (key >> 32).to(tl.int32)
    s = ordered ^ ((ordered >> 31) & 0x7FFFFFFF)
    return s.to(tl.float32, bitcast=True)


@triton.jit
def activation_fwd(s, alpha, mean, inv_std, ACT: tl.constexpr):
    """f(s) for the DIN hidden layer; ``alpha/mean/inv_std`` broadcast along the hidden axis."""
    if ACT == 0:
        out = tl.sigmoid(s)
    elif ACT == 1:
        out = tl.maximum(s, 0.0)
    elif ACT == 2:
        out = s
    elif ACT == 3:
        out = tl.where(s > 0, s, alpha * s)
    else:
        p = tl.sigmoid((s - mean) * inv_std)
        out = s * (alpha + p * (1.0 - alpha))
    return out


@triton.jit
def activation_bwd(s, alpha, mean, inv_std, ACT: tl.constexpr):
    """(df/ds, df/dalpha) at ``s``; df/dalpha is 0 for parameter-free activations."""
    if ACT == 0:
        f = tl.sigmoid(s)
        ds = f * (1.0 - f)
        da = tl.zeros_like(s)
    elif ACT == 1:
        ds = tl.where(s > 0, 1.0, 0.0)
        da = tl.zeros_like(s)
    elif ACT == 2:
        ds = tl.full(s.shape, 1.0, tl.float32)
        da = tl.zeros_like(s)
    elif ACT == 3:
        ds = tl.where(s > 0, 1.0, alpha)
        da = tl.where(s > 0, 0.0, s)
    else:
        p = tl.sigmoid((s - mean) * inv_std)
        ds = alpha + p * (1.0 - alpha) + s * (1.0 - alpha) * p * (1.0 - p) * inv_std
        da = s * (1.0 - p)
    return ds, da
