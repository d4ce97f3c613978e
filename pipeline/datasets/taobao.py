"""Taobao UserBehavior (Tianchi) as events, plus the impression protocol every real dataset shares.

**The file.** ``UserBehavior.csv``: no header, ``user_id,item_id,category_id,behavior_type,timestamp``
with ``behavior_type`` in {pv, cart, fav, buy} and Unix seconds; ~100M rows, grouped by user (not by
time). :func:`iter_events` streams it in bounded memory: an external sort by time (rows are spilled
to hour-bucket files, then each bucket is sorted in memory), then the protocol below.

**The protocol** (:func:`interactions_to_events`, shared by MovieLens and Amazon; docs/datasets.md):

- Every source interaction is a behavior of its user. *Target* interactions (Taobao: ``pv``,
  i.e. clicks; MovieLens: ratings >= 4; Amazon: every review) become a request instead: one
  impression of the real item (a real positive) plus ``negatives`` impressions of items sampled
  by popularity, then a click on the real item at the same time. The worker appends the click to
  the history (action ``click``) and labels the positive; the sampled items stay unclicked.
- Negatives are drawn uniformly from a ring buffer of the last ``pool_size`` interactions, i.e.
  in proportion to *recent* item popularity, known at that time (no look-ahead), excluding the
  positive and items the user interacted with before (a bounded-memory Bloom filter of
  (user, item) pairs: a false positive only costs a resample).
- A target becomes a request only when the user already has ``min_history`` behaviors and the
  pool holds ``min_pool`` interactions; ``target_rate`` < 1 keeps a deterministic (hashed) share of
  targets as requests and the rest as plain behaviors (the full Taobao file has ~89M pv).
- **Same-second rule**: events are emitted in time order, and within one second all impressions
  come before any behavior or click, so events in the same second never see each other in a
  history (the worker snapshots ``seq_pos`` at the impression).
"""

from __future__ import annotations

import csv
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from pipeline.events import MAX_TS_MS, MIN_TS_MS

__all__ = [
    "DEFAULT_PATH_ENV",
    "Interaction",
    "ProtocolConfig",
    "SeenPairs",
    "interactions_to_events",
    "iter_events",
    "read_interactions",
    "time_sorted",
]

#: Environment variable naming the full UserBehavior.csv when no ``path`` is given.
DEFAULT_PATH_ENV = "CTRSTREAM_TAOBAO_PATH"
_ACTIONS = {"pv": "view", "cart": "cart", "fav": "fav", "buy": "buy"}

# (ts_ms, user, item, category, action, is_target): one source interaction
Interaction = tuple[int, str, str, str, str, bool]


@dataclass(frozen=True)
class ProtocolConfig:
    """How interactions become behaviors and impressions (see the module docstring)."""

    negatives: int = 2  # sampled negatives per real positive (DARE: 2)
    pool_size: int = 1_000_000  # recent interactions the popularity sampler draws from
    min_pool: int = 100  # no request until the pool holds this many interactions
    min_history: int = 1  # no request for a user with fewer behaviors than this
    target_rate: float = 1.0  # share of target interactions turned into requests (hashed, deterministic)
    seen_bits: int = 1 << 27  # Bloom filter size in bits (16 MiB); ~1% false positives at 10M pairs
    seed: int = 7  # negative sampling seed

    def __post_init__(self) -> None:
        if self.negatives < 0 or self.pool_size < 1 or self.min_pool < 1 or self.min_history < 0:
            raise ValueError("negatives/min_history must be >= 0 and pool_size/min_pool >= 1")
        if not 0.0 <= self.target_rate <= 1.0:
            raise ValueError("target_rate must be in [0, 1]")
        if self.seen_bits < 64:
            raise ValueError("seen_bits must be >= 64")


