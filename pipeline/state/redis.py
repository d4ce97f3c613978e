"""Redis sequence store: one store shared by many workers, scorers and trainers on other hosts.

Same chunked columnar layout as LMDB (``serialization``: up to ``CHUNK_ROWS`` behaviors per chunk,
four little-endian columns), with one difference: a user's open (not yet full) tail chunk is a
string key of its own, its columns at a full chunk's offsets, so a commit writes the new rows where
they go (``SETRANGE``) instead of rewriting the tail. Redis's Lua hashes every byte of every string a
script creates; rewriting each touched user's tail in the script was most of redis-server's CPU
during a worker run. A tail that fills up moves into the hash as a chunk (a full chunk's fixed
layout is the chunk format), and reads turn an open tail back into the chunk format. Every
:meth:`RedisSequenceStore.commit` is ONE Lua script (atomic: no other command runs while it does),
and a read is one read-only script per user, so a reader always sees one commit or the next, never
half of one. ``read_many``, ``lengths`` and the digest scan pipeline their scripts: one round trip
per call.

Key layout (namespace ``ns``, default ``ctrstream``; ``?namespace=NAME`` in the URI)::

    {ns:u:<user, 16 hex digits>}   HASH  "s", "e": start/end position (decimal);
                                         "<chunk index>": encoded full chunk
    {ns:u:<user, 16 hex digits>}:t STRING the open tail chunk: row count (u16), then the four
                                         columns at offsets 2, 2+8R, 2+16R, 2+24R (R = CHUNK_ROWS)
    {ns}:offsets                   HASH  group \\0 topic \\0 partition (u32 BE) -> next offset
    {ns}:meta                      HASH  worker values (watermarks) and the "__format__" record
    {ns}:pending                   HASH  pending-impression key -> value
    {ns}:pending:keys              ZSET  the same keys, score 0: prefix scans in key order

Redis Cluster. Each user's hash is one key with its own hash tag, so a user's data lives in one
slot and a read is a single-slot script: reads spread over the whole cluster and its replicas.
The commit is the catch: it updates the users of a batch AND the offsets atomically, and a Lua
script (or MULTI/EXEC) may only touch keys of ONE slot on a cluster. So, honestly:

* standalone Redis (or Redis with replicas/Sentinel for failover): everything works as described;
  a single primary takes every commit. This is what the tests run.
* Redis Cluster: open the store with ``?single_slot=1``. Every key then carries the tag ``{ns}``,
  so a commit is a single-slot script and stays atomic, but the whole namespace lives on ONE shard:
  the cluster gives failover and replica reads, not write scale-out. To spread writes, give each
  worker group (each topic or tenant) its own namespace, which lands on its own slot.
* Not done (the way to real write scale-out): one commit per slot with per-user applied-offset
  marks, so a replay skips users already applied. It makes the point-in-time ``seq_pos`` of a
  replayed impression depend on which slots committed before a crash; we chose exactness instead.

Durability: a commit is atomic in memory and in the AOF (a script's effects are written as one
unit). With ``appendonly yes`` and ``appendfsync always`` a returned commit survives a Redis crash;
with ``everysec`` a crash can lose the last second of commits, but it loses them whole (offsets
with their state), so the worker replays them and the state is still exact (samples are then
re-emitted with the same ids).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import Any

from pipeline.exceptions import OffsetRegressionError, StoreConfigError
from pipeline.state._chunks import clip, column_bytes, read_range
from pipeline.state.base import DEFAULT_LIFELONG_CAP, Behaviors, SequenceStore, StateDelta, empty_behaviors
from pipeline.state.lmdb import offset_key, parse_offset_key
from pipeline.state.serialization import CHUNK_ROWS, decode_chunk

__all__ = ["RedisSequenceStore"]

_FORMAT_KEY = b"__format__"
#: The stored format: chunks of CHUNK_ROWS rows in each user's hash, the open tail chunk in its own
#: key (``open_tail=key``). ``_FORMAT_V1`` kept the open tail in the hash too; a store written so is
#: read as it is and moves to this format as it is written to (see ``RedisSequenceStore.__init__``).
_FORMAT = f"chunk_rows={CHUNK_ROWS};open_tail=key".encode()
_FORMAT_V1 = f"chunk_rows={CHUNK_ROWS}".encode()
_NAMESPACE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
#: Pending entries fetched per round trip by ``pending_items`` (ZRANGEBYLEX page + HMGET). A page is
#: ~100 KB of reply: big enough that loading a partition's pending table costs few round trips,
#: small enough that no single reply blocks the server for long.
PENDING_PAGE = 1000
#: Arguments per HSET/HDEL inside the commit script: Lua's ``unpack`` stops at ~8,000 values, so
#: writes are issued in slices well below that.
_LUA_SLICE = 4000

# Commit: fence check, then (pass 1, reads only) plan every user's append, then (pass 2) write. A
# failed check or a corrupt tail returns before any write, so nothing is applied; once writes start
# the script runs to the end (Redis never fails a write inside a script that already wrote).
_COMMIT_LUA = r"""
local cap = tonumber(ARGV[1])
local R = tonumber(ARGV[2])
local nu, ne, nd, np, no, nm = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]),
  tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local SLICE = tonumber(ARGV[9])
