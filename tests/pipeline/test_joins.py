"""The worker's join loop in C (pipeline/_joincore.c) against its Python reference (pipeline/joins.py):
the same state, samples and counters on any stream, with either one taking over from the other."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import joins
from pipeline.config import WorkerSettings
from pipeline.events import RawRecord
from pipeline.state import open_store
from pipeline.worker import StreamWorker, _PartitionState
from tests.pipeline.leaks import traced_growth
from tests.pipeline.test_worker import ListProducer, _batches, _stream

C = joins._load_c()


def test_the_c_loop_is_built_and_is_what_the_worker_uses():
    assert C is not None, "pipeline._joincore was not built (C compiler?): make venv"
    assert joins.DEFAULT.name == "c"


def _run(stream, cuts, lateness, impls, restart_at=None):
    """Feed the stream cut at `cuts`; batch i runs on impls[i % len(impls)]; with restart_at, a new
    worker takes over from the store after that many batches (the pending state is reloaded)."""
    store = open_store("memory://")
    settings_ = WorkerSettings(store="memory://", allowed_lateness_ms=lateness, commit_max_events=7)
    producer = ListProducer()

    def worker():
        w = StreamWorker(settings_, store, producer)
        w.assign([("events", 0), ("events", 1)])
        return w

    w = worker()
    stats = []
    for i, batch in enumerate(_batches(stream, cuts)):
        if i == restart_at:
            w.commit()
            stats.append(w.stats.as_dict())
            w = worker()
        w._jimpl = impls[i % len(impls)]
        w.process(batch)
    w.drain()
    stats.append(w.stats.as_dict())
    for s in stats:
        s.pop("batches")
        s.pop("commits")
    return store.digest(), producer.sent, stats


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10**6), n=st.sampled_from([50, 300]), cuts=st.lists(st.integers(1, 299), max_size=10),
       lateness=st.sampled_from([0, 5000, 600_000]), restart_at=st.sampled_from([None, 1, 3]))
def test_c_loop_equals_the_reference_on_any_stream(seed, n, cuts, lateness, restart_at):
    """State digest, every produced record in order (samples and dead letters), and every counter;
    also when the two alternate batch by batch, and across a restart that reloads pending state."""
    stream = _stream(seed, n)
    cuts = [c for c in cuts if c < n]
    want = _run(stream, cuts, lateness, [joins.REFERENCE], restart_at)
    assert _run(stream, cuts, lateness, [C], restart_at) == want
    assert _run(stream, cuts, lateness, [C, joins.REFERENCE], restart_at) == want
    assert any(t == "samples" for t, _, _ in want[1]) or n == 50  # the stream labels something


def test_c_loop_labels_a_known_stream():
    """Not only equal to the reference: right (the reference is checked the same way in test_worker)."""
    from tests.fixtures import event
    from tests.pipeline.test_worker import MIN, T0

    evs = [event("behavior", ts=T0), event("impression", item=5, request_id="r", ts=T0 + 1),
           event("click", item=9, request_id="r", ts=T0 + 5),  # an orphan: its impression comes next
           event("impression", item=9, request_id="r", ts=T0 + 3),
           event("impression", item=5, request_id="r", ts=T0 + 4),  # a duplicate while pending
           event("behavior", ts=T0 + 60 * MIN)]
    from pipeline.events import encode_event

    w = StreamWorker(WorkerSettings(store="memory://", allowed_lateness_ms=0), open_store("memory://"),
                     ListProducer(), join_impl=C)
    w.assign([("events", 0)])
    w.process([RawRecord("events", 0, i, b"k", encode_event(e)) for i, e in enumerate(evs)])
    got = {(s["item_id"], s["label"], s["seq_pos"]) for s in w.producer.samples()}
    assert got == {("5", 0, 1), ("9", 1, 2)}
    assert w.stats.duplicate_impressions == 1 and w.stats.samples == 2 and w.stats.positives == 1


def _decoded(kind: list[int], items: list[int], ts: list[int], rids: list[str]):
    """A decoded batch of one partition: users are the items mod 7, one category."""
    from pipeline.events import DecodedBatch

    n = len(items)
    return DecodedBatch(kind=np.array(kind, np.uint8), user=np.array(items, np.int64) % 7, item=np.array(items, np.int64),
                        category=np.full(n, 3, np.int64), action=np.zeros(n, np.uint8), ts=np.array(ts, np.int64),
                        request_id=rids, user_id=[f"u{i % 7}" for i in items], item_id=list(items),
                        category_id=["c"] * n, partition=np.zeros(n, np.int64), offset=np.arange(n, dtype=np.int64))


def _batch(n_imp: int):
    """A decoded batch: clicks on the even items (before their impressions: orphans, then claimed),
    n_imp impressions, out-of-window clicks on the odd items, and one click no impression claims."""
    even, odd = list(range(0, n_imp, 2)), list(range(1, n_imp, 2))
    items = [*even, *range(n_imp), *odd, n_imp]
    kind = [2] * len(even) + [1] * n_imp + [2] * (len(odd) + 1)
    base = 1_000_000
    ts = [base + 500 + i for i in even] + [base + i for i in range(n_imp)] + [base + 10**9] * len(odd) + [base]
    return _decoded(kind, items, ts, [f"r{i}" for i in items])


def _cycle(impl, batch):
    st_ = _PartitionState()
    out: list[tuple[bytes, bytes]] = []
    rows = np.arange(len(batch), dtype=np.int64)
    z = np.zeros(len(batch), np.int64)
    wm, *counts = impl.join(st_, batch, rows, z, z, 0, 10_000, 0, out)
    counts += impl.emit_ready(st_, wm, 10_000, True, out)
    return out, counts


def test_c_loop_keeps_no_reference_it_should_not():
    """Many join + drain cycles on fresh state: a leaked reference (a tuple, an int, a pending
    list, a sample) would grow the traced memory with every cycle."""
    batch = _batch(500)
    want, _ = _cycle(joins.REFERENCE, batch)
    for _ in range(3):
        assert _cycle(C, batch)[0] == want  # warm caches and free lists
    grown = traced_growth(lambda: _cycle(C, batch), 50)
    assert grown < 50_000, f"{grown} bytes kept after 50 cycles of 1,000 events"


def test_c_loop_refuses_wrong_state_and_columns_with_an_error():
    batch = _batch(3)
    rows = np.arange(len(batch), dtype=np.int64)
    z = np.zeros(len(batch), np.int64)
    bad = _PartitionState()
    bad.heap = ()  # type: ignore[assignment]
    with pytest.raises(TypeError, match="heaps lists"):
        C.join(bad, batch, rows, z, z, 0, 1000, 0, [])
    with pytest.raises(TypeError, match="wm_before"):
        C.join(_PartitionState(), batch, rows, z[:2], z, 0, 1000, 0, [])
    with pytest.raises(IndexError, match="outside the batch"):
        C.join(_PartitionState(), batch, rows + 100, z, z, 0, 1000, 0, [])
    st_ = _PartitionState()
    st_.pending[("r", 1)] = [1, "u"]  # not a pending impression
    st_.heap.append((0, "r", 1))
    with pytest.raises(TypeError, match="list of 10 fields"):
        C.emit_ready(st_, 10**12, 1000, False, [])


def test_c_samples_are_the_published_json():
    out, counts = _cycle(C, _batch(20))
    assert counts == [0, 0, 0, 0, 20, 10, 1]  # nothing closed before the drain; 20 samples, 10 clicked, 1 unmatched
    assert out == _cycle(joins.REFERENCE, _batch(20))[0]
    for key, value in out:
        s = json.loads(value)
        assert key == s["user_id"].encode() and s["sample_id"] == f"r{s['item_id']}:{s['item_hash']:x}"
        assert s["label"] == (int(s["item_id"]) % 2 == 0)


_ids = st.text(alphabet=st.characters(codec="utf-8"), max_size=6)


@settings(max_examples=150, deadline=None)
@given(keys=st.lists(st.tuples(_ids, st.integers(0, 2**63 - 1)), max_size=12, unique=True), data=st.data())
def test_c_stage_equals_the_reference(keys, data):
    """Staging a commit's pending edits: the same puts (byte-identical values: the pending list's
    json.dumps, or the click ts as a signed big-endian i64), deletes and ``stored`` from both, for
    any mix of live, gone-but-stored and never-stored keys, ids with any characters included. Item
    hashes are 63-bit (pipeline.events masks them)."""
    kind = data.draw(st.sampled_from([b"I", b"C"]))
    live, stored = {}, set()
    for rid, item in keys:
        state = data.draw(st.sampled_from(["live", "gone", "never"]))
        if state == "live":
            live[(rid, item)] = (
                [data.draw(st.integers(0, 2**63 - 1)), data.draw(_ids), item, data.draw(_ids), 7, data.draw(_ids),
                 data.draw(st.integers(-2**62, 2**62)), 3, rid, data.draw(st.booleans())]
                if kind == b"I" else data.draw(st.integers(-2**63, 2**63 - 1)))
        if state != "never" and data.draw(st.booleans()):
            stored.add((rid, item))
    out = []
    for impl in (joins.REFERENCE, C):
        touched, put, dele, stored_ = set(keys), {b"old": b"x"}, {b"gone"}, set(stored)
        impl.stage(touched, dict(live), stored_, b"g\x00events\x00\x00\x00\x00\x01", kind, put, dele)
        assert not touched
        out.append((put, dele, stored_))
    assert out[0] == out[1]
    for key, value in out[1][0].items():
        if kind == b"I" and key != b"old":
            assert json.loads(value) == live[(key.split(b"I", 1)[1][:-9].decode(), int.from_bytes(key[-8:], "big"))]


def test_c_stage_refuses_what_the_store_cannot_hold():
    for impl in (joins.REFERENCE, C):
        with pytest.raises(ValueError, match="kind"):
            impl.stage(set(), {}, set(), b"p", b"X", {}, set())
        with pytest.raises((OverflowError, Exception)):
            impl.stage({("r", -1)}, {("r", -1): 5}, set(), b"p", b"C", {}, set())
    with pytest.raises(TypeError, match="list of 10 fields"):
        C.stage({("r", 1)}, {("r", 1): [1]}, set(), b"p", b"I", {}, set())


def test_c_heap_orders_ties_as_heapq_does():
    """The C heap compares entries by their ts as C integers and leaves ties to Python's tuple
    comparison (request id, then item): the heap and the labeling order are heapq's on impressions
    that share a ts and arrive in any order."""
    import random

    rng = random.Random(5)
    n = 400
    ts = [rng.choice([1_000, 1_000, 2_000, 3_000, rng.randrange(10**6)]) for _ in range(n)]
    rids = [rng.choice(["a", "b", "c", "z"]) + str(rng.randrange(50)) for _ in range(n)]
    items = list(range(n))
    db = _decoded([1] * n, items, ts, rids)  # impressions only
    runs = []
    for impl in (joins.REFERENCE, C):
        st_ = _PartitionState()
        out: list[tuple[bytes, bytes]] = []
        rows = np.arange(n, dtype=np.int64)
        z = np.zeros(n, np.int64)
        impl.join(st_, db, rows, z, z, 0, 10, 0, out)
        heap_after_join = list(st_.heap)
        impl.emit_ready(st_, 10**6 + 100, 10, False, out)  # labels every one, smallest first
        runs.append((heap_after_join, out))
    assert runs[0] == runs[1]
    assert len(runs[0][1]) == len(set(zip(rids, items, strict=True))) and len(set(ts)) < n // 2
