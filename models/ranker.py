"""The ranker: shared item embedding + short-window DIN + long-sequence module + MLP head.

Presets (:data:`PRESETS`) differ only in the long-sequence module, as in the SDIM paper's fairness
protocol (same features, same short attention, same head):

========== ==================================================================================
``din``       DIN on the last 50 behaviors only (paper: Dice, no softmax, MBA L2).
``din_long``  + DIN full target attention over the whole sequence (softmax): the ceiling.
``sdim``      + SDIM hash sampling over the whole sequence (G=16, τ=3).
``dare``      + DARE decoupled top-K search (K=20) with the auxiliary full-attention loss.
``diffumin``  + DiffuMIN orthogonal multi-interest extraction, diffusion augmentation, CMIC.
========== ==================================================================================

Inputs are :class:`models.features.Batch` (U history rows, B candidate rows, ``user_index``). The
scorer's pattern: ``enc = ranker.encode(batch)`` once per user, then ``ranker(batch, encoded=enc)``
for all candidates; the logits are identical to ``ranker(batch)``.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, cast

import torch

from models.arch.attention import DiffuMINArch, DINAttention, DINLongArch
from models.arch.layers import ItemEmbedding
from models.arch.over import OverArch
from models.arch.sequence import DARESequenceArch, SDIMSequenceArch
from models.base import BackendModule
from models.config import DAREConfig, DiffuMINConfig, DINConfig, RankerConfig, SDIMConfig
from models.features import Batch, FeatureSpec

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

__all__ = ["PRESETS", "Ranker", "build_ranker", "preset_config"]

PRESETS: tuple[str, ...] = ("din", "din_long", "sdim", "dare", "diffumin")

#: Short window of every preset: DIN "over the last N", N = 50 (SDIM's industrial short length).
SHORT_LEN = 50
_SHORT = DINConfig(length=SHORT_LEN, hidden=36, activation="dice", softmax=False)
_PRESET_PARTS: dict[str, dict[str, Any]] = {
    "din": {"short": _SHORT, "long": None, "mba_l2": 0.01},
    # softmax over a 1,000+ sequence: un-normalised sums would grow with L (the SDIM paper's
    # DIN (Long Seq.) baseline is softmax target attention)
    "din_long": {"short": _SHORT, "long": DINConfig(length=0, softmax=True), "mba_l2": 0.01},
    "sdim": {"short": _SHORT, "long": SDIMConfig()},
    "dare": {"short": _SHORT, "long": DAREConfig()},
    "diffumin": {"short": _SHORT, "long": DiffuMINConfig()},
}


def _merge(current: Any, value: Any) -> Any:
    """A dict override on a dataclass field updates only the named sub-fields."""
    if isinstance(value, dict) and dataclasses.is_dataclass(current):
        return dataclasses.replace(cast("DataclassInstance", current),
                                   **{k: tuple(v) if isinstance(v, list) else v for k, v in value.items()})
    return value


def preset_config(preset: str, spec: FeatureSpec | None = None, **overrides: Any) -> RankerConfig:
    """The :class:`RankerConfig` of a preset; ``overrides`` replace RankerConfig fields, and a
    dict replaces only the named sub-fields of a part, e.g. ``long={"top_k": 50}``."""
    if preset not in _PRESET_PARTS:
        raise ValueError(f"unknown preset {preset!r}; choose from {PRESETS}")
    if spec is None:
        spec = FeatureSpec(seq_len=SHORT_LEN if preset == "din" else 1000)
    cfg = RankerConfig(preset=preset, features=spec, **_PRESET_PARTS[preset])
    names = {f.name for f in dataclasses.fields(RankerConfig)}
    unknown = set(overrides) - names
    if unknown:
        raise ValueError(f"unknown RankerConfig fields {sorted(unknown)}")
    return dataclasses.replace(cfg, **{k: _merge(getattr(cfg, k), v) for k, v in overrides.items()})


def _compact_prepend(new: list[torch.Tensor], new_mask: torch.Tensor, old: list[torch.Tensor],
                     old_mask: torch.Tensor, window: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per row: the new real behaviors (most recent first), then the old ones, padded at the end
    and cut to ``window`` columns: exactly the layout ``build_batch`` gives the longer history."""
    mask = torch.cat([new_mask, old_mask], dim=1)  # (U, n + L)
    if mask.numel() and bool(mask.all()):  # no padding (the scorer's one full row): a plain cut
        width = min(window, mask.shape[1])
        n = new_mask.shape[1]
        cut = [torch.cat([a, b[:, : width - n]], dim=1) if width > n else a[:, :width].clone()
               for a, b in zip(new, old, strict=True)]
        return cut, mask[:, :width]
    width = max(1, min(window, int(mask.sum(1).max()) if mask.numel() else 0))  # as build_batch
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :width]  # real first
    out = []
    for a, b in zip(new, old, strict=True):
        both = torch.cat([a, b], dim=1)  # (U, n + L, ...)
        idx = order.view(*order.shape, *([1] * (both.dim() - 2))).expand(-1, -1, *both.shape[2:])
        out.append(torch.gather(both, 1, idx))
    return out, torch.gather(mask, 1, order)


