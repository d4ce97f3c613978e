"""kafka-python's consume in a child process: the worker's fetch runs beside its processing.

Why. kafka-python is pure Python: its fetch (network thread, response decoding, positions) and the
worker's own work (decode, join, store) share one GIL, so the worker's process used one core while
the second core of a 2-core host sat mostly idle (the broker took ~0.15 of it). The worker ran at
0.53-0.63x the bare client's consume rate; this is how it gets past that (docs/pipeline.md, "The
fetch process").

How. The child owns the ``KafkaConsumer``: group membership, heartbeats, fetches, CRC checks,
positions. It does not parse records: each fetched v2 record batch goes to the worker as its raw
records section (one pipe message, a copy), and the worker parses it into columns in C
(``_kafkarecords.parse_v2_columns``) - cheaper than building kafka-python's ``ConsumerRecord``s, so
the child stays ahead. What kafka-python does around the records stays kafka-python's: CRC check,
decompression, control and aborted transactional batches, legacy (magic 0/1) batches, which are
parsed in the child and sent as records.

The worker sees the usual :class:`ConsumerAdapter`, and the usual callbacks at the usual points:
- rebalances: the child's listener sends ``revoke``/``assign`` after every batch it sent before, and
  waits. The worker reaches it in its next ``poll_columns`` (every earlier batch processed), runs
  ``on_revoke`` (commit) / ``on_assign`` (seeks to the stored offsets, done by the child inside its
  listener, as in-process), then acks. So revoke still commits before the partition is given up,
  and the first record after an assignment is fetched from the stored offset.
- ``seek`` outside a rebalance (a fenced worker reloading): batches already on the way for that
  partition were fetched from the old position; each partition's seeks are numbered, every batch
  carries its partition's number, and the worker drops batches with an old one.
- ``commit`` (broker-side offsets, informational) is sent and done by the child, unacknowledged.
- errors the in-process consumer raises from ``poll`` (a non-retriable ``KafkaError``, a corrupt
  batch) are raised from ``poll_columns`` here, the same exception; the child then exits.

Lifetime. The child ignores SIGINT/SIGTERM (the worker finishes its batch and closes it), dies
with the worker (``PR_SET_PDEATHSIG``, and the control pipe's EOF), and a child that dies makes
``poll_columns`` raise :class:`pipeline.exceptions.BrokerError`.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import pickle
import queue
import signal
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from pipeline.events import RawRecord, RecordBatch
from pipeline.exceptions import BrokerError

log = logging.getLogger(__name__)

TopicPartitionT = tuple[str, int]
RebalanceCb = Callable[[list[TopicPartitionT]], None]

# child -> worker messages: one kind byte, then the body
_DATA, _LEGACY, _REVOKE, _ASSIGN, _ERROR = b"D", b"L", b"R", b"A", b"E"
#: a data message's header: partition, the partition's seek number, fetch offset (records below it
#: were asked for by nobody: a fetch from the middle of a batch), base offset, record count
_DATA_HDR = struct.Struct("<iqqqi")
#: poll() of the child returns up to this many record batches (not records) at a time
CHILD_MAX_BATCHES = 16
#: the child's poll timeout: how soon it sees a command (seek, commit, close) while idle
CHILD_POLL_MS = 100
#: batches queued in the child for the pipe before it stops fetching (one poll's batches may go
#: beyond): enough to keep the worker fed, few enough that a rebalance waits little for them
CHILD_QUEUE = 8
#: how long the child waits before looking again while the queue is full
QUEUE_FULL_SLEEP_S = 0.002
#: kafka-python's fetch sizes in the child. Smaller than the in-process consumer's (64/16 MiB):
#: the first batch reaches the worker after one partition's MiB is fetched and decoded, not after a
#: whole 64 MiB response (measured: the worker waited 0.45 s of a 1.9 s run with 16 MiB, 0.1 s with 1)
CHILD_FETCH_MAX_BYTES = 4 << 20
CHILD_PARTITION_FETCH_BYTES = 1 << 20
#: how long close() waits for the child to leave the group before killing it
CLOSE_TIMEOUT_S = 15.0


class _Stop(Exception):
    """The worker is gone or asked the child to close."""


# ---- the child ------------------------------------------------------------------------------------

def _die_with_parent() -> None:
    """SIGKILL this process when the parent dies (Linux); elsewhere the control pipe's EOF does it."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _raw_records_class(base: type) -> type:
    """The record fast path's ``PartitionRecords`` (``_kafka_fast``, ``base``) yielding one item per
    record batch instead of records: ``(_DATA, (partition, fetch_offset, base_offset, count),
    records_section)`` or ``(_LEGACY, partition, [(offset, key, value), ...])``. The batch loop
    (CRC, transactions, control batches, decompression) and the legacy records are the fast path's;
    positions advance per batch (``next_fetch_offset``), as the fast path's do per record."""

    class RawBatches(base):  # type: ignore[misc]
        def _maybe_skip_record(self, record: Any) -> bool:
            return False  # records below fetch_offset are dropped by the worker (it gets fetch_offset)

        def _unpack_records(self, tp: Any, records: Any, key_deserializer: Any,
                            value_deserializer: Any) -> Iterator[Any]:
            for batch in self._batches(tp, records):
                if batch.magic != 2:
                    yield (_LEGACY, tp.partition, [(r.offset, r.key, r.value) for r in self._legacy_records(tp, batch)
                                                   if r.offset >= self.fetch_offset])
                    continue
                count = batch.records_count
                self.records_read += max(count, 0)
                self.bytes_read += len(batch._buffer) - batch._pos
                self.next_fetch_offset = batch.next_offset
                yield (_DATA, (tp.partition, self.fetch_offset, batch.base_offset, count),
                       memoryview(batch._buffer)[batch._pos:])

    return RawBatches


