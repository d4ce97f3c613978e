"""Compact columnar encoding of behavior chunks, shared by the LMDB and Redis backends.

A chunk holds up to ``CHUNK_ROWS`` consecutive behaviors of one user, at absolute positions
``[chunk_index * CHUNK_ROWS, ...)``. Layout (little-endian): ``u16 n`` then the four columns
back to back: item ``i64[n]``, category ``i64[n]``, ts ``i64[n]``, action ``u8[n]``. An append
rewrites only the tail chunk (at most ``CHUNK_ROWS`` rows) and adds new ones, never the whole
sequence.
"""

from __future__ import annotations

import struct

import numpy as np

from pipeline.state.base import Behaviors

__all__ = ["CHUNK_ROWS", "decode_chunk", "encode_chunk", "encode_pos", "decode_pos"]

#: Rows per chunk. 256 rows = 6.4 KB: a tail rewrite costs little, and reading the last 1,000 of a
#: 100,000-long sequence touches 5 chunks (one LMDB cursor range). Larger chunks make appends rewrite
#: more bytes; smaller ones make long reads touch more keys. Positions derive from it, so changing it
#: needs a store rebuild (the store records it and refuses to open with another value).
CHUNK_ROWS = 256

_I64 = np.dtype("<i8")


def encode_chunk(b: Behaviors) -> bytes:
    n = len(b)
    assert n <= CHUNK_ROWS
    return b"".join(
        (
            struct.pack("<H", n),
            b.item.astype(_I64, copy=False).tobytes(),
            b.category.astype(_I64, copy=False).tobytes(),
            b.ts.astype(_I64, copy=False).tobytes(),
            b.action.astype(np.uint8, copy=False).tobytes(),
        )
    )


def decode_chunk(buf: bytes | memoryview, start: int) -> Behaviors:
    (n,) = struct.unpack_from("<H", buf, 0)
    o = 2
    item = np.frombuffer(buf, _I64, n, o).astype(np.int64)
    o += 8 * n
    cat = np.frombuffer(buf, _I64, n, o).astype(np.int64)
    o += 8 * n
    ts = np.frombuffer(buf, _I64, n, o).astype(np.int64)
    o += 8 * n
    action = np.frombuffer(buf, np.uint8, n, o).copy()
    return Behaviors(item, cat, action, ts, start)


def encode_pos(start: int, end: int) -> bytes:
    return struct.pack(">QQ", start, end)


def decode_pos(buf: bytes | memoryview | None) -> tuple[int, int]:
    if buf is None:
        return 0, 0
    s, e = struct.unpack(">QQ", bytes(buf))
    return s, e
