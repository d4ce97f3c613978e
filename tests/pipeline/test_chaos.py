"""Exactly-once under process faults: SIGKILL chaos, a rebalance with a killed member, a broker
restart, SIGTERM. Every test compares the store's ``digest`` (sequences, pending impressions,
offsets) with an oracle: an uninterrupted run over the same log (``procs.oracle_digest``, in
process) and, for the chaos test, also an uninterrupted ``ctrstream worker`` run.

Run the slow ones with ``pytest -m slow tests/pipeline/test_chaos.py`` (``make test`` runs them).
"""

from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import sys
import time
import uuid

import pytest

from pipeline.broker import EmbeddedBroker, create_topics
from pipeline.state import open_store
from tests.pipeline.hostile import hostile_value
from tests.pipeline.procs import (
    ROOT,
    layout,
    log_tail,
    oracle_digest,
    produce_partitioned,
    sample_set,
    start_worker,
    stored_offsets,
    wait_for,
    worker_argv,
)

pytestmark = pytest.mark.kafka

KILLS = 10


def make_stream(seed: int, n: int, users: int, partitions: int, bad_every: int = 50):
    """(partition, key, value): the synthetic stream (behaviors, impressions, clicks in their
    attribution window), with some events swapped out of order, some duplicated, and ~2% hostile
    records; a user's events stay on one partition."""
    from pipeline.datasets.synthetic import SyntheticConfig, generate

    per_user = max(1, n // users)
    cfg = SyntheticConfig(users=users, behaviors_per_user=int(per_user * 0.7), impressions_per_user=per_user // 6,
                          categories=50, items_per_category=20, days=2.0, seed=seed)
    evs = list(generate(cfg).events)[:n]
    rng = random.Random(seed)
    for i in range(len(evs) - 1):
        if rng.random() < 0.03:  # out of order: e.g. a click before its impression
            evs[i], evs[i + 1] = evs[i + 1], evs[i]
    out = []
    for i, e in enumerate(evs):
        part = int(e["user_id"]) % partitions
        rec = (part, str(e["user_id"]).encode(), json.dumps(e, separators=(",", ":")).encode())
        out.append(rec)
        if rng.random() < 0.01:
            out.append(rec)  # duplicate delivery by the producer
        if bad_every and i % bad_every == bad_every - 1:
            out.append((rng.randrange(partitions), b"\xff\x00", hostile_value(rng)))
    return out


def store_uri(backend: str, tmp_path, request) -> str:
    if backend == "lmdb":
        return f"lmdb://{tmp_path}/store-{uuid.uuid4().hex[:6]}"
    return request.getfixturevalue("redis_server").store_uri()


def total(offsets: dict) -> int:
    return sum(offsets.values())


@pytest.fixture(scope="module")
def chaos_stream(broker, tmp_path_factory):
    """One fixed stream for the chaos tests, and the state of an uninterrupted `ctrstream worker`."""
    tmp = tmp_path_factory.mktemp("chaos")
    topic, group, parts = f"chaos-{uuid.uuid4().hex[:8]}", "chaos-group", 4
    recs = make_stream(seed=11, n=30_000, users=60, partitions=parts)
    produce_partitioned(broker.bootstrap, topic, recs, parts, [f"{topic}.samples", f"{topic}.dlq"])
    raw = layout(recs, topic)
    ref_store = f"lmdb://{tmp}/reference"
    # the real entry point, once: `python -m pipeline.cli worker` (the others use python -m pipeline.worker,
    # the same flags without importing the trainer)
    argv = worker_argv(broker.bootstrap, topic, group, ref_store, exit_when_idle=3, max_poll_records=2000)
    argv[1:3] = ["-m", "pipeline.cli", "worker"]
    p = start_worker(argv, tmp / "reference.log")
    assert p.wait(300) == 0, log_tail(tmp / "reference.log")
    with open_store(ref_store, readonly=True) as s:
        ref_digest = s.digest()
    return {"topic": topic, "group": group, "parts": parts, "raw": raw, "ref_digest": ref_digest,
            "ref_samples": sample_set(broker.bootstrap, f"{topic}.samples", parts), "n": len(recs)}


@pytest.mark.slow
@pytest.mark.parametrize("backend,client", [("lmdb", "kafka-python"),
                                            pytest.param("redis", "confluent", marks=pytest.mark.redis)])
def test_sigkill_chaos_ends_in_the_uninterrupted_state(chaos_stream, broker, tmp_path, request, backend, client):
    c = chaos_stream
    assert c["ref_digest"] == oracle_digest(c["raw"], c["group"])  # the CLI run agrees with the oracle
    uri = store_uri(backend, tmp_path, request)
    samples_topic = f"{c['topic']}.samples-{backend}"
    create_topics(broker.bootstrap, {samples_topic: c["parts"]})
    # checkpoints of ~10 batches (commit_max_events): kills land inside open checkpoints as well as
    # between batches and commits. Small batches also bound how far a life runs between reaching its
    # kill point and the SIGKILL (the polling below takes tens of ms), so no kill overshoots the end.
    argv = worker_argv(broker.bootstrap, c["topic"], c["group"], uri, kafka_client=client, max_poll_records=100,
                       commit_max_events=1000, samples_topic=samples_topic, exit_when_idle=3)
    rng = random.Random(backend)
    log = tmp_path / "worker.log"
    # kill points: KILLS random positions in the stream; each life is SIGKILLed once the committed
    # offsets pass its point, after a further random 0-20 ms (so kills land anywhere in a batch:
    # polling, decoding, producing, committing)
    # (kill points stop at half the stream: with background commits a worker on a fast box finished
    # the last 40% between reaching a kill point and the kill, and a kill after the end of the stream
    # tests nothing)
    targets = sorted(rng.sample(range(c["n"] // 20, c["n"] // 2), KILLS))
    kills = 0
    done = 0
    where = []  # (kill point, committed offsets after the kill), for the failure message
    for target in targets:
        target = max(target, done + 1)
        p = start_worker(argv, log)
        try:
            wait_for(lambda: total(stored_offsets(uri, c["group"])) >= target or p.poll() is not None, 90,
                     every=0.02, what="worker progress")
            time.sleep(rng.uniform(0, 0.02))
        finally:
            p.send_signal(signal.SIGKILL)
            p.wait(30)
        now = total(stored_offsets(uri, c["group"]))
        assert now >= done  # committed state never goes back
        if now < c["n"]:
            kills += 1  # killed mid-stream
        done = now
        where.append((target, now))
    assert kills >= KILLS, f"only {kills} kills landed mid-stream of {c['n']}: (kill point, committed) {where}"
    p = start_worker(argv, log)  # the last run finishes the stream
    assert p.wait(300) == 0, log_tail(log)
    with open_store(uri, readonly=True) as s:
        assert total(s.offsets(c["group"])) == c["n"]
        assert s.digest() == c["ref_digest"]
    # every sample was emitted (some twice, with the same id and content); none differs from the reference
    assert sample_set(broker.bootstrap, samples_topic, c["parts"]) == c["ref_samples"]


@pytest.mark.slow
@pytest.mark.redis
def test_rebalance_with_a_killed_member_applies_every_event_once(broker, redis_server, tmp_path):
    topic, group, parts = f"reb-{uuid.uuid4().hex[:8]}", "reb-group", 6
    recs = make_stream(seed=5, n=24_000, users=90, partitions=parts)
    produce_partitioned(broker.bootstrap, topic, recs, parts, [f"{topic}.samples", f"{topic}.dlq"])
    raw = layout(recs, topic)
    uri = redis_server.store_uri()
    argv = worker_argv(broker.bootstrap, topic, group, uri, max_poll_records=100, commit_max_events=500,
                       exit_when_idle=8)
    logs = [tmp_path / f"w{i}.log" for i in range(3)]
    procs = [start_worker(argv, logs[i]) for i in range(3)]
    try:
        # all three own partitions and made progress, then one dies mid-stream
        wait_for(lambda: all("assigned [(" in lg.read_text() for lg in logs), 60, what="three assignments")
        wait_for(lambda: total(stored_offsets(uri, group)) > len(recs) // 4, 90, what="progress")
        victim = procs[0]
        victim.send_signal(signal.SIGKILL)
        victim.wait(30)
        at_kill = total(stored_offsets(uri, group))
        assert at_kill < len(recs)
        for p in procs[1:]:
            assert p.wait(300) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    owned = re.findall(r"assigned (\[.*?\])", logs[0].read_text())[-1]
    taken_over = [re.findall(r"assigned (\[.*?\])", lg.read_text())[-1] for lg in logs[1:]]
    victim_parts = set(re.findall(r"\('[^']+', (\d+)\)", owned))
    assert victim_parts and victim_parts <= set(re.findall(r"\('[^']+', (\d+)\)", " ".join(taken_over)))
    with open_store(uri, readonly=True) as s:
        assert total(s.offsets(group)) == len(recs)
        assert s.digest() == oracle_digest(raw, group)


@pytest.mark.slow
def test_broker_restart_worker_reconnects_and_keeps_its_state(tmp_path):
    """What this proves, given that Tansu keeps topics in memory: the worker survives the broker
    disappearing (no crash, no lost or doubled committed state), reconnects to a new broker on the
    same address, rejoins the group and seeks to the offsets stored WITH ITS STATE (the new broker
    knows no committed offsets). To stand in for a broker that kept its log, the same records are
    produced again to the recreated topic (same partitions and offsets), followed by new ones: the
    worker must apply only the new ones. What it does not prove: broker durability (real Kafka's)."""
    b1 = EmbeddedBroker().start()
    port = b1.port
    topic, group, parts = f"brk-{uuid.uuid4().hex[:8]}", "brk-group", 2
    recs = make_stream(seed=3, n=6000, users=20, partitions=parts)
    first = recs[:4000]
    extra = [f"{topic}.samples", f"{topic}.dlq"]
    uri = f"lmdb://{tmp_path}/store"
    log = tmp_path / "worker.log"
    p = None
    try:
        produce_partitioned(b1.bootstrap, topic, first, parts, extra)
        p = start_worker(worker_argv(b1.bootstrap, topic, group, uri, max_poll_records=500, exit_when_idle=120),
                         log)
        wait_for(lambda: total(stored_offsets(uri, group)) == len(first), 90, what="first part consumed")
        before = open_store(uri, readonly=True)
        digest_before = before.digest()
        before.close()
        b1.stop()
        time.sleep(4)  # the worker keeps running, its clients retrying
        assert p.poll() is None, log_tail(log)
        assert total(stored_offsets(uri, group)) == len(first)
        b2 = EmbeddedBroker(port=port).start()
        try:
            produce_partitioned(b2.bootstrap, topic, recs, parts, extra)  # the old log again, then new records
            wait_for(lambda: total(stored_offsets(uri, group)) == len(recs), 120, what="second part consumed")
            p.send_signal(signal.SIGTERM)
            assert p.wait(60) == 0, log_tail(log)
        finally:
            b2.stop()
    finally:
        b1.stop()
        if p is not None and p.poll() is None:
            p.kill()
    assert digest_before == oracle_digest(layout(first, topic), group)  # the first part's log is a prefix
    with open_store(uri, readonly=True) as s:
        assert s.digest() == oracle_digest(layout(recs, topic), group)


def test_sigterm_finishes_the_batch_commits_and_exits_0(broker, tmp_path):
    topic, group, parts = f"term-{uuid.uuid4().hex[:8]}", "term-group", 2
    recs = make_stream(seed=9, n=20_000, users=30, partitions=parts)
    produce_partitioned(broker.bootstrap, topic, recs, parts, [f"{topic}.samples", f"{topic}.dlq"])
    raw = layout(recs, topic)
    uri = f"lmdb://{tmp_path}/store"
    log = tmp_path / "worker.log"
    # a long interval and large checkpoints: SIGTERM must commit the open checkpoint, not wait for it
    argv = worker_argv(broker.bootstrap, topic, group, uri, max_poll_records=200, commit_max_events=2000,
                       commit_interval_ms=60_000, exit_when_idle=3)
    p = start_worker(argv, log)
    wait_for(lambda: total(stored_offsets(uri, group)) > 0, 90, what="progress")
    time.sleep(0.05)  # a few more batches into the next checkpoint
    p.send_signal(signal.SIGTERM)
    assert p.wait(30) == 0, log_tail(log)
    assert '{"worker": {' in log.read_text()
    at_stop = stored_offsets(uri, group)
    assert 0 < total(at_stop) < len(recs)  # stopped mid-stream...
    with open_store(uri, readonly=True) as s:  # ...on a batch boundary: exactly the state of that prefix
        assert s.digest() == oracle_digest(raw, group, until=at_stop)
    p = start_worker(argv, log)
    assert p.wait(120) == 0
    with open_store(uri, readonly=True) as s:
        assert s.digest() == oracle_digest(raw, group)


def test_worker_module_rejects_a_bad_setting_in_one_line():
    out = subprocess.run([sys.executable, "-m", "pipeline.worker", "--max-poll-records", "0"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "max_poll_records" in out.stderr and len(out.stderr.strip().splitlines()) == 1
