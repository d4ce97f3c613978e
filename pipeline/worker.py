"""The stream worker: events in, lifelong sequences + labeled samples out, exactly-once state.

Per poll batch:

1. decode + validate the batch; bad records go to ``events.dlq`` with the reason;
2. behaviors and clicks append to the user's sequence (a click is also a behavior);
   impressions become *pending* with ``seq_pos`` = the user's sequence length at impression time
   (point-in-time: the sample may only see behaviors before it); clicks mark their pending
   impression clicked (a click that arrives before its impression waits as an *orphan click*);
3. the per-partition event-time watermark (max event time seen − allowed lateness) labels every
   pending impression whose attribution window has closed: label 1 if clicked, else 0;
4. samples and dead letters are produced and flushed, THEN the store commits appends, pending
   edits, offsets and watermarks in one atomic unit.

Crash anywhere: on restart the worker seeks to the offsets stored with the state, so the state is
exactly as if it never crashed. Samples flushed before a crash are re-emitted with the same
deterministic ``sample_id`` (request id + item), which the trainer recognises and skips.

Policies (tested): events are applied in arrival order per partition; a behavior older than the
watermark is still appended (a sequence is arrival-ordered); a duplicate impression (same request
and item) while one is pending is ignored; a click that matches no pending impression (it came
after its impression was labeled, or its impression never came) waits one attribution window, then
is counted in ``unmatched_clicks`` and dropped; a click outside the attribution window does not label the impression (it is
still a behavior).
"""

from __future__ import annotations

import heapq
import json
import logging
import signal
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from pipeline.config import WorkerSettings
from pipeline.events import BEHAVIOR, CLICK, IMPRESSION, ACTIONS, DeadLetter, decode_batch, RawRecord
from pipeline.exceptions import OffsetRegressionError
from pipeline.kafka import ConsumerAdapter, ProducerAdapter, TopicPartitionT, make_consumer, make_producer
from pipeline.state import Behaviors, SequenceStore, StateDelta, open_store

__all__ = ["StreamWorker", "WorkerStats", "run_worker", "sample_id"]

log = logging.getLogger(__name__)
_CLICK_ACTION = ACTIONS["click"]
#: With --exit-when-idle, how long to wait for a first partition assignment before giving up. A group
#: join takes up to max_poll_interval_ms on the embedded broker; a minute covers every sane setting.
NO_ASSIGNMENT_GIVE_UP_S = 60.0


def sample_id(request_id: str, item_hash: int) -> str:
    """Deterministic sample id: the same impression always gets the same id (replays dedupe)."""
    return f"{request_id}:{item_hash:x}"


@dataclass
class _Pending:
    user: int
    user_raw: str
    item: int
    item_raw: str
    cat: int
    cat_raw: str
    ts: int
    seq_pos: int
    request_id: str
    clicked: bool = False

    def encode(self) -> bytes:
        return json.dumps([self.user, self.user_raw, self.item, self.item_raw, self.cat, self.cat_raw,
                           self.ts, self.seq_pos, self.request_id, self.clicked]).encode()

    @staticmethod
    def decode(b: bytes) -> _Pending:
        return _Pending(*json.loads(b))


@dataclass
class WorkerStats:
    events: int = 0
    behaviors: int = 0
    impressions: int = 0
    clicks: int = 0
    samples: int = 0
    positives: int = 0
    dead_letters: int = 0
    duplicate_impressions: int = 0
    unmatched_clicks: int = 0
    batches: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class _PartitionState:
    watermark: int = 0  # max event time seen (ms)
    pending: dict[tuple[str, int], _Pending] = field(default_factory=dict)
    orphans: dict[tuple[str, int], int] = field(default_factory=dict)  # click ts
    heap: list[tuple[int, str, int]] = field(default_factory=list)  # (ts, request_id, item)


