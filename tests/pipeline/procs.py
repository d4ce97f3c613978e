"""Helpers of the process-level tests: produce a fixed stream with explicit partitions, run
``python -m pipeline.worker`` as a subprocess, watch its stored offsets, and compute the
oracle: the state an uninterrupted in-process run over the same records ends in."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pipeline.config import WorkerSettings
from pipeline.events import RawRecord
from pipeline.state import open_store
from pipeline.worker import StreamWorker

ROOT = Path(__file__).resolve().parents[2]
#: Group liveness settings of the subprocess workers: the embedded broker holds a join for the
#: rebalance timeout (= max poll interval), so short values keep restarts quick.
FAST_GROUP = {"max_poll_interval_ms": 2000, "session_timeout_ms": 2000}


def produce_partitioned(bootstrap: str, topic: str, records: Sequence[tuple[int, bytes | None, bytes | None]],
                        partitions: int, extra_topics: Iterable[str] = ()) -> None:
    """Create ``topic`` (and ``extra_topics``) and send (partition, key, value) in order, explicitly
    partitioned, so the log layout (partition, offset) is known to the oracle."""
    from kafka import KafkaProducer

    from pipeline.broker import create_topics

    create_topics(bootstrap, {topic: partitions, **{t: partitions for t in extra_topics}})
    p = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, batch_size=1 << 20, max_request_size=16 << 20,
                      acks="all")
    futs = [p.send(topic, key=k, value=v, partition=part) for part, k, v in records]
    p.flush()
    for f in futs:
        f.get(timeout=30)
    p.close()


def layout(records: Sequence[tuple[int, bytes | None, bytes | None]], topic: str) -> list[RawRecord]:
    """The (partition, offset) each record got, as RawRecords, in production order."""
    offs: dict[int, int] = {}
    out = []
    for part, k, v in records:
        o = offs.get(part, 0)
        offs[part] = o + 1
        out.append(RawRecord(topic, part, o, k, v))
    return out


class _Null:
    def send(self, *a: Any) -> None:
        pass

    def send_many(self, *a: Any) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def oracle_digest(raw: Sequence[RawRecord], group: str, until: dict[tuple[str, int], int] | None = None,
                  **settings: Any) -> str:
    """Digest after an uninterrupted in-process run over ``raw`` (optionally only the records below
    ``until`` per partition), one record at a time per partition in log order."""
    store = open_store("memory://")
    w = StreamWorker(WorkerSettings(store="memory://", group_id=group, **settings), store, _Null())
    tps = sorted({(r.topic, r.partition) for r in raw})
    w.assign(tps)
    recs = [r for r in raw if until is None or r.offset < until.get((r.topic, r.partition), 0)]
    for i in range(0, len(recs), 997):  # batch size does not matter (tested); any cut will do
        w.process(recs[i:i + 997])
    w.commit()  # nor does the commit policy (tested): the end state is the same
    return store.digest()


def worker_argv(bootstrap: str, topic: str, group: str, store: str, **settings: Any) -> list[str]:
    s = {"events_topic": topic, "samples_topic": f"{topic}.samples", "dlq_topic": f"{topic}.dlq",
         "group_id": group, "store": store, "bootstrap_servers": bootstrap, **FAST_GROUP, **settings}
    argv = [sys.executable, "-m", "pipeline.worker"]
    for k, v in s.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    return argv


def start_worker(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    f = open(log, "ab")  # noqa: SIM115 - the child owns it for its lifetime
    return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def stored_offsets(store_uri: str, group: str) -> dict[tuple[str, int], int]:
    try:
        s = open_store(store_uri, readonly=True)
    except Exception:  # noqa: BLE001 - not created yet
        return {}
    try:
        return s.offsets(group)
    finally:
        s.close()


def log_tail(log: Path, n: int = 3000) -> str:
    """The end of a worker's log for an assertion message, with the head of its first traceback
    (where in our code it started; a deep client traceback otherwise pushes that out of the tail)."""
    text = log.read_text(errors="replace")
    i = text.find("Traceback (most recent call last)")
    if i < 0 or i >= len(text) - n:
        return text[-n:]
    return text[i:i + 1500] + "\n[...]\n" + text[-n:]


def wait_for(pred: Any, timeout: float, every: float = 0.05, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


def read_topic(bootstrap: str, topic: str, partitions: int, expect: int | None = None,
               quiet_s: float = 2.0) -> list[Any]:
    """Every record of ``topic``, from the beginning: until ``expect`` records, else until nothing
    arrived for ``quiet_s``. (Not by end offsets: the embedded broker's ListOffsets "latest" answers
    the base offset of the last record batch, not the log end.)"""
    from kafka import KafkaConsumer, TopicPartition

    c = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, max_poll_records=5000)
    c.assign([TopicPartition(topic, i) for i in range(partitions)])
    c.seek_to_beginning()
    out: list[Any] = []
    deadline = time.monotonic() + 120
    last = time.monotonic()
    while time.monotonic() < deadline:
        got = c.poll(200)
        for recs in got.values():
            out.extend(recs)
        if got:
            last = time.monotonic()
        if expect is not None and len(out) >= expect:
            break
        if expect is None and time.monotonic() - last > quiet_s:
            break
    c.close()
    return out


def sample_set(bootstrap: str, topic: str, partitions: int) -> set[str]:
    """Distinct samples of a samples topic (a replay re-emits a sample with the same content)."""
    return {json.dumps(json.loads(r.value), sort_keys=True) for r in read_topic(bootstrap, topic, partitions)}
