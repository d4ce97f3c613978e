"""kafka-python's records parsed and built in C (pipeline/_kafka_fast.py, pipeline/_kafkarecords.c):
the same records as kafka-python's own code, on real fetches from the embedded broker, on corrupt
bytes, and through the producer's sender."""

from __future__ import annotations

import random
import time
import uuid
from collections import defaultdict

import pytest

from pipeline import _kafka_fast

pytestmark = pytest.mark.kafka


def test_the_c_extension_is_built():
    assert _kafka_fast._kafkarecords is not None, "pipeline._kafkarecords was not built (C compiler?)"


def _records(*, headers: bool = True) -> list[tuple[bytes | None, bytes | None, list[tuple[str, bytes | None]]]]:
    """Keys, values and headers with the shapes that matter: null and empty key and value, a value
    long enough for multi-byte varints, UTF-8 header keys, a non-UTF-8 header value bytes."""
    rng = random.Random(3)
    out = []
    for i in range(700):
        key = None if i % 11 == 0 else (b"" if i % 13 == 0 else b"user-%d" % (i % 37))
        value = None if i % 17 == 0 and key is not None else bytes(rng.getrandbits(8) for _ in range(rng.choice((0, 5, 130, 3000))))
        hs = []
        if headers and i % 5 == 0:
            hs = [("trace", b"t%d" % i), ("ключ", b"\xff"), ("", b"")][: 1 + i % 3]
        out.append((key, value, hs))
    return out


def _consume_all(bootstrap: str, topic: str, parts: int, n: int, *, fast: bool,
                 seek: dict[int, int] | None = None) -> list[tuple]:
    from kafka import KafkaConsumer, TopicPartition

    c = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, max_poll_records=97)
    if fast:
        assert _kafka_fast.install(c)
        assert c._fetcher.PartitionRecords.__name__ == "FastPartitionRecords"
    else:
        assert c._fetcher.PartitionRecords.__name__ == "PartitionRecords"
    tps = [TopicPartition(topic, p) for p in range(parts)]
    c.assign(tps)
    c.seek_to_beginning()
    for p, off in (seek or {}).items():
        c.seek(TopicPartition(topic, p), off)
    got: list[tuple] = []
    deadline = time.monotonic() + 60
    while len(got) < n and time.monotonic() < deadline:
        for recs in c.poll(500).values():
            got.extend(recs)
    assert not c.poll(300), "more records than produced"
    c.close()
    return sorted(got, key=lambda r: (r.partition, r.offset))


@pytest.mark.parametrize("compression", [None, "gzip"])
def test_fast_parse_returns_kafka_pythons_records_from_real_fetches(broker, compression):
    """Every field of every ConsumerRecord (timestamps, header sizes, leader epoch...) equal to what
    kafka-python's own parse returns for the same fetched bytes; also from the middle of a batch
    (a seek lands inside one: the records before it must be skipped)."""
    from kafka import KafkaProducer

    from pipeline.broker import create_topics

    topic = f"fast-{compression}-{uuid.uuid4().hex[:8]}"
    create_topics(broker.bootstrap, {topic: 3})
    p = KafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=50, batch_size=64 << 10,
                      compression_type=compression, enable_idempotence=False)
    recs = _records()
    for i, (k, v, hs) in enumerate(recs):
        p.send(topic, key=k, value=v, headers=hs, partition=i % 3)
    p.flush()
    p.close()
    ours = _consume_all(broker.bootstrap, topic, 3, len(recs), fast=True)
    theirs = _consume_all(broker.bootstrap, topic, 3, len(recs), fast=False)
    assert len(theirs) == len(recs)
    assert ours == theirs
    assert any(r.headers for r in ours) and any(r.key is None for r in ours) and any(r.value is None for r in ours)

    seek = {0: 5, 1: 100, 2: 0}
    n = len(recs) - 5 - 100
    assert _consume_all(broker.bootstrap, topic, 3, n, fast=True, seek=seek) == \
        _consume_all(broker.bootstrap, topic, 3, n, fast=False, seek=seek)