def _legacy_message(partition: int, gen: int, records: list[tuple[int, bytes | None, bytes | None]]) -> bytes:
    """The pipe message of a legacy (magic 0/1) batch's records, parsed by kafka-python in the child:
    ``(offset, key, value)`` each."""
    return _LEGACY + pickle.dumps((partition, gen, records))


class _Child:
    def __init__(self, cfg: dict[str, Any], out: Connection, ctl: Connection) -> None:
        self.out, self.ctl = out, ctl
        self.gen: dict[int, int] = {}
        self.closing = False
        # (partition or -1, the offset its first record was fetched from, message)
        self.q: queue.Queue[tuple[int, int, bytes] | None] = queue.Queue()
        self.rewind: dict[int, int] = {}  # revoked partitions whose queued batches were dropped
        self.send_error: BaseException | None = None
        self.sender = threading.Thread(target=self._send_loop, name="fetch-sender", daemon=True)
        self.sender.start()
        from pipeline.kafka import _KafkaPythonConsumer

        self.consumer = _KafkaPythonConsumer(
            cfg["bootstrap"], cfg["topics"], cfg["group_id"], self._on_assign, self._on_revoke,
            cfg["max_poll_interval_ms"], cfg["session_timeout_ms"], CHILD_MAX_BATCHES,
            fetch_max_bytes=CHILD_FETCH_MAX_BYTES, max_partition_fetch_bytes=CHILD_PARTITION_FETCH_BYTES)
        from pipeline import _kafka_fast

        fast = _kafka_fast._fast_class()
        if fast is None:  # available() checked it in the worker; a different kafka-python here would be odd
            raise BrokerError("fetch process: kafka-python's record fast path is not available in the child")
        self.consumer._c._fetcher.PartitionRecords = _raw_records_class(fast)

    # the pipe is written by one thread, so messages keep their order; the GIL is released while it writes
    def _send_loop(self) -> None:
        try:
            while (item := self.q.get()) is not None:
                self.out.send_bytes(item[2])
        except BaseException as e:  # noqa: BLE001 - the worker is gone (broken pipe): the main loop stops
            self.send_error = e

    def _put(self, msg: bytes, partition: int = -1, first: int = -1) -> None:
        """Queue a message for the pipe. Never blocks: ``run`` bounds the queue by not fetching while
        it is full, and keeps doing the group's part of a poll meanwhile (how it takes part in
        rebalances)."""
        if self.send_error is not None:
            raise _Stop
        self.q.put((partition, first, msg))

    def _unqueue(self, partitions: set[int]) -> None:
        """Drop the queued batches of revoked partitions, so that a revoke waits for the batch on the
        pipe and the one the worker is processing, not for a queue of them. Nothing processed or
        committed them: a new owner fetches them again from its stored offsets. Should a partition
        come back to this consumer, its position (which kafka-python keeps for a partition it is
        given again) is rewound to the first dropped record at the assignment (:meth:`_on_assign`),
        before the worker's own seeks."""
        with self.q.mutex:
            kept = []
            for item in self.q.queue:
                if item is not None and item[0] in partitions:
                    self.rewind[item[0]] = min(self.rewind.get(item[0], item[1]), item[1])
                else:
                    kept.append(item)
            self.q.queue.clear()
            self.q.queue.extend(kept)

    def _command(self, cmd: tuple[Any, ...]) -> bool:
        """Carry out one command from the worker; True for the ack that ends a rebalance wait."""
        op = cmd[0]
        if op == "seek":
            _, tp, offset, gen = cmd
            self.gen[tp[1]] = gen
            self.consumer.seek(tp, offset)
        elif op == "commit":
            self.consumer.commit(cmd[1])
        elif op == "ack":
            return True
        elif op == "close":
            self.closing = True
        return False

    def _recv(self, timeout: float | None) -> tuple[Any, ...] | None:
        try:
            if not self.ctl.poll(timeout):
                return None
            cmd: tuple[Any, ...] = pickle.loads(self.ctl.recv_bytes())
            return cmd
        except (EOFError, OSError):
            raise _Stop from None

    def _rebalance(self, kind: bytes, tps: list[TopicPartitionT]) -> None:
        """Tell the worker (after every batch sent before) and wait for its ack, carrying out the
        seeks and commits it sends meanwhile (a commit on revoke; seeks to the stored offsets on assign).
        Not while closing: the worker committed before it asked, and processes nothing more."""
        if self.closing:
            return
        if kind == _REVOKE:
            self._unqueue({tp[1] for tp in tps})
        self._put(kind + pickle.dumps(tps))
        while True:
            cmd = self._recv(1.0)
            if cmd is not None and self._command(cmd):
                return

    def _on_revoke(self, tps: list[TopicPartitionT]) -> None:
        self._rebalance(_REVOKE, tps)

    def _on_assign(self, tps: list[TopicPartitionT]) -> None:
        for tp in tps:
            if tp[1] in self.rewind:
                self.consumer.seek(tp, self.rewind[tp[1]])
        self.rewind.clear()
        self._rebalance(_ASSIGN, tps)

    def run(self) -> None:
        hdr = _DATA_HDR.pack
        gen = self.gen
        coordinator = self.consumer._c._coordinator if self.consumer._c.config["group_id"] is not None else None
        while not self.closing:
            while (cmd := self._recv(0)) is not None:
                self._command(cmd)
            if self.closing:
                break
            if self.q.qsize() >= CHILD_QUEUE:
                # The worker is behind: fetch nothing more for now, but do the group's part of a poll
                # (heartbeat, rejoin, the rebalance listener): a consumer that stops polling misses
                # rebalances and is dropped from the group. (Pausing the partitions instead made
                # kafka-python throw away what it had fetched ahead and fetch it again: 4x slower.)
                if coordinator is not None:
                    coordinator.poll(timeout_ms=0)
                time.sleep(QUEUE_FULL_SLEEP_S)
                continue
            for _tp, items in self.consumer._poll(CHILD_MAX_BATCHES, CHILD_POLL_MS).items():
                for kind, h, body in items:
                    if kind == _DATA:
                        self._put(b"".join((_DATA, hdr(h[0], gen.get(h[0], 0), h[1], h[2], h[3]), body)),
                                  h[0], max(h[1], h[2]))
                    elif body:  # legacy records, already parsed by kafka-python
                        self._put(_legacy_message(h, gen.get(h, 0), body), h, body[0][0])