local a = 10
local function num(x) return string.format('%.0f', x) end
for i = 1, ne do
  local have = redis.call('HGET', KEYS[1], ARGV[a])
  local want = ARGV[a + 1]
  if want == '' then want = false end
  if have ~= want then return {'fenced', i, have or ''} end
  a = a + 2
end
-- The `take` rows from row k of a new column (W bytes a row); the column itself when that is all of
-- it (Redis hashes every byte of every string a script creates: a copy is not free).
local function rows(new, W, k, take)
  if k == 0 and W * take == #new then return new end
  return string.sub(new, W * k + 1, W * (k + take))
end
-- pass 1, reads only: every user's position and open tail, checked
local plans = {}
for i = 1, nu do
  local key, tkey = KEYS[3 + 2 * i], KEYS[4 + 2 * i]
  local it, ca, ts, ac = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3]
  a = a + 4
  local se = redis.call('HMGET', key, 's', 'e')
  local s = tonumber(se[1]) or 0
  local e = tonumber(se[2]) or 0
  local tn, tci = e % R, math.floor(e / R)  -- rows in the open tail chunk, and its index
  local old = false  -- a store written before the tail key: the open tail is still a hash field
  if tn ~= 0 then
    local hdr = redis.call('GETRANGE', tkey, 0, 1)
    local count
    if #hdr == 2 then
      count = struct.unpack('<H', hdr)
    else
      old = redis.call('HGET', key, num(tci))
      if not old then return {'corrupt', i, 'open tail chunk ' .. num(tci) .. ' is missing'} end
      count = struct.unpack('<H', old)
    end
    if count ~= tn then
      return {'corrupt', i, 'open tail chunk ' .. num(tci) .. ' holds ' .. count .. ' rows, not ' .. tn}
    end
  end
  local new_e = e + #ac
  local new_s = math.max(s, new_e - cap)
  plans[i] = {key, tkey, s, e, tn, tci, old, new_s, new_e, it, ca, ts, ac}
end
-- pass 2: writes. The open tail chunk lives in its own string key, at fixed column offsets (a full
-- chunk's), so new rows are written where they go (SETRANGE: what the commit costs grows with the
-- new rows, not with the tail); a tail that fills up is moved into the hash as a chunk, and a full
-- chunk's fixed layout is the chunk format.
local function to_tail(tkey, off, take, it, ca, ts, ac)
  redis.call('SETRANGE', tkey, 2 + 8 * off, it)
  redis.call('SETRANGE', tkey, 2 + 8 * R + 8 * off, ca)
  redis.call('SETRANGE', tkey, 2 + 16 * R + 8 * off, ts)
  redis.call('SETRANGE', tkey, 2 + 24 * R + off, ac)
  redis.call('SETRANGE', tkey, 0, struct.pack('<H', off + take))
