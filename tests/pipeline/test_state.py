"""One suite for every SequenceStore backend (STYLE R13)."""

from __future__ import annotations

import multiprocessing as mp

import numpy as np
import pytest

from pipeline.state import Behaviors, StateDelta, open_store
from pipeline.state.serialization import CHUNK_ROWS
from tests.fixtures import make_behaviors

BACKENDS = ["memory", "lmdb"]


@pytest.fixture(params=BACKENDS)
def store_factory(request, tmp_path):
    made = []

    def make(cap: int = 100_000):
        if request.param == "memory":
            s = open_store("memory://", cap=cap)
        else:
            s = open_store(f"lmdb://{tmp_path}/s{len(made)}", cap=cap)
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


def test_digest_is_logical_and_equal_across_backends(tmp_path):
    a, b = open_store("memory://"), open_store(f"lmdb://{tmp_path}/d")
    for s in (a, b):
        for u in (3, 1, 2):
            _append(s, u, make_behaviors(300 + u, seed=u), offsets={("events", u): u})
        s.commit(StateDelta("g", pending_put={b"k": b"v"}))
    assert a.digest() == b.digest()
    _append(b, 1, make_behaviors(1, seed=9))
    assert a.digest() != b.digest()


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
