"""The commit policy (pipeline/checkpoint.py): checkpoints spanning several batches, committed every
N records or T ms, at once on revoke and stop, and still exactly-once."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.checkpoint import Checkpoint, CommitPolicy
from pipeline.config import WorkerSettings, load_settings
from pipeline.events import RawRecord, encode_event, hash_id
from pipeline.exceptions import BrokerError, ConfigError, OffsetRegressionError
from pipeline.state import open_store
from pipeline.worker import StreamWorker
from tests.fixtures import event
from tests.pipeline.procs import oracle_digest
from tests.pipeline.test_worker import T0, ListProducer, _stream

NEVER_MS = 600_000  # an interval no test reaches: only the event count (or an explicit commit) commits


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def worker(store=None, parts=(0,), **kw) -> StreamWorker:
    s = WorkerSettings(store="memory://", **{"allowed_lateness_ms": 0, "commit_interval_ms": NEVER_MS, **kw})
    w = StreamWorker(s, store or open_store("memory://"), ListProducer())
    w.assign([("events", p) for p in parts])
    return w


def records(events, start=0, partition=0) -> list[RawRecord]:
    return [RawRecord("events", partition, start + i, b"k", e if isinstance(e, bytes) else encode_event(e))
            for i, e in enumerate(events)]


def test_policy_commits_on_count_or_interval_whichever_first():
    p = CommitPolicy(interval_ms=1000, max_events=10)
    assert not p.due(0, 0.0, 99.0)  # nothing to commit
    assert not p.due(9, 0.0, 0.5)
    assert p.due(10, 0.0, 0.5)
    assert p.due(1, 0.0, 1.0)
    assert CommitPolicy(interval_ms=0, max_events=10**6).due(1, 5.0, 5.0)  # 0 ms: every batch
    with pytest.raises(ValueError):
        CommitPolicy(interval_ms=-1)
    with pytest.raises(ValueError):
        CommitPolicy(max_events=0)


@pytest.mark.parametrize("name,value", [("commit_max_events", 0), ("commit_max_events", 10**8),
                                        ("commit_interval_ms", -1), ("commit_interval_ms", 3_600_000)])
def test_commit_settings_are_validated(name, value):
    with pytest.raises(ConfigError, match=name):
        load_settings(WorkerSettings, {name: value})


def test_defaults_are_sane():
    s = WorkerSettings()
    assert 0 < s.commit_interval_ms <= 10_000 and s.max_poll_records <= s.commit_max_events <= 1_000_000


def test_nothing_is_stored_until_the_checkpoint_is_due_then_flush_before_commit():
    w = worker(commit_max_events=10)
    calls = []
    orig_commit = w.store.commit
    w.producer.flush = lambda: calls.append("flush")
    w.store.commit = lambda d: (calls.append("commit"), orig_commit(d))
    w.process(records([event(ts=T0 + i) for i in range(4)]))
    w.process(records([b"{bad"], start=4))  # a dead letter is sent now, flushed with the checkpoint
    assert calls == [] and w.store.offsets("ctrstream-worker") == {} and w.store.length(hash_id(1)) == 0
    assert w.checkpoint.events == 5
    w.process(records([event(ts=T0 + 10 + i) for i in range(5)], start=5))  # 10 records: due
    assert calls == ["flush", "commit"] and w.stats.commits == 1
    assert w.store.offsets("ctrstream-worker") == {("events", 0): 10} and w.store.length(hash_id(1)) == 9
    assert w.checkpoint.empty


def test_interval_commits_even_when_no_record_arrives():
    clock = Clock()
    w = worker(commit_interval_ms=1000, commit_max_events=10**6)
    w.checkpoint._clock = clock  # noqa: SLF001 - a fake clock
    w.process(records([event(ts=T0)]))
    clock.t += 0.5
    w.process(records([event(ts=T0 + 1)], start=1))
    assert w.store.offsets("ctrstream-worker") == {}
    clock.t += 0.4
    assert w.commit_if_due() and w.store.offsets("ctrstream-worker") == {}  # 0.9 s since the first record
    clock.t += 0.1
    assert w.commit_if_due() and w.store.offsets("ctrstream-worker") == {("events", 0): 2}


def test_revoke_and_drain_commit_at_once():
    w = worker(commit_max_events=10**6)
    w.process(records([event("impression", item=5, request_id="r", ts=T0), event(ts=T0 + 1)]))
    assert w.store.offsets("ctrstream-worker") == {}
    w.revoke([("events", 0)])
    assert w.store.offsets("ctrstream-worker") == {("events", 0): 2} and len(list(w.store.pending_items())) == 1
    w.assign([("events", 0)])
    w.process(records([event(ts=T0 + 2)], start=2))
    assert w.drain() == 1
    assert w.store.offsets("ctrstream-worker") == {("events", 0): 3} and list(w.store.pending_items()) == []


def test_redelivered_records_of_the_open_checkpoint_are_not_applied_twice():
    w = worker(commit_max_events=10**6)
    w.process(records([event(ts=T0)] * 5))
    w.process(records([event(ts=T0)] * 5, start=3))  # 3, 4 again (not committed yet), then 5, 6, 7
    assert w.stats.skipped_below_stored == 2
    w.commit()
    assert w.store.length(hash_id(1)) == 8 and w.store.offsets("ctrstream-worker") == {("events", 0): 8}


def test_offsets_must_advance():
    cp = Checkpoint("g", CommitPolicy())
    cp.advance(("t", 0), 5, None)
    with pytest.raises(OffsetRegressionError):
        cp.advance(("t", 0), 5, None)
    with pytest.raises(OffsetRegressionError):
        cp.advance(("t", 1), 3, 7)  # below what the last commit stored


def test_a_failed_flush_stores_nothing():
    w = worker(commit_max_events=2)

    def fail():
        raise BrokerError("1 message(s) were not delivered")

    w.producer.flush = fail
    with pytest.raises(BrokerError):
        w.process(records([event(ts=T0), event(ts=T0 + 1)]))
    assert w.store.offsets("ctrstream-worker") == {} and w.store.length(hash_id(1)) == 0


def test_a_fenced_checkpoint_is_discarded_whole_and_every_partition_reloads():
    store = open_store("memory://")
    zombie = worker(store, parts=(0, 1), commit_max_events=10**6)
    zombie.process(records([event(user=2, ts=T0)], partition=0))
    zombie.process(records([event(user=3, ts=T0)], partition=1))
    owner = worker(store, parts=(0,), commit_max_events=1)
    owner.process(records([event(user=2, ts=T0)], partition=0))  # the new owner of events/0 commits
    assert not zombie.commit() and zombie.fenced and zombie.stats.fenced_commits == 1
    assert store.length(hash_id(3)) == 0  # partition 1's work was in the refused checkpoint too
    zombie.fenced = False
    assert zombie.assign([("events", 1)]) == {("events", 1): 0}  # reload, seek, replay
    zombie.process(records([event(user=3, ts=T0)], partition=1))
    zombie.commit()
    assert store.length(hash_id(3)) == 1 and store.length(hash_id(2)) == 1


def _layout(stream):
    offs = {0: 0, 1: 0}
    out = []
    for p, v in stream:
        out.append(RawRecord("events", p, offs[p], b"k", v))
        offs[p] += 1
    return out


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10**6), crash_at=st.integers(0, 300), batch=st.sampled_from([1, 7, 40]),
       commit_every=st.sampled_from([1, 5, 50, 10**6]))
def test_a_crash_inside_a_checkpoint_replays_to_the_uninterrupted_state(seed, crash_at, batch, commit_every):
    """A worker dies after ``crash_at`` records, with part of them in an open checkpoint; a new one
    resumes from the stored offsets. Final state = the oracle's; every sample the oracle emits is
    emitted (some twice, identical: the trainer dedupes them by id)."""
    raw = _layout(_stream(seed, 300))
    store = open_store("memory://")
    a = worker(store, parts=(0, 1), commit_max_events=commit_every, allowed_lateness_ms=5000)
    for i in range(0, crash_at, batch):
        a.process(raw[i:min(i + batch, crash_at)])
    # crash: `a` is gone with its open checkpoint; nothing of it was stored
    b = worker(store, parts=(), commit_max_events=commit_every, allowed_lateness_ms=5000)
    _resume_and_check(raw, store, a, b, batch)


def _resume_and_check(raw, store, crashed: StreamWorker, b: StreamWorker, batch: int) -> None:
    """``b`` takes over from ``crashed`` at the stored offsets and replays the rest of ``raw``: the
    final state is the oracle's, and every sample the oracle emits was emitted (some twice,
    identical: the trainer dedupes them by id)."""
    seeks = b.assign([("events", 0), ("events", 1)])
    rest = [r for r in raw if r.offset >= seeks[(r.topic, r.partition)]]
    for i in range(0, len(rest), batch):
        b.process(rest[i:i + batch])
    b.commit()
    assert store.digest() == oracle_digest(raw, "ctrstream-worker", allowed_lateness_ms=5000)
    ref = worker(parts=(0, 1), allowed_lateness_ms=5000)
    ref.process(raw)
    ref.commit()
    emitted = {v for t, _, v in crashed.producer.sent + b.producer.sent if t == "samples"}
    assert emitted == {v for t, _, v in ref.producer.sent if t == "samples"}


def test_pending_edits_are_staged_at_commit_only_for_what_outlives_the_checkpoint():
    """Pending impressions and orphan clicks reach the store at commit: one labeled inside the
    checkpoint that saw it is never written (nor deleted); one still pending is written once, with
    its latest value; one the store holds is deleted when it is labeled in a later checkpoint."""
    w = worker()
    deltas = []
    orig_commit = w.store.commit
    w.store.commit = lambda d: (deltas.append((set(d.pending_put), set(d.pending_del))), orig_commit(d))
    hour = 60 * 60_000
    w.process(records([event("impression", ts=T0, request_id="a"),  # labeled in this checkpoint
                       event("click", ts=T0 + 1000, request_id="a"),
                       event("click", ts=T0 + 2000, request_id="orphan"),  # expires in this checkpoint
                       event("behavior", ts=T0 + hour),  # the watermark passes both windows
                       event("impression", ts=T0 + hour, request_id="b"),  # still pending at commit
                       event("click", ts=T0 + hour + 1000, request_id="b")]))
    w.commit()
    (put, dele), = deltas
    assert not dele and len(put) == 1 and b"b\x00" in next(iter(put))  # only "b", clicked
    assert [s["label"] for s in w.producer.samples()] == [1]
    pending = dict(w.store.pending_items())
    assert len(pending) == 1 and b"true" in next(iter(pending.values()))
    w.process(records([event("behavior", ts=T0 + 2 * hour)], start=6))  # labels "b"
    w.commit()
    assert deltas[1] == (set(), put)  # the stored key is deleted, nothing else touched
    assert not dict(w.store.pending_items()) and [s["label"] for s in w.producer.samples()] == [1, 1]
    assert w.stats.unmatched_clicks == 1


# ---- commits in a background thread (StreamWorker(background_commits=True), as run_worker runs) ----

class GatedStore:
    """A store whose commits wait for the test's go-ahead (``gate``), so a commit stays in flight
    while the worker processes further batches; ``fail`` makes the next commit raise; ``crashed``
    drops commits that had not reached the store yet (the process died under them)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.gate = threading.Event()
        self.gate.set()
        self.fail: BaseException | None = None
        self.crashed = False
        self.active = self.max_active = 0
        self.entered = threading.Event()  # a commit reached the store
        self._lock = threading.Lock()

    def commit(self, delta) -> None:
        with self._lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        self.entered.set()
        try:
            assert self.gate.wait(30), "the test never opened the gate"
            if self.fail is not None:
                raise self.fail
            if not self.crashed:
                self.inner.commit(delta)
        finally:
            with self._lock:
                self.active -= 1

    def __getattr__(self, name):
        return getattr(self.inner, name)


