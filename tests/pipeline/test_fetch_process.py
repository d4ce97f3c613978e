"""kafka-python's consume in a child process (pipeline/_fetch_process.py): every record once, in
order, from the real broker; seeks, rebalances, errors and the child's lifetime."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

from pipeline import _fetch_process, _kafka_fast
from pipeline.exceptions import BrokerError
from pipeline.kafka import make_consumer
from tests.pipeline.test_kafka_fast import _batch, _fast, _records, corrupted

pytestmark = pytest.mark.kafka

PARTS = 3


def _columns(buf: bytes):
    from kafka.record.default_records import DefaultRecordBatch

    b = DefaultRecordBatch(buf)
    try:
        offs, keys, vals = _kafka_fast._kafkarecords.parse_v2_columns(b._buffer, b._pos, b.records_count,
                                                                        b.base_offset)
    except ValueError:
        return "corrupt"
    import numpy as np

    return list(zip(np.frombuffer(offs, np.int64).tolist(), keys, vals, strict=True))


def _fast_columns(buf: bytes):
    recs = _fast(buf)
    return recs if recs == "corrupt" else [(o, k, v) for o, _ts, k, v, _h in recs]


def test_column_parse_agrees_with_the_record_parse_on_good_and_corrupt_batches():
    good = _batch(_records())
    assert _columns(good) == _fast_columns(good) != "corrupt"
    corrupt = 0
    for trial, buf in corrupted(_batch(_records()[:60]), seed=5):
        ours = _columns(buf)
        assert ours == _fast_columns(buf), f"trial {trial}"
        corrupt += ours == "corrupt"
    assert 1000 < corrupt < 2950  # both outcomes were exercised


def _produce(bootstrap: str, topic: str, n: int, compression: str | None = None) -> dict[int, list[tuple]]:
    """n records over PARTS partitions; returns each partition's (offset, key, value) in order."""
    from kafka import KafkaProducer

    from pipeline.broker import create_topics

    create_topics(bootstrap, {topic: PARTS})
    p = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, batch_size=16 << 10,
                      compression_type=compression, enable_idempotence=False)
    futs = [(i % PARTS, b"k%d" % (i % 50) if i % 7 else None, b'{"i":%d}' % i,
             p.send(topic, key=b"k%d" % (i % 50) if i % 7 else None, value=b'{"i":%d}' % i, partition=i % PARTS))
            for i in range(n)]
    p.flush()
    p.close()
    want: dict[int, list[tuple]] = {q: [] for q in range(PARTS)}
    for part, k, v, f in futs:
        want[part].append((f.get(10).offset, k, v))
    return want


def _drain(c, n: int, max_records: int = 97, timeout_s: float = 60) -> dict[int, list[tuple]]:
    got: dict[int, list[tuple]] = {q: [] for q in range(PARTS)}
    seen = 0
    deadline = time.monotonic() + timeout_s
    while seen < n and time.monotonic() < deadline:
        b = c.poll_columns(max_records, 200)
        assert len(b) <= max_records
        for part, off, k, v in zip(b.partition.tolist(), b.offset.tolist(), b.key, b.value, strict=True):
            got[part].append((off, k, v))
        seen += len(b)
    return got


@pytest.fixture
def consumer_factory(broker):
    made = []

    def make(topic: str, group: str | None = None, **kw):
        c = make_consumer("kafka-python", broker.bootstrap, [topic], group or f"g-{uuid.uuid4().hex[:6]}",
                          fetch_process=True, session_timeout_ms=6000, max_poll_interval_ms=20000, **kw)
        assert isinstance(c, _fetch_process.FetchProcessConsumer)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


@pytest.mark.parametrize("compression", [None, "gzip"])
def test_every_record_once_in_order(broker, consumer_factory, compression):
    topic = f"fp-{uuid.uuid4().hex[:8]}"
    want = _produce(broker.bootstrap, topic, 3000, compression)
    assigned: list = []
    c = consumer_factory(topic, on_assign=assigned.extend)
    got = _drain(c, 3000)
    assert got == want
    assert sorted(assigned) == [(topic, q) for q in range(PARTS)] == c.assignment()
    assert len(c.poll_columns(100, 300)) == 0  # nothing more than was produced