class StreamWorker:
    """Processes poll batches against a store. Transport-agnostic: ``process`` takes raw records."""

    def __init__(self, settings: WorkerSettings, store: SequenceStore, producer: ProducerAdapter) -> None:
        self.s = settings
        self.store = store
        self.producer = producer
        self.stats = WorkerStats()
        self._parts: dict[TopicPartitionT, _PartitionState] = {}
        self._lengths: dict[int, int] = {}
        self._group = settings.group_id
        self._stored_offsets: dict[TopicPartitionT, int] = {}

    # ---- keys -------------------------------------------------------------------------------------
    def _prefix(self, tp: TopicPartitionT) -> bytes:
        return f"{self._group}\x00{tp[0]}\x00".encode() + struct.pack(">I", tp[1])

    def _pkey(self, tp: TopicPartitionT, kind: bytes, rid: str, item: int) -> bytes:
        return self._prefix(tp) + kind + rid.encode() + b"\x00" + struct.pack(">Q", item)

    def _wm_key(self, tp: TopicPartitionT) -> bytes:
        return b"wm\x00" + self._prefix(tp)

    # ---- partition lifecycle ----------------------------------------------------------------------
    def assign(self, tps: list[TopicPartitionT]) -> dict[TopicPartitionT, int]:
        """Load state for newly owned partitions; return the offsets to seek to (stored, else 0)."""
        self._stored_offsets = self.store.offsets(self._group)
        self._lengths.clear()  # another worker may have appended while we did not own these users
        seeks: dict[TopicPartitionT, int] = {}
        for tp in tps:
            st = _PartitionState()
            wm = self.store.get_meta(self._wm_key(tp))
            st.watermark = struct.unpack(">q", wm)[0] if wm else 0
            plen = len(self._prefix(tp))
            for k, v in self.store.pending_items(self._prefix(tp)):
                kind = k[plen:plen + 1]
                # layout: prefix | kind (1) | request id | \x00 | item (8, big-endian)
                key = (k[plen + 1:-9].decode(), struct.unpack(">Q", k[-8:])[0])
                if kind == b"I":
                    p = _Pending.decode(v)
                    st.pending[key] = p
                    st.heap.append((p.ts, key[0], key[1]))
                else:
                    st.orphans[key] = struct.unpack(">q", v)[0]
            heapq.heapify(st.heap)
            self._parts[tp] = st
            seeks[tp] = self._stored_offsets.get(tp, 0)
        log.info("assigned %s (seek %s)", tps, seeks)
        return seeks

    def revoke(self, tps: list[TopicPartitionT]) -> None:
        # Every processed batch is already committed (we commit per batch), so nothing is lost.
        for tp in tps:
            self._parts.pop(tp, None)
        self._lengths.clear()
        log.info("revoked %s", tps)

    def _length(self, user: int) -> int:
        n = self._lengths.get(user)
        if n is None:
            n = self.store.length(user)
            self._lengths[user] = n
        return n

    # ---- the batch ----------------------------------------------------------------------------------
    def process(self, records: list[RawRecord]) -> int:
        """Apply one poll batch; returns the number of samples emitted."""
        if not records:
            return 0
        batch, dead = decode_batch(records)
        delta = StateDelta(self._group)
        appends: dict[int, list[int]] = {}  # user -> row indices into the batch (behaviors)
        click_rows: list[int] = []
        s = self.stats
        s.batches += 1
        s.events += len(records)
        s.dead_letters += len(dead)
        for i in range(len(batch)):
            tp = (records[0].topic, int(batch.partition[i]))
            st = self._parts.get(tp)
            if st is None:  # not ours (stale record after a revoke): skip, it is not committed either
                continue
            kind = int(batch.kind[i])
            user = int(batch.user[i])
            ts = int(batch.ts[i])
            if ts > st.watermark:
                st.watermark = ts
            if kind == BEHAVIOR or kind == CLICK:
                appends.setdefault(user, []).append(i)
                self._lengths[user] = self._length(user) + 1
                if kind == BEHAVIOR:
                    s.behaviors += 1
                    continue
                s.clicks += 1
                click_rows.append(i)
                rid = batch.request_id[i]
                assert rid is not None
                key = (rid, int(batch.item[i]))
                p = st.pending.get(key)
                if p is not None:
                    if 0 <= ts - p.ts <= self.s.attribution_window_ms and not p.clicked:
                        p.clicked = True
                        delta.pending_put[self._pkey(tp, b"I", *key)] = p.encode()
                else:
                    # impression not seen yet (out of order), or already labeled (late click)
                    st.orphans[key] = ts
                    delta.pending_put[self._pkey(tp, b"C", *key)] = struct.pack(">q", ts)
            elif kind == IMPRESSION:
                s.impressions += 1
                rid = batch.request_id[i]
                assert rid is not None
                key = (rid, int(batch.item[i]))
                if key in st.pending:
                    s.duplicate_impressions += 1
                    continue
                p = _Pending(user, batch.user_raw[i], key[1], batch.item_raw[i], int(batch.category[i]),
                             batch.cat_raw[i], ts, self._length(user), rid)
                cts = st.orphans.pop(key, None)
                if cts is not None:
                    delta.pending_del.add(self._pkey(tp, b"C", *key))
                    if 0 <= cts - ts <= self.s.attribution_window_ms:
                        p.clicked = True
                st.pending[key] = p
                heapq.heappush(st.heap, (ts, key[0], key[1]))
                delta.pending_put[self._pkey(tp, b"I", *key)] = p.encode()
        # behaviors (and clicks, as action "click") to the sequences, in arrival order
        for user, rows in appends.items():
            idx = np.asarray(rows, dtype=np.int64)
            act = batch.action[idx].copy()
            act[batch.kind[idx] == CLICK] = _CLICK_ACTION
            delta.appends[user] = Behaviors(batch.item[idx], batch.category[idx], act, batch.ts[idx])
        emitted = self._emit_ready(delta)
        # offsets: next offset per partition, over every record of the batch (dead ones included)
        for r in records:
            tp = (r.topic, r.partition)
            if tp in self._parts and r.offset + 1 > delta.offsets.get(tp, -1):
                delta.offsets[tp] = r.offset + 1
        for tp, off in delta.offsets.items():
            prev = self._stored_offsets.get(tp)
            if prev is not None and off < prev:
                raise OffsetRegressionError(f"{tp}: offset would move back from {prev} to {off}")
            delta.meta[self._wm_key(tp)] = struct.pack(">q", self._parts[tp].watermark)
        self._publish(dead)
        self.store.commit(delta)
        self._stored_offsets.update(delta.offsets)
        return emitted

    def _emit_ready(self, delta: StateDelta, drain: bool = False) -> int:
        n = 0
        w = self.s.attribution_window_ms
        for tp, st in self._parts.items():
            limit = st.watermark - self.s.allowed_lateness_ms
            while st.heap and (drain or st.heap[0][0] + w < limit):
                ts, rid, item = heapq.heappop(st.heap)
                p = st.pending.pop((rid, item), None)
                if p is None:
                    continue
                self._send_sample(p)
                n += 1
                k = self._pkey(tp, b"I", rid, item)
                delta.pending_put.pop(k, None)
                delta.pending_del.add(k)
            # orphan clicks whose window closed can no longer label anything
            for key, cts in list(st.orphans.items()):
                if drain or cts + w < limit:
                    del st.orphans[key]
                    self.stats.unmatched_clicks += 1
                    k = self._pkey(tp, b"C", *key)
                    delta.pending_put.pop(k, None)
                    delta.pending_del.add(k)
        return n

    def _send_sample(self, p: _Pending) -> None:
        label = int(p.clicked)
        self.stats.samples += 1
        self.stats.positives += label
        value = json.dumps({
            "sample_id": sample_id(p.request_id, p.item), "user_id": p.user_raw, "item_id": p.item_raw,
            "category_id": p.cat_raw, "ts": p.ts, "seq_pos": p.seq_pos, "label": label,
            "user_hash": p.user, "item_hash": p.item, "category_hash": p.cat,
        }, separators=(",", ":")).encode()
        self.producer.send(self.s.samples_topic, p.user_raw.encode(), value)

    def _publish(self, dead: list[DeadLetter]) -> None:
        for d in dead:
            self.producer.send(self.s.dlq_topic, d.record.key, d.to_json())
        self.producer.flush()  # samples + dead letters are durable before the state commit

    def drain(self) -> int:
        """Label every pending impression now (end of a bounded replay) and commit."""
        delta = StateDelta(self._group)
        n = self._emit_ready(delta, drain=True)
        self.producer.flush()
        self.store.commit(delta)
        return n