end
local function call_sliced(cmd, key, args, step)
  local i = 1
  while i <= #args do
    local j = math.min(i + step - 1, #args)
    redis.call(cmd, key, unpack(args, i, j))
    i = j + 1
  end
end
for i = 1, nu do
  local key, tkey, s, e, tn, tci, old, new_s, new_e, it, ca, ts, ac = unpack(plans[i])
  local keep = math.floor(new_s / R)
  local w = {}
  if tn ~= 0 then
    if tci < keep then  -- the whole open chunk falls under the lifelong cap (a field: deleted below)
      if not old then redis.call('DEL', tkey) end
    elseif old then  -- move it to the tail key, once (the hash field goes)
      local o = 3
      to_tail(tkey, 0, tn, string.sub(old, o, o + 8 * tn - 1), string.sub(old, o + 8 * tn, o + 16 * tn - 1),
              string.sub(old, o + 16 * tn, o + 24 * tn - 1), string.sub(old, o + 24 * tn, o + 25 * tn - 1))
      redis.call('HDEL', key, num(tci))
    end
  end
  local pos, k, n = e, 0, #ac
  while k < n do
    local ci = math.floor(pos / R)
    local off = pos % R
    local take = math.min(R - off, n - k)
    if ci >= keep then
      if off == 0 and take == R then  -- a whole chunk of new rows
        w[#w + 1] = num(ci)
        w[#w + 1] = struct.pack('<H', R) .. rows(it, 8, k, take) .. rows(ca, 8, k, take) .. rows(ts, 8, k, take)
          .. rows(ac, 1, k, take)
      else
        to_tail(tkey, off, take, rows(it, 8, k, take), rows(ca, 8, k, take), rows(ts, 8, k, take),
                rows(ac, 1, k, take))
        if off + take == R then  -- full: the chunk goes into the hash
          w[#w + 1] = num(ci)
          w[#w + 1] = redis.call('GET', tkey)
          redis.call('DEL', tkey)
        end
      end
    end
    pos = pos + take
    k = k + take
  end
  w[#w + 1] = 's'
  w[#w + 1] = num(new_s)
  w[#w + 1] = 'e'
  w[#w + 1] = num(new_e)
  call_sliced('HSET', key, w, SLICE)
  local dels = {}
  for ci = math.floor(s / R), keep - 1 do dels[#dels + 1] = num(ci) end
  if #dels > 0 then call_sliced('HDEL', key, dels, SLICE) end
end
for i = 1, nd do
  redis.call('HDEL', KEYS[3], ARGV[a])
  redis.call('ZREM', KEYS[4], ARGV[a])
  a = a + 1
end
for i = 1, np do
  redis.call('HSET', KEYS[3], ARGV[a], ARGV[a + 1])
  redis.call('ZADD', KEYS[4], 0, ARGV[a])
  a = a + 2
end
for i = 1, no do
  redis.call('HSET', KEYS[1], ARGV[a], ARGV[a + 1])
  a = a + 2
end
for i = 1, nm do
  redis.call('HSET', KEYS[2], ARGV[a], ARGV[a + 1])
  a = a + 2
end
return {'ok'}
"""

# Read: position and the chunks that cover [lo, hi), from one consistent view of the user's hash and
# open tail key; the open tail goes back in the chunk format (its first e % R rows, column by column).
_READ_LUA = r"""#!lua flags=no-writes
local key, tkey = KEYS[1], KEYS[2]
local R = tonumber(ARGV[1])
local se = redis.call('HMGET', key, 's', 'e')
local s = tonumber(se[1]) or 0
local e = tonumber(se[2]) or 0
local hi = e
if ARGV[2] ~= '' then hi = math.max(s, math.min(tonumber(ARGV[2]), e)) end
local lo = s
if ARGV[3] ~= '' then lo = math.max(s, hi - tonumber(ARGV[3])) end
local out = {string.format('%.0f', s), string.format('%.0f', e)}
if hi <= lo then return out end
local f = {}
for ci = math.floor(lo / R), math.floor((hi - 1) / R) do f[#f + 1] = string.format('%.0f', ci) end
local got = redis.call('HMGET', key, unpack(f))
local n = e % R
if n ~= 0 and math.floor((hi - 1) / R) == math.floor(e / R) and not got[#got]
    and #redis.call('GETRANGE', tkey, 0, 1) == 2 then  -- (a missing tail stays missing: the caller refuses)
  got[#got] = struct.pack('<H', n) .. redis.call('GETRANGE', tkey, 2, 1 + 8 * n)
    .. redis.call('GETRANGE', tkey, 2 + 8 * R, 1 + 8 * R + 8 * n)
    .. redis.call('GETRANGE', tkey, 2 + 16 * R, 1 + 16 * R + 8 * n)
    .. redis.call('GETRANGE', tkey, 2 + 24 * R, 1 + 24 * R + n)
end
for i = 1, #got do out[#out + 1] = got[i] end
return out
"""


def _prefix_end(prefix: bytes) -> bytes | None:
    """Smallest byte string greater than every string that starts with ``prefix`` (None: none)."""
    p = bytearray(prefix)
    while p:
        if p[-1] < 0xFF:
            p[-1] += 1
            return bytes(p)
        p.pop()
    return None


class RedisSequenceStore(SequenceStore):
    """Sequence store on a Redis server (``redis://host:port/db``; see the module docstring).

    ``namespace`` prefixes every key (several stores can share a server); ``single_slot`` puts
    every key under one hash tag for Redis Cluster; ``readonly`` refuses commits (scorers, trainers).
    """

    def __init__(self, url: str, cap: int = DEFAULT_LIFELONG_CAP, namespace: str = "ctrstream",
                 single_slot: bool = False, readonly: bool = False) -> None:
        import redis

        self.cap = int(cap)
        if self.cap <= 0:
            raise StoreConfigError(f"lifelong cap must be positive, got {cap}")
        if not _NAMESPACE_RE.match(namespace):
            raise StoreConfigError(f"redis namespace must match {_NAMESPACE_RE.pattern}, got {namespace!r}")
        self.url = url
        self.namespace = namespace
        self.single_slot = single_slot
        self.readonly = readonly
        self._redis = redis
        self.r: Any = redis.Redis.from_url(url, socket_connect_timeout=5, socket_keepalive=True,
                                           health_check_interval=30)
        tag = "{" + namespace + "}"
        self._k_offsets = f"{tag}:offsets".encode()
        self._k_meta = f"{tag}:meta".encode()
        self._k_pending = f"{tag}:pending".encode()
        self._k_pkeys = f"{tag}:pending:keys".encode()
        self._user_fmt = f"{tag}:u:%016x" if single_slot else "{" + namespace + ":u:%016x}"
        # a user's open tail chunk: its own string key, in the user's slot (the same hash tag)
        self._tail_fmt = self._user_fmt + ":t"
        hex16 = "?" * 16  # the user keys only, not their tail keys
        self._user_glob = (f"{tag}:u:{hex16}" if single_slot else "{" + namespace + f":u:{hex16}}}").encode()
        self._commit_script = self.r.register_script(_COMMIT_LUA)
        self._read_script = self.r.register_script(_READ_LUA)
        try:
            have: Any = self.r.hget(self._k_meta, _FORMAT_KEY)
            if have is None and not readonly:
                self.r.hsetnx(self._k_meta, _FORMAT_KEY, _FORMAT)
                have = self.r.hget(self._k_meta, _FORMAT_KEY)
            if have is not None and bytes(have) == _FORMAT_V1 and not readonly:
                # written before the open-tail key: this code reads and extends both layouts (a user's tail
                # moves to its key at its next commit); the new record keeps older code off the store
                self.r.hset(self._k_meta, _FORMAT_KEY, _FORMAT)
                have = _FORMAT
        except redis.ConnectionError as e:
            raise StoreConfigError(f"cannot reach Redis at {url}: {e} (start redis-server or fix the URI)") from None
        if have is not None and bytes(have) not in (_FORMAT, _FORMAT_V1):
            raise StoreConfigError(f"redis store {namespace!r} at {url} has format {bytes(have).decode()}, code "
                                   f"expects {_FORMAT.decode()}; rebuild the store (or use another namespace)")

    def _ukey(self, user: int) -> bytes:
        return (self._user_fmt % user).encode()

    def _tkey(self, user: int) -> bytes:
        return (self._tail_fmt % user).encode()

    def _user_of(self, key: bytes) -> int:
        # "...:u:<16 hex>" optionally followed by "}"
        return int(key.rstrip(b"}")[-16:], 16)

    # ---- scripts in pipelines, one round trip ------------------------------------------------------
    def _evalsha_many(self, script: Any, calls: list[tuple[list[bytes], list[Any]]]) -> list[Any]:
        """Run ``script`` once per (keys, args) in one pipeline; load it and retry once on NOSCRIPT."""
        for attempt in (0, 1):
            pipe = self.r.pipeline(transaction=False)
            for keys, args in calls:
                pipe.evalsha(script.sha, len(keys), *keys, *args)
            out: list[Any] = pipe.execute(raise_on_error=False)
            if attempt == 0 and any(isinstance(x, self._redis.exceptions.NoScriptError) for x in out):
                self.r.script_load(script.script)
                continue
            for x in out:
                if isinstance(x, Exception):
                    raise x
            return out
        raise AssertionError("unreachable")

    # ---- reads --------------------------------------------------------------------------------------
    def _decode_read(self, reply: list[Any], end: int | None, max_len: int | None) -> Behaviors:
        start, stop = int(reply[0]), int(reply[1])
        lo, hi = read_range(start, stop, end, max_len)
        if hi <= lo:
            return empty_behaviors(lo)
        first = lo // CHUNK_ROWS
        parts = []
        for j, buf in enumerate(reply[2:]):
            if buf is None:  # trimmed between plan and read: cannot happen inside one script
                raise StoreConfigError(f"store is corrupt: chunk {first + j} is missing (rebuild the store)")
            parts.append(decode_chunk(buf, (first + j) * CHUNK_ROWS))
        return clip(Behaviors.concat(parts), lo, hi)

    @staticmethod
    def _read_args(end: int | None, max_len: int | None) -> list[Any]:
        return [CHUNK_ROWS, "" if end is None else int(end), "" if max_len is None else int(max_len)]

    def read(self, user: int, end: int | None = None, max_len: int | None = None) -> Behaviors:
        return self.read_many([user], [end], max_len)[0]

    def read_many(self, users: Sequence[int], ends: Sequence[int | None],
                  max_len: int | None = None) -> list[Behaviors]:
        calls = [([self._ukey(u), self._tkey(u)], self._read_args(e, max_len))
                 for u, e in zip(users, ends, strict=True)]
        if not calls:
            return []
        replies = self._evalsha_many(self._read_script, calls)
        return [self._decode_read(rep, e, max_len) for rep, e in zip(replies, ends, strict=True)]

    def length(self, user: int) -> int:
        v = self.r.hget(self._ukey(user), "e")
        return 0 if v is None else int(v)

    def lengths(self, users: Sequence[int]) -> list[int]:
        if not users:
            return []
        pipe = self.r.pipeline(transaction=False)
        for u in users:
            pipe.hget(self._ukey(u), "e")
        return [0 if v is None else int(v) for v in pipe.execute()]

    def offsets(self, group: str) -> dict[tuple[str, int], int]:
        out: dict[tuple[str, int], int] = {}
        for k, v in self.r.hgetall(self._k_offsets).items():
            g, t, p = parse_offset_key(k)
            if g == group:
                out[(t, p)] = int(v)
        return out

    def groups(self) -> list[str]:
        return sorted({parse_offset_key(k)[0] for k in self.r.hkeys(self._k_offsets)})

    def pending_items(self, prefix: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        lo: bytes = b"[" + prefix if prefix else b"-"
        hi_end = _prefix_end(prefix) if prefix else None
        hi: bytes = b"(" + hi_end if hi_end is not None else b"+"
        while True:
            keys = self.r.zrangebylex(self._k_pkeys, lo, hi, start=0, num=PENDING_PAGE)
            if not keys:
                return
            vals = self.r.hmget(self._k_pending, keys)
            for k, v in zip(keys, vals, strict=True):
                if v is not None:
                    yield bytes(k), bytes(v)
            if len(keys) < PENDING_PAGE:
                return
            lo = b"(" + bytes(keys[-1])

    def get_meta(self, key: bytes) -> bytes | None:
        v = self.r.hget(self._k_meta, key)
        return None if v is None else bytes(v)

    def users(self) -> Iterator[int]:
        found = {self._user_of(k) for k in self.r.scan_iter(match=self._user_glob, count=1000)}
        yield from sorted(found)

    # ---- the one write path ---------------------------------------------------------------------
    def commit(self, delta: StateDelta) -> None:
        if self.readonly:
            raise StoreConfigError("this Redis store was opened read-only")
        appends = [(u, b) for u, b in delta.appends.items() if len(b)]
        keys: list[bytes] = [self._k_offsets, self._k_meta, self._k_pending, self._k_pkeys]
        for u, _ in appends:
            keys += [self._ukey(u), self._tkey(u)]
        args: list[Any] = [self.cap, CHUNK_ROWS, len(appends), len(delta.expect_offsets), len(delta.pending_del),
                           len(delta.pending_put), len(delta.offsets), len(delta.meta), _LUA_SLICE]
        expect = list(delta.expect_offsets.items())
        for tp, want in expect:
            args += [offset_key(delta.group, *tp), "" if want is None else int(want)]
        for _, b in appends:
            it, cat, ts, act = column_bytes(b)
            args += [it, cat, ts, act]
        # deletes are applied before puts (a key in both ends up put), as in the other backends
        args += list(delta.pending_del)
        for k, v in delta.pending_put.items():
            args += [k, v]
        for (topic, part), off in delta.offsets.items():
            args += [offset_key(delta.group, topic, part), int(off)]
        for k, v in delta.meta.items():
            args += [k, v]
        reply = self._evalsha_many(self._commit_script, [(keys, args)])[0]
        status = bytes(reply[0])
        if status == b"ok":
            return
        if status == b"fenced":
            (topic, part), want = expect[int(reply[1]) - 1]
            have = reply[2].decode() or None
            raise OffsetRegressionError(
                f"commit fenced: {delta.group}/{topic}/{part} has stored offset {have}, this worker expected "
                f"{want} (another worker committed it); reload the partition and seek")
        user = appends[int(reply[1]) - 1][0]
        raise StoreConfigError(f"store is corrupt for user {user}: {reply[2].decode()} (rebuild the store)")

    def close(self) -> None:
        self.r.close()
        self.r.connection_pool.disconnect()