def test_seek_drops_what_was_fetched_before_it_and_can_land_inside_a_batch(broker, consumer_factory):
    topic = f"fp-{uuid.uuid4().hex[:8]}"
    want = _produce(broker.bootstrap, topic, 3000)
    c = consumer_factory(topic)
    first = _drain(c, 300, max_records=50)
    # batches of partition 0 beyond what was returned are in flight now; after the seek, partition 0
    # must continue exactly at offset 17 (inside the first batch), the others where they were
    c.seek((topic, 0), 17)
    rest = _drain(c, 3000 - 17 - sum(len(v) for q, v in first.items() if q != 0))
    assert rest[0] == want[0][17:]
    for q in (1, 2):
        assert first[q] + rest[q] == want[q]


def test_a_rebalance_calls_back_between_batches_and_loses_nothing(broker, consumer_factory):
    """Two consumers of one group: the first is revoked when the second joins. Its revoke callback
    runs inside its poll, after every batch it returned before. Handing over offsets as the worker
    does (stored on revoke, sought on assign) gives every record exactly once over the two."""
    topic = f"fp-{uuid.uuid4().hex[:8]}"
    n = 30_000
    want = _produce(broker.bootstrap, topic, n)
    group = f"g-{uuid.uuid4().hex[:6]}"
    consumers: list = []
    seen: list[dict[int, list[tuple]]] = [{q: [] for q in range(PARTS)} for _ in range(2)]
    stored: dict[tuple[str, int], int] = {}  # the "state store" the two share
    events: list[tuple[int, str, list]] = []

    def callbacks(i: int):
        def on_revoke(tps):
            events.append((i, "revoke", sorted(tps)))
            stored.update({(topic, q): seen[i][q][-1][0] + 1 for q in range(PARTS)
                           if (topic, q) in tps and seen[i][q]})

        def on_assign(tps):
            events.append((i, "assign", sorted(tps)))
            for tp in tps:
                if tp in stored:
                    consumers[i].seek(tp, stored[tp])
        return {"on_revoke": on_revoke, "on_assign": on_assign}

    consumers.append(consumer_factory(topic, group, **callbacks(0)))
    deadline = time.monotonic() + 90
    while sum(map(len, seen[0].values())) < 1500 and time.monotonic() < deadline:
        b = consumers[0].poll_columns(50, 200)
        for part, off, k, v in zip(b.partition.tolist(), b.offset.tolist(), b.key, b.value, strict=True):
            seen[0][part].append((off, k, v))
    consumers.append(consumer_factory(topic, group, **callbacks(1)))
    while sum(len(s[q]) for s in seen for q in range(PARTS)) < n and time.monotonic() < deadline:
        time.sleep(0.02)  # ~5k records/s: the second joins while records are left
        for i, c in enumerate(consumers):
            b = c.poll_columns(100, 100)
            owned = {tp[1] for tp in c.assignment()}
            for part, off, k, v in zip(b.partition.tolist(), b.offset.tolist(), b.key, b.value, strict=True):
                assert part in owned, "a record of a partition this consumer does not own"
                seen[i][part].append((off, k, v))
    assert (0, "revoke", [(topic, q) for q in range(PARTS)]) in events
    assert any(e[0] == 1 and e[1] == "assign" and e[2] for e in events)
    assert any(seen[1].values()), "the second consumer got nothing"
    for q in range(PARTS):
        merged = sorted(seen[0][q] + seen[1][q])
        assert merged == want[q], f"partition {q}: lost or doubled records"


def test_a_client_error_is_raised_from_poll(broker, consumer_factory):
    c = make_consumer("kafka-python", broker.bootstrap, ["not a topic!"], "g", fetch_process=True)
    try:
        with pytest.raises(Exception, match="topic"):
            for _ in range(50):
                c.poll_columns(10, 200)
    finally:
        c.close()


def test_a_dead_fetch_process_is_an_error_not_a_hang(broker, consumer_factory):
    topic = f"fp-{uuid.uuid4().hex[:8]}"
    _produce(broker.bootstrap, topic, 10)
    c = consumer_factory(topic)
    os.kill(c.pid, signal.SIGKILL)
    with pytest.raises(BrokerError, match="fetch process exited"):
        for _ in range(50):
            c.poll_columns(10, 200)


