"""One feature function for training and serving (DESIGN.md §3): :func:`build_batch`.

The trainer calls it with each sample's history as of ``seq_pos``; the scorer with the user's live
history and all candidates of a request. Same code, same tensors: that is what rules out
train/serve skew (a test asserts identical tensors for identical inputs).

Layout of a :class:`Batch`:

- Histories are per *history row* U, candidates per *candidate row* B, and ``user_index`` (B,)
  maps each candidate row to its history row. Training: U == B, ``user_index = arange(B)``.
  Serving: U == 1 and B = number of candidates, so the user's sequence is encoded once.
- Histories are **most recent first** (column 0 = newest behavior) and padded at the end;
  ``hist_mask`` is True on real behaviors. The short-term window of a ranker is simply the first
  ``short_len`` columns.
- Ids are folded from the store's 63-bit hashes into sized tables: ``1 + id % (buckets - 1)``;
  0 is reserved for padding, so a padded slot can never alias a real id.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch

from pipeline.state.base import Behaviors

__all__ = ["Batch", "FeatureSpec", "build_batch", "fold_ids"]


@dataclass(frozen=True)
class FeatureSpec:
    """How raw store reads become tensors. Saved with every model; serving rebuilds it from there."""

    seq_len: int = 1000  # behaviors read per history (the long-sequence window); >= 1
    item_buckets: int = 1 << 20  # item embedding table rows (row 0 = padding)
    category_buckets: int = 1 << 14  # category embedding table rows (row 0 = padding)
    action_buckets: int = 8  # action ids are small ints from pipeline.events.ACTIONS (0 = padding)

    def __post_init__(self) -> None:
        if self.seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {self.seq_len}")
        for f in ("item_buckets", "category_buckets", "action_buckets"):
            if getattr(self, f) < 2:
                raise ValueError(f"{f} must be >= 2")

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict[str, int]) -> FeatureSpec:
        names = {f.name for f in fields(FeatureSpec)}
        return FeatureSpec(**{k: v for k, v in d.items() if k in names})


@dataclass
class Batch:
    """Model input. Shapes: U history rows, L history columns, B candidate rows."""

    hist_item: torch.Tensor  # (U, L) int64 folded ids, 0 = padding
    hist_cat: torch.Tensor  # (U, L) int64
    hist_action: torch.Tensor  # (U, L) int64
    hist_mask: torch.Tensor  # (U, L) bool, True = real behavior
    cand_item: torch.Tensor  # (B,) int64
    cand_cat: torch.Tensor  # (B,) int64
    user_index: torch.Tensor  # (B,) int64 into U

    def to(self, device: torch.device | str) -> Batch:
        return Batch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    @property
    def num_candidates(self) -> int:
        return int(self.cand_item.shape[0])

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def fold_ids(ids: np.ndarray, buckets: int) -> np.ndarray:
    """Fold 63-bit hashed ids into ``[1, buckets)``; 0 stays reserved for padding."""
    ids = np.asarray(ids, dtype=np.int64)
    return (ids % (buckets - 1)) + 1


def build_batch(
    histories: Sequence[Behaviors],
    cand_item: np.ndarray | Sequence[int],
    cand_cat: np.ndarray | Sequence[int],
    spec: FeatureSpec,
    user_index: np.ndarray | Sequence[int] | None = None,
) -> Batch:
    """Tensors for ``len(histories)`` history rows and ``len(cand_item)`` candidate rows.

    Args:
        histories: store reads, oldest first (as :meth:`SequenceStore.read` returns them); only the
            last ``spec.seq_len`` of each are used.
        cand_item, cand_cat: raw 63-bit hashed candidate ids (``pipeline.events.hash_id``).
        spec: the model's :class:`FeatureSpec`.
        user_index: history row of each candidate; defaults to ``arange`` (requires U == B).
    """
    u = len(histories)
    ci = np.asarray(cand_item, dtype=np.int64)
    cc = np.asarray(cand_cat, dtype=np.int64)
    if ci.shape != cc.shape or ci.ndim != 1:
        raise ValueError("cand_item and cand_cat must be 1-D arrays of equal length")
    if user_index is None:
        if u != ci.shape[0]:
            raise ValueError(f"user_index omitted but {u} histories != {ci.shape[0]} candidates")
        uidx = np.arange(u, dtype=np.int64)
    else:
        uidx = np.asarray(user_index, dtype=np.int64)
        if uidx.shape != ci.shape or (uidx.size and (uidx.min() < 0 or uidx.max() >= u)):
            raise ValueError("user_index must have one entry per candidate, each in [0, len(histories))")
    lens = [min(len(h), spec.seq_len) for h in histories]
    width = max(1, max(lens, default=0))
    items = np.zeros((u, width), dtype=np.int64)
    cats = np.zeros((u, width), dtype=np.int64)
    acts = np.zeros((u, width), dtype=np.int64)
    mask = np.zeros((u, width), dtype=bool)
    for r, (h, n) in enumerate(zip(histories, lens, strict=True)):
        if n == 0:
            continue
        # newest first: reverse the last n behaviors
        items[r, :n] = fold_ids(h.item[-n:][::-1], spec.item_buckets)
        cats[r, :n] = fold_ids(h.category[-n:][::-1], spec.category_buckets)
        acts[r, :n] = np.minimum(h.action[-n:][::-1].astype(np.int64), spec.action_buckets - 1)
        mask[r, :n] = True
    return Batch(
        hist_item=torch.from_numpy(items),
        hist_cat=torch.from_numpy(cats),
        hist_action=torch.from_numpy(acts),
        hist_mask=torch.from_numpy(mask),
        cand_item=torch.from_numpy(fold_ids(ci, spec.item_buckets)),
        cand_cat=torch.from_numpy(fold_ids(cc, spec.category_buckets)),
        user_index=torch.from_numpy(uidx),
    )
