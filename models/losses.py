"""``RankerTrain``: the training wrapper that owns the loss (STYLE R10, torchrec's ``DLRMTrain``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.features import Batch
from models.ranker import Ranker

__all__ = ["RankerTrain"]


class RankerTrain(nn.Module):
    """Loss = BCE-with-logits + the ranker's auxiliary losses + DIN's mini-batch-aware L2.

    Auxiliary losses come weighted from the long module (DARE: the full-attention head;
    DiffuMIN: λ1·diffusion + λ2·contrastive). With ``config.mba_l2 = λ > 0`` the DIN paper's
    mini-batch-aware regulariser is added: ``(λ/2)·Σ_{j in batch} ‖w_j‖² / n_j`` over the item and
    category rows that occur in the batch (history and candidates), where ``n_j`` is the running
    count of id ``j`` over all batches seen so far (papers.md §1(a), pitfall 26: a stream has no
    global frequencies, so running counts stand in). The counts are buffers of this wrapper.
    The component losses of the last step are in :attr:`last_components` (floats, for logging).

    Args:
        ranker (Ranker): the model to train.

    Example:
        >>> from models.ranker import build_ranker
        >>> from models.features import FeatureSpec
        >>> ranker = build_ranker("din", FeatureSpec(seq_len=4, item_buckets=16, category_buckets=4))
        >>> ids = torch.tensor([[1, 2, 0, 0], [3, 0, 0, 0]])
        >>> batch = Batch(ids, ids % 3, ids, ids > 0, torch.tensor([4, 5]), torch.tensor([1, 2]),
        ...               torch.tensor([0, 1]))
        >>> loss, (l, logits, labels) = RankerTrain(ranker)(batch, torch.tensor([1.0, 0.0]))
        >>> assert loss.dim() == 0 and logits.shape == (2,)
    """

    item_counts: torch.Tensor  # buffers, registered in __init__ only when config.mba_l2 > 0
    category_counts: torch.Tensor

    def __init__(self, ranker: Ranker) -> None:
        super().__init__()
        self.ranker = ranker
        self.last_components: dict[str, float] = {}
        spec = ranker.config.features
        if ranker.config.mba_l2 > 0:
            self.register_buffer("item_counts", torch.zeros(spec.item_buckets))
            self.register_buffer("category_counts", torch.zeros(spec.category_buckets))

    def _mba_term(self, table: torch.Tensor, counts: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        rows, occurrences = torch.unique(ids[ids > 0], return_counts=True)
        if self.training:
            counts.index_add_(0, rows, occurrences.to(counts.dtype))
        n = counts[rows].clamp(min=1.0)
        return (table[rows].pow(2).sum(-1) / n).sum()

    def mba_l2(self, batch: Batch) -> torch.Tensor:
        """The mini-batch-aware L2 term (already multiplied by λ/2)."""
        emb = self.ranker.embedding
        hist = batch.hist_mask
        items = torch.cat([batch.hist_item[hist], batch.cand_item])
        cats = torch.cat([batch.hist_cat[hist], batch.cand_cat])
        total = self._mba_term(emb.item.weight, self.item_counts, items)
        total = total + self._mba_term(emb.category.weight, self.category_counts, cats)
        return 0.5 * self.ranker.config.mba_l2 * total

    def forward(self, batch: Batch, labels: torch.Tensor
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """labels (B,) in {0, 1} → (loss, (loss.detach(), logits.detach(), labels.detach()))."""
        logits, aux = self.ranker.logits_and_aux(batch, labels)
        labels_f = labels.to(logits.dtype)
        bce = F.binary_cross_entropy_with_logits(logits, labels_f)
        loss = bce
        components = {"bce": bce}
        for name, value in aux.items():
            loss = loss + value
            components[name] = value
        if self.ranker.config.mba_l2 > 0:
            mba = self.mba_l2(batch)
            loss = loss + mba
            components["mba_l2"] = mba
        self.last_components = {k: float(v.detach()) for k, v in components.items()}
        return loss, (loss.detach(), logits.detach(), labels.detach())
