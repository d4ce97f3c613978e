"""The worker's unit of exactly-once work: the state changes of every batch since the last commit,
committed together with the offsets that produced them (STYLE R13).

A commit per poll batch costs an fsync (LMDB) or a server-side script over every user the batch
touched (Redis), plus a producer flush; on a stream whose batches touch most active users it was
~40% of the worker's CPU. So the worker keeps ONE open :class:`Checkpoint` across batches and
commits it when the :class:`CommitPolicy` says so: every ``commit_max_events`` records or every
``commit_interval_ms`` milliseconds, whichever comes first (and at once on SIGTERM, on a partition
revoke or assignment, and on an idle exit).

What makes this exact, not just faster:

* **One atomic unit per checkpoint.** The appends, pending-impression edits, watermarks and next
  offsets of every batch in the checkpoint go to the store in one :meth:`SequenceStore.commit`.
  A crash before it loses the whole checkpoint, offsets included, so the restart replays exactly
  those records onto exactly the state they were first applied to.
* **Produce, flush, then commit.** Samples and dead letters of the checkpoint's batches are sent
  as they are made; :meth:`Checkpoint.commit` flushes the producer (it raises on a failed
  delivery) before the store commit. A replay re-emits them with the same ``sample_id``.
* **Offsets only move forward.** Each partition's next offset must grow from batch to batch and
  start above the offset stored at the last commit; anything else raises
  :class:`~pipeline.exceptions.OffsetRegressionError` before the store is touched (the worker's
  state and the log disagree: committing would apply records twice or skip some).
* **Fencing is per checkpoint.** The offsets the worker believed stored when the checkpoint
  opened are the commit's ``expect_offsets``; a zombie's commit is refused whole.
* **Broker offsets follow the state.** Only after the store commit returns are the same offsets
  committed to the broker (``on_committed``; informational, for lag dashboards).
* **At most one commit in flight.** :meth:`Checkpoint.submit` hands a checkpoint to the store as a
  :class:`PendingCommit`, in a background thread when asked (the stream worker asks: see
  ``pipeline.worker``), so the store's part (a Redis script runs in ``redis-server``; LMDB writes
  and syncs its pages) overlaps the next batches. The caller waits for it before it submits the
  next one, so commits land in order and the next checkpoint is fenced on this one's offsets; if
  it fails, everything after it is discarded with it.

Sequence appends are buffered as the batches' columns (arrival order) and grouped by user once,
at commit: a user touched by every batch of a checkpoint costs one tail-chunk rewrite, not one per
batch.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pipeline.exceptions import OffsetRegressionError
from pipeline.kafka import ProducerAdapter, TopicPartitionT
from pipeline.state import GroupedAppends, SequenceStore, StateDelta

__all__ = ["Checkpoint", "CommitPolicy", "DEFAULT_COMMIT_INTERVAL_MS", "DEFAULT_COMMIT_MAX_EVENTS", "PendingCommit"]

#: How long a checkpoint stays open. One second bounds what a crash replays (about one second of
#: the stream, and the samples of that second re-emitted with their ids) and how stale the store
#: looks to the scorer and trainer, while making the per-commit cost (an fsync, a tail-chunk
#: rewrite per touched user, a producer flush) small next to the work in between: on the benchmark
#: stream, commits fell from ~40% of the worker's CPU (one per 5,000-record batch) to a few percent.
DEFAULT_COMMIT_INTERVAL_MS = 1_000
#: Records per checkpoint at most, whatever the clock says: bounds the memory of the open
#: checkpoint (~30 bytes of buffered appends per behavior plus the pending edits) and the replay
#: after a crash when the worker catches up on a backlog faster than the interval. 100,000 records
#: is ~3 MB and half a second of work at the target rate; past ~50,000 the commit share of CPU is
#: already in the noise (see docs/pipeline.md), so a larger value buys nothing measurable.
DEFAULT_COMMIT_MAX_EVENTS = 100_000


@dataclass(frozen=True)
class CommitPolicy:
    """When the open checkpoint is committed: ``max_events`` records or ``interval_ms``, first wins."""

    interval_ms: int = DEFAULT_COMMIT_INTERVAL_MS  # commit at least this often while records arrive
    max_events: int = DEFAULT_COMMIT_MAX_EVENTS  # commit once this many records are in the checkpoint

    def __post_init__(self) -> None:
        if self.interval_ms < 0:
            raise ValueError(f"commit interval must be >= 0 ms, got {self.interval_ms}")
        if self.max_events < 1:
            raise ValueError(f"commit_max_events must be >= 1, got {self.max_events}")

    def due(self, events: int, opened_s: float, now_s: float) -> bool:
        return events > 0 and (events >= self.max_events or (now_s - opened_s) * 1000.0 >= self.interval_ms)


class Checkpoint:
    """The open unit of work of one worker: a :class:`StateDelta` filled batch by batch.

    The worker writes pending edits and watermarks into :attr:`delta` directly (a later batch's
    edit of the same key replaces the earlier one; a delete drops an earlier put), adds sequence
    appends with :meth:`add_appends` and the batch's offsets with :meth:`advance`.
    """

    def __init__(self, group: str, policy: CommitPolicy, clock: Callable[[], float] = time.monotonic) -> None:
        self.group = group
        self.policy = policy
        self._clock = clock
        self._reset()

    def _reset(self) -> None:
        self.delta = StateDelta(self.group)
        self.events = 0
        self.opened = self._clock()
        self._cols: list[tuple[np.ndarray, ...]] = []

    @property
    def empty(self) -> bool:
        d = self.delta
        return not (self.events or self._cols or d.offsets or d.pending_put or d.pending_del or d.meta)

    def due(self) -> bool:
        return self.policy.due(self.events, self.opened, self._clock())

    def add_appends(self, user: np.ndarray, item: np.ndarray, category: np.ndarray, action: np.ndarray,
                    ts: np.ndarray) -> None:
        """Behaviors appended by one batch, in arrival order (any users)."""
        if len(user):
            self._cols.append((user, item, category, action, ts))

    def advance(self, tp: TopicPartitionT, next_offset: int, stored: int | None) -> None:
        """Record that ``tp`` was consumed up to ``next_offset`` (exclusive); ``stored`` is the offset
        stored at the last commit (the commit's fence)."""
        have = self.delta.offsets.get(tp, stored)
        if have is not None and next_offset <= have:
            raise OffsetRegressionError(
                f"{self.group}/{tp[0]}/{tp[1]}: next offset {next_offset} does not advance past {have} "
                f"(the worker's state and the log disagree); nothing of this checkpoint was committed")
        self.delta.offsets[tp] = next_offset
        self.delta.expect_offsets.setdefault(tp, stored)

    def count(self, events: int) -> None:
        if self.empty:
            self.opened = self._clock()  # the interval runs from the first record, not from the last commit
        self.events += events

    def discard(self) -> None:
        """Forget the open checkpoint (its state was built on a commit that failed)."""
        self._reset()

    def submit(self, store: SequenceStore, producer: ProducerAdapter, background: bool = False) -> PendingCommit | None:
        """Flush the producer, then hand the checkpoint to the store: in a background thread when
        ``background``, else now. A new checkpoint opens either way. None when there was nothing to
        commit. Raises what the flush raises (the checkpoint is discarded: nothing of it is stored);
        what the store raises comes from :meth:`PendingCommit.wait`."""
        if self.empty:
            return None
        delta, cols = self.delta, self._cols
        try:
            producer.flush()  # samples + dead letters are on the broker before the state that made them
        finally:
            self._reset()
        return PendingCommit(store, delta, cols, background)

    def commit(self, store: SequenceStore, producer: ProducerAdapter,
               on_committed: Callable[[dict[TopicPartitionT, int]], None] | None = None) -> StateDelta | None:
        """Flush the producer, commit the checkpoint's state atomically, then tell ``on_committed``
        the offsets now stored. Returns the committed delta (None when there was nothing to commit).

        Raises what the flush or the store raises (a fenced commit: ``OffsetRegressionError``); the
        checkpoint is then discarded either way (the caller reloads the state it described).
        """
        pending = self.submit(store, producer)
        if pending is None:
            return None
        delta = pending.wait()
        if on_committed is not None:
            on_committed(dict(delta.offsets))
        return delta


class PendingCommit:
    """A checkpoint handed to the store: the appends are grouped by user and the delta committed, in
    a thread of its own when ``background`` (numpy's sort, the Redis round trip and LMDB's page
    writes and sync release the GIL, so the caller's next batches run meanwhile), else at once.
    :meth:`wait` returns the committed delta or raises what the commit raised."""

    def __init__(self, store: SequenceStore, delta: StateDelta, cols: list[tuple[np.ndarray, ...]],
                 background: bool) -> None:
        self.delta = delta
        #: how long the store's part took (grouping the appends and the store commit), once it ended
        self.seconds = 0.0
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        if background:
            self._thread = threading.Thread(target=self._run, args=(store, cols), name="ctrstream-commit",
                                            daemon=True)
            self._thread.start()
        else:
            self._run(store, cols)

    def _run(self, store: SequenceStore, cols: list[tuple[np.ndarray, ...]]) -> None:
        t = time.perf_counter()
        try:
            self.delta.appends = _grouped_appends(cols)
            store.commit(self.delta)
        except BaseException as e:  # noqa: BLE001 - raised again by wait(), in the caller's thread
            self._error = e
        finally:
            self.seconds = time.perf_counter() - t

    def done(self) -> bool:
        return self._thread is None or not self._thread.is_alive()

    def join(self) -> None:
        """Wait for the commit to end, whatever its outcome."""
        if self._thread is not None:
            self._thread.join()

    def wait(self) -> StateDelta:
        self.join()
        err, self._error = self._error, None
        if err is not None:
            raise err
        return self.delta


def _grouped_appends(cols: list[tuple[np.ndarray, ...]]) -> GroupedAppends:
    """A checkpoint's buffered append columns (one tuple per batch, arrival order), grouped by user."""
    if not cols:
        return GroupedAppends.of({})
    user, item, cat, act, ts = [np.concatenate(c) if len(cols) > 1 else c[0] for c in zip(*cols, strict=True)]
    return GroupedAppends.from_columns(user, item, cat, act, ts)
