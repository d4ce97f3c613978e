"""The stream worker: events in, lifelong sequences + labeled samples out, exactly-once state.

Per poll batch:

1. decode + validate the batch; bad records go to ``events.dlq`` with the reason;
2. behaviors and clicks append to the user's sequence (a click is also a behavior);
   impressions become *pending* with ``seq_pos`` = the user's sequence length at impression time
   (point-in-time: the sample may only see behaviors before it); clicks mark their pending
   impression clicked (a click that arrives before its impression waits as an *orphan click*);
3. the per-partition event-time watermark (max event time seen - allowed lateness) labels every
   pending impression whose attribution window has closed: label 1 if clicked, else 0;
4. samples and dead letters are produced and flushed, THEN the store commits appends, pending
   edits, offsets and watermarks in one atomic unit (per checkpoint of several batches; under
   ``run_worker`` in a background thread while the next batches are processed, at most one commit
   in flight: :meth:`StreamWorker.commit`).

Crash anywhere: on restart (and on every partition assignment) the worker seeks to the offsets
stored with the state, not the broker's, so the state is exactly as if it never crashed. Samples
flushed before a crash are re-emitted with the same deterministic ``sample_id`` (request id +
item), which the trainer recognises and skips.

Policies (tested in ``tests/pipeline/test_worker.py``):

* **Arrival order.** Events are applied in arrival order per partition (a user's events share a
  partition); a sequence is arrival-ordered, so a behavior older than the watermark is still
  appended, at the end.
* **Batch boundaries do not matter.** The watermark advances event by event: before an impression
  or click is applied, every pending impression whose window closed under the events before it is
  labeled. So the state, the samples and their order depend on the stream only, never on how it
  was cut into poll batches (which differ after a restart); this is what makes a crash-and-replay
  end in exactly the state of an uninterrupted run.
* **Out-of-order clicks.** A click within the attribution window (``0 <= click.ts - imp.ts <=
  window``) labels its impression even when it arrives first: it waits as an orphan click. An orphan
  that no impression claims within one window after its own time (by the watermark) is counted in
  ``unmatched_clicks`` and dropped. A click that arrives after its impression was labeled (the
  watermark passed the window) cannot change that label; it becomes such an orphan. A click outside
  the window never labels (it is still a behavior).
* **Duplicates.** A duplicate impression (same request id and item) while the first is pending is
  ignored and counted in ``duplicate_impressions``; one that arrives after the first was labeled
  starts a new pending impression, whose sample has the same ``sample_id`` (downstream dedupes).
  A duplicate click is a second behavior (the sequence keeps what the user did) and labels nothing
  new. A re-delivered record (its offset is below the stored offset of its partition) is never
  applied again: it is dropped and counted in ``skipped_below_stored``.
* **Fencing.** Every commit carries the offsets this worker believes are stored. If another worker
  committed the partition in between (a rebalance this worker has not seen yet), the commit is
  refused whole; the worker reloads the partition's state and seeks to the stored offset.
* **Broker outage.** The clients reconnect on their own (a retriable error that kafka-python lets
  escape ``poll`` is retried by the adapter, not raised); the group rejoin re-assigns partitions
  and the worker seeks to its stored offsets, whatever the broker remembers. If the broker comes
  back with a log shorter than the stored offsets (it lost data, or is still being refilled), the
  client resets to the earliest offset and the records below the stored offsets are dropped as
  above (with a warning): the committed state is never rolled back or doubled. A delivery the
  producer gives up on (its retries and delivery timeout spent) fails the flush: the open checkpoint
  is discarded, nothing of it stored, and the worker exits 1 for its supervisor to restart it.
* **SIGTERM/SIGINT** finish the current batch, commit it, and exit 0.
"""

from __future__ import annotations