def _batch(records) -> bytes:
    from kafka.record.default_records import DefaultRecordBatchBuilder

    b = DefaultRecordBatchBuilder(magic=2, compression_type=0, is_transactional=False, producer_id=-1,
                                  producer_epoch=-1, base_sequence=-1, batch_size=1 << 24)
    for i, (k, v, hs) in enumerate(records):
        assert b.append(i, 1_767_225_600_000 + 7 * i, k, v, hs) is not None
    return bytes(b.build())


def _stock(buf: bytes):
    from kafka.errors import CorruptRecordError
    from kafka.record.default_records import DefaultRecordBatch

    try:
        return [(r.offset, r.timestamp, r.key, r.value, r.headers) for r in DefaultRecordBatch(buf)]
    except CorruptRecordError:
        return "corrupt"


def _fast(buf: bytes):
    from kafka.consumer.fetcher import ConsumerRecord
    from kafka.record.default_records import DefaultRecordBatch

    b = DefaultRecordBatch(buf)
    try:
        recs, _, _ = _kafka_fast._kafkarecords.parse_v2(
            b._buffer, b._pos, b.records_count, b.base_offset, b.first_timestamp, False, 0, "t", 0, -1, ConsumerRecord)
    except ValueError:
        return "corrupt"
    return [(r.offset, r.timestamp, r.key, r.value, r.headers) for r in recs]


def corrupted(good: bytes, seed: int, trials: int = 3000):
    """``trials`` damaged copies of a batch: every third truncated inside its records, the others
    with 1-4 bytes of the records section overwritten (the 61-byte header is left alone)."""
    rng = random.Random(seed)
    for trial in range(trials):
        buf = bytearray(good)
        if trial % 3 == 0:
            buf = buf[: rng.randrange(61, len(buf))]
        else:
            for _ in range(rng.randint(1, 4)):
                buf[rng.randrange(61, len(buf))] = rng.getrandbits(8)
        yield trial, bytes(buf)


def test_parse_v2_agrees_with_kafka_python_on_corrupt_batches():
    """Truncated batches and flipped bytes in the records: the C parse refuses exactly what
    kafka-python refuses, and returns the same records for whatever it accepts."""
    good = _batch(_records()[:60])
    assert _fast(good) == _stock(good) != "corrupt"
    outcomes = defaultdict(int)
    for trial, buf in corrupted(good, seed=11):
        ours, theirs = _fast(buf), _stock(buf)
        assert ours == theirs, f"trial {trial}"
        outcomes[ours == "corrupt"] += 1
    assert outcomes[True] > 1000 and outcomes[False] > 50  # both outcomes were exercised


def test_batching_producer_delivers_every_record_in_order(broker):
    """The kafka-python producer adapter's batched path: every record arrives once, keyed ones on the
    default partitioner's partition, in send order per key; keyless ones spread over partitions."""
    from kafka.partitioner.default import murmur2

    from pipeline.broker import create_topics
    from pipeline.kafka import make_producer

    topic = f"batched-{uuid.uuid4().hex[:8]}"
    create_topics(broker.bootstrap, {topic: 4})
    p = make_producer("kafka-python", broker.bootstrap)
    assert p._batching is not None, "the batched path is not in use"
    sent = []
    rng = random.Random(5)
    for i in range(20_000):
        key = None if i % 50 == 0 else b"u%d" % rng.randrange(300)
        value = b"%d:" % i + b"x" * rng.choice((10, 200, 2000))
        p.send(topic, key, value)
        sent.append((key, value))
        if i == 12_345:
            p.flush()
    p.flush()
    p.close()

    got = _consume_all(broker.bootstrap, topic, 4, len(sent), fast=False)
    assert sorted((r.key or b"", r.value) for r in got) == sorted((k or b"", v) for k, v in sent)
    for r in got:
        if r.key is not None:
            assert r.partition == (murmur2(r.key) & 0x7FFFFFFF) % 4
    assert len({r.partition for r in got if r.key is None}) == 4
    order = defaultdict(list)
    for r in got:  # in (partition, offset) order
        if r.key is not None:  # a key's records: one partition, in send order
            order[r.key].append(int(r.value.split(b":")[0]))
    assert len(order) > 250 and all(seq == sorted(seq) for seq in order.values())


