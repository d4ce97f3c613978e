"""The few Kafka calls the pipeline needs, behind a small adapter (poll a batch, seek, commit,
produce). ``kafka-python`` is the default client; ``confluent`` (librdkafka) is optional and faster.
"""

from __future__ import annotations

import logging
import operator
import os
import time
from collections.abc import Callable, Iterable, Sequence
from itertools import repeat
from typing import Any, Protocol

import numpy as np

from pipeline import _kafka_fast
from pipeline.events import RawRecord, RecordBatch, raw_record_from_tuple
from pipeline.exceptions import BrokerError

__all__ = ["ConsumerAdapter", "ProducerAdapter", "make_assigned_consumer", "make_consumer", "make_producer",
           "TopicPartitionT"]

log = logging.getLogger(__name__)
TopicPartitionT = tuple[str, int]
_OFFSET, _KEY, _VALUE = (operator.attrgetter(f) for f in ("offset", "key", "value"))  # kafka-python records
RebalanceCb = Callable[[list[TopicPartitionT]], None]


def _c_crc32c_available() -> bool:
    try:
        import crc32c  # noqa: F401

        return True
    except ImportError:
        return False


#: Whether kafka-python verifies the CRC32C of every fetched record batch. kafka-python computes it in
#: pure Python unless the ``crc32c`` C package is installed, and then it is half of the consumer's CPU
#: (measured here: ~14k events/s with it, ~37k without, same topic). So: verify when the C implementation is
#: there (free), skip otherwise. Skipping leaves TCP checksums and the broker's own CRC check on
#: produce; it loses only detection of corruption at rest on the broker. ``CTRSTREAM_CHECK_CRCS=1``
#: forces the check. (librdkafka, the confluent client, always verifies: its CRC is in C.)
CHECK_CRCS = _c_crc32c_available() or os.environ.get("CTRSTREAM_CHECK_CRCS", "") == "1"


class ConsumerAdapter(Protocol):
    def poll_batch(self, max_records: int, timeout_ms: int) -> list[RawRecord]: ...
    def poll_columns(self, max_records: int, timeout_ms: int) -> RecordBatch: ...
    def seek(self, tp: TopicPartitionT, offset: int) -> None: ...
    def assignment(self) -> list[TopicPartitionT]: ...
    def commit(self, offsets: dict[TopicPartitionT, int]) -> None: ...
    def close(self) -> None: ...


class ProducerAdapter(Protocol):
    def send(self, topic: str, key: bytes | None, value: bytes) -> None: ...
    def send_many(self, topic: str, records: Sequence[tuple[bytes, bytes]]) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