class SeenPairs:
    """A Bloom filter of (user, item) pairs with two hash probes, in ``bits`` bits of memory."""

    def __init__(self, bits: int) -> None:
        self.bits = bits
        self._words = np.zeros((bits + 63) // 64, dtype=np.uint64)

    def _probes(self, user: str, item: str) -> tuple[int, int]:
        h = xxhash.xxh3_128_intdigest(f"{user}\x1f{item}".encode())
        return (h & 0xFFFFFFFFFFFFFFFF) % self.bits, (h >> 64) % self.bits

    def add(self, user: str, item: str) -> None:
        for p in self._probes(user, item):
            self._words[p >> 6] |= np.uint64(1 << (p & 63))

    def __contains__(self, pair: tuple[str, str]) -> bool:
        return all(int(self._words[p >> 6]) >> (p & 63) & 1 for p in self._probes(*pair))


def _is_kept(user: str, ts: int, item: str, rate: float) -> bool:
    if rate >= 1.0:
        return True
    return xxhash.xxh64_intdigest(f"{user}|{ts}|{item}".encode()) < rate * 2.0**64


def interactions_to_events(interactions: Iterable[Interaction], config: ProtocolConfig | None = None
                           ) -> Iterator[dict[str, Any]]:
    """Time-ordered interactions → events under the shared protocol (module docstring)."""
    cfg = config or ProtocolConfig()
    rng = np.random.default_rng(cfg.seed)
    pool: list[tuple[str, str]] = []  # ring buffer of (item, category)
    head = 0
    seen = SeenPairs(cfg.seen_bits)
    history: dict[str, int] = {}
    second: int | None = None
    impressions: list[dict[str, Any]] = []
    others: list[dict[str, Any]] = []
    last_ts = -1
    for ts, user, item, cat, action, target in interactions:
        if ts < last_ts:
            raise ValueError(f"interactions must be in time order ({ts} after {last_ts})")
        last_ts = ts
        if ts // 1000 != second:  # flush the previous second: impressions first
            yield from impressions
            yield from others
            impressions, others, second = [], [], ts // 1000
        base = {"user_id": user, "item_id": item, "category_id": cat, "ts": ts}
        request = (target and len(pool) >= cfg.min_pool and history.get(user, 0) >= cfg.min_history
                   and _is_kept(user, ts, item, cfg.target_rate))
        if request:
            rid = f"{user}-{ts}-{item}"
            impressions.append({"type": "impression", **base, "request_id": rid})
            shown = {item}
            for _ in range(cfg.negatives):
                for _attempt in range(20):
                    neg_item, neg_cat = pool[int(rng.integers(len(pool)))]
                    if neg_item not in shown and (user, neg_item) not in seen:
                        shown.add(neg_item)
                        impressions.append({"type": "impression", "user_id": user, "item_id": neg_item,
                                            "category_id": neg_cat, "ts": ts, "request_id": rid})
                        break
            others.append({"type": "click", **base, "request_id": rid})
        else:
            others.append({"type": "behavior", **base, "action": action})
        history[user] = history.get(user, 0) + 1
        seen.add(user, item)
        if len(pool) < cfg.pool_size:
            pool.append((item, cat))
        else:
            pool[head] = (item, cat)
            head = (head + 1) % cfg.pool_size
    yield from impressions
    yield from others


def time_sorted(rows: Iterable[Interaction], bucket_ms: int = 3_600_000, max_buffered: int = 500_000,
                tmp_dir: str | None = None) -> Iterator[Interaction]:
    """External sort by time in bounded memory (stable for equal timestamps).

    Rows are spilled into one TSV file per ``bucket_ms`` time bucket whenever ``max_buffered`` rows
    are held; buckets are then read back in time order and each is sorted in memory. Memory is
    ``max_buffered`` rows plus the largest bucket. If everything fits in one buffer nothing touches
    the disk.
    """
    buffers: dict[int, list[Interaction]] = {}
    held = 0
    spilled: set[int] = set()
    with tempfile.TemporaryDirectory(prefix="ctrstream-sort-", dir=tmp_dir) as tmp:
        def spill() -> None:
            for key, buf in buffers.items():
                with open(os.path.join(tmp, f"{key}.tsv"), "a", encoding="utf-8", newline="") as f:
                    w = csv.writer(f, delimiter="\t", lineterminator="\n")
                    w.writerows(buf)
                spilled.add(key)
            buffers.clear()

        for row in rows:
            buffers.setdefault(row[0] // bucket_ms, []).append(row)
            held += 1
            if held >= max_buffered:
                spill()
                held = 0
        if not spilled:
            for key in sorted(buffers):
                yield from sorted(buffers[key], key=lambda r: r[0])
            return
        spill()
        for key in sorted(spilled):
            with open(os.path.join(tmp, f"{key}.tsv"), encoding="utf-8", newline="") as f:
                bucket = [(int(r[0]), r[1], r[2], r[3], r[4], r[5] == "True")
                          for r in csv.reader(f, delimiter="\t")]
            os.unlink(os.path.join(tmp, f"{key}.tsv"))
            yield from sorted(bucket, key=lambda r: r[0])


def read_interactions(path: str | Path, target_actions: tuple[str, ...] = ("pv",),
                      limit: int | None = None) -> Iterator[Interaction]:
    """Rows of a UserBehavior CSV as interactions (file order), skipping malformed rows and
    timestamps outside the event contract's range."""
    n = 0
    with open(path, encoding="utf-8", newline="") as f:
        for rec in csv.reader(f):
            if limit is not None and n >= limit:
                return
            if len(rec) != 5 or rec[3] not in _ACTIONS:
                continue
            try:
                ts = int(rec[4]) * 1000
            except ValueError:
                continue
            if not MIN_TS_MS <= ts < MAX_TS_MS:
                continue
            n += 1
            yield ts, rec[0], rec[1], rec[2], _ACTIONS[rec[3]], rec[3] in target_actions


def iter_events(path: str | Path | None = None, *, limit: int | None = None, negatives: int = 2,
                target_rate: float = 1.0, seed: int = 7, max_buffered: int = 500_000,
                **protocol: Any) -> Iterator[dict[str, Any]]:
    """Events of a UserBehavior CSV (``path``, else ``$CTRSTREAM_TAOBAO_PATH``) in time order.

    ``limit`` caps the rows read; ``protocol`` passes further :class:`ProtocolConfig` fields.
    """
    src = path or os.environ.get(DEFAULT_PATH_ENV)
    if not src:
        raise FileNotFoundError(f"give the UserBehavior.csv path (path=...) or set {DEFAULT_PATH_ENV}")
    cfg = ProtocolConfig(negatives=negatives, target_rate=target_rate, seed=seed, **protocol)
    rows = time_sorted(read_interactions(src, limit=limit), max_buffered=max_buffered)
    yield from interactions_to_events(rows, cfg)