def run_worker(settings: WorkerSettings, *, stop: threading.Event | None = None,
               on_batch: Callable[[WorkerStats], None] | None = None,
               install_signals: bool = True) -> WorkerStats:
    """Run the worker until stopped (SIGTERM/SIGINT, ``stop``) or idle for ``exit_when_idle`` seconds."""
    stop = stop or threading.Event()
    if install_signals and threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    store = open_store(settings.store, cap=settings.lifelong_cap)
    producer = make_producer(settings.kafka_client, settings.bootstrap_servers)
    worker = StreamWorker(settings, store, producer)
    consumer_ref: list[ConsumerAdapter] = []
    pending_seeks: dict[TopicPartitionT, int] = {}

    assigned_at: list[float] = []

    def on_assign(tps: list[TopicPartitionT]) -> None:
        if not assigned_at:
            assigned_at.append(time.monotonic())
        pending_seeks.update(worker.assign(tps))
        if consumer_ref:
            for tp, off in pending_seeks.items():
                consumer_ref[0].seek(tp, off)
            pending_seeks.clear()

    consumer = make_consumer(settings.kafka_client, settings.bootstrap_servers, [settings.events_topic],
                             settings.group_id, on_assign=on_assign, on_revoke=worker.revoke,
                             max_poll_interval_ms=settings.max_poll_interval_ms,
                             session_timeout_ms=settings.session_timeout_ms,
                             max_poll_records=settings.max_poll_records)
    consumer_ref.append(consumer)
    started = time.monotonic()
    last_data = 0.0
    try:
        while not stop.is_set():
            records = consumer.poll_batch(settings.max_poll_records, settings.poll_timeout_ms)
            if not last_data and assigned_at:
                last_data = assigned_at[0]  # idleness counts from the first partition assignment
            if last_data and not records and not consumer.assignment():
                last_data = time.monotonic()  # a rebalance in progress is not idleness
            if pending_seeks:
                for tp, off in pending_seeks.items():
                    consumer.seek(tp, off)
                pending_seeks.clear()
            if records:
                worker.process(records)
                consumer.commit(dict(worker._stored_offsets))  # noqa: SLF001 - informational lag only
                last_data = time.monotonic()
                if on_batch:
                    on_batch(worker.stats)
            elif settings.exit_when_idle:
                if last_data and time.monotonic() - last_data > settings.exit_when_idle:
                    log.info("idle for %.1fs, exiting", settings.exit_when_idle)
                    break
                if not last_data and time.monotonic() - started > NO_ASSIGNMENT_GIVE_UP_S + settings.exit_when_idle:
                    log.warning("no partition assigned after %.0fs, exiting", time.monotonic() - started)
                    break
        if settings.drain_on_exit:
            worker.drain()
            if on_batch:
                on_batch(worker.stats)
    finally:
        consumer.close()
        producer.close()
        store.close()
    return worker.stats
