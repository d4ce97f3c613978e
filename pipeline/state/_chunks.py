"""Chunk arithmetic shared by the chunked backends (LMDB, Redis): which chunks an append
rewrites, which a lifelong-cap trim deletes, which a read touches."""

from __future__ import annotations

import struct

import numpy as np

from pipeline.exceptions import StoreConfigError
from pipeline.state.base import Behaviors
from pipeline.state.serialization import CHUNK_ROWS

_U16 = struct.Struct("<H")
_I64 = np.dtype("<i8")


def read_range(start: int, end: int, req_end: int | None, max_len: int | None) -> tuple[int, int]:
    """Clip a read request to what the store holds: returns [lo, hi)."""
    hi = end if req_end is None else max(start, min(req_end, end))
    lo = start if max_len is None else max(start, hi - max_len)
    return lo, hi


def clip(b: Behaviors, lo: int, hi: int) -> Behaviors:
    a, z = lo - b.start, hi - b.start
    return Behaviors(b.item[a:z], b.category[a:z], b.action[a:z], b.ts[a:z], lo)


def append_chunks(start: int, end: int, tail: bytes | None, item: bytes, category: bytes, ts: bytes, action: bytes,
                  cap: int, chunk_rows: int = CHUNK_ROWS) -> tuple[dict[int, bytes], list[int], int, int]:
    """One user's append, on encoded columns (the tail chunk is never decoded into arrays): which
    chunks to write, which to delete.

    ``tail`` is the stored chunk that holds position ``end - 1`` when ``end`` is not on a chunk
    boundary (None otherwise); the new rows come as little-endian column bytes (item/category/ts
    ``i64``, action ``u8``). Returns ``(writes, deletes, new_start, new_end)``: encoded chunks to put
    by chunk index, chunk indices to delete (lifelong cap: the whole chunks below the new start; a
    partly trimmed chunk stays and reads clip it, so positions stay absolute), and the new position
    range. The Redis backend runs the same algorithm inside its commit script
    (``pipeline.state.redis``), LMDB every user at once (``pipeline.state.lmdb``:
    ``append_chunks_many_ref`` around this function, and its C twin ``pipeline/_storecore.c``).
    """
    n_new = len(action)
    first = end
    if end % chunk_rows:
        tci = end // chunk_rows
        if tail is None:
            raise StoreConfigError(f"store is corrupt: tail chunk {tci} is missing (rebuild the store)")
        tn = _U16.unpack_from(tail, 0)[0] if len(tail) >= 2 else 0
        first = tci * chunk_rows
        if len(tail) < 2 or first + tn != end:
            raise StoreConfigError(f"store is corrupt: tail chunk {tci} holds {tn} rows, position says "
                                   f"{end - first} (rebuild the store)")
        if len(tail) != 2 + 25 * tn:
            raise StoreConfigError(f"store is corrupt: tail chunk {tci} has {len(tail)} bytes for {tn} rows "
                                   f"(rebuild the store)")
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
    keep_from = new_start // chunk_rows
    writes: dict[int, bytes] = {}
    pos = first
    k = 0
    while k < n:
        ci = pos // chunk_rows
        take = min(chunk_rows - pos % chunk_rows, n - k)
        if ci >= keep_from:
            a, z = 8 * k, 8 * (k + take)
            writes[ci] = b"".join((_U16.pack(take), item[a:z], category[a:z], ts[a:z], action[k:k + take]))
        pos += take
        k += take
    return writes, list(range(start // chunk_rows, keep_from)), new_start, new_end


def column_bytes(b: Behaviors) -> tuple[bytes, bytes, bytes, bytes]:
    """The four little-endian columns of ``b`` as bytes (item, category, ts, action)."""
    return (b.item.astype(_I64, copy=False).tobytes(), b.category.astype(_I64, copy=False).tobytes(),
            b.ts.astype(_I64, copy=False).tobytes(), b.action.astype(np.uint8, copy=False).tobytes())
