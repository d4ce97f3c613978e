"""DARE search-then-aggregate (top-K soft search), pure torch reference (STYLE R2 oracle).

Math (papers.md §3(a), §5 pitfalls 13–15). For candidate row b with user row u = user_index[b]::

    logit[b, l] = query[b] · keys[u, l] + pos_logits[l]      (pos_logits optional)
    logit[b, l] = -inf where not mask[u, l]
    top_idx[b]  = the K largest logits                      (hard selection, not differentiated)
    w[b, k]     = softmax over the K selected logits          (re-normalised over K only)
    out[b]      = Σ_k w[b, k] · values[u, top_idx[b, k]]

``keys`` are the behaviors' *attention* embeddings and ``values`` their *representation*
embeddings (two decoupled tables); ``pos_logits`` is the separately learned relative-position
term of the DARE code (its time dot-product), already reduced to one scalar per position (the
caller scales it, e.g. ``⟨a_t^time, a_i^time⟩/sqrt(d_time)``; any 1/sqrt(d) on the semantic term
is folded into ``query`` by the caller).

Conventions, shared exactly by the Triton kernel so integer outputs match bit for bit:

* **Order and ties.** The K slots are sorted by logit, descending; equal logits are broken by the
  smaller behavior index first (index 0 = most recent behavior, so recency wins ties).
* **Short rows.** When row u has fewer than K real behaviors, the extra slots get
  ``top_idx = -1`` and ``top_weight = 0`` and contribute nothing (a row with 0 behaviors gives
  ``out = 0``). Padding never reaches any output or gradient.
* **Gradients** reach ``query``, ``keys`` and ``pos_logits`` through the K selected logits and
  ``values`` through the weighted sum; the top-K choice itself is piecewise constant.
  ``top_weights`` is returned **detached** (inspection/logging only); differentiate ``out``.

Implementation: the full ``(B, L)`` logit matrix is materialised (the reference is an oracle,
not the long-L serving path; the Triton kernel tiles over L). Top-K uses a stable descending
sort so the tie rule above holds.
"""

from __future__ import annotations

import torch

from triton_kernels.reference._common import check, compute_dtype, gather_user_rows

__all__ = ["dare_search"]


def _check_shapes(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                  user_index: torch.Tensor, pos_logits: torch.Tensor | None, top_k: int) -> None:
    check(query.dim() == 2, f"query must be (B, da), got {tuple(query.shape)}")
    b, da = query.shape
    check(keys.dim() == 3 and keys.shape[2] == da, f"keys must be (U, L, {da}), got {tuple(keys.shape)}")
    u, length, _ = keys.shape
    check(values.dim() == 3 and tuple(values.shape[:2]) == (u, length),
          f"values must be ({u}, {length}, dr), got {tuple(values.shape)}")
    check(tuple(mask.shape) == (u, length), f"mask must be ({u}, {length}), got {tuple(mask.shape)}")
    check(tuple(user_index.shape) == (b,), f"user_index must be ({b},), got {tuple(user_index.shape)}")
    check(pos_logits is None or tuple(pos_logits.shape) == (length,),
          f"pos_logits must be ({length},) or None")
    check(1 <= top_k <= length, f"top_k must be in [1, L={length}], got {top_k}")


def _stable_topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``k`` of a stable descending sort (ties: smaller index first), without sorting L.

    ``torch.topk`` finds the k-th value; every element above it is selected, then the first
    ``k − #above`` elements equal to it in index order; only those k are sorted (stably). Same
    result as ``torch.sort(stable=True)[:, :k]``, O(L) instead of O(L log L) per row.
    """
    b = logits.shape[0]
    thr = torch.topk(logits, k, dim=-1, sorted=True).values[:, -1:]  # (B, 1) the k-th largest
    above = logits > thr  # (B, L)
    ties = logits == thr  # (B, L)
    need = k - above.sum(-1, keepdim=True)  # (B, 1) ties to take, in index order
    if bool((ties.sum(-1, keepdim=True) == need).all()):  # usual case: no surplus ties at the k-th value
        chosen = above | ties
    else:
        chosen = above | (ties & (torch.cumsum(ties, dim=-1) <= need))  # exactly k per row
    idx = chosen.nonzero()[:, 1].view(b, k)  # (B, K) ascending positions
    vals = logits.gather(1, idx)
    sorted_vals, order = torch.sort(vals, dim=-1, descending=True, stable=True)
    return sorted_vals, idx.gather(1, order)


def dare_search(
    query: torch.Tensor,  # (B, da) candidate attention embedding
    keys: torch.Tensor,  # (U, L, da) behavior attention embeddings
    values: torch.Tensor,  # (U, L, dr) behavior representation embeddings
    mask: torch.Tensor,  # (U, L) bool, True = real behavior
    user_index: torch.Tensor,  # (B,) int64 in [0, U)
    pos_logits: torch.Tensor | None,  # (L,) float or None
    *,
    top_k: int,
    upcast: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # out (B, dr), top_idx (B, K) int64, w (B, K)
    """Top-K soft search; see module docstring for the exact conventions."""
    _check_shapes(query, keys, values, mask, user_index, pos_logits, top_k)
    dtype = compute_dtype(query, upcast)
    b = query.shape[0]
    q = query.to(dtype)
    real = gather_user_rows(mask.to(torch.bool), user_index)  # (B, L)
    with torch.no_grad():  # selection: piecewise constant, not differentiated
        if keys.shape[0] == 1:  # serving: one user, a plain (B, da) @ (da, L) matmul
            logits = q.float() @ keys[0].float().t()  # (B, L) fp32
        else:
            k_rows = gather_user_rows(keys, user_index)  # (B, L, da)
            logits = torch.einsum("bd,bld->bl", q.float(), k_rows.float())  # (B, L) fp32
        if pos_logits is not None:
            logits = logits + pos_logits.float().view(1, -1)
        logits = logits.masked_fill(~real, float("-inf"))
        sorted_top, top = _stable_topk(logits, top_k)  # (B, K) each
        valid = torch.isfinite(sorted_top)  # (B, K): a real behavior was selected
        safe_idx = torch.where(valid, top, torch.zeros_like(top))
        top_idx = torch.where(valid, top, torch.full_like(top, -1))
    users = user_index.view(b, 1)
    keep = valid.unsqueeze(-1)  # (B, K, 1); `where`, not a product, so NaN padding cannot leak
    k_sel = torch.where(keep, keys.to(dtype)[users, safe_idx], 0.0)  # (B, K, da)
    v_sel = torch.where(keep, values.to(dtype)[users, safe_idx], 0.0)  # (B, K, dr)
    sel_logits = (q.unsqueeze(1) * k_sel).sum(-1)  # (B, K), differentiable
    if pos_logits is not None:
        sel_logits = sel_logits + torch.where(valid, pos_logits.to(dtype)[safe_idx], 0.0)
    sel_logits = sel_logits.masked_fill(~valid, float("-inf"))
    row_max = sel_logits.max(dim=-1, keepdim=True).values.detach()  # (B, 1)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    e = torch.exp(sel_logits - row_max)  # (B, K), 0 on invalid slots
    denom = e.sum(-1, keepdim=True)
    w = torch.where(denom > 0, e / torch.where(denom > 0, denom, torch.ones_like(denom)), torch.zeros_like(e))
    out = torch.einsum("bk,bkd->bd", w, v_sel)  # (B, dr)
    return out, top_idx, w.detach()
