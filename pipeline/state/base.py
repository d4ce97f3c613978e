"""The sequence store contract: one interface, several backends, one test suite.

A store holds, per user, the lifelong behavior sequence (item, category, action, ts) at absolute
positions that only grow, plus the stream worker's bookkeeping: pending impressions and consumed
offsets. Everything a worker batch changes is applied by ONE call, :meth:`SequenceStore.commit`,
which is atomic on every backend (an LMDB write transaction; a Redis Lua script). After a crash
the store is exactly as of the last commit, and the worker resumes from the offsets stored here.
"""

from __future__ import annotations

import hashlib
import struct
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from pipeline.exceptions import OffsetRegressionError

__all__ = ["Behaviors", "GroupedAppends", "SequenceStore", "StateDelta", "empty_behaviors", "DEFAULT_LIFELONG_CAP",
           "check_expected_offsets"]

#: Behaviors kept per user; older ones are trimmed while positions stay absolute. 100k covers the
#: "lifelong" range of the papers (SDIM/DARE evaluate up to ~50k) with headroom.
DEFAULT_LIFELONG_CAP = 100_000
#: Users read per ``read_many`` call by :meth:`SequenceStore.digest` and ``stats``: one Redis round
#: trip (or LMDB read transaction) per 64 users keeps a full scan at network speed while holding at
#: most 64 full sequences (64 x 100k x 25 B = 160 MB at the cap, far less in practice) in memory.
DIGEST_READ_BATCH = 64


@dataclass(frozen=True)
class Behaviors:
    """A slice of one user's sequence, oldest first, as columnar numpy arrays.

    ``start`` is the absolute position of element 0; ``start + len(self)`` is the end position.
    """

    item: np.ndarray  # (n,) int64
    category: np.ndarray  # (n,) int64
    action: np.ndarray  # (n,) uint8
    ts: np.ndarray  # (n,) int64 ms
    start: int = 0

    def __len__(self) -> int:
        return int(self.item.shape[0])

    @property
    def end(self) -> int:
        return self.start + len(self)

    def tail(self, n: int) -> Behaviors:
        if n >= len(self):
            return self
        k = len(self) - n
        return Behaviors(self.item[k:], self.category[k:], self.action[k:], self.ts[k:], self.start + k)

    @staticmethod
    def concat(parts: Sequence[Behaviors]) -> Behaviors:
        if not parts:
            return empty_behaviors()
        return Behaviors(
            np.concatenate([p.item for p in parts]),
            np.concatenate([p.category for p in parts]),
            np.concatenate([p.action for p in parts]),
            np.concatenate([p.ts for p in parts]),
            parts[0].start,
        )


def empty_behaviors(start: int = 0) -> Behaviors:
    z = np.zeros(0, dtype=np.int64)
    return Behaviors(z, z, np.zeros(0, dtype=np.uint8), z, start)