def _child_main(cfg: dict[str, Any], out: Connection, ctl: Connection) -> None:
    _die_with_parent()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)  # the worker decides when this ends (close, or its death)
    logging.basicConfig(level=cfg["log_level"], format="%(asctime)s %(levelname)s %(name)s [fetch]: %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)
    child = None
    try:
        child = _Child(cfg, out, ctl)
        child.run()
    except _Stop:
        pass
    except BaseException as e:  # noqa: BLE001 - handed to the worker, which raises it from poll
        try:
            body = pickle.dumps(e)
            pickle.loads(body)
        except Exception:  # noqa: BLE001 - an exception that does not survive pickling
            body = pickle.dumps(BrokerError(f"fetch process: {type(e).__name__}: {e}"))
        if child is not None:
            with contextlib.suppress(_Stop):
                child._put(_ERROR + body)
        else:
            with contextlib.suppress(OSError):
                out.send_bytes(_ERROR + body)
    finally:
        if child is not None:
            child.closing = True
            with contextlib.suppress(BaseException):
                child.consumer.close()  # leaves the group: the partitions move at once
            with contextlib.suppress(BaseException):
                child.q.put(None, timeout=5)
                child.sender.join(5)
        with contextlib.suppress(OSError):
            out.close()


# ---- the worker's side ----------------------------------------------------------------------------

class FetchProcessConsumer:
    """A :class:`pipeline.kafka.ConsumerAdapter` whose kafka-python consumer runs in a child process."""

    def __init__(self, bootstrap: str, topics: Iterable[str], group_id: str | None,
                 on_assign: RebalanceCb | None, on_revoke: RebalanceCb | None,
                 max_poll_interval_ms: int, session_timeout_ms: int) -> None:
        from pipeline._kafkarecords import parse_v2_columns

        self._parse = parse_v2_columns
        self._topics = list(topics)
        if len(self._topics) != 1:
            raise ValueError("the fetch process consumes one topic")
        self._topic = self._topics[0]
        self._on_assign, self._on_revoke = on_assign, on_revoke
        self._assignment: set[TopicPartitionT] = set()
        self._gen: dict[int, int] = {}
        self._held: bytes | None = None  # a rebalance message that arrived after records were gathered
        self._rest: RecordBatch | None = None  # records beyond the last poll's max_records
        self._closed = False
        ctx = mp.get_context("spawn")
        self._data, child_out = ctx.Pipe(duplex=False)
        child_ctl, self._ctl = ctx.Pipe(duplex=False)
        cfg = {"bootstrap": bootstrap, "topics": self._topics, "group_id": group_id,
               "max_poll_interval_ms": max_poll_interval_ms, "session_timeout_ms": session_timeout_ms,
               "log_level": logging.getLogger().getEffectiveLevel()}
        self._proc = ctx.Process(target=_child_main, args=(cfg, child_out, child_ctl), name="ctrstream-fetch",
                                 daemon=True)
        self._proc.start()
        child_out.close()
        child_ctl.close()
        log.info("kafka-python consumes in a fetch process (pid %s)", self._proc.pid)

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def _send(self, *cmd: Any) -> None:
        try:
            self._ctl.send_bytes(pickle.dumps(cmd))
        except OSError as e:
            raise self._child_gone() from e

    def _child_gone(self) -> BrokerError:
        self._proc.join(1.0)
        return BrokerError(f"the fetch process exited unexpectedly (exit code {self._proc.exitcode})")

    def _recv(self, timeout: float) -> bytes | None:
        try:
            if not self._data.poll(max(timeout, 0.0)):
                return None
            return self._data.recv_bytes()
        except (EOFError, OSError) as e:
            raise self._child_gone() from e

    def _columns(self, msg: bytes) -> RecordBatch | None:
        """A data or legacy message as columns; None when its seek number is old (fetched before a seek)."""
        if msg[:1] == _LEGACY:
            part, gen, recs = pickle.loads(msg[1:])
            if gen != self._gen.get(part, 0):
                return None
            n = len(recs)
            return RecordBatch(self._topic, np.full(n, part, np.int64),
                               np.fromiter((r[0] for r in recs), np.int64, n),
                               [r[2] for r in recs], [r[1] for r in recs])
        part, gen, fetch_offset, base_offset, count = _DATA_HDR.unpack_from(msg, 1)
        if gen != self._gen.get(part, 0):
            return None
        try:
            offs, keys, vals = self._parse(msg, 1 + _DATA_HDR.size, count, base_offset)
        except ValueError as e:
            from kafka.errors import CorruptRecordError

            raise CorruptRecordError(f"Found invalid record structure: {e}") from None
        offsets = np.frombuffer(offs, np.int64)
        b = RecordBatch(self._topic, np.full(len(offsets), part, np.int64), offsets, vals, keys)
        if base_offset < fetch_offset and len(offsets) and offsets[0] < fetch_offset:
            return b.take(np.flatnonzero(offsets >= fetch_offset))
        return b

    def _rebalance(self, msg: bytes) -> None:
        tps: list[TopicPartitionT] = [(str(t), int(p)) for t, p in pickle.loads(msg[1:])]
        if msg[:1] == _REVOKE:
            self._assignment.difference_update(tps)
            if self._on_revoke and not self._closed:
                self._on_revoke(tps)
        else:
            self._assignment = set(tps)
            if self._on_assign and not self._closed:
                self._on_assign(tps)
        self._send("ack")

    def poll_columns(self, max_records: int, timeout_ms: int) -> RecordBatch:
        """Up to ``max_records`` records: waits up to ``timeout_ms`` for the first, then takes what has
        arrived. A rebalance message is handled (callbacks, ack) when nothing has been gathered yet;
        otherwise the records go first and it waits for the next call."""
        got: list[RecordBatch] = []
        n = 0
        if self._rest is not None:
            got, n, self._rest = [self._rest], len(self._rest), None
        deadline = time.monotonic() + timeout_ms / 1000
        while n < max_records:
            msg, self._held = self._held, None
            if msg is None:
                msg = self._recv(0 if n else deadline - time.monotonic())
            if msg is None:
                break
            kind = msg[:1]
            if kind in (_DATA, _LEGACY):
                b = self._columns(msg)
                if b is not None and len(b):
                    got.append(b)
                    n += len(b)
            elif kind in (_REVOKE, _ASSIGN):
                if n:
                    self._held = msg
                    break
                self._rebalance(msg)
            elif kind == _ERROR:
                raise pickle.loads(msg[1:])
        if n > max_records:
            last = got[-1]
            cut = len(last) - (n - max_records)
            got[-1] = RecordBatch(self._topic, last.partition[:cut], last.offset[:cut], last.value[:cut],
                                  last.key[:cut])
            self._rest = RecordBatch(self._topic, last.partition[cut:], last.offset[cut:], last.value[cut:],
                                     last.key[cut:])
        if not got:
            return RecordBatch(self._topic, np.zeros(0, np.int64), np.zeros(0, np.int64), [], [])
        if len(got) == 1:
            return got[0]
        return RecordBatch(self._topic, np.concatenate([b.partition for b in got]),
                           np.concatenate([b.offset for b in got]), [v for b in got for v in b.value],
                           lambda: [k for b in got for k in b.key])

    def poll_batch(self, max_records: int, timeout_ms: int) -> list[RawRecord]:
        return self.poll_columns(max_records, timeout_ms).records()

    def seek(self, tp: TopicPartitionT, offset: int) -> None:
        gen = self._gen[tp[1]] = self._gen.get(tp[1], 0) + 1
        if self._rest is not None:  # records of that partition held back from the last poll: fetched before
            rows = np.flatnonzero(self._rest.partition != tp[1])
            if len(rows) < len(self._rest):
                self._rest = self._rest.take(rows) if len(rows) else None
        self._send("seek", tp, offset, gen)

    def assignment(self) -> list[TopicPartitionT]:
        return sorted(self._assignment)

    def commit(self, offsets: dict[TopicPartitionT, int]) -> None:
        if offsets:
            self._send("commit", dict(offsets))

    def close(self) -> None:
        """Ask the child to leave the group and exit; keep reading its pipe meanwhile (it may be
        blocked writing a batch), acking any last rebalance without calling back."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(BrokerError):
            self._send("close")
        deadline = time.monotonic() + CLOSE_TIMEOUT_S
        while self._proc.is_alive() and time.monotonic() < deadline:
            try:
                msg = self._recv(0.05)
            except BrokerError:
                break
            if msg is not None and msg[:1] in (_REVOKE, _ASSIGN):
                with contextlib.suppress(BrokerError):
                    self._send("ack")
        self._proc.join(max(0.0, deadline - time.monotonic()))
        if self._proc.is_alive():
            log.warning("the fetch process did not exit in %.0fs; killing it", CLOSE_TIMEOUT_S)
            self._proc.kill()
            self._proc.join()
        self._data.close()
        self._ctl.close()


def available() -> bool:
    """Whether the fetch process can be used here: the C extension was built and kafka-python is the
    version whose internals the child drives (as for ``_kafka_fast``), this process may start one,
    and ``CTRSTREAM_FETCH_PROCESS`` is not 0. Otherwise the consumer stays in-process."""
    from pipeline import _kafka_fast

    if _kafka_fast._fast_class() is None:  # built for this kafka-python, its internals as expected
        return False
    from pipeline import _kafkarecords
    if mp.current_process().daemon:  # a daemonic process may not start children
        log.info("fetch process off: this process is a daemon (multiprocessing) and cannot start one")
        return False
    return hasattr(_kafkarecords, "parse_v2_columns") and os.environ.get("CTRSTREAM_FETCH_PROCESS", "1") != "0"