def test_send_many_delivers_what_send_does(broker, monkeypatch):
    """The producer adapter's send_many (the worker's samples): every record once, on the default
    partitioner's partition, in call order per key, over calls that mix new and cached keys (and a
    key-hash cache small enough to be cleared mid-call), values that cut batches, one-partition
    calls, a keyless record and send calls in between."""
    from kafka.partitioner.default import murmur2

    from pipeline import kafka as K
    from pipeline.broker import create_topics

    monkeypatch.setattr(K, "KEY_HASH_CACHE_MAX", 50)
    topic = f"many-{uuid.uuid4().hex[:8]}"
    create_topics(broker.bootstrap, {topic: 3})
    p = K.make_producer("kafka-python", broker.bootstrap)
    assert p._batching is not None, "the batched path is not in use"
    rng = random.Random(9)
    sent: list[tuple[bytes, bytes]] = []
    i = 0
    for call in range(60):
        recs = []
        one_key = call % 7 == 0  # every record of the call on one partition
        for _ in range(rng.choice((1, 2, 40, 700))):
            key = b"u0" if one_key else b"u%d" % rng.randrange(120)
            recs.append((key, b"%d:" % i + b"x" * rng.choice((10, 300, 3000, 60_000))))
            i += 1
        if call == 12:
            recs[0] = (None, recs[0][1])  # a keyless record: the call takes send's path
        if call % 5 == 4:
            for k, v in recs:
                p.send(topic, k, v)
        else:
            p.send_many(topic, recs)
        sent += recs
        if call == 30:
            p.flush()
    p.send_many(topic, [])
    p.flush()
    p.close()

    got = _consume_all(broker.bootstrap, topic, 3, len(sent), fast=False)
    assert sorted((r.key or b"", r.value) for r in got) == sorted((k or b"", v) for k, v in sent)
    assert sum(r.key is None for r in got) == 1
    assert all(r.partition == (murmur2(r.key) & 0x7FFFFFFF) % 3 for r in got if r.key is not None)
    order = defaultdict(list)
    for r in got:  # in (partition, offset) order
        if r.key is not None:
            order[r.key].append(int(r.value.split(b":")[0]))
    assert len(order) > 100 and all(seq == sorted(seq) for seq in order.values())


def test_add_many_builds_the_batches_add_does(broker):
    """BatchingSender.add_many against add, record by record: the same batches (records, sizes),
    cut before BATCH_BYTES, a record over it alone; the same error at a record over
    max_request_size, with the records before it queued."""
    from kafka import KafkaProducer
    from kafka.errors import MessageSizeTooLargeError

    from pipeline.broker import create_topics

    topic = f"addmany-{uuid.uuid4().hex[:8]}"
    create_topics(broker.bootstrap, {topic: 2})
    rng = random.Random(4)
    big = _kafka_fast.BATCH_BYTES + 999
    keys = [b"k%d" % rng.randrange(9) for _ in range(400)]
    values = [b"%d:" % i + b"v" * (big if i in (77, 78, 301) else rng.choice((5, 900, 40_000)))
              for i in range(400)]
    shipped = {}
    for how in ("add", "add_many"):
        kp = KafkaProducer(bootstrap_servers=broker.bootstrap, enable_idempotence=False, linger_ms=0,
                           max_request_size=2 << 20)
        s = _kafka_fast.BatchingSender(kp)
        s._clock = lambda: 0.0  # no linger: batches are cut by size alone
        for part, lo, hi in ((0, 0, 150), (1, 150, 151), (0, 151, 400)):
            if how == "add":
                for k, v in zip(keys[lo:hi], values[lo:hi], strict=True):
                    s.add(topic, part, k, v)
            else:
                s.add_many(topic, part, keys[lo:hi], values[lo:hi])
        with pytest.raises(MessageSizeTooLargeError):
            rec = [b"ok1", b"ok2", b"x" * ((2 << 20) + 1), b"never"]
            if how == "add":
                for v in rec:
                    s.add(topic, 1, b"k", v)
            else:
                s.add_many(topic, 1, [b"k"] * 4, rec)
        s.ship_all()
        shipped[how] = [(b.topic_partition.partition, b.records.next_offset(), b.records.size_in_bytes())
                        for b in s._shipped]
        assert s.flush() == []
        kp.close()
    assert shipped["add_many"] == shipped["add"]
    sizes = shipped["add"]
    assert len(sizes) > 10 and all(size <= _kafka_fast.BATCH_BYTES or n == 1 for _, n, size in sizes)
    assert sum(n == 1 and size > big for _, n, size in sizes) == 3
    # partition 1: record 150, then ok1 and ok2, queued before the record that was too large
    assert [n for part, n, _ in sizes if part == 1] == [3]
    with pytest.raises(ValueError, match="keys for"):
        s.add_many(topic, 0, [b"k"], [b"a", b"b"])


