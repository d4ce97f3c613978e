"""The demo path at small scale, every stage real: broker, worker, LMDB, trainer, MLflow, gRPC scorer."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from collections import defaultdict

import numpy as np
import pytest

from pipeline.config import ProduceSettings, WorkerSettings
from pipeline.datasets.synthetic import SyntheticConfig, generate
from pipeline.events import hash_id
from pipeline.produce import produce_events
from pipeline.worker import run_worker

pytestmark = [pytest.mark.e2e, pytest.mark.kafka]


def _read_topic(bootstrap: str, topic: str, partitions: int) -> list[dict]:
    from kafka import KafkaConsumer, TopicPartition

    c = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    tps = [TopicPartition(topic, i) for i in range(partitions)]
    c.assign(tps)
    c.seek_to_beginning()
    out: list[dict] = []
    end = sum(c.end_offsets(tps).values())
    deadline = time.monotonic() + 30
    while len(out) < end and time.monotonic() < deadline:
        for recs in c.poll(500).values():
            out.extend(json.loads(r.value) for r in recs)
    c.close()
    return out


def _expected_seq_pos(events: list[dict]) -> dict[tuple[str, str], int]:
    """Behaviors (and clicks) of the user strictly before each impression, in stream order."""
    n: dict[str, int] = defaultdict(int)
    out = {}
    for e in events:
        u = str(e["user_id"])
        if e["type"] == "impression":
            out[(e["request_id"], str(e["item_id"]))] = n[u]
        else:
            n[u] += 1
    return out


def test_demo_path_small(broker, tmp_path):
    from models.online import TrainerSettings, run_trainer
    from models.registry import resolve_alias

    tag = uuid.uuid4().hex[:8]
    stream = generate(SyntheticConfig(users=12, behaviors_per_user=120, impressions_per_user=15, seed=3))
    ps = ProduceSettings(bootstrap_servers=broker.bootstrap, events_topic=f"ev-{tag}", samples_topic=f"sa-{tag}",
                         dlq_topic=f"dlq-{tag}", partitions=2)
    produce_events(ps, stream.events)
    store = f"lmdb://{tmp_path}/store"
    ws = WorkerSettings(bootstrap_servers=broker.bootstrap, events_topic=ps.events_topic,
                        samples_topic=ps.samples_topic, dlq_topic=ps.dlq_topic, group_id=f"w-{tag}", store=store,
                        exit_when_idle=2, drain_on_exit=True, max_poll_interval_ms=3000, session_timeout_ms=3000)
    stats = run_worker(ws, install_signals=False)
    assert stats.samples == len(stream.labels) and stats.dead_letters == 0

    # samples: every impression once, label = generator's truth, seq_pos = behaviors before it
    samples = _read_topic(broker.bootstrap, ps.samples_topic, 2)
    assert len(samples) == len(stream.labels)
    assert len({s["sample_id"] for s in samples}) == len(samples)
    truth = {(r, str(i)): y for (r, i), y in stream.labels.items()}
    pos = _expected_seq_pos(stream.events)
    for s in samples:
        key = (s["sample_id"].split(":")[0], s["item_id"])
        assert s["label"] == truth[key], s
        assert s["seq_pos"] == pos[key], s
        assert s["user_hash"] == hash_id(s["user_id"])

    # trainer: learns every sample once, registers versions, sets a champion
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    ts = TrainerSettings(bootstrap_servers=broker.bootstrap, samples_topic=ps.samples_topic, group_id=f"t-{tag}",
                         store=store, models="din,sdim", tracking_uri=uri, exit_when_idle=3, batch_size=64,
                         seq_len=200, short_len=20, item_buckets=4096, category_buckets=512,
                         registered_prefix=f"e2e-{tag}-", checkpoint_every=100,
                         checkpoint_dir=str(tmp_path / "trainer"))
    reports = run_trainer(ts, install_signals=False)
    assert [r.samples for r in reports] == [len(samples)] * 2
    champion = resolve_alias(f"e2e-{tag}-sdim", "champion", uri)
    assert champion is not None

    # scorer: real process, real gRPC; scores in (0, 1), in candidate order
    from pipeline.broker import free_port
    from serving.client import ScorerClient

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "serve", "--store", store, "--model-name",
                             f"e2e-{tag}-sdim", "--tracking-uri", uri, "--port", str(port), "--host", "127.0.0.1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client = ScorerClient(f"127.0.0.1:{port}")
        deadline = time.monotonic() + 60
        while True:
            try:
                if client.health(timeout=1.0) == "SERVING":
                    break
            except Exception:  # noqa: BLE001
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "scorer did not become ready"
            time.sleep(0.2)
        items = [str(i) for i in range(0, 400, 7)]
        cats = [str(int(i) // stream.config.items_per_category) for i in items]
        scores, name, version = client.score("3", items, cats, timeout=5)
        assert name == f"e2e-{tag}-sdim" and version == champion
        assert len(scores) == len(items) and all(0.0 < s < 1.0 for s in scores)
        # order: scoring each candidate alone gives the score at its position
        for k in (0, 5, len(items) - 1):
            alone, _, _ = client.score("3", [items[k]], [cats[k]], timeout=5)
            assert abs(alone[0] - scores[k]) < 1e-5
        assert len(set(np.round(scores, 6))) > 1  # not a constant
        client.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out[-2000:]


@pytest.mark.slow
def test_ctrstream_demo_command_tiny(tmp_path):
    out = tmp_path / "summary.json"
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "demo", "--users", "12", "--behaviors", "150",
                        "--impressions", "15", "--score-calls", "5", "--candidates", "20",
                        "--workdir", str(tmp_path / "demo"), "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    s = json.loads(out.read_text())
    assert s["worker"]["dead_letters"] == 8 and s["worker"]["samples"] == 12 * 15
    assert all(m["samples"] == 12 * 15 and m["champion"] for m in s["models"])
    assert s["scorer"]["calls"] == 5 and s["scorer"]["p99_ms"] > 0
    assert "ctrstream demo summary" in r.stdout
