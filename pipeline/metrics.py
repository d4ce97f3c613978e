"""Prometheus metrics of the stream worker (``--metrics-port``; off by default), on a registry of its own.

The counters and per-partition gauges are read from the worker when Prometheus scrapes (a custom
collector over ``StreamWorker.stats`` and ``partition_status``), so the hot path pays nothing for
them; only the two histograms are observed as things happen, once per poll batch and once per commit.

=================================================  =========  ==========================================
name                                               type       labels / meaning
=================================================  =========  ==========================================
ctrstream_worker_events_total                      counter    kind (behavior/impression/click): valid
ctrstream_worker_dead_letters_total                counter    records sent to the DLQ
ctrstream_worker_samples_total                     counter    labeled samples published
ctrstream_worker_positive_samples_total            counter    of which clicked
ctrstream_worker_duplicate_impressions_total       counter    impressions seen again while pending
ctrstream_worker_unmatched_clicks_total            counter    clicks whose window closed unmatched
ctrstream_worker_skipped_below_stored_total        counter    records below the stored offsets (reset)
ctrstream_worker_batches_total                     counter    poll batches processed
ctrstream_worker_commits_total                     counter    successful state commits
ctrstream_worker_fenced_commits_total              counter    commits refused (another owner committed)
ctrstream_worker_batch_seconds                     histogram  process() of one poll batch
ctrstream_worker_commit_seconds                    histogram  the store's part of one commit
ctrstream_worker_last_commit_timestamp_seconds     gauge      Unix time of the last commit (NaN: none)
ctrstream_worker_last_commit_age_seconds           gauge      seconds since then: how stale the store is
ctrstream_worker_assigned_partitions               gauge
ctrstream_worker_watermark_timestamp_seconds       gauge      topic, partition: max event time seen
ctrstream_worker_watermark_lag_seconds             gauge      topic, partition: now - watermark
ctrstream_worker_pending_impressions               gauge      topic, partition: waiting for a label
ctrstream_worker_orphan_clicks                     gauge      topic, partition
ctrstream_worker_stored_offset                     gauge      topic, partition: next offset stored
ctrstream_worker_info                              gauge      group, client, store (scheme): always 1
=================================================  =========  ==========================================

Consumer lag is the broker's business: the worker commits the stored offsets to the group after
every state commit, so a standard lag exporter (kafka-lag-exporter, Burrow, ``kafka-consumer-groups``)
reads it without a probe here. ``watermark_lag_seconds`` is the event-time view of the same thing on a
live stream (how far the state is behind the newest event it has seen, plus the stream's own delay).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from pipeline.exceptions import ConfigError

if TYPE_CHECKING:
    from pipeline.worker import StreamWorker

__all__ = ["HttpExposition", "WorkerMetrics", "timestamp_and_age"]

log = logging.getLogger(__name__)

_BATCH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_COMMIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: WorkerStats field -> (metric name without the ctrstream_worker_ prefix and _total suffix, help)
_COUNTERS = {
    "dead_letters": ("dead_letters", "records sent to the dead-letter topic"),
    "samples": ("samples", "labeled samples published"),
    "positives": ("positive_samples", "labeled samples with a click"),
    "duplicate_impressions": ("duplicate_impressions", "impressions seen again while pending"),
    "unmatched_clicks": ("unmatched_clicks", "clicks whose attribution window closed without an impression"),
    "skipped_below_stored": ("skipped_below_stored", "records below the stored offsets, not applied again"),
    "batches": ("batches", "poll batches processed"),
    "commits": ("commits", "successful state commits"),
    "fenced_commits": ("fenced_commits", "commits refused because another owner committed"),
}


class _WorkerCollector(Collector):
    """Counters and gauges read from the worker at scrape time."""

    def __init__(self, worker: StreamWorker, labels: dict[str, str], clock: Callable[[], float]) -> None:
        self.worker, self.labels, self.clock = worker, labels, clock

    def collect(self) -> Iterator[Any]:
        w, now = self.worker, self.clock()
        stats = w.stats.as_dict()
        events = CounterMetricFamily("ctrstream_worker_events", "valid events applied, by kind", labels=["kind"])
        for kind, field in (("behavior", "behaviors"), ("impression", "impressions"), ("click", "clicks")):
            events.add_metric([kind], stats[field])
        yield events
        for field, (name, help_) in _COUNTERS.items():
            yield CounterMetricFamily(f"ctrstream_worker_{name}", help_, value=stats[field])
        yield from timestamp_and_age("ctrstream_worker_last_commit", "the last successful state commit",
                                     w.last_commit_unix, now)
        parts = w.partition_status()
        yield GaugeMetricFamily("ctrstream_worker_assigned_partitions", "partitions owned", value=len(parts))
        tp = ["topic", "partition"]
        wm = GaugeMetricFamily("ctrstream_worker_watermark_timestamp_seconds", "max event time seen", labels=tp)
        lag = GaugeMetricFamily("ctrstream_worker_watermark_lag_seconds", "wall clock minus the watermark",
                                labels=tp)
        pending = GaugeMetricFamily("ctrstream_worker_pending_impressions", "impressions waiting for a label",
                                    labels=tp)
        orphans = GaugeMetricFamily("ctrstream_worker_orphan_clicks", "clicks waiting for their impression",
                                    labels=tp)
        stored = GaugeMetricFamily("ctrstream_worker_stored_offset", "next offset as of the last commit",
                                   labels=tp)
        for p in parts:
            lv = [p.topic, str(p.partition)]
            if p.watermark_ms > 0:
                wm.add_metric(lv, p.watermark_ms / 1000)
                lag.add_metric(lv, now - p.watermark_ms / 1000)
            pending.add_metric(lv, p.pending_impressions)
            orphans.add_metric(lv, p.orphan_clicks)
            if p.stored_offset is not None:
                stored.add_metric(lv, p.stored_offset)
        yield from (wm, lag, pending, orphans, stored)
        info = GaugeMetricFamily("ctrstream_worker_info", "the worker's configuration", labels=list(self.labels))
        info.add_metric(list(self.labels.values()), 1)
        yield info


def timestamp_and_age(prefix: str, what: str, last: float | None, now: float) -> Iterator[GaugeMetricFamily]:
    """``<prefix>_timestamp_seconds`` (Unix time of ``what``) and ``<prefix>_age_seconds`` (since then);
    NaN for both while it has not happened."""
    yield GaugeMetricFamily(f"{prefix}_timestamp_seconds", f"Unix time of {what}",
                            value=float("nan") if last is None else last)
    yield GaugeMetricFamily(f"{prefix}_age_seconds", f"seconds since {what}",
                            value=float("nan") if last is None else max(0.0, now - last))


class HttpExposition:
    """``/metrics`` of ``self.registry`` over HTTP: the worker's, the trainer's and the scorer's metrics."""

    registry: CollectorRegistry
    _server: Any = None

    def serve_http(self, port: int, host: str = "127.0.0.1") -> int:
        """Expose ``/metrics`` over HTTP; returns the bound port (``port=0``: ephemeral)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._server = server
        return int(server.server_port)

    def start(self, port: int, host: str) -> int:
        """:meth:`serve_http` for a service starting up (the ``metrics_port`` and ``metrics_host`` settings):
        a port that cannot be bound is a :class:`ConfigError` naming the setting; the address is logged."""
        try:
            bound = self.serve_http(port, host)
        except OSError as e:  # a port in use, an address not on this host
            raise ConfigError(f"metrics_port: cannot serve /metrics on {host}:{port}: {e.strerror or e}") from None
        log.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    def close(self) -> None:
        """Stop the HTTP server and release its port (nothing when it was never started)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class WorkerMetrics(HttpExposition):
    """All worker metrics for one :class:`~pipeline.worker.StreamWorker`. Construction hooks the
    commit histogram into the worker (``on_commit_seconds``); the caller observes batches
    (:meth:`observe_batch`) and may serve ``/metrics`` over HTTP (:meth:`serve_http`)."""

    def __init__(self, worker: StreamWorker, registry: CollectorRegistry | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        s = worker.s
        labels = {"group": s.group_id, "client": s.kafka_client, "store": s.store.split("://", 1)[0]}
        self.registry.register(_WorkerCollector(worker, labels, clock))
        self.batch_seconds = Histogram("ctrstream_worker_batch_seconds", "process() of one poll batch",
                                       buckets=_BATCH_BUCKETS, registry=self.registry)
        self.commit_seconds = Histogram("ctrstream_worker_commit_seconds",
                                        "the store's part of one state commit (appends grouped, one atomic "
                                        "commit)", buckets=_COMMIT_BUCKETS, registry=self.registry)
        worker.on_commit_seconds = self.commit_seconds.observe

    def observe_batch(self, seconds: float) -> None:
        self.batch_seconds.observe(seconds)
