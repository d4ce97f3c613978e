"""The scoring domain: one request = one user + N candidates, scored by the current model.

Per request the scorer

1. takes ONE reference to the current :class:`LoadedModel` (a hot reload swaps the reference; a
   request that already holds the old one finishes on it),
2. reads the user's live sequence from the store once (``store.read(user, end, max_len)``, after a
   cheap ``store.length`` that pins ``end`` so the read and the cache key agree),
3. encodes the user once (``ranker.encode``; SDIM bucket tables, DARE attention keys, ...) or takes
   the encoding from the cache, extending it with only the new behaviors when the ranker supports
   it (``ranker.extend_encoding``; summed encodings such as SDIM's bucket tables also get the
   behaviors that leave the window, to subtract),
4. scores all candidates in one batched forward under ``torch.inference_mode()`` and returns
   ``sigmoid(logits)`` in candidate order.

Features come from :func:`models.features.build_batch`, the very function the trainer uses, with
``user_index = zeros`` (one history row shared by all candidates): there is no serving-only feature
code, hence no train/serve skew (``tests/serving/test_scorer.py`` checks the scores against
``build_batch`` + ``ranker.forward`` called directly).

Encoding cache: entries are keyed by ``(model version, user)`` and remember the absolute sequence
end position they were computed at, so an entry is used only for the exact ``(version, user,
sequence length)`` it was built from, and an entry at an older end is the starting point for an
incremental extension. Unknown users (end 0) share one empty-history encoding per model version.
The cache is an LRU bounded in bytes (the encodings' tensor sizes), not in entries, because an
encoding's size depends on the model.
"""

from __future__ import annotations

import inspect
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from models.features import Batch, FeatureSpec, build_batch
from pipeline.events import hash_id
from pipeline.state.base import Behaviors, SequenceStore, empty_behaviors
from serving.errors import DeadlineTooShort, ModelNotLoaded, StoreUnavailable

__all__ = [
    "CacheOutcome",
    "EncodingCache",
    "LoadedModel",
    "Ranker",
    "ScoreResult",
    "Scorer",
    "ScoringRequest",
]

Encoding = dict[str, torch.Tensor]

#: Incremental extension reads at most this many new behaviors; a bigger gap re-encodes the user
#: from scratch (one read of the window is cheaper than reading a long tail and extending).
MAX_EXTEND_BEHAVIORS = 256


@runtime_checkable
class Ranker(Protocol):
    """What the scorer needs from a model (``models`` rankers satisfy it).

    ``encode``/``forward(batch, encoded=...)`` are optional: a ranker without ``encode`` is scored
    with a plain ``forward(batch)`` (correct, just no per-user reuse). ``extend_encoding`` is
    optional too; a summed encoding (SDIM) takes ``evicted=`` behaviors to subtract.
    """

    config: Any  # has ``.features: FeatureSpec`` and ``.preset: str``

    def __call__(self, batch: Batch) -> torch.Tensor: ...

    def eval(self) -> Any: ...


@dataclass(frozen=True)
class LoadedModel:
    """A ranker ready to serve, with where it came from."""

    ranker: Any  # a Ranker (torch.nn.Module)
    name: str
    version: str
    loaded_at: float = field(default_factory=time.time)  # wall clock, s
    created_at: float | None = None  # when the version was registered (wall clock, s), if known

    @property
    def spec(self) -> FeatureSpec:
        spec: FeatureSpec = self.ranker.config.features
        return spec

    @property
    def preset(self) -> str:
        return str(getattr(self.ranker.config, "preset", type(self.ranker).__name__))

    @cached_property
    def extend_mode(self) -> str:
        """How this ranker absorbs new behaviors (see :func:`_extend_mode`), computed once."""
        return _extend_mode(self.ranker)

    def age_s(self, now: float | None = None) -> float:
        """Seconds since the version was created (or, if unknown, since it was loaded)."""
        ref = self.created_at if self.created_at is not None else self.loaded_at
        return max(0.0, (time.time() if now is None else now) - ref)


@dataclass(frozen=True)
class ScoringRequest:
    """A validated request in domain terms (raw string ids, as the ad server sends them)."""

    user_id: str
    item_ids: Sequence[str]
    category_ids: Sequence[str]
    context: Mapping[str, str] = field(default_factory=dict)

    @property
    def num_candidates(self) -> int:
        return len(self.item_ids)