def test_batching_sender_reports_a_batch_that_was_never_delivered(broker):
    """A batch the producer gives up on (here: a partition that does not exist, so no leader, until
    the delivery timeout) comes back from flush as a failure; it is never silently dropped."""
    from kafka import KafkaProducer
    from kafka.errors import MessageSizeTooLargeError

    from pipeline.broker import create_topics

    topic = f"undeliverable-{uuid.uuid4().hex[:8]}"
    create_topics(broker.bootstrap, {topic: 1})
    kp = KafkaProducer(bootstrap_servers=broker.bootstrap, enable_idempotence=False, linger_ms=0,
                       request_timeout_ms=1000, delivery_timeout_ms=2500, max_request_size=1 << 20)
    assert _kafka_fast.BatchingSender.usable(kp)
    s = _kafka_fast.BatchingSender(kp)
    s.add(topic, 0, b"k", b"fine")
    s.add(topic, 7, b"k", b"lost")
    t = time.monotonic()
    failed = s.flush()
    assert time.monotonic() - t < 30
    assert len(failed) == 1 and f"{topic}[7]" in failed[0], failed
    with pytest.raises(MessageSizeTooLargeError):
        s.add(topic, 0, None, b"x" * ((1 << 20) + 1))
    s.add(topic, 0, b"k", b"again")
    assert s.flush() == []

    # batches stay under BATCH_BYTES; a record bigger than that goes alone
    big = _kafka_fast.BATCH_BYTES + 1000
    for i in range(100):
        s.add(topic, 0, b"k", b"%03d" % i + b"x" * 20_000)
        if i == 50:
            s.add(topic, 0, b"k", b"y" * big)
    s.ship_all()
    sizes = [(b.records.size_in_bytes(), b.records.next_offset()) for b in s._shipped]
    assert s.flush() == []
    assert len(sizes) >= 5
    assert all(size <= _kafka_fast.BATCH_BYTES or n == 1 for size, n in sizes), sizes
    assert any(size > big and n == 1 for size, n in sizes)
    kp.close()


def test_batching_sender_lingers_from_each_partitions_first_record(broker):
    """No record waits past LINGER_S for its batch to be built: shipping one partition (it filled up)
    leaves the other partitions' records their own age, it does not restart their clock."""
    from kafka import KafkaProducer

    from pipeline.broker import create_topics

    topic = f"linger-{uuid.uuid4().hex[:8]}"
    create_topics(broker.bootstrap, {topic: 2})
    kp = KafkaProducer(bootstrap_servers=broker.bootstrap, enable_idempotence=False, linger_ms=0,
                       max_request_size=1 << 20)
    s = _kafka_fast.BatchingSender(kp)
    now = [100.0]
    s._clock = lambda: now[0]
    linger = _kafka_fast.LINGER_S
    s.add(topic, 0, b"k", b"waits")  # the oldest record
    now[0] += 0.6 * linger
    s.add(topic, 1, b"k", b"x" * (_kafka_fast.BATCH_BYTES - 100))
    s.add(topic, 1, b"k", b"y" * 1000)  # partition 1 is full: its batch ships, partition 0's stays
    assert [tp for tp in s._pending] == [(topic, 0), (topic, 1)]
    now[0] += 0.6 * linger  # partition 0's record is now 1.2 linger old, partition 1's 0.6
    s.add(topic, 1, b"k", b"z")
    assert not s._pending, "the oldest record waited past LINGER_S"
    assert s.flush() == []
    kp.close()


