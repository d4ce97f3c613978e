"""Chunk arithmetic shared by the chunked backends (LMDB, Redis): which chunks an append
rewrites, which a lifelong-cap trim deletes, which a read touches."""

from __future__ import annotations

import struct
from collections.abc import Callable

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
    (``pipeline.state.redis``), LMDB in C (``pipeline/_storecore.c``, via
    :func:`append_chunks_many_ref`'s contract).
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


_POS = struct.Struct(">QQ")
_USER_KEY = struct.Struct(">Q")
_SEQ_KEY = struct.Struct(">QI")


def append_chunks_many_ref(users: np.ndarray, bounds: np.ndarray, item: np.ndarray, category: np.ndarray,
                           ts: np.ndarray, action: np.ndarray, pos_get: Callable[[bytes], bytes | None],
                           seq_get: Callable[[bytes], bytes | None], chunk_rows: int, cap: int,
                           error: type[Exception]) -> tuple[list[tuple[bytes, bytes]], list[bytes],
                                                            list[tuple[bytes, bytes]]]:
    """Every user's append at once, for a store keyed as LMDB keys it (``user_key`` = u64 BE user,
    ``seq_key`` = user_key + u32 BE chunk index, position record = u64 BE start and end).

    User ``users[i]`` appends rows ``[bounds[i], bounds[i + 1])`` of the columns; ``pos_get`` and
    ``seq_get`` read the stored position record and chunks. Returns the chunks to put as
    ``(seq_key, chunk)``, the seq_keys to delete and the new position records as
    ``(user_key, record)``, in user order. The reference of ``pipeline._storecore`` (same signature,
    same results); a corrupt store raises ``error``.
    """
    if not 0 < chunk_rows <= 0xFFFF or cap <= 0:
        raise ValueError("chunk_rows must be in [1, 65535] and cap positive")
    writes: list[tuple[bytes, bytes]] = []
    deletes: list[bytes] = []
    positions: list[tuple[bytes, bytes]] = []
    b = bounds.tolist()
    for i, user in enumerate(users.tolist()):
        a, z = b[i], b[i + 1]
        if z == a:
            continue
        if user < 0:
            raise OverflowError(f"user {user}: a user key is an unsigned 64-bit number")
        uk = _USER_KEY.pack(user)
        rec = pos_get(uk)
        start = end = 0
        if rec is not None:
            if len(rec) != 16:
                raise error(f"store is corrupt: the position record of user {user} has {len(rec)} bytes, not 16 "
                            f"(rebuild the store)")
            start, end = _POS.unpack(rec)
        tail = seq_get(_SEQ_KEY.pack(user, end // chunk_rows)) if end % chunk_rows else None
        try:
            w, d, new_start, new_end = append_chunks(
                start, end, None if tail is None else bytes(tail), item[a:z].tobytes(), category[a:z].tobytes(),
                ts[a:z].tobytes(), action[a:z].tobytes(), cap, chunk_rows)
        except StoreConfigError as e:
            raise error(str(e)) from None
        writes += [(_SEQ_KEY.pack(user, ci), chunk) for ci, chunk in w.items()]
        deletes += [_SEQ_KEY.pack(user, ci) for ci in d]
        positions.append((uk, _POS.pack(new_start, new_end)))
    return writes, deletes, positions


def column_bytes(b: Behaviors) -> tuple[bytes, bytes, bytes, bytes]:
    """The four little-endian columns of ``b`` as bytes (item, category, ts, action)."""
    return (b.item.astype(_I64, copy=False).tobytes(), b.category.astype(_I64, copy=False).tobytes(),
            b.ts.astype(_I64, copy=False).tobytes(), b.action.astype(np.uint8, copy=False).tobytes())