def test_close_is_prompt_and_the_fetch_process_dies_with_the_worker(broker, tmp_path):
    """close() leaves the group and reaps the child in well under a session timeout; a worker killed
    with SIGKILL takes its fetch process with it (it would otherwise keep the partitions)."""
    topic = f"fp-{uuid.uuid4().hex[:8]}"
    _produce(broker.bootstrap, topic, 10)
    c = make_consumer("kafka-python", broker.bootstrap, [topic], "g-close", fetch_process=True)
    _drain(c, 10)
    t = time.monotonic()
    c.close()
    assert time.monotonic() - t < 5
    assert c._proc.exitcode == 0

    script = textwrap.dedent(f"""
        import sys, time
        from pipeline.kafka import make_consumer
        c = make_consumer("kafka-python", {broker.bootstrap!r}, [{topic!r}], "g-kill", fetch_process=True)
        c.poll_columns(10, 2000)
        print(c.pid, flush=True)
        time.sleep(60)
    """)
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    try:
        child = int(p.stdout.readline())
        os.kill(child, 0)  # alive
        p.kill()
        p.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(child, 0)
            except ProcessLookupError:
                break
            try:  # reap it if it became ours (it was reparented to init, or to us as a subreaper)
                os.waitpid(child, os.WNOHANG)
            except ChildProcessError:
                pass
            time.sleep(0.1)
        else:
            pytest.fail("the fetch process outlived the worker")
    finally:
        p.kill()


def _legacy_set(magic: int, compression: int, offsets: range, corrupt_at: int | None = None) -> bytes:
    """A message set of the legacy formats (magic 0/1; the embedded broker writes v2 only)."""
    from kafka.record.legacy_records import LegacyRecordBatchBuilder

    b = LegacyRecordBatchBuilder(magic, compression, 1 << 20)
    for i, off in enumerate(offsets):
        b.append(off, 1_767_225_600_000 + i, None if i == 3 else b"k%d" % off, b"value-%d" % off)
    buf = bytearray(b.build())
    if corrupt_at is not None:  # a byte of the last record's value: its CRC no longer matches
        buf[corrupt_at] ^= 0x55
    return bytes(buf)


@pytest.mark.parametrize("magic", [0, 1])
@pytest.mark.parametrize("compression", [0, 1], ids=["plain", "gzip"])
def test_legacy_batches_reach_the_worker_as_the_in_process_consumer_returns_them(magic, compression):
    """Legacy batches are parsed by kafka-python in the child and sent as records; the worker's
    columns equal what the in-process fast path returns, from a fetch offset inside the set."""
    import numpy as np
    from kafka.record.memory_records import MemoryRecords
    from kafka.structs import TopicPartition

    buf = _legacy_set(magic, compression, range(10, 18))
    tp = TopicPartition("events", 2)
    expected = [(r.offset, r.key, r.value) for r in _kafka_fast._fast_class()(12, tp, MemoryRecords(buf)).take()]
    assert [o for o, _, _ in expected] == list(range(12, 18))
    child = _fetch_process._raw_records_class(_kafka_fast._fast_class())(12, tp, MemoryRecords(buf))
    items = child.take()
    assert child.next_fetch_offset == 18 and all(kind == _fetch_process._LEGACY for kind, _, _ in items)
    worker = object.__new__(_fetch_process.FetchProcessConsumer)  # its parse side only: no process
    worker._gen, worker._topic = {2: 4}, "events"
    got = []
    for _kind, part, recs in items:
        if recs:  # what the child sends: a set's records, skipped ones (below the fetch offset) dropped
            b = worker._columns(_fetch_process._legacy_message(part, 4, recs))
            assert b.topic == "events" and np.all(b.partition == 2)
            got += [(r.offset, r.key, r.value) for r in b.records()]
    assert got == expected
    stale = worker._columns(_fetch_process._legacy_message(2, 3, items[-1][2]))
    assert stale is None  # sent before the partition's last seek: dropped


def test_a_corrupt_legacy_record_is_refused_in_the_child_as_in_process():
    """The records before it are returned, then the CRC error is raised (kafka-python's take())."""
    from kafka.errors import CorruptRecordError
    from kafka.record.memory_records import MemoryRecords
    from kafka.structs import TopicPartition

    good = _legacy_set(1, 0, range(5))
    buf = _legacy_set(1, 0, range(5), corrupt_at=len(good) - 2)
    tp = TopicPartition("events", 0)
    for cls in (_kafka_fast._fast_class(), _fetch_process._raw_records_class(_kafka_fast._fast_class())):
        assert len(cls(0, tp, MemoryRecords(good)).take()) == 5
        bad = cls(0, tp, MemoryRecords(buf))
        first = bad.take()
        assert sum(len(x[2]) if x[0] == _fetch_process._LEGACY else 1 for x in first) == 4
        with pytest.raises(CorruptRecordError, match="crc"):
            bad.take()