class _KafkaPythonConsumer:
    def __init__(self, bootstrap: str, topics: Iterable[str], group_id: str | None,
                 on_assign: RebalanceCb | None, on_revoke: RebalanceCb | None,
                 max_poll_interval_ms: int, session_timeout_ms: int, max_poll_records: int, *,
                 fetch_max_bytes: int = 64 << 20, max_partition_fetch_bytes: int = 16 << 20) -> None:
        from kafka import ConsumerRebalanceListener, KafkaConsumer

        self._c = KafkaConsumer(
            bootstrap_servers=bootstrap, group_id=group_id, enable_auto_commit=False,
            auto_offset_reset="earliest", max_poll_records=max_poll_records,
            max_poll_interval_ms=max_poll_interval_ms, session_timeout_ms=session_timeout_ms,
            heartbeat_interval_ms=max(100, session_timeout_ms // 4),
            fetch_max_bytes=fetch_max_bytes, max_partition_fetch_bytes=max_partition_fetch_bytes,
            reconnect_backoff_max_ms=2000, check_crcs=CHECK_CRCS,
        )

        _kafka_fast.install(self._c)

        class _L(ConsumerRebalanceListener):
            def on_partitions_revoked(self, revoked):  # type: ignore[no-untyped-def]
                if on_revoke:
                    on_revoke([(tp.topic, tp.partition) for tp in revoked])

            def on_partitions_assigned(self, assigned):  # type: ignore[no-untyped-def]
                if on_assign:
                    on_assign([(tp.topic, tp.partition) for tp in assigned])

        self._c.subscribe(list(topics), listener=_L())

    #: While the broker is unreachable, at most one warning per this many seconds (with a count).
    OUTAGE_WARN_EVERY_S = 10.0
    # outage counters as class-level defaults: _KafkaPythonAssignedConsumer has its own __init__
    _outage_errors = 0
    _outage_warned_at = float("-inf")

    def _poll(self, max_records: int, timeout_ms: int) -> dict[Any, list[Any]]:
        """``KafkaConsumer.poll``, riding out a broker outage: an empty poll instead of a raise.

        kafka-python 3.0 lets a retriable error escape ``poll`` when the broker goes away at the wrong
        moment (a group-coordinator lookup fails on the connection, the metadata refresh it then
        waits for fails the same way, and only a timeout is caught there). Retrying is what the client
        does everywhere else, so it is done here: the error is logged (once per
        ``OUTAGE_WARN_EVERY_S``, with a count), the call sleeps a little of its timeout so a dead broker
        is not spun on, and the next poll starts the client's reconnect again. A non-retriable error
        (bad configuration, authorisation) still raises.
        """
        from kafka.errors import KafkaError

        try:
            polled: dict[Any, list[Any]] = self._c.poll(timeout_ms=timeout_ms, max_records=max_records)
        except KafkaError as e:
            if not e.retriable:
                raise
            self._outage_errors += 1
            now = time.monotonic()
            if now - self._outage_warned_at >= self.OUTAGE_WARN_EVERY_S:
                log.warning("broker unreachable, retrying (%d poll error(s) so far): %s", self._outage_errors, e)
                self._outage_warned_at = now
            time.sleep(min(timeout_ms, 200) / 1000)
            return {}
        if self._outage_errors:
            log.info("broker reachable again (after %d poll error(s))", self._outage_errors)
            self._outage_errors = 0
            self._outage_warned_at = float("-inf")
        return polled

    def poll_batch(self, max_records: int, timeout_ms: int) -> list[RawRecord]:
        polled = self._poll(max_records, timeout_ms)
        out: list[RawRecord] = []
        for tp, recs in polled.items():
            # C-level maps over the records' fields, no Python frame per record
            out += map(raw_record_from_tuple, zip(repeat(tp.topic), repeat(tp.partition), map(_OFFSET, recs),
                                        map(_KEY, recs), map(_VALUE, recs)))
        return out

    def poll_columns(self, max_records: int, timeout_ms: int) -> RecordBatch:
        """One batch as columns (the worker's hot path); all its records must come from one topic."""
        polled = self._poll(max_records, timeout_ms)
        topic = RecordBatch.only_topic({tp.topic for tp in polled})
        values: list[bytes | None] = []
        offsets: list[int] = []
        parts: list[int] = []
        recs: list[object] = []
        for tp, rs in polled.items():
            values += map(_VALUE, rs)
            offsets += map(_OFFSET, rs)
            parts += repeat(tp.partition, len(rs))
            recs += rs
        n = len(values)
        return RecordBatch(topic, np.fromiter(parts, np.int64, n),
                           np.fromiter(offsets, np.int64, n), values, lambda: list(map(_KEY, recs)))

    def seek(self, tp: TopicPartitionT, offset: int) -> None:
        from kafka import TopicPartition

        self._c.seek(TopicPartition(*tp), offset)

    def assignment(self) -> list[TopicPartitionT]:
        return sorted((tp.topic, tp.partition) for tp in self._c.assignment())

    def commit(self, offsets: dict[TopicPartitionT, int]) -> None:
        from kafka import OffsetAndMetadata, TopicPartition

        if not offsets:
            return
        try:
            self._c.commit({TopicPartition(*tp): OffsetAndMetadata(o, "", -1) for tp, o in offsets.items()})
        except Exception as e:  # noqa: BLE001 - broker-side offsets are informational (lag); state is truth
            log.warning("broker offset commit failed (state offsets are authoritative): %s", e)

    def close(self) -> None:
        self._c.close(autocommit=False)


class _KafkaPythonAssignedConsumer(_KafkaPythonConsumer):
    """Static assignment: partitions ``p`` with ``p % world == rank`` of every topic, no group protocol.

    Used by the trainer: data-parallel ranks must own fixed partitions (a rebalance in the middle of
    a DDP step would desynchronise them), and a step that takes longer than the group's poll
    interval must not cost the partition. Offsets: ``start`` when given (the trainer's checkpoint;
    a partition missing from it starts at the beginning), else the group's committed offset on the
    broker, else the beginning.
    """

    def __init__(self, bootstrap: str, topics: Iterable[str], group_id: str | None, rank: int, world: int,
                 start: dict[TopicPartitionT, int] | None, max_poll_records: int) -> None:
        from kafka import KafkaConsumer, TopicPartition

        self._c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group_id, enable_auto_commit=False,
                                auto_offset_reset="earliest", max_poll_records=max_poll_records,
                                fetch_max_bytes=64 << 20, max_partition_fetch_bytes=16 << 20,
                                reconnect_backoff_max_ms=2000, check_crcs=CHECK_CRCS)
        _kafka_fast.install(self._c)
        tps = []
        for t in topics:
            parts = None
            deadline = time.monotonic() + 30
            while not parts and time.monotonic() < deadline:
                parts = self._c.partitions_for_topic(t)
                if not parts:
                    time.sleep(0.2)
            if not parts:
                raise TimeoutError(f"topic {t!r} has no partitions (does it exist?)")
            tps += [TopicPartition(t, p) for p in sorted(parts) if p % world == rank]
        self._c.assign(tps)
        committed = {}
        if group_id:
            for tp in tps:
                c = self._c.committed(tp)
                if c is not None:
                    committed[(tp.topic, tp.partition)] = c
        for tp in tps:
            key = (tp.topic, tp.partition)
            # resuming from a checkpoint: a partition it does not list had nothing consumed as of
            # it, so it starts at the beginning, never at the group's (possibly later) commit
            off = start.get(key) if start is not None else committed.get(key)
            if off is None:
                self._c.seek_to_beginning(tp)
            else:
                self._c.seek(tp, off)


