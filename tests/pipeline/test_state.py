"""One suite for every SequenceStore backend (STYLE R13)."""

from __future__ import annotations

import multiprocessing as mp
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.exceptions import OffsetRegressionError
from pipeline.state import Behaviors, StateDelta, open_store
from pipeline.state.serialization import CHUNK_ROWS
from tests.fixtures import make_behaviors

BACKENDS = ["memory", "lmdb", pytest.param("redis", marks=pytest.mark.redis),
            pytest.param("redis-single-slot", marks=pytest.mark.redis)]


@pytest.fixture(params=BACKENDS)
def store_factory(request, tmp_path):
    made = []
    redis_server = request.getfixturevalue("redis_server") if request.param.startswith("redis") else None

    def make(cap: int = 100_000):
        if request.param == "memory":
            s = open_store("memory://", cap=cap)
        elif request.param == "lmdb":
            s = open_store(f"lmdb://{tmp_path}/s{len(made)}", cap=cap)
        else:
            opts = {"single_slot": 1} if request.param == "redis-single-slot" else {}
            s = open_store(redis_server.store_uri(**opts), cap=cap)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def _append(store, user, b, group="g", offsets=None):
    store.commit(StateDelta(group, appends={user: b}, offsets=offsets or {}))


def test_append_and_read_positions_absolute(store_factory):
    s = store_factory()
    parts = [make_behaviors(n, seed=i) for i, n in enumerate([1, CHUNK_ROWS - 1, 2, 3 * CHUNK_ROWS + 5, 0, 17])]
    for p in parts:
        _append(s, 5, p)
    allb = Behaviors.concat(parts)
    assert s.length(5) == len(allb)
    full = s.read(5)
    assert full.start == 0 and np.array_equal(full.item, allb.item) and np.array_equal(full.ts, allb.ts)
    assert np.array_equal(full.action, allb.action) and np.array_equal(full.category, allb.category)
    for end, n in [(10, 3), (CHUNK_ROWS, 5), (CHUNK_ROWS + 1, CHUNK_ROWS + 1), (len(allb), 1000), (3, 0)]:
        b = s.read(5, end=end, max_len=n)
        lo = max(0, end - n)
        assert (b.start, b.end) == (lo, end)
        assert np.array_equal(b.item, allb.item[lo:end])


def test_unknown_user_reads_empty(store_factory):
    s = store_factory()
    assert s.length(123) == 0 and len(s.read(123)) == 0 and len(s.read(123, end=5, max_len=3)) == 0


def test_lifelong_cap_trims_oldest_keeps_positions(store_factory):
    s = store_factory(cap=300)
    ref = []
    for i in range(9):
        b = make_behaviors(137, seed=i)
        ref.append(b)
        _append(s, 1, b)
    allb = Behaviors.concat(ref)
    got = s.read(1)
    assert s.length(1) == 9 * 137 and got.end == 9 * 137 and len(got) == 300
    assert np.array_equal(got.item, allb.item[-300:])
    old = s.read(1, end=100, max_len=50)  # entirely trimmed
    assert len(old) == 0


def test_commit_is_atomic_unit_with_offsets_pending_meta(store_factory):
    s = store_factory()
    s.commit(StateDelta("g", appends={1: make_behaviors(3)}, pending_put={b"g\x00a": b"1", b"g\x00b": b"2"},
                        offsets={("events", 0): 10, ("events", 1): 4}, meta={b"wm": b"x"}))
    s.commit(StateDelta("g", pending_del={b"g\x00a"}, offsets={("events", 0): 12}))
    assert s.offsets("g") == {("events", 0): 12, ("events", 1): 4}
    assert s.offsets("other") == {}
    assert list(s.pending_items(b"g\x00")) == [(b"g\x00b", b"2")]
    assert s.get_meta(b"wm") == b"x" and s.groups() == ["g"]