def bg_worker(store, parts=(0,), **kw) -> StreamWorker:
    s = WorkerSettings(store="memory://", **{"allowed_lateness_ms": 0, "commit_interval_ms": NEVER_MS, **kw})
    w = StreamWorker(s, store, ListProducer(), background_commits=True)
    w.assign([("events", p) for p in parts])
    return w


def wait_landed(w: StreamWorker) -> None:
    """Until the commit in flight has ended (its outcome is taken up by the worker's next call)."""
    if w._inflight is not None:  # noqa: SLF001 - the test needs the commit over, not settled
        w._inflight.join()  # noqa: SLF001


def test_a_background_commit_overlaps_the_next_batches_and_commits_land_in_order():
    store = GatedStore(open_store("memory://"))
    w = bg_worker(store, commit_max_events=2)
    told = []
    w.on_committed = told.append
    store.gate.clear()
    w.process(records([event(ts=T0), event(ts=T0 + 1)]))  # due: handed to the store, which waits
    w.process(records([event(ts=T0 + 2)], start=2))  # processed while that commit is in flight
    assert store.entered.wait(10) and store.active == 1 and store.inner.offsets("ctrstream-worker") == {} and w.stats.commits == 0
    assert w.checkpoint.events == 1 and w.stored_offsets == {}
    store.gate.set()
    assert w.commit()  # the one in flight lands first, then this one
    assert told == [{("events", 0): 2}, {("events", 0): 3}] and w.stats.commits == 2
    assert store.max_active == 1 and store.inner.offsets("ctrstream-worker") == {("events", 0): 3}
    assert store.inner.length(hash_id(1)) == 3 and w.stored_offsets == {("events", 0): 3}


