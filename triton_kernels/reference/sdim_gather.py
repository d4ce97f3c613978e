"""SDIM candidate-side gather, pure torch reference (STYLE R2 oracle).

Math (papers.md §2(a) 3–4, §5 pitfall 7): for candidate row b with codes ``c_g`` (g < G) and
user row ``u = user_index[b]``::

    v_g    = sums[u, g, c_g, :]                          # the collided-behavior sum u_g
    v̂_g    = v_g / max(‖v_g‖₂, eps)                       # ℓ2 normalisation, empty bucket → 0
    out[b] = (1/G) · Σ_g v̂_g

**Normalisation choice: ℓ2 norm, not count.** The paper ℓ2-normalises each group's collided sum
(papers.md §2(a) 3: "û_g = u_g / ‖u_g‖₂"; dividing by the count would be ℓ1-style mean pooling,
which the authors reportedly found worse). ``counts`` are therefore not needed here; they are
kept in the bucket table for serving diagnostics and incremental updates. An empty bucket has
``v_g = 0`` and ``v̂_g = 0`` (the paper does not say). Precisely: ``v̂_g = v_g/‖v_g‖`` when
``‖v_g‖ > eps`` (``eps = 1e-12``) and ``0`` otherwise, so an empty bucket yields exactly 0 with a
zero gradient (``F.normalize``'s ``v/max(‖v‖, eps)`` would give the same value but a 1e12-scaled
gradient into an empty bucket).

Cross-check against FuxiCTR (R2), ``model_zoo/LongCTR/SDIM/SDIM.py`` ``lsh_attentioin`` read at
reczoo/FuxiCTR 5c0c308 (by reading, not run side by side): FuxiCTR sums the collided history rows
per (hash group, sample) with ``embedding_bag(mode='sum')``, optionally applies ``F.normalize``
(ℓ2, eps 1e-12, flag ``l2_norm`` whose default is False) and takes ``.mean(0)`` over the hash
groups. Our output equals FuxiCTR's with ``l2_norm=True`` (the paper's choice); FuxiCTR's default
``l2_norm=False`` gives the un-normalised mean, which is not the paper. Gradients: FuxiCTR's
embedding_bag gives the history rows a gradient and the target none; here ``sums`` gets the
gradient (and through :func:`sdim_bucket_sums` the history), and ``cand_codes`` none — identical.
"""

from __future__ import annotations

import torch

from triton_kernels.reference._common import check, compute_dtype

__all__ = ["SDIM_NORM_EPS", "sdim_gather"]

SDIM_NORM_EPS = 1e-12  # same guard as torch.nn.functional.normalize


def sdim_gather(
    sums: torch.Tensor,  # (U, G, C, d) float, C = 2**hash_bits
    counts: torch.Tensor,  # (U, G, C) int32 (shape-checked only; see module docstring)
    cand_codes: torch.Tensor,  # (B, G) int64 in [0, C)
    user_index: torch.Tensor,  # (B,) int64 in [0, U)
    *,
    upcast: bool = False,
) -> torch.Tensor:  # (B, d), dtype of sums (fp32 when upcast)
    """Mean over groups of the ℓ2-normalised bucket each candidate hashes into."""
    check(sums.dim() == 4, f"sums must be (U, G, C, d), got {tuple(sums.shape)}")
    u, g, c, d = sums.shape
    check(tuple(counts.shape) == (u, g, c), f"counts must be ({u}, {g}, {c}), got {tuple(counts.shape)}")
    check(cand_codes.dim() == 2 and cand_codes.shape[1] == g,
          f"cand_codes must be (B, {g}), got {tuple(cand_codes.shape)}")
    b = cand_codes.shape[0]
    check(tuple(user_index.shape) == (b,), f"user_index must be ({b},), got {tuple(user_index.shape)}")
    dtype = compute_dtype(sums, upcast)
    groups = torch.arange(g, device=sums.device)
    v = sums[user_index.view(b, 1), groups.view(1, g), cand_codes].to(dtype)  # (B, G, d)
    sq = (v.float() * v.float()).sum(-1, keepdim=True)  # (B, G, 1) fp32
    nonempty = sq > SDIM_NORM_EPS * SDIM_NORM_EPS
    inv = torch.where(nonempty, torch.rsqrt(torch.where(nonempty, sq, torch.ones_like(sq))),
                      torch.zeros_like(sq)).to(dtype)  # (B, G, 1); 0 for an empty bucket
    return (v * inv).mean(dim=1)  # (B, d)