@pytest.mark.redis
def test_digest_is_logical_and_equal_across_backends(tmp_path, redis_server):
    a, b = open_store("memory://"), open_store(f"lmdb://{tmp_path}/d")
    c = open_store(redis_server.store_uri())
    for s in (a, b, c):
        for u in (3, 1, 2):
            _append(s, u, make_behaviors(300 + u, seed=u), offsets={("events", u): u})
        s.commit(StateDelta("g", pending_put={b"k": b"v"}))
    assert a.digest() == b.digest() == c.digest()
    _append(b, 1, make_behaviors(1, seed=9))
    assert a.digest() != b.digest()
    _append(c, 1, make_behaviors(1, seed=9))
    assert b.digest() == c.digest()
    for s in (a, b, c):
        s.close()


def _reader(path: str, q) -> None:
    s = open_store(f"lmdb://{path}", readonly=True)
    seen = [s.length(7) for _ in range(200)]
    q.put((seen, len(s.read(7, max_len=1000))))


def test_lmdb_reader_process_reads_while_writer_appends(tmp_path):
    path = str(tmp_path / "rw")
    w = open_store(f"lmdb://{path}")
    _append(w, 7, make_behaviors(10))
    q = mp.get_context("spawn").Queue()
    p = mp.get_context("spawn").Process(target=_reader, args=(path, q))
    p.start()
    for i in range(50):
        _append(w, 7, make_behaviors(20, seed=i))
    seen, n = q.get(timeout=60)
    p.join(30)
    assert p.exitcode == 0
    assert seen == sorted(seen) and seen[0] >= 10 and n >= 10  # monotone snapshots, never torn


def test_readonly_open_of_missing_store_is_a_clear_error(tmp_path):
    from pipeline.exceptions import StoreConfigError

    with pytest.raises(StoreConfigError, match="start the worker first"):
        open_store(f"lmdb://{tmp_path}/nope", readonly=True)
    with pytest.raises(StoreConfigError, match="unsupported store URI"):
        open_store("mysql://x")


def test_fenced_commit_applies_nothing(store_factory):
    s = store_factory()
    s.commit(StateDelta("g", appends={1: make_behaviors(3)}, offsets={("events", 0): 5}))
    before = s.digest()
    bad = StateDelta("g", appends={1: make_behaviors(300, seed=1), 2: make_behaviors(2)},
                     pending_put={b"p": b"1"}, offsets={("events", 0): 9}, meta={b"wm": b"1"},
                     expect_offsets={("events", 0): 4})
    with pytest.raises(OffsetRegressionError, match="fenced"):
        s.commit(bad)
    with pytest.raises(OffsetRegressionError, match="fenced"):  # absent expected, but one is stored
        s.commit(StateDelta("g", offsets={("events", 0): 9}, expect_offsets={("events", 0): None}))
    assert s.digest() == before and s.length(1) == 3 and s.length(2) == 0 and s.get_meta(b"wm") is None
    s.commit(StateDelta("g", appends={2: make_behaviors(2)}, offsets={("events", 0): 9, ("events", 1): 1},
                        expect_offsets={("events", 0): 5, ("events", 1): None}))
    assert s.offsets("g") == {("events", 0): 9, ("events", 1): 1} and s.length(2) == 2


def test_pending_prefix_scan_order_and_delete_before_put(store_factory):
    s = store_factory()
    keys = [b"g\x00t\x00" + bytes([p]) + b"I" + str(i).encode() for p in (0, 1, 0xFF) for i in range(1200)]
    s.commit(StateDelta("g", pending_put={k: k[::-1] for k in keys}))
    got = list(s.pending_items(b"g\x00t\x00\x01"))
    assert got == sorted((k, k[::-1]) for k in keys if k[4] == 1) and len(got) == 1200
    assert len(list(s.pending_items(b"g\x00t\x00\xff"))) == 1200
    assert len(list(s.pending_items())) == 3600
    k0 = keys[0]
    s.commit(StateDelta("g", pending_put={k0: b"new"}, pending_del={k0, keys[1]}))
    d = dict(s.pending_items(b"g"))
    assert d[k0] == b"new" and keys[1] not in d


