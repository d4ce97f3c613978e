"""The worker's Prometheus metrics (pipeline/metrics.py): what they read from the worker, and the
``/metrics`` endpoint of a real worker run against the embedded broker."""

from __future__ import annotations

import socket
import threading
import time
import urllib.error
import urllib.request
import uuid

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pipeline.broker import free_port
from pipeline.config import ProduceSettings, WorkerSettings
from pipeline.exceptions import ConfigError
from pipeline.metrics import WorkerMetrics
from pipeline.worker import run_worker
from tests.fixtures import event
from tests.pipeline.test_worker import MIN, T0, feed, make_worker


def samples_of(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, by (name, sorted labels)."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_metrics_read_the_workers_counters_partitions_and_commits():
    w = make_worker()
    now = time.time() + 5  # the scrape's clock: 5 s after anything the worker does here
    m = WorkerMetrics(w, clock=lambda: now)
    before = samples_of(generate_latest(m.registry).decode())
    assert before[("ctrstream_worker_last_commit_timestamp_seconds", ())] != before[
        ("ctrstream_worker_last_commit_timestamp_seconds", ())]  # NaN: nothing committed yet
    feed(w, [event(user=1, item=k, ts=T0 + k * MIN) for k in range(5)]
         + [event("impression", user=1, item=9, request_id="r1", ts=T0 + 6 * MIN),
            event("impression", user=2, item=9, request_id="r2", ts=T0 + 7 * MIN),
            event("click", user=1, item=9, request_id="r1", ts=T0 + 8 * MIN)])
    feed(w, [b"{not json", event(user=3, item=1, ts=T0 + 9 * MIN)], start_offset=8)
    got = samples_of(generate_latest(m.registry).decode())
    p0 = (("partition", "0"), ("topic", "events"))
    s = w.stats
    assert got[("ctrstream_worker_events_total", (("kind", "behavior"),))] == s.behaviors == 6
    assert got[("ctrstream_worker_events_total", (("kind", "impression"),))] == s.impressions == 2
    assert got[("ctrstream_worker_events_total", (("kind", "click"),))] == s.clicks == 1
    assert got[("ctrstream_worker_dead_letters_total", ())] == 1
    assert got[("ctrstream_worker_batches_total", ())] == 2
    # both impressions wait for their 30-minute window to close: nothing labeled yet
    assert got[("ctrstream_worker_samples_total", ())] == 0
    assert got[("ctrstream_worker_pending_impressions", p0)] == 2
    assert got[("ctrstream_worker_orphan_clicks", p0)] == 0
    assert got[("ctrstream_worker_watermark_timestamp_seconds", p0)] == (T0 + 9 * MIN) / 1000
    assert got[("ctrstream_worker_watermark_lag_seconds", p0)] == pytest.approx(now - (T0 + 9 * MIN) / 1000)
    assert got[("ctrstream_worker_stored_offset", p0)] == 10  # commit_max_events=1: each batch commits
    assert got[("ctrstream_worker_assigned_partitions", ())] == 1
    assert got[("ctrstream_worker_commits_total", ())] == s.commits == 2
    assert got[("ctrstream_worker_commit_seconds_count", ())] == 2
    assert got[("ctrstream_worker_last_commit_timestamp_seconds", ())] == w.last_commit_unix
    age = got[("ctrstream_worker_last_commit_age_seconds", ())]
    assert age == pytest.approx(now - w.last_commit_unix) and age > 4
    assert got[("ctrstream_worker_info", (("client", "kafka-python"), ("group", "ctrstream-worker"),
                                          ("store", "memory")))] == 1
    feed(w, [event(user=3, item=2, ts=T0 + 40 * MIN)], start_offset=10)  # the windows close
    got = samples_of(generate_latest(m.registry).decode())
    assert got[("ctrstream_worker_samples_total", ())] == 2 and got[("ctrstream_worker_positive_samples_total", ())] == 1
    assert got[("ctrstream_worker_pending_impressions", p0)] == 0
    w.revoke([("events", 0)])
    got = samples_of(generate_latest(m.registry).decode())
    assert got[("ctrstream_worker_assigned_partitions", ())] == 0
    assert not any(name == "ctrstream_worker_pending_impressions" for name, _ in got)


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            return samples_of(r.read().decode())
    except (urllib.error.URLError, ConnectionError):
        return None


@pytest.mark.kafka
def test_a_running_worker_serves_metrics_and_closes_the_port_when_it_exits(broker, tmp_path):
    from pipeline.produce import produce_events

    tag = uuid.uuid4().hex[:8]
    ps = ProduceSettings(bootstrap_servers=broker.bootstrap, events_topic=f"ev-{tag}", samples_topic=f"sa-{tag}",
                         dlq_topic=f"dlq-{tag}", partitions=2)
    evs = [event(user=u, item=k, ts=T0 + k * MIN) for u in range(6) for k in range(30)]
    produce_events(ps, evs)
    port = free_port()
    ws = WorkerSettings(bootstrap_servers=broker.bootstrap, events_topic=ps.events_topic,
                        samples_topic=ps.samples_topic, dlq_topic=ps.dlq_topic, group_id=f"w-{tag}",
                        store=f"lmdb://{tmp_path}/st", exit_when_idle=3, max_poll_interval_ms=3000,
                        session_timeout_ms=3000, max_poll_records=50, metrics_port=port)
    result: list[object] = []
    t = threading.Thread(target=lambda: result.append(run_worker(ws, install_signals=False)))
    t.start()
    seen = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and t.is_alive():
        got = _scrape(port)
        if got and got.get(("ctrstream_worker_commits_total", ())) and got.get(
                ("ctrstream_worker_events_total", (("kind", "behavior"),))) == len(evs):
            seen = got
            break
        time.sleep(0.2)
    t.join(60)
    assert not t.is_alive() and result, "the worker did not exit"
    assert seen is not None, "the metrics never showed every event applied and committed"
    assert seen[("ctrstream_worker_assigned_partitions", ())] == 2
    assert seen[("ctrstream_worker_batch_seconds_count", ())] >= 1
    assert sum(v for (name, _), v in seen.items() if name == "ctrstream_worker_stored_offset") <= len(evs)
    info = [labels for name, labels in seen if name == "ctrstream_worker_info"]
    assert info == [(("client", "kafka-python"), ("group", f"w-{tag}"), ("store", "lmdb"))]
    assert _scrape(port) is None  # the server went with the worker


@pytest.mark.kafka
def test_a_metrics_port_in_use_fails_at_start_up_naming_the_setting(broker, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ws = WorkerSettings(bootstrap_servers=broker.bootstrap, store=f"lmdb://{tmp_path}/st",
                            metrics_port=taken.getsockname()[1])
        with pytest.raises(ConfigError, match="metrics_port: cannot serve /metrics on 127.0.0.1"):
            run_worker(ws, install_signals=False)
