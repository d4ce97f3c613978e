"""Chunk arithmetic shared by the chunked backends (LMDB, Redis): which chunks an append
rewrites, which a lifelong-cap trim deletes, which a read touches."""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from pipeline.exceptions import StoreConfigError
from pipeline.state.base import Behaviors
from pipeline.state.serialization import CHUNK_ROWS

_U16 = struct.Struct("<H")
_I64 = np.dtype("<i8")


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


def append_chunks(start: int, end: int, tail: bytes | None, item: bytes, category: bytes, ts: bytes,
                  action: bytes, cap: int) -> tuple[dict[int, bytes], list[int], int, int]:
    """Byte-level append for the chunked backends: the same plan as :func:`plan_append`, on encoded
    columns, without decoding the tail chunk into arrays.

    ``tail`` is the stored chunk that holds position ``end - 1`` when ``end`` is not on a chunk
    boundary (None otherwise); the new rows come as little-endian column bytes (item/category/ts
    ``i64``, action ``u8``). Returns ``(writes, deletes, new_start, new_end)``: encoded chunks to put
    by chunk index, chunk indices to delete (lifelong cap), and the new position range. The Redis
    backend runs the same algorithm inside its commit script (``pipeline.state.redis``).
    """
    n_new = len(action)
    tci = tail_chunk_index(end)
    first = end
    if tci is not None:
        if tail is None:
            raise StoreConfigError(f"store is corrupt: tail chunk {tci} is missing (rebuild the store)")
        (tn,) = _U16.unpack_from(tail, 0)
        first = tci * CHUNK_ROWS
        if first + tn != end:
            raise StoreConfigError(f"store is corrupt: tail chunk {tci} holds {tn} rows, position says "
                                   f"{end - first} (rebuild the store)")
        o = 2
        item = tail[o:o + 8 * tn] + item
        o += 8 * tn
        category = tail[o:o + 8 * tn] + category
        o += 8 * tn
        ts = tail[o:o + 8 * tn] + ts
        o += 8 * tn
        action = tail[o:o + tn] + action
    n = len(action)
    new_end = end + n_new
    new_start = max(start, new_end - cap)
    keep_from = new_start // CHUNK_ROWS
    writes: dict[int, bytes] = {}
    pos = first
    k = 0
    while k < n:
        ci = pos // CHUNK_ROWS
        take = min(CHUNK_ROWS - pos % CHUNK_ROWS, n - k)
        if ci >= keep_from:
            a, z = 8 * k, 8 * (k + take)
            writes[ci] = b"".join((_U16.pack(take), item[a:z], category[a:z], ts[a:z], action[k:k + take]))
        pos += take
        k += take
    return writes, list(range(start // CHUNK_ROWS, keep_from)), new_start, new_end


def column_bytes(b: Behaviors) -> tuple[bytes, bytes, bytes, bytes]:
    """The four little-endian columns of ``b`` as bytes (item, category, ts, action)."""
    return (b.item.astype(_I64, copy=False).tobytes(), b.category.astype(_I64, copy=False).tobytes(),
            b.ts.astype(_I64, copy=False).tobytes(), b.action.astype(np.uint8, copy=False).tobytes())