def test_read_many_and_lengths_match_single_reads(store_factory):
    s = store_factory(cap=1000)
    for u in range(1, 6):
        _append(s, u, make_behaviors(u * 311, seed=u))
    users = [1, 2, 3, 4, 5, 99]
    ends = [None, 100, 5, None, 1550, None]
    many = s.read_many(users, ends, 260)
    for u, e, b in zip(users, ends, many, strict=True):
        one = s.read(u, e, 260)
        assert (b.start, b.end) == (one.start, one.end) and np.array_equal(b.item, one.item)
    assert s.lengths(users) == [s.length(u) for u in users] == [311, 622, 933, 1244, 1555, 0]
    assert list(s.users()) == [1, 2, 3, 4, 5]
    st_ = s.stats()
    assert st_["users"] == 5 and st_["longest_sequence"] == 1000 and st_["behaviors"] == 311 + 622 + 933 + 2000


def test_one_commit_larger_than_the_cap(store_factory):
    s = store_factory(cap=100)
    big = make_behaviors(3 * CHUNK_ROWS + 7, seed=3)
    _append(s, 1, big)
    got = s.read(1)
    assert (got.start, got.end) == (len(big) - 100, len(big)) and np.array_equal(got.ts, big.ts[-100:])
    _append(s, 1, make_behaviors(1, seed=4))
    assert s.read(1).start == len(big) + 1 - 100 and len(s.read(1)) == 100


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_commits_match_the_memory_reference(store_factory, data):
    """Model-based: any sequence of appends, read back at any (end, max_len), equals the reference."""
    cap = data.draw(st.sampled_from([1, 7, CHUNK_ROWS, CHUNK_ROWS + 3, 1000]))
    s, ref = store_factory(cap=cap), open_store("memory://", cap=cap)
    for step in range(data.draw(st.integers(1, 8))):
        appends = {u: make_behaviors(data.draw(st.sampled_from([0, 1, 2, 255, 256, 257, 600])), seed=step * 10 + u)
                   for u in data.draw(st.sets(st.integers(1, 4), min_size=1, max_size=3))}
        for x in (s, ref):
            x.commit(StateDelta("g", appends=appends, offsets={("events", 0): step + 1}))
    for u in range(1, 5):
        n = ref.length(u)
        assert s.length(u) == n
        for end, max_len in [(None, None), (n, 1), (max(0, n - 300), 260), (n // 2, None), (n + 5, 3)]:
            a, b = s.read(u, end, max_len), ref.read(u, end, max_len)
            assert (a.start, a.end) == (b.start, b.end)
            for col in ("item", "category", "action", "ts"):
                assert np.array_equal(getattr(a, col), getattr(b, col)), (u, end, max_len, col)
    assert s.digest() == ref.digest()


@pytest.mark.redis
def test_redis_reader_reads_while_writer_appends(redis_server):
    uri = redis_server.store_uri()
    w, r = open_store(uri), open_store(uri, readonly=True)
    _append(w, 7, make_behaviors(10))
    seen: list[tuple[int, int, int]] = []
    done = threading.Event()

    def reader():
        while not done.is_set():
            b = r.read(7, max_len=1000)
            seen.append((r.length(7), b.end, len(b)))

    t = threading.Thread(target=reader)
    t.start()
    for i in range(100):
        _append(w, 7, make_behaviors(20, seed=i))
    done.set()
    t.join(30)
    ends = [e for _, e, _ in seen]
    assert seen and ends == sorted(ends) and all(n == min(e, 1000) for _, e, n in seen)  # never torn
    with pytest.raises(Exception, match="read-only"):
        _append(r, 7, make_behaviors(1))
    assert r.length(7) == 2010
    w.close()
    r.close()


@pytest.mark.redis
def test_redis_bad_uri_and_namespaces(redis_server):
    from pipeline.exceptions import StoreConfigError

    with pytest.raises(StoreConfigError, match="unknown redis store option"):
        open_store(redis_server.url + "?nope=1")
    with pytest.raises(StoreConfigError, match="namespace"):
        open_store(redis_server.url + "?namespace=a:b")
    with pytest.raises(StoreConfigError, match="cannot reach Redis"):
        open_store("redis://127.0.0.1:1/0")
    a, b = open_store(redis_server.store_uri()), open_store(redis_server.store_uri())
    _append(a, 1, make_behaviors(5))
    assert a.length(1) == 5 and b.length(1) == 0 and list(b.users()) == []


# ---- the LMDB store's chunk planner: C (pipeline/_storecore.c) against its reference ---------------

def test_the_store_planner_is_built_and_is_what_lmdb_uses():
    from pipeline import _storecore
    from pipeline.state import lmdb as lmdb_store

    assert lmdb_store._append_chunks_many is _storecore.append_chunks_many


class _Kv(dict):
    """A store's keys as the planner reads and writes them (``get`` returns None when absent)."""

    def apply(self, plan):
        writes, deletes, positions = plan
        self.update(writes)
        for k in deletes:  # may name a chunk never written (one commit larger than the cap)
            self.pop(k, None)
        self.update(positions)


def _plan(fn, kv, ga, chunk_rows, cap):
    from pipeline.exceptions import StoreConfigError

    return fn(ga.users, ga.bounds, ga.item, ga.category, ga.ts, ga.action, kv.get, kv.get, chunk_rows, cap,
              StoreConfigError)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_store_planner_c_equals_reference(data):
    """Any sequence of commits (any users, lengths across chunk boundaries, any lifelong cap, any
    chunk size): the C planner returns exactly the reference's writes, deletes and positions."""
    from pipeline._storecore import append_chunks_many
    from pipeline.state import GroupedAppends
    from pipeline.state.lmdb import append_chunks_many_ref

    chunk_rows = data.draw(st.sampled_from([1, 3, 16, CHUNK_ROWS]))
    cap = data.draw(st.sampled_from([1, 5, 40, 1000, 100_000]))
    kv = _Kv()
    for step in range(data.draw(st.integers(1, 6))):
        users = sorted(data.draw(st.sets(st.integers(0, 2**63 - 1) | st.integers(1, 5), min_size=1, max_size=4)))
        ga = GroupedAppends.of({u: make_behaviors(data.draw(st.sampled_from([0, 1, 2, 15, 16, 17, 300])),
                                                  seed=step * 7 + i) for i, u in enumerate(users)})
        want = _plan(append_chunks_many_ref, kv, ga, chunk_rows, cap)
        assert _plan(append_chunks_many, kv, ga, chunk_rows, cap) == want
        kv.apply(want)


@pytest.mark.parametrize("damage", ["no tail", "short count", "short bytes", "bad position"])
def test_store_planner_refuses_a_corrupt_store_like_the_reference(damage):
    import struct

    from pipeline._storecore import append_chunks_many
    from pipeline.exceptions import StoreConfigError
    from pipeline.state import GroupedAppends
    from pipeline.state.lmdb import append_chunks_many_ref

    kv = _Kv()
    ga = GroupedAppends.of({9: make_behaviors(20)})
    kv.apply(_plan(append_chunks_many_ref, kv, ga, 16, 100))
    uk, tail_key = struct.pack(">Q", 9), struct.pack(">QI", 9, 1)
    if damage == "no tail":
        del kv[tail_key]
    elif damage == "short count":
        kv[tail_key] = struct.pack("<H", 3) + kv[tail_key][2:]
    elif damage == "short bytes":
        kv[tail_key] = kv[tail_key][:-1]
    else:
        kv[uk] = kv[uk][:15]
    msgs = []
    for fn in (append_chunks_many_ref, append_chunks_many):
        with pytest.raises(StoreConfigError, match="store is corrupt") as e:
            _plan(fn, kv, ga, 16, 100)
        msgs.append(str(e.value))
    assert msgs[0] == msgs[1]


def test_lmdb_commits_the_same_with_the_reference_planner(tmp_path, monkeypatch):
    """The Python planner (used where the C extension is not built) stores the same sequences."""
    from pipeline.state import lmdb as lmdb_store
    from pipeline.state.lmdb import append_chunks_many_ref

    digests = []
    for name, fn in (("c", lmdb_store._append_chunks_many), ("ref", append_chunks_many_ref)):
        monkeypatch.setattr(lmdb_store, "_append_chunks_many", fn)
        s = open_store(f"lmdb://{tmp_path}/{name}", cap=300)
        for step in range(5):
            s.commit(StateDelta("g", appends={u: make_behaviors(97 * (u + step) % 400, seed=step * 5 + u)
                                              for u in range(1, 5)}, offsets={("events", 0): step + 1}))
        digests.append(s.digest())
        s.close()
    assert digests[0] == digests[1]


def test_grouped_appends_is_the_mapping_it_groups():
    from pipeline.state import GroupedAppends

    rng = np.random.default_rng(3)
    user = rng.integers(1, 6, 200)
    b = make_behaviors(200, seed=1)
    ga = GroupedAppends.from_columns(user, b.item, b.category, b.action, b.ts)
    assert list(ga) == sorted(set(user.tolist()))
    for u in ga:
        rows = np.flatnonzero(user == u)  # arrival order kept within a user
        got = ga[u]
        assert np.array_equal(got.item, b.item[rows]) and np.array_equal(got.ts, b.ts[rows])
        assert np.array_equal(got.action, b.action[rows]) and np.array_equal(got.category, b.category[rows])
    assert GroupedAppends.of(ga) is ga
    again = GroupedAppends.of(dict(ga.items()) | {99: make_behaviors(0)})
    assert list(again) == list(ga) and np.array_equal(again.bounds, ga.bounds)
    assert len(GroupedAppends.of({})) == 0 and len(GroupedAppends.from_columns(*(np.zeros(0, np.int64),) * 5)) == 0
    with pytest.raises(ValueError, match="ascending"):
        GroupedAppends(np.array([2, 1]), np.array([0, 1, 2]), *(np.zeros(2, np.int64),) * 4)


def test_store_planner_keeps_no_reference_it_should_not():
    """Many plans, corrupt-store refusals included: a leaked key, chunk or buffer would grow the
    traced memory with every cycle."""
    from pipeline._storecore import append_chunks_many
    from pipeline.state import GroupedAppends
    from tests.pipeline.leaks import traced_growth

    ga = GroupedAppends.of({u: make_behaviors(300, seed=u) for u in range(1, 20)})

    def cycle():
        kv = _Kv()
        for _ in range(3):
            kv.apply(_plan(append_chunks_many, kv, ga, CHUNK_ROWS, 500))
        kv[next(k for k in kv if len(k) == 8)] = b"short"
        with pytest.raises(Exception, match="corrupt"):
            _plan(append_chunks_many, kv, ga, CHUNK_ROWS, 500)

    for _ in range(5):
        cycle()
    grown = traced_growth(cycle, 100)
    assert grown < 50_000, f"{grown} bytes kept after 100 cycles"


def _assert_reads_equal(s, ref, users):
    for u in users:
        n = ref.length(u)
        assert s.length(u) == n
        for end, max_len in [(None, None), (n, 1), (max(0, n - 300), 260), (n // 2, None)]:
            a, b = s.read(u, end, max_len), ref.read(u, end, max_len)
            assert (a.start, a.end) == (b.start, b.end)
            for col in ("item", "category", "action", "ts"):
                assert np.array_equal(getattr(a, col), getattr(b, col)), (u, end, max_len, col)


@pytest.mark.redis
@pytest.mark.parametrize("single_slot", [False, True])
def test_a_redis_store_of_the_previous_layout_is_read_and_moves_on_as_it_is_written(redis_server, single_slot):
    """Before the open-tail key, a user's open tail chunk was a field of its hash (format
    "chunk_rows=256"). Such a store is read as it is, and a writer upgrades the format record and moves
    each user's tail into its key at the user's next commit; everything reads as the reference."""
    import redis

    from pipeline.state import redis as rs

    uri = redis_server.store_uri(**({"single_slot": 1} if single_slot else {}))
    cap = 1000
    s, ref = open_store(uri, cap=cap), open_store("memory://", cap=cap)
    sizes = {1: 300, 2: CHUNK_ROWS, 3: 10, 4: 600, 5: 1100}  # open tails of 44, none, 10, 88, 76 rows
    first = {u: make_behaviors(n, seed=u) for u, n in sizes.items()}
    for x in (s, ref):
        x.commit(StateDelta("g", appends=first))
    r = redis.Redis.from_url(redis_server.url)
    R = CHUNK_ROWS
    moved = 0
    for u in sizes:  # write the previous layout: the open tail back into the hash, compact
        e, n = ref.length(u), ref.length(u) % R
        raw = r.get(s._tkey(u))
        assert (raw is None) == (n == 0)
        if n:
            compact = (raw[:2] + raw[2:2 + 8 * n] + raw[2 + 8 * R:2 + 8 * R + 8 * n]
                       + raw[2 + 16 * R:2 + 16 * R + 8 * n] + raw[2 + 24 * R:2 + 24 * R + n])
            r.hset(s._ukey(u), str(e // R), compact)
            r.delete(s._tkey(u))
            moved += 1
    assert moved == 4
    r.hset(s._k_meta, b"__format__", rs._FORMAT_V1)
    s.close()
    reader = open_store(uri, cap=cap, readonly=True)  # reads the previous layout as it is
    _assert_reads_equal(reader, ref, sizes)
    assert r.hget(reader._k_meta, b"__format__") == rs._FORMAT_V1  # a reader changes nothing
    reader.close()
    w = open_store(uri, cap=cap)
    assert r.hget(w._k_meta, b"__format__") == rs._FORMAT
    _assert_reads_equal(w, ref, sizes)
    more = {1: make_behaviors(1, seed=11), 3: make_behaviors(CHUNK_ROWS, seed=13), 4: make_behaviors(300, seed=14),
            5: make_behaviors(5, seed=15)}
    for x in (w, ref):
        x.commit(StateDelta("g", appends=more))
    _assert_reads_equal(w, ref, sizes)
    for u in more:  # the written users' open tails are in their keys now, no longer in their hashes
        e, n = ref.length(u), ref.length(u) % R
        assert (r.get(w._tkey(u)) is not None) == (n != 0)
        assert r.hget(w._ukey(u), str(e // R)) is None
    assert sorted(w.users()) == sorted(sizes) and w.digest() == ref.digest()
    w.close()


@pytest.mark.redis
def test_a_redis_store_of_an_unknown_format_is_refused(redis_server):
    import redis

    from pipeline.exceptions import StoreConfigError

    uri = redis_server.store_uri()
    s = open_store(uri)
    redis.Redis.from_url(redis_server.url).hset(s._k_meta, b"__format__", b"chunk_rows=512")
    s.close()
    with pytest.raises(StoreConfigError, match="has format chunk_rows=512"):
        open_store(uri)


@pytest.mark.redis
@pytest.mark.parametrize("damage", ["tail key gone", "tail count off"])
def test_a_redis_commit_onto_a_damaged_open_tail_is_refused_whole(redis_server, damage):
    import redis

    from pipeline.exceptions import StoreConfigError

    s = open_store(redis_server.store_uri())
    _append(s, 1, make_behaviors(CHUNK_ROWS + 5, seed=1))
    _append(s, 2, make_behaviors(3, seed=2))
    r = redis.Redis.from_url(redis_server.url)
    before = s.read(1)
    if damage == "tail key gone":
        r.delete(s._tkey(2))
        with pytest.raises(StoreConfigError, match="corrupt"):  # a read says so too
            s.read(2)
    else:
        r.setrange(s._tkey(2), 0, b"\x07\x00")
    with pytest.raises(StoreConfigError, match="store is corrupt for user 2"):
        s.commit(StateDelta("g", appends={1: make_behaviors(4, seed=3), 2: make_behaviors(4, seed=4)},
                            offsets={("events", 0): 9}))
    after = s.read(1)  # nothing of it applied: user 1 (planned before user 2) and the offsets included
    assert (after.start, after.end) == (before.start, before.end) and np.array_equal(after.item, before.item)
    assert s.offsets("g") == {}
    s.close()