#: Keys whose partition hash the kafka-python producer keeps (cleared when full).
KEY_HASH_CACHE_MAX = 1 << 17
_FIRST, _SECOND = operator.itemgetter(0), operator.itemgetter(1)


class _KafkaPythonProducer:
    """``flush`` raises if a send since the last flush failed: what the worker produces (samples,
    dead letters) must be on the broker before it commits the state that produced it.

    Records go through :class:`pipeline._kafka_fast.BatchingSender` (batches built in C, delivered by
    the producer's own sender thread) where this kafka-python allows it, else through
    ``KafkaProducer.send``; the same partitions, the same delivery guarantees."""

    def __init__(self, bootstrap: str) -> None:
        from kafka import KafkaProducer
        from kafka.partitioner.default import murmur2

        self._murmur2 = murmur2
        # Not idempotent: kafka-python 3 turns idempotence on by default, and its producer id does not
        # survive a broker that lost its state (the embedded broker after a restart): every send then
        # fails for good. Duplicates from retries are harmless here: samples carry a deterministic
        # sample_id that the trainer dedupes, dead letters carry their source offset.
        self._p = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, batch_size=1 << 20,
                                max_request_size=16 << 20, acks="all", retries=10,
                                reconnect_backoff_max_ms=2000, enable_idempotence=False)
        self._failed: list[str] = []
        self._partitions: dict[str, list[int]] = {}  # per topic, sorted; re-read after every flush
        self._key_hash: dict[bytes, int] = {}  # key -> murmur2(key) & 0x7fffffff
        # records batched here and built in C (pipeline/_kafka_fast.py), when this kafka-python allows
        self._batching = _kafka_fast.BatchingSender(self._p) if _kafka_fast.BatchingSender.usable(self._p) else None
        self._rr = 0  # round-robin over partitions for records without a key (batched path)

    def _partitions_of(self, topic: str) -> list[int]:
        parts = self._partitions.get(topic)
        if parts is None:
            parts = self._partitions[topic] = sorted(self._p.partitions_for(topic))
        return parts

    def _partition(self, topic: str, key: bytes) -> int:
        """The partition kafka-python's default partitioner picks for a key, computed once per key.

        Its pure-Python murmur2 plus its metadata lookups are ~a quarter of ``KafkaProducer.send``
        (~10 us of ~40 per sample, measured here); samples repeat the same few thousand user keys,
        so the hash is cached, and the partition list is re-read after each flush (a topic whose
        partition count grows is picked up at the next batch, as the producer's own metadata is).
        """
        parts = self._partitions_of(topic)
        return parts[self._hash(key) % len(parts)]

    def _hash(self, key: bytes) -> int:
        """``murmur2(key) & 0x7fffffff``, from the cache (filled here; cleared when full)."""
        h = self._key_hash.get(key)
        if h is None:
            if len(self._key_hash) >= KEY_HASH_CACHE_MAX:
                self._key_hash.clear()
            h = self._key_hash[key] = self._murmur2(key) & 0x7FFFFFFF
        return h

    def send(self, topic: str, key: bytes | None, value: bytes) -> None:
        if self._batching is not None:
            if key is None:
                parts = self._partitions_of(topic)
                self._rr += 1
                self._batching.add(topic, parts[self._rr % len(parts)], key, value)
            else:
                self._batching.add(topic, self._partition(topic, key), key, value)
            return
        part = None if key is None else self._partition(topic, key)
        self._p.send(topic, key=key, value=value, partition=part).add_errback(
            lambda e: self._failed.append(f"{topic}: {e}"))

    def send_many(self, topic: str, records: Sequence[tuple[bytes, bytes]]) -> None:
        """``send`` of each keyed ``(key, value)``, in order within each partition (the worker's
        samples, one call per poll batch): the partitions from the key-hash cache in one pass, then
        one :meth:`BatchingSender.add_many` per partition. Producing a sample, flush included, took
        1.6-1.8 µs of CPU this way against 2.2-3.3 µs through ``send`` (docs/pipeline.md)."""
        n = len(records)
        if not n:
            return
        keys = list(map(_FIRST, records))
        if self._batching is None or None in keys:  # no batched path, or keyless records: one by one
            for key, value in records:
                self.send(topic, key, value)
            return
        values = list(map(_SECOND, records))
        hashes = list(map(self._key_hash.get, keys))
        if None in hashes:  # keys not seen yet: hashed (and cached) one by one, as send does
            for i in [i for i, h in enumerate(hashes) if h is None]:
                hashes[i] = self._hash(keys[i])
        parts = self._partitions_of(topic)
        idx = np.fromiter(hashes, np.int64, n) % len(parts)
        first = int(idx[0])
        if (idx == first).all():
            self._batching.add_many(topic, parts[first], keys, values)
            return
        for pi in np.flatnonzero(np.bincount(idx, minlength=len(parts))).tolist():
            sel = np.flatnonzero(idx == pi).tolist()  # in call order
            self._batching.add_many(topic, parts[pi], [keys[i] for i in sel], [values[i] for i in sel])

    def flush(self) -> None:
        self._partitions.clear()
        if self._batching is not None:
            self._failed += self._batching.flush()
        else:
            self._p.flush()
        if self._failed:
            first, n = self._failed[0], len(self._failed)
            self._failed.clear()
            raise BrokerError(f"{n} message(s) were not delivered, first: {first}")

    def close(self) -> None:
        if self._batching is not None:
            self._batching.ship_all()  # as the producer's own close: what was sent is delivered first
        self._p.close()


