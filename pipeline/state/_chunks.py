"""Chunk arithmetic shared by the chunked backends (LMDB, Redis): which chunks an append
rewrites, which a lifelong-cap trim deletes, which a read touches."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.state.base import Behaviors
from pipeline.state.serialization import CHUNK_ROWS


@dataclass(frozen=True)
class AppendPlan:
    writes: dict[int, Behaviors]  # chunk index -> full new chunk contents
    deletes: list[int]  # chunk indices dropped by the lifelong cap
    start: int
    end: int


def tail_chunk_index(end: int) -> int | None:
    """Index of the partially filled last chunk, or None when the last chunk is full/absent."""
    return end // CHUNK_ROWS if end % CHUNK_ROWS else None


def plan_append(start: int, end: int, tail: Behaviors | None, new: Behaviors, cap: int) -> AppendPlan:
    """Plan an append of ``new`` after position ``end``; ``tail`` is the current partial tail chunk."""
    parts = [tail, new] if tail is not None and len(tail) else [new]
    merged = Behaviors.concat(parts)
    first = merged.start if tail is not None and len(tail) else end
    writes: dict[int, Behaviors] = {}
    pos = first
    k = 0
    n = len(merged)
    while k < n:
        ci = pos // CHUNK_ROWS
        take = min(CHUNK_ROWS - pos % CHUNK_ROWS, n - k)
        sl = slice(k, k + take)
        writes[ci] = Behaviors(merged.item[sl], merged.category[sl], merged.action[sl], merged.ts[sl], pos)
        pos += take
        k += take
    new_end = end + len(new)
    new_start = max(start, new_end - cap)
    # Whole chunks entirely below the new start are deleted; a partially trimmed chunk stays and
    # reads clip it to `start`, so positions remain absolute.
    deletes = list(range(start // CHUNK_ROWS, new_start // CHUNK_ROWS))
    for ci in deletes:
        writes.pop(ci, None)
    return AppendPlan(writes, deletes, new_start, new_end)


def read_range(start: int, end: int, req_end: int | None, max_len: int | None) -> tuple[int, int]:
    """Clip a read request to what the store holds: returns [lo, hi)."""
    hi = end if req_end is None else max(start, min(req_end, end))
    lo = start if max_len is None else max(start, hi - max_len)
    return lo, hi


def clip(b: Behaviors, lo: int, hi: int) -> Behaviors:
    a, z = lo - b.start, hi - b.start
    return Behaviors(b.item[a:z], b.category[a:z], b.action[a:z], b.ts[a:z], lo)
