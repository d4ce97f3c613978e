"""The optional faster Kafka client: ``confluent-kafka`` (librdkafka) behind the adapter of
``pipeline.kafka`` (``--kafka-client confluent``).

librdkafka fetches and decodes record batches in C on its own threads; Python only pulls ready
messages with one ``consume(num_messages=N)`` call per batch. Rebalances use the eager protocol,
like the kafka-python adapter: on assign the worker's seeks (offsets stored with its state) are
passed to ``assign()`` inside the callback, so no record is fetched from anywhere else; on revoke
(or on a lost assignment) the worker is told before the partitions go.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from pipeline.events import RawRecord, RecordBatch, raw_record_from_tuple
from pipeline.exceptions import BrokerError

try:
    from pipeline import _kafkarecords
except ImportError:  # built by the install (setup.py); without it, the maps of poll_columns
    _kafkarecords = None  # type: ignore[assignment]

__all__ = ["ConfluentAssignedConsumer", "ConfluentConsumer", "ConfluentProducer"]

log = logging.getLogger(__name__)
TopicPartitionT = tuple[str, int]
RebalanceCb = Callable[[list[TopicPartitionT]], None]

#: librdkafka prefetch limits. The worker pulls up to ``max_poll_records`` per call; a 64 MiB local
#: queue (~400k events of ~150 bytes) keeps the next batches ready while Python processes one,
#: without holding an unbounded backlog in memory.
QUEUED_MAX_KBYTES = 64 * 1024
#: Fetch settings shared by every consumer here (and the raw-consume baseline of bench_worker).
#: ``fetch.queue.backoff.ms``: once the local queue holds ``queued.min.messages`` (100k), librdkafka
#: stops fetching and by default waits a whole second before it looks again. At 100k+ events/s the
#: queue drains in well under that, so the consumer sat idle: the raw consume rate on the embedded
#: broker was capped at ~89k events/s by that pause alone (debug=fetch shows "Fetch backoff for
#: 1000ms: Local: Queue full"). 10 ms raised it to ~138k events/s on the same topic.
FETCH_CONF: dict[str, Any] = {
    "fetch.max.bytes": 64 << 20,
    "max.partition.fetch.bytes": 16 << 20,
    "queued.max.messages.kbytes": QUEUED_MAX_KBYTES,
    "fetch.queue.backoff.ms": 10,
}
#: How long ``flush`` waits per round before checking again; delivery itself is bounded by
#: librdkafka's ``message.timeout.ms`` (5 minutes by default), after which a send counts as failed.
FLUSH_ROUND_S = 1.0


def _base_conf(bootstrap: str) -> dict[str, Any]:
    return {"bootstrap.servers": bootstrap, "reconnect.backoff.max.ms": 2000, "log_level": 4}


class ConfluentConsumer:
    """Group consumer: subscribe, rebalance callbacks, batch ``consume``, seek, informational commit."""

    def __init__(self, bootstrap: str, topics: Iterable[str], group_id: str | None,
                 on_assign: RebalanceCb | None, on_revoke: RebalanceCb | None,
                 max_poll_interval_ms: int, session_timeout_ms: int) -> None:
        from confluent_kafka import Consumer

        conf = _base_conf(bootstrap) | {
            "group.id": group_id or f"ctrstream-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "max.poll.interval.ms": max_poll_interval_ms,
            "session.timeout.ms": session_timeout_ms,
            "heartbeat.interval.ms": max(100, session_timeout_ms // 4),
            "check.crcs": True,
        } | FETCH_CONF
        self._c = Consumer(conf, logger=log)
        self._on_assign = on_assign
        self._on_revoke = on_revoke
        self._in_callback = False
        self._cb_seeks: dict[TopicPartitionT, int] = {}
        self._topics = list(topics)
        self._c.subscribe(self._topics, on_assign=self._assigned, on_revoke=self._revoked, on_lost=self._lost)

    # ---- rebalance ------------------------------------------------------------------------------
    def _assigned(self, consumer: Any, partitions: list[Any]) -> None:
        tps = [(p.topic, p.partition) for p in partitions]
        self._in_callback = True
        self._cb_seeks = {}
        try:
            if self._on_assign:
                self._on_assign(tps)
        finally:
            self._in_callback = False
        for p in partitions:
            off = self._cb_seeks.get((p.topic, p.partition))
            if off is not None:
                p.offset = off
        consumer.assign(partitions)

    def _revoked(self, consumer: Any, partitions: list[Any]) -> None:
        if self._on_revoke:
            self._on_revoke([(p.topic, p.partition) for p in partitions])
        consumer.unassign()

    def _lost(self, consumer: Any, partitions: list[Any]) -> None:
        log.warning("partitions lost (session timed out): %s", [(p.topic, p.partition) for p in partitions])
        self._revoked(consumer, partitions)

    # ---- the adapter ------------------------------------------------------------------------------
    def _consume(self, max_records: int, timeout_ms: int) -> list[Any]:
        """Messages of one ``consume`` call, errors and events (partition EOF) handled and dropped."""
        return self._without_errors(self._fetch(max_records, timeout_ms))

    def _fetch(self, max_records: int, timeout_ms: int) -> list[Any]:
        """Messages of one ``consume`` call, as librdkafka gives them (errors and events included)."""
        # What is queued now, without waiting. ``consume(n, timeout)`` returns only once it has n
        # messages or the timeout ran out, so a blocking call for a full batch sat out the whole
        # timeout whenever fewer were left (measured: 0.5 s at the end of every catch-up, and the
        # same delay on every batch of a stream slower than a batch per poll timeout).
        msgs = self._c.consume(num_messages=max_records, timeout=0)
        if not msgs:
            # nothing queued: wait for the first message, then take what arrived with it
            msgs = self._c.consume(num_messages=1, timeout=timeout_ms / 1000)
            if not msgs:
                return []
            if max_records > 1:
                msgs += self._c.consume(num_messages=max_records - 1, timeout=0)
        return msgs

    def _without_errors(self, msgs: list[Any]) -> list[Any]:
        from confluent_kafka import Message

        errors = list(map(Message.error, msgs))
        if errors.count(None) != len(msgs):  # rare: an event (partition EOF) or an error among the messages
            for err in errors:
                if err is not None:
                    self._error(err)
            msgs = [m for m, err in zip(msgs, errors, strict=True) if err is None]
        return msgs

    def poll_batch(self, max_records: int, timeout_ms: int) -> list[RawRecord]:
        from confluent_kafka import Message

        msgs = self._consume(max_records, timeout_ms)
        # C-level maps over the message accessors, no Python frame per record (~1 us/record less)
        return list(map(raw_record_from_tuple, zip(map(Message.topic, msgs), map(Message.partition, msgs),
                                         map(Message.offset, msgs), map(Message.key, msgs),
                                         map(Message.value, msgs))))

    def poll_columns(self, max_records: int, timeout_ms: int) -> RecordBatch:
        """One batch as columns (the worker's hot path), keys only on demand: one C loop over the
        messages (pipeline/_kafkarecords.c ``message_columns``) when none carries an error, else three
        C-level maps over the others."""
        from confluent_kafka import Message

        msgs = self._fetch(max_records, timeout_ms)
        cols = None if _kafkarecords is None else _kafkarecords.message_columns(
            msgs, Message.error, Message.partition, Message.offset, Message.value)
        if cols is not None:
            parts, offs, values = cols
            return RecordBatch(self._topic_of(msgs), np.frombuffer(parts, np.int64), np.frombuffer(offs, np.int64),
                               values, lambda: list(map(Message.key, msgs)))
        msgs = self._without_errors(msgs)
        n = len(msgs)
        return RecordBatch(self._topic_of(msgs), np.fromiter(map(Message.partition, msgs), np.int64, n),
                           np.fromiter(map(Message.offset, msgs), np.int64, n), list(map(Message.value, msgs)),
                           lambda: list(map(Message.key, msgs)))

    def _topic_of(self, msgs: list[Any]) -> str:
        """The one topic of a batch of messages without errors ("" for none)."""
        if len(self._topics) == 1:  # librdkafka delivers only subscribed topics
            return self._topics[0] if msgs else ""
        from confluent_kafka import Message

        return RecordBatch.only_topic(set(map(Message.topic, msgs)))  # type: ignore[arg-type]  # set on a message

    @staticmethod
    def _error(err: Any) -> None:
        from confluent_kafka import KafkaError

        if err.code() == KafkaError._PARTITION_EOF:  # noqa: SLF001 - librdkafka names it so
            return
        if err.fatal():
            raise BrokerError(f"fatal Kafka consumer error: {err}")
        log.warning("Kafka consumer error (librdkafka retries): %s", err)

    def seek(self, tp: TopicPartitionT, offset: int) -> None:
        from confluent_kafka import KafkaException, TopicPartition

        if self._in_callback:
            self._cb_seeks[tp] = offset
            return
        try:
            self._c.seek(TopicPartition(tp[0], tp[1], offset))
        except KafkaException:
            # Not fetching yet (just assigned): re-assign with the new start position instead.
            current = self._c.assignment()
            positions = {(p.topic, p.partition): p.offset for p in self._c.position(current)}
            positions[tp] = offset
            self._c.assign([TopicPartition(t, p, o) for (t, p), o in positions.items()])

    def assignment(self) -> list[TopicPartitionT]:
        return sorted((p.topic, p.partition) for p in self._c.assignment())

    def commit(self, offsets: dict[TopicPartitionT, int]) -> None:
        from confluent_kafka import KafkaException, TopicPartition

        if not offsets:
            return
        try:
            self._c.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()], asynchronous=True)
        except KafkaException as e:  # broker-side offsets are informational (lag); state is truth
            log.warning("broker offset commit failed (state offsets are authoritative): %s", e)

    def close(self) -> None:
        self._c.close()


class ConfluentAssignedConsumer(ConfluentConsumer):
    """Static assignment: partitions ``p % world == rank`` of every topic, no group protocol.

    Offsets: ``start`` when given (the trainer's checkpoint; a partition missing from it starts at
    the beginning), else the group's committed offset on the broker, else the beginning (same
    rules as the kafka-python adapter).
    """

    def __init__(self, bootstrap: str, topics: Iterable[str], group_id: str | None, rank: int, world: int,
                 start: dict[TopicPartitionT, int] | None) -> None:
        from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

        conf = _base_conf(bootstrap) | {
            "group.id": group_id or f"ctrstream-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
        } | FETCH_CONF
        self._c = Consumer(conf, logger=log)
        self._on_assign = self._on_revoke = None
        self._in_callback = False
        self._cb_seeks = {}
        self._topics = list(topics)
        tps: list[Any] = []
        for t in self._topics:
            parts: list[int] = []
            deadline = time.monotonic() + 30
            while not parts and time.monotonic() < deadline:
                md = self._c.list_topics(t, timeout=5).topics.get(t)
                parts = sorted(md.partitions) if md is not None and md.error is None else []
                if not parts:
                    time.sleep(0.2)
            if not parts:
                raise TimeoutError(f"topic {t!r} has no partitions (does it exist?)")
            tps += [TopicPartition(t, p) for p in parts if p % world == rank]
        committed = {}
        if group_id and tps:
            for p in self._c.committed(tps, timeout=10):
                if p.offset >= 0:
                    committed[(p.topic, p.partition)] = p.offset
        for p in tps:
            key = (p.topic, p.partition)
            # resuming from a checkpoint: a partition it does not list had nothing consumed as of
            # it, so it starts at the beginning, never at the group's (possibly later) commit
            off = start.get(key) if start is not None else committed.get(key)
            p.offset = OFFSET_BEGINNING if off is None else off
        self._c.assign(tps)


class ConfluentProducer:
    """Producer whose ``flush`` raises if any send since the last flush failed (samples and dead
    letters must be durable before the worker commits its state)."""

    def __init__(self, bootstrap: str) -> None:
        from confluent_kafka import Producer

        self._failed: list[str] = []
        self._p = Producer(_base_conf(bootstrap) | {
            "linger.ms": 5,
            "batch.size": 1 << 20,
            "acks": "all",
            "message.max.bytes": 16 << 20,
            "queue.buffering.max.messages": 1_000_000,
            # a delivery report (a Python callback) only for a failed message: flush() still sees
            # every failure, and a successful sample costs no callback (one per sample before)
            "delivery.report.only.error": True,
            "on_delivery": self._delivered,
        }, logger=log)

    def _delivered(self, err: Any, msg: Any) -> None:
        if err is not None:
            self._failed.append(f"{msg.topic()}: {err}")

    def send(self, topic: str, key: bytes | None, value: bytes) -> None:
        while True:
            try:
                self._p.produce(topic, value, key)
                return
            except BufferError:  # local queue full: let librdkafka deliver, then retry
                self._p.poll(0.05)

    def send_many(self, topic: str, records: Sequence[tuple[bytes, bytes]]) -> None:
        """``send`` of each keyed ``(key, value)``, in order. librdkafka's ``produce`` is most of the
        cost here (~1.5 µs a record); ``produce_batch`` measured no faster in the caller's thread
        and slower to flush, and its partial failures come back as fields of the message dicts."""
        produce = self._p.produce
        for key, value in records:
            try:
                produce(topic, value, key)
            except BufferError:
                self.send(topic, key, value)  # waits for room, as send does

    def flush(self) -> None:
        while self._p.flush(FLUSH_ROUND_S) > 0:
            pass
        if self._failed:
            first, n = self._failed[0], len(self._failed)
            self._failed.clear()
            raise BrokerError(f"{n} message(s) were not delivered, first: {first}")

    def close(self) -> None:
        self.flush()