def test_a_fenced_background_commit_is_discarded_with_everything_processed_after_it():
    inner = open_store("memory://")
    zombie_store = GatedStore(inner)
    zombie = bg_worker(zombie_store, parts=(0, 1), commit_max_events=2)
    zombie.process(records([event(user=2, ts=T0)], partition=0))
    owner = worker(inner, parts=(0,), commit_max_events=1)
    owner.process(records([event(user=2, ts=T0)], partition=0))  # the new owner of events/0 commits
    zombie_store.gate.clear()
    zombie.process(records([event(user=3, ts=T0)], partition=1))  # due: in flight, and fenced
    zombie.process(records([event(user=3, ts=T0 + 1)], start=1, partition=1))  # built on it
    zombie_store.gate.set()
    wait_landed(zombie)
    assert zombie.process(records([event(user=3, ts=T0 + 2)], start=2, partition=1)) == 0
    assert zombie.fenced and zombie.stats.fenced_commits == 1 and zombie.checkpoint.empty
    assert inner.length(hash_id(3)) == 0 and inner.offsets("ctrstream-worker") == {("events", 0): 1}
    zombie.fenced = False
    assert zombie.assign([("events", 1)]) == {("events", 1): 0}  # reload, seek, replay
    zombie.process(records([event(user=3, ts=T0 + i) for i in range(3)], partition=1))
    zombie.commit()
    assert inner.length(hash_id(3)) == 3 and inner.length(hash_id(2)) == 1


