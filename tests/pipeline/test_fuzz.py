"""Fuzz: thousands of malformed and hostile records (truncated JSON, huge strings, wrong types,
negative and far-future timestamps, non-UTF-8 bytes and keys, lone surrogates, deep nesting, records
that are only JSON when glued to a neighbour) mixed with good ones. The worker survives, applies
every good record, and routes every bad one to the DLQ with its bytes, position and a reason."""

from __future__ import annotations

import json
import uuid
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.config import WorkerSettings
from pipeline.events import RawRecord, hash_id
from pipeline.state import open_store
from pipeline.worker import StreamWorker, run_worker
from tests.pipeline.hostile import hostile_records
from tests.pipeline.procs import layout, oracle_digest, produce_partitioned, read_topic
from tests.pipeline.test_worker import ListProducer


def expected_lengths(recs) -> Counter:
    n: Counter = Counter()
    for _, v, good in recs:
        if good:
            e = json.loads(v)
            if e["type"] != "impression":
                n[hash_id(e["user_id"])] += 1
    return n


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10**6), batch=st.sampled_from([1, 7, 100, 5000]))
def test_worker_survives_hostile_batches(seed, batch):
    recs = hostile_records(seed, n_good=400, n_bad=400)
    w = StreamWorker(WorkerSettings(store="memory://"), open_store("memory://"), ListProducer())
    w.assign([("events", 0)])
    raw = [RawRecord("events", 0, i, k, v) for i, (k, v, _) in enumerate(recs)]
    for i in range(0, len(raw), batch):
        w.process(raw[i:i + batch])
    w.commit()
    dlq = w.producer.dlq()
    bad = [i for i, (_, _, good) in enumerate(recs) if not good]
    assert sorted(d["offset"] for d in dlq) == bad and all(d["reason"] for d in dlq)
    for d in dlq:
        v = recs[d["offset"]][1]
        assert d["value_hex"] == (None if v is None else v.hex())
    want = expected_lengths(recs)
    assert {u: w.store.length(u) for u in want} == dict(want)
    assert w.store.offsets("ctrstream-worker") == {("events", 0): len(recs)}


@pytest.mark.kafka
def test_hostile_stream_through_the_broker(broker, tmp_path):
    tag = uuid.uuid4().hex[:8]
    topic, group, parts = f"fuzz-{tag}", f"fuzz-{tag}", 2
    recs = hostile_records(seed=2024, n_good=3000, n_bad=3000)
    placed = [(int(json.loads(v)["user_id"]) % parts if good else i % parts,
               b"" if k is None and v is None else k, v)  # Kafka needs a key or a value
              for i, (k, v, good) in enumerate(recs)]
    produce_partitioned(broker.bootstrap, topic, placed, parts, [f"{topic}.samples", f"{topic}.dlq"])
    s = WorkerSettings(bootstrap_servers=broker.bootstrap, events_topic=topic, samples_topic=f"{topic}.samples",
                       dlq_topic=f"{topic}.dlq", group_id=group, store=f"lmdb://{tmp_path}/st", exit_when_idle=2,
                       max_poll_interval_ms=3000, session_timeout_ms=3000, max_poll_records=500)
    stats = run_worker(s, install_signals=False)
    assert stats.events == len(recs) and stats.dead_letters == 3000
    raw = layout(placed, topic)
    bad_at = {(r.partition, r.offset): r.value for r, (_, _, good) in zip(raw, recs, strict=True) if not good}
    dlq = [json.loads(r.value) for r in read_topic(broker.bootstrap, f"{topic}.dlq", parts, expect=3000)]
    assert len(dlq) == 3000 and {(d["partition"], d["offset"]) for d in dlq} == set(bad_at)
    for d in dlq:
        v = bad_at[(d["partition"], d["offset"])]
        assert d["reason"] and d["topic"] == topic and d["value_hex"] == (None if v is None else v.hex())
    reasons = Counter(d["reason"].split(":")[0].split(" got")[0] for d in dlq)
    assert len(reasons) >= 15, reasons  # many different ways to be wrong, each named
    with open_store(s.store, readonly=True) as st_:
        want = expected_lengths(recs)
        assert {u: st_.length(u) for u in want} == dict(want)
        assert st_.digest() == oracle_digest(raw, group)