def test_fast_paths_stay_off_where_they_do_not_apply(broker, monkeypatch):
    from kafka import KafkaConsumer, KafkaProducer
    from kafka.serializer import Deserializer

    class Text(Deserializer):
        def deserialize(self, topic, headers, data):
            return data.decode()

    c = KafkaConsumer(bootstrap_servers=broker.bootstrap, value_deserializer=Text())
    assert not _kafka_fast.install(c)  # deserializers: kafka-python's own path
    c.close()
    idem = KafkaProducer(bootstrap_servers=broker.bootstrap, enable_idempotence=True)
    gz = KafkaProducer(bootstrap_servers=broker.bootstrap, enable_idempotence=False, compression_type="gzip")
    assert not _kafka_fast.BatchingSender.usable(idem) and not _kafka_fast.BatchingSender.usable(gz)
    idem.close()
    gz.close()
    monkeypatch.setenv("CTRSTREAM_KAFKA_FAST_RECORDS", "0")
    c = KafkaConsumer(bootstrap_servers=broker.bootstrap)
    assert not _kafka_fast.install(c)
    c.close()


# ---- confluent-kafka's side: Messages to columns (message_columns, used by pipeline._confluent) ----

def test_message_columns_calls_the_accessors_once_per_message_and_declines_errors():
    """The C loop behind ConfluentConsumer.poll_columns, on real confluent-kafka Messages: the same
    columns as the accessors mapped in Python; None (the Python filter) when any message carries an
    error or event; an accessor's exception propagates; no reference is leaked either way."""
    import numpy as np
    from confluent_kafka import KafkaError, Message

    from pipeline import _kafkarecords
    from tests.pipeline.leaks import traced_growth

    def msgs(n, error_at=None):
        out = []
        for i in range(n):
            m = Message(topic="t", partition=i % 3, offset=100 + i, key=b"k%d" % i,
                        value=None if i == 4 else b"v%d" % i,
                        error=KafkaError(KafkaError._PARTITION_EOF) if i == error_at else None)  # noqa: SLF001
            out.append(m)
        return out

    def cols(ms):
        return _kafkarecords.message_columns(ms, Message.error, Message.partition, Message.offset, Message.value)

    ms = msgs(50)
    parts, offs, values = cols(ms)
    assert np.frombuffer(parts, np.int64).tolist() == [m.partition() for m in ms]
    assert np.frombuffer(offs, np.int64).tolist() == [m.offset() for m in ms]
    assert values == [m.value() for m in ms] and values[4] is None
    assert cols([]) == (b"", b"", [])
    assert cols(msgs(50, error_at=0)) is None and cols(msgs(50, error_at=49)) is None

    def boom(m):
        raise RuntimeError("accessor failed")

    with pytest.raises(RuntimeError, match="accessor failed"):
        _kafkarecords.message_columns(ms, Message.error, Message.partition, boom, Message.value)
    with pytest.raises(TypeError):
        _kafkarecords.message_columns(tuple(ms), Message.error, Message.partition, Message.offset, Message.value)
    shrinking = msgs(5)

    def shrink(m):  # an accessor in Python may change the list under the loop: refused, not read past
        shrinking.clear()
        return m.partition()

    with pytest.raises(RuntimeError, match="changed size"):
        _kafkarecords.message_columns(shrinking, Message.error, shrink, Message.offset, Message.value)

    def run():
        for _ in range(300):
            cols(ms)
            cols(msgs(20, error_at=10))
            with pytest.raises(RuntimeError):
                _kafkarecords.message_columns(ms, Message.error, Message.partition, Message.offset, boom)

    run()
    grown = traced_growth(run, collect=True)
    assert grown < 64 * 1024, f"{grown} bytes left after 900 calls"
