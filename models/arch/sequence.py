"""Long-sequence modules: SDIM hash sampling and DARE decoupled top-K search.

Every long-sequence module has the same two-step interface, which is what lets the scorer encode a
user once and score hundreds of candidates against it:

- ``encode(hist_emb (U, L, d), batch) -> dict[str, Tensor]``: the per-history-row work, done once
  per user (SDIM: hash codes → bucket sums; DARE: attention keys);
- ``forward(encoded, target (B, d), batch, labels=None) -> (features (B, out_dim), aux_losses)``:
  the per-candidate work. ``aux_losses`` is filled only in training when ``labels`` are given.

``hist_emb`` is the ranker's shared item embedding of the history (most recent first, padded at the
end); ``batch`` supplies the mask, ids and ``user_index``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.arch.layers import EMBEDDING_INIT_STD, MLP, BatchNorm
from models.base import Backend, BackendModule
from models.config import DAREConfig, SDIMConfig
from models.features import Batch, FeatureSpec
from triton_kernels import dare_search, sdim_bucket_sums, sdim_gather, sdim_hash

__all__ = ["DARESequenceArch", "SDIMSequenceArch", "dare_position_buckets", "full_softmax_attention"]


class SDIMSequenceArch(BackendModule):
    """SDIM: multi-round SimHash sampling over the long sequence (papers.md §2(a)).

    A fixed random projection ``R (d, G·τ)`` (seeded, a buffer: saved with the model and identical
    in training and serving; pitfalls 5, 8) gives every embedding ``G`` τ-bit codes. Per user the
    behaviors are summed per (group, code) bucket once (the BSE step, pitfall 10); a candidate
    then gathers, per group, the bucket it hashes into, ℓ2-normalises it (empty bucket → 0,
    pitfall 7) and averages over groups. No parameters: gradients reach the behavior embeddings
    through the sums, none reach the candidate (pitfall 9 — the ranker keeps the target in the
    MLP input and the short attention).

    Args:
        dim (int): behavior/candidate embedding width d.
        config (SDIMConfig): ``num_hashes`` G, ``hash_bits`` τ, projection ``seed``.

    Example:
        >>> arch = SDIMSequenceArch(8, SDIMConfig(num_hashes=4, hash_bits=2))
        >>> hist, mask = torch.randn(2, 10, 8), torch.ones(2, 10, dtype=torch.bool)
        >>> batch = Batch(*(torch.zeros(2, 10, dtype=torch.long),) * 3, mask,
        ...               torch.ones(3, dtype=torch.long), torch.ones(3, dtype=torch.long),
        ...               torch.tensor([0, 1, 1]))
        >>> out, aux = arch(arch.encode(hist, batch), torch.randn(3, 8), batch)
        >>> assert out.shape == (3, 8)
    """

    projection: torch.Tensor  # (d, G·τ) buffer, registered in __init__

    def __init__(self, dim: int, config: SDIMConfig) -> None:
        super().__init__()
        self.config = config
        self.out_dim = dim
        gen = torch.Generator().manual_seed(config.seed)
        projection = torch.randn(dim, config.num_hashes * config.hash_bits, generator=gen)  # (d, G·τ)
        self.register_buffer("projection", projection)

    def codes(self, emb: torch.Tensor) -> torch.Tensor:
        """Bucket codes of ``emb (N, L, d)`` → ``(N, L, G)`` int64 in ``[0, 2**τ)``."""
        return sdim_hash(emb, self.projection, num_hashes=self.config.num_hashes,
                         hash_bits=self.config.hash_bits, backend=self.backend)

    def bucket_table(self, emb: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-user bucket sums ``(U, G, 2**τ, d)`` and counts ``(U, G, 2**τ)`` of ``emb``."""
        codes = self.codes(emb)  # (U, L, G)
        sums, counts = sdim_bucket_sums(emb, codes, mask, hash_bits=self.config.hash_bits,
                                        backend=self.backend)
        return {"sdim_sums": sums, "sdim_counts": counts}

    def encode(self, hist_emb: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        if self.training:
            # Training: every candidate row has its own history (U == B), so building all G·2**τ
            # buckets per row wastes 2**τ× the work; keep codes and gather per candidate instead
            # (same math as table + gather; see ``_direct``).
            return {"sdim_emb": hist_emb, "sdim_codes": self.codes(hist_emb), "sdim_mask": batch.hist_mask}
        return self.bucket_table(hist_emb, batch.hist_mask)

    def _direct(self, encoded: dict[str, torch.Tensor], cand_codes: torch.Tensor,
                user_index: torch.Tensor) -> torch.Tensor:
        """Per-candidate bucket sums without the table: Σ_l [code_l,g == cand_g]·e_l, ℓ2-normalised,
        averaged over groups; equal to ``sdim_gather(bucket_table(...))`` (tested)."""
        emb, codes, mask = encoded["sdim_emb"], encoded["sdim_codes"], encoded["sdim_mask"]
        b = user_index.shape[0]
        if not (emb.shape[0] == b and torch.equal(user_index, torch.arange(b, device=user_index.device))):
            emb = emb.index_select(0, user_index)  # (B, L, d)
            codes = codes.index_select(0, user_index)  # (B, L, G)
            mask = mask.index_select(0, user_index)  # (B, L)
        match = (codes == cand_codes.unsqueeze(1)) & mask.unsqueeze(-1)  # (B, L, G)
        sums = torch.bmm(match.transpose(1, 2).to(emb.dtype), emb)  # (B, G, d)
        norm = sums.norm(dim=-1, keepdim=True)  # (B, G, 1)
        normed = torch.where(norm > 1e-12, sums / norm.clamp_min(1e-12), torch.zeros_like(sums))
        return normed.mean(dim=1)  # (B, d)

    def extend(self, encoded: dict[str, torch.Tensor], new_emb: torch.Tensor, new_mask: torch.Tensor,
               evicted_emb: torch.Tensor | None = None,
               evicted_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The bucket table with new behaviors ``new_emb (U, n, d)`` added and, when the window
        slides, the behaviors that fell out of it ``evicted_emb (U, e, d)`` subtracted (sums and
        counts are additive). A bucket whose count drops to 0 gets an exact zero sum, so rounding
        residue cannot turn an empty bucket into a unit vector at gather time."""
        new = self.bucket_table(new_emb, new_mask)
        sums = encoded["sdim_sums"] + new["sdim_sums"]
        counts = encoded["sdim_counts"] + new["sdim_counts"]
        if evicted_emb is not None and evicted_emb.shape[1] > 0:
            mask = evicted_mask if evicted_mask is not None else torch.ones(
                evicted_emb.shape[:2], dtype=torch.bool, device=evicted_emb.device)
            old = self.bucket_table(evicted_emb, mask)
            counts = counts - old["sdim_counts"]
            sums = torch.where((counts > 0).unsqueeze(-1), sums - old["sdim_sums"],
                               torch.zeros((), dtype=sums.dtype, device=sums.device))
        return {"sdim_sums": sums, "sdim_counts": counts}

    def forward(self, encoded: dict[str, torch.Tensor], target: torch.Tensor, batch: Batch,
                labels: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cand_codes = self.codes(target.unsqueeze(1)).squeeze(1)  # (B, G)
        if "sdim_sums" not in encoded:
            return self._direct(encoded, cand_codes, batch.user_index), {}
        out = sdim_gather(encoded["sdim_sums"], encoded["sdim_counts"], cand_codes, batch.user_index,
                          backend=self.backend)  # (B, d)
        return out, {}


def dare_position_buckets(positions: torch.Tensor, exact: int) -> torch.Tensor:
    """Relative position (1 = most recent behavior, 0 = the target) → embedding id.

    Positions up to ``exact`` keep their own id (DARE's public setup: 1..200 exact); beyond, ids are
    log-spaced with 8 per doubling, so a 100,000-long lifelong sequence needs ~100 more rows
    instead of 100,000 mostly-untrained ones.
    """
    p = positions.to(torch.float64).clamp(min=1.0)
    log_ids = exact + torch.ceil(8.0 * torch.log2(p / exact)).to(torch.int64)
    return torch.where(positions <= exact, positions.to(torch.int64), log_ids)


def full_softmax_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                           mask: torch.Tensor, user_index: torch.Tensor,
                           pos_logits: torch.Tensor | None) -> torch.Tensor:
    """Softmax attention over every real behavior, the same logits as ``dare_search``:
    query (B, da), keys (U, L, da), values (U, L, dr), mask (U, L) → (B, dr); no row → 0."""
    k = keys.index_select(0, user_index)  # (B, L, da)
    logits = torch.einsum("bd,bld->bl", query, k)  # (B, L)
    if pos_logits is not None:
        logits = logits + pos_logits.view(1, -1)
    real = mask.index_select(0, user_index)  # (B, L)
    logits = logits.masked_fill(~real, float("-inf"))
    w = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # all-padding rows → 0
    v = values.index_select(0, user_index)  # (B, L, dr)
    v = torch.where(real.unsqueeze(-1), v, torch.zeros((), dtype=v.dtype, device=v.device))
    return torch.einsum("bl,bld->bd", w, v)


def _exact_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Positions ``(B, K)`` of the K largest logits per row, in ``dare_search``'s order: descending,
    equal logits by ascending position. Same result as ``sort(stable=True)[:, :K]`` on ``logits
    (B, L)`` (L a multiple of ``DARE_SERVE_CHUNK``, -inf padded), but only the ``K·DARE_SERVE_CHUNK``
    logits of the K chunks with the largest maxima are selected from (see
    :meth:`DARESequenceArch._serve_one_user`)."""
    b, length = logits.shape
    c = DARE_SERVE_CHUNK
    chunk_max = logits.view(b, length // c, c).amax(-1)  # (B, m)
    kc = min(k, chunk_max.shape[1])
    chunks = torch.topk(chunk_max, kc, dim=-1, sorted=False).indices.sort(dim=-1).values  # (B, kc)
    cols = (chunks.unsqueeze(-1) * c + torch.arange(c, device=logits.device)).view(b, kc * c)  # ascending
    cand = logits.gather(1, cols)  # (B, kc·c)
    vals, idx = torch.topk(cand, k, dim=-1, sorted=True)  # (B, K) descending
    thr = vals[:, -1:]  # (B, 1) the K-th value
    if bool((vals[:, :-1] > vals[:, 1:]).all()) and bool(((cand == thr).sum(-1) == 1).all()):
        top = cols.gather(1, idx)  # no equal logits anywhere in play: topk's order is the stable one
    else:  # the reference's tie rule: all above the K-th value, then its ties by position
        above, ties = cand > thr, cand == thr
        need = k - above.sum(-1, keepdim=True)
        chosen = above | (ties & (torch.cumsum(ties, dim=-1) <= need))  # exactly K per row
        inner = chosen.nonzero()[:, 1].view(b, k)  # (B, K) ascending
        order = torch.sort(cand.gather(1, inner), dim=-1, descending=True, stable=True).indices
        top = cols.gather(1, inner.gather(1, order))
    # Exact unless an unselected chunk reaches the K-th value (a tie across the chunk boundary):
    # redo those rows with a full stable sort.
    rest = chunk_max.scatter(1, chunks, float("-inf")).amax(-1, keepdim=True)  # (B, 1)
    unsure = (rest >= thr).squeeze(1)
    if bool(unsure.any()):
        rows = unsure.nonzero().squeeze(1)
        exact = torch.sort(logits.index_select(0, rows), dim=-1, descending=True, stable=True).indices
        top = top.index_copy(0, rows, exact[:, :k])
    return top


#: Chunk width of the scorer's exact top-K (:meth:`DARESequenceArch._serve_one_user`): the top K
#: of a row are searched inside the K chunks with the largest maxima, i.e. a stable sort of K·64
#: logits instead of a selection over all L. 64 measured fastest among 32/64/128 at L = 10,000,
#: K = 20, 200 candidates on the project's 2-core CPU.
DARE_SERVE_CHUNK = 64
#: Candidates per logit block in the same path: a (64, 10,000) fp32 block is 2.5 MB, so the matmul,
#: the position add and the chunk maxima run on cached data instead of streaming a (1000, 10,000)
#: 40 MB matrix three times.
DARE_SERVE_BLOCK = 64


class DARESequenceArch(BackendModule):
    """DARE: decoupled attention and representation embeddings with top-K search (papers.md §3).

    Two roles, each one set of tables shared by target and history (pitfall 13):

    - **attention**: own item/category tables (``attn_dim`` wide each, small) and a relative-position
      table. Search logit ``s_i = ⟨a_t, a_i⟩/sqrt(2·attn_dim) + ⟨p_0, p_i⟩/sqrt(attn_pos_dim)``
      (the official code's split semantic + time terms, pitfall 14);
    - **representation**: the ranker's shared item embedding (so it is also what the target, the
      short attention and the head see) concatenated with a representation position table.

    The hard top-K of ``s`` (``triton_kernels.dare_search``) is re-softmaxed over the K selected
    (pitfall 15) and pooled over representation vectors ``h``; the output is the target-aware
    representation ``[h, r_t ⊙ h]`` (pitfall 16; ``r_t`` itself is in the head input via the
    target embedding). In training the auxiliary head scores ``[r_t, h_full, r_t ⊙ h_full]`` with
    ``h_full`` a softmax over *all* behaviors under the same logits, so the attention tables get
    dense gradients (every shipped DARE script enables it).

    Args:
        dim (int): representation (shared item embedding) width d.
        features (FeatureSpec): table sizes and ``seq_len`` (sizes the position tables).
        config (DAREConfig): attention widths, position widths, ``top_k``, ``aux_weight``.

    Example:
        >>> spec = FeatureSpec(seq_len=12, item_buckets=50, category_buckets=9)
        >>> arch = DARESequenceArch(8, spec, DAREConfig(attn_dim=4, top_k=3))
        >>> ids = torch.randint(1, 9, (2, 12))
        >>> batch = Batch(ids, ids, ids, torch.ones(2, 12, dtype=torch.bool),
        ...               torch.tensor([3, 4]), torch.tensor([1, 2]), torch.tensor([0, 1]))
        >>> out, aux = arch(arch.encode(torch.randn(2, 12, 8), batch), torch.randn(2, 8), batch)
        >>> assert out.shape == (2, 2 * (8 + 16))
    """

    def __init__(self, dim: int, features: FeatureSpec, config: DAREConfig) -> None:
        super().__init__()
        self.config = config
        positions = int(dare_position_buckets(torch.tensor([features.seq_len]), config.exact_positions)) + 1
        self.attn_item = nn.Embedding(features.item_buckets, config.attn_dim, padding_idx=0)
        self.attn_cat = nn.Embedding(features.category_buckets, config.attn_dim, padding_idx=0)
        self.attn_pos = nn.Embedding(positions, config.attn_pos_dim)  # row 0 = the target
        self.repr_pos = nn.Embedding(positions, config.pos_dim)
        for table in (self.attn_item, self.attn_cat, self.attn_pos, self.repr_pos):
            nn.init.normal_(table.weight, 0.0, EMBEDDING_INIT_STD)  # DARE: N(0, 0.01), roles independent
        with torch.no_grad():
            self.attn_item.weight[0].zero_()
            self.attn_cat.weight[0].zero_()
        self.repr_dim = dim + config.pos_dim
        self.out_dim = 2 * self.repr_dim
        if config.aux_weight > 0:
            self.aux_norm = BatchNorm(3 * self.repr_dim)  # DARE code: BN → 200 → PReLU → 80 → PReLU
            self.aux_mlp = MLP(3 * self.repr_dim, (200, 80), "prelu")
            self.aux_out = nn.Linear(80, 1)

    def _positions(self, length: int, device: torch.device) -> torch.Tensor:
        cols = torch.arange(1, length + 1, device=device)  # column 0 = most recent = position 1
        ids = dare_position_buckets(cols, self.config.exact_positions)  # (L,)
        return ids.clamp(max=self.attn_pos.num_embeddings - 1)  # wider than seq_len: last bucket

    def encode(self, hist_emb: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        """Attention keys ``(U, L, 2·attn_dim)`` and representation embeddings ``(U, L, d)``."""
        keys = torch.cat([self.attn_item(batch.hist_item), self.attn_cat(batch.hist_cat)], dim=-1)
        return {"dare_keys": keys, "long_emb": hist_emb, "long_mask": batch.hist_mask}

    def _search_inputs(self, encoded: dict[str, torch.Tensor], target: torch.Tensor, batch: Batch
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        keys = encoded["dare_keys"]  # (U, L, da)
        u, length, da = keys.shape
        pos = self._positions(length, keys.device)
        pos_logits = self.attn_pos(pos) @ self.attn_pos.weight[0] / math.sqrt(self.config.attn_pos_dim)  # (L,)
        values = torch.cat([encoded["long_emb"],
                            self.repr_pos(pos).unsqueeze(0).expand(u, length, -1)], dim=-1)  # (U, L, dr)
        query = torch.cat([self.attn_item(batch.cand_item), self.attn_cat(batch.cand_cat)], dim=-1)
        query = query / math.sqrt(da)  # (B, da): the semantic 1/sqrt(d) folded into the query
        r_t = torch.cat([target, self.repr_pos.weight[0].expand(target.shape[0], -1)], dim=-1)  # (B, dr)
        return query, values, pos_logits, r_t

    def _serve_positions(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Position ids and position logits of ``length`` columns, as ``_search_inputs`` computes
        them, memoised for the last length while the position table is unchanged (its in-place
        version counter and storage identify it: an optimizer step or ``load_state_dict`` bumps
        the version). They depend only on the model, not on the user: a 10,000-row lookup and
        mat-vec saved per request."""
        w = self.attn_pos.weight
        key = (length, str(device), w.data_ptr(), w._version,  # noqa: SLF001
               torch.is_inference_mode_enabled(), torch.is_grad_enabled())  # no inference tensors in autograd
        memo = getattr(self, "_positions_memo", None)
        if memo is not None and memo[0] == key:
            return memo[1], memo[2]
        pos = self._positions(length, device)  # (L,)
        pos_logits = self.attn_pos(pos) @ w[0] / math.sqrt(self.config.attn_pos_dim)  # (L,)
        self._positions_memo = (key, pos, pos_logits)
        return pos, pos_logits

    def _serve_one_user(self, encoded: dict[str, torch.Tensor], target: torch.Tensor,
                        batch: Batch) -> torch.Tensor | None:
        """The scorer's path (eval, one history row, CPU, torch reference backend): the same
        values as ``dare_search`` + the aggregation below, without its O(B·L) passes beyond the
        logit matmul. Returns None when it does not apply (padding in the row, fewer than
        ``top_k`` behaviors): the caller then runs the general path.

        Exact top-K by chunk maxima: the logits ``(B, L)`` are cut into chunks of
        :data:`DARE_SERVE_CHUNK`; the top-K of a row lie in the K chunks with the largest maxima
        whenever every other chunk's maximum is strictly below the K-th selected value (checked per
        row; rows with a tie across that boundary take a full stable sort). Inside the selected
        chunks (in position order) a stable descending sort gives the reference's order and tie
        rule (higher logit first, then the more recent behavior). The selected logits, softmax and
        pooling repeat the reference's ops on the same operands, so the output equals it
        (tested against ``triton_kernels.reference.dare_search`` in
        ``tests/serving/test_fast_paths.py``, ties included).
        """
        keys, mask = encoded["dare_keys"], encoded["long_mask"]  # (1, L, da), (1, L)
        length, da = keys.shape[1], keys.shape[2]
        k = min(self.config.top_k, length)
        if length < k or not bool(mask.all()):
            return None
        b = target.shape[0]
        pos, pos_logits = self._serve_positions(length, keys.device)  # (L,), (L,)
        query = torch.cat([self.attn_item(batch.cand_item), self.attn_cat(batch.cand_cat)], dim=-1)
        q = query / math.sqrt(da)  # (B, da)
        # Logits (B, L) fp32 as the reference computes them, over keys padded to whole chunks with
        # zero keys whose position logit is -inf (never selected).
        pad = -length % DARE_SERVE_CHUNK
        keys_t = F.pad(keys[0].float(), (0, 0, 0, pad)).t().contiguous()  # (da, L')
        pos_row = F.pad(pos_logits.float(), (0, pad), value=float("-inf")).view(1, -1)  # (1, L')
        tops = []
        with torch.no_grad():  # selection: piecewise constant, not differentiated (as the reference)
            buf = torch.empty(min(b, DARE_SERVE_BLOCK), keys_t.shape[1])  # one logit block, reused
            for start in range(0, b, DARE_SERVE_BLOCK):  # candidate blocks: the logits stay in cache
                qb = q[start:start + DARE_SERVE_BLOCK].float()
                logits = torch.mm(qb, keys_t, out=buf[: qb.shape[0]])  # (b', L')
                logits += pos_row
                tops.append(_exact_top_k(logits, k))  # (b', K) positions < L
        top = torch.cat(tops) if len(tops) > 1 else tops[0]  # (B, K)
        k_sel = keys[0][top]  # (B, K, da)
        v_sel = torch.cat([encoded["long_emb"][0][top], self.repr_pos(pos[top])], dim=-1)  # (B, K, dr)
        sel_logits = (q.unsqueeze(1) * k_sel).sum(-1) + pos_logits[top]  # (B, K)
        row_max = sel_logits.max(dim=-1, keepdim=True).values
        e = torch.exp(sel_logits - row_max)
        w = e / e.sum(-1, keepdim=True)  # (B, K)
        h = torch.einsum("bk,bkd->bd", w, v_sel)  # (B, dr)
        r_t = torch.cat([target, self.repr_pos.weight[0].expand(b, -1)], dim=-1)  # (B, dr)
        return torch.cat([h, r_t * h], dim=-1)  # (B, 2·dr)

    def forward(self, encoded: dict[str, torch.Tensor], target: torch.Tensor, batch: Batch,
                labels: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if (not self.training and labels is None and encoded["dare_keys"].shape[0] == 1
                and target.device.type == "cpu" and self.backend is not Backend.TRITON):
            out = self._serve_one_user(encoded, target, batch)
            if out is not None:
                return out, {}
        query, values, pos_logits, r_t = self._search_inputs(encoded, target, batch)
        keys, mask = encoded["dare_keys"], encoded["long_mask"]
        top_k = min(self.config.top_k, keys.shape[1])
        h, _, _ = dare_search(query, keys, values, mask, batch.user_index, pos_logits, top_k=top_k,
                              backend=self.backend)  # (B, dr)
        aux: dict[str, torch.Tensor] = {}
        if labels is not None and self.training and self.config.aux_weight > 0:
            h_full = full_softmax_attention(query, keys, values, mask, batch.user_index, pos_logits)
            aux_in = self.aux_norm(torch.cat([r_t, h_full, r_t * h_full], -1))  # (B, 3·dr)
            aux_logit = self.aux_out(self.aux_mlp(aux_in)).squeeze(-1)
            aux["dare_aux"] = self.config.aux_weight * F.binary_cross_entropy_with_logits(
                aux_logit, labels.to(aux_logit.dtype))
        return torch.cat([h, r_t * h], dim=-1), aux  # (B, 2·dr)