class GroupedAppends(Mapping[int, Behaviors]):
    """The appends of many users as one set of columns grouped by user: user ``users[i]`` appends
    rows ``[bounds[i], bounds[i + 1])``, oldest first. ``users`` is ascending and unique.

    What the worker's checkpoint hands to :meth:`SequenceStore.commit` (its batches' columns, sorted
    by user once); a backend can take the columns whole (LMDB plans every user's chunks in one C
    call) or read it as the mapping user -> :class:`Behaviors` it also is.
    """

    __slots__ = ("users", "bounds", "item", "category", "action", "ts", "_index")

    def __init__(self, users: np.ndarray, bounds: np.ndarray, item: np.ndarray, category: np.ndarray,
                 action: np.ndarray, ts: np.ndarray) -> None:
        self.users = np.ascontiguousarray(users, np.int64)
        self.bounds = np.ascontiguousarray(bounds, np.int64)
        self.item = np.ascontiguousarray(item, np.int64)
        self.category = np.ascontiguousarray(category, np.int64)
        self.action = np.ascontiguousarray(action, np.uint8)
        self.ts = np.ascontiguousarray(ts, np.int64)
        self._index: dict[int, int] | None = None
        n = len(self.item)
        if (len(self.bounds) != len(self.users) + 1 or not len(self.category) == len(self.action) == len(self.ts) == n
                or (len(self.bounds) and (self.bounds[0] != 0 or self.bounds[-1] != n))
                or bool((np.diff(self.bounds) < 0).any()) or bool((np.diff(self.users) <= 0).any())):
            raise ValueError("GroupedAppends: users must be ascending and unique, bounds cut the columns from 0 "
                             "to their length, and the columns have one length")

    @classmethod
    def from_columns(cls, user: np.ndarray, item: np.ndarray, category: np.ndarray, action: np.ndarray,
                     ts: np.ndarray) -> GroupedAppends:
        """Rows of any users in arrival order, grouped by user (a stable sort: each user's rows keep
        their order)."""
        order = np.argsort(user, kind="stable")
        us = user[order]
        cut = np.flatnonzero(us[1:] != us[:-1]) + 1
        starts = np.concatenate(([0], cut)).astype(np.int64)
        bounds = np.concatenate((starts, [len(us)])).astype(np.int64)
        return cls(us[starts] if len(us) else us, bounds if len(us) else np.zeros(1, np.int64), item[order],
                   category[order], action[order], ts[order])

    @classmethod
    def of(cls, appends: Mapping[int, Behaviors]) -> GroupedAppends:
        """``appends`` itself when grouped already, else its non-empty users' rows grouped."""
        if isinstance(appends, GroupedAppends):
            return appends
        users = sorted(u for u, b in appends.items() if len(b))
        parts = [appends[u] for u in users]
        bounds = np.zeros(len(users) + 1, np.int64)
        np.cumsum([len(b) for b in parts], out=bounds[1:])
        cat = Behaviors.concat(parts)
        return cls(np.array(users, np.int64), bounds, cat.item, cat.category, cat.action, cat.ts)

    def __len__(self) -> int:
        return len(self.users)

    def __iter__(self) -> Iterator[int]:
        return iter(self.users.tolist())

    def __getitem__(self, user: int) -> Behaviors:
        if self._index is None:
            self._index = {u: i for i, u in enumerate(self.users.tolist())}
        return self._at(self._index[user])

    def _at(self, i: int) -> Behaviors:
        a, z = int(self.bounds[i]), int(self.bounds[i + 1])
        return Behaviors(self.item[a:z], self.category[a:z], self.action[a:z], self.ts[a:z])


@dataclass
class StateDelta:
    """Everything one worker batch changes, applied atomically by :meth:`SequenceStore.commit`.

    ``appends`` maps user -> new behaviors (in order; the worker gives a :class:`GroupedAppends`).
    ``pending_put``/``pending_del`` edit the pending-impression table (key -> opaque bytes; deletes
    apply before puts), ``offsets`` are the next offsets to consume per (topic, partition) for the
    consumer ``group``; ``meta`` holds small worker values (watermarks).

    ``expect_offsets`` fences the commit: for each (topic, partition) listed, the offset the
    committer believes is stored now (None: none stored). If the store holds anything else (another
    worker committed that partition since, e.g. after a rebalance this worker missed), the commit
    applies nothing and raises :class:`~pipeline.exceptions.OffsetRegressionError`.
    """

    group: str
    appends: Mapping[int, Behaviors] = field(default_factory=dict)
    pending_put: dict[bytes, bytes] = field(default_factory=dict)
    pending_del: set[bytes] = field(default_factory=set)
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    meta: dict[bytes, bytes] = field(default_factory=dict)
    expect_offsets: dict[tuple[str, int], int | None] = field(default_factory=dict)


def check_expected_offsets(delta: StateDelta, stored: Mapping[tuple[str, int], int]) -> None:
    """Raise when the stored offsets of ``delta.group`` differ from ``delta.expect_offsets``."""
    for tp, want in delta.expect_offsets.items():
        have = stored.get(tp)
        if have != want:
            raise OffsetRegressionError(
                f"commit fenced: {delta.group}/{tp[0]}/{tp[1]} has stored offset {have}, this worker "
                f"expected {want} (another worker committed it); reload the partition and seek")