class Ranker(BackendModule):
    """A CTR ranker over lifelong behavior sequences, built from named parts (STYLE R10).

    Parts: ``embedding`` (:class:`ItemEmbedding`, shared by behaviors and candidates), ``short``
    (:class:`DINAttention` over the first ``config.short.length`` columns, or None), ``long``
    (:class:`DINLongArch`, :class:`SDIMSequenceArch`, :class:`DARESequenceArch` or
    :class:`DiffuMINArch`, or None) and ``over`` (:class:`OverArch`). The head input is
    ``concat[target, short interest, long features]``. ``forward`` returns logits only; losses
    live in :class:`models.train_wrapper.RankerTrain`.

    Args:
        config (RankerConfig): fully determines the architecture and the initial weights
            (``config.seed``).

    Example:
        >>> from models.features import build_batch
        >>> from pipeline.state.base import Behaviors
        >>> import numpy as np
        >>> ranker = build_ranker("sdim", FeatureSpec(seq_len=20, item_buckets=64, category_buckets=8))
        >>> h = Behaviors(np.arange(5), np.arange(5) % 3, np.ones(5, np.uint8), np.arange(5))
        >>> batch = build_batch([h], [1, 2, 3], [0, 1, 2], ranker.config.features, user_index=[0, 0, 0])
        >>> assert ranker.eval()(batch).shape == (3,)
    """

    def __init__(self, config: RankerConfig) -> None:
        super().__init__()
        self.config = config
        d = config.item_dim
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.embedding = ItemEmbedding(config.features, config.embed_dim)
            self.short = None if config.short is None else DINAttention(d, config.short)
            self.long: DINLongArch | SDIMSequenceArch | DARESequenceArch | DiffuMINArch | None = None
            long = config.long
            if isinstance(long, DINConfig):
                self.long = DINLongArch(d, long)
            elif isinstance(long, SDIMConfig):
                self.long = SDIMSequenceArch(d, long)
            elif isinstance(long, DAREConfig):
                self.long = DARESequenceArch(d, config.features, long)
            elif isinstance(long, DiffuMINConfig):
                self.long = DiffuMINArch(d, long)
            in_dim = d + (d if self.short is not None else 0)
            in_dim += int(getattr(self.long, "out_dim", 0))
            tail, tail_scale = getattr(self.long, "head_tail_scale", (0, 1.0))
            self.over = OverArch(in_dim, config.over, tail, tail_scale)

    # -- user side --------------------------------------------------------------------------------

    def _short_len(self) -> int:
        return 0 if self.config.short is None else self.config.short.length

    def encode(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Per-history-row encodings, computed once per user and reusable for any candidates.

        Keys: ``short_emb (U, S, d)``/``short_mask`` for the short window, plus the long module's
        (``long_emb``/``long_mask``; SDIM ``sdim_sums (U, G, 2**τ, d)``/``sdim_counts``; DARE
        ``dare_keys (U, L, 2·attn_dim)``). Depends on the current weights: rebuild after an update.
        """
        width = batch.hist_item.shape[1] if self.long is not None else min(self._short_len(),
                                                                           batch.hist_item.shape[1])
        hist_emb = self.embedding(batch.hist_item[:, :width], batch.hist_cat[:, :width])  # (U, W, d)
        enc: dict[str, torch.Tensor] = {}
        if self.short is not None:
            s = self._short_len()
            enc["short_emb"] = hist_emb[:, :s]
            enc["short_mask"] = batch.hist_mask[:, :s]
        if self.long is not None:
            enc.update(self.long.encode(hist_emb, batch))
        return enc

    def extend_encoding(self, encoded: dict[str, torch.Tensor], new_behaviors: Batch,
                        evicted: Batch | None = None) -> dict[str, torch.Tensor]:
        """``encoded`` after appending behaviors, without re-reading the history.

        ``new_behaviors`` holds only the new behaviors as history rows (most recent first, the
        same U rows as ``encoded``; its candidate fields are ignored). Windows (short, long) slide
        exactly as :func:`build_batch` would cut the longer history. SDIM's bucket sums are
        additive: new behaviors are added, and the behaviors that the append pushes out of the
        ``features.seq_len`` window must be passed as ``evicted`` (same layout) so they are
        subtracted; without ``evicted`` the table equals a rebuild only while the user's total stays
        within ``seq_len``. Per-column encodings (short window, DIN, DARE) ignore ``evicted``.
        Rebuild after every weight update: the encodings depend on the embeddings (pitfall 11).
        """
        new_emb = self.embedding(new_behaviors.hist_item, new_behaviors.hist_cat)  # (U, n, d)
        new_mask = new_behaviors.hist_mask
        out = dict(encoded)
        if self.short is not None:
            (out["short_emb"],), out["short_mask"] = _compact_prepend(
                [new_emb], new_mask, [encoded["short_emb"]], encoded["short_mask"], self._short_len())
        if isinstance(self.long, SDIMSequenceArch):
            old_emb = old_mask = None
            if evicted is not None:
                old_emb = self.embedding(evicted.hist_item, evicted.hist_cat)  # (U, e, d)
                old_mask = evicted.hist_mask
            out.update(self.long.extend(encoded, new_emb, new_mask, old_emb, old_mask))
        elif self.long is not None:
            window = self.config.features.seq_len
            if isinstance(self.long, DINLongArch) and self.long.attention.config.length:
                window = min(window, self.long.attention.config.length)
            new_enc = self.long.encode(new_emb, new_behaviors)
            keys = [k for k in encoded if k in new_enc and k != "long_mask"]
            tensors, out["long_mask"] = _compact_prepend([new_enc[k] for k in keys], new_mask,
                                                         [encoded[k] for k in keys], encoded["long_mask"],
                                                         window)
            out.update(zip(keys, tensors, strict=True))
        return out

    # -- candidate side ---------------------------------------------------------------------------

    def logits_and_aux(self, batch: Batch, labels: torch.Tensor | None = None,
                       encoded: dict[str, torch.Tensor] | None = None
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits ``(B,)`` plus the long module's weighted auxiliary losses (training only)."""
        enc = self.encode(batch) if encoded is None else encoded
        target = self.embedding(batch.cand_item, batch.cand_cat)  # (B, d)
        features = [target]
        if self.short is not None:
            features.append(self.short(target, enc["short_emb"], enc["short_mask"], batch.user_index))
        aux: dict[str, torch.Tensor] = {}
        if self.long is not None:
            long_features, aux = self.long(enc, target, batch, labels)
            features.append(long_features)
        return self.over(torch.cat(features, dim=-1)), aux

    def forward(self, batch: Batch, encoded: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Logits ``(B,)``; pass ``encoded=self.encode(batch)`` to reuse a user's encoding."""
        return self.logits_and_aux(batch, None, encoded)[0]


def build_ranker(preset: str, spec: FeatureSpec | None = None, **overrides: Any) -> Ranker:
    """A fresh :class:`Ranker` of a preset (see :func:`preset_config` for ``overrides``)."""
    return Ranker(preset_config(preset, spec, **overrides))
