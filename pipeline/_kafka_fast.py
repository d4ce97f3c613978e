"""kafka-python's record parsing in C, installed on one consumer at a time.

``KafkaConsumer.poll`` parses every fetched record in Python: a varint at a time, a ``DefaultRecord``,
then a ``ConsumerRecord``. That is ~10 µs per record here, and it was the whole of the
kafka-python client's consume cost (py-spy: 40% of the worker's CPU, the sample producer the next
30%). :class:`FastPartitionRecords` replaces only that inner loop: the records of each message-format
v2 batch are parsed by :mod:`pipeline._kafkarecords` (C) into the very ``ConsumerRecord`` tuples
kafka-python would have built. Everything around it is still kafka-python's: the fetch, the batch
CRC check, decompression, transactional (aborted and control) batches, positions, rebalances.

It reaches into kafka-python internals (``Fetcher.PartitionRecords``, ``DefaultRecordBatch``'s
buffer), so it is enabled only for the kafka-python minor version it was written and tested against
(:data:`SUPPORTED`; ``pyproject.toml`` pins that range), only when the C extension was built, only
for consumers without deserializers, and never process-wide: :func:`install` swaps the class on
one consumer's fetcher. ``CTRSTREAM_KAFKA_FAST_RECORDS=0`` turns it off.
tests/pipeline/test_kafka_fast.py compares it with kafka-python's own parse, record by record, on
batches fetched from the real broker (plain, compressed, with headers and null keys and values) and
on corrupted ones.

One difference, on corrupt data only: kafka-python returns the records of a corrupt batch that
precede the corrupt one, then raises; this raises at that batch, before any of its records. Either
way the consumer's position stays at the corrupt data, and ``poll`` raises ``CorruptRecordError``.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Iterator
from typing import Any, cast

import numpy as np

log = logging.getLogger(__name__)

#: kafka-python versions whose internals this was written against (``major.minor``).
SUPPORTED = ("3.0",)

try:
    from pipeline import _kafkarecords
except ImportError:  # no C compiler at install time: kafka-python's own parse, same results
    _kafkarecords = None  # type: ignore[assignment]


def _switched_off() -> bool:
    return os.environ.get("CTRSTREAM_KAFKA_FAST_RECORDS", "1") == "0"


@functools.cache
def _built_for_this_kafka_python() -> bool:
    """The C extension is there and kafka-python is a version this was written against (else why
    not, in the log once: both fast paths, consume and produce, depend on it)."""
    import kafka

    if _kafkarecords is None:
        log.info("kafka-python fast paths off: pipeline._kafkarecords was not built")
        return False
    if ".".join(kafka.__version__.split(".")[:2]) not in SUPPORTED:
        log.warning("kafka-python fast paths off: written for kafka-python %s, this is %s",
                    "/".join(SUPPORTED), kafka.__version__)
        return False
    return True


@functools.cache
def _fast_class() -> type | None:
    """The ``PartitionRecords`` subclass, or None where it cannot be used (and why, in the log)."""
    from kafka.consumer import fetcher as F

    if not _built_for_this_kafka_python():
        return None
    base = F.Fetcher.PartitionRecords
    if not all(hasattr(base, a) for a in ("_unpack_records", "_consume_aborted_transactions_up_to",
                                            "_contains_abort_marker", "_is_batch_aborted", "drain")):
        log.warning("kafka-python record fast path off: Fetcher.PartitionRecords is not as expected")
        return None
    parse_v2 = _kafkarecords.parse_v2
    consumer_record = F.ConsumerRecord
    errors = F.Errors
    read_committed = F.IsolationLevel.READ_COMMITTED

    class FastPartitionRecords(base):  # type: ignore[misc, valid-type]
        def _unpack_records(self, tp: Any, records: Any, key_deserializer: Any,
                            value_deserializer: Any) -> Iterator[Any]:
            if key_deserializer is not None or value_deserializer is not None:
                yield from super()._unpack_records(tp, records, key_deserializer, value_deserializer)
                return
            topic, partition = tp.topic, tp.partition
            for batch in self._batches(tp, records):
                if batch.magic != 2:  # the legacy formats (0.10 and older brokers): kafka-python's records
                    yield from self._legacy_records(tp, batch)
                    continue
                log_append = batch.timestamp_type == batch.LOG_APPEND_TIME
                try:
                    recs, _end, nbytes = parse_v2(
                        batch._buffer, batch._pos, batch.records_count, batch.base_offset,
                        batch.max_timestamp if log_append else batch.first_timestamp, log_append,
                        batch.timestamp_type, topic, partition, self.leader_epoch, consumer_record)
                except ValueError as e:
                    raise errors.CorruptRecordError(f"Found invalid record structure: {e}") from None
                self.records_read += len(recs)
                self.bytes_read += nbytes
                for r in recs:
                    self.next_fetch_offset = r[3] + 1
                    yield r

        def _batches(self, tp: Any, records: Any) -> Iterator[Any]:
            """kafka-python's batch loop, records left to the caller: each batch whose records the
            consumer returns, in order (CRC checked; aborted and control batches skipped, the position
            moved past them; v2 batches decompressed); after the last, the position past it (format v2
            keeps a batch's last offset even when compaction removed its last record), then drain.
            Also the fetch process's loop (pipeline/_fetch_process.py), which ships v2 batches whole."""
            last_batch = None
            batch = records.next_batch()
            while batch is not None:
                last_batch = batch
                if self.check_crcs and not batch.validate_crc():
                    raise errors.CorruptRecordError(
                        f"Record batch for partition {tp} at offset {batch.base_offset} failed crc check")
                if batch.magic != 2:
                    yield batch
                    batch = records.next_batch()
                    continue
                self.leader_epoch = batch.leader_epoch
                if self.isolation_level == read_committed and batch.has_producer_id():
                    self._consume_aborted_transactions_up_to(batch.last_offset)
                    if self._contains_abort_marker(batch):
                        self.aborted_producer_ids.discard(batch.producer_id)
                    elif self._is_batch_aborted(batch):
                        self.next_fetch_offset = batch.next_offset
                        batch = records.next_batch()
                        continue
                if batch.is_control_batch:  # transaction markers are not returned to the consumer
                    self.next_fetch_offset = batch.next_offset
                    batch = records.next_batch()
                    continue
                batch._maybe_uncompress()
                yield batch
                batch = records.next_batch()
            if last_batch is not None and last_batch.magic == 2:
                self.next_fetch_offset = last_batch.next_offset
            self.drain()

        def _legacy_records(self, tp: Any, batch: Any) -> Iterator[Any]:
            for rec in batch:
                if self.check_crcs and not rec.validate_crc():
                    raise errors.CorruptRecordError(
                        f"Record for partition {tp} at offset {rec.offset} failed crc check")
                key, value = rec.key, rec.value
                self.records_read += 1
                self.bytes_read += rec.size_in_bytes
                self.next_fetch_offset = rec.offset + 1
                yield consumer_record(tp.topic, tp.partition, self.leader_epoch, rec.offset, rec.timestamp,
                                      rec.timestamp_type, key, value, [], rec.checksum,
                                      -1 if key is None else len(key), -1 if value is None else len(value), -1)

    return FastPartitionRecords


def install(consumer: Any) -> bool:
    """Parse this ``KafkaConsumer``'s records in C from now on; False (and nothing changed) where
    the fast path cannot be used or ``CTRSTREAM_KAFKA_FAST_RECORDS=0``."""
    if _switched_off():
        return False
    fast = _fast_class()
    fetcher = getattr(consumer, "_fetcher", None)
    if fast is None or fetcher is None or not hasattr(fetcher, "PartitionRecords"):
        return False
    if consumer.config.get("key_deserializer") or consumer.config.get("value_deserializer"):
        return False
    fetcher.PartitionRecords = fast
    return True


# ---- the producer side: record batches built in C, handed to kafka-python's sender ------------------

#: Target size of one record batch built here (bytes). Below the broker's default per-batch limit
#: (``message.max.bytes``, 1 MiB in Kafka), so the broker never refuses one as too large.
BATCH_BYTES = 512 << 10
#: The longest a record waits here before its batch is built and handed to the sender, as the
#: producer's ``linger_ms`` (the worker flushes at every checkpoint anyway).
LINGER_S = 0.005
#: What a record adds to a batch beyond its key and value, estimated: build_v2's framing is 3 fixed
#: bytes and four varints (~10 bytes for a typical sample, up to ~18 near max_request_size);
#: BATCH_BYTES absorbs the error (it keeps half of a broker's 1 MiB limit in reserve).
RECORD_FRAMING = 12


class _Prebuilt:
    """What kafka-python's sender and accumulator ask of a ``MemoryRecordsBuilder``, for a batch that
    is already built: closed, full (so it is sent at once), not idempotent."""

    __slots__ = ("_buf", "_n")
    producer_id = -1
    producer_epoch = -1
    base_sequence = -1

    def __init__(self, buf: bytes, n: int) -> None:
        self._buf, self._n = buf, n

    def append(self, *args: Any, **kw: Any) -> None:
        return None  # nothing is appended to a built batch: the accumulator opens a new one

    def is_full(self) -> bool:
        return True

    def close(self) -> None:
        pass

    def buffer(self) -> bytes:
        return self._buf

    def size_in_bytes(self) -> int:
        return len(self._buf)

    def compression_rate(self) -> float:
        return 1.0

    def next_offset(self) -> int:
        return self._n

    def records(self) -> Any:
        from kafka.record import MemoryRecords

        return MemoryRecords(self._buf)

    def set_producer_state(self, *args: Any) -> None:
        raise RuntimeError("batches built by pipeline._kafka_fast are not idempotent")


class BatchingSender:
    """Sends through one ``KafkaProducer`` without its per-record path.

    ``KafkaProducer.send`` costs ~30 µs of the caller's CPU per record here, plus ~10 µs in its sender
    thread (Python record encoding, a future and a lock per record): with the C record parse on the
    consumer side, that was half of the worker's CPU. Here :meth:`add` appends key and value to a
    per-partition list; a partition's records become one v2 record batch (``build_v2``, C) before
    the next record would take them past :data:`BATCH_BYTES`, when the oldest has waited
    :data:`LINGER_S` (checked at the next ``add``), or at :meth:`flush`; the batch goes into the producer's own accumulator, so the
    producer's sender thread delivers it with all of kafka-python's machinery: leader lookup, retries,
    delivery timeout, in-flight limits. :meth:`flush` waits for every batch and returns what did not
    succeed. The producer must not be idempotent or transactional (batches carry no producer id).
    """

    def __init__(self, producer: Any) -> None:
        import crc32c
        from kafka import TopicPartition
        from kafka.producer.producer_batch import FinalState, ProducerBatch

        self._p = producer
        self._acc = producer._accumulator
        self._sender = producer._sender
        self._crc = crc32c.crc32c
        self._tp_cls, self._batch_cls, self._ok = TopicPartition, ProducerBatch, FinalState.SUCCEEDED
        # per partition: keys, values, [bytes so far], monotonic time of its first record. A partition's
        # entry is made at its first record and removed when it ships, so the dict's insertion order is
        # the order of first records: the first entry holds the oldest pending record.
        self._pending: dict[tuple[str, int],
                            tuple[list[bytes | None], list[bytes | None], list[int], float]] = {}
        self._oldest = 0.0  # the first entry's first-record time (when any)
        self._clock = time.monotonic
        self._shipped: list[Any] = []
        assert _kafkarecords is not None  # usable() said so
        self._build = _kafkarecords.build_v2
        self._max_record = int(producer.config["max_request_size"])

    @staticmethod
    def usable(producer: Any) -> bool:
        """Whether this producer can take prebuilt batches: the C extension, the supported
        kafka-python, message format v2, no idempotence or transactions."""
        if _switched_off() or not _built_for_this_kafka_python():
            return False
        acc, sender = getattr(producer, "_accumulator", None), getattr(producer, "_sender", None)
        return (acc is not None and sender is not None and getattr(producer, "_transaction_manager", 1) is None
                and all(hasattr(acc, a) for a in ("_tp_lock", "_batches", "_incomplete"))
                and acc.config.get("message_version", 0) >= 2 and acc.config.get("compression_attrs", 1) == 0)

    def add(self, topic: str, partition: int, key: bytes | bytearray | memoryview | None,
            value: bytes | bytearray | memoryview) -> None:
        """Queue one record for ``topic[partition]``; raises ``MessageSizeTooLargeError`` at once for a
        record over the producer's ``max_request_size``, as ``KafkaProducer.send`` does."""
        # bytearray and memoryview as KafkaProducer.send takes them; the C builder takes bytes
        v = value if isinstance(value, bytes) else bytes(value)
        k = key if key is None or isinstance(key, bytes) else bytes(key)
        size = len(v) + (len(k) if k else 0)
        if size > self._max_record:
            from kafka.errors import MessageSizeTooLargeError

            raise MessageSizeTooLargeError(f"a record of {len(v)} bytes is over max_request_size "
                                           f"({self._max_record})")
        rec = size + RECORD_FRAMING
        pend = self._pending.get((topic, partition))
        if pend is not None and pend[2][0] + rec > BATCH_BYTES:
            # this record would take the batch past BATCH_BYTES: the batch goes first, so a batch is
            # over BATCH_BYTES only when one record alone is
            self._ship(topic, partition)
            pend = None
        if pend is None:
            pend = self._open(topic, partition)
        pend[0].append(k)
        pend[1].append(v)
        pend[2][0] += rec
        if self._clock() - self._oldest >= LINGER_S:
            self.ship_all()

    def add_many(self, topic: str, partition: int, keys: list[bytes | None], values: list[bytes]) -> None:
        """:meth:`add` of each ``(keys[i], values[i])`` in order, with the same batches (each one cut
        before a record would take it past :data:`BATCH_BYTES`) and the same error (raised at the
        first record over ``max_request_size``, after the records before it were queued), but a few
        list and array operations per batch instead of ~1 µs of Python per record; the linger is
        checked once, at the end (the call takes no time to speak of)."""
        n = len(values)
        if len(keys) != n:
            raise ValueError(f"{len(keys)} keys for {n} values")
        if not n:
            return
        if type(values) is not list or type(keys) is not list or {*map(type, values), *map(type, keys)} != {bytes}:
            for k, v in zip(keys, values, strict=True):  # rare shapes (null keys, buffers): one by one
                self.add(topic, partition, k, v)
            return
        size = np.fromiter(map(len, values), np.int64, n) + np.fromiter(map(len, cast(list[bytes], keys)), np.int64, n)
        too_big = np.flatnonzero(size > self._max_record)
        if len(too_big):  # what comes before it is queued, then add raises at it
            i = int(too_big[0])
            self.add_many(topic, partition, keys[:i], values[:i])
            for k, v in zip(keys[i:], values[i:], strict=True):
                self.add(topic, partition, k, v)
            return
        ends = np.cumsum(size + RECORD_FRAMING)
        i = 0
        while i < n:
            pend = self._pending.get((topic, partition))
            used = pend[2][0] if pend is not None else 0
            before = int(ends[i - 1]) if i else 0
            # records i..j-1 fit after what is pending (ends[j-1] - before <= BATCH_BYTES - used)
            j = int(np.searchsorted(ends, BATCH_BYTES - used + before, side="right"))
            if j <= i:
                if pend is not None:  # record i would take the pending batch past BATCH_BYTES
                    self._ship(topic, partition)
                    continue
                j = i + 1  # a record bigger than BATCH_BYTES goes alone, as in add
            if pend is None:
                pend = self._open(topic, partition)
            pend[0].extend(keys[i:j])
            pend[1].extend(values[i:j])
            pend[2][0] += int(ends[j - 1]) - before
            i = j
        if self._clock() - self._oldest >= LINGER_S:
            self.ship_all()

    def _open(self, topic: str, partition: int) -> tuple[list[bytes | None], list[bytes | None], list[int], float]:
        """A partition's new pending entry (it had none), stamped with the time of its first record."""
        now = self._clock()
        if not self._pending:
            self._oldest = now
        pend = self._pending[(topic, partition)] = ([], [], [0], now)
        return pend

    def _ship(self, topic: str, partition: int) -> None:
        keys, values, _, _ = self._pending.pop((topic, partition))
        buf = self._build(keys, values, int(time.time() * 1000))
        buf[17:21] = self._crc(memoryview(buf)[21:]).to_bytes(4, "big")
        tp = self._tp_cls(topic, partition)
        batch = self._batch_cls(tp, _Prebuilt(bytes(buf), len(keys)))
        acc = self._acc
        with acc._tp_lock(tp):
            if acc._closed:
                raise RuntimeError("the producer is closed")
            acc._batches[tp].append(batch)
            acc._incomplete.add(batch)
        self._shipped.append(batch)
        self._sender.wakeup()
        if self._pending:  # the other partitions' records keep their own age
            self._oldest = next(iter(self._pending.values()))[3]

    def ship_all(self) -> None:
        for topic, partition in list(self._pending):
            self._ship(topic, partition)

    def flush(self) -> list[str]:
        """Build and send what is pending, wait for every batch sent since the last flush; the
        failures, one line per failed batch (empty when all were stored by the broker)."""
        self.ship_all()
        self._p.flush()
        failed = []
        for b in self._shipped:
            if b.final_state is not self._ok:
                failed.append(f"{b.topic_partition.topic}[{b.topic_partition.partition}]: {self._why(b)}")
        self._shipped.clear()
        return failed

    @staticmethod
    def _why(batch: Any) -> str:
        if batch.final_state is None:  # e.g. split by the sender after MESSAGE_TOO_LARGE: not tracked here
            return "not completed by the producer"
        f = batch.produce_future
        try:
            exc = f.value[2](0) if f.is_done and f.value and f.value[2] else None
        except Exception:  # noqa: BLE001 - the reason is best effort; the failure itself is certain
            exc = None
        return f"{batch.final_state.name.lower()}: {exc!r}" if exc else batch.final_state.name.lower()