def make_consumer(client: str, bootstrap: str, topics: Iterable[str], group_id: str | None = None, *,
                  on_assign: RebalanceCb | None = None, on_revoke: RebalanceCb | None = None,
                  max_poll_interval_ms: int = 300_000, session_timeout_ms: int = 10_000,
                  max_poll_records: int = 5000, fetch_process: bool = False) -> ConsumerAdapter:
    """A group consumer of ``topics``. ``fetch_process`` (kafka-python, one topic): the client runs in a
    child process (:mod:`pipeline._fetch_process`; the worker's default), where the C column parse was
    built; otherwise in this process."""
    if client == "kafka-python":
        from pipeline import _fetch_process

        topics = list(topics)
        if fetch_process and len(topics) == 1 and _fetch_process.available():
            return _fetch_process.FetchProcessConsumer(bootstrap, topics, group_id, on_assign, on_revoke,
                                                       max_poll_interval_ms, session_timeout_ms)
        return _KafkaPythonConsumer(bootstrap, topics, group_id, on_assign, on_revoke,
                                    max_poll_interval_ms, session_timeout_ms, max_poll_records)
    if client == "confluent":
        from pipeline._confluent import ConfluentConsumer

        return ConfluentConsumer(bootstrap, topics, group_id, on_assign, on_revoke,
                                 max_poll_interval_ms, session_timeout_ms)
    raise ValueError(f"unknown kafka client {client!r} (kafka-python | confluent)")


def make_assigned_consumer(client: str, bootstrap: str, topics: Iterable[str], group_id: str | None = None, *,
                           rank: int = 0, world: int = 1, start: dict[TopicPartitionT, int] | None = None,
                           max_poll_records: int = 5000) -> ConsumerAdapter:
    """A consumer with a static partition assignment (see :class:`_KafkaPythonAssignedConsumer`)."""
    if client != "kafka-python":
        from pipeline._confluent import ConfluentAssignedConsumer

        return ConfluentAssignedConsumer(bootstrap, topics, group_id, rank, world, start)
    return _KafkaPythonAssignedConsumer(bootstrap, topics, group_id, rank, world, start, max_poll_records)


def make_producer(client: str, bootstrap: str) -> ProducerAdapter:
    if client == "kafka-python":
        return _KafkaPythonProducer(bootstrap)
    if client == "confluent":
        from pipeline._confluent import ConfluentProducer

        return ConfluentProducer(bootstrap)
    raise ValueError(f"unknown kafka client {client!r} (kafka-python | confluent)")