import contextlib
import gc
import heapq
import json
import logging
import signal
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline import joins
from pipeline.checkpoint import Checkpoint, CommitPolicy, PendingCommit
from pipeline.config import WorkerSettings
from pipeline.events import ACTIONS, BEHAVIOR, CLICK, IMPRESSION, RawRecord, RecordBatch, decode_batch
from pipeline.exceptions import OffsetRegressionError
from pipeline.joins import CLICK_TS, P_TS, JoinImpl, decode_pending, parse_pending_key, sample_id
from pipeline.kafka import ConsumerAdapter, ProducerAdapter, TopicPartitionT, make_consumer, make_producer
from pipeline.state import SequenceStore, StateDelta, open_store

__all__ = ["StreamWorker", "WorkerStats", "run_worker", "sample_id"]

log = logging.getLogger(__name__)
_CLICK_ACTION = ACTIONS["click"]
#: With --exit-when-idle, how long to wait for a first partition assignment before giving up. A group
#: join takes up to max_poll_interval_ms on the embedded broker; a minute covers every sane setting.
NO_ASSIGNMENT_GIVE_UP_S = 60.0
#: Users whose sequence length the worker keeps in memory between batches (saves a store read per
#: user per batch). One entry is ~100 bytes, so 2^20 users is ~100 MB; past that the cache is
#: cleared and refilled from the store (one batched read per batch), which costs little.
LENGTH_CACHE_MAX = 1 << 20
#: While run_worker runs, the cyclic garbage collector's first threshold is raised from CPython's 700
#: to this. A poll batch keeps thousands of container objects alive for a moment (the client's
#: messages, the decoded events), so at 700 the collector ran ~7 times per batch and traversed them
#: each time: ~0.17 s of the ~1.5 CPU-s that bench_worker's confluent/LMDB run took (11%, measured
#: with gc callbacks), ~0.01 s at this value. The worker's own structures hold no reference cycles
#: (reference counting frees them), so only the rare cyclic garbage of libraries waits longer.
#: The previous thresholds are restored when run_worker returns.
GC_GEN0_THRESHOLD = 50_000
_WM = struct.Struct(">q")


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
    commits: int = 0
    fenced_commits: int = 0
    skipped_below_stored: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class PartitionStatus:
    """One owned partition as the worker sees it now (``StreamWorker.partition_status``: metrics)."""

    topic: str
    partition: int
    watermark_ms: int  # max event time seen (0: none yet)
    pending_impressions: int  # waiting for their label
    orphan_clicks: int  # clicks whose impression has not been seen (yet)
    stored_offset: int | None  # next offset as of the last commit (None: nothing stored yet)


@dataclass
class _PartitionState:
    watermark: int = 0  # max event time seen (ms)
    pending: dict[tuple[str, int], list[Any]] = field(default_factory=dict)  # pipeline.joins.P_*
    orphans: dict[tuple[str, int], int] = field(default_factory=dict)  # click ts
    heap: list[tuple[int, str, int]] = field(default_factory=list)  # (ts, request_id, item) of pending
    orphan_heap: list[tuple[int, str, int]] = field(default_factory=list)  # (click ts, ...) lazy
    # Pending impressions and orphan clicks reach the store at commit (StreamWorker._stage_pending),
    # not per event: the keys changed since the last commit, and the keys the store holds. Most
    # impressions are labeled within the checkpoint that saw them: they are never encoded or written.
    touched: set[tuple[str, int]] = field(default_factory=set)
    touched_orphans: set[tuple[str, int]] = field(default_factory=set)
    stored: set[tuple[str, int]] = field(default_factory=set)
    stored_orphans: set[tuple[str, int]] = field(default_factory=set)


