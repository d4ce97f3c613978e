"""In-memory sequence store: for tests and as the executable definition of the contract."""

from __future__ import annotations

from collections.abc import Iterator

from pipeline.state._chunks import clip, read_range
from pipeline.state.base import (
    DEFAULT_LIFELONG_CAP,
    Behaviors,
    SequenceStore,
    StateDelta,
    check_expected_offsets,
    empty_behaviors,
)

__all__ = ["MemorySequenceStore"]


class MemorySequenceStore(SequenceStore):
    def __init__(self, cap: int = DEFAULT_LIFELONG_CAP) -> None:
        self.cap = cap
        self._seq: dict[int, Behaviors] = {}
        self._pending: dict[bytes, bytes] = {}
        self._offsets: dict[str, dict[tuple[str, int], int]] = {}
        self._meta: dict[bytes, bytes] = {}

    def read(self, user: int, end: int | None = None, max_len: int | None = None) -> Behaviors:
        b = self._seq.get(user)
        if b is None:
            return empty_behaviors()
        lo, hi = read_range(b.start, b.end, end, max_len)
        return clip(b, lo, hi) if hi > lo else empty_behaviors(lo)

    def length(self, user: int) -> int:
        b = self._seq.get(user)
        return 0 if b is None else b.end

    def commit(self, delta: StateDelta) -> None:
        check_expected_offsets(delta, self._offsets.get(delta.group, {}))
        for user, new in delta.appends.items():
            if not len(new):
                continue
            old = self._seq.get(user)
            start = old.end if old is not None else 0
            new = Behaviors(new.item, new.category, new.action, new.ts, start)
            merged = Behaviors.concat([old, new]) if old is not None else new
            self._seq[user] = merged.tail(self.cap)
        for k in delta.pending_del:
            self._pending.pop(k, None)
        self._pending.update(delta.pending_put)
        self._offsets.setdefault(delta.group, {}).update(delta.offsets)
        self._meta.update(delta.meta)

    def offsets(self, group: str) -> dict[tuple[str, int], int]:
        return dict(self._offsets.get(group, {}))

    def groups(self) -> list[str]:
        return sorted(g for g, o in self._offsets.items() if o)

    def pending_items(self, prefix: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        yield from sorted((k, v) for k, v in self._pending.items() if k.startswith(prefix))

    def get_meta(self, key: bytes) -> bytes | None:
        return self._meta.get(key)

    def users(self) -> Iterator[int]:
        yield from sorted(self._seq)

    def close(self) -> None:
        pass