class SequenceStore(ABC):
    """Per-user lifelong sequences plus worker state, behind one atomic commit."""

    #: Behaviors kept per user (oldest trimmed, positions stay absolute).
    cap: int

    @abstractmethod
    def read(self, user: int, end: int | None = None, max_len: int | None = None) -> Behaviors:
        """The last ``max_len`` behaviors before absolute position ``end`` (None: latest)."""

    def read_many(
        self, users: Sequence[int], ends: Sequence[int | None], max_len: int | None = None
    ) -> list[Behaviors]:
        """Batched :meth:`read`; backends override with one round trip / one read transaction."""
        return [self.read(u, e, max_len) for u, e in zip(users, ends, strict=True)]

    @abstractmethod
    def length(self, user: int) -> int:
        """Absolute end position of the user's sequence (0 for an unknown user)."""

    def lengths(self, users: Sequence[int]) -> list[int]:
        """Batched :meth:`length`; backends override with one round trip / one read transaction."""
        return [self.length(u) for u in users]

    @abstractmethod
    def commit(self, delta: StateDelta) -> None:
        """Apply a batch's appends, pending edits, offsets and meta atomically."""

    @abstractmethod
    def offsets(self, group: str) -> dict[tuple[str, int], int]:
        """Stored next-offsets of a consumer group: {(topic, partition): offset}."""

    @abstractmethod
    def pending_items(self, prefix: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        """Pending-impression entries whose key starts with ``prefix``, in key order."""

    @abstractmethod
    def get_meta(self, key: bytes) -> bytes | None: ...

    @abstractmethod
    def users(self) -> Iterator[int]:
        """Every user with a sequence, in ascending id order."""

    @abstractmethod
    def close(self) -> None: ...

    # ---- derived, backend-independent -------------------------------------------------------

    def digest(self) -> str:
        """One stable hash over all sequences, pending impressions and stored offsets.

        Computed from logical content (not the physical layout), so two stores of any backend that
        hold the same state have the same digest.
        """
        h = hashlib.sha256()
        users = list(self.users())
        for i in range(0, len(users), DIGEST_READ_BATCH):
            chunk = users[i:i + DIGEST_READ_BATCH]
            for user, b in zip(chunk, self.read_many(chunk, [None] * len(chunk)), strict=True):
                h.update(struct.pack(">QQQ", user, b.start, b.end))
                for col in (b.item, b.category, b.action, b.ts):
                    h.update(np.ascontiguousarray(col).astype(col.dtype.newbyteorder("<"), copy=False).tobytes())
        h.update(b"|pending|")
        for k, v in self.pending_items():
            h.update(struct.pack(">I", len(k)) + k + struct.pack(">I", len(v)) + v)
        h.update(b"|offsets|")
        for group in sorted(self.groups()):
            for (topic, part), off in sorted(self.offsets(group).items()):
                h.update(f"{group}/{topic}/{part}={off};".encode())
        return h.hexdigest()

    @abstractmethod
    def groups(self) -> list[str]:
        """Consumer groups with stored offsets."""

    def stats(self) -> Mapping[str, int | float | str]:
        n_users = 0
        n_beh = 0
        longest = 0
        users = list(self.users())
        for i in range(0, len(users), DIGEST_READ_BATCH):
            chunk = users[i:i + DIGEST_READ_BATCH]
            for b in self.read_many(chunk, [None] * len(chunk)):
                n = len(b)
                n_users += 1
                n_beh += n
                longest = max(longest, n)
        n_pending = sum(1 for _ in self.pending_items())
        return {
            "users": n_users,
            "behaviors": n_beh,
            "longest_sequence": longest,
            "pending_impressions": n_pending,
            "cap": self.cap,
        }

    def __enter__(self) -> SequenceStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