class StreamWorker:
    """Processes poll batches against a store. Transport-agnostic: ``process`` takes raw records.

    ``background_commits``: a checkpoint that falls due inside :meth:`process` is committed in a
    background thread while the next batches are processed (``run_worker`` turns it on with
    ``settings.background_commit``; see :meth:`commit`). Off, every commit ends before the call that
    made it returns, which is what tests that read the store between calls rely on.
    """

    def __init__(self, settings: WorkerSettings, store: SequenceStore, producer: ProducerAdapter,
                 join_impl: JoinImpl | None = None, background_commits: bool = False) -> None:
        self.s = settings
        #: the join loop: the C one when built (pipeline.joins), else the Python reference
        self._jimpl = join_impl or joins.DEFAULT
        self.store = store
        self.producer = producer
        self.stats = WorkerStats()
        self._parts: dict[TopicPartitionT, _PartitionState] = {}
        self._lengths: dict[int, int] = {}
        self._group = settings.group_id
        self._stored_offsets: dict[TopicPartitionT, int] = {}
        self._background = background_commits
        self._inflight: PendingCommit | None = None
        self._prefixes: dict[TopicPartitionT, bytes] = {}
        #: the open unit of work: every batch since the last commit (pipeline.checkpoint)
        self.checkpoint = Checkpoint(self._group, CommitPolicy(settings.commit_interval_ms,
                                                               settings.commit_max_events))
        #: told the offsets of every successful commit (run_worker commits them to the broker, for lag)
        self.on_committed: Callable[[dict[TopicPartitionT, int]], None] | None = None
        #: told how long each successful commit's store part took, in seconds (metrics)
        self.on_commit_seconds: Callable[[float], None] | None = None
        #: wall-clock time (Unix seconds) of the last successful commit; None before the first
        self.last_commit_unix: float | None = None
        #: set when a commit was fenced: the caller must re-assign (reload state, seek)
        self.fenced = False

    # ---- keys -------------------------------------------------------------------------------------
    def _prefix(self, tp: TopicPartitionT) -> bytes:
        p = self._prefixes.get(tp)
        if p is None:
            p = self._prefixes[tp] = f"{self._group}\x00{tp[0]}\x00".encode() + struct.pack(">I", tp[1])
        return p

    def _wm_key(self, tp: TopicPartitionT) -> bytes:
        return b"wm\x00" + self._prefix(tp)

    @property
    def stored_offsets(self) -> dict[TopicPartitionT, int]:
        """Next offsets as stored by the last commit (what the broker is told, for lag)."""
        return dict(self._stored_offsets)

    def partition_status(self) -> list[PartitionStatus]:
        """The owned partitions, sorted. Safe to call from another thread (a metrics scrape): it reads
        sizes and numbers only, from snapshots taken under the GIL."""
        stored = dict(self._stored_offsets)
        return [PartitionStatus(tp[0], tp[1], st.watermark, len(st.pending), len(st.orphans), stored.get(tp))
                for tp, st in sorted(list(self._parts.items()))]

    # ---- partition lifecycle ----------------------------------------------------------------------
    def assign(self, tps: list[TopicPartitionT]) -> dict[TopicPartitionT, int]:
        """Load state for newly owned partitions; return the offsets to seek to (stored, else 0)."""
        self.commit()  # work done under the old assignment (none after a revoke: eager rebalances revoke first)
        self._stored_offsets = self.store.offsets(self._group)
        self._lengths.clear()  # another worker may have appended while we did not own these users
        seeks: dict[TopicPartitionT, int] = {}
        for tp in tps:
            st = _PartitionState()
            wm = self.store.get_meta(self._wm_key(tp))
            st.watermark = _WM.unpack(wm)[0] if wm else 0
            plen = len(self._prefix(tp))
            for k, v in self.store.pending_items(self._prefix(tp)):
                kind, key = parse_pending_key(k, plen)
                if kind == b"I":
                    p = decode_pending(v)
                    st.pending[key] = p
                    st.stored.add(key)
                    st.heap.append((p[P_TS], key[0], key[1]))
                else:
                    cts = CLICK_TS.unpack(v)[0]
                    st.orphans[key] = cts
                    st.stored_orphans.add(key)
                    st.orphan_heap.append((cts, key[0], key[1]))
            heapq.heapify(st.heap)
            heapq.heapify(st.orphan_heap)
            self._parts[tp] = st
            seeks[tp] = self._stored_offsets.get(tp, 0)
        log.info("assigned %s (seek %s)", tps, seeks)
        return seeks

    def revoke(self, tps: list[TopicPartitionT]) -> None:
        self.commit()  # everything processed of these partitions is stored before they go
        for tp in tps:
            self._parts.pop(tp, None)
        self._lengths.clear()
        log.info("revoked %s", tps)

    # ---- commits ------------------------------------------------------------------------------------
    def commit(self, wait: bool = True) -> bool:
        """Commit the open checkpoint (flush, then one atomic store commit, then the broker's offsets).
        False when a commit was fenced: ``fenced`` is set, the caller re-assigns.

        At most one commit is in flight. Any earlier one is waited for first, so commits land in
        order. With ``wait`` (every caller but :meth:`process`) this one is waited for too; without
        it, and with background commits on, the store commits in a thread while the caller goes on:
        the next checkpoint is fenced on this one's offsets, and its outcome is taken up by the next
        :meth:`process`, :meth:`commit` or :meth:`commit_if_due` (:meth:`_settle`). If it fails,
        the batches processed meanwhile are discarded with it, as if the worker had crashed there.
        """
        if not self._settle():
            return False
        cp = self.checkpoint
        self._stage_pending(cp.delta)
        if cp.empty:
            return True
        if len(self._lengths) > LENGTH_CACHE_MAX:
            wait = True  # the cache is cleared below, once everything it holds is stored
        background = self._background and not wait
        try:
            self._inflight = cp.submit(self.store, self.producer, background)
        except BaseException:
            self._discard()  # a failed flush: nothing of the checkpoint is stored; it propagates
            raise
        if background:
            return True
        if not self._settle():
            return False
        if len(self._lengths) > LENGTH_CACHE_MAX:
            # only here: nothing in flight, nothing open, so every length in the cache is stored (a
            # length read while a commit is in flight is of a user it does not touch: that user would
            # be in the cache)
            self._lengths.clear()
        return True

    def _settle(self, block: bool = True) -> bool:
        """Take up the outcome of the commit in flight (waiting for it when ``block``; else only if it
        ended). False when it was fenced."""
        pending = self._inflight
        if pending is None or (not block and not pending.done()):
            return True
        self._inflight = None
        try:
            delta = pending.wait()
        except OffsetRegressionError as e:
            log.warning("%s", e)
            self.stats.fenced_commits += 1
            self._discard()
            self.fenced = True
            return False
        except BaseException:
            self._discard()  # a failed store commit: nothing of it is stored; it propagates
            raise
        self.stats.commits += 1
        self.last_commit_unix = time.time()
        self._stored_offsets.update(delta.offsets)
        if self.on_commit_seconds is not None:
            self.on_commit_seconds(pending.seconds)
        if self.on_committed is not None:
            self.on_committed(dict(delta.offsets))
        return True

    def _fence_offsets(self) -> dict[TopicPartitionT, int]:
        """The stored offsets plus those of the commit in flight: what the next checkpoint is fenced on,
        and below which a record was applied already."""
        pending = self._inflight
        return self._stored_offsets if pending is None else {**self._stored_offsets, **pending.delta.offsets}

    def abandon(self) -> None:
        """Wait for a commit still in flight without taking up its outcome: the process is leaving on
        an error, and the store must not be closed under the commit."""
        pending, self._inflight = self._inflight, None
        if pending is not None:
            pending.join()

    def _stage_pending(self, delta: StateDelta) -> None:
        """Write the pending impressions and orphan clicks changed since the last commit into the
        checkpoint: a put of the current value, or a delete of a key the store holds (``stage`` of
        :mod:`pipeline.joins`). A failed commit discards every partition's state, ``stored``
        included, so staging early is safe."""
        stage, put, dele = self._jimpl.stage, delta.pending_put, delta.pending_del
        for tp, st in self._parts.items():
            if st.touched:
                stage(st.touched, st.pending, st.stored, self._prefix(tp), b"I", put, dele)
            if st.touched_orphans:
                stage(st.touched_orphans, st.orphans, st.stored_orphans, self._prefix(tp), b"C", put, dele)

    def commit_if_due(self) -> bool:
        """Commit when the policy says so (``commit_max_events`` or ``commit_interval_ms``); either
        way, take up the outcome of a commit in flight (called when no record came: waiting is free)."""
        return self.commit() if self.checkpoint.due() else self._settle()

    def _discard(self) -> None:
        # The in-memory state of every partition moved past what the store holds: forget it all. The
        # caller re-assigns (reloads from the store, seeks to the stored offsets) or the process exits.
        self._parts.clear()
        self._lengths.clear()
        self.checkpoint.discard()  # batches processed while a failed commit was in flight

    # ---- the batch ----------------------------------------------------------------------------------
    def process(self, records: RecordBatch | list[RawRecord]) -> int:
        """Apply one poll batch (of one topic) to the open checkpoint, then commit it if it is due;
        returns the number of samples emitted."""
        batch = records if isinstance(records, RecordBatch) else RecordBatch.from_records(records)
        n = len(batch)
        if not n:
            return 0
        if self._inflight is not None and not self._settle(block=False):
            return 0  # the commit in flight was fenced: the caller re-assigns (reload, seek) first
        s = self.stats
        cp = self.checkpoint
        s.batches += 1
        s.events += n
        cp.count(n)
        # first and last offset per partition, over every record of the batch (dead ones included);
        # a poll batch holds few partitions, each in offset order
        topic, parts, offs = batch.topic, batch.partition, batch.offset
        ps, i_first = np.unique(parts, return_index=True)
        i_last = n - 1 - np.unique(parts[::-1], return_index=True)[1]
        keys = [(topic, p) for p in ps.tolist()]
        first = dict(zip(keys, offs[i_first].tolist(), strict=True))
        last = dict(zip(keys, offs[i_last].tolist(), strict=True))
        # applied = stored, or further in the open checkpoint: a record below it is never applied again
        fence = self._fence_offsets()
        applied = {**fence, **cp.delta.offsets}
        low = {tp: applied[tp] for tp, off in first.items()
               if tp in self._parts and tp in applied and off < applied[tp]}
        if low:
            batch = self._below_stored(batch, low, last)
            if not len(batch):
                return 0
        owned = [tp for tp in last if tp in self._parts]
        if len(owned) < len(last):
            log.debug("skipping records of partitions not owned: %s", [tp for tp in last if tp not in self._parts])
        decoded, dead = decode_batch(batch)
        s.dead_letters += len(dead)
        delta = cp.delta
        emitted = self._apply(decoded, topic, {tp[1] for tp in owned})
        for tp in owned:
            cp.advance(tp, last[tp] + 1, fence.get(tp))
            delta.meta[self._wm_key(tp)] = _WM.pack(self._parts[tp].watermark)
        for d in dead:
            self.producer.send(self.s.dlq_topic, d.record.key, d.to_json())
        if cp.due():
            self.commit(wait=False)
        return emitted

    def _below_stored(self, batch: RecordBatch, low: dict[TopicPartitionT, int],
                      last: dict[TopicPartitionT, int]) -> RecordBatch:
        """Drop records below the applied offset: they were applied already (or belong to a log that
        restarted, which cannot be applied meaningfully either). Never applied twice."""
        floor = np.full(len(batch), -1, np.int64)
        for (_, p), applied in low.items():
            floor[batch.partition == p] = applied
        keep = batch.take(np.flatnonzero(batch.offset >= floor))
        n = len(batch) - len(keep)
        self.stats.skipped_below_stored += n
        log.warning("skipped %d record(s) below the stored offsets %s: the consumer was reset below them (the "
                    "log restarted or lost data?); they are not applied again", n, low)
        for tp, stored in low.items():
            if last[tp] < stored:
                del last[tp]
        return keep

    def _apply(self, batch, topic: str, owned_parts: set[int]) -> int:  # type: ignore[no-untyped-def]
        n = len(batch)
        if n == 0 or not owned_parts:
            return self._advance_all({}, topic)
        kind, user, ts, part = batch.kind, batch.user, batch.ts, batch.partition
        if len(owned_parts) == 1:
            (p0,) = owned_parts
            idx = np.flatnonzero(part == p0) if (part != p0).any() else np.arange(n)
        else:
            idx = np.flatnonzero(np.isin(part, list(owned_parts)))
        if len(idx) == 0:
            return self._advance_all({}, topic)
        k = kind[idx]
        s = self.stats
        is_imp = k == IMPRESSION
        not_beh = k != BEHAVIOR
        n_imp = int(np.count_nonzero(is_imp))
        n_ic = int(np.count_nonzero(not_beh))
        s.behaviors += len(idx) - n_ic
        s.impressions += n_imp
        s.clicks += n_ic - n_imp
        # -- sequence positions: each user's length before the batch plus its appends before each row
        u = user[idx]
        uniq, inv = np.unique(u, return_inverse=True)
        ul = uniq.tolist()
        lengths = self._lengths
        missing = [x for x in ul if x not in lengths]
        if missing:  # the cache is cleared only right after a commit: the store's length is current
            lengths.update(zip(missing, self.store.lengths(missing), strict=True))
        base = np.fromiter(map(lengths.__getitem__, ul), np.int64, len(ul))
        is_app = ~is_imp  # behaviors and clicks (a click is also a behavior)
        if n_imp < len(idx):
            cnt = np.bincount(inv, weights=is_app, minlength=len(ul)).astype(np.int64)
            lengths.update(zip(ul, (base + cnt).tolist(), strict=True))
            ar = idx[is_app]
            acts = batch.action[ar]
            acts[kind[ar] == CLICK] = _CLICK_ACTION
            self.checkpoint.add_appends(user[ar], batch.item[ar], batch.category[ar], acts, ts[ar])
        ic = idx[not_beh]
        seq_pos = np.zeros(len(ic), np.int64)
        if n_imp:
            # appends of the same user before each row of the batch: an exclusive running count
            # within each user's rows (grouped by a stable sort, so arrival order holds in a group)
            order = np.argsort(inv, kind="stable")
            a = is_app[order].astype(np.int64)
            run = np.cumsum(a) - a
            g = inv[order]
            before = np.empty(len(idx), np.int64)
            before[order] = run - run[np.searchsorted(g, np.arange(len(ul)))][g]
            seq_pos = (base[inv] + before)[not_beh]
        # -- per-partition watermark before each impression/click, and at the end ----------------
        final_wm: dict[int, int] = {}
        wm_before = np.empty(len(ic), dtype=np.int64)
        for p in np.unique(part[idx]).tolist():
            st = self._parts[(topic, p)]
            rows_p = idx[part[idx] == p]
            run_wm = np.maximum.accumulate(np.maximum(ts[rows_p], st.watermark))
            final_wm[p] = int(run_wm[-1])
            if len(ic):
                # watermark over the rows strictly before each impression/click of this partition
                sel = part[ic] == p
                pos = np.searchsorted(rows_p, ic[sel])
                wm_before[sel] = np.where(pos > 0, run_wm[np.maximum(pos - 1, 0)], st.watermark)
        emitted = 0
        if len(ic):
            emitted += self._joins(batch, topic, ic, wm_before, seq_pos)
        return emitted + self._advance_all(final_wm, topic)

    def _joins(self, batch, topic: str, ic: np.ndarray, wm_before: np.ndarray,  # type: ignore[no-untyped-def]
               seq_pos: np.ndarray) -> int:
        """Impressions and clicks in arrival order, partition by partition (partitions share no
        state, so this is the same as applying the batch cut into one sub-batch per partition)."""
        part_ic = batch.partition[ic]
        ps = np.unique(part_ic).tolist()
        w, lateness, join = self.s.attribution_window_ms, self.s.allowed_lateness_ms, self._jimpl.join
        out: list[tuple[bytes, bytes]] = []
        duplicates = 0
        for p in ps:
            st = self._parts[(topic, p)]
            if len(ps) == 1:
                rows, wmb, sp = ic, wm_before, seq_pos
            else:
                sel = np.flatnonzero(part_ic == p)
                rows, wmb, sp = ic[sel], wm_before[sel], seq_pos[sel]
            st.watermark, emitted, positives, unmatched, dup = join(st, batch, rows, wmb, sp, st.watermark, w,
                                                                    lateness, out)
            self._count(emitted, positives, unmatched)
            duplicates += dup
        self.stats.duplicate_impressions += duplicates
        return self._send_samples(out)

    def _advance_all(self, final_wm: dict[int, int], topic: str) -> int:
        out: list[tuple[bytes, bytes]] = []
        for tp, st in self._parts.items():
            wm = final_wm.get(tp[1]) if tp[0] == topic else None
            if wm is not None and wm > st.watermark:
                st.watermark = wm
            self._emit_ready(st, out)
        return self._send_samples(out)

    def _emit_ready(self, st: _PartitionState, out: list[tuple[bytes, bytes]], drain: bool = False) -> None:
        """Label pending impressions whose window closed under the partition's watermark."""
        self._count(*self._jimpl.emit_ready(st, st.watermark - self.s.allowed_lateness_ms,
                                            self.s.attribution_window_ms, drain, out))

    def _count(self, emitted: int, positives: int, unmatched: int) -> None:
        s = self.stats
        s.samples += emitted
        s.positives += positives
        s.unmatched_clicks += unmatched

    def _send_samples(self, out: list[tuple[bytes, bytes]]) -> int:
        """Produce the samples labeled by a join, in labeling order within each partition of the
        samples topic, so each user's samples stay in order (the checkpoint flushes them before the
        store commits)."""
        if out:
            self.producer.send_many(self.s.samples_topic, out)
        return len(out)

    def drain(self) -> int:
        """Label every pending impression now (end of a bounded replay) and commit."""
        out: list[tuple[bytes, bytes]] = []
        for st in self._parts.values():
            self._emit_ready(st, out, drain=True)
        n = self._send_samples(out)
        self.commit()
        return n