def test_a_failed_background_commit_is_raised_by_the_next_call_and_nothing_after_it_is_stored():
    store = GatedStore(open_store("memory://"))
    w = bg_worker(store, commit_max_events=2)
    store.fail = RuntimeError("disk full")
    store.gate.clear()
    w.process(records([event(ts=T0), event(ts=T0 + 1)]))
    w.process(records([event(ts=T0 + 2)], start=2))
    store.gate.set()
    wait_landed(w)
    with pytest.raises(RuntimeError, match="disk full"):
        w.process(records([event(ts=T0 + 3)], start=3))
    assert w.checkpoint.empty and store.inner.offsets("ctrstream-worker") == {}
    assert store.inner.length(hash_id(1)) == 0 and w.stats.commits == 0


def test_abandon_waits_for_the_commit_in_flight():
    store = GatedStore(open_store("memory://"))
    w = bg_worker(store, commit_max_events=1)
    store.gate.clear()
    w.process(records([event(ts=T0)]))
    threading.Timer(0.2, store.gate.set).start()
    w.abandon()  # returns only once the commit has ended: the store may be closed now
    assert store.active == 0 and store.inner.offsets("ctrstream-worker") == {("events", 0): 1}


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10**6), crash_at=st.integers(0, 300), batch=st.sampled_from([1, 7, 40]),
       commit_every=st.sampled_from([1, 5, 50]), landed=st.booleans())
def test_a_crash_with_a_background_commit_in_flight_replays_to_the_uninterrupted_state(
        seed, crash_at, batch, commit_every, landed):
    """Background commits, and a crash while one is in flight: whether it reached the store
    (``landed``) or not, a new worker resumes from the stored offsets to the oracle's state, and every
    sample of the oracle is emitted."""
    raw = _layout(_stream(seed, 300))
    inner = open_store("memory://")
    store = GatedStore(inner)
    a = bg_worker(store, parts=(0, 1), commit_max_events=commit_every, allowed_lateness_ms=5000)
    for i in range(0, crash_at, batch):
        if not landed and i + batch >= crash_at:
            wait_landed(a)  # the earlier commits reach the store (else the next commit would wait on them)
            store.gate.clear()  # the last batch's commit does not reach the store before the crash
        a.process(raw[i:min(i + batch, crash_at)])
    store.crashed = True  # the process dies: a commit not yet in the store never gets there
    store.gate.set()
    a.abandon()
    b = bg_worker(inner, parts=(), commit_max_events=commit_every, allowed_lateness_ms=5000)
    _resume_and_check(raw, inner, a, b, batch)
