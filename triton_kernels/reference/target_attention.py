"""DIN local activation unit + weighted sum pooling, fused; pure torch reference (STYLE R2 oracle).

Signature (the public dispatcher adds a trailing ``backend``)::

    target_attention(query, keys, mask, user_index, w1, b1, w2, b2, *,
                     activation="sigmoid", alpha=None, dice_mean=None, dice_var=None,
                     dice_eps=1e-8, softmax=False, upcast=False) -> (B, d)

Shapes: ``query (B, d)`` candidate embedding; ``keys (U, L, d)`` behaviors (most recent first,
padded at the end); ``mask (U, L)`` bool; ``user_index (B,)`` int64 → user row;
``w1 (4d, H)`` (an ``nn.Linear(4d, H)`` passes ``weight.t()``), ``b1 (H,)``, ``w2 (H,)`` (an
``nn.Linear(H, 1)`` passes ``weight.view(-1)``), ``b2 (1,)`` (its ``bias``).

Math (papers.md §1(a), the FuxiCTR/DIN-code input layout ``[q, k, q−k, q⊙k]``)::

    hidden[b, l] = act([q, k, q−k, q⊙k] @ w1 + b1)                     # (H,)
    score[b, l]  = hidden[b, l] · w2 + b2                              # scalar
    softmax=False (paper DIN): out[b] = Σ_{l real} score[b, l] · k[u, l]   (padding contributes 0)
    softmax=True  (DIN code / FuxiCTR din_use_softmax): score → softmax over real l (a row with
                  no real behavior gives out = 0)

With ``w1 = [Wq; Wk; Wd; Wp]`` (each ``(d, H)``) the first layer is computed as
``q@(Wq+Wd) + b1`` (once per candidate row) ``+ k@(Wk−Wd)`` (once per *user* row, shared by all
its candidates) ``+ (q⊙k)@Wp`` — never materialising the ``(B, L, 4d)`` concat. No 1/sqrt(d)
scaling is applied (the caller scales ``w2``/``b2`` or the inputs if wanted).

Activation API (elementwise per hidden channel, so it fuses):

* ``"sigmoid"`` (DIN code), ``"relu"``, ``"identity"``: no parameters.
* ``"prelu"``: ``max(s, 0) + alpha·min(s, 0)``; ``alpha (H,)`` required.
* ``"dice"``: the paper's Dice in **eval form** with given statistics:
  ``p = sigmoid((s − dice_mean)/sqrt(dice_var + dice_eps))``, ``f = p·s + (1 − p)·alpha·s``;
  ``alpha, dice_mean, dice_var (H,)`` required (``BatchNorm1d(affine=False)`` running stats).
  Training-mode Dice needs batch statistics over the flattened B·L hidden rows, which is not
  elementwise; pass the statistics you want (e.g. running stats, or batch stats computed
  beforehand and detached) — gradients do not flow into ``dice_mean``/``dice_var``.

Gradients flow to query, keys, w1, b1, w2, b2 and alpha. Padding never contributes: padded keys
are replaced by 0 with ``torch.where`` before use.

Cross-check against FuxiCTR (R2), read at reczoo/FuxiCTR 0245987
``fuxictr/pytorch/layers/attentions/target_attention.py`` ``DIN_Attention`` and
``fuxictr/pytorch/layers/activations.py`` ``Dice``: FuxiCTR feeds ``cat([t, h, t−h, t⊙h])`` to an
MLP (hidden units, activation, then a bias-carrying ``Linear(·, 1)`` with no output activation),
multiplies the weights by the mask, optionally softmaxes (padding at −1e9) and returns
``Σ_l w_l·h_l``. With one hidden layer this is exactly our math: same input layout and order, same
no-softmax default. Its ``Dice`` is ``p = sigmoid(BatchNorm1d(affine=False, eps=1e-9)(x))``,
``p·x + alpha·(1−p)·x``; in eval mode that is our ``"dice"`` with ``dice_mean/dice_var`` = the BN
running stats and ``dice_eps`` = its eps. Two deliberate differences: (1) with ``softmax=True`` a
row with no real behavior gives 0 here, while FuxiCTR's −1e9 fill gives a uniform average of the
padding rows; (2) FuxiCTR's training-mode Dice takes batch statistics over all B·L rows,
padding included; this op never lets padding influence anything. Not run side by side (FuxiCTR
is not installed here); the comparison is by reading the code.
"""

from __future__ import annotations

from typing import Literal

import torch

from triton_kernels.reference._common import check, compute_dtype, gather_user_rows

__all__ = ["ACTIVATIONS", "Activation", "apply_activation", "target_attention"]

Activation = Literal["sigmoid", "relu", "identity", "prelu", "dice"]
ACTIVATIONS: tuple[str, ...] = ("sigmoid", "relu", "identity", "prelu", "dice")