def run_worker(settings: WorkerSettings, *, stop: threading.Event | None = None,
               on_batch: Callable[[WorkerStats], None] | None = None,
               install_signals: bool = True) -> WorkerStats:
    """Run the worker until stopped (SIGTERM/SIGINT, ``stop``) or idle for ``exit_when_idle`` seconds."""
    stop = stop or threading.Event()
    with _gc_threshold(GC_GEN0_THRESHOLD):
        return _run(settings, stop, on_batch, install_signals)


_gc_lock = threading.Lock()
_gc_users: list[tuple[int, int, int]] = []  # the thresholds before the first running worker raised them


@contextlib.contextmanager
def _gc_threshold(gen0: int) -> Iterator[None]:
    """Raise the collector's first threshold while at least one worker runs in this process (workers
    in threads: the first one in saves the thresholds, the last one out restores them)."""
    with _gc_lock:
        _gc_users.append(gc.get_threshold())
        if len(_gc_users) == 1:
            gc.set_threshold(max(gen0, _gc_users[0][0]), *_gc_users[0][1:])
    try:
        yield
    finally:
        with _gc_lock:
            first = _gc_users[0]
            _gc_users.pop()
            if not _gc_users:
                gc.set_threshold(*first)


def _run(settings: WorkerSettings, stop: threading.Event, on_batch: Callable[[WorkerStats], None] | None,
         install_signals: bool) -> WorkerStats:
    if install_signals and threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    store = open_store(settings.store, cap=settings.lifelong_cap)
    producer = make_producer(settings.kafka_client, settings.bootstrap_servers)
    worker = StreamWorker(settings, store, producer, background_commits=settings.background_commit)
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

    metrics = None
    try:
        if settings.metrics_port is not None:
            from pipeline.metrics import WorkerMetrics

            metrics = WorkerMetrics(worker)
            metrics.start(settings.metrics_port, settings.metrics_host)
        consumer = make_consumer(settings.kafka_client, settings.bootstrap_servers, [settings.events_topic],
                                 settings.group_id, on_assign=on_assign, on_revoke=worker.revoke,
                                 max_poll_interval_ms=settings.max_poll_interval_ms,
                                 session_timeout_ms=settings.session_timeout_ms,
                                 max_poll_records=settings.max_poll_records, fetch_process=settings.fetch_process)
    except BaseException:
        if metrics is not None:
            metrics.close()
        producer.close()
        store.close()
        raise
    consumer_ref.append(consumer)
    worker.on_committed = consumer.commit  # broker-side offsets follow each state commit (lag dashboards)
    started = time.monotonic()
    last_data = 0.0
    try:
        while not stop.is_set():
            records = consumer.poll_columns(settings.max_poll_records, settings.poll_timeout_ms)
            if not last_data and assigned_at:
                last_data = assigned_at[0]  # idleness counts from the first partition assignment
            if pending_seeks:
                for tp, off in pending_seeks.items():
                    consumer.seek(tp, off)
                pending_seeks.clear()
            if len(records):
                t = time.perf_counter()
                worker.process(records)  # commits when the checkpoint is due
                last_data = time.monotonic()
                if metrics is not None:
                    metrics.observe_batch(time.perf_counter() - t)
                if on_batch:
                    on_batch(worker.stats)
            else:
                worker.commit_if_due()  # the interval also runs out while no record arrives
            if worker.fenced:  # another worker committed our partitions: reload and seek
                worker.fenced = False
                for tp, off in worker.assign(consumer.assignment()).items():
                    consumer.seek(tp, off)
            if not records and settings.exit_when_idle:
                if last_data and time.monotonic() - last_data > settings.exit_when_idle:
                    log.info("idle for %.1fs, exiting", settings.exit_when_idle)
                    break
                if not last_data and time.monotonic() - started > NO_ASSIGNMENT_GIVE_UP_S + settings.exit_when_idle:
                    log.warning("no partition assigned after %.0fs, exiting", time.monotonic() - started)
                    break
        worker.commit()  # stopped (SIGTERM/SIGINT) or idle: what was processed is stored before exit
        if settings.drain_on_exit:
            worker.drain()
            if on_batch:
                on_batch(worker.stats)
    finally:
        worker.abandon()  # after an error: a commit still in flight ends before the store closes
        if metrics is not None:
            metrics.close()
        consumer.close()
        producer.close()
        store.close()
    return worker.stats


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.worker``: the same flags and settings as ``ctrstream worker``, without
    loading the other commands (the full CLI imports the trainer, i.e. torch: seconds per start)."""
    import argparse
    import sys

    from pipeline.cli import add_settings_arguments
    from pipeline.config import load_settings
    from pipeline.exceptions import ConfigError, PipelineError

    parser = argparse.ArgumentParser(prog="python -m pipeline.worker", description="The stream worker.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_settings_arguments(parser, WorkerSettings)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)
    try:
        settings = load_settings(WorkerSettings, vars(args), args.config, "worker")
        stats = run_worker(settings)
    except (ConfigError, PipelineError) as e:
        print(f"worker: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    print(json.dumps({"worker": stats.as_dict()}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
