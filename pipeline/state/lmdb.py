"""LMDB sequence store: the embedded default.

One writer process (the worker) and any number of concurrent reader processes (trainer, scorer):
LMDB readers see a consistent MVCC snapshot per read transaction and never block the writer.
Each :meth:`commit` is one write transaction, durable (fsync) when it returns.

Layout (named databases): ``pos`` user -> (start, end); ``seq`` user‖chunk -> columnar chunk
(see ``serialization``); ``pending`` opaque worker keys; ``offsets`` group‖topic‖partition ->
next offset; ``meta`` small worker values and the store's format record.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import lmdb
import numpy as np

from pipeline.exceptions import StoreConfigError
from pipeline.state._chunks import append_chunks, clip, read_range
from pipeline.state.base import (
    DEFAULT_LIFELONG_CAP,
    Behaviors,
    GroupedAppends,
    SequenceStore,
    StateDelta,
    check_expected_offsets,
    empty_behaviors,
)
from pipeline.state.serialization import CHUNK_ROWS, decode_chunk, decode_pos, encode_pos

__all__ = ["LmdbSequenceStore", "append_chunks_many_ref"]

#: Virtual address space reserved for the map. Sparse on Linux: disk use grows with data, not with
#: this number. 1 TiB holds ~40 billion behaviors; raise it with ``?map_size=`` for more.
DEFAULT_MAP_SIZE = 1 << 40

_FORMAT_KEY = b"__format__"


def _seq_key(user: int, chunk: int) -> bytes:
    return struct.pack(">QI", user, chunk)


def _user_key(user: int) -> bytes:
    return struct.pack(">Q", user)


def append_chunks_many_ref(users: np.ndarray, bounds: np.ndarray, item: np.ndarray, category: np.ndarray,
                           ts: np.ndarray, action: np.ndarray, pos_get: Callable[[bytes], bytes | None],
                           seq_get: Callable[[bytes], bytes | None], chunk_rows: int, cap: int,
                           error: type[Exception]) -> tuple[list[tuple[bytes, bytes]], list[bytes],
                                                            list[tuple[bytes, bytes]]]:
    """Every user's append at once, on LMDB's keys (:func:`_user_key`, :func:`_seq_key`) and
    position records (``serialization.encode_pos``).

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
        uk = _user_key(user)
        rec = pos_get(uk)
        start = end = 0
        if rec is not None:
            if len(rec) != 16:
                raise error(f"store is corrupt: the position record of user {user} has {len(rec)} bytes, not 16 "
                            f"(rebuild the store)")
            start, end = decode_pos(rec)
        tail = seq_get(_seq_key(user, end // chunk_rows)) if end % chunk_rows else None
        try:
            w, d, new_start, new_end = append_chunks(
                start, end, None if tail is None else bytes(tail), item[a:z].tobytes(), category[a:z].tobytes(),
                ts[a:z].tobytes(), action[a:z].tobytes(), cap, chunk_rows)
        except StoreConfigError as e:
            raise error(str(e)) from None
        writes += [(_seq_key(user, ci), chunk) for ci, chunk in w.items()]
        deletes += [_seq_key(user, ci) for ci in d]
        positions.append((uk, encode_pos(new_start, new_end)))
    return writes, deletes, positions


try:  # every user's chunk plan in one C call (pipeline/_storecore.c); the reference otherwise
    from pipeline._storecore import append_chunks_many as _append_chunks_many
except ImportError:  # pragma: no cover - built by `make` (setup.py); tests require it
    _append_chunks_many = append_chunks_many_ref


def offset_key(group: str, topic: str, partition: int) -> bytes:
    return f"{group}\x00{topic}\x00".encode() + struct.pack(">I", partition)


def parse_offset_key(k: bytes) -> tuple[str, str, int]:
    g, t, rest = k.split(b"\x00", 2)
    return g.decode(), t.decode(), struct.unpack(">I", rest)[0]


class LmdbSequenceStore(SequenceStore):
    def __init__(self, path: str | os.PathLike[str], cap: int = DEFAULT_LIFELONG_CAP,
                 map_size: int = DEFAULT_MAP_SIZE, readonly: bool = False) -> None:
        self.path = Path(path)
        self.cap = int(cap)
        if self.cap <= 0:
            raise StoreConfigError(f"lifelong cap must be positive, got {cap}")
        if readonly and not (self.path / "data.mdb").exists():
            raise StoreConfigError(f"no LMDB store at {self.path} (start the worker first)")
        self.path.mkdir(parents=True, exist_ok=True)
        self.env = lmdb.open(str(self.path), map_size=map_size, max_dbs=8, readonly=readonly,
                             lock=True, readahead=False, max_readers=512)
        self._pos = self.env.open_db(b"pos", create=not readonly)
        self._seq = self.env.open_db(b"seq", create=not readonly)
        self._pending = self.env.open_db(b"pending", create=not readonly)
        self._offsets = self.env.open_db(b"offsets", create=not readonly)
        self._meta = self.env.open_db(b"meta", create=not readonly)
        fmt = f"chunk_rows={CHUNK_ROWS}".encode()
        with self.env.begin(write=not readonly, db=self._meta) as txn:
            have = txn.get(_FORMAT_KEY)
            if have is None and not readonly:
                txn.put(_FORMAT_KEY, fmt)
            elif have is not None and bytes(have) != fmt:
                raise StoreConfigError(f"store at {self.path} has format {bytes(have).decode()}, code expects "
                                       f"{fmt.decode()}; rebuild the store")

    # ---- reads --------------------------------------------------------------------------------
    def _read_txn(self, txn: lmdb.Transaction, user: int, end: int | None, max_len: int | None) -> Behaviors:
        start, stop = decode_pos(txn.get(_user_key(user), db=self._pos))
        lo, hi = read_range(start, stop, end, max_len)
        if hi <= lo:
            return empty_behaviors(lo)
        parts: list[Behaviors] = []
        cur = txn.cursor(db=self._seq)
        first, last = lo // CHUNK_ROWS, (hi - 1) // CHUNK_ROWS
        if cur.set_key(_seq_key(user, first)):
            for ci in range(first, last + 1):
                buf = cur.value()
                parts.append(decode_chunk(buf, ci * CHUNK_ROWS))
                if ci < last and not cur.next():
                    break
        return clip(Behaviors.concat(parts), lo, hi)

    def read(self, user: int, end: int | None = None, max_len: int | None = None) -> Behaviors:
        with self.env.begin(buffers=True) as txn:
            return self._read_txn(txn, user, end, max_len)

    def read_many(self, users: Sequence[int], ends: Sequence[int | None],
                  max_len: int | None = None) -> list[Behaviors]:
        with self.env.begin(buffers=True) as txn:
            return [self._read_txn(txn, u, e, max_len) for u, e in zip(users, ends, strict=True)]

    def length(self, user: int) -> int:
        with self.env.begin() as txn:
            return decode_pos(txn.get(_user_key(user), db=self._pos))[1]

    def lengths(self, users: Sequence[int]) -> list[int]:
        with self.env.begin(db=self._pos) as txn:
            return [decode_pos(txn.get(_user_key(u)))[1] for u in users]

    def offsets(self, group: str) -> dict[tuple[str, int], int]:
        out: dict[tuple[str, int], int] = {}
        prefix = f"{group}\x00".encode()
        with self.env.begin(db=self._offsets) as txn:
            cur = txn.cursor()
            if cur.set_range(prefix):
                for k, v in cur:
                    if not k.startswith(prefix):
                        break
                    _, t, p = parse_offset_key(k)
                    out[(t, p)] = struct.unpack(">Q", v)[0]
        return out

    def groups(self) -> list[str]:
        with self.env.begin(db=self._offsets) as txn:
            return sorted({parse_offset_key(k)[0] for k, _ in txn.cursor()})

    def pending_items(self, prefix: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        with self.env.begin(db=self._pending) as txn:
            cur = txn.cursor()
            items: list[tuple[bytes, bytes]] = []
            if cur.set_range(prefix):
                for k, v in cur:
                    if not k.startswith(prefix):
                        break
                    items.append((bytes(k), bytes(v)))
        yield from items

    def get_meta(self, key: bytes) -> bytes | None:
        with self.env.begin(db=self._meta) as txn:
            v = txn.get(key)
            return None if v is None else bytes(v)

    def users(self) -> Iterator[int]:
        with self.env.begin(db=self._pos) as txn:
            keys = [struct.unpack(">Q", k)[0] for k in txn.cursor().iternext(keys=True, values=False)]
        yield from keys

    # ---- the one write path ---------------------------------------------------------------------
    def commit(self, delta: StateDelta) -> None:
        # One write transaction: an exception anywhere (a fenced commit included) aborts all of it.
        with self.env.begin(write=True) as txn:
            if delta.expect_offsets:
                stored = {}
                for tp in delta.expect_offsets:
                    v = txn.get(offset_key(delta.group, *tp), db=self._offsets)
                    if v is not None:
                        stored[tp] = struct.unpack(">Q", v)[0]
                check_expected_offsets(delta, stored)
            appends = GroupedAppends.of(delta.appends)
            if len(appends):
                seq = txn.cursor(db=self._seq)
                pos = txn.cursor(db=self._pos)
                writes, deletes, positions = _append_chunks_many(
                    appends.users, appends.bounds, appends.item, appends.category, appends.ts, appends.action,
                    pos.get, seq.get, CHUNK_ROWS, self.cap, StoreConfigError)
                seq.putmulti(writes)
                for k in deletes:
                    txn.delete(k, db=self._seq)
                pos.putmulti(positions)
            for k in delta.pending_del:
                txn.delete(k, db=self._pending)
            if delta.pending_put:
                txn.cursor(db=self._pending).putmulti(delta.pending_put.items())
            for (topic, part), off in delta.offsets.items():
                txn.put(offset_key(delta.group, topic, part), struct.pack(">Q", off), db=self._offsets)
            for k, v in delta.meta.items():
                txn.put(k, v, db=self._meta)

    def close(self) -> None:
        self.env.close()