def apply_activation(
    s: torch.Tensor,  # (..., H)
    activation: str,
    alpha: torch.Tensor | None,
    dice_mean: torch.Tensor | None,
    dice_var: torch.Tensor | None,
    dice_eps: float,
) -> torch.Tensor:
    """The elementwise hidden activation of :func:`target_attention`."""
    if activation == "sigmoid":
        return torch.sigmoid(s)
    if activation == "relu":
        return torch.relu(s)
    if activation == "identity":
        return s
    if activation == "prelu":
        check(alpha is not None, "activation='prelu' needs alpha (H,)")
        assert alpha is not None  # narrowing for mypy: check() raised otherwise
        return torch.clamp(s, min=0) + alpha.to(s.dtype) * torch.clamp(s, max=0)
    if activation == "dice":
        check(alpha is not None and dice_mean is not None and dice_var is not None,
              "activation='dice' needs alpha, dice_mean and dice_var (H,)")
        assert alpha is not None and dice_mean is not None and dice_var is not None  # as above
        inv_std = torch.rsqrt(dice_var.to(s.dtype) + dice_eps)
        p = torch.sigmoid((s - dice_mean.to(s.dtype)) * inv_std)
        return p * s + (1 - p) * alpha.to(s.dtype) * s
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def check_target_attention_shapes(query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor,
                                  user_index: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
                                  w2: torch.Tensor, b2: torch.Tensor, activation: str,
                                  params: tuple[torch.Tensor | None, ...]) -> None:
    """Shared argument validation (the Triton launcher calls it too)."""
    check(query.dim() == 2, f"query must be (B, d), got {tuple(query.shape)}")
    b, d = query.shape
    check(keys.dim() == 3 and keys.shape[2] == d, f"keys must be (U, L, {d}), got {tuple(keys.shape)}")
    u, length, _ = keys.shape
    check(tuple(mask.shape) == (u, length), f"mask must be ({u}, {length}), got {tuple(mask.shape)}")
    check(tuple(user_index.shape) == (b,), f"user_index must be ({b},), got {tuple(user_index.shape)}")
    check(w1.dim() == 2 and w1.shape[0] == 4 * d, f"w1 must be ({4 * d}, H), got {tuple(w1.shape)}")
    h = w1.shape[1]
    check(tuple(b1.shape) == (h,), f"b1 must be ({h},), got {tuple(b1.shape)}")
    check(tuple(w2.shape) == (h,), f"w2 must be ({h},), got {tuple(w2.shape)}")
    check(b2.numel() == 1, f"b2 must hold one value, got {tuple(b2.shape)}")
    check(activation in ACTIVATIONS, f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    for p in params:
        check(p is None or tuple(p.shape) == (h,), f"activation parameters must be ({h},)")


def target_attention(
    query: torch.Tensor,  # (B, d)
    keys: torch.Tensor,  # (U, L, d)
    mask: torch.Tensor,  # (U, L) bool
    user_index: torch.Tensor,  # (B,) int64
    w1: torch.Tensor,  # (4d, H)
    b1: torch.Tensor,  # (H,)
    w2: torch.Tensor,  # (H,)
    b2: torch.Tensor,  # (1,)
    *,
    activation: Activation = "sigmoid",
    alpha: torch.Tensor | None = None,  # (H,) prelu / dice slope
    dice_mean: torch.Tensor | None = None,  # (H,) dice statistics (eval form)
    dice_var: torch.Tensor | None = None,  # (H,)
    dice_eps: float = 1e-8,
    softmax: bool = False,
    upcast: bool = False,
) -> torch.Tensor:  # (B, d)
    """DIN target attention; see the module docstring for math, activation API and shapes."""
    check_target_attention_shapes(query, keys, mask, user_index, w1, b1, w2, b2, activation,
                                  (alpha, dice_mean, dice_var))
    dtype = compute_dtype(query, upcast)
    b, d = query.shape
    q = query.to(dtype)
    real = mask.to(torch.bool)
    k_user = torch.where(real.unsqueeze(-1), keys.to(dtype), torch.zeros((), dtype=dtype,
                                                                         device=keys.device))
    wq, wk, wd, wp = torch.split(w1.to(dtype), d, dim=0)  # each (d, H)
    hq = q @ (wq + wd) + b1.to(dtype)  # (B, H): once per candidate
    hk = gather_user_rows(k_user @ (wk - wd), user_index)  # (B, L, H): once per user row
    k = gather_user_rows(k_user, user_index)  # (B, L, d)
    hidden = hq.unsqueeze(1) + hk + (q.unsqueeze(1) * k) @ wp  # (B, L, H)
    act = apply_activation(hidden, activation, alpha, dice_mean, dice_var, dice_eps)
    score = act @ w2.to(dtype) + b2.to(dtype).reshape(())  # (B, L)
    real_b = gather_user_rows(real, user_index)  # (B, L)
    if softmax:
        score = score.masked_fill(~real_b, float("-inf"))
        row_max = score.max(dim=-1, keepdim=True).values.detach()
        row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        e = torch.exp(score - row_max)
        denom = e.sum(-1, keepdim=True)
        weight = e / torch.where(denom > 0, denom, torch.ones_like(denom))  # (B, L)
    else:
        weight = torch.where(real_b, score, torch.zeros_like(score))  # (B, L)
    return torch.einsum("bl,bld->bd", weight, k)  # (B, d)
