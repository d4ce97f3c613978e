"""The worker's join, labeling and point-in-time rules, plus the real-broker path."""

from __future__ import annotations

import json
import uuid

import pytest

from pipeline.config import ProduceSettings, WorkerSettings
from pipeline.events import RawRecord, encode_event, hash_id
from pipeline.state import open_store
from pipeline.worker import StreamWorker, run_worker, sample_id
from tests.fixtures import event

T0 = 1_767_225_600_000
MIN = 60_000


class ListProducer:
    """In-process sink for the unit tests of the join logic (the kafka tests use the real broker)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None, bytes]] = []
        self.flushes = 0

    def send(self, topic, key, value):
        self.sent.append((topic, key, value))

    def flush(self):
        self.flushes += 1

    def close(self):
        pass

    def samples(self):
        return [json.loads(v) for t, _, v in self.sent if t == "samples"]

    def dlq(self):
        return [json.loads(v) for t, _, v in self.sent if t == "events.dlq"]


def make_worker(store=None, **kw):
    s = WorkerSettings(store="memory://", allowed_lateness_ms=0, **kw)
    store = store or open_store("memory://")
    w = StreamWorker(s, store, ListProducer())
    w.assign([("events", 0)])
    return w


def feed(w, events, start_offset=0):
    recs = [RawRecord("events", 0, start_offset + i, b"k", e if isinstance(e, bytes) else encode_event(e))
            for i, e in enumerate(events)]
    return w.process(recs)


def test_impression_click_join_labels_and_seq_pos():
    w = make_worker()
    feed(w, [event(ts=T0), event(ts=T0 + 1), event("impression", item=5, request_id="r1", ts=T0 + 2),
             event("impression", item=6, request_id="r1", ts=T0 + 2),
             event(ts=T0 + 3),  # a later behavior: must not be visible to the samples
             event("click", item=5, request_id="r1", ts=T0 + 5 * MIN)])
    assert w.producer.samples() == []  # window still open
    feed(w, [event(ts=T0 + 31 * MIN)], start_offset=6)  # watermark passes T0 + 30 min
    got = {s["item_id"]: s for s in w.producer.samples()}
    assert got["5"]["label"] == 1 and got["6"]["label"] == 0
    assert got["5"]["seq_pos"] == 2 and got["6"]["seq_pos"] == 2
    assert got["5"]["sample_id"] == sample_id("r1", hash_id(5))
    # the click is itself a behavior: 2 + 1 later behavior + click + last = 5
    assert w.store.length(hash_id(1)) == 5
    assert w.store.offsets("ctrstream-worker") == {("events", 0): 7}
    assert list(w.store.pending_items()) == []


def test_click_outside_window_does_not_label():
    w = make_worker()
    feed(w, [event("impression", item=5, request_id="r", ts=T0),
             event("click", item=5, request_id="r", ts=T0 + 45 * MIN), event(ts=T0 + 90 * MIN)])
    assert [s["label"] for s in w.producer.samples()] == [0]


def test_click_before_impression_out_of_order_still_labels():
    w = make_worker()
    feed(w, [event("click", item=5, request_id="r", ts=T0 + 1000), event("impression", item=5, request_id="r", ts=T0),
             event(ts=T0 + 40 * MIN)])
    assert [s["label"] for s in w.producer.samples()] == [1]


def test_duplicate_impression_ignored_and_late_click_counted():
    w = make_worker()
    feed(w, [event("impression", item=5, request_id="r", ts=T0), event("impression", item=5, request_id="r", ts=T0),
             event(ts=T0 + 40 * MIN)])
    feed(w, [event("click", item=5, request_id="r", ts=T0 + 41 * MIN)], 3)  # its impression is already labeled
    feed(w, [event(ts=T0 + 80 * MIN)], 4)
    assert len(w.producer.samples()) == 1 and w.stats.duplicate_impressions == 1
    assert w.stats.unmatched_clicks == 1


def test_bad_records_go_to_dlq_and_batch_continues():
    w = make_worker()
    feed(w, [b"\xff garbage", event(ts=T0), b'{"type":"behavior"}', event(ts=T0 + 1)])
    dl = w.producer.dlq()
    assert [d["offset"] for d in dl] == [0, 2] and all(d["reason"] for d in dl)
    assert w.store.length(hash_id(1)) == 2
    assert w.store.offsets("ctrstream-worker")[("events", 0)] == 4  # dead records are consumed too


def test_state_survives_restart_pending_and_watermark(tmp_path):
    uri = f"lmdb://{tmp_path}/s"
    w = make_worker(open_store(uri))
    feed(w, [event("impression", item=5, request_id="r", ts=T0), event(ts=T0 + MIN)])
    w.store.close()
    w2 = make_worker(open_store(uri))  # "restart": pending impression reloaded from the store
    feed(w2, [event("click", item=5, request_id="r", ts=T0 + 2 * MIN), event(ts=T0 + 40 * MIN)], start_offset=2)
    assert [s["label"] for s in w2.producer.samples()] == [1]
    assert w2.store.offsets("ctrstream-worker")[("events", 0)] == 4


def test_samples_flushed_before_state_commit():
    w = make_worker()
    calls = []
    orig_commit = w.store.commit
    w.producer.flush = lambda: calls.append("flush")
    w.store.commit = lambda d: (calls.append("commit"), orig_commit(d))
    feed(w, [event(ts=T0)])
    assert calls == ["flush", "commit"]


@pytest.mark.kafka
def test_worker_against_real_broker(broker, tmp_path):
    from kafka import KafkaConsumer, TopicPartition

    from pipeline.produce import produce_events

    tag = uuid.uuid4().hex[:8]
    ps = ProduceSettings(bootstrap_servers=broker.bootstrap, events_topic=f"ev-{tag}", samples_topic=f"sa-{tag}",
                         dlq_topic=f"dlq-{tag}", partitions=2)
    evs = []
    for u in range(4):
        for k in range(20):
            evs.append(event(user=u, item=k, ts=T0 + k * MIN))
        evs.append(event("impression", user=u, item=99, request_id=f"q{u}", ts=T0 + 20 * MIN))
        if u % 2 == 0:
            evs.append(event("click", user=u, item=99, request_id=f"q{u}", ts=T0 + 21 * MIN))
    evs.sort(key=lambda e: e["ts"])
    produce_events(ps, evs)
    from pipeline.kafka import make_producer

    p = make_producer("kafka-python", broker.bootstrap)
    p.send(ps.events_topic, b"0", b"{not json")
    p.flush()
    ws = WorkerSettings(bootstrap_servers=broker.bootstrap, events_topic=ps.events_topic,
                        samples_topic=ps.samples_topic, dlq_topic=ps.dlq_topic, group_id=f"w-{tag}",
                        store=f"lmdb://{tmp_path}/st", exit_when_idle=2, drain_on_exit=True,
                        max_poll_interval_ms=3000, session_timeout_ms=3000)
    stats = run_worker(ws, install_signals=False)
    assert stats.samples == 4 and stats.positives == 2 and stats.dead_letters == 1

    def read_all(topic, parts):
        c = KafkaConsumer(bootstrap_servers=broker.bootstrap, enable_auto_commit=False)
        tps = [TopicPartition(topic, i) for i in range(parts)]
        c.assign(tps)
        c.seek_to_beginning()
        out = []
        for _ in range(20):
            for recs in c.poll(500).values():
                out.extend(json.loads(r.value) for r in recs)
            if sum(c.end_offsets(tps).values()) == len(out):
                break
        c.close()
        return out

    samples = read_all(ps.samples_topic, 2)
    assert sorted((s["user_id"], s["label"], s["seq_pos"]) for s in samples) == [
        ("0", 1, 20), ("1", 0, 20), ("2", 1, 20), ("3", 0, 20)]
    dlq = read_all(ps.dlq_topic, 1)
    assert len(dlq) == 1 and "JSON" in dlq[0]["reason"]
    st = open_store(f"lmdb://{tmp_path}/st", readonly=True)
    assert st.length(hash_id(0)) == 21 and st.length(hash_id(1)) == 20