class CacheOutcome:
    """How the user's encoding was obtained (a label of the cache metric)."""

    HIT = "hit"  # cached at this exact sequence end
    EXTEND = "extend"  # cached at an older end, extended with the new behaviors only
    MISS = "miss"  # encoded from the store read
    EMPTY = "empty"  # unknown user / empty history (shared per model version)
    NONE = "none"  # the ranker has no ``encode``: plain forward


@dataclass(frozen=True)
class ScoreResult:
    scores: np.ndarray  # (N,) float32 click probabilities, candidate order
    model_name: str
    model_version: str
    history_len: int  # behaviors the model saw (after the seq_len window)
    cache: str  # a CacheOutcome value


@dataclass
class _Entry:
    end: int  # absolute sequence end the encoding was computed at
    window: int  # behaviors inside the encoding (<= spec.seq_len)
    encoding: Encoding
    nbytes: int
    drift: int = 0  # behaviors added/subtracted incrementally since the last full encode


class EncodingCache:
    """Thread-safe LRU of per-user encodings, bounded by the bytes of the tensors it holds."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._data: OrderedDict[tuple[str, int], _Entry] = OrderedDict()
        self._bytes = 0

    def get(self, key: tuple[str, int]) -> _Entry | None:
        with self._lock:
            entry = self._data.get(key)
            if entry is not None:
                self._data.move_to_end(key)
            return entry

    def put(self, key: tuple[str, int], entry: _Entry) -> None:
        if entry.nbytes > self.max_bytes:
            return
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._data[key] = entry
            self._bytes += entry.nbytes
            while self._bytes > self.max_bytes and self._data:
                _, evicted = self._data.popitem(last=False)
                self._bytes -= evicted.nbytes

    def drop_versions_except(self, version: str) -> None:
        """Free entries of models that are no longer served (after a swap)."""
        with self._lock:
            for key in [k for k in self._data if k[0] != version]:
                self._bytes -= self._data.pop(key).nbytes

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._bytes = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._data)


def _compact(enc: Encoding) -> tuple[Encoding, int]:
    """``enc`` with every view that keeps a larger buffer alive copied out, and the bytes it holds.

    Encodings can be views: a ranker's short-window ``hist_emb[:, :50]`` keeps the whole
    ``(1, L, d)`` embedding of a 10,000-long history alive. Caching such a view would make the byte
    budget lie by orders of magnitude, so the cache stores compact copies and counts storages.
    """
    out: Encoding = {}
    seen: set[int] = set()
    total = 0
    for k, t in enc.items():
        if isinstance(t, torch.Tensor):
            storage = t.untyped_storage()
            if storage.nbytes() > t.nelement() * t.element_size():
                t = t.clone()
                storage = t.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        out[k] = t
    return out, total


def _hash_all(ids: Sequence[str]) -> np.ndarray:
    # One C call per id (xxh3); ids are strings, so this is exactly pipeline.events.hash_id.
    return np.fromiter(map(hash_id, ids), dtype=np.int64, count=len(ids))


#: Long-sequence kinds whose ``extend_encoding`` stays exact when the window slides (old behaviors
#: fall out): their encodings are per-column and ``extend_encoding`` re-cuts the window the way
#: ``build_batch`` does.
_SLIDING_EXTEND_KINDS = (None, "din", "dare")
#: Kinds whose encoding is a sum over the window (SDIM bucket tables): the window slides exactly
#: when the behaviors that fall out are passed to ``extend_encoding(..., evicted=...)`` and
#: subtracted.
_EVICTING_EXTEND_KINDS = ("sdim",)


def _extend_mode(ranker: Any) -> str:
    """How ``ranker.extend_encoding`` can absorb new behaviors: ``"slide"`` (exact at any window
    fill), ``"evict"`` (exact when the evicted behaviors are passed too), ``"grow"`` (exact only
    while nothing falls out of the window) or ``"none"`` (no ``extend_encoding``)."""
    if not hasattr(ranker, "extend_encoding"):
        return "none"
    kind = getattr(ranker.config, "long_kind", "?")
    if kind in _SLIDING_EXTEND_KINDS:
        return "slide"
    if kind in _EVICTING_EXTEND_KINDS and "evicted" in inspect.signature(ranker.extend_encoding).parameters:
        return "evict"
    return "grow"


#: Sentinel user key of the shared empty-history encoding (hash_id never yields a negative id).
_EMPTY_USER = -1


class Scorer:
    """Scores requests with the current model; see the module docstring for the request path.

    Args:
        store (SequenceStore | None): live behavior sequences (read-only use); None until the
            server has opened it (requests then fail with :class:`StoreUnavailable`).
        model (LoadedModel | None, default None): initial model; ``swap`` replaces it.
        cache_bytes (int, default 256 MiB): encoding cache budget; 0 disables the cache.
        min_budget_s (float, default 0.002): a request whose deadline is closer than this when a
            worker picks it up is refused with :class:`DeadlineTooShort` instead of scored.
    """

    def __init__(
        self,
        store: SequenceStore | None,
        model: LoadedModel | None = None,
        *,
        cache_bytes: int = 256 << 20,
        min_budget_s: float = 0.002,
    ) -> None:
        self.store = store
        self.cache = EncodingCache(cache_bytes)
        self.min_budget_s = min_budget_s
        self._model: LoadedModel | None = None
        self._swap_lock = threading.Lock()
        if model is not None:
            self.swap(model)

    # ---- model lifecycle ---------------------------------------------------------------------

    @property
    def model(self) -> LoadedModel | None:
        return self._model

    def swap(self, model: LoadedModel) -> LoadedModel | None:
        """Make ``model`` current (one reference assignment: atomic for readers). Requests that
        already took the old model finish on it. Returns the previous model."""
        model.ranker.eval()
        with self._swap_lock:
            old, self._model = self._model, model
        if old is None or old.version != model.version:
            self.cache.drop_versions_except(model.version)
        return old

    def warm_up(self, model: LoadedModel, num_candidates: int = 16) -> None:
        """Run the request path on ``model`` (not yet current) with a full-length synthetic history
        and an empty one; raises if the model fails or returns non-finite scores."""
        model.ranker.eval()  # inference statistics (Dice running stats), before the first request
        spec = model.spec
        rng = np.random.default_rng(0)
        n = spec.seq_len
        full = Behaviors(
            rng.integers(0, 1 << 62, n, dtype=np.int64),
            rng.integers(0, 1 << 62, n, dtype=np.int64),
            rng.integers(1, spec.action_buckets, n).astype(np.uint8),
            np.arange(n, dtype=np.int64),
        )
        items = rng.integers(0, 1 << 62, num_candidates, dtype=np.int64)
        cats = rng.integers(0, 1 << 62, num_candidates, dtype=np.int64)
        for hist in (full, empty_behaviors()):
            batch = build_batch([hist], items, cats, spec, user_index=np.zeros(num_candidates, np.int64))
            with torch.inference_mode():
                if hasattr(model.ranker, "encode"):
                    probs = torch.sigmoid(model.ranker(batch, encoded=model.ranker.encode(batch)))
                else:
                    probs = torch.sigmoid(model.ranker(batch))
            if probs.shape != (num_candidates,) or not bool(torch.isfinite(probs).all()):
                raise ValueError(
                    f"model {model.name} v{model.version} failed warm-up: got shape {tuple(probs.shape)} "
                    f"or non-finite scores"
                )

    # ---- scoring -----------------------------------------------------------------------------

    def score(self, request: ScoringRequest, *, deadline: float | None = None) -> ScoreResult:
        """Score ``request``. ``deadline`` is a ``time.monotonic()`` instant (None: no deadline)."""
        model = self._model  # the ONE read of the current model for this request
        if model is None:
            raise ModelNotLoaded("no model is loaded yet; retry shortly")
        store = self.store
        if store is None:
            raise StoreUnavailable("the sequence store is not open yet; retry shortly")
        if deadline is not None and deadline - time.monotonic() < self.min_budget_s:
            raise DeadlineTooShort("the request deadline expired before scoring could start")
        ranker = model.ranker
        spec = model.spec
        n = request.num_candidates
        cand_items = _hash_all(request.item_ids)
        cand_cats = _hash_all(request.category_ids)
        user = hash_id(request.user_id)
        zeros = np.zeros(n, dtype=np.int64)

        if not hasattr(ranker, "encode"):
            hist = store.read(user, max_len=spec.seq_len)
            batch = build_batch([hist], cand_items, cand_cats, spec, user_index=zeros)
            with torch.inference_mode():
                logits = ranker(batch)
            return self._result(model, logits, len(hist), CacheOutcome.NONE)

        end = store.length(user)
        encoding, window, outcome = self._user_encoding(store, model, user, end)
        # Candidates only: the history is already inside ``encoding``.
        batch = build_batch([empty_behaviors()], cand_items, cand_cats, spec, user_index=zeros)
        with torch.inference_mode():
            logits = ranker(batch, encoded=encoding)
        return self._result(model, logits, window, outcome)

    def _user_encoding(
        self, store: SequenceStore, model: LoadedModel, user: int, end: int
    ) -> tuple[Encoding, int, str]:
        ranker = model.ranker
        spec = model.spec
        use_cache = self.cache.max_bytes > 0
        key = (model.version, _EMPTY_USER if end == 0 else user)
        entry = self.cache.get(key) if use_cache else None
        if entry is not None and entry.end == end:
            return entry.encoding, entry.window, (CacheOutcome.EMPTY if end == 0 else CacheOutcome.HIT)

        outcome = CacheOutcome.EMPTY if end == 0 else CacheOutcome.MISS
        if entry is not None and 0 < end - entry.end <= MAX_EXTEND_BEHAVIORS:
            extended = self._extend(store, model, user, end, entry)
            if extended is not None:
                self.cache.put(key, extended)
                return extended.encoding, extended.window, CacheOutcome.EXTEND

        hist = store.read(user, end=end, max_len=spec.seq_len) if end else empty_behaviors()
        batch = build_batch([hist], [], [], spec, user_index=[])
        with torch.inference_mode():
            encoding = ranker.encode(batch)
        if use_cache:
            encoding, nbytes = _compact(encoding)
            self.cache.put(key, _Entry(end, len(hist), encoding, nbytes))
        return encoding, len(hist), outcome

    def _extend(self, store: SequenceStore, model: LoadedModel, user: int, end: int,
                entry: _Entry) -> _Entry | None:
        """``entry`` extended to sequence end ``end`` from the new behaviors only (and, for summed
        encodings, the behaviors that fall out of the window), or None when that would not equal a
        fresh encode (then the caller re-encodes).

        Summed encodings (SDIM) are rebuilt once the behaviors added and subtracted incrementally
        since the last full encode exceed ``seq_len``: the float sums then never carry more
        roundings than one rebuild performs (``tests/serving/test_scorer.py`` checks incremental
        == rebuilt).
        """
        ranker, spec = model.ranker, model.spec
        mode = model.extend_mode
        new = end - entry.end
        evict = max(0, entry.window + new - spec.seq_len)  # oldest behaviors that leave the window
        if mode == "none" or new > spec.seq_len or (evict and mode == "grow"):
            return None
        drift = entry.drift + (new + evict if mode == "evict" else 0)
        if drift > spec.seq_len:
            return None
        tail = store.read(user, end=end, max_len=new)
        if len(tail) != new:  # trimmed by the lifelong cap in between
            return None
        kwargs: dict[str, Batch] = {}
        if evict and mode == "evict":
            first = entry.end - entry.window  # absolute position of the oldest encoded behavior
            gone = store.read(user, end=first + evict, max_len=evict)
            if len(gone) != evict:
                return None
            kwargs["evicted"] = build_batch([gone], [], [], spec, user_index=[])
        batch = build_batch([tail], [], [], spec, user_index=[])
        with torch.inference_mode():
            encoding = ranker.extend_encoding(entry.encoding, batch, **kwargs)
        encoding, nbytes = _compact(encoding)
        return _Entry(end, min(entry.window + new, spec.seq_len), encoding, nbytes, drift)

    @staticmethod
    def _result(model: LoadedModel, logits: torch.Tensor, window: int, outcome: str) -> ScoreResult:
        scores = torch.sigmoid(logits.float()).numpy().astype(np.float32, copy=False)
        return ScoreResult(scores, model.name, model.version, window, outcome)
